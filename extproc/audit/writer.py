"""The session record's writer: one thread appends hash-chained records to a JSON Lines file.

Callers never wait on the disk: ``submit`` only puts a record (or a function that builds one, so that
building and sealing also happen off the event loop) on a bounded queue, and a full queue loses the record
rather than block. The thread writes what is queued in batches, one ``write`` and one ``fsync`` per batch,
and signs a checkpoint every ``checkpoint_every`` records or ``checkpoint_seconds``. A record waits up to
``linger_seconds`` for others to share its batch (a group commit): a thread woken for every record, as
every exchange ends, took the interpreter from the event loop once per exchange and paid an ``fsync``
for each record. A full batch, a flush, a loss to report and ``close`` wake it at once.

A write that fails (a full disk, an I/O error) does not stop the writer: the records that did not reach the
file are counted as lost, the writer reports itself unhealthy, and it retries every ``retry_seconds``. A
retry first reads back what is really on disk (a failed write may have left part of a line), continues the
chain from there, and writes a ``gap`` record saying how many records were lost and why: the file then says
where it is incomplete instead of hiding it. If what it reads back is not what it last wrote (beyond its
own cut-off write), someone else wrote to the file meanwhile: the writer then begins a new run with a
``start`` record, so that its next checkpoint does not vouch for what it found (a checkpoint covers only its
own run).

The file written is always the one at ``path``: before each batch the writer checks that the file it has
open is still there. One removed, or renamed away (log rotation), would otherwise take every later record
with it; the writer opens the path again (creating it) and begins a new run there, whose ``start`` record
names the last record written to the file before (``replaces``: its ``seq`` and ``hash``). A path that
cannot be opened again (a read-only folder, a full disk) is a failed write like any other.

A writer that continues a file says so in its ``start`` record (``resumed``: the ``seq`` and ``hash`` of the
last record it found) and in the ``audit_resumed`` log: with the ``audit_checkpoint`` logs, anchors outside
the file against which an edit made while no writer ran shows up. The checkpoint written at ``close`` is
``final``: a record appended after it, while no writer runs, is a break in ``verify``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from extproc.audit.record import Chain, Tail, canonical, read_tail_fd
from extproc.errors import ConfigError

log = logging.getLogger("extproc.audit")

Entry = Mapping[str, Any] | Callable[[], Mapping[str, Any]]
"""What ``submit`` takes: a record body, or a function the writer's thread calls to build one. A function
may carry the id of the record it builds as a str attribute ``record_id``, so that a gap record can name
that record when it is lost."""

_LOG_INTERVAL: Final = 1.0
LINGER_SECONDS: Final = 0.05
_MAX_WAIT: Final = 3600.0


def iso_time(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-01-02T03:04:05.678Z``."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _WriteFailed(Exception):
    def __init__(self, written: int, error: OSError, reason: str) -> None:
        super().__init__(reason)
        self.written = written
        self.error = error
        self.reason = reason


class _Throttle:
    """At most one log line per interval; the next one says how many were held back."""

    def __init__(self) -> None:
        self._last = float("-inf")
        self._suppressed = 0

    def allow(self) -> int | None:
        """None to stay quiet, else the number of lines suppressed since the last one."""
        now = time.monotonic()
        if now - self._last < _LOG_INTERVAL:
            self._suppressed += 1
            return None
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


class _Gap:
    """Records lost since the last ``gap`` record that reached the file, and why."""

    __slots__ = ("first_id", "lost", "pending", "reasons")

    def __init__(self) -> None:
        self.lost = 0
        self.first_id: str | None = None
        self.reasons: list[str] = []
        self.pending = False

    def clear(self) -> None:
        self.lost = 0
        self.first_id = None
        self.reasons = []
        self.pending = False

    def add(self, count: int, first_id: str | None, *reasons: str) -> None:
        """Losses that happened after those already counted (``first_id`` is kept from the earliest)."""
        if self.lost == 0 and count:
            self.first_id = first_id
        self.lost += count
        self.reasons.extend(r for r in reasons if r not in self.reasons)
        self.pending = True

    def take(self) -> _Gap:
        """This gap's content, leaving it empty: a gap record is about to report it."""
        taken = _Gap()
        taken.add(self.lost, self.first_id, *self.reasons)
        self.clear()
        return taken

    def body(self, time_: str) -> dict[str, Any]:
        return {
            "type": "gap",
            "time": time_,
            "lost": self.lost,
            "first_lost_id": self.first_id,
            "reason": "; ".join(self.reasons) or "unknown",
        }


class _Line:
    """One record of a batch, encoded, and what reaching the file (or not) means for it."""

    __slots__ = ("data", "done", "gap", "kind", "record", "record_id")

    def __init__(self, kind: str, record: dict[str, Any], gap: _Gap | None = None) -> None:
        self.kind = kind
        self.record = record
        self.data = canonical(record) + b"\n"
        self.gap = gap
        self.done = False
        rid = record.get("id")
        self.record_id = rid if isinstance(rid, str) else None


def _record_id(entry: Entry) -> str | None:
    """The id of the record an entry is or builds, for the gap record that reports it lost."""
    rid = entry.get("id") if isinstance(entry, Mapping) else getattr(entry, "record_id", None)
    return rid if isinstance(rid, str) else None


class RecordWriter:
    """Appends records to ``path`` from one daemon thread; see the module docstring.

    ``write`` is the system call that appends bytes (``os.write``); tests replace it to inject failures."""

    def __init__(
        self,
        *,
        path: Path,
        signing_key: Ed25519PrivateKey | None,
        checkpoint_every: int = 100,
        checkpoint_seconds: float = 60.0,
        fsync: bool = True,
        queue_size: int = 10000,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = 1.0,
        batch_size: int = 512,
        write: Callable[[int, bytes], int] = os.write,
        linger_seconds: float = LINGER_SECONDS,
    ) -> None:
        if checkpoint_every < 1 or queue_size < 1 or batch_size < 1:
            raise ValueError("checkpoint_every, queue_size and batch_size must be at least 1")
        if checkpoint_seconds < 0 or retry_seconds < 0 or linger_seconds < 0:
            raise ValueError("checkpoint_seconds, retry_seconds and linger_seconds must not be negative")
        self._path = path
        self._signing_key = signing_key
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._fsync = fsync
        self._queue_size = queue_size
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._batch_size = batch_size
        self._write = write
        self._linger = linger_seconds

        # Shared with callers, guarded by _cond.
        self._cond = threading.Condition()
        self._items: deque[Entry | _Flush] = deque()
        self._queued = 0
        self._oldest: float | None = None  # when the oldest record waiting was queued (time.monotonic())
        self._closing = False
        self._flushes = 0
        self._dropped = _Gap()
        self._lost = 0
        self._first_lost_id: str | None = None

        # The writer thread's own (start() uses them before the thread exists).
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._regular = True
        self._chain = Chain()
        self._resync = True
        self._failed = False
        self._gap = _Gap()
        self._start_record: dict[str, Any] | None = None
        self._on_disk: tuple[int, str] | None = None
        self._replaces: tuple[int, str] | None = None  # _on_disk of the file last replaced under the writer
        self._written = 0
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        self._retry_at = 0.0
        self._fail_log = _Throttle()
        self._invalid_log = _Throttle()

    # -- the callers' side --------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def healthy(self) -> bool:
        """False from a failed write until a retry has written the records again."""
        return not self._failed

    @property
    def lost(self) -> int:
        """Records submitted since start that are not in the file (queue full, write failed, not JSON)."""
        with self._cond:
            return self._lost

    @property
    def first_lost_id(self) -> str | None:
        with self._cond:
            return self._first_lost_id

    @property
    def written(self) -> int:
        """Submitted records that reached the file (start, gap and checkpoint records not counted)."""
        return self._written

    def start(self) -> None:
        """Open the file, continue its chain with a ``start`` record, and start the writing thread.

        Raises ConfigError when the file cannot be opened or another writer holds it; a failing first
        write does not raise: the writer starts unhealthy and retries."""
        if self._thread is not None or self._closing:
            raise RuntimeError("RecordWriter.start() called twice, or after close()")
        try:
            self._fd, self._regular = self._open()
        except BlockingIOError as exc:
            raise ConfigError(f"{self._path}: another process is writing this session record") from exc
        except OSError as exc:
            raise ConfigError(f"{self._path}: cannot open the session record: {exc.strerror}") from exc
        self._start_record = {"type": "start", "time": iso_time(self._clock()), "pid": os.getpid()}
        self._checkpoint_at = time.monotonic()
        self._attempt([], final=False)
        self._thread = threading.Thread(target=self._run, name="extproc-audit-writer", daemon=True)
        self._thread.start()

    def _open(self) -> tuple[int, bool]:
        """Opens (creating it and its folder) and locks the file at ``path``: its descriptor, and whether
        it is a regular file. Raises OSError; BlockingIOError when another process holds the lock."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if regular:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd, regular

    def submit(self, entry: Entry) -> bool:
        """Queue a record (or a function building one, called on the writer's thread); never blocks.

        False when the record is lost: the queue is full or the writer is closed. A record is copied
        one level deep; what it holds must not change after the call."""
        if isinstance(entry, Mapping):
            if not isinstance(entry.get("type"), str):
                raise ValueError("a record needs a string 'type'")
            entry = dict(entry)
        with self._cond:
            if self._closing or self._queued >= self._queue_size:
                self._count_lost(1, _record_id(entry))
                if not self._closing:
                    self._dropped.add(1, _record_id(entry), "queue full")
                    self._cond.notify()
                return False
            self._items.append(entry)
            self._queued += 1
            # The writer learns of the first record (to time its wait) and of a full batch; the records
            # between join the batch without waking it.
            if self._oldest is None:
                self._oldest = time.monotonic()
                self._cond.notify()
            elif self._queued >= self._batch_size:
                self._cond.notify()
        return True

    def mark_lost(self, record_id: str | None, reason: str) -> None:
        """Count a record that will never be submitted (building it failed before it could be) and have the
        next line written be a gap record naming it. Never blocks on the disk.

        The file then says where it is incomplete even when the loss happened outside the writer."""
        with self._cond:
            self._count_lost(1, record_id)
            if not self._closing:
                self._dropped.add(1, record_id, reason)
                self._cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted before the call is written (or counted as lost).

        While the writer is failing, a flush makes it retry at once instead of at the next retry time.
        False on timeout, or before start()."""
        thread = self._thread
        if thread is None:
            return False
        marker = _Flush()
        with self._cond:
            closing = self._closing
            if not closing:
                self._items.append(marker)
                self._flushes += 1
                self._cond.notify()
        if closing:
            thread.join(timeout)
            return not thread.is_alive()
        return marker.done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting records, write what is queued and a last checkpoint, and close the file.

        Safe to call more than once. If the thread does not finish within ``timeout`` the file stays open
        (the thread may still be writing to it) and an error is logged."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            with self._cond:
                self._count_lost(self._queued, None)
                self._items.clear()
                self._queued = 0
            return
        thread.join(timeout)
        if thread.is_alive():
            log.error("audit_close_timeout", extra={"path": str(self._path), "timeout": timeout})
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _count_lost(self, count: int, first_id: str | None) -> None:
        """Under _cond."""
        if count and self._lost == 0:
            self._first_lost_id = first_id
        self._lost += count

    # -- the writer's thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready():
                    self._cond.wait(self._wait_time())
                entries: list[Entry] = []
                markers: list[_Flush] = []
                while self._items and len(entries) < self._batch_size:
                    item = self._items.popleft()
                    if isinstance(item, _Flush):
                        markers.append(item)
                    else:
                        entries.append(item)
                        self._queued -= 1
                if not self._queued:  # records left beyond the batch have waited long enough: kept
                    self._oldest = None
                final = self._closing and not self._items
            try:
                self._attempt(entries, final=final)
            except Exception as exc:
                # A bug, not the disk: keep the thread alive, say so, and rebuild the chain from the file.
                log.exception(
                    "audit_writer_error", extra={"path": str(self._path), "error": type(exc).__name__}
                )
                self._lose([None] * len(entries), "internal error")
                self._fail(None, f"internal error: {type(exc).__name__}")
            for marker in markers:
                marker.done.set()
            with self._cond:
                self._flushes -= len(markers)
            if final:
                self._final_sync()
                return

    def _ready(self) -> bool:
        """Under _cond: whether the thread has something to do now."""
        if self._closing or self._flushes:
            return True
        now = time.monotonic()
        if self._failed:
            return now >= self._retry_at
        if self._queued and (self._queued >= self._batch_size or self._lingered(now) <= 0):
            return True
        return self._dropped.pending or self._checkpoint_due(0, now)

    def _lingered(self, now: float) -> float:
        """Under _cond: how long the oldest record waiting may still wait for others."""
        return self._linger - (now - self._oldest) if self._oldest is not None else self._linger

    def _wait_time(self) -> float | None:
        now = time.monotonic()
        if self._failed:
            return min(_MAX_WAIT, max(0.0, self._retry_at - now))
        wait: float | None = None
        if self._signing_key is not None and self._since_checkpoint:
            wait = min(_MAX_WAIT, max(0.0, self._checkpoint_at + self._checkpoint_seconds - now))
        if self._queued:
            lingered = max(0.0, self._lingered(now))
            wait = lingered if wait is None else min(wait, lingered)
        return wait

    def _checkpoint_due(self, adding: int, now: float, final: bool = False) -> bool:
        """Whether a checkpoint ends the batch; at close always, even right after another one, since only the
        final checkpoint says that nothing may follow it but a new run."""
        pending = self._since_checkpoint + adding
        if self._signing_key is None:
            return False
        if final:
            return True
        if pending == 0:
            return False
        return pending >= self._checkpoint_every or now - self._checkpoint_at >= self._checkpoint_seconds

    def _build(self, entries: list[Entry]) -> list[dict[str, Any]]:
        """Record bodies from entries; a builder that raises or returns no record loses that record."""
        bodies: list[dict[str, Any]] = []
        for entry in entries:
            try:
                body = entry() if callable(entry) else entry
                if not isinstance(body, Mapping):
                    raise TypeError("the record builder did not return a mapping")
                bodies.append(dict(body))
            except Exception as exc:
                self._invalid(exc, _record_id(entry))
        return bodies

    def _invalid(self, exc: Exception, record_id: str | None) -> None:
        self._lose([record_id], "record not writable")
        suppressed = self._invalid_log.allow()
        if suppressed is not None:
            log.error(
                "audit_record_invalid",
                extra={"path": str(self._path), "error": type(exc).__name__, "suppressed": suppressed},
            )

    def _attempt(self, entries: list[Entry], *, final: bool) -> None:
        """Write the records of ``entries``, and the bookkeeping records due, in one write and one fsync."""
        bodies = self._build(entries)
        with self._cond:
            if self._dropped.pending:
                dropped = self._dropped.take()
                self._gap.add(dropped.lost, dropped.first_id, *dropped.reasons)
        problem = self._follow_path()
        if problem is not None:
            error, reason = problem
            self._lose([_record_id(body) for body in bodies], reason)
            self._fail(error, reason)
            return
        now = time.monotonic()
        prefix = b""
        tail: Tail | None = None
        if self._resync:
            try:
                tail = (
                    read_tail_fd(self._fd) if self._regular and self._fd is not None else Tail(regular=False)
                )
            except OSError as exc:
                reason = f"reading the file's tail: {exc}"
                self._lose([_record_id(body) for body in bodies], reason)
                self._fail(exc, reason)
                return
            self._check_tail(tail)
            self._chain = Chain.following(tail)
            prefix = b"\n" if tail.needs_newline else b""
        lines = self._link(bodies, tail, now, final)
        if not lines and not prefix:
            return
        data = prefix + b"".join(line.data for line in lines)
        try:
            self._write_all(data)
        except _WriteFailed as failed:
            lost = self._settle(lines, failed.written - len(prefix))
            self._lose(lost, failed.reason)
            self._fail(failed.error, failed.reason)
            return
        self._settle(lines, len(data))
        recovered = self._failed
        self._failed = False
        self._resync = False
        if lines and lines[-1].kind == "checkpoint":
            self._since_checkpoint = 0
            self._checkpoint_at = now
            last = lines[-1].record
            log.info(
                "audit_checkpoint", extra={"path": str(self._path), "seq": last["seq"], "hash": last["hash"]}
            )
        else:
            self._since_checkpoint += len(lines)
        if recovered:
            reported = sum(line.gap.lost for line in lines if line.gap is not None)
            log.warning("audit_write_recovered", extra={"path": str(self._path), "lost": reported})

    def _follow_path(self) -> tuple[OSError, str] | None:
        """Keep writing to the file at ``path``, not to one that was removed or renamed away from it.

        Appending to a file that is no longer at its path would lose every record silently (a removed
        file is freed when the writer closes it). So before each batch the file open is compared with the
        one at the path; when they differ (or the path is gone, or the writer could not open it before),
        the old one is closed and the path opened again, created if need be, and the writer begins a new
        run in it: a ``start`` record whose ``replaces`` names the last record written to the file before
        (its ``seq`` and ``hash``), so an auditor can join the two. The error and its reason when the
        path cannot be opened: the batch is lost, and the next attempt tries again."""
        fd = self._fd
        if fd is not None:
            try:
                opened, here = os.fstat(fd), os.stat(self._path)
                if (opened.st_dev, opened.st_ino) == (here.st_dev, here.st_ino):
                    return None
            except FileNotFoundError:
                pass
            except OSError as exc:
                return exc, f"checking the session record's path: {exc}"
            log.error("audit_file_replaced", extra={"path": str(self._path)})
            self._fd = None
            os.close(fd)  # and its lock with it
            if self._on_disk is not None:
                self._replaces = self._on_disk
            self._on_disk = None
        try:
            self._fd, self._regular = self._open()
        except BlockingIOError as exc:
            return exc, "reopening the session record: another process is writing it"
        except OSError as exc:
            return exc, f"reopening the session record: {exc}"
        start: dict[str, Any] = {
            "type": "start",
            "time": iso_time(self._clock()),
            "pid": os.getpid(),
            "reason": "the session record was removed or replaced under the writer",
        }
        if self._replaces is not None:
            seq, digest = self._replaces
            start["replaces"] = {"seq": seq - 1, "hash": digest}
        self._start_record = start
        self._resync = True
        log.warning("audit_file_reopened", extra={"path": str(self._path), "replaces": start.get("replaces")})
        return None

    def _check_tail(self, tail: Tail) -> None:
        """Begin a new run when the file's last record is not the last one this writer wrote.

        Records someone else appended while the writer could not write must stay outside the runs the
        writer's checkpoints vouch for; a new ``start`` record ends the run they were added to."""
        if not tail.regular or self._on_disk is None or self._start_record is not None:
            return
        if (tail.seq, tail.last_hash) == self._on_disk:
            return
        seq, digest = self._on_disk
        log.error(
            "audit_tail_changed",
            extra={
                "path": str(self._path),
                "expected_seq": seq - 1,
                "expected_hash": digest,
                "seq": tail.seq - 1,
                "hash": tail.last_hash,
            },
        )
        self._start_record = {
            "type": "start",
            "time": iso_time(self._clock()),
            "pid": os.getpid(),
            "reason": "the file's tail changed under the writer",
        }

    def _link(self, bodies: list[dict[str, Any]], tail: Tail | None, now: float, final: bool) -> list[_Line]:
        """The batch, chained: a start or gap record first when due (acknowledging a torn write), the
        records, a gap record for records found unwritable here, and a checkpoint when due."""
        torn = tail.torn if tail is not None else None
        leading: list[tuple[str, dict[str, Any], _Gap | None]] = []
        if self._start_record is not None:
            start = dict(self._start_record)
            if self._chain.seq > 0:
                start["resumed"] = {"seq": self._chain.seq - 1, "hash": self._chain.last_hash}
            leading.append(("start", start, None))
        if self._gap.pending or (torn is not None and not leading):
            gap = self._gap.take()
            leading.append(("gap", gap.body(iso_time(self._clock())), gap))
        if torn is not None:
            leading[0][1]["torn"] = torn.as_json()
        lines = [_Line(kind, self._chain.link(body), gap) for kind, body, gap in leading]
        for body in bodies:
            try:
                lines.append(_Line("record", self._chain.link(body)))
            except (TypeError, ValueError) as exc:
                self._invalid(exc, _record_id(body))
        if self._gap.pending:
            gap = self._gap.take()
            lines.append(_Line("gap", self._chain.link(gap.body(iso_time(self._clock()))), gap))
        if self._signing_key is not None and self._checkpoint_due(len(lines), now, final):
            checkpoint = self._chain.checkpoint(self._signing_key, iso_time(self._clock()), final=final)
            lines.append(_Line("checkpoint", checkpoint))
        return lines

    def _settle(self, lines: list[_Line], written: int) -> list[str | None]:
        """Account for the lines that reached the file; the ids of the records that did not. A line cut
        just before its newline counts as written: its record is whole, and the next writer ends the line.
        A gap record that did not reach the file goes back to be reported again."""
        lost: list[str | None] = []
        end = 0
        for line in lines:
            end += len(line.data)
            line.done = end - 1 <= written
            if line.done:
                self._on_disk = (line.record["seq"] + 1, line.record["hash"])
            if line.kind == "record":
                if line.done:
                    self._written += 1
                else:
                    lost.append(line.record_id)
            elif line.kind == "start" and line.done:
                self._start_record = None
                resumed = line.record.get("resumed")
                if resumed is not None:
                    log.info(
                        "audit_resumed",
                        extra={"path": str(self._path), "seq": resumed["seq"], "hash": resumed["hash"]},
                    )
            elif line.kind == "gap" and line.gap is not None and not line.done:
                self._gap.add(line.gap.lost, line.gap.first_id, *line.gap.reasons)
        return lost

    def _write_all(self, data: bytes) -> None:
        """Append all of ``data`` (a short write is continued), then fsync when asked to."""
        fd = self._fd
        if fd is None:
            error = OSError("the session record is closed")
            raise _WriteFailed(0, error, str(error))
        done = 0
        while done < len(data):
            try:
                count = self._write(fd, data[done:] if done else data)
            except OSError as exc:
                raise _WriteFailed(done, exc, str(exc)) from exc
            if count <= 0:
                error = OSError(f"write returned {count}")
                raise _WriteFailed(done, error, str(error))
            done += count
        if self._fsync and self._regular:
            try:
                os.fsync(fd)
            except OSError as exc:
                raise _WriteFailed(done, exc, f"fsync failed: {exc}") from exc

    def _lose(self, record_ids: list[str | None], reason: str) -> None:
        if not record_ids:
            return
        with self._cond:
            self._count_lost(len(record_ids), record_ids[0])
        self._gap.add(len(record_ids), record_ids[0], reason)

    def _fail(self, error: OSError | None, reason: str) -> None:
        """Enter (or stay in) the failed state: the next attempt, after ``retry_seconds`` or at a flush,
        re-reads the file's tail and starts with a gap record."""
        self._gap.add(0, None, reason)
        self._failed = True
        self._resync = True
        self._retry_at = time.monotonic() + self._retry_seconds
        suppressed = self._fail_log.allow()
        if suppressed is not None:
            log.error(
                "audit_write_failed",
                extra={
                    "path": str(self._path),
                    "error": reason,
                    "errno": error.errno if error is not None else None,
                    "lost": self.lost,
                    "suppressed": suppressed,
                },
            )

    def _final_sync(self) -> None:
        """At close, one fsync for a writer that does not fsync every batch."""
        if self._fd is None or not self._regular or self._fsync or self._failed:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            log.error("audit_write_failed", extra={"path": str(self._path), "error": f"fsync failed: {exc}"})
