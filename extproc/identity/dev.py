"""The development identity: one local key pair, an issuer that cannot exist, and tokens for it.

``extproc dev`` verifies callers against this key, and ``extproc token`` mints tokens with it, so the
whole identity path (JWKS, signature, groups, policies) runs on a laptop. The issuer is under the
``.invalid`` top-level domain (RFC 2606), which no real identity provider can have: a dev token is
refused by every deployment that trusts a real issuer. ``extproc token`` signs with this key only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from extproc.identity.tokens import generate_dev_keypair, mint_token

DEV_ISSUER = "https://dev.extproc.invalid"
DEV_AUDIENCE = "extproc-dev"
DEV_ALGORITHM = "RS256"
KEY_NAME = "dev-key.pem"
JWKS_NAME = "dev-jwks.json"


def default_dir() -> Path:
    """The user's cache folder for extproc: ``$XDG_CACHE_HOME/extproc``, or ``~/.cache/extproc``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "extproc"


def ensure_dev_key(folder: Path) -> Path:
    """The dev JWKS file in ``folder``, made with its private key (readable by the owner only) on
    first use. Returns the JWKS path."""
    folder.mkdir(parents=True, exist_ok=True)
    key, jwks = folder / KEY_NAME, folder / JWKS_NAME
    if not (key.exists() and jwks.exists()):
        pem, public = generate_dev_keypair(DEV_ALGORITHM)
        descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as out:
            out.write(pem)
        jwks.write_text(json.dumps(public, indent=2), encoding="utf-8")
    return jwks


def dev_identity(folder: Path) -> dict[str, Any]:
    """The ``identity`` settings section that trusts the dev key only."""
    issuer = {
        "issuer": DEV_ISSUER,
        "audiences": [DEV_AUDIENCE],
        "jwks_file": str(ensure_dev_key(folder)),
        "algorithms": [DEV_ALGORITHM],
        "groups_claim": "groups",
        "claims": ["email"],
    }
    return {"mode": "jwt", "issuers": [issuer]}


def mint_dev_token(folder: Path, subject: str, groups: list[str], ttl_seconds: int) -> str:
    """A token of the dev issuer for ``subject`` in ``groups``, valid ``ttl_seconds`` from now."""
    ensure_dev_key(folder)
    pem = (folder / KEY_NAME).read_text(encoding="ascii")
    kid = json.loads((folder / JWKS_NAME).read_text(encoding="utf-8"))["keys"][0]["kid"]
    now = int(time.time())
    claims = {
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": subject,
        "groups": groups,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
    }
    return mint_token(claims, pem, DEV_ALGORITHM, kid)
