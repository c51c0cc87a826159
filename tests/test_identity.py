"""Identity: JWT verification, JWKS loading and refresh, Envoy's jwt_authn payload.

Keys are made for this test session with `cryptography`; JWKS files live in tmp folders and JWKS URLs are
served by a local aiohttp server on a free port. Every security check has a named regression test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jose.backends
import jose.backends.cryptography_backend
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk as jose_jwk

from extproc.errors import HTTP_STATUS, ConfigError
from extproc.identity import (
    AuthError,
    Principal,
    Verifier,
    bearer_token,
    generate_dev_keypair,
    mint_token,
    principal_from_metadata,
)
from extproc.identity.encoding import b64url_encode
from extproc.identity.keys import JwksError, PrivateKey, parse_jwk, public_jwk
from extproc.identity.tokens import generate_key
from extproc.settings import IdentitySettings, IssuerSettings, load_settings

ISSUER = "https://idp.example.com"
OTHER_ISSUER = "https://other-idp.example.com"
AUDIENCE = "llm-gateway"
NOW = 1_700_000_000.0
AUTH_CODES = [
    "jwt_missing",
    "jwt_malformed",
    "jwt_too_large",
    "jwt_alg_not_allowed",
    "jwt_key_unknown",
    "jwt_signature_invalid",
    "jwt_expired",
    "jwt_not_yet_valid",
    "jwt_issuer_unknown",
    "jwt_claim_invalid",
]


# ---- keys and helpers


@dataclass(frozen=True)
class Keys:
    """A private key and its public JWK (with kid and alg)."""

    private: PrivateKey
    algorithm: str
    kid: str

    @property
    def jwk(self) -> dict[str, str]:
        return public_jwk(self.private, self.algorithm, self.kid)

    @property
    def pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], *, kid: str | None = "", **headers: Any) -> str:
        return mint_token(claims, self.pem, self.algorithm, self.kid if kid == "" else kid, headers=headers)


def make_keys(algorithm: str, kid: str) -> Keys:
    return Keys(generate_key(algorithm), algorithm, kid)


@pytest.fixture(scope="session")
def rsa_keys() -> Keys:
    return make_keys("RS256", "rsa-1")


@pytest.fixture(scope="session")
def ec_keys() -> Keys:
    return make_keys("ES256", "ec-1")


@pytest.fixture(scope="session")
def other_keys() -> Keys:
    """The second issuer's key."""
    return make_keys("RS256", "other-1")


@pytest.fixture(scope="session")
def attacker_keys() -> Keys:
    return make_keys("RS256", "attacker-1")


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": NOW - 10,
        "exp": NOW + 300,
        "groups": ["analysts"],
        "email": "alice@example.com",
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def write_jwks(path: Path, *jwks: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(jwks)}), encoding="utf-8")
    return path


def bump_mtime(path: Path) -> None:
    """Move the file's mtime forward so a rewrite within one filesystem tick still counts as a change."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def issuer(jwks_file: Path | None = None, jwks_url: str | None = None, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "jwks_file": str(jwks_file) if jwks_file else None,
        "jwks_url": jwks_url,
        "algorithms": ["RS256", "ES256"],
        "groups_claim": "groups",
        "claims": ["email"],
    }
    entry.update(overrides)
    return entry


def identity(*issuers: dict[str, Any], **overrides: Any) -> IdentitySettings:
    return IdentitySettings.model_validate({"mode": "jwt", "issuers": list(issuers), **overrides})


def code_of(verifier: Verifier, token: str, now: float = NOW) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, now=now)
    assert caught.value.http_status == 401
    return caught.value.code


@pytest.fixture
async def started() -> AsyncIterator[Callable[[IdentitySettings], Awaitable[Verifier]]]:
    """Start verifiers for a test and close them after it, so no refresh task outlives its test."""
    verifiers: list[Verifier] = []

    async def start(settings: IdentitySettings, **options: Any) -> Verifier:
        verifier = Verifier(settings, clock=lambda: NOW, **options)
        verifiers.append(verifier)
        await verifier.start()
        return verifier

    yield start
    for verifier in verifiers:
        await verifier.close()


@pytest.fixture
def jwks_path(tmp_path: Path, rsa_keys: Keys, ec_keys: Keys) -> Path:
    return write_jwks(tmp_path / "jwks.json", rsa_keys.jwk, ec_keys.jwk)


@pytest.fixture
async def verifier(started: Callable[[IdentitySettings], Awaitable[Verifier]], jwks_path: Path) -> Verifier:
    return await started(identity(issuer(jwks_path)))


@dataclass
class JwksServer:
    """A local JWKS endpoint on a free port that counts the requests it answers."""

    documents: dict[str, Any] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    status: int = 200
    url: str = ""

    def serve(self, path: str, *jwks: dict[str, Any]) -> str:
        self.documents[path] = {"keys": list(jwks)}
        return f"{self.url}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if self.status != 200 or request.path not in self.documents:
            return web.Response(status=self.status if self.status != 200 else 404)
        return web.json_response(self.documents[request.path])


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/{tail:.*}", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    yield server
    await runner.cleanup()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check`` until it holds; the background refresh has no completion signal to await."""
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polls state that has no event to wait on
            await asyncio.sleep(0.02)


def verifies(verifier: Verifier, token: str) -> bool:
    try:
        verifier.verify(token, now=NOW)
    except AuthError:
        return False
    return True


# ---- the backend


def test_python_jose_uses_the_cryptography_backend(rsa_keys: Keys, ec_keys: Keys) -> None:
    """The pure-Python rsa/ecdsa backends are slow and not constant-time: only cryptography's is used."""
    assert jose.backends.RSAKey is jose.backends.cryptography_backend.CryptographyRSAKey
    assert jose.backends.ECKey is jose.backends.cryptography_backend.CryptographyECKey
    assert isinstance(
        jose_jwk.construct(rsa_keys.jwk, "RS256"), jose.backends.cryptography_backend.CryptographyRSAKey
    )
    assert isinstance(
        jose_jwk.construct(ec_keys.jwk, "ES256"), jose.backends.cryptography_backend.CryptographyECKey
    )
    key = parse_jwk(rsa_keys.jwk, frozenset({"RS256"}))
    assert key is not None
    assert isinstance(key.checks["RS256"], jose.backends.cryptography_backend.CryptographyRSAKey)


def test_every_auth_code_is_a_401() -> None:
    for code in AUTH_CODES:
        assert HTTP_STATUS[code] == 401
        assert AuthError("x", code=code).http_status == 401


# ---- valid tokens


async def test_valid_tokens_make_a_principal(verifier: Verifier, rsa_keys: Keys, ec_keys: Keys) -> None:
    for keys in (rsa_keys, ec_keys):
        principal = verifier.verify(keys.sign(claims()), now=NOW)
        assert principal == Principal(
            subject="alice",
            issuer=ISSUER,
            groups=frozenset({"analysts"}),
            claims={"email": "alice@example.com"},
            expires_at=NOW + 300,
        )
    assert verifier.keys_loaded
    [status] = verifier.status()
    assert status.issuer == ISSUER
    assert status.kids == ("ec-1", "rsa-1")
    assert status.last_error is None


@pytest.mark.parametrize(
    "algorithm", ["RS384", "RS512", "PS256", "PS384", "PS512", "ES384", "ES512", "EdDSA"]
)
async def test_every_allowed_algorithm_verifies(
    algorithm: str, tmp_path: Path, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    keys = make_keys(algorithm, f"k-{algorithm}")
    path = write_jwks(tmp_path / "jwks.json", keys.jwk)
    verifier = await started(identity(issuer(path, algorithms=[algorithm])))
    assert verifier.verify(keys.sign(claims()), now=NOW).subject == "alice"
    tampered = keys.sign(claims(sub="mallory"))
    good = keys.sign(claims())
    forged = ".".join([*tampered.split(".")[:2], good.split(".")[2]])
    assert code_of(verifier, forged) == "jwt_signature_invalid"


async def test_rsa_key_may_serve_pss_too_unless_its_jwk_names_an_alg(
    tmp_path: Path, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    rsa_key = make_keys("PS256", "pss")
    bare = {name: value for name, value in rsa_key.jwk.items() if name != "alg"}
    verifier = await started(
        identity(issuer(write_jwks(tmp_path / "a.json", bare), algorithms=["RS256", "PS256"]))
    )
    assert verifier.verify(rsa_key.sign(claims()), now=NOW).subject == "alice"
    # The same key, but its JWK says RS256: a PS256 token must not be checked with it.
    pinned = {**bare, "alg": "RS256"}
    verifier = await started(
        identity(issuer(write_jwks(tmp_path / "b.json", pinned), algorithms=["RS256", "PS256"]))
    )
    assert code_of(verifier, rsa_key.sign(claims())) == "jwt_key_unknown"


# ---- regressions: algorithms


def unsigned(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    def encode(part: dict[str, Any]) -> str:
        return b64url_encode(json.dumps(part).encode())

    return f"{encode(header)}.{encode(body)}.{b64url_encode(signature)}"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "", None])
async def test_regression_alg_none_unsigned_token_is_rejected(
    verifier: Verifier, alg: str | None, rsa_keys: Keys
) -> None:
    header = {"typ": "JWT", "kid": rsa_keys.kid} | ({} if alg is None else {"alg": alg})
    assert code_of(verifier, unsigned(header, claims())) == "jwt_alg_not_allowed"
    # an unsigned token that keeps a real signature segment is refused the same way
    real = rsa_keys.sign(claims())
    spliced = unsigned(header, claims()).rsplit(".", 1)[0] + "." + real.rsplit(".", 1)[1]
    assert code_of(verifier, spliced) == "jwt_alg_not_allowed"


def hs256_with(secret: bytes, body: dict[str, Any], kid: str) -> str:
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, body).rsplit(".", 1)[0]
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


async def test_regression_hs256_signed_with_the_rsa_public_key_pem_is_rejected(
    verifier: Verifier, rsa_keys: Keys
) -> None:
    """Algorithm confusion: an attacker HMACs a token with the (public) RSA key as the secret."""
    for secret in (rsa_keys.public_pem(), rsa_keys.public_pem().strip(), json.dumps(rsa_keys.jwk).encode()):
        assert code_of(verifier, hs256_with(secret, claims(), rsa_keys.kid)) == "jwt_alg_not_allowed"


async def test_regression_alg_confusion_holds_even_with_a_misconfigured_allow_list(
    jwks_path: Path, rsa_keys: Keys, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    """Settings refuse HS256; built without validation, the RSA key still cannot act as an HMAC secret."""
    bad_issuer = IssuerSettings.model_construct(**{**issuer(jwks_path), "algorithms": ["RS256", "HS256"]})
    settings = IdentitySettings.model_construct(
        **{**IdentitySettings().model_dump(), "mode": "jwt", "issuers": [bad_issuer]}
    )
    verifier = await started(settings)
    assert code_of(verifier, hs256_with(rsa_keys.public_pem(), claims(), rsa_keys.kid)) == "jwt_key_unknown"
    assert verifier.verify(rsa_keys.sign(claims()), now=NOW).subject == "alice"


async def test_regression_alg_outside_the_issuer_allow_list(
    tmp_path: Path, started: Callable[[IdentitySettings], Awaitable[Verifier]], rsa_keys: Keys, ec_keys: Keys
) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa_keys.jwk, ec_keys.jwk)
    verifier = await started(identity(issuer(path, algorithms=["ES256"])))
    assert code_of(verifier, rsa_keys.sign(claims())) == "jwt_alg_not_allowed"
    assert verifier.verify(ec_keys.sign(claims()), now=NOW).subject == "alice"


async def test_regression_ec_key_of_another_curve_does_not_verify_es256(
    tmp_path: Path, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    p384 = make_keys("ES384", "p384")
    path = write_jwks(tmp_path / "jwks.json", {**p384.jwk, "alg": "ES384"})
    verifier = await started(identity(issuer(path, algorithms=["ES256", "ES384"])))
    # an ES256 header with the P-384 key's kid: RFC 7518 ties ES256 to P-256, so no key fits
    token = mint_token(claims(), p384.pem, "ES384", "p384")
    _, body, signature = token.split(".")
    relabelled = b64url_encode(json.dumps({"alg": "ES256", "kid": "p384"}).encode())
    assert code_of(verifier, f"{relabelled}.{body}.{signature}") == "jwt_key_unknown"


# ---- regressions: time


async def test_regression_expired_token(verifier: Verifier, rsa_keys: Keys) -> None:
    token = rsa_keys.sign(claims(exp=NOW - 31))  # leeway is 30 s
    assert code_of(verifier, token) == "jwt_expired"
    assert code_of(verifier, rsa_keys.sign(claims(exp=NOW - 30))) == "jwt_expired"  # exp is exclusive


async def test_regression_missing_or_non_numeric_exp(verifier: Verifier, rsa_keys: Keys) -> None:
    assert code_of(verifier, rsa_keys.sign(claims(exp=None))) == "jwt_claim_invalid"
    for bad in ("9999999999", True, [NOW + 100]):
        assert code_of(verifier, rsa_keys.sign(claims(exp=bad))) == "jwt_claim_invalid"


async def test_regression_not_yet_valid_nbf(verifier: Verifier, rsa_keys: Keys) -> None:
    assert code_of(verifier, rsa_keys.sign(claims(nbf=NOW + 31))) == "jwt_not_yet_valid"
    assert code_of(verifier, rsa_keys.sign(claims(nbf="soon"))) == "jwt_claim_invalid"


async def test_regression_iat_in_the_future_beyond_leeway(verifier: Verifier, rsa_keys: Keys) -> None:
    assert code_of(verifier, rsa_keys.sign(claims(iat=NOW + 31))) == "jwt_claim_invalid"
    assert code_of(verifier, rsa_keys.sign(claims(iat="yesterday"))) == "jwt_claim_invalid"


async def test_leeway_is_honoured(verifier: Verifier, rsa_keys: Keys) -> None:
    token = rsa_keys.sign(claims(exp=NOW - 29, nbf=NOW + 29, iat=NOW + 29))
    assert verifier.verify(token, now=NOW).subject == "alice"


async def test_zero_leeway_is_exact(
    jwks_path: Path, rsa_keys: Keys, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    verifier = await started(identity(issuer(jwks_path), leeway_seconds=0))
    assert code_of(verifier, rsa_keys.sign(claims(exp=NOW))) == "jwt_expired"
    assert code_of(verifier, rsa_keys.sign(claims(nbf=NOW + 1))) == "jwt_not_yet_valid"
    assert verifier.verify(rsa_keys.sign(claims(exp=NOW + 1, nbf=NOW)), now=NOW).subject == "alice"


async def test_clock_is_injected(jwks_path: Path, rsa_keys: Keys) -> None:
    verifier = Verifier(identity(issuer(jwks_path)), clock=lambda: NOW + 1000)
    await verifier.start()
    try:
        with pytest.raises(AuthError) as caught:
            verifier.verify(rsa_keys.sign(claims()))  # no `now`: the injected clock says it expired
        assert caught.value.code == "jwt_expired"
    finally:
        await verifier.close()


# ---- regressions: issuer and audience


async def test_regression_wrong_issuer_needs_an_exact_match(verifier: Verifier, rsa_keys: Keys) -> None:
    for near_miss in (ISSUER + "/", ISSUER.upper(), "http://idp.example.com", ISSUER + " "):
        assert code_of(verifier, rsa_keys.sign(claims(iss=near_miss))) == "jwt_issuer_unknown"


async def test_regression_unknown_or_missing_issuer(verifier: Verifier, rsa_keys: Keys) -> None:
    assert code_of(verifier, rsa_keys.sign(claims(iss="https://evil.example"))) == "jwt_issuer_unknown"
    assert code_of(verifier, rsa_keys.sign(claims(iss=None))) == "jwt_issuer_unknown"
    assert code_of(verifier, rsa_keys.sign(claims(iss=["https://idp.example.com"]))) == "jwt_issuer_unknown"


async def test_regression_wrong_audience(verifier: Verifier, rsa_keys: Keys) -> None:
    assert code_of(verifier, rsa_keys.sign(claims(aud="another-service"))) == "jwt_claim_invalid"
    assert code_of(verifier, rsa_keys.sign(claims(aud=["a", "b"]))) == "jwt_claim_invalid"
    assert code_of(verifier, rsa_keys.sign(claims(aud=None))) == "jwt_claim_invalid"
    assert code_of(verifier, rsa_keys.sign(claims(aud=[AUDIENCE, 3]))) == "jwt_claim_invalid"
    assert verifier.verify(rsa_keys.sign(claims(aud=["other", AUDIENCE])), now=NOW).subject == "alice"


async def test_regression_missing_subject(verifier: Verifier, rsa_keys: Keys) -> None:
    for bad in (None, "", 42):
        assert code_of(verifier, rsa_keys.sign(claims(sub=bad))) == "jwt_claim_invalid"


async def test_regression_second_issuers_key_cannot_sign_for_the_first(
    tmp_path: Path,
    started: Callable[[IdentitySettings], Awaitable[Verifier]],
    rsa_keys: Keys,
    other_keys: Keys,
) -> None:
    first = write_jwks(tmp_path / "first.json", rsa_keys.jwk)
    second = write_jwks(tmp_path / "second.json", other_keys.jwk)
    verifier = await started(
        identity(issuer(first), issuer(second, issuer=OTHER_ISSUER, audiences=[AUDIENCE]))
    )
    # The second issuer's own tokens verify...
    assert verifier.verify(other_keys.sign(claims(iss=OTHER_ISSUER)), now=NOW).issuer == OTHER_ISSUER
    # ...but its key claiming the first issuer is looked up in the first issuer's JWKS only.
    assert code_of(verifier, other_keys.sign(claims(iss=ISSUER))) == "jwt_key_unknown"
    # Even with a kid that the first issuer also has, the signature does not verify.
    assert code_of(verifier, other_keys.sign(claims(iss=ISSUER), kid=rsa_keys.kid)) == "jwt_signature_invalid"


# ---- regressions: keys


async def test_regression_unknown_kid_refreshes_once_in_the_background(
    jwks_server: JwksServer,
    started: Callable[..., Awaitable[Verifier]],
    rsa_keys: Keys,
    ec_keys: Keys,
) -> None:
    clock = [1000.0]
    url = jwks_server.serve("/jwks", rsa_keys.jwk)
    verifier = await started(
        identity(issuer(jwks_url=url), jwks_min_refresh_seconds=60, jwks_refresh_seconds=3600),
        monotonic=lambda: clock[0],
    )
    assert jwks_server.hits["/jwks"] == 1  # loaded at start
    jwks_server.serve("/jwks", rsa_keys.jwk, ec_keys.jwk)  # the provider rotates a key in
    token = ec_keys.sign(claims())
    assert code_of(verifier, token) == "jwt_key_unknown"  # fails now: no request waits on the network
    await eventually(lambda: verifies(verifier, token))  # the background refresh brings the key
    assert jwks_server.hits["/jwks"] == 2
    # A second unknown kid inside the rate-limit window: refused, and no second fetch.
    clock[0] += 59
    assert code_of(verifier, ec_keys.sign(claims(), kid="unknown-2")) == "jwt_key_unknown"
    await asyncio.sleep(0.2)  # a fetch that must not happen has no event to wait for: a bounded window
    assert jwks_server.hits["/jwks"] == 2
    # After the window, an unknown kid may ask again.
    clock[0] += 2
    assert code_of(verifier, ec_keys.sign(claims(), kid="unknown-3")) == "jwt_key_unknown"
    await eventually(lambda: jwks_server.hits["/jwks"] == 3)


async def test_regression_a_burst_of_unknown_kids_makes_one_fetch_even_without_rate_limit(
    jwks_server: JwksServer, started: Callable[[IdentitySettings], Awaitable[Verifier]], rsa_keys: Keys
) -> None:
    url = jwks_server.serve("/jwks", rsa_keys.jwk)
    verifier = await started(identity(issuer(jwks_url=url), jwks_min_refresh_seconds=0))
    for n in range(50):
        assert code_of(verifier, rsa_keys.sign(claims(), kid=f"made-up-{n}")) == "jwt_key_unknown"
    await eventually(lambda: jwks_server.hits["/jwks"] == 2)
    await asyncio.sleep(0.2)  # a window for a second fetch that must not come (no event says it will not)
    assert jwks_server.hits["/jwks"] == 2  # one refresh was pending: the other 49 asked for nothing


async def test_regression_key_headers_jku_x5u_jwk_x5c_are_ignored(
    jwks_server: JwksServer, verifier: Verifier, rsa_keys: Keys, attacker_keys: Keys
) -> None:
    """A token that brings its own key (jku, x5u, x5c, jwk) is checked with the issuer's keys only."""
    attacker_url = jwks_server.serve("/attacker-jwks", attacker_keys.jwk)
    bring_your_own_key = {
        "jku": attacker_url,
        "x5u": attacker_url,
        "jwk": attacker_keys.jwk,
        "x5c": [b64url_encode(attacker_keys.public_pem())],
    }
    # attacker kid + the attacker's JWKS URL: unknown kid, and the URL is never fetched
    token = attacker_keys.sign(claims(), **bring_your_own_key)
    assert code_of(verifier, token) == "jwt_key_unknown"
    # the real kid, signed by the attacker: the issuer's key does not verify it
    token = attacker_keys.sign(claims(), kid=rsa_keys.kid, **bring_your_own_key)
    assert code_of(verifier, token) == "jwt_signature_invalid"
    # no kid: the issuer's only RS256 key is used, not the embedded one
    token = attacker_keys.sign(claims(), kid=None, jwk=attacker_keys.jwk)
    assert code_of(verifier, token) == "jwt_signature_invalid"
    # a genuine token carrying the headers still verifies with the issuer's key
    assert verifier.verify(rsa_keys.sign(claims(), jku=attacker_url), now=NOW).subject == "alice"
    await asyncio.sleep(0.2)  # a window for a fetch of the attacker's URL, which must never come
    assert jwks_server.hits.get("/attacker-jwks", 0) == 0


async def test_kidless_token_uses_the_only_matching_key(
    tmp_path: Path, started: Callable[[IdentitySettings], Awaitable[Verifier]], rsa_keys: Keys, ec_keys: Keys
) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa_keys.jwk, ec_keys.jwk)
    verifier = await started(identity(issuer(path)))
    assert verifier.verify(rsa_keys.sign(claims(), kid=None), now=NOW).subject == "alice"
    second_rsa = make_keys("RS256", "rsa-2")
    write_jwks(path, rsa_keys.jwk, second_rsa.jwk)
    verifier = await started(identity(issuer(path)))
    assert code_of(verifier, rsa_keys.sign(claims(), kid=None)) == "jwt_key_unknown"  # ambiguous


def test_jwks_hygiene_keys_that_must_not_verify_are_skipped(rsa_keys: Keys) -> None:
    allowed = frozenset({"RS256", "PS256", "ES256"})
    assert parse_jwk({**rsa_keys.jwk, "use": "enc"}, allowed) is None
    assert parse_jwk({**rsa_keys.jwk, "key_ops": ["encrypt"]}, allowed) is None
    private = rsa_keys.private
    assert isinstance(private, rsa.RSAPrivateKey)
    with_private = {**rsa_keys.jwk, "d": b64url_encode(private.private_numbers().d.to_bytes(256, "big"))}
    for entry, reason in [
        (with_private, "private key material"),
        ({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, "cannot verify"),
        ({**rsa_keys.jwk, "e": None}, "needs n and e"),
        ({**rsa_keys.jwk, "alg": "ES256"}, "does not fit a RSA key"),
        ({**rsa_keys.jwk, "alg": "HS256"}, "does not fit a RSA key"),
        ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "unsupported EC curve"),
        ({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}, "invalid EC key"),
    ]:
        with pytest.raises(JwksError, match=reason):
            parse_jwk(entry, allowed)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused below
    with pytest.raises(JwksError, match="1024 bits"):
        parse_jwk(public_jwk(small, "RS256", "small"), allowed)


# ---- regressions: malformed and oversized


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "eyJhbGciOiJSUzI1NiJ9.e30",
        "a.b.c.d",
        "a.b.c.d.e",
        "..",
        "eyJhbGciOiJSUzI1NiJ9.e30.",
        "!!!.e30.AAAA",
        "eyJhbGciOiJSUzI1NiJ9=.e30.AAAA",
        "eyJhbGciOiJSUzI1NiJ9.e30=.AAAA",
        "eyJhbGciOiJSUzI1NiJ9.e30.AA+A",
        "W10.e30.AAAA",  # header is a JSON array
        "bnVsbA.e30.AAAA",  # header is null
        "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.AAAA",  # payload is not JSON
        "eyJhbGciOiJSUzI1NiJ9.W10.AAAA",  # payload is an array
        "é.e30.AAAA",
    ],
)
async def test_regression_malformed_tokens(verifier: Verifier, token: str) -> None:
    assert code_of(verifier, token) in {"jwt_malformed"}


async def test_regression_lenient_base64_is_refused(verifier: Verifier, rsa_keys: Keys) -> None:
    """python-jose's decoder skips characters outside the alphabet; ours refuses them."""
    header, body, signature = rsa_keys.sign(claims()).split(".")
    for variant in (
        f"{header}.{body}!.{signature}",
        f"{header}.{body}.{signature}==",
        f"{header}.{body}.{signature[:-1]}$",
    ):
        assert code_of(verifier, variant) == "jwt_malformed"
    # Non-canonical base64: a 256-byte RS256 signature is 342 characters, the last one carrying 4 unused
    # bits. Setting one of them decodes to the same bytes, so two strings would be one token: refused.
    assert len(signature) % 4 == 2
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(signature[-1]) ^ 1]
    assert code_of(verifier, f"{header}.{body}.{signature[:-1]}{twin}") == "jwt_malformed"


async def test_regression_duplicate_members_and_crit_are_refused(verifier: Verifier, rsa_keys: Keys) -> None:
    dup_header = b64url_encode(b'{"alg":"RS256","alg":"none","kid":"rsa-1"}')
    assert code_of(verifier, f"{dup_header}.e30.AAAA") == "jwt_malformed"
    header, _, signature = rsa_keys.sign(claims()).split(".")
    dup_body = b64url_encode(b'{"iss":"https://idp.example.com","sub":"alice","sub":"admin"}')
    assert code_of(verifier, f"{header}.{dup_body}.{signature}") == "jwt_malformed"
    nan_body = b64url_encode(b'{"iss":"https://idp.example.com","exp":NaN}')
    assert code_of(verifier, f"{header}.{nan_body}.{signature}") == "jwt_malformed"
    assert code_of(verifier, rsa_keys.sign(claims(), crit=["exp"])) == "jwt_malformed"
    assert (
        code_of(verifier, mint_token(claims(), rsa_keys.pem, "RS256", None, headers={"kid": 7}))
        == "jwt_malformed"
    )


async def test_regression_oversized_token_is_refused_before_parsing(
    jwks_path: Path, rsa_keys: Keys, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    verifier = await started(identity(issuer(jwks_path), max_token_bytes=1024))
    assert code_of(verifier, "x" * 1025) == "jwt_too_large"  # garbage, but refused for its size first
    assert code_of(verifier, rsa_keys.sign(claims(padding="p" * 1000))) == "jwt_too_large"
    assert verifier.verify(rsa_keys.sign(claims()), now=NOW).subject == "alice"


# ---- groups and claims


async def test_groups_from_a_nested_claim_path(
    jwks_path: Path, rsa_keys: Keys, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    verifier = await started(
        identity(issuer(jwks_path, groups_claim="realm_access.roles", claims=["email", "org.name"]))
    )
    token = rsa_keys.sign(
        claims(realm_access={"roles": ["admin", "analysts"]}, org={"name": "acme", "id": 7}, groups=None)
    )
    principal = verifier.verify(token, now=NOW)
    assert principal.groups == {"admin", "analysts"}
    assert dict(principal.claims) == {"email": "alice@example.com", "org.name": "acme"}
    # a single string is one group; a missing claim no groups; another shape is refused
    assert verifier.verify(rsa_keys.sign(claims(realm_access={"roles": "admin"})), now=NOW).groups == {
        "admin"
    }
    assert verifier.verify(rsa_keys.sign(claims(realm_access={})), now=NOW).groups == frozenset()
    assert code_of(verifier, rsa_keys.sign(claims(realm_access={"roles": {"a": 1}}))) == "jwt_claim_invalid"
    assert code_of(verifier, rsa_keys.sign(claims(realm_access={"roles": ["a", 1]}))) == "jwt_claim_invalid"


async def test_claim_names_with_dots_and_immutable_claims(
    jwks_path: Path, rsa_keys: Keys, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    verifier = await started(
        identity(issuer(jwks_path, groups_claim="https://example.com/groups", claims=["profile"]))
    )
    token = rsa_keys.sign(claims(**{"https://example.com/groups": ["ops"], "profile": {"tags": ["x"]}}))
    principal = verifier.verify(token, now=NOW)
    assert principal.groups == {"ops"}
    profile = principal.claims["profile"]
    with pytest.raises(TypeError):
        profile["tags"] = []  # type: ignore[index]
    assert profile["tags"] == ("x",)  # type: ignore[index]
    assert hash(principal) == hash(verifier.verify(token, now=NOW))


# ---- secrets stay out of messages and logs


async def test_regression_the_token_never_appears_in_errors_or_logs(
    verifier: Verifier, rsa_keys: Keys, attacker_keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    bad_tokens = [
        rsa_keys.sign(claims(exp=NOW - 100)),
        rsa_keys.sign(claims(aud="elsewhere-service-name")),
        rsa_keys.sign(claims(iss="https://evil.example/very-identifiable-issuer")),
        rsa_keys.sign(claims(), kid="a-very-identifiable-kid-value"),
        attacker_keys.sign(claims(), kid=rsa_keys.kid),
        unsigned({"alg": "none", "kid": "kid-in-an-unsigned-token"}, claims()),
        hs256_with(rsa_keys.public_pem(), claims(), rsa_keys.kid),
        rsa_keys.sign(claims()).replace(".", "!.", 1),
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZWNyZXQtc3ViamVjdC12YWx1ZSJ9.\xff\xfe",
        "Z" * 9000,
    ]
    with caplog.at_level(logging.DEBUG):
        failures = []
        for token in bad_tokens:
            with pytest.raises(AuthError) as caught:
                verifier.verify(token, now=NOW)
            failures.append((token, caught.value))
        await asyncio.sleep(0.2)  # let a refresh asked for by an unknown kid log what it logs
    assert caplog.records, "the unknown kid should have logged its refresh request"
    logged = "\n".join(
        f"{record.getMessage()} {record.__dict__!r} {record.exc_text or ''}" for record in caplog.records
    )
    # values inside the tokens above, decoded: none may be echoed either
    inside = ["very-identifiable", "kid-in-an-unsigned-token", "secret-subject-value", "elsewhere-service"]
    for token, error in failures:
        shown = " ".join([str(error), error.message, repr(error), "".join(traceback.format_exception(error))])
        pieces = [token, *(piece for piece in token.split(".") if len(piece) >= 8), *inside]
        for piece in pieces:
            assert piece not in shown, f"{error.code} message shows part of the token"
            assert piece not in logged, "a log record shows part of the token"


# ---- JWKS sources and refresh


async def test_jwks_file_rotation_is_picked_up_by_the_background_refresh(
    tmp_path: Path, started: Callable[[IdentitySettings], Awaitable[Verifier]], rsa_keys: Keys
) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa_keys.jwk)
    verifier = await started(identity(issuer(path), jwks_refresh_seconds=0.1))
    old_token = rsa_keys.sign(claims())
    first = verifier.verify(old_token, now=NOW)
    assert verifier.verify(old_token, now=NOW) is first  # cached
    new_keys = make_keys("RS256", "rsa-rotated")
    new_token = new_keys.sign(claims())
    write_jwks(path, new_keys.jwk)  # the old key is rotated out
    bump_mtime(path)
    await eventually(lambda: verifies(verifier, new_token))
    # the cache was dropped with the old key: its token no longer verifies
    assert code_of(verifier, old_token) == "jwt_key_unknown"
    assert verifier.status()[0].kids == ("rsa-rotated",)


async def test_jwks_file_unchanged_is_not_re_read_and_a_broken_rewrite_keeps_the_keys(
    tmp_path: Path,
    started: Callable[[IdentitySettings], Awaitable[Verifier]],
    rsa_keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = write_jwks(tmp_path / "jwks.json", rsa_keys.jwk)
    with caplog.at_level(logging.INFO, logger="extproc.identity"):
        verifier = await started(identity(issuer(path), jwks_refresh_seconds=0.05))
        await eventually(lambda: verifier.status()[0].fetches >= 4)
    assert [record.message for record in caplog.records].count("jwks_loaded") == 1  # read once
    path.write_text("{not json", encoding="utf-8")
    bump_mtime(path)
    await eventually(lambda: verifier.status()[0].last_error is not None)
    assert "not valid JSON" in (verifier.status()[0].last_error or "")
    assert verifier.verify(rsa_keys.sign(claims()), now=NOW).subject == "alice"  # old keys kept
    assert verifier.keys_loaded


async def test_jwks_url_fetch_and_refresh(
    jwks_server: JwksServer,
    started: Callable[[IdentitySettings], Awaitable[Verifier]],
    rsa_keys: Keys,
    ec_keys: Keys,
) -> None:
    url = jwks_server.serve("/.well-known/jwks.json", rsa_keys.jwk)
    verifier = await started(identity(issuer(jwks_url=url), jwks_refresh_seconds=0.1))
    assert verifier.verify(rsa_keys.sign(claims()), now=NOW).subject == "alice"
    jwks_server.serve("/.well-known/jwks.json", ec_keys.jwk)
    await eventually(lambda: verifies(verifier, ec_keys.sign(claims())))
    assert code_of(verifier, rsa_keys.sign(claims())) == "jwt_key_unknown"
    # an identity provider that fails keeps the keys already loaded
    jwks_server.status = 503
    await eventually(lambda: "HTTP 503" in (verifier.status()[0].last_error or ""))
    assert verifier.verify(ec_keys.sign(claims()), now=NOW).subject == "alice"


async def test_jwks_url_timeout_is_respected(
    started: Callable[[IdentitySettings], Awaitable[Verifier]],
) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/jwks", hang)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        began = time.monotonic()
        with pytest.raises(ConfigError, match=r"no answer within 0\.3"):
            await started(identity(issuer(jwks_url=f"http://{host}:{port}/jwks"), jwks_timeout_seconds=0.3))
        assert time.monotonic() - began < 3
    finally:
        release.set()
        await runner.cleanup()


async def test_a_jwks_that_cannot_load_at_start_is_a_startup_error(
    tmp_path: Path, jwks_server: JwksServer, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=rf"issuer {ISSUER}: jwks_file {missing}: cannot read"):
        await started(identity(issuer(missing)))
    url = jwks_server.serve("/empty")  # a JWKS with no key
    with pytest.raises(ConfigError, match=rf"issuer {OTHER_ISSUER}: jwks_url {url}: no key"):
        await started(identity(issuer(jwks_url=url, issuer=OTHER_ISSUER)))
    jwks_server.status = 500
    with pytest.raises(ConfigError, match="HTTP 500"):
        await started(identity(issuer(jwks_url=jwks_server.url + "/jwks")))


async def test_redirects_are_not_followed(
    jwks_server: JwksServer, started: Callable[[IdentitySettings], Awaitable[Verifier]], rsa_keys: Keys
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(jwks_server.url + "/real")

    app = web.Application()
    app.router.add_get("/moved", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    jwks_server.serve("/real", rsa_keys.jwk)
    try:
        with pytest.raises(ConfigError, match="HTTP 302"):
            await started(identity(issuer(jwks_url=f"http://{host}:{port}/moved")))
        assert jwks_server.hits.get("/real", 0) == 0
    finally:
        await runner.cleanup()


async def test_close_stops_every_task(jwks_path: Path) -> None:
    verifier = Verifier(identity(issuer(jwks_path), jwks_refresh_seconds=0.01))
    await verifier.start()
    await asyncio.sleep(0.05)  # a few refreshes (every 10 ms) under way: what close must stop
    await verifier.close()
    await verifier.close()
    pending = [task for task in asyncio.all_tasks() if "refresh" in repr(task.get_coro())]
    assert pending == []


# ---- cache


async def test_cache_hit_returns_the_same_principal_and_expiry_still_applies(
    verifier: Verifier, rsa_keys: Keys
) -> None:
    token = rsa_keys.sign(claims(exp=NOW + 60))
    first = verifier.verify(token, now=NOW)
    assert verifier.verify(token, now=NOW + 30) is first
    assert code_of(verifier, token, now=NOW + 60 + 30) == "jwt_expired"  # exp + leeway reached
    again = verifier.verify(token, now=NOW)  # the expired entry was dropped: verified afresh
    assert again == first
    assert again is not first


async def test_expired_cached_token_is_rejected(verifier: Verifier, rsa_keys: Keys) -> None:
    token = rsa_keys.sign(claims(exp=NOW + 10))
    verifier.verify(token, now=NOW)
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, now=NOW + 10 + 31)
    assert caught.value.code == "jwt_expired"


async def test_cache_can_be_disabled(
    jwks_path: Path, rsa_keys: Keys, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    verifier = await started(identity(issuer(jwks_path), cache_entries=0))
    token = rsa_keys.sign(claims())
    first = verifier.verify(token, now=NOW)
    second = verifier.verify(token, now=NOW)
    assert first == second
    assert first is not second


async def test_cache_is_bounded(
    jwks_path: Path, rsa_keys: Keys, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    verifier = await started(identity(issuer(jwks_path), cache_entries=2))
    tokens = [rsa_keys.sign(claims(sub=f"user-{n}")) for n in range(3)]
    principals = [verifier.verify(token, now=NOW) for token in tokens]
    assert verifier.verify(tokens[2], now=NOW) is principals[2]
    assert verifier.verify(tokens[0], now=NOW) is not principals[0]  # the oldest was evicted


# ---- bearer tokens


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer  abc.def.ghi ") == "abc.def.ghi"
    assert bearer_token("BEARER abc") == "abc"
    for missing in (None, "", "   ", "Basic dXNlcjpwYXNz", "Token abc"):
        with pytest.raises(AuthError) as caught:
            bearer_token(missing)
        assert caught.value.code == "jwt_missing"
    for malformed in ("Bearer", "Bearer ", "Bearer a b", "Bearer a,Bearer b c"):
        with pytest.raises(AuthError) as caught:
            bearer_token(malformed)
        assert caught.value.code == "jwt_malformed"
        assert "a b" not in caught.value.message


# ---- mode envoy


def envoy_metadata(payload: dict[str, Any] | None, key: str = "jwt_payload") -> dict[str, object]:
    """Metadata as envoy.py decodes it: namespace -> fields, Struct numbers as floats."""
    if payload is None:
        return {"llm.extproc": {"decision_id": "x"}}
    return {"envoy.filters.http.jwt_authn": {key: payload}}


def test_principal_from_envoy_metadata() -> None:
    settings = IdentitySettings.model_validate(
        {
            "mode": "envoy",
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "groups_claim": "realm_access.roles",
                    "claims": ["email"],
                }
            ],
        }
    )
    payload = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "exp": 1501281058.0,
        "realm_access": {"roles": ["analysts"]},
        "email": "alice@example.com",
    }
    principal = principal_from_metadata(envoy_metadata(payload), settings)
    assert principal == Principal(
        "alice", ISSUER, frozenset({"analysts"}), {"email": "alice@example.com"}, 1501281058.0
    )
    with pytest.raises(AuthError) as caught:
        principal_from_metadata(envoy_metadata(None), settings)
    assert caught.value.code == "jwt_missing"
    with pytest.raises(AuthError) as caught:
        principal_from_metadata(envoy_metadata(payload, key="other"), settings)
    assert caught.value.code == "jwt_missing"
    with pytest.raises(AuthError) as caught:
        principal_from_metadata(envoy_metadata({**payload, "iss": "https://evil.example"}), settings)
    assert caught.value.code == "jwt_issuer_unknown"
    with pytest.raises(AuthError) as caught:
        principal_from_metadata(envoy_metadata({**payload, "sub": ""}), settings)
    assert caught.value.code == "jwt_claim_invalid"


def test_envoy_mode_without_issuers_reads_groups() -> None:
    settings = IdentitySettings(mode="envoy", envoy_payload_key="verified")
    payload = {"iss": "https://any", "sub": "bob", "groups": "ops"}
    principal = principal_from_metadata(envoy_metadata(payload, key="verified"), settings)
    assert (principal.subject, principal.groups, principal.expires_at) == ("bob", {"ops"}, None)


# ---- minting and dev keys


async def test_generate_dev_keypair_and_mint_token(
    tmp_path: Path, started: Callable[[IdentitySettings], Awaitable[Verifier]]
) -> None:
    for algorithm, check in (("RS256", rsa.RSAPrivateKey), ("ES256", ec.EllipticCurvePrivateKey)):
        pem, jwks = generate_dev_keypair(algorithm)
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        assert isinstance(key, check)
        if isinstance(key, rsa.RSAPrivateKey):
            assert key.key_size == 2048
        if isinstance(key, ec.EllipticCurvePrivateKey):
            assert key.curve.name == "secp256r1"
        [public] = jwks["keys"]
        assert "d" not in public
        assert public["alg"] == algorithm
        path = write_jwks(tmp_path / f"{algorithm}.json", public)
        verifier = await started(identity(issuer(path, algorithms=[algorithm])))
        token = mint_token(claims(), pem, algorithm, public["kid"])
        assert verifier.verify(token, now=NOW).subject == "alice"
    with pytest.raises(ValueError, match="alg header"):
        mint_token(claims(), pem, "ES256", "k", headers={"alg": "none"})
    with pytest.raises(ValueError, match="cannot sign"):
        mint_token(claims(), pem, "HS256", "k")


def test_mint_token_from_a_private_jwk(rsa_keys: Keys) -> None:
    private = rsa_keys.private
    assert isinstance(private, rsa.RSAPrivateKey)
    numbers = private.private_numbers()

    def b64(value: int) -> str:
        return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    private_jwk = {
        **rsa_keys.jwk,
        "d": b64(numbers.d),
        "p": b64(numbers.p),
        "q": b64(numbers.q),
        "dp": b64(numbers.dmp1),
        "dq": b64(numbers.dmq1),
        "qi": b64(numbers.iqmp),
    }
    token = mint_token(claims(), private_jwk, "RS256", rsa_keys.kid)
    key = parse_jwk(rsa_keys.jwk, frozenset({"RS256"}))
    assert key is not None
    signing_input, _, signature = token.rpartition(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert key.verify("RS256", signing_input.encode(), raw)


# ---- settings


def test_identity_settings_defaults() -> None:
    settings = load_settings()
    assert settings.identity.mode is None  # no default: a server refuses until the settings choose
    assert settings.identity.leeway_seconds == 30
    assert settings.identity.max_token_bytes == 8192
    assert settings.identity.cache_entries == 10000
    assert settings.identity.envoy_metadata_namespace == "envoy.filters.http.jwt_authn"


@pytest.mark.parametrize(
    ("identity_section", "message"),
    [
        ({"mode": "jwt"}, "identity: .*mode jwt needs at least one entry in issuers"),
        ({"mode": "jwt", "issuers": [{"issuer": ISSUER, "audiences": ["a"]}]}, "set jwks_file or jwks_url"),
        (
            {
                "issuers": [
                    {"issuer": ISSUER, "audiences": ["a"], "jwks_file": "/x", "jwks_url": "https://x/j"}
                ]
            },
            r"identity\.issuers\.0: .*not both",
        ),
        (
            {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks_file": "/x", "algorithms": ["HS256"]}]},
            r"identity\.issuers\.0\.algorithms: .*shared-secret",
        ),
        (
            {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks_file": "/x", "algorithms": ["none"]}]},
            r"identity\.issuers\.0\.algorithms: .*unsigned",
        ),
        (
            {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks_file": "/x", "algorithms": ["RS1"]}]},
            r"identity\.issuers\.0\.algorithms: .*unknown algorithm",
        ),
        (
            {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks_file": "/x", "algorithms": []}]},
            r"identity\.issuers\.0\.algorithms",
        ),
        (
            {"issuers": [{"issuer": ISSUER, "audiences": [], "jwks_file": "/x"}]},
            r"identity\.issuers\.0\.audiences",
        ),
        (
            {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks_url": "http://idp.example.com/jwks"}]},
            r"identity\.issuers\.0\.jwks_url: .*https",
        ),
        (
            {
                "issuers": [
                    {"issuer": ISSUER, "audiences": ["a"], "jwks_file": "/x"},
                    {"issuer": ISSUER, "audiences": ["b"], "jwks_file": "/y"},
                ]
            },
            "listed twice",
        ),
        ({"leeway_seconds": -1}, r"identity\.leeway_seconds"),
        ({"mode": "jwks"}, r"identity\.mode"),
        (
            {"issuers": [{"issuer": ISSUER, "audiences": ["a"], "jwks_file": "/x", "jku": "y"}]},
            r"issuers\.0\.jku",
        ),
    ],
)
def test_identity_settings_are_validated(
    tmp_path: Path, identity_section: dict[str, Any], message: str
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(json.dumps({"identity": identity_section}), encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_identity_settings_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(
        "identity:\n"
        "  mode: jwt\n"
        "  issuers:\n"
        "    - issuer: https://idp.example.com\n"
        "      audiences: [llm-gateway]\n"
        "      jwks_url: http://127.0.0.1:8081/jwks\n"
        "      algorithms: [RS256, ES256]\n"
        "      groups_claim: realm_access.roles\n"
        "      claims: [email]\n",
        encoding="utf-8",
    )
    settings = load_settings(path).identity
    assert settings.issuers[0].groups_claim == "realm_access.roles"
    assert settings.issuers[0].algorithms == ["RS256", "ES256"]


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTPROC_CONFIG", raising=False)
