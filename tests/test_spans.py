"""Decision spans and metrics, read from the SDK's in-memory exporter and reader."""

import json
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from extproc.audit import spans
from extproc.audit.spans import Instruments
from extproc.errors import AuthError
from extproc.exchange import Exchange
from extproc.model import Body, BodyMode, Direction, Headers, Outcome, ProtocolConfig, Shadowed, StreamChunk

from .test_exchange import CHAT, SNAPSHOT

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
PROTOCOL = ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED)
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
CARD = "4111 1111 1111 1111"


class Telemetry:
    def __init__(self, ratio: float = 1.0) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        meters = MeterProvider(metric_readers=[self.reader])
        self.instruments = Instruments(provider.get_tracer("test"), meters.get_meter("test"))

    def spans(self) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.exporter.get_finished_spans()}

    def points(self, name: str) -> list[tuple[dict[str, object], float]]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            value = getattr(point, "value", None)
                            found.append(
                                (dict(point.attributes or {}), value if value is not None else point.count)
                            )
        return found


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    return Telemetry()


def traced(telemetry: Telemetry, metadata: dict[str, str] | None = None) -> Exchange:
    trace = telemetry.instruments.begin(metadata or {})
    return Exchange(SNAPSHOT, PROTOCOL, "d-7", trace)


def chat(text: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


def run(ex: Exchange, prompt: bytes, answer: list[bytes]) -> None:
    ex.handle(
        Headers(
            REQ,
            (
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
                ("x-request-id", "r-7"),
            ),
            False,
        )
    )
    ex.handle(Body(REQ, prompt, True))
    ex.handle(Headers(RESP, ((":status", "200"), ("content-type", "text/event-stream")), False))
    for index, chunk in enumerate(answer):
        ex.handle(Body(RESP, chunk, index == len(answer) - 1))


def sse(*pieces: str) -> list[bytes]:
    events = [
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}).encode() + b"\n\n"
        for p in pieces
    ]
    return [*events, b"data: [DONE]\n\n"]


def all_values(span: ReadableSpan) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()})


def test_the_exchange_span_joins_envoys_trace_and_carries_the_decision(telemetry: Telemetry) -> None:
    ex = traced(telemetry, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": ""})
    run(ex, chat(f"card {CARD} and jane@example.com"), sse("pay with 4111 11", "11 1111 1111 thanks"))
    ex.trace.finish(ex.outcome())
    found = telemetry.spans()
    exchange = found[spans.EXCHANGE_SPAN]
    assert exchange.kind is SpanKind.SERVER
    assert format(exchange.context.trace_id, "032x") == TRACE_ID
    assert exchange.parent is not None
    assert format(exchange.parent.span_id, "016x") == PARENT_ID
    attributes = exchange.attributes or {}
    assert attributes[spans.DECISION] == "masked"
    assert attributes[spans.DECISION_ID] == "d-7"
    assert attributes[spans.REQUEST_ID] == "r-7"
    assert attributes[spans.POLICY] == "default"
    assert attributes[spans.FINDINGS_ENTITY + "CREDIT_CARD"] == 2
    assert attributes[spans.FINDINGS_ENTITY + "EMAIL_ADDRESS"] == 1
    assert set(attributes[spans.RULES]) == {"credit-card", "email-address"}  # type: ignore[arg-type]
    assert "response:credit-card:mask" in attributes[spans.ACTIONS]  # type: ignore[operator]
    assert attributes[spans.MODEL] == "m"
    # Children: one scan span per direction, under the exchange span.
    scans = [s for s in telemetry.exporter.get_finished_spans() if s.name == spans.SCAN_SPAN]
    assert {s.attributes[spans.DIRECTION] for s in scans if s.attributes} == {"request", "response"}
    for scan in scans:
        assert scan.parent is not None
        assert scan.parent.span_id == exchange.context.span_id
    [response] = [s for s in scans if s.attributes and s.attributes[spans.DIRECTION] == "response"]
    assert response.attributes is not None
    assert response.attributes[spans.SCAN_CHUNKS] == 3
    assert response.attributes[spans.HELD_MAX] > 0  # the card's first half was held back
    # Never a matched value, in any span.
    for span in telemetry.exporter.get_finished_spans():
        text = all_values(span)
        assert "4111" not in text
        assert "jane" not in text


def test_a_refusal_names_its_code_and_counts_in_the_metrics(telemetry: Telemetry) -> None:
    ex = traced(telemetry)
    too_big = chat("x" * (SNAPSHOT.settings.limits.max_request_bytes + 1))
    ex.handle(
        Headers(
            REQ,
            (
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
            ),
            False,
        )
    )
    ex.handle(Body(REQ, too_big, True))
    ex.trace.finish(ex.outcome())
    exchange = telemetry.spans()[spans.EXCHANGE_SPAN]
    assert exchange.attributes is not None
    assert exchange.attributes[spans.DECISION] == "refused"
    assert exchange.attributes[spans.ERROR_CODE] == "body_too_large"
    scan = telemetry.spans()[spans.SCAN_SPAN]
    assert scan.status.status_code is StatusCode.ERROR
    [(labels, count)] = telemetry.points(spans.EXCHANGES_METRIC)
    assert labels[spans.DECISION] == "refused"
    assert labels[spans.ERROR_CODE] == "body_too_large"
    assert count == 1


def test_findings_are_counted_by_entity_and_action(telemetry: Telemetry) -> None:
    ex = traced(telemetry)
    run(ex, chat(f"card {CARD}"), sse("mail jane@example.com"))
    ex.trace.finish(ex.outcome())
    points = telemetry.points(spans.FINDINGS_METRIC)
    counted = {(a["entity"], a[spans.DIRECTION], a["action"]): v for a, v in points}
    assert counted == {("CREDIT_CARD", "request", "mask"): 1, ("EMAIL_ADDRESS", "response", "mask"): 1}
    [(labels, count)] = telemetry.points(spans.EXCHANGES_METRIC)
    assert labels == {spans.DECISION: "masked", spans.POLICY: "default", spans.ERROR_CODE: ""}
    assert count == 1
    assert [c for _, c in telemetry.points(spans.DURATION_METRIC)] == [1]


def test_durations_are_bucketed_in_seconds_not_the_sdks_millisecond_defaults(telemetry: Telemetry) -> None:
    ex = traced(telemetry)
    run(ex, chat(f"card {CARD}"), sse("ok"))
    ex.trace.finish(ex.outcome())
    data = telemetry.reader.get_metrics_data()
    assert data is not None
    bounds = {
        metric.name: tuple(point.explicit_bounds)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if hasattr(point, "explicit_bounds")
    }
    assert bounds == {spans.DURATION_METRIC: spans.EXCHANGE_BUCKETS, spans.SCAN_METRIC: spans.WORK_BUCKETS}


def test_records_lost_and_reloads_are_counted_from_zero(telemetry: Telemetry) -> None:
    # Series that exist before their first event: "none so far" is shown, and the first one is an increase.
    assert telemetry.points(spans.RECORDS_LOST_METRIC) == [({}, 0)]
    assert sorted(telemetry.points(spans.RELOADS_METRIC), key=str) == [
        ({"result": "ok"}, 0),
        ({"result": "refused"}, 0),
    ]
    telemetry.instruments.reloads.add(1, {"result": "ok"})
    assert ({"result": "ok"}, 1) in telemetry.points(spans.RELOADS_METRIC)


def test_a_trace_envoy_did_not_sample_is_not_recorded(telemetry: Telemetry) -> None:
    # emit_client_span: false, or Envoy's own sampling, propagates flags 00: follow that decision.
    ex = traced(telemetry, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    run(ex, chat(f"card {CARD}"), sse("ok"))
    ex.trace.finish(ex.outcome())
    assert telemetry.exporter.get_finished_spans() == ()
    assert not ex.trace.recording
    assert ex.trace.trace_id == TRACE_ID  # the session record still names Envoy's trace


def test_a_refused_token_marks_the_verify_span() -> None:
    telemetry = Telemetry()
    trace = telemetry.instruments.begin({})
    with pytest.raises(AuthError), trace.verifying():
        raise AuthError("the token has expired", code="jwt_expired")
    verify = telemetry.spans()[spans.VERIFY_SPAN]
    assert verify.status.status_code is StatusCode.ERROR
    assert verify.attributes is not None
    assert verify.attributes[spans.ERROR_CODE] == "jwt_expired"
    assert [c for _, c in telemetry.points(spans.VERIFY_METRIC)] == [1]


def test_a_cut_stream_ends_its_scan_span_with_the_code(telemetry: Telemetry) -> None:
    ex = traced(telemetry)
    ex.handle(
        Headers(
            REQ,
            (
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
            ),
            False,
        )
    )
    ex.handle(Body(REQ, CHAT, True))
    ex.handle(Headers(RESP, ((":status", "200"), ("content-type", "text/event-stream")), False))
    [reply] = ex.handle(Body(RESP, b"data: " + b"x" * 2048 + b"\n\n", False))  # over max_event_bytes
    assert isinstance(reply, StreamChunk)
    assert reply.end_of_stream
    ex.trace.finish(ex.outcome())
    exchange = telemetry.spans()[spans.EXCHANGE_SPAN]
    assert exchange.attributes is not None
    assert exchange.attributes[spans.DECISION] == "cut"
    assert exchange.attributes[spans.ERROR_CODE] == "upstream_too_large"
    scans = {
        s.attributes[spans.DIRECTION]: s
        for s in telemetry.exporter.get_finished_spans()
        if s.name == spans.SCAN_SPAN and s.attributes
    }
    assert scans["response"].status.status_code is StatusCode.ERROR


def test_without_an_exporter_nothing_records_and_the_outcome_is_still_known() -> None:
    instruments = Instruments()
    assert not instruments.enabled
    ex = Exchange(SNAPSHOT, PROTOCOL, "d-8", instruments.begin({}))
    run(ex, chat(f"card {CARD}"), sse("fine"))
    assert not ex.trace.recording
    assert ex.trace.trace_id is None
    outcome = ex.outcome()
    ex.trace.finish(outcome)
    assert outcome.decision == "masked"
    assert outcome.entities == {"CREDIT_CARD": 1}


def test_what_a_shadow_policy_would_have_done_is_on_the_span() -> None:
    shadowed = Shadowed(("model_not_allowed",), {"request": (("credit-card", "CREDIT_CARD", "block"),)})
    outcome = Outcome(decision_id="d", decision="masked", policy="base", shadow={"pilot": shadowed})
    attributes = spans.span_attributes(outcome)
    assert attributes[spans.SHADOW] is True
    assert attributes[spans.SHADOW_POLICIES] == ["pilot"]
    assert attributes[spans.SHADOW_REFUSED] == ["pilot:model_not_allowed"]
    assert attributes[spans.SHADOW_ACTIONS] == ["pilot:request:credit-card:block"]
