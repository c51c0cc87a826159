"""What only the Redis store has: its keys and their lifetimes, another process deciding, and Redis going
away and coming back (the contract every store keeps is tests/test_approval_store.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from extproc.approvals.model import Approval, ApprovalError, ApprovalRequest
from extproc.approvals.redis_store import RedisStore
from extproc.approvals.service import ApprovalService
from extproc.approvals.store import StoreUnavailable, open_store
from extproc.settings import ApprovalSettings

from .redis_fixture import RedisServer
from .test_approval_store import ALICE, BOB, new_approval, vote

ROOT = Path(__file__).resolve().parents[1]
HOUR_MS = 3600 * 1000


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client on the same server, to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisStore]:
    opened = open_store(ApprovalSettings(store="redis", redis_url=redis_server.url, key_prefix=prefix))
    assert isinstance(opened, RedisStore)
    yield opened
    await opened.close()


async def subscribed(url: str, channel: str) -> None:
    """Until a client listens on ``channel``, as Redis itself counts them: a store's listener is subscribed
    before any wait reads the approval, so a change published from then on reaches the wait."""
    admin = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        async with asyncio.timeout(10):
            while (await admin.pubsub_numsub(channel))[0][1] < 1:  # noqa: ASYNC110 - Redis is asked
                await asyncio.sleep(0.02)
    finally:
        await admin.aclose()


def near(value: int, expected: float) -> bool:
    """A PTTL read a moment after the write: at most the expected milliseconds (the store's clock ran
    on from the time the expectation counts from), and not seconds less."""
    return expected - 5000 <= value <= expected + 1


async def test_keys_expire_an_hour_after_the_approval_can_last_be_used(
    store: RedisStore, raw: redis.asyncio.Redis, prefix: str
) -> None:
    approval = new_approval(created=time.time() - 300, ttl_seconds=600.0)  # five minutes left
    await store.create(approval)
    key = f"{prefix}{approval.id}"
    assert Approval.from_json(json.loads(await raw.get(key))) == approval
    assert near(await raw.pttl(key), 300_000 + HOUR_MS)  # pending: its ttl from creation, then an hour
    assert await raw.zscore(f"{prefix}pending", approval.id) == approval.request.created

    await store.update(approval.id, vote(BOB))
    assert near(await raw.pttl(key), 600_000 + HOUR_MS)  # approved: the grant's ttl from the decision
    assert await raw.zscore(f"{prefix}pending", approval.id) is None

    await store.update(approval.id, lambda a: a.redeem(ALICE, a.request.body_digest, time.time()))
    assert near(await raw.pttl(key), HOUR_MS)  # closed: kept an hour


async def test_pending_forgets_ids_whose_key_redis_expired(
    store: RedisStore, raw: redis.asyncio.Redis, prefix: str
) -> None:
    kept, forgotten = new_approval(), new_approval()
    await store.create(kept)
    await store.create(forgotten)
    await raw.delete(f"{prefix}{forgotten.id}")  # as the key's expiry would
    assert [a.id for a in await store.pending()] == [kept.id]
    assert await raw.zrange(f"{prefix}pending", 0, -1) == [kept.id]


async def test_changes_are_published_on_the_prefixs_channel(
    store: RedisStore, raw: redis.asyncio.Redis, prefix: str
) -> None:
    pubsub = raw.pubsub()
    await pubsub.subscribe(f"{prefix}changes")
    assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
    approval = new_approval()
    await store.create(approval)
    await store.update(approval.id, vote(BOB))
    published = [await pubsub.get_message(timeout=5) for _ in range(2)]
    await pubsub.aclose()
    states = [Approval.from_json(json.loads(m["data"])) for m in published if m]
    assert [(a.id, a.status) for a in states] == [(approval.id, "pending"), (approval.id, "approved")]


async def test_no_approval_is_called_like_the_pending_set(store: RedisStore) -> None:
    await store.create(new_approval())
    assert await store.get("pending") is None
    with pytest.raises(ApprovalError) as missing:
        await store.update("pending", vote(BOB))
    assert missing.value.code == "approval_not_found"
    with pytest.raises(ValueError, match="pending approvals"):
        await store.create(new_approval(id="pending"))


DECIDE = """
import asyncio, sys, time
from extproc.approvals.model import Person
from extproc.approvals.redis_store import RedisStore

async def main(url: str, prefix: str, approval_id: str) -> None:
    store = RedisStore(url, prefix=prefix)
    try:
        bob = Person("approver-0", "https://idp.example", ("security",))
        decided = await store.update(approval_id, lambda a: a.vote(bob, True, time.time()))
        print(decided.status, flush=True)
    finally:
        await store.close()

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_decision_in_another_process_wakes_the_wait_at_once(
    redis_server: RedisServer, store: RedisStore, prefix: str
) -> None:
    approval = new_approval()
    await store.create(approval)

    async def wait() -> tuple[Approval | None, float]:
        waited = await store.wait(approval.id, 60)
        return waited, time.time()

    waiting = asyncio.create_task(wait())
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DECIDE, redis_server.url, prefix, approval.id,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(other.communicate(), 60)
    assert other.returncode == 0, err.decode()
    assert out.decode().split() == ["approved"]
    woken, woken_at = await asyncio.wait_for(waiting, 5)
    assert woken is not None
    assert woken.status == "approved"
    assert woken.decided_at is not None
    assert woken_at - woken.decided_at < 0.5, f"woke {woken_at - woken.decided_at:.3f} s after the decision"


# -- Redis away and back --------------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, to stop and start again."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def approval_request(**changes: Any) -> ApprovalRequest:
    return new_approval(**changes).request


async def unavailable_fast(step: Awaitable[Any]) -> float:
    started = time.monotonic()
    with pytest.raises(ApprovalError) as refused:
        await step
    assert refused.value.code == "approval_unavailable"
    assert isinstance(refused.value.__cause__, StoreUnavailable)
    return time.monotonic() - started


async def test_service_refuses_while_redis_is_down_and_works_when_it_is_back(own_server: RedisServer) -> None:
    service = ApprovalService(RedisStore(own_server.url, prefix="outage:"))
    try:
        held = await service.request(approval_request())
        waiting = asyncio.create_task(service.wait(held.id, 60))
        watching = asyncio.create_task(anext(aiter(service.watch())))
        await subscribed(own_server.url, "outage:changes")

        own_server.stop()
        assert await unavailable_fast(waiting) < 2.0  # a wait in progress ends, it does not hang
        with pytest.raises(StoreUnavailable):  # so does a watch: the changes meanwhile are lost to it
            await asyncio.wait_for(watching, 2.0)
        digest = hashlib.sha256(b"{}").hexdigest()
        took = [
            await unavailable_fast(service.request(approval_request())),
            await unavailable_fast(service.decide(held.id, BOB, True)),
            await unavailable_fast(service.redeem(held.id, ALICE, digest)),
            await unavailable_fast(service.wait(held.id, 30)),
            await unavailable_fast(service.pending()),
        ]
        assert max(took) < 2.0, took

        own_server.start(own_server.port)  # the same address; nothing was saved, so it starts empty
        again = await service.request(approval_request(body_digest=digest))
        waiting = asyncio.create_task(service.wait(again.id, 60))
        await subscribed(own_server.url, "outage:changes")
        await service.decide(again.id, BOB, True)
        assert (await asyncio.wait_for(waiting, 5)).status == "approved"
        assert (await service.redeem(again.id, ALICE, digest)).status == "used"
    finally:
        await service.store.close()


async def test_a_redis_that_does_not_answer_is_unavailable_after_about_a_second() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        service = ApprovalService(RedisStore(f"redis://127.0.0.1:{port}/0", prefix="silent:"))
        try:
            took = [
                await unavailable_fast(service.request(approval_request())),
                await unavailable_fast(service.wait(uuid.uuid4().hex, 30)),
            ]
        finally:
            await service.store.close()
    assert all(0.5 <= t < 3.0 for t in took), took


async def test_a_broken_subscription_while_redis_stays_up_loses_no_decision(own_server: RedisServer) -> None:
    """The listener's connection is killed while Redis keeps running: a wait still ends with the
    decision made meanwhile (it reads again once subscribed afresh), and a watch, which cannot be given
    what it missed, ends with StoreUnavailable."""
    one = RedisStore(own_server.url, prefix="gap:")
    two = RedisStore(own_server.url, prefix="gap:")
    admin = redis.asyncio.Redis.from_url(own_server.url, decode_responses=True)
    try:
        approval = new_approval()
        await one.create(approval)
        waiting = asyncio.create_task(one.wait(approval.id, 60))
        watching = asyncio.create_task(anext(aiter(one.watch())))
        # Both are blocked on changes by now. Kept as a sleep: Redis shows the listener subscribed, but
        # not whether the watch has joined it yet, and a watch that joins after the kill would not see it.
        await asyncio.sleep(0.2)
        assert await admin.client_kill_filter(_type="pubsub") == 1
        await two.update(approval.id, vote(BOB))
        woken = await asyncio.wait_for(waiting, 5)
        assert woken is not None
        assert woken.status == "approved"
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(watching, 5)
    finally:
        await admin.aclose()
        await one.close()
        await two.close()
