"""The session record's writer: batches, checkpoints, restarts, torn writes, and write errors for real."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from extproc.audit.keys import key_id
from extproc.audit.record import (
    Chain,
    canonical,
    find,
    iter_records,
    open_sealed,
    read_tail,
    seal,
    verify,
)
from extproc.audit.writer import RecordWriter, iso_time
from extproc.errors import ConfigError

SIGNING = ed25519.Ed25519PrivateKey.generate()
VERIFY = SIGNING.public_key()
AUDITOR = x25519.X25519PrivateKey.generate()


def exchange(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "exchange",
        "id": f"r{i}",
        "findings": {"request": [{"rule": "email", "entity": "EMAIL", "start": 0, "end": 5}]},
        **extra,
    }


def records(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in iter_records(path, skip_invalid=True)]


def types(path: Path) -> list[str]:
    return [record["type"] for record in records(path)]


@pytest.fixture
def writers() -> Iterator[list[RecordWriter]]:
    """Writers a test starts are closed even when it fails."""
    started: list[RecordWriter] = []
    yield started
    for writer in started:
        writer.close()


@pytest.fixture
def make(writers: list[RecordWriter]) -> Callable[..., RecordWriter]:
    def make(path: Path, **options: Any) -> RecordWriter:
        options.setdefault("signing_key", SIGNING)
        writer = RecordWriter(path=path, **options)
        writers.append(writer)
        writer.start()
        return writer

    return make


def _counted(calls: list[bytes]) -> Callable[[int, bytes], int]:
    def write(fd: int, data: bytes) -> int:
        calls.append(data)
        return os.write(fd, data)

    return write


def _until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_records_submitted_together_share_one_write_and_one_fsync(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    """A group commit: the writer is not woken per record; the records that arrive while the first one
    lingers go out with it, in one write (and one fsync), without a flush asking for it."""
    path = tmp_path / "record.jsonl"
    calls: list[bytes] = []
    writer = make(path, write=_counted(calls), linger_seconds=0.5, checkpoint_every=1000)
    calls.clear()  # the start record
    for i in range(5):
        assert writer.submit(exchange(i))
    assert _until(lambda: writer.written == 5)
    assert len(calls) == 1
    assert [r["id"] for r in records(path) if r["type"] == "exchange"] == [f"r{i}" for i in range(5)]


def test_a_full_batch_is_written_at_once_and_a_lone_record_after_its_linger(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path, linger_seconds=3600, batch_size=4)
    for i in range(4):
        writer.submit(exchange(i))
    assert _until(lambda: writer.written == 4)  # a full batch does not wait for the linger
    other = make(tmp_path / "other.jsonl", linger_seconds=0.05)
    other.submit(exchange(9))
    assert _until(lambda: other.written == 1, 5)  # nothing but the linger made it go


def test_a_written_file_verifies(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    path = tmp_path / "audit" / "record.jsonl"
    writer = make(path, checkpoint_every=5)
    for batch in range(4):
        for i in range(batch * 4, batch * 4 + 4):
            assert writer.submit(exchange(i))
        assert writer.flush()
    writer.close()
    assert writer.healthy
    assert (writer.written, writer.lost) == (16, 0)
    assert stat_mode(path) == 0o600
    written = records(path)
    assert written[0]["type"] == "start"
    assert written[0]["pid"] == os.getpid()
    assert [r["id"] for r in written if r["type"] == "exchange"] == [f"r{i}" for i in range(16)]
    assert written[-1]["type"] == "checkpoint"
    assert types(path).count("checkpoint") >= 3
    report = verify(path, [VERIFY], strict=True)
    assert report.ok, report.first_break
    assert report.warnings == []
    assert report.checkpoints == types(path).count("checkpoint")


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_restart_continues_the_chain(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    first = make(path)
    first.submit(exchange(1))
    first.close()
    second = make(path)
    second.submit(exchange(2))
    second.close()
    written = records(path)
    assert [r["type"] for r in written] == [
        "start",
        "exchange",
        "checkpoint",
        "start",
        "exchange",
        "checkpoint",
    ]
    assert [r["seq"] for r in written] == list(range(6))
    assert written[3]["prev"] == written[2]["hash"]
    assert verify(path, [VERIFY], strict=True).ok


def test_close_checkpoints_even_an_empty_session_and_is_idempotent(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path)
    writer.close()
    writer.close()
    assert types(path) == ["start", "checkpoint"]
    assert records(path)[-1]["final"] is True
    assert not writer.submit(exchange(1))
    assert writer.lost == 1
    assert verify(path, [VERIFY], strict=True).ok


def test_without_a_signing_key_there_are_no_checkpoints(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path, signing_key=None, checkpoint_every=1)
    writer.submit(exchange(1))
    writer.close()
    assert types(path) == ["start", "exchange"]
    report = verify(path)
    assert report.ok
    assert report.unsigned_tail == 2


def test_checkpoints_by_time_are_logged_as_anchors(
    tmp_path: Path, make: Callable[..., RecordWriter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="extproc.audit")
    path = tmp_path / "record.jsonl"
    writer = make(path, checkpoint_every=10**6, checkpoint_seconds=0.0)
    writer.submit(exchange(1))
    assert writer.flush()
    checkpoints = [r for r in records(path) if r["type"] == "checkpoint"]
    assert checkpoints
    anchors = [r for r in caplog.records if r.getMessage() == "audit_checkpoint"]
    assert [(a.__dict__["seq"], a.__dict__["hash"]) for a in anchors] == [
        (c["seq"], c["hash"]) for c in checkpoints
    ]
    assert all(a.__dict__["path"] == str(path) for a in anchors)


def test_record_times_come_from_the_clock(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path, clock=lambda: 1_767_323_045.678)
    writer.close()
    assert [r["time"] for r in records(path)] == ["2026-01-02T03:04:05.678Z"] * 2
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"


def test_a_builder_runs_on_the_writer_thread(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path)
    threads: list[str] = []

    def build() -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return {**exchange(1), "sealed": seal(b"original", AUDITOR.public_key(), "r1")}

    assert writer.submit(build)
    writer.close()
    assert threads == ["extproc-audit-writer"]
    found = find(path, "r1")
    assert found is not None
    assert open_sealed(found["sealed"], AUDITOR, "r1") == b"original"
    assert found["sealed"]["kid"] == key_id(AUDITOR.public_key())
    assert verify(path, [VERIFY], strict=True).ok


def test_records_that_cannot_be_written_are_lost_and_marked(
    tmp_path: Path, make: Callable[..., RecordWriter], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path)

    def broken() -> dict[str, Any]:
        raise RuntimeError("secret body text")

    writer.submit(exchange(1))
    writer.submit(broken)
    writer.submit(exchange(2, value={1, 2}))
    writer.submit(exchange(3))
    writer.close()
    assert (writer.written, writer.lost) == (2, 2)
    written = records(path)
    assert [r.get("id") for r in written if r["type"] == "exchange"] == ["r1", "r3"]
    gaps = [r for r in written if r["type"] == "gap"]
    assert sum(g["lost"] for g in gaps) == 2
    assert all(g["reason"] == "record not writable" for g in gaps)
    assert verify(path, [VERIFY], strict=True).ok
    logged = [r for r in caplog.records if r.getMessage() == "audit_record_invalid"]
    assert logged
    assert "secret body text" not in caplog.text


def test_submit_refuses_a_record_without_a_type(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    writer = make(tmp_path / "record.jsonl")
    with pytest.raises(ValueError, match="type"):
        writer.submit({"id": "x"})


def test_a_full_queue_loses_records_and_a_gap_says_so(tmp_path: Path, writers: list[RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    writer = RecordWriter(path=path, signing_key=SIGNING, queue_size=3)
    writers.append(writer)
    accepted = [writer.submit(exchange(i)) for i in range(5)]  # not started: nothing drains the queue
    assert accepted == [True, True, True, False, False]
    assert (writer.lost, writer.first_lost_id) == (2, "r3")
    writer.start()
    writer.close()
    written = records(path)
    assert [r["id"] for r in written if r["type"] == "exchange"] == ["r0", "r1", "r2"]
    gap = next(r for r in written if r["type"] == "gap")
    assert (gap["lost"], gap["first_lost_id"], gap["reason"]) == (2, "r3", "queue full")
    assert verify(path, [VERIFY], strict=True).ok


def test_one_writer_per_file(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    make(path)
    with pytest.raises(ConfigError, match=f"{path}: another process is writing"):
        RecordWriter(path=path, signing_key=SIGNING).start()


def test_a_record_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "record.jsonl"
    with pytest.raises(ConfigError, match=str(path)):
        RecordWriter(path=path, signing_key=SIGNING).start()


# -- crashes and torn writes --------------------------------------------------------------------------


def crash_mid_write(path: Path) -> tuple[int, bytes]:
    """Half a record at the end of the file, as a crash in the middle of a write leaves it."""
    half = (canonical(exchange(99)) + b"\n")[:30]
    with path.open("ab") as file:
        file.write(half)
    return path.read_bytes().count(b"\n") + 1, half


def test_a_restart_after_a_torn_write_acknowledges_it(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    first = make(path)
    first.submit(exchange(1))
    first.close()
    torn_line, half = crash_mid_write(path)
    second = make(path)
    second.submit(exchange(2))
    second.close()
    content = path.read_bytes()
    assert half + b"\n" in content  # the torn bytes stay, on their own line
    start = records(path)[3]
    assert start["type"] == "start"
    assert start["torn"]["line"] == torn_line
    assert start["torn"]["bytes"] == len(half)
    report = verify(path, [VERIFY], strict=True)
    assert report.ok, report.first_break
    assert [w for w in report.warnings if w.startswith(f"line {torn_line}: a torn write")]
    # Without the acknowledging start record, the same torn line is a break.
    lines = content.splitlines(keepends=True)
    del lines[torn_line]
    path.write_bytes(b"".join(lines))
    broken = verify(path, [VERIFY])
    assert broken.first_break is not None
    assert broken.first_break.line == torn_line


# -- write errors -------------------------------------------------------------------------------------


def test_dev_full_makes_the_writer_unhealthy_and_never_blocks(
    writers: list[RecordWriter], caplog: pytest.LogCaptureFixture
) -> None:
    writer = RecordWriter(path=Path("/dev/full"), signing_key=SIGNING, queue_size=10, retry_seconds=3600)
    writers.append(writer)
    writer.start()
    assert not writer.healthy
    failed = [r for r in caplog.records if r.getMessage() == "audit_write_failed"]
    assert failed
    assert failed[0].levelno == logging.ERROR
    assert failed[0].__dict__["path"] == "/dev/full"
    assert failed[0].__dict__["errno"] == errno.ENOSPC
    # The failing writer waits for its next retry; the queue fills and submit answers at once.
    accepted = [writer.submit(exchange(i)) for i in range(25)]
    assert accepted == [True] * 10 + [False] * 15
    assert writer.lost == 15
    assert writer.flush()  # a flush retries now: the ten queued records fail too
    assert not writer.healthy
    assert (writer.lost, writer.written, writer.first_lost_id) == (25, 0, "r10")
    writer.close()
    assert "r1" not in caplog.text


class FailingWrite:
    """os.write that fails with ENOSPC on chosen calls, after a short write of half the data when
    ``partial``: the kernel's own way of filling a disk in the middle of a batch."""

    def __init__(
        self,
        failing: set[int],
        *,
        partial: bool = False,
        cut: Callable[[bytes], int] | None = None,
        gate: threading.Event | None = None,
    ):
        self.failing = failing
        self.partial = partial
        self.cut = cut or (lambda data: len(data) // 2)
        self.calls = 0
        self.failed_once = False
        self.second_call = threading.Event()
        self.gate = gate  # when given, the second call waits for it: the test sees the state between

    def __call__(self, fd: int, data: bytes) -> int:
        self.calls += 1
        if self.calls == 2:
            self.second_call.set()
            if self.gate is not None:
                self.gate.wait(10)
        if self.calls in self.failing:
            if self.partial and not self.failed_once:
                self.failed_once = True
                self.failing.add(self.calls + 1)
                return os.write(fd, data[: self.cut(data)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)


def test_a_write_error_is_recovered_with_a_gap_record(
    tmp_path: Path, make: Callable[..., RecordWriter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="extproc.audit")
    path = tmp_path / "record.jsonl"
    write = FailingWrite({2}, partial=True)
    writer = make(path, write=write, retry_seconds=3600)
    for i in range(3):
        writer.submit(exchange(i, pad="p" * 2000 if i == 0 else ""))
    assert writer.flush()
    assert not writer.healthy
    assert (writer.lost, writer.first_lost_id) == (3, "r0")
    assert read_tail(path).torn is not None  # half of r0 is in the file
    writer.submit(exchange(3))
    assert writer.flush()
    assert writer.healthy
    writer.close()
    written = records(path)
    gap = next(r for r in written if r["type"] == "gap")
    assert (gap["lost"], gap["first_lost_id"]) == (3, "r0")
    assert gap["reason"] == "[Errno 28] No space left on device"
    assert "torn" in gap
    assert [r["id"] for r in written if r["type"] == "exchange"] == ["r3"]
    report = verify(path, [VERIFY], strict=True)
    assert report.ok, report.first_break
    assert any("a torn write" in w for w in report.warnings)
    assert any("gap record: 3 record(s) lost" in w for w in report.warnings)
    events = [r.getMessage() for r in caplog.records]
    assert "audit_write_failed" in events
    assert "audit_tail_changed" not in events  # its own torn write is not a change
    assert types(path).count("start") == 1
    recovered = next(r for r in caplog.records if r.getMessage() == "audit_write_recovered")
    assert recovered.__dict__["lost"] == 3


@pytest.mark.parametrize("past_r0", [5, -1], ids=["into-r1", "before-r0-newline"])
def test_records_that_reached_the_file_before_the_error_are_not_lost(
    tmp_path: Path, make: Callable[..., RecordWriter], past_r0: int
) -> None:
    path = tmp_path / "record.jsonl"
    # Cut the batch a few bytes into r1's line, or just before r0's newline (r0 is whole without it).
    first_line = len(canonical({**exchange(0), "seq": 1, "prev": "0" * 64, "hash": "0" * 64})) + 1
    write = FailingWrite({2}, partial=True, cut=lambda data: first_line + past_r0)
    writer = make(path, write=write, signing_key=None, retry_seconds=3600)
    for i in range(3):
        writer.submit(exchange(i))
    assert writer.flush()
    assert (writer.written, writer.lost, writer.first_lost_id) == (1, 2, "r1")
    writer.close()
    written = records(path)
    assert [r["id"] for r in written if r["type"] == "exchange"] == ["r0"]
    gap = next(r for r in written if r["type"] == "gap")
    assert (gap["lost"], gap["first_lost_id"]) == (2, "r1")
    report = verify(path)
    assert report.ok, report.first_break
    assert any("a torn write" in w for w in report.warnings) == (past_r0 > 0)


def test_a_failing_start_is_retried_without_new_records(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    gate = threading.Event()
    write = FailingWrite({1}, gate=gate)
    writer = make(path, write=write, retry_seconds=0.0)
    assert write.second_call.wait(10)  # the thread retried on its own: nothing was submitted or flushed
    assert not writer.healthy  # the retry is still in its write: the failure is what the writer knows
    gate.set()
    assert writer.flush()
    assert writer.healthy
    writer.close()
    assert types(path)[:2] == ["start", "gap"]
    gap = records(path)[1]
    assert (gap["lost"], gap["first_lost_id"]) == (0, None)
    assert verify(path, [VERIFY], strict=True).ok


def test_a_failed_gap_record_is_reported_again(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    write = FailingWrite({2, 4}, partial=True)
    writer = make(path, write=write, retry_seconds=3600)
    writer.submit(exchange(0))
    assert writer.flush()  # call 2: half of r0's line, call 3: ENOSPC
    writer.submit(exchange(1))
    assert writer.flush()  # call 4: ENOSPC for the gap record and r1
    assert not writer.healthy
    writer.submit(exchange(2))
    assert writer.flush()  # call 5: one gap record for both, and r2
    assert writer.healthy
    writer.close()
    written = records(path)
    assert [(g["lost"], g["first_lost_id"]) for g in written if g["type"] == "gap"] == [(2, "r0")]
    assert [r["id"] for r in written if r["type"] == "exchange"] == ["r2"]
    assert verify(path, [VERIFY], strict=True).ok


def test_an_fsync_error_loses_nothing_but_is_marked(
    tmp_path: Path, make: Callable[..., RecordWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path, retry_seconds=3600)
    real_fsync = os.fsync
    failures = iter([True])

    def fsync(fd: int) -> None:
        if next(failures, False):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    writer.submit(exchange(0))
    assert writer.flush()
    assert not writer.healthy
    assert (writer.written, writer.lost) == (1, 0)
    writer.submit(exchange(1))
    assert writer.flush()
    assert writer.healthy
    writer.close()
    gap = next(r for r in records(path) if r["type"] == "gap")
    assert gap["lost"] == 0
    assert gap["reason"].startswith("fsync failed: [Errno 5]")
    assert verify(path, [VERIFY], strict=True).ok


# -- what a record may hold, and losses the caller knows of ---------------------------------------------


def test_a_header_with_a_lone_surrogate_is_written(tmp_path: Path, make: Callable[..., RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path)
    assert writer.submit(exchange(1, headers={"x-name": "r\udcff"}))
    writer.close()
    assert (writer.written, writer.lost) == (1, 0)
    found = find(path, "r1")
    assert found is not None
    assert found["headers"] == {"x-name": "r\udcff"}
    assert path.read_bytes().isascii()
    assert verify(path, [VERIFY], strict=True).ok


class Builder:
    """A record builder that carries the id of the record it builds."""

    def __init__(self, record_id: str, *, fails: bool = False) -> None:
        self.record_id = record_id
        self.fails = fails

    def __call__(self) -> dict[str, Any]:
        if self.fails:
            raise RuntimeError("cannot build")
        return exchange(int(self.record_id[1:]))


def test_a_lost_builder_is_named_by_its_record_id(tmp_path: Path, writers: list[RecordWriter]) -> None:
    path = tmp_path / "record.jsonl"
    writer = RecordWriter(path=path, signing_key=SIGNING, queue_size=2)
    writers.append(writer)
    assert writer.submit(Builder("r0"))
    assert writer.submit(Builder("r1", fails=True))
    assert not writer.submit(Builder("r2"))  # not started: the queue is full
    assert (writer.lost, writer.first_lost_id) == (1, "r2")
    writer.start()
    writer.close()
    gaps = [(g["lost"], g["first_lost_id"], g["reason"]) for g in records(path) if g["type"] == "gap"]
    assert gaps == [(1, "r2", "queue full"), (1, "r1", "record not writable")]
    assert verify(path, [VERIFY], strict=True).ok


def test_a_builder_id_that_is_not_a_string_is_not_used(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path)
    builder = Builder("r1", fails=True)
    builder.record_id = 7  # type: ignore[assignment]
    writer.submit(builder)
    writer.close()
    gap = next(r for r in records(path) if r["type"] == "gap")
    assert (gap["lost"], gap["first_lost_id"]) == (1, None)


def test_mark_lost_counts_a_record_and_writes_a_gap_naming_it(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path)
    writer.submit(exchange(0))
    assert writer.flush()
    writer.mark_lost("r1", "record not built")
    writer.mark_lost(None, "record not built")
    assert (writer.lost, writer.first_lost_id) == (2, "r1")
    assert writer.flush()
    writer.submit(exchange(2))
    writer.close()
    written = records(path)
    assert [r["type"] for r in written] == ["start", "exchange", "gap", "exchange", "checkpoint"]
    assert (written[2]["lost"], written[2]["first_lost_id"], written[2]["reason"]) == (
        2,
        "r1",
        "record not built",
    )
    assert writer.written == 2
    assert verify(path, [VERIFY], strict=True).ok


def test_mark_lost_does_not_wait_for_a_write_in_progress(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_write(fd: int, data: bytes) -> int:
        if b'"r0"' in data:
            entered.set()
            release.wait(30)
        return os.write(fd, data)

    path = tmp_path / "record.jsonl"
    writer = make(path, write=slow_write)
    writer.submit(exchange(0))
    assert entered.wait(10)
    marker = threading.Thread(target=writer.mark_lost, args=("r1", "record not built"))
    marker.start()
    marker.join(10)
    held = marker.is_alive()
    release.set()
    assert not held
    assert writer.lost == 1
    writer.close()
    gap = next(r for r in records(path) if r["type"] == "gap")
    assert gap["first_lost_id"] == "r1"


# -- resuming a file ----------------------------------------------------------------------------------


def test_a_resumed_file_names_its_last_record_in_the_start_record_and_the_log(
    tmp_path: Path, make: Callable[..., RecordWriter], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="extproc.audit")
    path = tmp_path / "record.jsonl"
    first = make(path)
    first.submit(exchange(1))
    first.close()
    assert not [r for r in caplog.records if r.getMessage() == "audit_resumed"]
    last = records(path)[-1]
    second = make(path)
    second.close()
    written = records(path)
    assert "resumed" not in written[0]
    start = written[len(written) - 2]
    assert start["type"] == "start"
    assert start["resumed"] == {"seq": last["seq"], "hash": last["hash"]}
    logged = [r for r in caplog.records if r.getMessage() == "audit_resumed"]
    assert [(r.__dict__["path"], r.__dict__["seq"], r.__dict__["hash"]) for r in logged] == [
        (str(path), last["seq"], last["hash"])
    ]
    report = verify(path, [VERIFY], strict=True, anchors={last["seq"]: last["hash"]})
    assert report.ok, report.first_break
    assert report.anchors_checked == 1


def test_a_resumed_start_after_a_torn_write_names_the_last_whole_record(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    first = make(path)
    first.submit(exchange(1))
    first.close()
    last = records(path)[-1]
    crash_mid_write(path)
    make(path).close()
    start = next(r for r in records(path) if r["type"] == "start" and r["seq"] > 0)
    assert start["resumed"] == {"seq": last["seq"], "hash": last["hash"]}
    assert "torn" in start
    assert verify(path, [VERIFY], strict=True).ok


# -- records appended while no writer holds the file ------------------------------------------------------


def forge(path: Path, record_id: str = "forged") -> int:
    """Append a well-chained exchange record, as anyone able to write the file but without the signing key
    can; its line number."""
    tail = read_tail(path)
    record = Chain.following(tail).link(exchange(0, id=record_id))
    with path.open("ab") as file:
        file.write(canonical(record) + b"\n")
    return path.read_bytes().count(b"\n")


def checkpoint_anchors(path: Path) -> dict[int, str]:
    return {r["seq"]: r["hash"] for r in records(path) if r["type"] == "checkpoint"}


def test_close_writes_a_final_checkpoint_even_right_after_another(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path, checkpoint_every=1)
    writer.submit(exchange(0))
    assert writer.flush()
    assert types(path)[-1] == "checkpoint"
    assert all("final" not in r for r in records(path))
    writer.close()
    written = records(path)
    assert [r["type"] for r in written[-2:]] == ["checkpoint", "checkpoint"]
    assert written[-1]["final"] is True
    assert verify(path, [VERIFY], strict=True).ok


def test_a_record_appended_after_a_clean_close_is_a_break(
    tmp_path: Path, make: Callable[..., RecordWriter]
) -> None:
    path = tmp_path / "record.jsonl"
    first = make(path)
    first.submit(exchange(1))
    first.close()
    anchors = checkpoint_anchors(path)
    line = forge(path)
    second = make(path)
    second.submit(exchange(2))
    second.close()
    anchors.update(checkpoint_anchors(path))
    for strict in (False, True):
        report = verify(path, [VERIFY], strict=strict, anchors=anchors)
        assert report.first_break is not None
        assert (report.first_break.line, report.first_break.record_id) == (line, "forged")
        assert report.first_break.reason.startswith("a record after the final checkpoint of a run")


@pytest.mark.parametrize(
    ("checkpoint_every", "where", "unsigned"),
    [
        (1, "line {forged}: records after the last checkpoint of a run", 1),
        (100, "lines 2-{forged}: records of a run without a checkpoint", 2),
    ],
    ids=["after-a-checkpoint", "no-checkpoint"],
)
def test_a_record_appended_after_a_crash_is_not_vouched_for_by_the_next_run(
    tmp_path: Path, make: Callable[..., RecordWriter], checkpoint_every: int, where: str, unsigned: int
) -> None:
    path = tmp_path / "record.jsonl"
    writer = make(path, checkpoint_every=checkpoint_every)
    writer.submit(exchange(1))
    assert writer.flush()
    crashed = tmp_path / "crashed.jsonl"
    shutil.copyfile(path, crashed)  # the file as a writer killed now leaves it: no final checkpoint
    writer.close()
    anchors = checkpoint_anchors(crashed)
    line = forge(crashed)
    second = make(crashed)
    second.submit(exchange(2))
    second.close()
    anchors.update(checkpoint_anchors(crashed))
    report = verify(crashed, [VERIFY], anchors=anchors)
    assert report.ok, report.first_break
    assert (report.unsigned, report.unsigned_tail) == (unsigned, 0)
    assert report.signed_through == records(crashed)[-1]["seq"]
    assert [w for w in report.warnings if w.startswith(where.format(forged=line))]
    strict = verify(crashed, [VERIFY], strict=True, anchors=anchors)
    assert strict.first_break is not None
    assert strict.first_break.line == line - unsigned + 1


def test_a_tail_changed_during_a_write_failure_begins_a_new_run(
    tmp_path: Path, make: Callable[..., RecordWriter], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "record.jsonl"
    write = FailingWrite({2})
    writer = make(path, write=write, retry_seconds=3600)
    writer.submit(exchange(1))
    assert writer.flush()
    assert not writer.healthy
    start = records(path)[-1]
    line = forge(path)
    forged = records(path)[-1]
    writer.submit(exchange(2))
    assert writer.flush()
    assert writer.healthy
    writer.close()
    changed = [r for r in caplog.records if r.getMessage() == "audit_tail_changed"]
    assert len(changed) == 1
    assert changed[0].levelno == logging.ERROR
    assert (changed[0].__dict__["expected_seq"], changed[0].__dict__["expected_hash"]) == (
        start["seq"],
        start["hash"],
    )
    assert (changed[0].__dict__["seq"], changed[0].__dict__["hash"]) == (forged["seq"], forged["hash"])
    written = records(path)
    assert [r["type"] for r in written] == ["start", "exchange", "start", "gap", "exchange", "checkpoint"]
    restart = written[line]
    assert restart["reason"] == "the file's tail changed under the writer"
    assert restart["resumed"] == {"seq": forged["seq"], "hash": forged["hash"]}
    report = verify(path, [VERIFY])
    assert report.ok, report.first_break
    assert report.unsigned == 1
    assert [w for w in report.warnings if w.startswith(f"line {line}: records of a run without a checkpoint")]
    strict = verify(path, [VERIFY], strict=True, anchors=checkpoint_anchors(path))
    assert strict.first_break is not None
    assert (strict.first_break.line, strict.first_break.record_id) == (line, "forged")
