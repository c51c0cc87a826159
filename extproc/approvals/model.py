"""Approval values and the rules that move them; pure (the time is passed in), so every store applies
the same rules and a test can state them without a clock.

An approval is created ``pending``. Approvers vote: one deny denies it; it is approved once
``min_approvals`` different approvers approved (and, with ``require_all_groups``, at least one member of
every approver group). Nobody votes on their own request, and only members of an approver group vote. A
pending approval not decided within its ``ttl_seconds`` is ``expired``; an approved one is a grant the
same caller may use once, for the same body, within ``ttl_seconds`` of the decision, after which it is
``used`` (or ``expired``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from extproc.errors import ExtProcError

Status = Literal["pending", "approved", "denied", "expired", "used"]
Mode = Literal["hold", "ticket"]
CLOSED: Final = frozenset({"denied", "expired", "used"})


class ApprovalError(ExtProcError):
    """A step the rules refuse. ``code`` is one of the stable codes of the README's error table."""

    code = "approval_closed"


@dataclass(frozen=True, slots=True)
class Person:
    """Who asked or who voted, as their verified token says."""

    subject: str
    issuer: str = ""
    groups: tuple[str, ...] = ()

    def same(self, other: Person) -> bool:
        return self.subject == other.subject and self.issuer == other.issuer


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """What an approver is shown and what a grant is bound to. ``prompt`` is masked; ``body_digest`` is
    the SHA-256 (hex) of the exact request body, which a retry must match."""

    id: str
    created: float  # time.time()
    requester: Person
    route: str
    model: str | None
    prompt: str
    rule_ids: tuple[str, ...]
    body_digest: str
    policy_id: str
    approver_groups: tuple[str, ...]
    min_approvals: int = 1
    require_all_groups: bool = False
    mode: Mode = "ticket"
    ttl_seconds: float = 3600.0
    decision_id: str = ""  # the exchange that asked


@dataclass(frozen=True, slots=True)
class Vote:
    approver: Person
    approve: bool
    at: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Approval:
    """An approval request and where it stands."""

    request: ApprovalRequest
    status: Status = "pending"
    votes: tuple[Vote, ...] = ()
    decided_at: float | None = None
    used_at: float | None = None
    reason: str = ""  # why it was denied or expired
    revision: int = 0  # bumped by every change: a store's compare-and-set token

    @property
    def id(self) -> str:
        return self.request.id

    def current(self, now: float) -> Approval:
        """The approval as of ``now``: a pending one past its time to live, or a grant past its own, is
        expired."""
        if self.status == "pending" and now >= self.request.created + self.request.ttl_seconds:
            return self._moved("expired", reason="nobody decided in time", decided_at=now)
        if (
            self.status == "approved"
            and self.decided_at is not None
            and now >= self.decided_at + self.request.ttl_seconds
        ):
            return self._moved("expired", reason="the grant was not used in time")
        return self

    def vote(self, approver: Person, approve: bool, now: float, reason: str = "") -> Approval:
        """The approval after ``approver``'s vote. Raises ApprovalError (``approval_self``,
        ``approval_not_approver``, ``approval_already_voted``, ``approval_closed``)."""
        state = self.current(now)
        request = state.request
        if state.status != "pending":
            raise ApprovalError(f"approval {state.id} is {state.status}", code="approval_closed")
        if approver.same(request.requester):
            raise ApprovalError("nobody approves their own request", code="approval_self")
        if not set(approver.groups) & set(request.approver_groups):
            groups = ", ".join(request.approver_groups)
            raise ApprovalError(f"only members of {groups} decide this request", code="approval_not_approver")
        if any(v.approver.same(approver) for v in state.votes):
            raise ApprovalError("one vote per approver", code="approval_already_voted")
        votes = (*state.votes, Vote(approver, approve, now, reason))
        if not approve:
            return state._moved("denied", votes=votes, reason=reason or "denied", decided_at=now)
        if _enough(request, votes):
            return state._moved("approved", votes=votes, decided_at=now)
        return state._moved("pending", votes=votes)

    def redeem(self, caller: Person, body_digest: str, now: float) -> Approval:
        """The grant used by ``caller`` for a body of ``body_digest``. Raises ApprovalError
        (``approval_pending``, ``approval_denied``, ``approval_expired``, ``approval_used``,
        ``approval_mismatch``)."""
        state = self.current(now)
        if state.status != "approved":
            raise ApprovalError(f"approval {state.id} is {state.status}", code=f"approval_{state.status}")
        if not caller.same(state.request.requester):
            raise ApprovalError("the approval was granted to another caller", code="approval_mismatch")
        if body_digest != state.request.body_digest:
            raise ApprovalError("the approval was granted for another request body", code="approval_mismatch")
        return state._moved("used", used_at=now)

    def _moved(self, status: Status, **changes: Any) -> Approval:
        return dataclasses.replace(self, status=status, revision=self.revision + 1, **changes)

    # -- as JSON (Redis, the page, webhooks) ----------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Approval:
        request = dict(data["request"])
        request["requester"] = _person(request["requester"])
        for name in ("rule_ids", "approver_groups"):
            request[name] = tuple(request[name])
        votes = tuple(
            Vote(_person(v["approver"]), bool(v["approve"]), float(v["at"]), str(v.get("reason", "")))
            for v in data.get("votes", ())
        )
        return cls(
            request=ApprovalRequest(**request),
            status=data["status"],
            votes=votes,
            decided_at=data.get("decided_at"),
            used_at=data.get("used_at"),
            reason=data.get("reason", ""),
            revision=int(data.get("revision", 0)),
        )


def _person(data: dict[str, Any]) -> Person:
    return Person(str(data["subject"]), str(data.get("issuer", "")), tuple(data.get("groups", ())))


def _enough(request: ApprovalRequest, votes: tuple[Vote, ...]) -> bool:
    approvers = [v.approver for v in votes if v.approve]
    if len({(p.subject, p.issuer) for p in approvers}) < request.min_approvals:
        return False
    if request.require_all_groups:
        covered = {g for p in approvers for g in p.groups}
        return set(request.approver_groups) <= covered
    return True


@dataclass(frozen=True, slots=True)
class Event:
    """One step of an approval, for the session record, logs, spans and notifications."""

    kind: Literal["requested", "voted", "approved", "denied", "expired", "used"]
    approval: Approval
    actor: Person | None = None
    at: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
