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
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from extproc import logs
from extproc.audit.keys import generate_keys
from extproc.audit.session import SessionRecorder
from extproc.audit.spans import SCOPE, Instruments
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


def stream_messages(prompt: bytes, token: str, text: str, chunk_chars: int = 4) -> list[bytes]:
    """The messages of one exchange whose answer is a token stream (SSE, ``stream: true``): the
    request as in ``messages``, then the demo model's events, one body message each, as Envoy passes
    them on in FULL_DUPLEX_STREAMED mode."""
    head = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "created": 1765000000}

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + json.dumps({**head, "model": "demo-small", "choices": [choice]}).encode() + b"\n\n"

    pieces = [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    events = [event({"role": "assistant", "content": ""}), *(event({"content": p}) for p in pieces)]
    events += [event({}, "stop"), b"data: [DONE]\n\n"]
    streamed = json.loads(prompt)
    streamed["stream"] = True
    body = json.dumps(streamed).encode()
    request = messages(body, token)[:2]
    response = [(":status", "200"), ("content-type", "text/event-stream"), ("cache-control", "no-cache")]
    chunks = [
        pb.ProcessingRequest(response_body=pb.HttpBody(body=e, end_of_stream=False)).SerializeToString()
        for e in events
    ]
    end = pb.ProcessingRequest(response_body=pb.HttpBody(body=b"", end_of_stream=True)).SerializeToString()
    return [*request, _headers("response_headers", response), *chunks, end]


async def _one(processor: ExternalProcessor, wire: list[bytes]) -> list[bytes]:
    """One exchange; its answers, serialised."""

    async def incoming() -> AsyncIterator[pb.ProcessingRequest]:
        for data in wire:
            yield pb.ProcessingRequest.FromString(data)

    return [answer.SerializeToString() async for answer in processor.Process(incoming(), _Context())]  # type: ignore[arg-type]


def _bodies(answers: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """The request body and the response bodies the answers send on."""
    decoded = [pb.ProcessingResponse.FromString(a) for a in answers]
    request = [b.request_body.response.body_mutation.body for b in decoded if b.HasField("request_body")]
    response = [
        b.response_body.response.body_mutation.streamed_response.body
        for b in decoded
        if b.HasField("response_body")
    ]
    return request, response


def check_masked(answers: list[bytes], values: tuple[str, ...]) -> None:
    """The answers replace both bodies and none of ``values`` is left in them: a figure for a path
    that lets values through would measure the wrong thing."""
    request, response = _bodies(answers)
    if not request or not response or not all(request) or not any(response):
        raise RuntimeError("the bench's exchange was not masked as expected: no body was replaced")
    for body in (*request, *response):
        if any(value.encode() in body for value in values):
            raise RuntimeError("the bench's exchange let a value through")


def check_stream_masked(answers: list[bytes], values: tuple[str, ...]) -> None:
    """The streamed answer's text, its events' deltas joined, holds none of ``values``."""
    _, response = _bodies(answers)
    text = ""
    for line in b"".join(response).decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    if not text or any(value in text for value in values):
        raise RuntimeError("the bench's token stream let a value through")


async def _cpu(
    processor: ExternalProcessor,
    wire: list[bytes],
    seconds: float,
    settle: Callable[[], object] | None = None,
) -> tuple[int, float]:
    """Exchanges made in ``seconds``, and the process's CPU seconds per exchange (every thread's:
    ``settle`` waits for work left to a thread, the session record's writer)."""
    count = 0
    started, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        await _one(processor, wire)
        count += 1
    if settle is not None:
        settle()
    return count, (time.process_time() - cpu) / count


async def _recorded(folder: Path, wire: list[bytes], seconds: float, values: tuple[str, ...]) -> float:
    """CPU seconds per exchange with the session record on (bodies sealed, checkpoints signed), the
    writer thread's share included."""
    keys = generate_keys(folder / "audit-keys")
    audit = {
        "record_path": str(folder / "session.jsonl"),
        "sealing_key_file": str(keys["auditor_pub"]),
        "signing_key_file": str(keys["signing_key"]),
    }
    settings = load_settings(None, identity=dev_identity(folder), audit=audit)
    runtime = Runtime(build_snapshot(settings))
    await runtime.snapshot.start()
    telemetry = Telemetry(settings.telemetry)
    recorder = SessionRecorder(settings.audit, telemetry.instruments)
    recorder.start()
    processor = ExternalProcessor(runtime, telemetry.instruments, recorder)
    try:
        for _ in range(100):
            await _one(processor, wire)
        check_masked(await _one(processor, wire), values)
        return (await _cpu(processor, wire, seconds, recorder.writer.flush))[1]
    finally:
        recorder.close()
        await runtime.snapshot.close()
        telemetry.shutdown()


class _Encoding(SpanExporter):
    """Encodes every batch of spans as the OTLP exporter does before it sends them, and drops it: the CPU
    of an export without a collector's share or the network's."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def _traced(folder: Path, wire: list[bytes], seconds: float, values: tuple[str, ...]) -> float:
    """CPU seconds per exchange with tracing on, as ``telemetry.otlp_endpoint`` has it (every exchange
    sampled: Envoy's traceparent says so): the spans built on the event loop, and encoded by the batch
    processor's thread, its share included."""
    settings = load_settings(None, identity=dev_identity(folder))
    runtime = Runtime(build_snapshot(settings))
    await runtime.snapshot.start()
    # Metrics as ``serve`` has them by default (a Prometheus reader), beside the spans.
    meters = MeterProvider(metric_readers=[PrometheusMetricReader(registry=CollectorRegistry())])
    exporter = _Encoding()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    instruments = Instruments(provider.get_tracer(SCOPE), meters.get_meter(SCOPE))
    processor = ExternalProcessor(runtime, instruments)
    try:
        for _ in range(100):
            await _one(processor, wire)
        check_masked(await _one(processor, wire), values)
        provider.force_flush()
        if not exporter.spans:
            raise RuntimeError("the bench's traced exchanges exported no span")
        return (await _cpu(processor, wire, seconds, provider.force_flush))[1]
    finally:
        provider.shutdown()
        meters.shutdown()
        await runtime.snapshot.close()


async def _measure(seconds: float, prompt: bytes, values: tuple[str, ...], answer: str) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="extproc-bench-exchange-"))
    settings = load_settings(None, identity=dev_identity(folder))
    runtime = Runtime(build_snapshot(settings))
    await runtime.snapshot.start()
    telemetry = Telemetry(settings.telemetry)
    processor = ExternalProcessor(runtime, telemetry.instruments)
    token = mint_dev_token(folder, "bench", [], 3600)
    wire = messages(prompt, token)
    streamed = stream_messages(prompt, token, answer)
    events = len(streamed) - 4  # less the request's two messages, the response headers and the end
    try:
        for _ in range(200):  # warm-up: caches, the first verification, the metric series
            await _one(processor, wire)
        check_masked(await _one(processor, wire), values)
        check_stream_masked(await _one(processor, streamed), values)
        count, per_exchange = await _cpu(processor, wire, seconds)
        streams, per_stream = await _cpu(processor, streamed, seconds)
        profiles = []
        for path, passes in ((wire, 300), (streamed, 10)):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(passes):
                await _one(processor, path)
            profile.disable()
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(
                r"extproc|opentelemetry", 25
            )
            profiles.append(out.getvalue())
    finally:
        await runtime.snapshot.close()
        telemetry.shutdown()
    per_recorded = await _recorded(folder, wire, seconds, values)
    per_traced = await _traced(folder, wire, seconds, values)
    return {
        "exchanges": count,
        "cpu_us_per_exchange": round(per_exchange * 1e6, 1),
        "cpu_us_per_recorded_exchange": round(per_recorded * 1e6, 1),
        "recorded_ratio": round(per_recorded / per_exchange, 2),
        "cpu_us_per_traced_exchange": round(per_traced * 1e6, 1),
        "traced_ratio": round(per_traced / per_exchange, 2),
        "streams": streams,
        "events_per_stream": events,
        "cpu_us_per_stream": round(per_stream * 1e6, 1),
        "cpu_us_per_event": round(per_stream / events * 1e6, 1),
        "profile": profiles[0],
        "stream_profile": profiles[1],
    }


def run(seconds: float, prompt: bytes, values: tuple[str, ...], answer: str) -> dict[str, Any]:
    """``values``: what the prompt and the streamed ``answer`` hold that must come out masked."""
    # The exchange log line is formatted and written by the queue handler's thread, as in `serve`; here
    # to a stream nobody reads. The logging set up before is put back after.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.configure(LogSettings(level="info", format="json"), background=True, stream=io.StringIO())
    try:
        return asyncio.run(_measure(seconds, prompt, values, answer))
    finally:
        logs.shutdown()
        root.handlers[:] = handlers
        root.setLevel(level)


def markdown(report: dict[str, Any]) -> str:
    return (
        f"Exchange cost in-process, {report['when']}, CPU of extproc's own code (no gRPC transport):\n\n"
        "| exchange | CPU µs | per |\n|---|---:|---|\n"
        f"| chat request and JSON answer, both masked | {report['cpu_us_per_exchange']} | exchange |\n"
        f"| the same with the session record (sealed, signed) | {report['cpu_us_per_recorded_exchange']} "
        f"| exchange ({report['recorded_ratio']}x) |\n"
        f"| the same with tracing (spans encoded for OTLP) | {report['cpu_us_per_traced_exchange']} "
        f"| exchange ({report['traced_ratio']}x) |\n"
        f"| streamed answer ({report['events_per_stream']} SSE events, a card and an e-mail split across "
        f"them) | {report['cpu_us_per_stream']} | exchange |\n"
        f"| the same | {report['cpu_us_per_event']} | event (the request's share included) |\n\n"
        "Top of the profiles (cProfile, cumulative), JSON exchange then streamed answer:\n\n```\n"
        + report["profile"]
        + "```\n\n```\n"
        + report["stream_profile"]
        + "```\n"
    )
