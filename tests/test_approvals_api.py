"""The approvers' gRPC API through a real channel: who sees what, who decides what, how refusals read,
and Watch. Approvers carry tokens of the dev issuer, verified by the same Verifier as callers'."""

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from extproc.approvals.grpc_api import ApprovalsApi, add_approvals_api
from extproc.approvals.model import Approval, ApprovalRequest, Event, Person
from extproc.approvals.service import ApprovalService
from extproc.approvals.store import MemoryStore, StoreUnavailable
from extproc.approvals.v1 import approvals_pb2 as pb
from extproc.approvals.v1 import rpc
from extproc.identity.dev import DEV_ISSUER, dev_identity, mint_dev_token
from extproc.identity.jwt import Verifier
from extproc.settings import IdentitySettings

PUBLIC_URL = "https://approvals.example"


def ask(
    requester: str = "alice",
    groups: tuple[str, ...] = ("engineering",),
    approver_groups: tuple[str, ...] = ("approvers",),
    **fields: Any,
) -> ApprovalRequest:
    """An approval request as the exchange makes one: a masked prompt and the rules that asked."""
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "created": time.time(),
        "requester": Person(requester, DEV_ISSUER, groups),
        "route": "/v1/chat/completions",
        "model": "demo-small",
        "prompt": "refund card **** **** **** 1111",
        "rule_ids": ("credit-card",),
        "body_digest": "ab" * 32,
        "policy_id": "payments",
        "approver_groups": approver_groups,
        "decision_id": uuid.uuid4().hex,
    }
    values.update(fields)
    return ApprovalRequest(**values)


@dataclass
class Api:
    service: ApprovalService
    servicer: ApprovalsApi
    stub: Any
    folder: Path
    events: list[Event]

    def token(self, subject: str, *groups: str, ttl: int = 600) -> tuple[tuple[str, str], ...]:
        """The metadata of a call made by ``subject`` in ``groups``."""
        return (("authorization", f"Bearer {mint_dev_token(self.folder, subject, list(groups), ttl)}"),)


@contextlib.asynccontextmanager
async def serving(
    service: ApprovalService, verifier: Verifier | None
) -> AsyncIterator[tuple[ApprovalsApi, Any]]:
    """The API alone on a grpc.aio server on a free port, and a stub on a channel to it."""
    server = grpc.aio.server()
    servicer = add_approvals_api(server, service, lambda: verifier)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, rpc.ApprovalsStub(channel)
    finally:
        servicer.close()
        await server.stop(0)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    verifier = Verifier(IdentitySettings.model_validate(dev_identity(tmp_path)))
    await verifier.start()
    events: list[Event] = []
    service = ApprovalService(MemoryStore(), listeners=[events.append], public_url=PUBLIC_URL)
    try:
        async with serving(service, verifier) as (servicer, stub):
            yield Api(service, servicer, stub, tmp_path, events)
    finally:
        await verifier.close()


async def refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call()
    return failure.value.code(), failure.value.details() or ""


# -- seeing --------------------------------------------------------------------------------------------


async def test_list_shows_the_pending_approvals_of_the_callers_approver_groups_only(api: Api) -> None:
    theirs = await api.service.request(ask())
    elsewhere = await api.service.request(ask(approver_groups=("legal",)))
    own = await api.service.request(ask(requester="bob", groups=("approvers",)))
    answer = await api.stub.ListPending(pb.ListPendingRequest(), metadata=api.token("bob", "approvers"))
    listed = {a.request.id: a for a in answer.approvals}
    assert list(listed) == [theirs.id, own.id]  # oldest first; another group's approval is not shown
    assert elsewhere.id not in listed
    assert listed[theirs.id].decidable
    assert not listed[own.id].decidable  # their own request: shown, not theirs to decide


async def test_get_mirrors_the_approval_and_links_its_page(api: Api) -> None:
    approval = await api.service.request(ask(min_approvals=2, mode="hold", ttl_seconds=120.0))
    got = await api.stub.Get(pb.GetRequest(id=approval.id), metadata=api.token("bob", "approvers"))
    request = got.request
    assert request.id == approval.id
    assert (request.requester.subject, request.requester.issuer) == ("alice", DEV_ISSUER)
    assert list(request.requester.groups) == ["engineering"]
    assert (request.route, request.model, request.policy_id) == (
        "/v1/chat/completions",
        "demo-small",
        "payments",
    )
    assert request.prompt == "refund card **** **** **** 1111"
    assert list(request.rule_ids) == ["credit-card"]
    assert list(request.approver_groups) == ["approvers"]
    assert (request.min_approvals, request.mode, request.ttl_seconds) == (2, pb.MODE_HOLD, 120.0)
    assert request.body_digest == "ab" * 32
    assert request.decision_id == approval.request.decision_id
    assert abs(request.created.ToNanoseconds() / 1e9 - approval.request.created) < 1e-6
    assert got.status == pb.STATUS_PENDING
    assert not got.HasField("decided_at")
    assert got.approve_url == f"{PUBLIC_URL}/approvals/{approval.id}"
    assert got.decidable


async def test_an_approval_without_a_model_has_none(api: Api) -> None:
    approval = await api.service.request(ask(model=None))
    got = await api.stub.Get(pb.GetRequest(id=approval.id), metadata=api.token("bob", "approvers"))
    assert not got.request.HasField("model")


async def test_get_refuses_people_outside_the_approver_groups_and_unknown_ids(api: Api) -> None:
    approval = await api.service.request(ask())
    status, details = await refused(
        lambda: api.stub.Get(pb.GetRequest(id=approval.id), metadata=api.token("mallory", "engineering"))
    )
    assert status == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("approval_not_approver: ")
    status, details = await refused(
        lambda: api.stub.Get(pb.GetRequest(id="no-such-id"), metadata=api.token("bob", "approvers"))
    )
    assert status == grpc.StatusCode.NOT_FOUND
    assert details.startswith("approval_not_found: ")


# -- deciding ------------------------------------------------------------------------------------------


async def test_an_approver_approves_through_the_service(api: Api) -> None:
    approval = await api.service.request(ask())
    decided = await api.stub.Approve(
        pb.ApproveRequest(id=approval.id, reason="known customer"), metadata=api.token("bob", "approvers")
    )
    assert decided.status == pb.STATUS_APPROVED
    assert decided.HasField("decided_at")
    [vote] = decided.votes
    assert (vote.approver.subject, vote.approve, vote.reason) == ("bob", True, "known customer")
    assert not decided.decidable  # decided: nobody votes any more
    assert (await api.service.get(approval.id)).status == "approved"
    assert [e.kind for e in api.events] == ["requested", "voted", "approved"]  # the listeners saw it


async def test_a_denial_with_its_reason_closes_the_approval(api: Api) -> None:
    approval = await api.service.request(ask())
    denied = await api.stub.Deny(
        pb.DenyRequest(id=approval.id, reason="not for this customer"), metadata=api.token("bob", "approvers")
    )
    assert denied.status == pb.STATUS_DENIED
    assert denied.reason == "not for this customer"
    status, details = await refused(
        lambda: api.stub.Approve(pb.ApproveRequest(id=approval.id), metadata=api.token("carol", "approvers"))
    )
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("approval_closed: ")


async def test_nobody_approves_their_own_request(api: Api) -> None:
    approval = await api.service.request(ask(requester="bob", groups=("approvers",)))
    status, details = await refused(
        lambda: api.stub.Approve(pb.ApproveRequest(id=approval.id), metadata=api.token("bob", "approvers"))
    )
    assert status == grpc.StatusCode.PERMISSION_DENIED
    assert details == "approval_self: nobody approves their own request"
    assert (await api.service.get(approval.id)).votes == ()


async def test_only_members_of_an_approver_group_decide(api: Api) -> None:
    approval = await api.service.request(ask())
    mallory = api.token("mallory", "engineering")
    for call in (
        lambda: api.stub.Approve(pb.ApproveRequest(id=approval.id), metadata=mallory),
        lambda: api.stub.Deny(pb.DenyRequest(id=approval.id, reason="no"), metadata=mallory),
    ):
        status, details = await refused(call)
        assert status == grpc.StatusCode.PERMISSION_DENIED
        assert details.startswith("approval_not_approver: ")
    assert (await api.service.get(approval.id)).status == "pending"


async def test_two_approvals_need_two_different_approvers(api: Api) -> None:
    approval = await api.service.request(ask(min_approvals=2))
    first = await api.stub.Approve(pb.ApproveRequest(id=approval.id), metadata=api.token("bob", "approvers"))
    assert first.status == pb.STATUS_PENDING
    assert not first.decidable  # bob has voted
    status, details = await refused(
        lambda: api.stub.Approve(pb.ApproveRequest(id=approval.id), metadata=api.token("bob", "approvers"))
    )
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert details.startswith("approval_already_voted: ")
    second = await api.stub.Approve(
        pb.ApproveRequest(id=approval.id), metadata=api.token("carol", "approvers")
    )
    assert second.status == pb.STATUS_APPROVED
    assert [v.approver.subject for v in second.votes] == ["bob", "carol"]


# -- tokens --------------------------------------------------------------------------------------------


async def test_every_call_needs_a_valid_token_of_its_own(api: Api, tmp_path: Path) -> None:
    approval = await api.service.request(ask())
    other_key = tmp_path / "other-key"  # the same issuer's name, a key the sidecar does not trust
    forged = mint_dev_token(other_key, "bob", ["approvers"], 600)
    cases = {
        "jwt_missing": (),
        "jwt_malformed": (("authorization", "Bearer not-a-token"),),
        "jwt_expired": api.token("bob", "approvers", ttl=-600),
        "jwt_key_unknown": (("authorization", f"Bearer {forged}"),),
    }
    for code, metadata in cases.items():
        calls: list[Callable[[], Any]] = [
            lambda m=metadata: api.stub.ListPending(pb.ListPendingRequest(), metadata=m),
            lambda m=metadata: api.stub.Get(pb.GetRequest(id=approval.id), metadata=m),
            lambda m=metadata: api.stub.Approve(pb.ApproveRequest(id=approval.id), metadata=m),
            lambda m=metadata: api.stub.Deny(pb.DenyRequest(id=approval.id, reason="x"), metadata=m),
            lambda m=metadata: api.stub.Watch(pb.WatchRequest(), metadata=m).read(),
        ]
        for call in calls:
            status, details = await refused(call)
            assert status == grpc.StatusCode.UNAUTHENTICATED, (code, details)
            assert details.startswith(f"{code}: "), details
    assert (await api.service.get(approval.id)).votes == ()


async def test_without_a_verifier_every_call_is_unauthenticated(tmp_path: Path) -> None:
    """identity.mode none or envoy: the sidecar verifies no tokens, so it cannot tell who approves."""
    service = ApprovalService(MemoryStore())
    approval = await service.request(ask())
    token = mint_dev_token(tmp_path, "bob", ["approvers"], 600)
    async with serving(service, None) as (_, stub):
        status, details = await refused(
            lambda: stub.Approve(
                pb.ApproveRequest(id=approval.id), metadata=(("authorization", f"Bearer {token}"),)
            )
        )
        assert status == grpc.StatusCode.UNAUTHENTICATED
        assert details.startswith("jwt_issuer_unknown: approvers are authenticated with identity.mode jwt")


class _UnreachableStore(MemoryStore):
    """A store whose backend is down: what Redis does when it cannot be reached."""

    async def pending(self) -> list[Approval]:
        raise StoreUnavailable("connection refused")

    async def get(self, approval_id: str) -> Approval | None:
        raise StoreUnavailable("connection refused")


async def test_an_unreachable_store_is_unavailable(api: Api, tmp_path: Path) -> None:
    verifier = Verifier(IdentitySettings.model_validate(dev_identity(tmp_path)))
    await verifier.start()
    try:
        async with serving(ApprovalService(_UnreachableStore()), verifier) as (_, stub):
            for call in (
                lambda: stub.ListPending(pb.ListPendingRequest(), metadata=api.token("bob", "approvers")),
                lambda: stub.Get(pb.GetRequest(id="x"), metadata=api.token("bob", "approvers")),
                lambda: stub.Watch(pb.WatchRequest(), metadata=api.token("bob", "approvers")).read(),
            ):
                status, details = await refused(call)
                assert status == grpc.StatusCode.UNAVAILABLE
                assert details.startswith("approval_unavailable: "), details
    finally:
        await verifier.close()


# -- watching ------------------------------------------------------------------------------------------


async def test_watch_sends_the_pending_approvals_then_every_change_the_caller_may_see(api: Api) -> None:
    before = await api.service.request(ask())
    call = api.stub.Watch(pb.WatchRequest(), metadata=api.token("bob", "approvers"))
    first = await asyncio.wait_for(call.read(), 10)
    assert (first.request.id, first.status) == (before.id, pb.STATUS_PENDING)
    await api.service.request(ask(approver_groups=("legal",)))  # not bob's to see
    created = await api.service.request(ask())
    seen = await asyncio.wait_for(call.read(), 10)
    assert (seen.request.id, seen.status, seen.decidable) == (created.id, pb.STATUS_PENDING, True)
    await api.stub.Approve(pb.ApproveRequest(id=created.id), metadata=api.token("carol", "approvers"))
    changed = await asyncio.wait_for(call.read(), 10)
    assert (changed.request.id, changed.status) == (created.id, pb.STATUS_APPROVED)
    call.cancel()


class _BusyStore(MemoryStore):
    """An approval is created while the first listing is being read: after Watch began following the
    store, before the listing returns."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: list[Approval] = []

    async def pending(self) -> list[Approval]:
        if not self.meanwhile:
            self.meanwhile.append(Approval(ask()))
            await self.create(self.meanwhile[0])
        return await super().pending()


async def test_watch_sends_once_what_was_created_while_it_listed(api: Api) -> None:
    store = _BusyStore()
    service = ApprovalService(store)
    verifier = Verifier(IdentitySettings.model_validate(dev_identity(api.folder)))
    await verifier.start()
    try:
        async with serving(service, verifier) as (_, stub):
            call = stub.Watch(pb.WatchRequest(), metadata=api.token("bob", "approvers"))
            listed = await asyncio.wait_for(call.read(), 10)
            [created] = store.meanwhile
            assert listed.request.id == created.id
            denied = await service.decide(
                created.id, Person("carol", DEV_ISSUER, ("approvers",)), False, "no"
            )
            changed = await asyncio.wait_for(call.read(), 10)  # not the creation again: the denial
            assert (changed.request.id, changed.status, changed.revision) == (
                created.id,
                pb.STATUS_DENIED,
                denied.revision,
            )
            call.cancel()
    finally:
        await verifier.close()


async def test_watch_streams_end_when_the_api_closes(api: Api) -> None:
    pending = await api.service.request(ask())
    call = api.stub.Watch(pb.WatchRequest(), metadata=api.token("bob", "approvers"))
    # The pending approval listed: the stream is open, and follows the store (it does before listing).
    assert (await asyncio.wait_for(call.read(), 10)).request.id == pending.id
    api.servicer.close()
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
