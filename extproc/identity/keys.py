"""JWK and JWKS parsing into verification keys, and the signing side used by dev tokens and tests.

RS* and ES* signatures go through python-jose's cryptography backend (``jose.jwk.construct``). python-jose
3.x implements neither PS* (RSASSA-PSS) nor EdDSA, so those two are checked here with ``cryptography``
directly, following RFC 7518 section 3.5 (PSS salt length = hash length) and RFC 8037 (Ed25519, Ed448).

What a key may verify is decided here, from the JWK alone, never from a token: ``kty`` and ``crv`` fix the
algorithm family (an RSA key can never check an ES256 or HS256 signature, a P-384 key never ES256), and a
JWK that names its own ``alg`` is used for that algorithm only. Keys that must not verify signatures are
left out: symmetric (``oct``) keys, keys marked for encryption (``use: enc``), keys carrying private
material, RSA keys under 2048 bits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import jose.backends
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from jose import jwk as jose_jwk
from jose.backends.cryptography_backend import CryptographyECKey, CryptographyRSAKey

from extproc.identity.encoding import b64url_decode, b64url_encode

log = logging.getLogger(__name__)

# python-jose silently falls back to its pure-Python rsa/ecdsa backends when `cryptography` is missing.
# Those are slow and not constant-time; refuse to run on them rather than verify tokens with them.
if jose.backends.RSAKey is not CryptographyRSAKey or jose.backends.ECKey is not CryptographyECKey:
    raise ImportError("python-jose is not using its cryptography backend: install python-jose[cryptography]")

MAX_JWKS_BYTES = 1024 * 1024
"""A JWKS larger than this is refused: real ones are a few kilobytes, and the fetch must stay bounded."""

MIN_RSA_BITS = 2048

RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVE_ALGORITHM = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})
_PSS_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "PS256": hashes.SHA256,
    "PS384": hashes.SHA384,
    "PS512": hashes.SHA512,
}


class JwksError(Exception):
    """A JWKS document cannot be used (not JSON, no usable key...). Never raised on the request path."""


class SignatureCheck(Protocol):
    """What verification needs of a key: python-jose's ``Key.verify`` has exactly this shape."""

    def verify(self, msg: bytes, sig: bytes) -> bool: ...


class _Signer(Protocol):
    def sign(self, msg: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _PssCheck:
    public_key: rsa.RSAPublicKey
    algorithm: str

    def verify(self, msg: bytes, sig: bytes) -> bool:
        digest = _PSS_HASHES[self.algorithm]()
        try:
            self.public_key.verify(
                sig, msg, padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size), digest
            )
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class _EdDsaCheck:
    public_key: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

    def verify(self, msg: bytes, sig: bytes) -> bool:
        try:
            self.public_key.verify(sig, msg)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key from a JWKS with the signature checks it may run, one per algorithm it allows."""

    kid: str | None
    kty: str
    checks: Mapping[str, SignatureCheck]

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(self.checks)

    def verify(self, algorithm: str, signing_input: bytes, signature: bytes) -> bool:
        check = self.checks.get(algorithm)
        return check is not None and check.verify(signing_input, signature)


@dataclass(frozen=True, slots=True)
class KeySet:
    """An issuer's usable keys, immutable: a refresh builds a new one and swaps it in whole."""

    keys: tuple[VerificationKey, ...]
    fingerprint: str
    by_kid: Mapping[str, tuple[VerificationKey, ...]] = field(repr=False)

    @classmethod
    def of(cls, keys: Iterable[VerificationKey], fingerprint: str) -> KeySet:
        keys = tuple(keys)
        by_kid: dict[str, tuple[VerificationKey, ...]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid[key.kid] = (*by_kid.get(key.kid, ()), key)
        return cls(keys=keys, fingerprint=fingerprint, by_kid=by_kid)

    def candidates(self, kid: str | None, algorithm: str) -> tuple[VerificationKey, ...] | None:
        """The keys to try for a token: by kid, or the only key for ``algorithm`` when there is no kid.

        ``None`` means the kid is not in this set at all (a refresh may bring it); an empty tuple means no
        key fits (the kid exists for another algorithm, or a kid-less token is ambiguous)."""
        if kid is not None:
            found = self.by_kid.get(kid)
            if found is None:
                return None
            return tuple(key for key in found if algorithm in key.checks)
        fitting = tuple(key for key in self.keys if algorithm in key.checks)
        return fitting if len(fitting) == 1 else ()


def parse_jwks(document: bytes, allowed: Iterable[str], *, where: str) -> KeySet:
    """The keys of a JWKS document usable with the ``allowed`` algorithms.

    Keys that cannot be used are skipped with a warning naming their kid (a JWKS is public data); a
    document with no usable key at all is an error, since every token of the issuer would then fail."""
    if len(document) > MAX_JWKS_BYTES:
        raise JwksError(f"{where}: JWKS larger than {MAX_JWKS_BYTES} bytes")
    try:
        data = json.loads(document)
    except (UnicodeDecodeError, ValueError) as exc:
        raise JwksError(f"{where}: JWKS is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError(f"{where}: a JWKS is a JSON object with a `keys` list")
    allowed = frozenset(allowed)
    keys: list[VerificationKey] = []
    for index, entry in enumerate(data["keys"]):
        label = f"{where}: key {index}" + (
            f" (kid {entry['kid']!r})"
            if isinstance(entry, dict) and isinstance(entry.get("kid"), str)
            else ""
        )
        if not isinstance(entry, dict):
            log.warning("jwks_key_skipped", extra={"key": label, "reason": "not a JSON object"})
            continue
        try:
            key = parse_jwk(entry, allowed)
        except JwksError as exc:
            log.warning("jwks_key_skipped", extra={"key": label, "reason": str(exc)})
            continue
        if key is not None:
            keys.append(key)
    if not keys:
        raise JwksError(f"{where}: no key in the JWKS can verify {sorted(allowed)} signatures")
    fingerprint = hashlib.sha256(
        json.dumps(data["keys"], sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return KeySet.of(keys, fingerprint)


def parse_jwk(entry: Mapping[str, object], allowed: frozenset[str]) -> VerificationKey | None:
    """One public JWK as a VerificationKey, or None when it is fine but of no use for ``allowed``.

    Raises JwksError for a key that is broken or must not verify anything."""
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwksError("kid is not a string")
    kty = entry.get("kty")
    use = entry.get("use")
    if use is not None and use != "sig":
        return None  # an encryption key: not ours to use
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    if _PRIVATE_MEMBERS & entry.keys():
        raise JwksError("the JWK carries private key material; publish public keys only")
    declared = entry.get("alg")
    if declared is not None and not isinstance(declared, str):
        raise JwksError("alg is not a string")
    if kty == "RSA":
        family = RSA_ALGORITHMS
    elif kty == "EC":
        crv = entry.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVE_ALGORITHM:
            raise JwksError(f"unsupported EC curve {crv!r}")
        family = frozenset({_EC_CURVE_ALGORITHM[crv]})  # RFC 7518 3.4: the curve fixes the algorithm
    elif kty == "OKP":
        if entry.get("crv") not in _OKP_CURVES:
            raise JwksError(f"unsupported OKP curve {entry.get('crv')!r}")
        family = frozenset({"EdDSA"})
    else:
        raise JwksError(f"key type {kty!r} cannot verify public-key signatures")
    if declared is not None:
        if declared not in family:
            raise JwksError(f"alg {declared} does not fit a {kty} key")
        family = frozenset({declared})
    usable = family & allowed
    if not usable:
        return None
    try:
        checks = _checks(entry, kty, usable)
    except JwksError:
        raise
    except Exception as exc:  # python-jose and cryptography raise many types for bad key material
        raise JwksError(f"invalid {kty} key ({type(exc).__name__})") from exc
    return VerificationKey(kid=kid, kty=kty, checks=checks)


def _checks(entry: Mapping[str, object], kty: str, algorithms: frozenset[str]) -> dict[str, SignatureCheck]:
    public = {name: value for name, value in entry.items() if name not in {"alg", "use", "key_ops"}}
    checks: dict[str, SignatureCheck] = {}
    if kty == "RSA":
        if not isinstance(entry.get("n"), str) or not isinstance(entry.get("e"), str):
            # python-jose would default a missing e to 256: never guess key material
            raise JwksError("an RSA key needs n and e")
        for algorithm in sorted(algorithms):
            # python-jose builds a key per algorithm (the algorithm fixes its hash); PS* reuse its parsing.
            jose_key = jose_jwk.construct(public, "RS" + algorithm[2:])
            if not isinstance(jose_key, CryptographyRSAKey):
                raise JwksError("python-jose did not build a cryptography RSA key")
            public_key = jose_key.prepared_key
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise JwksError("not an RSA public key")
            if public_key.key_size < MIN_RSA_BITS:
                raise JwksError(f"RSA key of {public_key.key_size} bits; at least {MIN_RSA_BITS} are needed")
            checks[algorithm] = _PssCheck(public_key, algorithm) if algorithm.startswith("PS") else jose_key
    elif kty == "EC":
        for key_members in ("x", "y"):
            if not isinstance(entry.get(key_members), str):
                raise JwksError("an EC key needs x and y")
        for algorithm in algorithms:
            jose_key = jose_jwk.construct(public, algorithm)
            if not isinstance(jose_key, CryptographyECKey):
                raise JwksError("python-jose did not build a cryptography EC key")
            checks[algorithm] = jose_key
    else:  # OKP
        x = entry.get("x")
        if not isinstance(x, str):
            raise JwksError("an OKP key needs x")
        raw = b64url_decode(x)
        okp_key = (
            ed25519.Ed25519PublicKey.from_public_bytes(raw)
            if entry["crv"] == "Ed25519"
            else ed448.Ed448PublicKey.from_public_bytes(raw)
        )
        checks["EdDSA"] = _EdDsaCheck(okp_key)
    return checks


# The signing side: dev tokens (`extproc token`) and tests. Never used to verify.

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)


def load_private_key(material: Mapping[str, object] | str | bytes, algorithm: str) -> PrivateKey:
    """A private key from PEM (PKCS#8 or traditional) or from a private JWK."""
    if isinstance(material, Mapping):
        kty = material.get("kty")
        if kty == "OKP":
            d = material.get("d")
            if not isinstance(d, str):
                raise ValueError("the OKP JWK has no private part d")
            raw = b64url_decode(d)
            if material.get("crv") == "Ed25519":
                return ed25519.Ed25519PrivateKey.from_private_bytes(raw)
            return ed448.Ed448PrivateKey.from_private_bytes(raw)
        jose_alg = "RS256" if kty == "RSA" else algorithm
        loaded = jose_jwk.construct(dict(material), jose_alg)
        key = getattr(loaded, "prepared_key", None)
    else:
        pem = material.encode() if isinstance(material, str) else material
        key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(
        key,
        rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
    ):
        raise ValueError("expected an RSA, EC or EdDSA private key")
    return key


def sign(key: PrivateKey, algorithm: str, signing_input: bytes) -> bytes:
    """The JWS signature of ``signing_input`` (RFC 7518): python-jose for RS*/ES*, cryptography otherwise."""
    if algorithm.startswith("RS") and isinstance(key, rsa.RSAPrivateKey):
        rsa_signer: _Signer = CryptographyRSAKey(key, algorithm)
        return rsa_signer.sign(signing_input)
    if algorithm.startswith("ES") and isinstance(key, ec.EllipticCurvePrivateKey):
        expected = _EC_CURVE_ALGORITHM.get(_CURVE_NAMES.get(key.curve.name, ""))
        if expected != algorithm:
            raise ValueError(f"{algorithm} needs the matching curve (RFC 7518 3.4)")
        ec_signer: _Signer = CryptographyECKey(key, algorithm)
        return ec_signer.sign(signing_input)
    if algorithm in _PSS_HASHES and isinstance(key, rsa.RSAPrivateKey):
        digest = _PSS_HASHES[algorithm]()
        return key.sign(
            signing_input, padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size), digest
        )
    if algorithm == "EdDSA" and isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key.sign(signing_input)
    raise ValueError(f"a {type(key).__name__} cannot sign {algorithm}")


_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def public_jwk(key: PrivateKey, algorithm: str, kid: str | None = None) -> dict[str, str]:
    """The public JWK of a private key, with ``alg``, ``use: sig`` and ``kid`` (default: its RFC 7638
    thumbprint, so the same key always gets the same kid)."""
    jwk: dict[str, str]
    members: tuple[str, ...]
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        jwk = {"kty": "RSA", "e": _b64_int(numbers.e), "n": _b64_int(numbers.n)}
        members = ("e", "kty", "n")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        point = key.public_key().public_numbers()
        size = (key.curve.key_size + 7) // 8
        jwk = {
            "kty": "EC",
            "crv": _CURVE_NAMES[key.curve.name],
            "x": b64url_encode(point.x.to_bytes(size, "big")),
            "y": b64url_encode(point.y.to_bytes(size, "big")),
        }
        members = ("crv", "kty", "x", "y")
    else:
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        crv = "Ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "Ed448"
        jwk = {"kty": "OKP", "crv": crv, "x": b64url_encode(raw)}
        members = ("crv", "kty", "x")
    thumbprint = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    jwk["kid"] = kid or b64url_encode(hashlib.sha256(thumbprint.encode()).digest())
    jwk["alg"] = algorithm
    jwk["use"] = "sig"
    return jwk


def _b64_int(value: int) -> str:
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))
