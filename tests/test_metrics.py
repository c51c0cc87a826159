"""GET /metrics on a real server: an exchange over gRPC moves the counters and histograms of the Prometheus
scrape, with the labels it should and never a value; the same data reaches an OTLP receiver at once."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from extproc.audit import spans
from extproc.devenv import Stack
from extproc.identity.dev import DEV_ISSUER, dev_identity, mint_dev_token
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server
from extproc.settings import load_settings

from .otlp import Receiver

CARD = "4111 1111 1111 1111"
EMAIL = "jane@example.com"
# Every label the sidecar's own metrics may carry: codes, ids and entities. A matched value, a subject or
# anything a caller chose would need a label of its own, and fails here first.
LABELS = {"extproc_decision", "extproc_policy", "extproc_error_code", "entity", "extproc_direction", "action"}
LABELS |= {"result", "le"}
Samples = dict[frozenset[tuple[str, str]], float]


def _settings(identity: dict[str, Any] | None, telemetry: dict[str, Any]):  # type: ignore[no-untyped-def]
    return load_settings(
        None,
        server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0},
        identity=identity or {"mode": "none"},
        telemetry=telemetry,
    )


async def start_server(identity: dict[str, Any] | None = None, **telemetry: Any) -> Server:
    """A server on free ports: no identity unless ``identity`` is given, ``telemetry`` settings."""
    settings = _settings(identity, telemetry)
    server = Server(settings, Runtime(build_snapshot(settings)))
    await server.start()
    return server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """The default settings: no OTLP endpoint, so whatever /metrics shows was recorded for it alone."""
    running = await start_server()
    yield running
    await running.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver().start()
    yield running
    running.stop()


def _headers(*items: tuple[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items])


async def exchange(
    port: int, prompt: bytes, answer: bytes, content_type: str = "text/plain", token: str | None = None
) -> None:
    """One exchange as Envoy drives it: request headers (with ``token`` as the bearer) and body, then the
    answer's headers and body."""
    request = [(":path", "/v1/chat/completions"), ("content-type", content_type)]
    if token is not None:
        request.append(("authorization", f"Bearer {token}"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(
            pb.ProcessingRequest(
                request_headers=pb.HttpHeaders(headers=_headers(*request)),
                protocol_config=pb.ProtocolConfiguration(request_body_mode=2, response_body_mode=4),
            )
        )
        # A refusal (an immediate response, to the headers or to the body) ends the exchange there.
        if not (await call.read()).HasField("immediate_response"):
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=prompt, end_of_stream=True)))
            if not (await call.read()).HasField("immediate_response"):
                headers = _headers((":status", "200"), ("content-type", "text/plain"))
                await call.write(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=headers)))
                body = pb.HttpBody(body=answer, end_of_stream=True)
                await call.write(pb.ProcessingRequest(response_body=body))
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass


async def scrape(port: int, accept: str | None = None) -> tuple[int, str, str]:
    """Status, content type and body of GET /metrics."""
    headers = {"Accept": accept} if accept is not None else {}
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), await answer.text()


def families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(text: str, sample_name: str) -> Samples:
    """The values of ``sample_name`` (a series name as scraped, e.g. ``..._total``), by label set."""
    return {
        frozenset(sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


async def scraped(port: int, ready: Callable[[str], bool]) -> str:
    """The scrape once ``ready`` holds (or the last one after ten seconds): the stream's last reply
    reaches the client a moment before the server's ``finally`` counts the exchange."""
    deadline = time.monotonic() + 10
    while True:
        status, _, text = await scrape(port)
        assert status == 200
        if ready(text) or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.05)


def counted(name: str, **values: str) -> Callable[[str], bool]:
    return lambda text: samples(text, name).get(labels(**values), 0) >= 1


MASKED = {"extproc_decision": "masked", "extproc_policy": "default", "extproc_error_code": ""}


def histogram(text: str, name: str, **values: str) -> list[tuple[float, float]]:
    """``name``'s buckets for one label set: (upper bound, cumulative count), in order."""
    buckets = []
    for key, value in samples(text, f"{name}_bucket").items():
        found = dict(key)
        bound = found.pop("le")
        if found == values:
            buckets.append((float(bound), value))
    return sorted(buckets)


async def test_an_exchange_moves_the_counters_and_histograms_without_an_otlp_endpoint(server: Server) -> None:
    await exchange(server.grpc_port, f"card {CARD} to {EMAIL}".encode(), f"mail {EMAIL}".encode())
    text = await scraped(server.admin_port, counted("extproc_exchanges_total", **MASKED))
    kinds = {name: family.type for name, family in families(text).items()}
    assert kinds == {
        "target_info": "gauge",  # the resource's attributes as labels (an info metric in OpenMetrics)
        "extproc_exchanges": "counter",
        "extproc_findings": "counter",
        "extproc_exchange_duration_seconds": "histogram",
        "extproc_scan_duration_seconds": "histogram",
        "extproc_audit_records_lost": "counter",
        "extproc_reloads": "counter",
    }
    assert samples(text, "extproc_exchanges_total") == {labels(**MASKED): 1}
    finding = {"extproc_policy": "default", "action": "mask"}
    assert samples(text, "extproc_findings_total") == {
        labels(entity="CREDIT_CARD", extproc_direction="request", **finding): 1,
        labels(entity="EMAIL_ADDRESS", extproc_direction="request", **finding): 1,
        labels(entity="EMAIL_ADDRESS", extproc_direction="response", **finding): 1,
    }
    # The exchange's duration: one observation, in buckets of seconds, cumulative up to +Inf.
    buckets = histogram(text, "extproc_exchange_duration_seconds", extproc_decision="masked")
    assert [bound for bound, _ in buckets] == [*spans.EXCHANGE_BUCKETS, math.inf]
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == 1
    assert samples(text, "extproc_exchange_duration_seconds_count") == {labels(extproc_decision="masked"): 1}
    [duration] = samples(text, "extproc_exchange_duration_seconds_sum").values()
    assert 0 < duration < 10
    # Both bodies were scanned, each once.
    for direction in ("request", "response"):
        buckets = histogram(text, "extproc_scan_duration_seconds", extproc_direction=direction)
        assert [bound for bound, _ in buckets] == [*spans.WORK_BUCKETS, math.inf]
        assert buckets[-1][1] == 1
    assert samples(text, "extproc_audit_records_lost_total") == {labels(): 0}
    assert samples(text, "extproc_reloads_total") == {labels(result="ok"): 0, labels(result="refused"): 0}


async def test_no_value_or_caller_reaches_a_label(tmp_path: Path) -> None:
    server = await start_server(identity=dev_identity(tmp_path))
    try:
        token = mint_dev_token(tmp_path, "subject-alice-7", ["group-q7"], 600)
        prompt = f"card {CARD} to {EMAIL}".encode()
        await exchange(server.grpc_port, prompt, f"mail {EMAIL}".encode(), token=token)
        text = await scraped(
            server.admin_port, counted("extproc_exchange_duration_seconds_count", extproc_decision="masked")
        )
    finally:
        await server.stop()
    assert samples(text, "extproc_verify_duration_seconds_count") == {labels(): 1}  # the token was checked
    for value in (CARD, "4111", EMAIL, "jane", "alice", "group-q7", DEV_ISSUER):
        assert value not in text
    for family in text_string_to_metric_families(text):
        if family.name != "target_info":  # the resource: service name, version, SDK
            for sample in family.samples:
                assert set(sample.labels) <= LABELS, sample


async def test_a_refusal_counts_under_its_code(server: Server) -> None:
    await exchange(server.grpc_port, b'{"messages": [', b"", content_type="application/json")
    text = await scraped(server.admin_port, lambda text: bool(samples(text, "extproc_exchanges_total")))
    [(key, count)] = samples(text, "extproc_exchanges_total").items()
    assert count == 1
    assert dict(key)["extproc_decision"] == "refused"
    assert dict(key)["extproc_error_code"] == "invalid_json"


async def test_otlp_and_the_scrape_get_the_same_exchange(receiver: Receiver) -> None:
    server = await start_server(
        otlp_endpoint=receiver.endpoint, metrics_interval_seconds=0.2, export_delay_seconds=0.2
    )
    try:
        await exchange(server.grpc_port, f"card {CARD}".encode(), b"ok")
        text = await scraped(server.admin_port, counted("extproc_exchanges_total", **MASKED))
        assert samples(text, "extproc_exchanges_total") == {labels(**MASKED): 1}

        def pushed(r: Receiver) -> dict[str, Any] | None:
            for _, name, points in reversed(r.metrics):  # cumulative: the latest export has it all
                if name == spans.EXCHANGES_METRIC:
                    return {
                        json.dumps(attributes, sort_keys=True): point.as_int for attributes, point in points
                    }
            return None

        exported = await asyncio.to_thread(receiver.wait_for, pushed)
        otlp_labels = {spans.DECISION: "masked", spans.POLICY: "default", spans.ERROR_CODE: ""}
        assert exported == {json.dumps(otlp_labels, sort_keys=True): 1}
        # Spans still go to the endpoint: the reader added for the scrape took nothing from them.
        assert await asyncio.to_thread(
            receiver.wait_for, lambda r: any(s.name == spans.EXCHANGE_SPAN for s in r.spans)
        )
    finally:
        await server.stop()


async def test_openmetrics_is_served_when_the_scraper_asks_for_it(server: Server) -> None:
    await exchange(server.grpc_port, f"card {CARD}".encode(), b"ok")
    await scraped(server.admin_port, counted("extproc_exchanges_total", **MASKED))
    accept = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5"
    status, content_type, text = await scrape(server.admin_port, accept)
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    found = {family.name: family for family in openmetrics_families(text)}
    [sample] = [s for s in found["extproc_exchanges"].samples if s.name == "extproc_exchanges_total"]
    assert (sample.labels, sample.value) == (MASKED, 1)


async def test_scrapes_at_once_each_get_every_series(server: Server) -> None:
    await exchange(server.grpc_port, f"card {CARD}".encode(), b"ok")
    await scraped(server.admin_port, counted("extproc_exchanges_total", **MASKED))
    answers = await asyncio.gather(*(scrape(server.admin_port) for _ in range(8)))
    for status, _, text in answers:
        assert status == 200
        assert samples(text, "extproc_exchanges_total") == {labels(**MASKED): 1}


async def test_prometheus_false_serves_no_metrics() -> None:
    server = await start_server(prometheus=False)
    try:
        assert not server._instruments.enabled  # and records nothing, with no OTLP endpoint either
        status, _, _ = await scrape(server.admin_port)
        assert status == 404
    finally:
        await server.stop()


def test_an_exchange_through_envoy_is_counted_in_the_scrape(stack: Stack) -> None:
    def masked_count() -> float:
        answer = httpx.get(f"http://127.0.0.1:{stack.admin_port}/metrics", timeout=10)
        assert answer.status_code == 200
        found = samples(answer.text, "extproc_exchanges_total")
        return sum(v for k, v in found.items() if dict(k)["extproc_decision"] == "masked")

    before = masked_count()
    body = {"model": "demo-small", "messages": [{"role": "user", "content": f"card {CARD}"}]}
    answer = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200
    deadline = time.monotonic() + 10
    while masked_count() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert masked_count() == before + 1


def test_a_tally_reports_one_series_per_label_set_whatever_order_the_labels_came_in() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from extproc.audit.spans import Tally

    reader = InMemoryMetricReader()
    tally = Tally(MeterProvider(metric_readers=[reader]).get_meter("t"), "things", "{thing}", "things")
    tally.add(1, {"a": "1", "b": "2"})
    tally.add(2, {"b": "2", "a": "1"})
    tally.add(1, {"a": "3", "b": "2"})
    collected = reader.get_metrics_data()
    assert collected is not None
    [metric] = [m for rm in collected.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
    points = {tuple(sorted(p.attributes.items())): p.value for p in metric.data.data_points}
    assert points == {(("a", "1"), ("b", "2")): 3, (("a", "3"), ("b", "2")): 1}
    assert metric.data.is_monotonic
