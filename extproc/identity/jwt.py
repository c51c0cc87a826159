"""Verify a caller's bearer JWT against the keys of the issuer it names, and make it a Principal.

``Verifier.verify`` is the request path: synchronous, no I/O, only keys already in memory. Keys are
loaded by ``Verifier.start`` and kept fresh by background tasks; a token whose ``kid`` is unknown fails
at once and asks (at most once per ``jwks_min_refresh_seconds`` per issuer) for a background refresh, so
a key the identity provider just rotated in is picked up without making any request wait on the network.

The checks run in an order where nothing the token says is trusted before it is checked:

1. size, before any parsing (``max_token_bytes``);
2. the header, parsed strictly: its ``alg`` must be one some issuer allows (``none`` never is), ``crit``
   is refused, and ``jku``, ``x5u``, ``x5c`` and ``jwk`` are never read: keys come only from the JWKS
   configured for the issuer, never from the token;
3. the unverified ``iss`` only picks which issuer's settings and keys to use; the ``alg`` must be in that
   issuer's own allow-list;
4. the key, by ``kid`` from that issuer's JWKS only (a token without ``kid`` may use the issuer's only key
   for its algorithm); a key is used only for the algorithms its own ``kty``, ``crv`` and ``alg`` allow,
   so an RSA public key can never serve as an HMAC secret (the alg-confusion attack);
5. the signature; then, with ``leeway_seconds``: ``exp`` (required), ``nbf``, ``iat`` not in the future;
   then ``iss`` again, exactly; then ``aud`` against the issuer's audiences.

A token that passed all of this is remembered by its SHA-256 (``cache_entries``) until it expires, and
answered after step 1 without parsing or signature checks; its ``exp`` and ``nbf`` still apply, and the
cache is dropped whenever any issuer's keys change.

python-jose's ``jwt.decode`` is not used on purpose: it reads the wall clock (the house style injects
it), tries every key of a JWKS whatever the ``kid``, does not check that ``iat`` is not in the future,
and decodes base64 leniently. Its cryptography backend does the RS*/ES* signature maths (see keys.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from extproc.errors import AuthError, ConfigError
from extproc.identity.encoding import EncodingError, b64url_decode, is_number, json_object
from extproc.identity.jwks import IssuerKeys, IssuerStatus, source_for
from extproc.identity.keys import JwksError
from extproc.identity.principal import Principal, principal_from_claims
from extproc.settings import IdentitySettings, IssuerSettings

log = logging.getLogger(__name__)

_BEARER = "bearer"


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value (RFC 6750; the scheme in any case).

    No header, an empty one or another scheme (``Basic``...) is ``jwt_missing``: the caller sent no bearer
    token. ``Bearer`` with nothing after it, or more than one token, is ``jwt_malformed``."""
    if authorization is None or not authorization.strip():
        raise AuthError("no bearer token: send Authorization: Bearer <JWT>", code="jwt_missing")
    parts = authorization.split()
    if parts[0].lower() != _BEARER:
        raise AuthError("no bearer token: the Authorization header uses another scheme", code="jwt_missing")
    if len(parts) != 2:
        raise AuthError("the Authorization header must be exactly: Bearer <JWT>", code="jwt_malformed")
    return parts[1]


@dataclass(frozen=True, slots=True)
class _Token:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _malformed(what: str) -> AuthError:
    return AuthError(f"the token is malformed: {what}", code="jwt_malformed")


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    not_before: float | None


class _TokenCache:
    """Verified tokens by SHA-256 (the token itself is never kept), least recently used out first.

    An entry lives until its token expires; the whole cache is dropped whenever an issuer's keys change,
    so a key removed from a JWKS stops vouching for tokens at the next refresh."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, _Cached] = OrderedDict()

    def get(self, digest: bytes) -> _Cached | None:
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def put(self, digest: bytes, entry: _Cached) -> None:
        if self.capacity <= 0:
            return
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Verifier:
    """Verifies bearer JWTs for the issuers in ``IdentitySettings`` (see the module docstring).

    ``clock`` gives the time for exp/nbf/iat (``verify(now=...)`` overrides it per call); ``monotonic``
    times the unknown-kid refresh limit. Both are injectable so tests need not sleep. ``verify`` is meant
    for the event loop's thread (the gRPC handlers); refreshes run as tasks on the loop ``start`` ran in.
    """

    def __init__(
        self,
        settings: IdentitySettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._cache = _TokenCache(settings.cache_entries)
        self._issuers: dict[str, IssuerKeys] = {
            issuer.issuer: IssuerKeys(
                issuer, source_for(issuer, settings.jwks_timeout_seconds), on_change=self._cache.clear
            )
            for issuer in settings.issuers
            if issuer.jwks_file is not None or issuer.jwks_url is not None
        }
        self._algorithms = frozenset(alg for issuer in settings.issuers for alg in issuer.algorithms)
        self._demanded: dict[str, float] = {}
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # ---- lifecycle

    async def start(self) -> None:
        """Load every issuer's JWKS, then keep them fresh in the background.

        Raises ConfigError naming each issuer and source that could not be loaded: starting without an
        issuer's keys would refuse all its callers with an error that hides the cause."""
        if self._loop is not None:
            raise RuntimeError("Verifier.start() was already called")
        self._loop = asyncio.get_running_loop()
        states = list(self._issuers.values())
        results = await asyncio.gather(*(state.load() for state in states), return_exceptions=True)
        problems = []
        for state, result in zip(states, results, strict=True):
            if isinstance(result, JwksError):
                problems.append(f"issuer {state.settings.issuer}: {result}")
            elif isinstance(result, BaseException):
                await self.close()
                raise result
        if problems:
            await self.close()
            raise ConfigError("identity: cannot load JWKS: " + "; ".join(problems))
        for state in states:
            self._spawn(self._refresh_loop(state))

    async def close(self) -> None:
        """Stop the refresh tasks and close the HTTP sessions. Safe to call more than once."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for state in self._issuers.values():
            await state.source.close()

    @property
    def keys_loaded(self) -> bool:
        """True when every issuer has keys: the readiness condition for mode jwt."""
        return bool(self._issuers) and all(state.keys is not None for state in self._issuers.values())

    def status(self) -> tuple[IssuerStatus, ...]:
        """Per issuer: its source, kids, last load and check, last refresh error (for /readyz and logs)."""
        return tuple(state.status for state in self._issuers.values())

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_loop(self, state: IssuerKeys) -> None:
        period = self.settings.jwks_refresh_seconds
        while True:
            # A little jitter keeps replicas started together from fetching in step.
            await asyncio.sleep(period * random.uniform(0.9, 1.0))  # noqa: S311 - jitter, not a secret
            try:
                await state.refresh("periodic")
            except Exception:
                log.exception("jwks_refresh_crashed", extra={"issuer": state.settings.issuer})

    def _request_refresh(self, state: IssuerKeys) -> None:
        """Ask for one background refresh of ``state``, unless one was asked within the rate limit or is
        still pending: tokens with made-up kids must not turn this sidecar into a load on the IdP."""
        issuer = state.settings.issuer
        now = self._monotonic()
        last = self._demanded.get(issuer)
        if last is not None and now - last < self.settings.jwks_min_refresh_seconds:
            return
        loop = self._loop
        if loop is None or loop.is_closed() or self._closing or issuer in self._pending:
            return
        self._demanded[issuer] = now
        self._pending.add(issuer)
        log.info("jwks_refresh_requested", extra={"issuer": issuer, "reason": "unknown kid"})
        loop.call_soon_threadsafe(self._spawn_refresh, state)

    def _spawn_refresh(self, state: IssuerKeys) -> None:
        if not self._closing:
            self._spawn(self._demanded_refresh(state))

    async def _demanded_refresh(self, state: IssuerKeys) -> None:
        try:
            await state.refresh("unknown kid")
        finally:
            self._pending.discard(state.settings.issuer)

    # ---- the request path

    def verify(self, token: str, now: float | None = None) -> Principal:
        """The Principal of a valid ``token``, or AuthError saying why not. No I/O, never blocks."""
        if len(token) > self.settings.max_token_bytes:
            raise AuthError(
                f"the token is longer than {self.settings.max_token_bytes} bytes", code="jwt_too_large"
            )
        if now is None:
            now = self._clock()
        leeway = self.settings.leeway_seconds
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            expires_at = cached.principal.expires_at
            if expires_at is not None and now >= expires_at + leeway:
                self._cache.discard(digest)
                raise AuthError("the token has expired", code="jwt_expired")
            if cached.not_before is not None and now + leeway < cached.not_before:
                raise AuthError("the token is not valid yet", code="jwt_not_yet_valid")
            return cached.principal
        parsed = self._parse(token)
        issuer = self._issuer_of(parsed)
        self._check_signature(parsed, issuer)
        principal = self._check_claims(parsed.claims, issuer.settings, now, leeway)
        nbf = parsed.claims.get("nbf")
        self._cache.put(digest, _Cached(principal, float(nbf) if is_number(nbf) else None))
        return principal

    def _parse(self, token: str) -> _Token:
        if not token.isascii():
            raise _malformed("it is not ASCII")
        parts = token.split(".")
        if len(parts) == 5:
            raise _malformed("encrypted tokens (JWE) are not accepted")
        if len(parts) != 3:
            raise _malformed("a JWT has three dot-separated parts")
        try:
            header = json_object(b64url_decode(parts[0]))
        except EncodingError:
            raise _malformed("the header is not base64url-encoded JSON") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError(
                f"the token's algorithm is not allowed (allowed: {', '.join(sorted(self._algorithms))})",
                code="jwt_alg_not_allowed",
            )
        if "crit" in header:
            raise _malformed("critical header extensions (crit) are not supported")
        if "kid" in header and not isinstance(header["kid"], str):
            raise _malformed("the kid header is not a string")
        try:
            claims = json_object(b64url_decode(parts[1]))
        except EncodingError:
            raise _malformed("the payload is not base64url-encoded JSON") from None
        try:
            signature = b64url_decode(parts[2])
        except EncodingError:
            raise _malformed("the signature is not base64url-encoded") from None
        if not signature:
            raise _malformed("the token has no signature")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        return _Token(header=header, claims=claims, signing_input=signing_input, signature=signature)

    def _issuer_of(self, token: _Token) -> IssuerKeys:
        # The unverified iss only chooses whose keys to try; it is checked again after the signature.
        iss = token.claims.get("iss")
        state = self._issuers.get(iss) if isinstance(iss, str) else None
        if state is None:
            raise AuthError("the token's issuer is not one this service trusts", code="jwt_issuer_unknown")
        if token.header["alg"] not in state.settings.algorithms:
            raise AuthError(
                "the token's algorithm is not allowed for its issuer "
                f"(allowed: {', '.join(state.settings.algorithms)})",
                code="jwt_alg_not_allowed",
            )
        return state

    def _check_signature(self, token: _Token, state: IssuerKeys) -> None:
        keys = state.keys
        if keys is None:
            raise AuthError("the issuer's keys are not loaded yet", code="jwt_key_unknown")
        alg: str = token.header["alg"]
        kid: str | None = token.header.get("kid")
        candidates = keys.candidates(kid, alg)
        if candidates is None:
            self._request_refresh(state)
            raise AuthError("the token's key id is not in its issuer's key set", code="jwt_key_unknown")
        if not candidates:
            raise AuthError(
                "no key of the issuer fits the token's key id and algorithm"
                if kid is not None
                else "the token has no key id and its issuer has more than one key for its algorithm",
                code="jwt_key_unknown",
            )
        if not any(key.verify(alg, token.signing_input, token.signature) for key in candidates):
            raise AuthError("the token's signature is invalid", code="jwt_signature_invalid")

    @staticmethod
    def _check_claims(
        claims: Mapping[str, object], issuer: IssuerSettings, now: float, leeway: float
    ) -> Principal:
        exp = claims.get("exp")
        if exp is None:
            raise AuthError("the token has no expiry (exp)", code="jwt_claim_invalid")
        if not is_number(exp):
            raise AuthError("the token's exp is not a number", code="jwt_claim_invalid")
        if now >= exp + leeway:
            raise AuthError("the token has expired", code="jwt_expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not is_number(nbf):
                raise AuthError("the token's nbf is not a number", code="jwt_claim_invalid")
            if now + leeway < nbf:
                raise AuthError("the token is not valid yet", code="jwt_not_yet_valid")
        iat = claims.get("iat")
        if iat is not None:
            if not is_number(iat):
                raise AuthError("the token's iat is not a number", code="jwt_claim_invalid")
            if iat > now + leeway:
                raise AuthError("the token was issued in the future (iat)", code="jwt_claim_invalid")
        if claims.get("iss") != issuer.issuer:
            raise AuthError("the token's issuer is not one this service trusts", code="jwt_issuer_unknown")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(item, str) for item in audiences):
            raise AuthError("the token has no audience (aud)", code="jwt_claim_invalid")
        if not set(audiences) & set(issuer.audiences):
            raise AuthError("the token is meant for another audience", code="jwt_claim_invalid")
        return principal_from_claims(claims, issuer, require_exp=True)
