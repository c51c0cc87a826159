"""What one exchange costs extproc's own code, without gRPC's transport, Envoy or a load generator.

The real servicer (``ExternalProcessor.Process``) is driven in-process with the messages Envoy sends for
the proxy bench's chat request and the demo model's answer: request headers (with a dev-issuer token
to verify), the request body, response headers, the response body; the answers are serialised as they
would be sent. Telemetry is as ``extproc serve`` has it by default (Prometheus metrics, no spans); the
exchange log line goes to a null stream through the same queue handler. Repeated for ``seconds`` and
reported as microseconds of CPU per exchange, with cProfile's top entries from one more pass.

It is steadier than the proxy figures on a shared machine (no other process on the path) and so is the
one to compare two trees with: ``PYTHONPATH=<other tree> python -m bench --only exchange``.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import logging
import pstats
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import logs
from extproc.identity.dev import dev_identity, mint_dev_token
from extproc.runtime import Runtime, build_snapshot
from extproc.server import ExternalProcessor
from extproc.settings import LogSettings, load_settings
from extproc.telemetry import Telemetry


class _Context:
    """What the servicer asks of a gRPC context: the stream's metadata; an abort is a failure here."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)

    async def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"the exchange was aborted: {code} {details}")


def _headers(kind: str, items: list[tuple[str, str]], end: bool = False) -> bytes:
    block = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items])
    message = pb.ProcessingRequest(**{kind: pb.HttpHeaders(headers=block, end_of_stream=end)})
    if kind == "request_headers":
        message.protocol_config.request_body_mode = 2  # BUFFERED
        message.protocol_config.response_body_mode = 4  # FULL_DUPLEX_STREAMED
    return message.SerializeToString()


def messages(prompt: bytes, token: str) -> list[bytes]:
    """The serialised messages of one exchange, as Envoy sends them for the bench's request."""
    content = json.loads(prompt)["messages"][-1]["content"]
    answer = json.dumps(
        {
            "id": "chatcmpl-0123456789abcdef",
            "object": "chat.completion",
            "created": 1765000000,
            "model": "demo-small",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()
    request = [
        (":authority", "127.0.0.1:10000"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("authorization", f"Bearer {token}"),
        ("content-length", str(len(prompt))),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "3b6c1a2e-7f4d-4c2a-9b1e-0a5f2c7d8e91"),
    ]
    response = [
        (":status", "200"),
        ("content-type", "application/json; charset=utf-8"),
        ("content-length", str(len(answer))),
        ("date", "Sun, 06 Dec 2026 20:00:00 GMT"),
        ("server", "envoy"),
        ("x-envoy-upstream-service-time", "1"),
    ]
    return [
        _headers("request_headers", request),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=prompt, end_of_stream=True)).SerializeToString(),
        _headers("response_headers", response),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=answer, end_of_stream=True)).SerializeToString(),
    ]


async def _one(processor: ExternalProcessor, wire: list[bytes]) -> list[bytes]:
    """One exchange; its answers, serialised."""

    async def incoming() -> AsyncIterator[pb.ProcessingRequest]:
        for data in wire:
            yield pb.ProcessingRequest.FromString(data)

    return [answer.SerializeToString() async for answer in processor.Process(incoming(), _Context())]  # type: ignore[arg-type]


def check_masked(answers: list[bytes], values: tuple[str, ...]) -> None:
    """The answers replace both bodies and none of ``values`` is left in them: a figure for a path
    that lets values through would measure the wrong thing."""
    bodies = [pb.ProcessingResponse.FromString(a) for a in answers]
    request = [b.request_body.response.body_mutation.body for b in bodies if b.HasField("request_body")]
    response = [
        b.response_body.response.body_mutation.streamed_response.body
        for b in bodies
        if b.HasField("response_body")
    ]
    if not request or not response or not all(request) or not any(response):
        raise RuntimeError("the bench's exchange was not masked as expected: no body was replaced")
    for body in (*request, *response):
        if any(value.encode() in body for value in values):
            raise RuntimeError("the bench's exchange let a value through")


async def _measure(seconds: float, prompt: bytes, values: tuple[str, ...]) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="extproc-bench-exchange-"))
    settings = load_settings(None, identity=dev_identity(folder))
    runtime = Runtime(build_snapshot(settings))
    await runtime.snapshot.start()
    telemetry = Telemetry(settings.telemetry)
    processor = ExternalProcessor(runtime, telemetry.instruments)
    wire = messages(prompt, mint_dev_token(folder, "bench", [], 3600))
    try:
        for _ in range(200):  # warm-up: caches, the first verification, the metric series
            await _one(processor, wire)
        check_masked(await _one(processor, wire), values)
        count = 0
        started, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            await _one(processor, wire)
            count += 1
        used = time.process_time() - cpu
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(300):
            await _one(processor, wire)
        profile.disable()
    finally:
        await runtime.snapshot.close()
        telemetry.shutdown()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(r"extproc|envoy|opentelemetry", 25)
    per_exchange = round(used / count * 1e6, 1)
    return {"exchanges": count, "cpu_us_per_exchange": per_exchange, "profile": out.getvalue()}


def run(seconds: float, prompt: bytes, values: tuple[str, ...]) -> dict[str, Any]:
    """``values``: what the prompt holds that must come out masked in both directions."""
    # The exchange log line is formatted and written by the queue handler's thread, as in `serve`; here
    # to a stream nobody reads. The logging set up before is put back after.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.configure(LogSettings(level="info", format="json"), background=True, stream=io.StringIO())
    try:
        return asyncio.run(_measure(seconds, prompt, values))
    finally:
        logs.shutdown()
        root.handlers[:] = handlers
        root.setLevel(level)


def markdown(report: dict[str, Any]) -> str:
    return (
        f"Exchange cost in-process, {report['when']}: {report['cpu_us_per_exchange']} µs of CPU per "
        f"exchange ({report['exchanges']} exchanges; request headers with a token, a "
        f"{report['prompt_bytes']}-byte chat request, response headers, the echoed answer).\n\n"
        "Top of the profile (cProfile, cumulative, 300 exchanges):\n\n```\n" + report["profile"] + "```\n"
    )
