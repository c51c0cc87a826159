"""Approvals through real Envoy: a hold approved while the caller waits, a hold nobody decides, a ticket
approved and retried (once, and only with the same body), approvals by non-approvers and by the
requester refused, and every step in the verified session record. Approvers use the page's JSON API on
the admin port, with their own tokens of the dev issuer."""

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.audit.record import iter_records, verify
from extproc.devenv import Stack
from extproc.identity.dev import mint_dev_token

from .conftest import Demo, start_stack
from .redis_fixture import RedisServer

SSN = "594-74-3681"
POLICIES = """\
policies:
  - id: default
    default: true
  - id: hold
    match: { groups: [support] }
    approval: { approver_groups: [security-reviewers], mode: hold, hold_seconds: 30 }
    request:
      actions:
        - when: { entities: [US_SSN] }
          do: approve
  - id: hurried
    match: { groups: [hurried] }
    approval: { approver_groups: [security-reviewers], mode: hold, hold_seconds: 1 }
    request:
      actions:
        - when: { entities: [US_SSN] }
          do: approve
  - id: ticket
    match: { groups: [contractors] }
    approval: { approver_groups: [security-reviewers], mode: ticket, ttl_seconds: 600 }
    request:
      actions:
        - when: { entities: [US_SSN] }
          do: approve
"""


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dev-identity")


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("record") / "session.jsonl"


@pytest.fixture(scope="module")
def approving(tmp_path_factory: pytest.TempPathFactory, dev_dir: Path, record: Path) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("approvals")
    (folder / "policies").mkdir()
    (folder / "policies" / "p.yaml").write_text(POLICIES, encoding="utf-8")
    env = {
        "EXTPROC_POLICY__PATHS": json.dumps([str(folder / "policies")]),
        "EXTPROC_AUDIT__RECORD_PATH": str(record),
    }
    running = start_stack(folder / "stack.log", dev_identity=dev_dir, extra_env=env)
    yield running
    running.stop()


def token(dev_dir: Path, subject: str, *groups: str) -> str:
    return mint_dev_token(dev_dir, subject, list(groups), 600)


def ask(stack: Stack, bearer: str, content: str, tag: str = "", **headers: str) -> httpx.Response:
    body = {"model": "demo-small", "messages": [{"role": "user", "content": content}]}
    headers = {"authorization": f"Bearer {bearer}", "x-test-tag": tag, **headers}
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def approvals_api(stack: Stack, bearer: str, method: str, path: str, **body: Any) -> httpx.Response:
    url = f"http://127.0.0.1:{stack.admin_port}/approvals/api{path}"
    headers = {"authorization": f"Bearer {bearer}"}
    if method == "POST":
        return httpx.post(url, json=body, headers=headers, timeout=10)
    return httpx.get(url, headers=headers, timeout=10)


def pending_of(stack: Stack, reviewer: str, subject: str, deadline: float = 20) -> dict[str, Any]:
    """The pending approval ``subject`` asked for, as the reviewer's list shows it."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        listed = approvals_api(stack, reviewer, "GET", "/pending")
        assert listed.status_code == 200, listed.text
        mine = [a for a in listed.json()["approvals"] if a["requester"]["subject"] == subject]
        if mine:
            found: dict[str, Any] = mine[-1]
            return found
        time.sleep(0.1)
    raise AssertionError(f"no pending approval of {subject}")


def test_a_hold_approved_while_the_caller_waits_reaches_the_model(
    approving: Stack, dev_dir: Path, tag: str
) -> None:
    demo = Demo(approving.demo_url)
    reviewer = token(dev_dir, "bob", "security-reviewers")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, approving, token(dev_dir, "alice", "support"), f"SSN {SSN} please", tag)
        approval = pending_of(approving, reviewer, "alice")
        assert SSN not in json.dumps(approval)  # the approver sees the prompt masked
        assert approval["rule_ids"] == ["us-ssn"]
        assert demo.received(tag) == []  # nothing reached the model while it waits
        decided = approvals_api(approving, reviewer, "POST", f"/{approval['id']}/approve")
        assert decided.status_code == 200, decided.text
        answer = waiting.result(timeout=30)
    assert answer.status_code == 200, answer.text
    [seen] = demo.received(tag)
    assert SSN in seen["body"]  # approved: the value went to the model as written


def test_a_hold_nobody_decides_ends_in_a_ticket(approving: Stack, dev_dir: Path, tag: str) -> None:
    answer = ask(approving, token(dev_dir, "dave", "hurried"), f"SSN {SSN}", tag)
    assert answer.status_code == 403
    ticket = answer.json()
    assert (ticket["error"], ticket["status"]) == ("approval_required", "pending")
    assert ticket["approve_url"].endswith(f"/approvals/{ticket['approval_id']}")
    assert Demo(approving.demo_url).received(tag) == []


def test_a_ticket_is_approved_then_used_once_for_the_same_body(
    approving: Stack, dev_dir: Path, tag: str
) -> None:
    demo = Demo(approving.demo_url)
    caller = token(dev_dir, "carl", "contractors")
    reviewer = token(dev_dir, "bob", "security-reviewers")
    prompt = f"the customer's SSN is {SSN}"
    first = ask(approving, caller, prompt, tag)
    assert first.status_code == 403
    approval_id = first.json()["approval_id"]
    early = ask(approving, caller, prompt, tag, **{"x-approval-id": approval_id})
    assert (early.status_code, early.json()["error"]) == (403, "approval_pending")
    assert approvals_api(approving, reviewer, "POST", f"/{approval_id}/approve").status_code == 200
    other_body = ask(approving, caller, prompt + " and more", tag, **{"x-approval-id": approval_id})
    assert (other_body.status_code, other_body.json()["error"]) == (403, "approval_mismatch")
    other_caller = ask(
        approving, token(dev_dir, "eve", "contractors"), prompt, tag, **{"x-approval-id": approval_id}
    )
    assert (other_caller.status_code, other_caller.json()["error"]) == (403, "approval_mismatch")
    assert demo.received(tag) == []
    retry = ask(approving, caller, prompt, tag, **{"x-approval-id": approval_id})
    assert retry.status_code == 200, retry.text
    [seen] = demo.received(tag)
    assert SSN in seen["body"]
    assert "x-approval-id" not in seen["headers"]
    again = ask(approving, caller, prompt, tag, **{"x-approval-id": approval_id})
    assert (again.status_code, again.json()["error"]) == (403, "approval_used")


def test_nobody_approves_their_own_request_and_only_approvers_decide(approving: Stack, dev_dir: Path) -> None:
    asker = token(dev_dir, "rita", "contractors", "security-reviewers")
    ticket = ask(approving, asker, f"SSN {SSN}")
    approval_id = ticket.json()["approval_id"]
    own = approvals_api(approving, asker, "POST", f"/{approval_id}/approve")
    assert (own.status_code, own.json()["error"]) == (403, "approval_self")
    outsider = approvals_api(approving, token(dev_dir, "carol", "support"), "POST", f"/{approval_id}/approve")
    assert (outsider.status_code, outsider.json()["error"]) == (403, "approval_not_approver")
    denied = approvals_api(
        approving,
        token(dev_dir, "bob", "security-reviewers"),
        "POST",
        f"/{approval_id}/deny",
        reason="not needed",
    )
    assert denied.status_code == 200, denied.text
    retry = ask(approving, asker, f"SSN {SSN}", **{"x-approval-id": approval_id})
    assert (retry.status_code, retry.json()["error"]) == (403, "approval_denied")


def test_every_approval_step_is_in_the_verified_record(
    approving: Stack, dev_dir: Path, record: Path, tag: str
) -> None:
    caller = token(dev_dir, "vera", "contractors")
    approval_id = ask(approving, caller, f"SSN {SSN}").json()["approval_id"]
    approvals_api(approving, token(dev_dir, "bob", "security-reviewers"), "POST", f"/{approval_id}/approve")
    assert ask(approving, caller, f"SSN {SSN}", tag, **{"x-approval-id": approval_id}).status_code == 200
    deadline = time.monotonic() + 10
    steps: list[str] = []
    while time.monotonic() < deadline and "used" not in steps:
        time.sleep(0.2)
        records = [r for _, r in iter_records(record)]
        steps = [r["event"] for r in records if r["type"] == "approval" and r["approval_id"] == approval_id]
    assert steps == ["requested", "voted", "approved", "used"]
    approved = next(r for r in records if r.get("approval_id") == approval_id and r["event"] == "approved")
    assert approved["actor"]["subject"] == "bob"
    assert approved["requester"]["subject"] == "vera"
    exchanges = [
        r for r in records if r["type"] == "exchange" and r.get("approval", {}).get("id") == approval_id
    ]
    assert [e["approval"]["status"] for e in exchanges] == ["pending", "used"]
    assert verify(record).first_break is None


# -- several replicas: one Redis ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, dev_dir: Path, shared_redis: RedisServer
) -> Iterator[tuple[Stack, Stack]]:
    """Two sidecars (each its own Envoy, extproc and model), sharing approvals through one Redis."""
    folder = tmp_path_factory.mktemp("replicas")
    (folder / "policies").mkdir()
    (folder / "policies" / "p.yaml").write_text(POLICIES, encoding="utf-8")
    env = {
        "EXTPROC_POLICY__PATHS": json.dumps([str(folder / "policies")]),
        "EXTPROC_APPROVALS__STORE": "redis",
        "EXTPROC_APPROVALS__REDIS_URL": shared_redis.url,
    }
    one = start_stack(folder / "one.log", dev_identity=dev_dir, extra_env=dict(env))
    try:
        two = start_stack(folder / "two.log", dev_identity=dev_dir, extra_env=dict(env))
    except BaseException:
        one.stop()
        raise
    yield one, two
    two.stop()
    one.stop()


def test_a_hold_on_one_replica_is_approved_through_another_and_wakes_at_once(
    replicas: tuple[Stack, Stack], dev_dir: Path, tag: str
) -> None:
    one, two = replicas
    reviewer = token(dev_dir, "bob", "security-reviewers")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, one, token(dev_dir, "alice", "support"), f"SSN {SSN} please", tag)
        approval = pending_of(two, reviewer, "alice")  # listed by the other replica
        decided_at = time.monotonic()
        assert approvals_api(two, reviewer, "POST", f"/{approval['id']}/approve").status_code == 200
        answer = waiting.result(timeout=30)
        woke_after = time.monotonic() - decided_at
    assert answer.status_code == 200, answer.text
    assert woke_after < 5.0  # woken by the decision, not by a poll or the end of the 30 s hold
    [seen] = Demo(one.demo_url).received(tag)
    assert SSN in seen["body"]


def test_a_ticket_from_one_replica_is_used_through_another(
    replicas: tuple[Stack, Stack], dev_dir: Path, tag: str
) -> None:
    one, two = replicas
    caller = token(dev_dir, "carl", "contractors")
    approval_id = ask(one, caller, f"SSN {SSN}").json()["approval_id"]
    assert (
        approvals_api(
            one, token(dev_dir, "bob", "security-reviewers"), "POST", f"/{approval_id}/approve"
        ).status_code
        == 200
    )
    assert ask(two, caller, f"SSN {SSN}", tag, **{"x-approval-id": approval_id}).status_code == 200
    again = ask(one, caller, f"SSN {SSN}", tag, **{"x-approval-id": approval_id})
    assert (again.status_code, again.json()["error"]) == (403, "approval_used")  # used is used everywhere


def test_with_redis_down_only_approval_needing_requests_are_refused(
    replicas: tuple[Stack, Stack], dev_dir: Path, shared_redis: RedisServer, tag: str
) -> None:
    one, _ = replicas
    caller = token(dev_dir, "alice", "support")
    port = shared_redis.port
    shared_redis.stop()
    try:
        refused = ask(one, caller, f"SSN {SSN}", tag)
        assert (refused.status_code, refused.json()["error"]) == (503, "approval_unavailable")
        fine = ask(one, caller, "card 4111 1111 1111 1111 and nothing needing approval", tag)
        assert fine.status_code == 200, fine.text
        [seen] = Demo(one.demo_url).received(tag)
        assert "4111 1111 1111 1111" not in seen["body"]  # masked as ever
    finally:
        shared_redis.start(port)
