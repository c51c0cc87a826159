"""Structured logs: one JSON object per line on stderr (or plain text for people at a terminal).

Log events name what happened (``event``) and carry fields; they never carry a matched value, a body
or a token."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import sys
import time
from queue import Full, Queue
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


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread and returns at once: a log pipe that is slow or full never
    stalls the event loop (and every stream with it). A full queue drops the record; the next one that
    fits is preceded by a ``log_lines_dropped`` line saying how many were lost."""

    def __init__(self, queue: Queue[logging.LogRecord]) -> None:
        super().__init__(queue)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted on the writer thread, not here

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                self.queue.put_nowait(_dropped(self.dropped))
                self.dropped = 0
            self.queue.put_nowait(record)
        except Full:
            self.dropped += 1


class _Listener(logging.handlers.QueueListener):
    """The writer thread. Its stop signal waits for room (a while) instead of failing on a full queue."""

    def enqueue_sentinel(self) -> None:
        # stderr stays stuck: the thread is a daemon, and the process ends anyway
        with contextlib.suppress(Full):
            self.queue.put(self._sentinel, timeout=STOP_SECONDS)  # type: ignore[attr-defined]


STOP_SECONDS = 5.0
_listener: _Listener | None = None


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
    global _listener
    shutdown()
    handler: logging.Handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    if fields:
        handler.addFilter(_Fields(fields))
    if background:
        queue: Queue[logging.LogRecord] = Queue(QUEUE_SIZE)
        _listener = _Listener(queue, handler)
        _listener.start()
        handler = _QueueHandler(queue)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    # grpc and aiohttp are chatty at INFO; their warnings still show.
    for noisy in ("aiohttp.access", "grpc._cython"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def shutdown() -> None:
    """Writes every queued record and stops the writer thread (when ``configure`` started one)."""
    global _listener
    if _listener is None:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _QueueHandler) and handler.dropped:
            try:  # the count of what was lost is the one line worth waiting for
                handler.queue.put(_dropped(handler.dropped), timeout=STOP_SECONDS)  # type: ignore[attr-defined]
                handler.dropped = 0
            except Full:
                pass
    _listener.stop()
    _listener = None
