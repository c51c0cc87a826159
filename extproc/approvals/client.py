"""A typed client of the approvers' gRPC API, for ``extproc approvals ...``: blocking calls (a command
makes one call, or follows one stream), each sending the approver's token, each failure one ApiError
that keeps the status and the stable code apart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Final

import grpc
from google.protobuf import json_format

from extproc.approvals.v1 import approvals_pb2 as pb
from extproc.approvals.v1 import rpc

CALL_SECONDS: Final = 10.0
"""How long one call may take: long enough for a store across the network, short enough that a server
that does not answer is reported rather than waited for."""

MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
"""The largest answer read: a list of many long (masked) prompts is past gRPC's 4 MiB default."""

REFUSALS: Final = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}
)
"""The statuses with which the approval rules refuse a step (as opposed to a token, a connection or a
server that failed)."""


class ApiError(Exception):
    """A call that failed: ``status`` is gRPC's, ``code`` the stable code the server put first in the
    details (``approval_self``, ``jwt_expired``...), empty when the failure did not come from the API
    (no server at that address, a deadline)."""

    def __init__(self, status: grpc.StatusCode, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def refused(self) -> bool:
        """The approval rules said no (exit 1 in the CLI), rather than the call failing."""
        return self.status in REFUSALS

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else f"{self.status.name}: {self.message}"


def _error(failure: grpc.RpcError) -> ApiError:
    status: grpc.StatusCode = failure.code()
    details: str = failure.details() or ""
    code, sep, message = details.partition(": ")
    if sep and code and code.replace("_", "").isalnum() and code.islower():
        return ApiError(status, code, message)
    return ApiError(status, "", details)


class ApprovalsClient:
    """One channel to ``address`` (HOST:PORT, plaintext), every call carrying ``token``."""

    def __init__(self, address: str, token: str, timeout: float = CALL_SECONDS) -> None:
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", MAX_ANSWER_BYTES)]
        )
        self._stub = rpc.ApprovalsStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    def __enter__(self) -> ApprovalsClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def list_pending(self) -> list[pb.Approval]:
        answer: pb.ListPendingResponse = self._call(self._stub.ListPending, pb.ListPendingRequest())
        return list(answer.approvals)

    def get(self, approval_id: str) -> pb.Approval:
        answer: pb.Approval = self._call(self._stub.Get, pb.GetRequest(id=approval_id))
        return answer

    def approve(self, approval_id: str, reason: str = "") -> pb.Approval:
        answer: pb.Approval = self._call(self._stub.Approve, pb.ApproveRequest(id=approval_id, reason=reason))
        return answer

    def deny(self, approval_id: str, reason: str) -> pb.Approval:
        answer: pb.Approval = self._call(self._stub.Deny, pb.DenyRequest(id=approval_id, reason=reason))
        return answer

    def watch(self) -> Iterator[pb.Approval]:
        """The pending approvals, then every change, until the server ends the stream (or the caller
        stops reading: the call is then cancelled)."""
        stream = self._stub.Watch(pb.WatchRequest(), metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as failure:
            raise _error(failure) from None
        finally:
            stream.cancel()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as failure:
            raise _error(failure) from None


# -- for people and for programs --------------------------------------------------------------------------


def as_json(approval: pb.Approval) -> dict[str, Any]:
    """The proto3 JSON mapping of ``approval`` with the .proto's field names, every field present:
    what ``--json`` prints, one object per approval."""
    return json_format.MessageToDict(
        approval, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def status_name(approval: pb.Approval) -> str:
    return pb.Status.Name(approval.status).removeprefix("STATUS_").lower()


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _approvals(approval: pb.Approval) -> str:
    approving = sum(1 for v in approval.votes if v.approve)
    return f"{approving}/{approval.request.min_approvals} approvals"


def line(approval: pb.Approval, now: float | None = None) -> str:
    """One line per approval, for ``list`` and ``watch``: id, status, votes, who, what, why, age."""
    request = approval.request
    now = time.time() if now is None else now
    age = _ago(now - request.created.ToNanoseconds() / 1e9)
    what = f"{request.route} {request.model}" if request.HasField("model") else request.route
    mark = "  (you may decide)" if approval.decidable else ""
    return (
        f"{request.id}  {status_name(approval)}  {_approvals(approval)}  {request.requester.subject}  "
        f"{what}  rules {','.join(request.rule_ids) or '-'}  {age} ago{mark}"
    )


def details(approval: pb.Approval) -> str:
    """Everything an approver decides on, for ``show``, ``approve`` and ``deny``."""
    request = approval.request
    requester = request.requester
    groups = ", ".join(requester.groups) or "-"
    rows = [
        ("id", request.id),
        ("status", status_name(approval) + (f" ({approval.reason})" if approval.reason else "")),
        ("requester", f"{requester.subject} ({requester.issuer}), groups {groups}"),
        ("route", request.route),
        ("model", request.model if request.HasField("model") else "-"),
        ("rules", ", ".join(request.rule_ids) or "-"),
        ("policy", request.policy_id),
        (
            "approvers",
            f"{', '.join(request.approver_groups)}: {_approvals(approval)}"
            + (", one of every group" if request.require_all_groups else ""),
        ),
        ("mode", pb.Mode.Name(request.mode).removeprefix("MODE_").lower()),
        ("created", request.created.ToJsonString()),
        ("ttl", f"{request.ttl_seconds:g}s"),
        ("decision", request.decision_id or "-"),
        ("body sha256", request.body_digest),
    ]
    if approval.HasField("decided_at"):
        rows.append(("decided", approval.decided_at.ToJsonString()))
    if approval.HasField("used_at"):
        rows.append(("used", approval.used_at.ToJsonString()))
    for vote in approval.votes:
        said = "approved" if vote.approve else "denied"
        reason = f": {vote.reason}" if vote.reason else ""
        rows.append(("vote", f"{vote.approver.subject} {said} at {vote.at.ToJsonString()}{reason}"))
    if approval.approve_url:
        rows.append(("page", approval.approve_url))
    rows.append(("you may decide", "yes" if approval.decidable else "no"))
    width = 2 + max(len(name) for name, _ in rows)
    text = "\n".join(f"{name + ':':<{width}}{value}" for name, value in rows)
    prompt = "\n".join("  " + part for part in request.prompt.splitlines()) or "  (empty)"
    return f"{text}\nprompt (masked):\n{prompt}"
