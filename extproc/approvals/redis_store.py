"""Approvals in Redis, shared by every replica: a request held by one sidecar is decided through another,
and the hold wakes at once.

Layout, under one prefix (``extproc:approvals:`` by default):

- ``{prefix}{id}``: the approval as JSON (``Approval.to_json``), expiring an hour after it can last be
  used (its ``ttl_seconds`` after creation while pending, after the decision once approved), or an hour
  after it closed, so Redis forgets approvals without a sweeper of its own;
- ``{prefix}pending``: a sorted set of the pending ids, scored by creation time, for ``pending()`` (so
  no approval may be called ``pending``);
- channel ``{prefix}changes``: every created or changed approval's JSON, for ``wait`` and ``watch``.

Every write is one Lua script: it checks the revision the step was applied to (compare-and-set across
processes), writes the JSON, moves the id in or out of the pending set and publishes the change, so no
reader sees one without the others. One pub/sub connection per store feeds every ``wait`` and ``watch``
of the process; it is subscribed before a waiter reads the approval, so a decision made between the
read and the subscription cannot be missed. When that connection breaks, changes may have gone by
unseen: waiters subscribe and read again (and fail if Redis is gone), watches end with
StoreUnavailable, since what they missed cannot be replayed.

Redis unreachable is ``StoreUnavailable``, never a hang: sockets time out after a second, and a timeout
is not retried. A command whose connection turns out closed is sent once more on a new one: a pooled
connection may date from before a Redis restart, and a refused reconnection fails at once. So the store
works again as soon as Redis is back, and a dead Redis costs a request about a second at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final, cast
from urllib.parse import urlsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from extproc.approvals.model import Approval
from extproc.approvals.store import StoreUnavailable, not_found

log = logging.getLogger("extproc.approvals")

SOCKET_SECONDS: Final = 1.0
"""Connect and read time limit: a dead Redis refuses a request needing approval within about a second,
while a live one answers in well under a millisecond."""

HEALTH_SECONDS: Final = 10.0
"""An idle connection is pinged before use after this long, and the change listener pings this often,
so a connection that died silently is found out."""

PENDING: Final = "pending"
"""The pending set's key is the prefix and this word."""

DOWN: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
"""What Redis unreachable raises (OSError includes the builtin TimeoutError)."""

# KEYS: the approval, the pending set. ARGV: the JSON, its time to live (ms), the revision the step read
# ('' on create), the pending score ('' when no longer pending), the id, the channel.
# Returns 1 written, 0 changed meanwhile, -1 gone.
_WRITE: Final = """
if ARGV[3] ~= '' then
  local raw = redis.call('GET', KEYS[1])
  if not raw then return -1 end
  if cjson.decode(raw)['revision'] ~= tonumber(ARGV[3]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
else
  redis.call('ZREM', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[6], ARGV[1])
return 1
"""

_Item = Approval | StoreUnavailable | None  # what a watcher's queue holds: a change, a failure, the end


class RedisStore:
    """``ApprovalStore`` on Redis (``redis://host:port/db``, ``rediss://`` for TLS)."""

    def __init__(
        self,
        url: str,
        prefix: str = "extproc:approvals:",
        keep_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=SOCKET_SECONDS,
            socket_connect_timeout=SOCKET_SECONDS,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            retry_on_error=[redis.exceptions.ConnectionError],  # redis-py 5 retries only what this lists
            health_check_interval=int(HEALTH_SECONDS),
        )
        self._where = _redacted(url)
        self._prefix = prefix
        self._pending_key = f"{prefix}{PENDING}"
        self._channel = f"{prefix}changes"
        self._keep = keep_seconds
        self._clock = clock
        self._write = self._redis.register_script(_WRITE)
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        # a waiter's future: the decided approval, or None when the listener may have missed changes
        self._waiting: dict[str, set[asyncio.Future[Approval | None]]] = {}
        self._watchers: set[asyncio.Queue[_Item]] = set()
        self._closed = False

    async def create(self, approval: Approval) -> None:
        if approval.id == PENDING:
            raise ValueError(f"{PENDING!r} names the set of pending approvals, not an approval")
        with self._reachable():
            await self._store(approval, expected=None)

    async def get(self, approval_id: str) -> Approval | None:
        if approval_id == PENDING:
            return None
        with self._reachable():
            raw = await self._redis.get(self._key(approval_id))
        return None if raw is None else _decode(raw)

    async def update(self, approval_id: str, step: Callable[[Approval], Approval]) -> Approval:
        if approval_id == PENDING:
            raise not_found(approval_id)
        key = self._key(approval_id)
        with self._reachable():
            while True:  # a conflict means another writer succeeded, so this ends
                raw = await self._redis.get(key)
                if raw is None:
                    raise not_found(approval_id)
                current = _decode(raw)
                changed = step(current)  # an ApprovalError goes to the caller as it is
                if changed == current:
                    return current
                written = await self._store(changed, expected=current.revision)
                if written == -1:
                    raise not_found(approval_id)
                if written == 1:
                    return changed

    async def pending(self) -> list[Approval]:
        with self._reachable():
            # the client decodes replies (decode_responses), so these are str, not bytes
            ids = cast(list[str], await self._redis.zrange(self._pending_key, 0, -1))
            if not ids:
                return []
            raws = cast(list[str | None], await self._redis.mget([self._key(i) for i in ids]))
            gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
            if gone:  # expired by Redis while still pending: nobody swept them within the hour
                await self._redis.zrem(self._pending_key, *gone)
        now = self._clock()
        found = (_decode(raw).current(now) for raw in raws if raw is not None)
        return [a for a in found if a.status == "pending"]

    async def wait(self, approval_id: str, seconds: float) -> Approval | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            settled: asyncio.Future[Approval | None] = loop.create_future()
            self._waiting.setdefault(approval_id, set()).add(settled)
            try:
                await self._listening()  # subscribed before the read: a decision after it wakes us
                found = await self.get(approval_id)
                if found is None or found.status != "pending":
                    return found
                try:
                    changed = await asyncio.wait_for(settled, max(0.0, deadline - loop.time()))
                except TimeoutError:
                    return await self.get(approval_id)
                if changed is not None:
                    return changed
                # the listener's connection broke: subscribe again and read what happened meanwhile
            finally:
                waiting = self._waiting.get(approval_id, set())
                waiting.discard(settled)
                if not waiting:
                    self._waiting.pop(approval_id, None)

    async def watch(self) -> AsyncIterator[Approval]:
        async for approval in await self.follow():
            yield approval

    async def follow(self) -> AsyncIterator[Approval]:
        queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=1000)
        self._watchers.add(queue)
        try:
            await self._listening()  # subscribed: every change published from now on reaches the queue
        except BaseException:
            self._watchers.discard(queue)
            raise
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[_Item]) -> AsyncIterator[Approval]:
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, StoreUnavailable):
                    raise item
                yield item
        finally:
            self._watchers.discard(queue)

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        self._gap(StoreUnavailable("the approval store is closed"), end_watches=True)
        with contextlib.suppress(*DOWN):
            await self._redis.aclose()

    # -- writes ---------------------------------------------------------------------------------------

    async def _store(self, approval: Approval, expected: int | None) -> int:
        request = approval.request
        if approval.status == "pending":
            usable_until = request.created + request.ttl_seconds
        elif approval.status == "approved" and approval.decided_at is not None:
            usable_until = approval.decided_at + request.ttl_seconds
        else:  # closed now: nothing writes a closed approval again
            usable_until = self._clock()
        ttl_ms = max(1000, math.ceil((usable_until + self._keep - self._clock()) * 1000))
        score = str(request.created) if approval.status == "pending" else ""
        args: list[str | int] = [
            json.dumps(approval.to_json(), separators=(",", ":")),
            ttl_ms,
            "" if expected is None else expected,
            score,
            approval.id,
            self._channel,
        ]
        written: int = await self._write(keys=[self._key(approval.id), self._pending_key], args=args)
        return written

    def _key(self, approval_id: str) -> str:
        return f"{self._prefix}{approval_id}"

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except DOWN as exc:
            raise StoreUnavailable(f"redis at {self._where}: {exc}") from exc

    # -- changes: one subscription per store, fanned out to waits and watches -------------------------

    async def _listening(self) -> None:
        """Returns once the listener is subscribed (starting it when it is not running, e.g. after Redis
        came back); raises StoreUnavailable when it cannot subscribe."""
        if self._closed:
            raise StoreUnavailable("the approval store is closed")
        if self._subscribed is None:
            self._subscribed = asyncio.get_running_loop().create_future()
            self._subscribed.add_done_callback(_retrieved)
            self._listener = asyncio.create_task(self._listen(self._subscribed), name="approvals-changes")
        # shielded: one caller giving up does not stop the subscription the others wait for
        await asyncio.shield(self._subscribed)

    async def _listen(self, subscribed: asyncio.Future[None]) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            confirmed = await pubsub.get_message(timeout=SOCKET_SECONDS)
            if confirmed is None or confirmed["type"] != "subscribe":
                raise redis.exceptions.TimeoutError(f"no confirmation of SUBSCRIBE {self._channel}")
            subscribed.set_result(None)
            while True:
                message = await pubsub.get_message(timeout=HEALTH_SECONDS)
                if message is None:
                    continue
                if message["type"] == "message":
                    self._dispatch(message["data"])
                elif message["type"] == "subscribe":  # the client reconnected and subscribed again
                    self._gap(StoreUnavailable("the change subscription was interrupted"), end_watches=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, DOWN):
                log.exception("approval_listener_failed")
            failure = StoreUnavailable(f"redis at {self._where}: {exc}")
            if not subscribed.done():
                subscribed.set_exception(failure)
            if self._subscribed is subscribed:  # the next wait or watch subscribes afresh
                self._subscribed = None
            self._gap(failure, end_watches=False)
        finally:
            if not subscribed.done():  # stopped by close() before it was subscribed
                subscribed.set_exception(StoreUnavailable("the approval store is closed"))
            with contextlib.suppress(*DOWN):
                await pubsub.aclose()

    def _dispatch(self, data: str) -> None:
        try:
            approval = _decode(data)
        except (ValueError, KeyError, TypeError):
            log.warning("approval_change_unreadable", extra={"channel": self._channel})
            return
        if approval.status != "pending":
            for settled in self._waiting.get(approval.id, ()):
                if not settled.done():
                    settled.set_result(approval)
        for queue in list(self._watchers):
            with contextlib.suppress(asyncio.QueueFull):  # a watcher that stopped reading misses changes
                queue.put_nowait(approval)

    def _gap(self, failure: StoreUnavailable, end_watches: bool) -> None:
        """Changes may have gone by unseen: every waiter reads again (after subscribing afresh, which
        fails while Redis is away), and every watch ends, with ``failure`` (or normally, when the store
        closes), since a watcher cannot be given what it missed."""
        for waiting in self._waiting.values():
            for settled in waiting:
                if not settled.done():
                    settled.set_result(None)
        for queue in list(self._watchers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None if end_watches else failure)


def _decode(raw: str | bytes) -> Approval:
    data: dict[str, Any] = json.loads(raw)
    return Approval.from_json(data)


def _retrieved(future: asyncio.Future[None]) -> None:
    """Marks a failed subscription's error as seen: the callers that awaited it raised it already."""
    if not future.cancelled():
        future.exception()


def _redacted(url: str) -> str:
    """The URL without its credentials, for error messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
