"""The rules of an approval (extproc/approvals/model.py), stated without a store or a clock: every store
applies these same steps, so they are checked once here."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from extproc.approvals.model import Approval, ApprovalError, ApprovalRequest, Person

T0 = 1_800_000_000.0
ALICE = Person("alice", "https://idp.example", ("engineering",))  # asks
BOB = Person("bob", "https://idp.example", ("security",))
CAROL = Person("carol", "https://idp.example", ("security", "legal"))
DAVE = Person("dave", "https://idp.example", ("legal",))
MALLORY = Person("mallory", "https://idp.example", ("engineering",))  # in no approver group
DIGEST = "ab" * 32


def request(**changes: Any) -> ApprovalRequest:
    base = ApprovalRequest(
        id="a1",
        created=T0,
        requester=ALICE,
        route="/v1/chat/completions",
        model="demo-small",
        prompt="deploy to [MASKED:hostname]",
        rule_ids=("internal-hostname",),
        body_digest=DIGEST,
        policy_id="default",
        approver_groups=("security", "legal"),
        ttl_seconds=600.0,
    )
    return dataclasses.replace(base, **changes)


def code_of(exc: pytest.ExceptionInfo[ApprovalError]) -> str:
    return str(exc.value.code)


def test_one_approval_approves_by_default() -> None:
    approved = Approval(request()).vote(BOB, True, T0 + 5, "looks fine")
    assert approved.status == "approved"
    assert approved.decided_at == T0 + 5
    assert [(v.approver, v.approve, v.reason) for v in approved.votes] == [(BOB, True, "looks fine")]
    assert approved.revision == 1


def test_nobody_approves_their_own_request() -> None:
    own = dataclasses.replace(ALICE, groups=("security",))  # even as a member of an approver group
    with pytest.raises(ApprovalError) as refused:
        Approval(request()).vote(own, True, T0 + 1)
    assert code_of(refused) == "approval_self"


def test_the_same_subject_of_another_issuer_is_someone_else() -> None:
    other = Person("alice", "https://other-idp.example", ("security",))
    assert Approval(request()).vote(other, True, T0 + 1).status == "approved"


def test_only_approver_groups_vote() -> None:
    with pytest.raises(ApprovalError) as refused:
        Approval(request()).vote(MALLORY, True, T0 + 1)
    assert code_of(refused) == "approval_not_approver"


def test_one_vote_per_approver() -> None:
    first = Approval(request(min_approvals=2)).vote(BOB, True, T0 + 1)
    assert first.status == "pending"
    with pytest.raises(ApprovalError) as refused:
        first.vote(BOB, True, T0 + 2)
    assert code_of(refused) == "approval_already_voted"
    # the same approver with a different set of groups is still the same approver
    with pytest.raises(ApprovalError):
        first.vote(dataclasses.replace(BOB, groups=("legal",)), True, T0 + 2)


def test_min_approvals_counts_distinct_approvers() -> None:
    waiting = Approval(request(min_approvals=2)).vote(BOB, True, T0 + 1)
    assert (waiting.status, waiting.decided_at) == ("pending", None)
    approved = waiting.vote(CAROL, True, T0 + 2)
    assert (approved.status, approved.decided_at) == ("approved", T0 + 2)
    assert [v.approver.subject for v in approved.votes] == ["bob", "carol"]


def test_require_all_groups_waits_for_a_member_of_every_group() -> None:
    approval = Approval(request(require_all_groups=True, min_approvals=2))
    two_security = approval.vote(BOB, True, T0 + 1).vote(
        Person("erin", "https://idp.example", ("security",)), True, T0 + 2
    )
    assert two_security.status == "pending"  # two approvals, but nobody from legal
    assert two_security.vote(DAVE, True, T0 + 3).status == "approved"
    # one member of both groups covers both, once min_approvals is met
    assert approval.vote(CAROL, True, T0 + 1).vote(BOB, True, T0 + 2).status == "approved"


def test_one_deny_closes_it() -> None:
    approval = Approval(request(min_approvals=2)).vote(BOB, True, T0 + 1)
    denied = approval.vote(CAROL, False, T0 + 2, "not this host")
    assert (denied.status, denied.reason, denied.decided_at) == ("denied", "not this host", T0 + 2)
    with pytest.raises(ApprovalError) as refused:
        denied.vote(DAVE, True, T0 + 3)
    assert code_of(refused) == "approval_closed"
    with pytest.raises(ApprovalError) as redeemed:
        denied.redeem(ALICE, DIGEST, T0 + 3)
    assert code_of(redeemed) == "approval_denied"


def test_a_pending_approval_expires_after_its_ttl() -> None:
    approval = Approval(request())
    assert approval.current(T0 + 599.9) is approval
    expired = approval.current(T0 + 600)
    assert (expired.status, expired.decided_at, expired.revision) == ("expired", T0 + 600, 1)
    with pytest.raises(ApprovalError) as refused:
        approval.vote(BOB, True, T0 + 601)
    assert code_of(refused) == "approval_closed"
    with pytest.raises(ApprovalError) as redeemed:
        approval.redeem(ALICE, DIGEST, T0 + 601)
    assert code_of(redeemed) == "approval_expired"


def test_a_pending_approval_is_not_redeemable() -> None:
    with pytest.raises(ApprovalError) as refused:
        Approval(request()).redeem(ALICE, DIGEST, T0 + 1)
    assert code_of(refused) == "approval_pending"


def test_a_grant_is_used_once() -> None:
    approved = Approval(request()).vote(BOB, True, T0 + 10)
    used = approved.redeem(ALICE, DIGEST, T0 + 20)
    assert (used.status, used.used_at, used.revision) == ("used", T0 + 20, 2)
    with pytest.raises(ApprovalError) as again:
        used.redeem(ALICE, DIGEST, T0 + 21)
    assert code_of(again) == "approval_used"


def test_a_grant_is_bound_to_the_requester_and_the_body() -> None:
    approved = Approval(request()).vote(BOB, True, T0 + 10)
    for caller, digest in [
        (MALLORY, DIGEST),  # someone else
        (Person("alice", "https://other-idp.example"), DIGEST),  # the same name from another issuer
        (ALICE, "cd" * 32),  # another body
    ]:
        with pytest.raises(ApprovalError) as refused:
            approved.redeem(caller, digest, T0 + 20)
        assert code_of(refused) == "approval_mismatch"
    # groups are not part of who the requester is: a token with other groups still redeems
    assert approved.redeem(dataclasses.replace(ALICE, groups=()), DIGEST, T0 + 20).status == "used"


def test_a_grant_expires_ttl_after_the_decision() -> None:
    approved = Approval(request()).vote(BOB, True, T0 + 500)  # decided near the end of the pending ttl
    assert approved.current(T0 + 1099).status == "approved"  # the grant's ttl runs from the decision
    assert approved.redeem(ALICE, DIGEST, T0 + 1099).status == "used"
    expired = approved.current(T0 + 1100)
    assert (expired.status, expired.reason) == ("expired", "the grant was not used in time")
    with pytest.raises(ApprovalError) as refused:
        approved.redeem(ALICE, DIGEST, T0 + 1100)
    assert code_of(refused) == "approval_expired"


def test_json_round_trip_keeps_every_field() -> None:
    approval = (
        Approval(request(min_approvals=2, require_all_groups=True, mode="hold", decision_id="d-1"))
        .vote(BOB, True, T0 + 1, "ok")
        .vote(CAROL, True, T0 + 2)
        .redeem(ALICE, DIGEST, T0 + 3)
    )
    text = json.dumps(approval.to_json())
    assert Approval.from_json(json.loads(text)) == approval
    denied = Approval(request(model=None)).vote(DAVE, False, T0 + 4, "no")
    assert Approval.from_json(json.loads(json.dumps(denied.to_json()))) == denied
