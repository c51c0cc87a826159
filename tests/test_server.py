"""The grpc.aio server for real: fail-closed aborts, health, graceful shutdown."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.audit.record import iter_records, verify
from extproc.errors import ConfigError
from extproc.exchange import Exchange
from extproc.identity.dev import dev_identity
from extproc.model import Outcome
from extproc.runtime import Runtime, build_snapshot
from extproc.server import SERVICE_NAME, Server
from extproc.settings import load_settings


def _settings(drain: float = 0.0, grace: float = 5.0):  # type: ignore[no-untyped-def]
    return load_settings(
        None,
        server={
            "grpc_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "drain_seconds": drain,
            "grace_seconds": grace,
        },
        identity={"mode": "none"},
    )


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    settings = _settings()
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    yield srv
    await srv.stop()


def request_headers(*items: tuple[str, str], eos: bool = False) -> pb.ProcessingRequest:
    """Envoy's first message; it carries a forwarded path unless ``items`` name one."""
    if not any(name == ":path" for name, _ in items):
        items = ((":path", "/v1/chat/completions"), *items)
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items]
            ),
            end_of_stream=eos,
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=2, response_body_mode=4),
    )


async def test_a_protocol_violation_aborts_the_stream_instead_of_closing_it_cleanly(server: Server) -> None:
    # A clean close (status OK) makes Envoy forward the request unprocessed: errors must abort.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"x", end_of_stream=True)))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.INTERNAL
        assert "stream opened with request_body" in (failure.value.details() or "")


async def test_an_unsupported_body_mode_aborts(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        message = request_headers(("content-type", "application/json"))
        message.protocol_config.response_body_mode = 3  # BUFFERED_PARTIAL lets bytes through unscanned
        await call.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.INTERNAL


async def test_a_full_exchange_over_grpc(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(request_headers(("content-type", "text/plain")))
        first = await call.read()
        assert first.HasField("request_headers")
        await call.write(
            pb.ProcessingRequest(request_body=pb.HttpBody(body=b"to a@b.io", end_of_stream=True))
        )
        second = await call.read()
        assert second.request_body.response.body_mutation.body == b"to [REDACTED:EMAIL_ADDRESS]"
        await call.done_writing()


async def test_health_reports_serving_then_not_serving_while_draining() -> None:
    settings = _settings(drain=1.0)
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # A stream opened before the stop finishes during the grace period.
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(request_headers(("content-type", "text/plain")))
        await call.read()
        stopping = asyncio.create_task(srv.stop())
        async with asyncio.timeout(5):  # NOT_SERVING is the stop's first step; the drain lasts 1 s
            while (  # noqa: ASYNC110 - health is asked, it does not call back
                await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.02)
        assert not stopping.done()  # still draining: the stream opened before is still served
        await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"late", end_of_stream=True)))
        assert (await call.read()).HasField("request_body")
        await call.done_writing()
        await stopping


def test_serve_stops_cleanly_on_sigterm() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extproc",
            "serve",
            "--grpc-address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
            "--approvals-address",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={
            "EXTPROC_SERVER__DRAIN_SECONDS": "0",
            "EXTPROC_DETECT__CACHE_DIR": os.environ["EXTPROC_DETECT__CACHE_DIR"],
            "EXTPROC_IDENTITY__MODE": "none",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert process.stderr is not None
    events: list[str] = []
    while not events or events[-1] != "ready":
        text = process.stderr.readline()
        assert text, f"the server ended before it was ready: {events}"
        if text.startswith("{"):  # grpc's own C-level messages are not JSON
            events.append(json.loads(text)["event"])
    assert "identity_none" in events  # the settings chose no identity: said before serving
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=20)
    assert process.returncode == 0
    assert '"event": "stopped"' in rest


async def _audited_server(record_path: str, on_error: str) -> Server:
    settings = load_settings(
        None,
        server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0},
        audit={"record_path": record_path, "on_error": on_error},
        identity={"mode": "none"},
    )
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    return srv


async def _first_answer(port: int) -> pb.ProcessingResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(request_headers(("content-type", "text/plain")))
        answer: pb.ProcessingResponse = await call.read()
        await call.done_writing()
        return answer


async def _readyz(port: int) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as answer:
        return answer.status, (await answer.json())["status"]


async def test_a_session_record_that_cannot_be_written_refuses_requests_when_fail_closed() -> None:
    # /dev/full fails every write with ENOSPC: a full disk, for real.
    srv = await _audited_server("/dev/full", "fail_closed")
    try:
        answer = await _first_answer(srv.grpc_port)
        assert answer.HasField("immediate_response")
        assert answer.immediate_response.status.code == 503
        assert json.loads(answer.immediate_response.body)["error"] == "audit_unavailable"
        assert await _readyz(srv.admin_port) == (503, "audit_unavailable")
    finally:
        await srv.stop()


async def test_a_session_record_that_cannot_be_written_is_marked_lost_when_set_to_continue() -> None:
    srv = await _audited_server("/dev/full", "continue")
    try:
        answer = await _first_answer(srv.grpc_port)
        assert answer.HasField("request_headers")  # served: the record is incomplete, and says so
        assert await _readyz(srv.admin_port) == (200, "serving")
        assert srv.recorder is not None
        assert not srv.recorder.writer.healthy
    finally:
        await srv.stop()
    assert srv.recorder.writer.lost >= 1


async def test_each_exchange_is_recorded_when_its_stream_ends(tmp_path: Path) -> None:
    path = tmp_path / "session.jsonl"
    srv = await _audited_server(str(path), "fail_closed")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(request_headers(("content-type", "text/plain"), (":path", "/v1/x")))
            await call.read()
            await call.write(
                pb.ProcessingRequest(request_body=pb.HttpBody(body=b"to a@b.io", end_of_stream=True))
            )
            await call.read()
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
    finally:
        await srv.stop()
    [record] = [r for _, r in iter_records(path) if r["type"] == "exchange"]
    assert record["route"] == "/v1/x"
    assert record["request"]["masked"] == "to [REDACTED:EMAIL_ADDRESS]"
    assert record["findings"] == {
        "request": [{"rule": "email-address", "entity": "EMAIL_ADDRESS", "start": 3, "end": 9}]
    }
    assert "sealed" not in record  # no auditor key configured: originals are not kept at all
    assert verify(path).first_break is None


async def test_an_exchange_whose_record_cannot_be_made_leaves_a_gap_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Exchange, error_code: str | None = None) -> Outcome:
        raise RuntimeError("a bug")

    path = tmp_path / "session.jsonl"
    srv = await _audited_server(str(path), "fail_closed")
    monkeypatch.setattr(Exchange, "outcome", broken)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(request_headers(("content-type", "text/plain")))
            first = await call.read()
            decision_id = dict(
                (h.header.key, h.header.raw_value.decode())
                for h in first.request_headers.response.header_mutation.set_headers
            )["x-dlp-decision-id"]
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=b"hi", end_of_stream=True)))
            await call.read()
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF  # the stream itself ends as usual
        assert srv.recorder is not None
        assert not srv.recorder.serving  # fail_closed: a lost record stops requests for a while
    finally:
        await srv.stop()
    [gap] = [r for _, r in iter_records(path) if r["type"] == "gap"]
    assert gap["first_lost_id"] == decision_id
    assert gap["lost"] == 1


# -- identity must be chosen; none is said out loud -----------------------------------------------------


def test_a_server_refuses_settings_that_choose_no_identity_mode() -> None:
    settings = load_settings(None, server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"})
    assert settings.identity.mode is None
    with pytest.raises(ConfigError, match=r"identity\.mode is not set"):
        Server(settings, Runtime(build_snapshot(settings)))


def test_serve_without_an_identity_choice_exits_2_naming_the_setting(tmp_path: Path) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text("log:\n  level: info\n")  # a file, but no identity section
    process = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(settings)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"EXTPROC_DETECT__CACHE_DIR": os.environ["EXTPROC_DETECT__CACHE_DIR"], "PATH": "/usr/bin:/bin"},
    )
    assert process.returncode == 2
    lines = [json.loads(t) for t in process.stderr.splitlines() if t.startswith("{")]
    [failed] = [line for line in lines if line["event"] == "serve_failed"]
    assert "identity.mode is not set" in failed["error"]
    assert "ready" not in {line["event"] for line in lines}


async def _readyz_body(port: int) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as answer:
        return answer.status, await answer.json()


async def test_identity_none_is_a_warning_at_start_up_and_on_readyz(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # The fixture's settings say identity mode none in so many words; the server started with them.
    [warned] = [r for r in caplog.get_records("setup") if r.getMessage() == "identity_none"]
    assert warned.levelno == logging.WARNING
    status, body = await _readyz_body(server.admin_port)
    assert status == 200  # still ready: none is allowed, when chosen
    assert body["status"] == "serving"
    assert body["identity"] == "none"
    assert "not authenticated" in str(body["warning"])


async def test_readyz_names_the_identity_mode_and_warns_of_nothing_when_callers_are_verified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(
        None,
        server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0},
        identity=dev_identity(tmp_path),
    )
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    try:
        status, body = await _readyz_body(srv.admin_port)
        assert (status, body) == (200, {"status": "serving", "identity": "jwt"})
        assert not [r for r in caplog.records if r.getMessage() == "identity_none"]
    finally:
        await srv.stop(drain=False)


async def test_a_read_past_its_deadline_loses_no_message_and_a_broken_stream_raises_in_order() -> None:
    """The stream deadline (limits.max_stream_seconds) interrupts a wait, never a read: the message that
    arrives after it is the next one read, and a stream that breaks raises where it broke."""
    import time

    from extproc.server import _EXPIRED, _Messages

    arrive = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        yield "headers"
        await arrive.wait()
        yield "late chunk"
        yield "next chunk"
        raise RuntimeError("stream reset")

    messages = _Messages(source())
    soon = time.monotonic() + 0.05
    assert await messages.next(soon) == "headers"
    assert await messages.next(soon) is _EXPIRED
    arrive.set()
    assert await messages.next(None) == "late chunk"
    assert await messages.next(time.monotonic() + 5) == "next chunk"
    with pytest.raises(RuntimeError, match="stream reset"):
        await messages.next(time.monotonic() + 5)
    messages.close()
