"""Caller identity: verify bearer JWTs (mode jwt) or read Envoy's verified payload (mode envoy).

``Verifier.verify`` and ``principal_from_metadata`` are the request path: synchronous, no I/O. Keys are
loaded and refreshed in the background by ``Verifier.start``.
"""

from extproc.errors import AuthError
from extproc.identity.jwks import IssuerStatus
from extproc.identity.jwt import Verifier, bearer_token
from extproc.identity.metadata import principal_from_metadata
from extproc.identity.principal import Principal
from extproc.identity.tokens import generate_dev_keypair, mint_token

__all__ = [
    "AuthError",
    "IssuerStatus",
    "Principal",
    "Verifier",
    "bearer_token",
    "generate_dev_keypair",
    "mint_token",
    "principal_from_metadata",
]
