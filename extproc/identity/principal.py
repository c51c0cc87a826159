"""The verified caller, and how a verified claims set becomes one (shared by modes jwt and envoy)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from extproc.errors import AuthError
from extproc.identity.encoding import is_number
from extproc.settings import IssuerSettings

_EMPTY: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as a verified token says: policies select on ``groups`` and may read ``claims``.

    Deeply immutable (claims are read-only mappings and tuples), because one Principal is shared by every
    request that presents the same cached token."""

    subject: str
    issuer: str
    groups: frozenset[str]
    claims: Mapping[str, object] = field(hash=False)
    expires_at: float | None


def claim_at(claims: Mapping[str, object], path: str) -> object | None:
    """The value at a dotted ``path`` (``realm_access.roles``), or None when any step is missing.

    A claim whose own name contains dots (``https://example.com/groups``, common with Auth0) is found
    too: the whole path is tried as one name first."""
    if path in claims:
        return claims[path]
    node: object = claims
    for step in path.split("."):
        if not isinstance(node, Mapping) or step not in node:
            return None
        node = node[step]
    return node


def groups_from(claims: Mapping[str, object], path: str) -> frozenset[str]:
    """Groups from a claim holding one string or a list of strings; absent means no groups.

    Any other shape is refused rather than read as "no groups": a policy that grants by group must not
    quietly see a different caller than the issuer described."""
    value = claim_at(claims, path)
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise AuthError(
        "the token's groups claim is neither a string nor a list of strings", code="jwt_claim_invalid"
    )


def freeze(value: object) -> object:
    """A read-only copy of a JSON value: dicts become mapping proxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(key): freeze(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    return value


def principal_from_claims(
    claims: Mapping[str, object], issuer: IssuerSettings | None, *, require_exp: bool
) -> Principal:
    """Build the Principal from claims whose signature and times were already checked.

    ``issuer`` gives the groups claim path and the claims to copy; None (mode envoy with no issuers
    listed) reads ``groups`` and copies nothing else."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthError("the token has no subject (sub)", code="jwt_claim_invalid")
    iss = claims.get("iss")
    if not isinstance(iss, str) or not iss:
        raise AuthError("the token has no issuer (iss)", code="jwt_claim_invalid")
    exp = claims.get("exp")
    expires_at: float | None = None
    if exp is not None:
        if not is_number(exp):
            raise AuthError("the token's exp is not a number", code="jwt_claim_invalid")
        expires_at = float(exp)
    elif require_exp:
        raise AuthError("the token has no expiry (exp)", code="jwt_claim_invalid")
    groups = groups_from(claims, issuer.groups_claim if issuer else "groups")
    copied: dict[str, object] = {}
    for path in issuer.claims if issuer else ():
        value = claim_at(claims, path)
        if value is not None:
            copied[path] = freeze(value)
    return Principal(
        subject=subject,
        issuer=iss,
        groups=groups,
        claims=MappingProxyType(copied) if copied else _EMPTY,
        expires_at=expires_at,
    )
