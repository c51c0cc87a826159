"""Make signed tokens and key pairs: for ``extproc token``, the dev stack and the tests.

Nothing here runs on the request path. A private key never leaves the caller: ``generate_dev_keypair``
returns it as PEM, and ``mint_token`` takes it as PEM or as a private JWK.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extproc.identity.encoding import b64url_encode
from extproc.identity.keys import PrivateKey, load_private_key, public_jwk, sign
from extproc.settings import JWT_ALGORITHMS

_EC_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
}


def mint_token(
    claims: Mapping[str, Any],
    private_jwk_or_pem: Mapping[str, object] | str | bytes,
    algorithm: str,
    kid: str | None,
    *,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """A compact JWS of ``claims`` signed with the private key (PEM, or a JWK with its private part).

    ``headers`` adds header members (``typ``, or for tests ``jku``...); it cannot change ``alg``, which
    always names the algorithm that really signed."""
    if algorithm not in JWT_ALGORITHMS:
        raise ValueError(f"cannot sign {algorithm!r}; expected one of {sorted(JWT_ALGORITHMS)}")
    header: dict[str, Any] = {"alg": algorithm, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    for name, value in (headers or {}).items():
        if name == "alg":
            raise ValueError("the alg header is set from `algorithm`")
        header[name] = value
    key = load_private_key(private_jwk_or_pem, algorithm)
    signing_input = ".".join(
        b64url_encode(json.dumps(part, separators=(",", ":")).encode("utf-8")) for part in (header, claims)
    )
    signature = sign(key, algorithm, signing_input.encode("ascii"))
    return f"{signing_input}.{b64url_encode(signature)}"


def generate_key(algorithm: str) -> PrivateKey:
    """A fresh private key for ``algorithm``: RSA 2048, or the curve the algorithm fixes."""
    if algorithm.startswith(("RS", "PS")) and algorithm in JWT_ALGORITHMS:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm in _EC_CURVES:
        return ec.generate_private_key(_EC_CURVES[algorithm])
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"cannot make a key for {algorithm!r}; expected one of {sorted(JWT_ALGORITHMS)}")


def generate_dev_keypair(
    algorithm: str = "RS256", kid: str | None = None
) -> tuple[str, dict[str, list[dict[str, str]]]]:
    """A new key pair: the private key as PKCS#8 PEM, the public key as a one-key JWKS.

    The kid defaults to the key's RFC 7638 thumbprint. The JWK names its ``alg``, so the verifier uses it
    for that algorithm only."""
    key = generate_key(algorithm)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    return pem, {"keys": [public_jwk(key, algorithm, kid)]}
