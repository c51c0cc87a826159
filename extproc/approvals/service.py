"""The approval service: the one place the exchange, the approver gRPC API, the page and the CLI go
through, so that every step follows the same rules (``model``) and reaches the same listeners (the
session record, the log, notifications)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from extproc.approvals.model import Approval, ApprovalError, ApprovalRequest, Event, Person
from extproc.approvals.store import ApprovalStore, StoreUnavailable, not_found
from extproc.errors import AuthError
from extproc.identity.jwt import Verifier, bearer_token

log = logging.getLogger("extproc.approvals")

Listener = Callable[[Event], None]
T = TypeVar("T")


def unavailable(exc: Exception) -> ApprovalError:
    return ApprovalError(f"the approval store cannot be reached: {exc}", code="approval_unavailable")


class ApprovalService:
    def __init__(
        self,
        store: ApprovalStore,
        listeners: list[Listener] | None = None,
        clock: Callable[[], float] = time.time,
        public_url: str = "",
    ) -> None:
        self.store = store
        self.listeners: list[Listener] = list(listeners or [])
        self._clock = clock
        self.public_url = public_url.rstrip("/")

    def approve_url(self, approval_id: str) -> str:
        """Where an approver decides it: the page's address for this approval."""
        return f"{self.public_url}/approvals/{approval_id}"

    async def request(self, request: ApprovalRequest) -> Approval:
        approval = Approval(request)
        await self._call(self.store.create(approval))
        self._emit("requested", approval, request.requester)
        return approval

    async def get(self, approval_id: str) -> Approval:
        """The approval as of now; one found past its time to live is marked expired (and recorded)."""
        found = await self._call(self.store.get(approval_id))
        if found is None:
            raise not_found(approval_id)
        if found.current(self._clock()).status != found.status:
            return await self._settle(approval_id)
        return found

    async def pending(self) -> list[Approval]:
        return await self._call(self.store.pending())

    async def decide(self, approval_id: str, approver: Person, approve: bool, reason: str = "") -> Approval:
        """``approver``'s vote. Raises ApprovalError with the rules' code."""
        now = self._clock()
        decided = await self._call(
            self.store.update(approval_id, lambda a: a.vote(approver, approve, now, reason))
        )
        self._emit("voted", decided, approver, approve=approve, reason=reason)
        if decided.status in ("approved", "denied"):
            self._emit(decided.status, decided, approver, reason=reason)
        return decided

    async def wait(self, approval_id: str, seconds: float) -> Approval:
        """The approval once decided, or as it stands after ``seconds`` (still pending: a ticket)."""
        waited = await self._call(self.store.wait(approval_id, seconds))
        if waited is None:
            raise not_found(approval_id)
        return waited

    async def redeem(self, approval_id: str, caller: Person, body_digest: str) -> Approval:
        """Uses the grant; raises ApprovalError (``approval_pending``, ``approval_denied``,
        ``approval_expired``, ``approval_used``, ``approval_mismatch``, ``approval_not_found``)."""
        await self.get(approval_id)  # an expired one is recorded as such first
        now = self._clock()
        used = await self._call(self.store.update(approval_id, lambda a: a.redeem(caller, body_digest, now)))
        self._emit("used", used, caller)
        return used

    def watch(self) -> AsyncIterator[Approval]:
        return self.store.watch()

    async def follow(self) -> AsyncIterator[Approval]:
        """Changes from the moment this returns (see ``ApprovalStore.follow``); ``approval_unavailable``
        when the store cannot be reached."""
        return await self._call(self.store.follow())

    async def sweep(self) -> int:
        """Marks every pending approval past its time to live expired; returns how many."""
        now = self._clock()
        count = 0
        for approval in await self._call(self.store.pending()):
            if approval.current(now).status == "expired":
                await self._settle(approval.id)
                count += 1
        return count

    async def _settle(self, approval_id: str) -> Approval:
        now = self._clock()
        before = await self._call(self.store.get(approval_id))
        settled = await self._call(self.store.update(approval_id, lambda a: a.current(now)))
        if before is not None and before.status != settled.status and settled.status == "expired":
            self._emit("expired", settled, None, reason=settled.reason)
        return settled

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except StoreUnavailable as exc:
            raise unavailable(exc) from exc

    def _emit(self, kind: Any, approval: Approval, actor: Person | None, **detail: Any) -> None:
        event = Event(kind, approval, actor, self._clock(), detail)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener never breaks an approval step
                log.exception("approval_listener_failed", extra={"approval_id": approval.id, "event": kind})


def approver_from(verifier: Verifier | None, authorization: str | None) -> Person:
    """The approver an ``Authorization: Bearer <JWT>`` header names, verified like a caller's token (the
    same issuers, keys and algorithms). Raises AuthError; without a verifier (identity mode none or
    envoy) nobody can be authenticated here, and every approver request is refused."""
    if verifier is None:
        raise AuthError(
            "approvers are authenticated with identity.mode jwt; this sidecar verifies no tokens",
            code="jwt_issuer_unknown",
        )
    principal = verifier.verify(bearer_token(authorization))
    return Person(principal.subject, principal.issuer, tuple(sorted(principal.groups)))
