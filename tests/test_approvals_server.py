"""The server's half of an approval, over a real gRPC stream as Envoy speaks it: a hold extends Envoy's
message timeout, waits without blocking other streams, and sends the body on once approved; every step
lands in the session record's chain."""

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.approvals.model import Person
from extproc.audit.record import iter_records, verify
from extproc.identity.dev import DEV_ISSUER, dev_identity, mint_dev_token
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server
from extproc.settings import load_settings

SSN_PROMPT = "customer SSN 594-74-3681 please"
POLICY = """\
policies:
  - id: default
    default: true
    approval:
      approver_groups: [security-reviewers]
      mode: {mode}
      hold_seconds: {hold}
    request:
      actions:
        - when: {{ entities: [US_SSN] }}
          do: approve
"""
REVIEWER = Person("bob", DEV_ISSUER, ("security-reviewers",))


async def start(tmp_path: Path, mode: str = "hold", hold: float = 20) -> Server:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(POLICY.format(mode=mode, hold=hold), encoding="utf-8")
    settings = load_settings(
        None,
        server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0},
        audit={"record_path": str(tmp_path / "session.jsonl")},
        identity=dev_identity(tmp_path / "dev"),
        policy={"paths": [str(tmp_path / "policies")]},
    )
    server = Server(settings, Runtime(build_snapshot(settings)))
    await server.start()
    return server


def headers(token: str) -> pb.ProcessingRequest:
    items = [
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        ("content-type", "application/json"),
        ("authorization", f"Bearer {token}"),
    ]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items]
            )
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=2, response_body_mode=4),
    )


def body(content: str) -> pb.ProcessingRequest:
    data = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]}).encode()
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=True))


async def held(channel: grpc.aio.Channel, token: str) -> Any:
    """A stream whose request needs approval, once the server told Envoy to wait for it."""
    call = pb_grpc.ExternalProcessorStub(channel).Process()
    await call.write(headers(token))
    assert (await call.read()).HasField("request_headers")
    await call.write(body(SSN_PROMPT))
    extend = await call.read()
    assert extend.HasField("override_message_timeout")
    return call


async def test_a_hold_extends_the_timeout_waits_and_sends_the_approved_body_on(tmp_path: Path) -> None:
    server = await start(tmp_path)
    token = mint_dev_token(tmp_path / "dev", "alice", ["support"], 600)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(headers(token))
            assert (await call.read()).HasField("request_headers")
            await call.write(body(SSN_PROMPT))
            extend = await call.read()
            assert extend.HasField("override_message_timeout")
            assert extend.override_message_timeout.seconds == 25  # the hold and a margin
            [pending] = await server.approvals.pending()
            assert "594-74-3681" not in pending.request.prompt
            # Other streams are served meanwhile: the hold awaits, it does not block the loop.
            other = pb_grpc.ExternalProcessorStub(channel).Process()
            await other.write(headers(mint_dev_token(tmp_path / "dev", "carol", [], 600)))
            assert (await asyncio.wait_for(other.read(), 5)).HasField("request_headers")
            other.cancel()
            await server.approvals.decide(pending.id, REVIEWER, True)
            answer = await asyncio.wait_for(call.read(), 5)
            # Approved, nothing of the body is masked: Envoy sends on the body it holds, as it came.
            assert answer.HasField("request_body")
            assert not answer.request_body.response.HasField("body_mutation")
            await call.done_writing()
        assert (await server.approvals.get(pending.id)).status == "used"
    finally:
        await server.stop()
    records = [r for _, r in iter_records(tmp_path / "session.jsonl")]
    steps = [r["event"] for r in records if r["type"] == "approval"]
    assert steps == ["requested", "voted", "approved", "used"]
    voted = next(r for r in records if r["type"] == "approval" and r["event"] == "voted")
    assert voted["actor"]["subject"] == "bob"
    assert voted["requester"]["subject"] == "alice"
    assert "594-74-3681" not in json.dumps(records)  # no record holds the value (no auditor key here)
    [exchange] = [r for r in records if r["type"] == "exchange" and r.get("approval")]
    assert exchange["approval"] == {"id": pending.id, "status": "used"}
    assert verify(tmp_path / "session.jsonl").first_break is None


async def test_a_hold_nobody_decides_ends_in_a_ticket(tmp_path: Path) -> None:
    server = await start(tmp_path, hold=0.5)
    token = mint_dev_token(tmp_path / "dev", "alice", ["support"], 600)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = await held(channel, token)
            answer = await asyncio.wait_for(call.read(), 5)
            assert answer.immediate_response.status.code == 403
            ticket = json.loads(answer.immediate_response.body)
            assert (ticket["error"], ticket["status"]) == ("approval_required", "pending")
            assert ticket["approve_url"].endswith(f"/approvals/{ticket['approval_id']}")
    finally:
        await server.stop()


async def test_a_client_leaving_during_a_hold_ends_the_wait_and_is_recorded(tmp_path: Path) -> None:
    server = await start(tmp_path)
    token = mint_dev_token(tmp_path / "dev", "alice", ["support"], 600)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = await held(channel, token)
            call.cancel()
        for _ in range(100):  # the server notices the cancel and finishes the exchange
            await asyncio.sleep(0.05)
            if server.recorder is not None and server.recorder.writer.written >= 3:
                break
    finally:
        await server.stop()
    records = [r for _, r in iter_records(tmp_path / "session.jsonl")]
    assert [r for r in records if r["type"] == "exchange"], records
    assert verify(tmp_path / "session.jsonl").first_break is None
