"""An exchange whose policy says ``approve``: it holds the request body, asks the server for an approval
(``AwaitApproval``), and goes on with what ``resume`` is given; the server side runs against the real
ApprovalService over the in-memory store."""

import asyncio
import hashlib
import json
from pathlib import Path
from types import MappingProxyType

import pytest

from extproc.approvals.model import Approval, ApprovalError, Person
from extproc.approvals.service import ApprovalService
from extproc.approvals.store import MemoryStore
from extproc.exchange import APPROVAL_HEADER, Exchange
from extproc.identity import Principal
from extproc.model import (
    AwaitApproval,
    Body,
    BodyMode,
    ContinueHeaders,
    Direction,
    Headers,
    ProtocolConfig,
    Reject,
    ReplaceBody,
    Reply,
)
from extproc.policy import PolicyError, load_policies
from extproc.runtime import Snapshot, build_snapshot
from extproc.settings import load_settings

from .rules_fixture import EDM_KEY_FILE, RULES

REQ = Direction.REQUEST
EMPLOYEE = "employee E123456 joined"
POLICY = """\
policies:
  - id: default
    default: true
    approval:
      approver_groups: [security]
      mode: {mode}
      hold_seconds: 30
      exempt_groups: [hr]
    request:
      actions:
        - when: {{ entities: [EMPLOYEE_ID] }}
          do: approve
    response:
      actions:
        - when: {{ entities: [EMPLOYEE_ID] }}
          do: approve
"""


def snapshot(tmp_path: Path, mode: str = "hold") -> Snapshot:
    (tmp_path / "p.yaml").write_text(POLICY.format(mode=mode), encoding="utf-8")
    return build_snapshot(
        load_settings(
            None,
            detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
            policy={"paths": [str(tmp_path)]},
        )
    )


def caller(*groups: str, subject: str = "alice") -> Principal:
    return Principal(subject, "https://issuer.test", frozenset(groups), MappingProxyType({}), None)


def body_of(content: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()


def start(
    snap: Snapshot,
    content: str = EMPLOYEE,
    *,
    who: Principal | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    approvals: bool = True,
) -> tuple[Exchange, list[Reply]]:
    ex = Exchange(
        snap,
        ProtocolConfig(BodyMode.BUFFERED, BodyMode.BUFFERED),
        "d1",
        caller=who if who is not None else caller("eng"),
        approvals=approvals,
    )
    items = ((":path", "/v1/chat/completions"), ("content-type", "application/json"), *headers)
    replies = list(ex.handle(Headers(REQ, items, False)))
    if any(isinstance(r, Reject) for r in replies):
        return ex, replies
    return ex, replies + list(ex.handle(Body(REQ, body_of(content), True)))


def waiting(replies: list[Reply]) -> AwaitApproval:
    [reply] = [r for r in replies if isinstance(r, AwaitApproval)]
    return reply


def refused(replies: list[Reply]) -> dict[str, str]:
    [reply] = [r for r in replies if isinstance(r, Reject)]
    document: dict[str, str] = json.loads(reply.body)
    return document


def sent(replies: list[Reply], content: str = EMPLOYEE) -> str:
    """What the model receives: the replaced body, or (None) the body as it came."""
    [reply] = [r for r in replies if isinstance(r, ReplaceBody)]
    data = reply.data if reply.data is not None else body_of(content)
    return str(json.loads(data)["messages"][0]["content"])


def test_a_held_request_asks_for_an_approval_with_what_an_approver_must_see(tmp_path: Path) -> None:
    _, replies = start(snapshot(tmp_path))
    ask = waiting(replies)
    assert ask.hold
    assert ask.hold_seconds == 30
    request = ask.request
    assert request is not None
    assert request.requester == Person("alice", "https://issuer.test", ("eng",))
    assert request.rule_ids == ("employee-id",)
    assert request.approver_groups == ("security",)
    assert request.body_digest == hashlib.sha256(body_of(EMPLOYEE)).hexdigest()
    assert "E123456" not in request.prompt  # approvers see the prompt masked
    assert "employee" in request.prompt
    assert request.decision_id == "d1"


def test_approved_the_value_goes_to_the_model_unmasked(tmp_path: Path) -> None:
    ex, replies = start(snapshot(tmp_path))
    request = waiting(replies).request
    assert request is not None
    approved = Approval(request).vote(
        Person("bob", "https://issuer.test", ("security",)), True, request.created
    )
    assert sent(ex.resume(approved)) == EMPLOYEE
    outcome = ex.outcome()
    assert (outcome.approval_id, outcome.approval_status) == (request.id, "approved")
    assert [a for _, _, a in outcome.actions["request"]] == ["approve"]


@pytest.mark.parametrize(
    ("status", "code"),
    [("pending", "approval_required"), ("denied", "approval_denied"), ("expired", "approval_expired")],
)
def test_not_approved_the_request_is_refused_with_its_ticket(tmp_path: Path, status: str, code: str) -> None:
    ex, replies = start(snapshot(tmp_path))
    request = waiting(replies).request
    assert request is not None
    answer = refused(ex.resume(Approval(request, status=status, reason="no"), "https://x/approvals/1"))  # type: ignore[arg-type]
    assert answer["error"] == code
    assert answer["approval_id"] == request.id
    assert answer["status"] == status
    assert answer["approve_url"] == "https://x/approvals/1"
    assert "E123456" not in json.dumps(answer)


def test_a_retry_presents_its_approval_id_which_never_reaches_the_model(tmp_path: Path) -> None:
    ex, replies = start(snapshot(tmp_path, "ticket"), headers=((APPROVAL_HEADER, "abc123"),))
    [headers] = [r for r in replies if isinstance(r, ContinueHeaders)]
    assert APPROVAL_HEADER in headers.changes.remove
    ask = waiting(replies)
    assert (ask.redeem, ask.request) == ("abc123", None)
    assert ask.body_digest == hashlib.sha256(body_of(EMPLOYEE)).hexdigest()
    refusal = ApprovalError("the approval was granted for another request body", code="approval_mismatch")
    answer = refused(ex.resume(refusal))
    assert (answer["error"], answer["approval_id"]) == ("approval_mismatch", "abc123")


def test_without_a_caller_nobody_could_be_granted_it(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    ex = Exchange(snap, ProtocolConfig(BodyMode.BUFFERED, BodyMode.BUFFERED), "d", approvals=True)
    ex.handle(Headers(REQ, ((":path", "/v1/chat/completions"), ("content-type", "application/json")), False))
    assert refused(ex.handle(Body(REQ, body_of(EMPLOYEE), True)))["error"] == "approval_needs_identity"


def test_exempt_groups_pass_and_clean_requests_never_wait(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    _, replies = start(snap, who=caller("hr"))
    assert sent(replies) == EMPLOYEE
    _, replies = start(snap, "nothing to see")
    assert not [r for r in replies if isinstance(r, AwaitApproval)]


def test_a_server_that_cannot_wait_refuses_as_before(tmp_path: Path) -> None:
    _, replies = start(snapshot(tmp_path), approvals=False)
    assert refused(replies)["error"] == "approval_required"


def test_a_header_needing_approval_cannot_wait_and_is_refused(tmp_path: Path) -> None:
    _, replies = start(snapshot(tmp_path), headers=(("x-note", EMPLOYEE),))
    assert refused(replies)["error"] == "approval_required"


def test_an_answer_needing_approval_is_refused(tmp_path: Path) -> None:
    ex, replies = start(snapshot(tmp_path), "hello")
    assert sent(replies, "hello") == "hello"
    ex.handle(Headers(Direction.RESPONSE, ((":status", "200"), ("content-type", "application/json")), False))
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": EMPLOYEE}}]}).encode()
    assert refused(ex.handle(Body(Direction.RESPONSE, answer, True)))["error"] == "approval_required"


def test_approve_without_approvers_is_warned_at_load(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "policies:\n  - id: d\n    default: true\n    request:\n      default: approve\n", encoding="utf-8"
    )
    assert any("without an `approval`" in w for w in load_policies([tmp_path]).warnings)
    (tmp_path / "p.yaml").write_text(
        "policies:\n  - id: d\n    default: true\n    request:\n      actions:\n"
        "        - do: mask\n          approval: {approver_groups: [x]}\n",
        encoding="utf-8",
    )
    with pytest.raises(PolicyError, match="`approval` goes with `do: approve`"):
        load_policies([tmp_path])


def test_through_the_service_a_hold_then_a_single_use_grant(tmp_path: Path) -> None:
    """The server's part, as ``ExternalProcessor._approval`` does it, against the real service."""
    service = ApprovalService(MemoryStore())
    snap = snapshot(tmp_path, "ticket")
    approver = Person("bob", "https://issuer.test", ("security",))

    async def scenario() -> None:
        ex, replies = start(snap)
        ask = waiting(replies)
        assert ask.request is not None
        ticket = await service.request(ask.request)
        first = refused(ex.resume(ticket, service.approve_url(ticket.id)))
        assert (first["error"], first["status"]) == ("approval_required", "pending")
        await service.decide(ticket.id, approver, True)
        # the retry: same caller, same body, the approval id in a header
        retry, replies = start(snap, headers=((APPROVAL_HEADER, ticket.id),))
        ask = waiting(replies)
        assert ask.caller is not None
        used = await service.redeem(ticket.id, ask.caller, ask.body_digest)
        assert sent(retry.resume(used)) == EMPLOYEE
        # a second retry: refused
        again, replies = start(snap, headers=((APPROVAL_HEADER, ticket.id),))
        ask = waiting(replies)
        assert ask.caller is not None
        with pytest.raises(ApprovalError) as raised:
            await service.redeem(ticket.id, ask.caller, ask.body_digest)
        assert refused(again.resume(raised.value))["error"] == "approval_used"

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["approved", "exempt"])
def test_a_value_let_through_by_an_approval_is_not_kept_in_the_clear_in_the_record(
    tmp_path: Path, path: str
) -> None:
    """Regression: an approved value went out as written, and the record kept the body sent on in the
    clear, since only ``allow`` decisions counted as let through."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "p.yaml").write_text(POLICY.format(mode="hold"), encoding="utf-8")
    snap = build_snapshot(
        load_settings(
            None,
            detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
            policy={"paths": [str(tmp_path / "p")]},
            audit={"record_path": str(tmp_path / "session.jsonl")},
        )
    )
    ex, replies = start(snap, who=caller("hr") if path == "exempt" else caller("eng"))
    if path == "approved":
        request = waiting(replies).request
        assert request is not None
        approver = Person("bob", "https://issuer.test", ("security",))
        assert sent(ex.resume(Approval(request).vote(approver, True, request.created))) == EMPLOYEE
    recorded = ex.recorded().request
    assert recorded is not None
    assert recorded.masked is None  # withheld: the value is only in the sealed original, when one is kept


def test_close_releases_a_held_body_and_a_streaming_scanner(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    ex, replies = start(snap)
    waiting(replies)
    stream = Exchange(
        snap, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d2", caller=caller()
    )
    stream.handle(
        Headers(REQ, ((":path", "/v1/chat/completions"), ("content-type", "application/json")), False)
    )
    stream.handle(Body(REQ, body_of("hi"), True))
    stream.handle(Headers(Direction.RESPONSE, ((":status", "200"), ("content-type", "text/plain")), False))
    stream.handle(Body(Direction.RESPONSE, b"employee E12", False))  # part of a value: held back
    processor = stream._dirs[Direction.RESPONSE].processor
    assert processor.held > 0
    cuts: list[bytes] = []
    cut = processor.cut
    processor.cut = lambda: cuts.append(cut()) or b""  # type: ignore[method-assign]
    for exchange in (ex, stream, stream):  # twice is harmless
        exchange.close()
    assert cuts == [b""]  # the open answer's scanners were cut (freed) once, and released nothing
    assert ex._held_body is None
    assert stream.outcome().decision == "incomplete"
