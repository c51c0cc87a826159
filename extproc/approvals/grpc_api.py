"""The approvers' gRPC API (``proto/extproc/approvals/v1/approvals.proto``), served on
``approvals.api_address``.

Every call is authenticated with the approver's own JWT (metadata ``authorization: Bearer <JWT>``),
verified by the same Verifier as callers' tokens, and every step goes through ``ApprovalService``: the
API applies the rules of ``model`` and reaches the listeners (session record, logs, notifications)
exactly as the page and the exchange do, and never touches the store itself.

An approver sees an approval only when they belong to one of its approver groups: the API shows a
prompt (masked, but still the requester's words) to the people who decide it and to nobody else. Their
own requests are shown too, with ``decidable`` false: the rules refuse a vote on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from extproc.approvals.model import Approval, ApprovalError, Person
from extproc.approvals.service import ApprovalService, approver_from, unavailable
from extproc.approvals.store import StoreUnavailable
from extproc.approvals.v1 import approvals_pb2 as pb
from extproc.approvals.v1 import rpc
from extproc.errors import AuthError, ExtProcError
from extproc.identity.jwt import Verifier

log = logging.getLogger("extproc.approvals.api")

T = TypeVar("T")

GRPC_STATUS: Final[dict[str, grpc.StatusCode]] = {
    "approval_not_found": grpc.StatusCode.NOT_FOUND,
    "approval_self": grpc.StatusCode.PERMISSION_DENIED,
    "approval_not_approver": grpc.StatusCode.PERMISSION_DENIED,
    "approval_closed": grpc.StatusCode.FAILED_PRECONDITION,
    "approval_already_voted": grpc.StatusCode.FAILED_PRECONDITION,
    "approval_unavailable": grpc.StatusCode.UNAVAILABLE,
}
"""The gRPC status of each refusal an approver can meet; the stable code always leads the details."""

_STATUS: Final = {
    "pending": pb.STATUS_PENDING,
    "approved": pb.STATUS_APPROVED,
    "denied": pb.STATUS_DENIED,
    "expired": pb.STATUS_EXPIRED,
    "used": pb.STATUS_USED,
}
_MODE: Final = {"hold": pb.MODE_HOLD, "ticket": pb.MODE_TICKET}


def grpc_status(error: ExtProcError) -> grpc.StatusCode:
    """The status a refusal is answered with: UNAUTHENTICATED for any token problem, the table above for
    the approval rules' codes, FAILED_PRECONDITION for an approval code the table does not name."""
    if isinstance(error, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, ApprovalError):
        return GRPC_STATUS.get(error.code, grpc.StatusCode.FAILED_PRECONDITION)
    return grpc.StatusCode.INTERNAL


def visible(approval: Approval, approver: Person) -> bool:
    """Whether ``approver`` may see ``approval``: a member of one of its approver groups."""
    return bool(set(approver.groups) & set(approval.request.approver_groups))


def decidable(approval: Approval, approver: Person, now: float) -> bool:
    """Whether ``approver`` may vote on ``approval`` at ``now``, asked of the rules themselves (a vote
    that is computed, never stored), so the API cannot disagree with what Approve would answer."""
    try:
        approval.vote(approver, True, now)
    except ApprovalError:
        return False
    return True


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _person(person: Person) -> pb.Person:
    return pb.Person(subject=person.subject, issuer=person.issuer, groups=list(person.groups))


def to_message(approval: Approval, approve_url: str, can_decide: bool) -> pb.Approval:
    """``approval`` as the API's message; ``approve_url`` and ``can_decide`` depend on the server and on
    who asks, so the caller supplies them."""
    request = approval.request
    message = pb.Approval(
        request=pb.ApprovalRequest(
            id=request.id,
            created=_timestamp(request.created),
            requester=_person(request.requester),
            route=request.route,
            model=request.model,
            prompt=request.prompt,
            rule_ids=list(request.rule_ids),
            body_digest=request.body_digest,
            policy_id=request.policy_id,
            approver_groups=list(request.approver_groups),
            min_approvals=request.min_approvals,
            require_all_groups=request.require_all_groups,
            mode=_MODE[request.mode],
            ttl_seconds=request.ttl_seconds,
            decision_id=request.decision_id,
        ),
        status=_STATUS[approval.status],
        votes=[
            pb.Vote(approver=_person(v.approver), approve=v.approve, at=_timestamp(v.at), reason=v.reason)
            for v in approval.votes
        ],
        reason=approval.reason,
        revision=approval.revision,
        approve_url=approve_url,
        decidable=can_decide,
    )
    if approval.decided_at is not None:
        message.decided_at.CopyFrom(_timestamp(approval.decided_at))
    if approval.used_at is not None:
        message.used_at.CopyFrom(_timestamp(approval.used_at))
    return message


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


class ApprovalsApi:
    """The ``extproc.approvals.v1.Approvals`` servicer. ``verifier`` is read on every call, so the one
    the server's snapshot holds (started with the server) is the one that verifies approvers."""

    def __init__(
        self,
        service: ApprovalService,
        verifier: Callable[[], Verifier | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._verifier = verifier
        self._clock = clock
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Ends every Watch stream (with OK), so that a stopping server does not wait out its grace
        period for streams that never end by themselves."""
        self._closing.set()

    async def ListPending(
        self, request: pb.ListPendingRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPendingResponse:
        async def listed(approver: Person) -> pb.ListPendingResponse:
            pending = await self._service.pending()
            now = self._clock()
            return pb.ListPendingResponse(
                approvals=[self._message(a, approver, now) for a in pending if visible(a, approver)]
            )

        return await self._answer(context, "ListPending", listed)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.Approval:
        async def got(approver: Person) -> pb.Approval:
            return self._message(await self._seen(request.id, approver), approver, self._clock())

        return await self._answer(context, "Get", got)

    async def Approve(self, request: pb.ApproveRequest, context: grpc.aio.ServicerContext) -> pb.Approval:
        return await self._vote(context, "Approve", request.id, True, request.reason)

    async def Deny(self, request: pb.DenyRequest, context: grpc.aio.ServicerContext) -> pb.Approval:
        return await self._vote(context, "Deny", request.id, False, request.reason)

    async def Watch(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Approval]:
        """The pending approvals the caller sees, then each one created or changed. The store is followed
        before the pending ones are listed, so nothing created in between is missed; what the listing
        already showed is not sent again until it changes."""
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            approver = self._authenticate(context)
        except ExtProcError as error:
            failure = self._refused("Watch", error)
        if failure is not None:
            await context.abort(*failure)
            return
        try:
            updates = await self._service.follow()  # changes are kept for this stream from here on
        except ExtProcError as error:
            failure = self._refused("Watch", error)
        if failure is not None:
            await context.abort(*failure)
            return
        following: asyncio.Future[Approval] = asyncio.ensure_future(anext(updates))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            try:
                pending = await self._service.pending()
            except ExtProcError as error:
                failure = self._refused("Watch", error)
            if failure is not None:
                await context.abort(*failure)
                return
            now = self._clock()
            shown: dict[str, int] = {}
            for approval in pending:
                if visible(approval, approver):
                    shown[approval.id] = approval.revision
                    yield self._message(approval, approver, now)
            while True:
                either: set[asyncio.Future[Any]] = {following, closing}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    return  # the server is stopping
                try:
                    approval = following.result()
                except StopAsyncIteration:
                    return  # the store closed
                except StoreUnavailable as exc:
                    failure = self._refused("Watch", unavailable(exc))
                    break
                following = asyncio.ensure_future(anext(updates))
                if not visible(approval, approver):
                    continue
                listed = shown.get(approval.id)
                if listed is not None:
                    if approval.revision <= listed:
                        continue
                    del shown[approval.id]
                yield self._message(approval, approver, self._clock())
        finally:
            for task in (following, closing):
                task.cancel()
            # What the last read ended with was answered above, or no longer matters: the stream is over.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await following
            with contextlib.suppress(asyncio.CancelledError):
                await closing
            if isinstance(updates, AsyncGenerator):
                await updates.aclose()  # the store stops keeping changes for this stream
        if failure is not None:
            await context.abort(*failure)

    # -- one step each ------------------------------------------------------------------------------------

    async def _vote(
        self, context: grpc.aio.ServicerContext, method: str, approval_id: str, approve: bool, reason: str
    ) -> pb.Approval:
        async def voted(approver: Person) -> pb.Approval:
            decided = await self._service.decide(approval_id, approver, approve, reason)
            log.info(
                "approval_vote",
                extra={"approval_id": approval_id, "approve": approve, "status": decided.status},
            )
            return self._message(decided, approver, self._clock())

        return await self._answer(context, method, voted)

    async def _seen(self, approval_id: str, approver: Person) -> Approval:
        """The approval, when ``approver`` may see it; raises ApprovalError otherwise."""
        approval = await self._service.get(approval_id)
        if not visible(approval, approver):
            raise ApprovalError(
                f"only members of its approver groups see approval {approval_id}",
                code="approval_not_approver",
            )
        return approval

    def _message(self, approval: Approval, approver: Person, now: float) -> pb.Approval:
        return to_message(
            approval, self._service.approve_url(approval.id), decidable(approval, approver, now)
        )

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Person:
        return approver_from(self._verifier(), _authorization(context))

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        work: Callable[[Person], Awaitable[T]],
    ) -> T:
        """``work`` done for the authenticated approver, or the call aborted with the status and the
        stable code of what refused it."""
        try:
            return await work(self._authenticate(context))
        except ExtProcError as error:
            failure = self._refused(method, error)
        except Exception:
            log.exception("approvals_api_failed", extra={"method": method})
            failure = (grpc.StatusCode.INTERNAL, "internal_error")
        await context.abort(*failure)
        raise AssertionError("context.abort returns only by raising")

    def _refused(self, method: str, error: ExtProcError) -> tuple[grpc.StatusCode, str]:
        status = grpc_status(error)
        log.info("approvals_api_refused", extra={"method": method, "code": error.code})
        return status, f"{error.code}: {error.message}"


def add_approvals_api(
    server: grpc.aio.Server, service: ApprovalService, verifier: Callable[[], Verifier | None]
) -> ApprovalsApi:
    """Registers the approvers' API on ``server``; returns the servicer, whose ``close()`` ends its Watch
    streams when the server stops."""
    api = ApprovalsApi(service, verifier)
    rpc.add_to_server(api, server)
    return api
