"""Structured logs: one JSON object per line on stderr (or plain text for people at a terminal).

Log events name what happened (``event``) and carry fields; they never carry a matched value, a body
or a token."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from typing import IO, Any

from extproc.settings import LogSettings

_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED)
        line = f"{record.levelname.lower():7} {record.name}: {record.getMessage()} {extras}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


QUEUE_SIZE = 10000  # log records waiting for the writer thread; beyond that they are dropped, and counted
FLUSH_SECONDS = 0.05  # how long an INFO line may wait for the writer thread
WAKE_AT = 256  # records waiting that wake the writer before its time


def _dropped(count: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "extproc.logs",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "log_lines_dropped",
            "dropped": count,
        }
    )


class _Buffered(logging.Handler):
    """Hands records to the writer thread and returns at once: a log pipe that is slow or full never
    stalls the event loop (and every stream with it). A full buffer drops the record; the next one that
    fits is preceded by a ``log_lines_dropped`` line saying how many were lost.

    The writer is not woken per record: it wakes every ``FLUSH_SECONDS``, or at once for a warning or
    when ``WAKE_AT`` records wait. A wake-up per record (a queue's notify) handed the interpreter to the
    writer and back once per exchange, and with the hand-over and the caches the writer's formatting
    evicted, the event loop paid more than the line's formatting itself: in-process
    (``bench/exchange.py``) an exchange costs about 0.9x the CPU with lines written in batches. A
    deque: appending needs no lock."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.dropped = 0
        self._records: deque[logging.LogRecord] = deque()
        self._target = target
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._write, name="extproc-logs", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # Handler.handle takes the handler's lock around emit; a deque needs none.
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        records = self._records
        if len(records) >= QUEUE_SIZE:
            self.dropped += 1
            return
        if self.dropped:
            records.append(_dropped(self.dropped))
            self.dropped = 0
        records.append(record)
        if (record.levelno >= logging.WARNING or len(records) >= WAKE_AT) and not self._wake.is_set():
            self._wake.set()

    def _write(self) -> None:
        records = self._records
        while True:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            stopping = self._stopping  # read before draining: what was added before the stop is written
            while records:
                self._target.handle(records.popleft())
            if stopping:
                return

    def stop(self) -> None:
        """Writes what waits (and the count of what was dropped) and ends the writer; a stderr that stays
        stuck is left to the daemon thread, the process ends anyway."""
        if self.dropped:  # the count of what was lost is the one line worth going over the bound for
            self._records.append(_dropped(self.dropped))
            self.dropped = 0
        self._stopping = True
        self._wake.set()
        self._thread.join(STOP_SECONDS)


STOP_SECONDS = 5.0
_writer: _Buffered | None = None


class _Fields(logging.Filter):
    """Adds the same fields to every record (a worker's index), unless the record has its own."""

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self._fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self._fields.items():
            if key not in record.__dict__:
                setattr(record, key, value)
        return True


def configure(
    settings: LogSettings,
    *,
    background: bool = False,
    fields: dict[str, Any] | None = None,
    stream: IO[str] | None = None,
) -> None:
    """Log to ``stream`` (stderr) as ``settings`` say. ``background`` (the server): records go through a
    bounded queue to a writer thread, so logging never waits on stderr; ``shutdown`` writes what is
    queued. ``fields`` go on every line (``{"worker": 1}`` in a worker process)."""
    global _writer
    shutdown()
    handler: logging.Handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    if fields:
        handler.addFilter(_Fields(fields))
    if background:
        handler = _writer = _Buffered(handler)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # grpc and aiohttp are chatty at INFO; their warnings still show.
    for noisy in ("aiohttp.access", "grpc._cython"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def shutdown() -> None:
    """Writes every buffered record and stops the writer thread (when ``configure`` started one)."""
    global _writer
    if _writer is None:
        return
    _writer.stop()
    _writer = None
