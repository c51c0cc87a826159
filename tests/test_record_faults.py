"""The session record's disk failing while the server serves, in both ``audit.on_error`` modes, through the
real gRPC server: the record file removed or renamed away, its folder read-only, the disk full (the
path turned to /dev/full, and back). ``fail_closed`` refuses new requests with 503 ``audit_unavailable``
while the record cannot be written and lets nothing pass unaccounted for; ``continue`` serves and counts
the loss (the records_lost metric, then a ``gap`` record); both write again once the fault clears."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

import extproc.audit.session
from extproc.audit.record import iter_records, verify
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server
from extproc.settings import load_settings

from .test_server import request_headers

pytestmark = pytest.mark.slow  # each waits out a retry of the writer, or a second of refusals

MODES = ["fail_closed", "continue"]


@dataclass
class Served:
    """The requests a test sent, by request id: which were served, and which refused with what."""

    server: Server
    record: Path
    served: list[str] = field(default_factory=list)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    count: int = 0

    async def ask(self) -> str:
        """One exchange, as Envoy runs it: headers, a body with an address in it, the end. Its request id;
        ``served`` or ``refused`` says what became of it."""
        self.count += 1
        request_id = f"req-{self.count}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.server.grpc_port}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(request_headers(("content-type", "text/plain"), ("x-request-id", request_id)))
            answer = await call.read()
            if answer.HasField("immediate_response"):
                error = json.loads(answer.immediate_response.body)["error"]
                self.refused[request_id] = (answer.immediate_response.status.code, error)
            else:
                body = pb.HttpBody(body=b"mail a@b.io", end_of_stream=True)
                await call.write(pb.ProcessingRequest(request_body=body))
                await call.read()
                self.served.append(request_id)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        return request_id

    async def until_served(self, within: float = 15.0) -> str:
        """Asks until a request is served (the fault has cleared and, failing closed, the loss's cool-down
        is over); its request id."""
        async with asyncio.timeout(within):
            # Each try is a request, at a pace: no event says when the server will serve again.
            while (request_id := await self.ask()) not in self.served:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        return request_id

    async def until_refused(self, within: float = 15.0) -> str:
        async with asyncio.timeout(within):
            while (request_id := await self.ask()) not in self.refused:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        return request_id

    @property
    def writer(self) -> Any:
        assert self.server.recorder is not None
        return self.server.recorder.writer


def lines(path: Path) -> list[dict[str, Any]]:
    return [line for _, line in iter_records(path, skip_invalid=True)] if path.exists() else []


def recorded_ids(*paths: Path) -> set[str]:
    return {line["request_id"] for path in paths for line in lines(path) if line["type"] == "exchange"}


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Until ``condition`` holds: the writer's thread writes off the request path."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - a file and a thread: nothing to await
            await asyncio.sleep(0.02)


async def records_lost_metric(server: Server) -> float:
    url = f"http://127.0.0.1:{server.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        text = await answer.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "extproc_audit_records_lost_total"
    )


@pytest.fixture(autouse=True)
def short_cool_down(monkeypatch: pytest.MonkeyPatch) -> None:
    # Failing closed, requests stay refused for 5 s after a loss; 1 s here keeps the tests short.
    monkeypatch.setattr(extproc.audit.session, "LOSS_COOLDOWN_SECONDS", 1.0)


@contextlib.asynccontextmanager
async def serving(path: Path, on_error: str) -> AsyncIterator[Served]:
    settings = load_settings(
        None,
        server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0},
        audit={"record_path": str(path), "on_error": on_error},
        identity={"mode": "none"},
    )
    server = Server(settings, Runtime(build_snapshot(settings)))
    await server.start()
    try:
        yield Served(server, path)
    finally:
        await server.stop(drain=False)


def assert_accounted_for(served: Served, *files: Path) -> None:
    """Every request served is in a record file, or counted in a gap record of one: nothing passed
    unaccounted for."""
    missing = set(served.served) - recorded_ids(*files)
    gaps = [line for path in files for line in lines(path) if line["type"] == "gap"]
    assert len(missing) <= sum(gap["lost"] for gap in gaps), (missing, gaps)


def assert_refused_while_failing(served: Served, on_error: str, asked: list[str]) -> None:
    if on_error == "fail_closed":
        assert {served.refused.get(r) for r in asked} == {(503, "audit_unavailable")}, served.refused
    else:
        assert set(asked) <= set(served.served), served.refused


# -- the file removed, or renamed away (as log rotation does) ------------------------------------------


@pytest.mark.parametrize("on_error", MODES)
@pytest.mark.parametrize("fault", ["removed", "renamed"])
async def test_a_record_file_removed_or_renamed_is_created_again_and_names_the_file_it_replaces(
    tmp_path: Path, on_error: str, fault: str
) -> None:
    """Appending to a file no longer at its path would lose every record with it: the writer opens the
    path again, and the new file starts a new run whose ``start`` record names the last record of the
    file before. Nothing is refused or lost meanwhile, in either mode."""
    path = tmp_path / "session.jsonl"
    moved = tmp_path / "session.jsonl.1"
    async with serving(path, on_error) as served:
        first = await served.ask()
        await eventually(lambda: first in recorded_ids(path))
        last = lines(path)[-1]
        if fault == "removed":
            path.unlink()
        else:
            path.rename(moved)
        after = [await served.ask() for _ in range(3)]
        await eventually(lambda: set(after) <= recorded_ids(path))
        assert served.refused == {}
        assert served.writer.healthy
        assert served.writer.lost == 0
    start, *rest = lines(path)
    assert start["type"] == "start"
    assert start["replaces"] == {"seq": last["seq"], "hash": last["hash"]}
    assert "removed or replaced" in start["reason"]
    assert start["seq"] == 0  # a file of its own: it verifies alone
    assert verify(path).ok
    assert [line["request_id"] for line in rest if line["type"] == "exchange"] == after
    if fault == "renamed":  # the rotated file still ends with the record the new one names
        assert lines(moved)[-1]["hash"] == last["hash"]
        assert verify(moved).ok
        assert_accounted_for(served, path, moved)


# -- the folder read-only ------------------------------------------------------------------------------


def set_writable(folder: Path, writable: bool) -> None:
    """Whether files can be created in ``folder`` and removed from it. Root, whom permissions do not
    stop, gets an immutable folder instead (chattr +i: ext4, xfs, btrfs); anyone else a read-only mode."""
    if os.geteuid() != 0:
        folder.chmod(0o700 if writable else 0o500)
        return
    done = subprocess.run(
        ["chattr", "-i" if writable else "+i", str(folder)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"running as root, and chattr cannot make {folder} immutable: {done.stderr.decode()}")


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[None]:
    set_writable(folder, False)
    try:
        yield
    finally:
        set_writable(folder, True)


@contextlib.contextmanager
def writable(folder: Path) -> Iterator[None]:
    set_writable(folder, True)
    try:
        yield
    finally:
        set_writable(folder, False)


@pytest.mark.parametrize("on_error", MODES)
async def test_a_read_only_folder_does_not_stop_the_record_until_its_file_must_be_created(
    tmp_path: Path, on_error: str
) -> None:
    """A folder turned read-only under a running writer changes nothing while the file is there: it is
    open, and appends go on. Removed then (a folder that forbids creating can still lose its file to a
    rotation done before), the record cannot be opened again: failing closed, new requests get 503
    ``audit_unavailable``; with ``continue`` they are served and the loss counted. Writable again, the
    file is created, begins with a ``start`` record naming the file before and a ``gap`` record counting
    what was lost, and service resumes."""
    folder = tmp_path / "audit"
    path = folder / "session.jsonl"
    async with serving(path, on_error) as served:
        first = await served.ask()
        await eventually(lambda: first in recorded_ids(path))
        last = lines(path)[-1]
        with read_only_folder(folder):
            with pytest.raises(PermissionError):  # EPERM as root (immutable), EACCES otherwise
                (folder / "probe").touch()
            during = [await served.ask() for _ in range(3)]
            await eventually(lambda: set(during) <= recorded_ids(path))
            assert served.refused == {}
            assert served.writer.healthy

            # The file goes (the folder was writable for that one moment) and cannot come back.
            with writable(folder):
                path.unlink()
            lost_before = await records_lost_metric(served.server)
            trigger = await served.ask()  # its record is what finds the file gone
            await eventually(lambda: not served.writer.healthy)
            asked = [await served.ask() for _ in range(3)]
            assert_refused_while_failing(served, on_error, asked)
            assert not path.exists()
            await eventually(lambda: served.writer.lost >= 1)
            assert await records_lost_metric(served.server) > lost_before
        resumed = await served.until_served()
        await eventually(lambda: resumed in recorded_ids(path))
        assert served.writer.healthy
    start, gap, *_ = lines(path)
    assert start["type"] == "start"
    assert start["replaces"]["seq"] >= last["seq"]
    assert gap["type"] == "gap"
    assert gap["lost"] >= 1
    assert verify(path).ok
    assert trigger not in recorded_ids(path)
    # What was served after the file went is in the new file (the records queued while the writer waited
    # to try again are written once it can), or counted by its gap record.
    missing = set(served.served) - recorded_ids(path) - {first, *during}
    assert trigger in missing
    assert len(missing) <= gap["lost"]
    if on_error == "fail_closed":
        assert missing == {trigger}  # served before the fault showed, and named lost: nothing after it


# -- the disk full -------------------------------------------------------------------------------------


def point(link: Path, target: Path) -> None:
    """Turns the symbolic link ``link`` to ``target`` at once (a new link renamed over the old)."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(target)
    new.replace(link)


@pytest.mark.parametrize("on_error", MODES)
async def test_a_full_disk_fails_as_the_mode_says_and_the_record_resumes_when_there_is_room(
    tmp_path: Path, on_error: str
) -> None:
    """The record's path turns to /dev/full while serving (every write fails with ENOSPC, as on a full
    disk: a small tmpfs would need root and a mount namespace of its own), then to a file on a disk with
    room. Failing closed, requests are refused with 503 ``audit_unavailable`` until the record is written
    again, and the one served as the disk filled is named lost; with ``continue`` all are served and the
    loss counted, in the metric at once and in a ``gap`` record once there is room."""
    path = tmp_path / "session.jsonl"
    full_disk, roomy = tmp_path / "disk-1.jsonl", tmp_path / "disk-2.jsonl"
    path.symlink_to(full_disk)
    async with serving(path, on_error) as served:
        first = await served.ask()
        await eventually(lambda: first in recorded_ids(full_disk))
        last = lines(full_disk)[-1]
        assert await records_lost_metric(served.server) == 0

        point(path, Path("/dev/full"))
        trigger = await served.ask()  # its record is the first write that finds the disk full
        await eventually(lambda: not served.writer.healthy)
        asked = [await served.ask() for _ in range(3)]
        assert_refused_while_failing(served, on_error, asked)
        assert await records_lost_metric(served.server) >= 1

        point(path, roomy)
        resumed = await served.until_served()
        await eventually(lambda: resumed in recorded_ids(roomy))
        assert served.writer.healthy
    start, gap, *_ = lines(roomy)
    assert start["type"] == "start"
    assert start["replaces"] == {"seq": last["seq"], "hash": last["hash"]}
    assert gap["type"] == "gap"
    assert gap["lost"] >= 1
    assert "No space left on device" in gap["reason"]
    assert verify(roomy).ok
    assert verify(full_disk).ok
    missing = set(served.served) - recorded_ids(full_disk, roomy)
    assert trigger in missing
    assert len(missing) <= gap["lost"]
    if on_error == "fail_closed":
        assert missing == {trigger}
