"""Where approvals live. ``ApprovalStore`` is the interface; ``MemoryStore`` serves one replica, and
``extproc.approvals.redis_store.RedisStore`` several (an approval held by one sidecar is decided through
another, and the hold wakes at once).

Every change goes through ``update``: read, apply a pure step of ``model.Approval``, write back only if
nobody changed it meanwhile (compare-and-set on ``revision``), retrying otherwise. ``wait`` returns as
soon as the approval is no longer pending (or at the timeout); ``watch`` yields every approval created
or changed from the moment it is called."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from extproc.approvals.model import Approval, ApprovalError
from extproc.errors import ConfigError
from extproc.settings import ApprovalSettings


class StoreUnavailable(Exception):
    """The store cannot be reached: approval-needing requests are refused (``approval_unavailable``)."""


class ApprovalStore(Protocol):
    async def create(self, approval: Approval) -> None: ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def update(self, approval_id: str, step: Callable[[Approval], Approval]) -> Approval:
        """Applies ``step`` atomically and returns the new state. Raises ApprovalError
        (``approval_not_found``, or what ``step`` raises) and StoreUnavailable."""

    async def pending(self) -> list[Approval]:
        """Every approval still pending, oldest first."""

    async def wait(self, approval_id: str, seconds: float) -> Approval | None:
        """The approval once it is no longer pending, or as it is after ``seconds``."""

    def watch(self) -> AsyncIterator[Approval]:
        """Every approval created or changed from now on, until the consumer stops."""

    async def follow(self) -> AsyncIterator[Approval]:
        """Like ``watch``, but returns only once changes are being kept for the consumer: what is
        created or changed after the call returns is in the iterator (a listing made then misses
        nothing). Raises StoreUnavailable."""

    async def close(self) -> None: ...


def not_found(approval_id: str) -> ApprovalError:
    return ApprovalError(f"no approval {approval_id!r}", code="approval_not_found")


class MemoryStore:
    """Approvals in this process: the default, for one replica. Closed approvals are dropped an hour
    after their last change (``keep_seconds``)."""

    def __init__(self, keep_seconds: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self._items: dict[str, Approval] = {}
        self._changed = asyncio.Condition()
        self._watchers: set[asyncio.Queue[Approval]] = set()
        self._keep = keep_seconds
        self._clock = clock

    async def create(self, approval: Approval) -> None:
        self._prune()
        self._items[approval.id] = approval
        await self._notify(approval)

    async def get(self, approval_id: str) -> Approval | None:
        return self._items.get(approval_id)

    async def update(self, approval_id: str, step: Callable[[Approval], Approval]) -> Approval:
        current = self._items.get(approval_id)
        if current is None:
            raise not_found(approval_id)
        changed = step(current)  # one event loop: nothing else runs between the read and the write
        if changed != current:
            self._items[approval_id] = changed
            await self._notify(changed)
        return changed

    async def pending(self) -> list[Approval]:
        now = self._clock()
        current = (a.current(now) for a in self._items.values())
        return sorted((a for a in current if a.status == "pending"), key=lambda a: a.request.created)

    async def wait(self, approval_id: str, seconds: float) -> Approval | None:
        def settled() -> bool:
            item = self._items.get(approval_id)
            return item is None or item.status != "pending"

        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(settled), seconds)
        return self._items.get(approval_id)

    async def watch(self) -> AsyncIterator[Approval]:
        async for approval in await self.follow():
            yield approval

    async def follow(self) -> AsyncIterator[Approval]:
        queue: asyncio.Queue[Approval] = asyncio.Queue(maxsize=1000)
        self._watchers.add(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[Approval]) -> AsyncIterator[Approval]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    async def close(self) -> None:
        self._watchers.clear()

    async def _notify(self, approval: Approval) -> None:
        async with self._changed:
            self._changed.notify_all()
        for queue in list(self._watchers):
            with contextlib.suppress(asyncio.QueueFull):  # a watcher that stopped reading misses events
                queue.put_nowait(approval)

    def _prune(self) -> None:
        cutoff = self._clock() - self._keep
        for key, item in list(self._items.items()):
            last = item.used_at or item.decided_at or item.request.created
            if item.status in ("denied", "expired", "used") and last < cutoff:
                del self._items[key]


def open_store(settings: ApprovalSettings) -> ApprovalStore:
    """The store ``settings`` choose. The Redis client is imported only for ``store: redis``, so a
    single replica never loads it."""
    if settings.store == "memory":
        return MemoryStore()
    if settings.store == "redis":
        from extproc.approvals.redis_store import RedisStore

        return RedisStore(settings.redis_url, prefix=settings.key_prefix)
    raise ConfigError(f"approvals.store {settings.store!r} is not available")
