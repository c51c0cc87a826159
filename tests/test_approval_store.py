"""One contract for every approval store (extproc/approvals/store.py), run against each: the in-memory
store and the Redis store on a real redis-server. Each test gets two handles on one store: for memory
the same object twice (one replica), for Redis two RedisStore instances with their own connections on
the same server, as two replicas would have, so what one writes the other must see and wake on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from extproc.approvals.model import Approval, ApprovalError, ApprovalRequest, Person
from extproc.approvals.redis_store import RedisStore
from extproc.approvals.store import ApprovalStore, MemoryStore

from .redis_fixture import RedisServer

ALICE = Person("alice", "https://idp.example", ("engineering",))
APPROVERS = [Person(f"approver-{i}", "https://idp.example", ("security",)) for i in range(6)]
BOB, CAROL = APPROVERS[:2]

Pair = tuple[ApprovalStore, ApprovalStore]


def new_approval(**changes: Any) -> Approval:
    request = ApprovalRequest(
        id=uuid.uuid4().hex,
        created=time.time(),
        requester=ALICE,
        route="/v1/chat/completions",
        model="demo-small",
        prompt="deploy to [MASKED:hostname]",
        rule_ids=("internal-hostname",),
        body_digest="ab" * 32,
        policy_id="default",
        approver_groups=("security",),
        ttl_seconds=600.0,
    )
    return Approval(dataclasses.replace(request, **changes))


def vote(approver: Person, approve: bool = True) -> Callable[[Approval], Approval]:
    now = time.time()
    return lambda a: a.vote(approver, approve, now)


# The Redis pair starts redis-server (the session's, through getfixturevalue: a name the marker rule cannot
# follow), so its tests are marked process here.
@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.process)])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    if request.param == "memory":
        memory = MemoryStore()
        yield memory, memory
        await memory.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex}:"  # one server for the session, keys of one test only
    one, two = RedisStore(server.url, prefix=prefix), RedisStore(server.url, prefix=prefix)
    yield one, two
    await one.close()
    await two.close()


async def test_create_get_and_update(stores: Pair) -> None:
    one, two = stores
    approval = new_approval(min_approvals=2)
    await one.create(approval)
    assert await two.get(approval.id) == approval
    assert await two.get(uuid.uuid4().hex) is None

    first = await two.update(approval.id, vote(BOB))
    assert (first.status, first.revision) == ("pending", 1)
    assert await one.get(approval.id) == first
    second = await one.update(approval.id, vote(CAROL))
    assert (second.status, second.revision, len(second.votes)) == ("approved", 2, 2)
    assert await two.get(approval.id) == second

    assert await two.update(approval.id, lambda a: a) == second  # a step that changes nothing


async def test_update_passes_the_steps_refusal_on_and_writes_nothing(stores: Pair) -> None:
    one, two = stores
    approval = new_approval()
    await one.create(approval)
    refusal = ApprovalError("no", code="approval_self")

    def refuse(_: Approval) -> Approval:
        raise refusal

    with pytest.raises(ApprovalError) as raised:
        await two.update(approval.id, refuse)
    assert raised.value is refusal
    with pytest.raises(ApprovalError) as own:
        await two.update(approval.id, vote(ALICE))  # a refusal of the rules themselves
    assert own.value.code == "approval_self"
    assert await one.get(approval.id) == approval


async def test_update_of_a_missing_approval_is_not_found(stores: Pair) -> None:
    with pytest.raises(ApprovalError) as missing:
        await stores[0].update("no-such-approval", vote(BOB))
    assert missing.value.code == "approval_not_found"


async def test_concurrent_votes_through_two_stores_all_count(stores: Pair) -> None:
    """Every approver votes at once, half through each store: each vote reads the same revision, so all
    but one write must notice the conflict and apply their vote again on the newer state."""
    one, two = stores
    approval = new_approval(min_approvals=len(APPROVERS))
    await one.create(approval)
    handles = [one, two] * (len(APPROVERS) // 2)
    results = await asyncio.gather(
        *(store.update(approval.id, vote(person)) for store, person in zip(handles, APPROVERS, strict=True))
    )
    final = await one.get(approval.id)
    assert final is not None
    assert final.status == "approved"
    assert {v.approver for v in final.votes} == set(APPROVERS)
    assert final.revision == len(APPROVERS)
    assert sorted(r.revision for r in results) == list(range(1, len(APPROVERS) + 1))


async def test_two_approvers_at_once_approve_with_both_votes(stores: Pair) -> None:
    one, two = stores
    approval = new_approval(min_approvals=2)
    await one.create(approval)
    await asyncio.gather(one.update(approval.id, vote(BOB)), two.update(approval.id, vote(CAROL)))
    final = await two.get(approval.id)
    assert final is not None
    assert (final.status, {v.approver for v in final.votes}) == ("approved", {BOB, CAROL})


async def test_pending_is_oldest_first_and_only_what_is_still_pending(stores: Pair) -> None:
    one, two = stores
    now = time.time()
    newest, oldest, middle = (new_approval(created=now - age) for age in (10, 30, 20))
    past_ttl = new_approval(created=now - 120, ttl_seconds=60)  # expired, though nobody marked it
    decided = new_approval(created=now - 40)
    for approval in (newest, oldest, middle, past_ttl, decided):
        await one.create(approval)
    await two.update(decided.id, vote(BOB, approve=False))

    assert [a.id for a in await two.pending()] == [oldest.id, middle.id, newest.id]
    await one.update(middle.id, vote(BOB))
    assert [a.id for a in await two.pending()] == [oldest.id, newest.id]
    assert [a.id for a in await one.pending()] == [oldest.id, newest.id]


async def test_wait_wakes_when_another_store_decides(stores: Pair) -> None:
    one, two = stores
    approval = new_approval()
    await one.create(approval)
    waiting = asyncio.create_task(one.wait(approval.id, 30))
    await asyncio.sleep(0.2)  # the wait is blocked on the change by now
    assert not waiting.done()
    decided_at = time.monotonic()
    await two.update(approval.id, vote(BOB))
    woken = await asyncio.wait_for(waiting, 5)
    latency = time.monotonic() - decided_at
    assert woken is not None
    assert (woken.status, woken.revision) == ("approved", 1)
    assert latency < 1.0, f"woke {latency:.3f} s after the decision"


async def test_wait_returns_at_once_for_a_decided_or_missing_approval(stores: Pair) -> None:
    one, two = stores
    approval = new_approval()
    await one.create(approval)
    denied = await one.update(approval.id, vote(BOB, approve=False))
    started = time.monotonic()
    assert await two.wait(approval.id, 30) == denied
    assert await two.wait(uuid.uuid4().hex, 30) is None
    assert time.monotonic() - started < 1.0


async def test_wait_times_out_with_the_pending_state(stores: Pair) -> None:
    one, two = stores
    approval = new_approval(min_approvals=2)
    await one.create(approval)
    voted = await two.update(approval.id, vote(BOB))  # still pending: a vote that does not decide
    started = time.monotonic()
    waited = await one.wait(approval.id, 0.3)
    elapsed = time.monotonic() - started
    assert waited == voted
    assert 0.3 <= elapsed < 2.0


@contextlib.asynccontextmanager
async def live_watch(store: ApprovalStore, writer: ApprovalStore) -> AsyncIterator[asyncio.Queue[Approval]]:
    """A watch on ``store`` that is known to receive changes: a probe approval is written through
    ``writer`` until the watch yields it (subscribing takes a round trip for Redis). Probes are not
    passed on."""
    seen: asyncio.Queue[Approval] = asyncio.Queue()
    probe = new_approval()

    async def consume() -> None:
        async for approval in store.watch():
            if approval.id != probe.id:
                seen.put_nowait(approval)
            elif not live.done():
                live.set_result(None)

    live: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    consumer = asyncio.create_task(consume())
    try:
        while not live.done():
            await writer.create(probe)
            await asyncio.wait([live, consumer], timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()  # the watch failed: say why
        yield seen
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)


async def test_watch_yields_creates_and_changes_from_any_store(stores: Pair) -> None:
    one, two = stores
    async with live_watch(one, two) as seen:
        approval = new_approval(min_approvals=2)
        await two.create(approval)
        await one.update(approval.id, vote(BOB))
        await two.update(approval.id, vote(CAROL))
        got = [await asyncio.wait_for(seen.get(), 5) for _ in range(3)]
    assert [(a.id, a.status, a.revision) for a in got] == [
        (approval.id, "pending", 0),
        (approval.id, "pending", 1),
        (approval.id, "approved", 2),
    ]


async def test_follow_returns_once_every_later_change_is_kept(stores: Pair) -> None:
    """What a listing made after ``follow`` returns could miss is in the iterator: a change made through
    another store right after the call is delivered, with no probe and no wait for a round trip."""
    one, two = stores
    updates = await one.follow()
    approval = new_approval()
    await two.create(approval)
    delivered = await asyncio.wait_for(anext(updates), 5)
    assert delivered.id == approval.id
    await two.update(approval.id, vote(Person("bob", "https://issuer.test", ("security",))))
    assert (await asyncio.wait_for(anext(updates), 5)).status == "approved"
    await updates.aclose()  # type: ignore[attr-defined]
