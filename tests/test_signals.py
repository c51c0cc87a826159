"""`extproc serve` and the signals it is sent: a real process, real signals, and the session record it
leaves behind verified as an auditor would (`extproc audit verify --public-key`)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.audit.keys import generate_keys
from extproc.audit.record import iter_records
from extproc.cli import main
from extproc.server import Server

from .test_server import request_headers


class Serve:
    """One `extproc serve` process on free ports, its log lines read as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.lines: list[dict[str, Any]] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve", *args],
            stderr=subprocess.PIPE,
            text=True,
            env={
                "EXTPROC_SERVER__DRAIN_SECONDS": "0",
                "EXTPROC_DETECT__CACHE_DIR": os.environ["EXTPROC_DETECT__CACHE_DIR"],
                "EXTPROC_IDENTITY__MODE": "none",
                "PATH": "/usr/bin:/bin",
                **env,
            },
        )

    def wait_for(self, event: str) -> dict[str, Any]:
        """The first log line with this event, reading on until it comes (or the process ends)."""
        assert self.process.stderr is not None
        for seen in self.lines:
            if seen.get("event") == event:
                return seen
        while text := self.process.stderr.readline():
            if not text.startswith("{"):
                continue  # grpc's own C-level messages are not JSON
            line: dict[str, Any] = json.loads(text)
            self.lines.append(line)
            if line.get("event") == event:
                return line
        raise AssertionError(f"the server ended without logging {event}: {self.lines}")

    def ports(self) -> tuple[int, int]:
        ready = self.wait_for("ready")
        return int(ready["grpc"].rpartition(":")[2]), int(ready["admin"].rpartition(":")[2])

    def finish(self, timeout: float = 30) -> int:
        """Wait for the exit; every log line read."""
        _, rest = self.process.communicate(timeout=timeout)
        self.lines += [json.loads(text) for text in rest.splitlines() if text.startswith("{")]
        return self.process.returncode

    def events(self) -> list[str]:
        return [line["event"] for line in self.lines]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


@pytest.fixture
def serve() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    return generate_keys(tmp_path / "keys")


def audited_env(record: Path, keys: dict[str, Path]) -> dict[str, str]:
    return {
        "EXTPROC_AUDIT__RECORD_PATH": str(record),
        "EXTPROC_AUDIT__SEALING_KEY_FILE": str(keys["auditor_pub"]),
        "EXTPROC_AUDIT__SIGNING_KEY_FILE": str(keys["signing_key"]),
        # No checkpoint before the stop: the one that makes the record verify is the final one.
        "EXTPROC_AUDIT__CHECKPOINT_EVERY": "1000",
        "EXTPROC_AUDIT__CHECKPOINT_SECONDS": "3600",
    }


FREE_PORTS = (
    "--grpc-address",
    "127.0.0.1:0",
    "--admin-address",
    "127.0.0.1:0",
    "--approvals-address",
    "127.0.0.1:0",
)


async def exchange(port: int, text: bytes) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(request_headers(("content-type", "text/plain")))
        await call.read()
        await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=text, end_of_stream=True)))
        answer: pb.ProcessingResponse = await call.read()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        return bytes(answer.request_body.response.body_mutation.body)


async def readyz(port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as answer:
        return answer.status


def verify(record: Path, keys: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "audit",
            "verify",
            str(record),
            "--public-key",
            str(keys["signing_pub"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def last_record(record: Path) -> dict[str, Any]:
    return [entry for _, entry in iter_records(record)][-1]


async def test_sighup_reloads_and_the_server_keeps_serving(
    serve: list[Serve], tmp_path: Path, keys: dict[str, Path]
) -> None:
    """Regression: SIGHUP ended the process with no log line and no final checkpoint. It reloads now."""
    record = tmp_path / "session.jsonl"
    server = Serve(audited_env(record, keys), *FREE_PORTS)
    serve.append(server)
    grpc_port, admin_port = server.ports()
    server.process.send_signal(signal.SIGHUP)
    reloaded = server.wait_for("reloaded")
    assert reloaded["reason"] == "SIGHUP"
    assert reloaded["version"] == reloaded["previous"]  # nothing changed: the same inputs, the same version
    assert server.process.poll() is None
    assert await readyz(admin_port) == 200
    assert await exchange(grpc_port, b"to a@b.io") == b"to [REDACTED:EMAIL_ADDRESS]"
    server.process.send_signal(signal.SIGTERM)
    assert server.finish() == 0
    assert verify(record, keys).returncode == 0


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_drains_and_ends_the_record_with_a_signed_final_checkpoint(
    serve: list[Serve], tmp_path: Path, keys: dict[str, Path], stop: signal.Signals
) -> None:
    record = tmp_path / "session.jsonl"
    server = Serve(audited_env(record, keys), *FREE_PORTS)
    serve.append(server)
    grpc_port, _ = server.ports()
    for n in range(3):
        await exchange(grpc_port, f"mail a{n}@b.io".encode())
    server.process.send_signal(stop)
    assert server.finish() == 0
    assert {"signal_received", "draining", "stopped"} <= set(server.events())
    assert next(line for line in server.lines if line["event"] == "signal_received")["signal"] == stop.name
    checked = verify(record, keys)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "signed through" in checked.stdout
    final = last_record(record)
    assert final["type"] == "checkpoint"
    assert final["final"] is True
    assert sum(1 for _, entry in iter_records(record) if entry["type"] == "exchange") == 3


def test_a_port_in_use_is_logged_as_the_reason_and_the_record_is_still_closed(
    serve: list[Serve], tmp_path: Path, keys: dict[str, Path]
) -> None:
    record = tmp_path / "session.jsonl"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        ports = ("--admin-address", "127.0.0.1:0", "--approvals-address", "127.0.0.1:0")
        server = Serve(audited_env(record, keys), "--grpc-address", address, *ports)
        serve.append(server)
        assert server.finish() == 2
    [failed] = [line for line in server.lines if line["event"] == "serve_failed"]
    assert failed["level"] == "error"
    assert address in failed["error"]
    assert "ready" not in server.events()
    # The record had been opened: it is closed with its final checkpoint, as on a stop.
    assert verify(record, keys).returncode == 0
    assert last_record(record)["final"] is True


def test_a_missing_rules_folder_is_logged_as_the_reason(serve: list[Serve], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-rules"
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"detect:\n  rules: [{missing}]\n")
    server = Serve({}, "--config", str(settings), *FREE_PORTS)
    serve.append(server)
    assert server.finish() == 2
    [failed] = [line for line in server.lines if line["event"] == "serve_failed"]
    assert str(missing) in failed["error"]
    assert failed["error_type"] == "ConfigError"


def test_an_unexpected_failure_is_logged_with_its_traceback_and_the_record_closed(
    tmp_path: Path,
    keys: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = Server.start

    async def start_then_fail(self: Server) -> None:
        await started(self)
        raise RuntimeError("a bug after start-up")

    record = tmp_path / "session.jsonl"
    for name, value in audited_env(record, keys).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EXTPROC_IDENTITY__MODE", "none")
    monkeypatch.setattr(Server, "start", start_then_fail)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    assert main(["serve", *FREE_PORTS]) == 1

    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # as it found them
    lines = [json.loads(text) for text in capsys.readouterr().err.splitlines() if text.startswith("{")]
    [failed] = [line for line in lines if line["event"] == "serve_failed"]
    assert failed["level"] == "critical"
    assert failed["error"] == "a bug after start-up"
    assert "RuntimeError" in failed["exception"]
    assert last_record(record)["final"] is True
    assert verify(record, keys).returncode == 0
