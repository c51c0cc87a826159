"""The server's logs go through a bounded queue to a writer thread: a stderr that nobody reads (a stuck
log pipe) never stalls the event loop, lines beyond the queue are counted as dropped, and shutdown
writes what is queued."""

import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from extproc import logs
from extproc.settings import LogSettings


@pytest.fixture
def stderr_pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    yield read, write
    logs.shutdown()
    logging.getLogger().handlers[:] = []
    os.close(read)
    os.close(write)


def test_a_full_log_pipe_does_not_block_the_caller(
    stderr_pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    read, write = stderr_pipe
    # set here, in the test's call: pytest puts its own capture back between a fixture and the test
    monkeypatch.setattr(sys, "stderr", os.fdopen(write, "w", buffering=1, closefd=False))
    logs.configure(LogSettings(level="info", format="json"), background=True)
    log = logging.getLogger("extproc.test")
    done = threading.Event()

    def flood() -> None:
        for n in range(logs.QUEUE_SIZE * 3):  # far past the pipe's 64 KiB and the queue
            log.info("exchange", extra={"n": n, "padding": "x" * 200})
        done.set()

    caller = threading.Thread(target=flood, daemon=True)
    caller.start()
    assert done.wait(60), "logging blocked on a pipe nobody reads"
    # Now read what was written: the first lines, then a count of what was dropped.
    os.set_blocking(read, False)
    chunks = []
    reader_done = threading.Event()

    def drain() -> None:
        while not reader_done.is_set():
            try:
                chunks.append(os.read(read, 1 << 20))
            except BlockingIOError:
                reader_done.wait(0.01)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    log.info("after")
    logs.shutdown()
    reader_done.set()
    reader.join(5)
    while True:  # what the writer wrote last, after the reader's final look
        try:
            chunks.append(os.read(read, 1 << 20))
        except BlockingIOError:
            break
    lines = [json.loads(line) for line in b"".join(chunks).decode().splitlines()]
    events = [line["event"] for line in lines]
    assert events[0] == "exchange"
    assert "log_lines_dropped" in events
    dropped = sum(line["dropped"] for line in lines if line["event"] == "log_lines_dropped")
    written = sum(1 for event in events if event in ("exchange", "after"))
    assert dropped + written == logs.QUEUE_SIZE * 3 + 1  # every line written, or counted as dropped
    assert dropped > 0


def test_a_warning_is_written_at_once_and_the_lines_before_it_with_it(
    stderr_pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Info lines wait for the writer's next round (batched, not one wake-up per line); a warning wakes
    it, and comes out after the lines logged before it, in order."""
    read, write = stderr_pipe
    monkeypatch.setattr(logs, "FLUSH_SECONDS", 60.0)
    monkeypatch.setattr(sys, "stderr", os.fdopen(write, "w", buffering=1, closefd=False))
    logs.configure(LogSettings(level="info", format="json"), background=True)
    log = logging.getLogger("extproc.test")
    log.info("first")
    log.info("second")
    log.warning("trouble")
    seen = b""
    deadline = time.monotonic() + 10
    while b"trouble" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([read], [], [], 0.1)
        if ready:
            seen += os.read(read, 1 << 16)
    assert [json.loads(line)["event"] for line in seen.decode().splitlines()] == [
        "first",
        "second",
        "trouble",
    ]
