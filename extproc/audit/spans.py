"""Decision spans and metrics, on the OpenTelemetry API only (``extproc.telemetry`` wires the SDK).

One SERVER span per exchange, ``extproc.exchange``, child of the span Envoy's ext_proc client opened for
the gRPC stream (its ``traceparent`` comes in the stream's metadata, not in the HTTP headers), so Jaeger
shows one trace from Envoy's ingress to the decision. Children: ``extproc.verify_token`` around token
verification and ``extproc.scan`` per direction, from its first body chunk to its last, carrying the
time actually spent scanning.

Attribute names are the constants below. Spans carry rule ids, entity counts and codes, never a matched
value, a body or a token; the subject is a keyed hash. With no exporter configured the tracer is the API's
no-op one: spans do not record and nothing below computes an attribute.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

from extproc.model import Direction, Outcome

SCOPE = "extproc"
_IDLE: AbstractContextManager[None] = nullcontext()  # reusable: it holds no state

# Span names.
EXCHANGE_SPAN = "extproc.exchange"
VERIFY_SPAN = "extproc.verify_token"
SCAN_SPAN = "extproc.scan"

# Attributes of the exchange span.
DECISION = "extproc.decision"  # allowed | masked | refused | cut | passthrough | incomplete | error
DECISION_ID = "extproc.decision_id"  # also the x-dlp-decision-id header and the session record's id
REQUEST_ID = "extproc.request_id"  # Envoy's x-request-id (its own spans carry it as guid:x-request-id)
ERROR_CODE = "extproc.error_code"
POLICY = "extproc.policy"
POLICY_ENFORCE = "extproc.policy.enforce"
RULES = "extproc.rules"  # rule ids that found something, both directions
ACTIONS = "extproc.actions"  # "direction:rule:action" per decision made
FINDINGS_TOTAL = "extproc.findings"
FINDINGS_ENTITY = "extproc.findings."  # + entity: count
WOULD_REFUSE = "extproc.would_refuse"  # what the acting policy, in shadow mode, would have refused
SHADOW = "extproc.shadow"  # a shadow policy took part in this exchange
SHADOW_POLICIES = "extproc.shadow.policies"
SHADOW_REFUSED = "extproc.shadow.refused"  # "policy:code" for what a shadow policy would have refused
SHADOW_ACTIONS = "extproc.shadow.actions"  # "policy:direction:rule:action" per decision a shadow policy made
SUBJECT_HASH = "extproc.subject.hash"  # keyed hash of issuer and subject: joins a caller's exchanges
ISSUER = "extproc.subject.issuer"
UNMASKED = "extproc.unmasked"
ROUTE = "url.path"
METHOD = "http.request.method"
MODEL = "gen_ai.request.model"

# Attributes of the scan spans.
DIRECTION = "extproc.direction"
BYTES_SCANNED = "extproc.scan.bytes"
SCAN_BUSY_MS = "extproc.scan.busy_ms"  # time spent scanning and masking, without waiting for data
SCAN_CHUNKS = "extproc.scan.chunks"
HELD_MAX = "extproc.scan.held_chars_max"  # most characters a stream held back at once

# Metric names.
EXCHANGES_METRIC = "extproc.exchanges"
FINDINGS_METRIC = "extproc.findings"
DURATION_METRIC = "extproc.exchange.duration"
SCAN_METRIC = "extproc.scan.duration"
VERIFY_METRIC = "extproc.verify.duration"
RECORDS_LOST_METRIC = "extproc.audit.records_lost"
RELOADS_METRIC = "extproc.reloads"
RELOAD_RESULTS = ("ok", "refused")  # the values of the reloads counter's "result" attribute

# Histogram bucket bounds, in seconds. The SDK's default bounds (0, 5, 10, 25, ... 10000) are meant for
# milliseconds: every duration here would fall into the first bucket and no percentile could be read.
# Scanning one body and verifying one token are the sidecar's own work: tens of microseconds, up to
# seconds for a body at limits.max_request_bytes.
WORK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# An exchange lasts from its first message to its last, so it includes the model's answer: milliseconds
# for a refusal, up to limits.max_stream_seconds (600 by default) for a long stream.
EXCHANGE_BUCKETS = (*WORK_BUCKETS[3:], 5, 10, 30, 60, 120, 300, 600)


class Tally:
    """A counter every exchange adds to: counted in a dict, reported when the metrics are collected (an
    observable counter, the same series and ``_total`` a counter gives). Adding costs a dict update; the
    SDK's counter cleans and hashes the attributes on every add, several microseconds, several times
    per exchange."""

    def __init__(self, meter: metrics.Meter, name: str, unit: str, description: str) -> None:
        self._counts: dict[tuple[tuple[str, str], ...], int] = {}
        meter.create_observable_counter(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: int, attributes: Mapping[str, str] | None = None) -> None:
        key = tuple(sorted(attributes.items())) if attributes else ()
        self._counts[key] = self._counts.get(key, 0) + amount

    def _observe(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        counts = dict(self._counts)  # one C-level copy: the event loop may add meanwhile
        return [metrics.Observation(value, dict(key)) for key, value in counts.items()]


class Instruments:
    """The tracer and metric instruments every exchange uses."""

    def __init__(
        self,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.tracer = tracer if tracer is not None else trace.NoOpTracer()
        meter = meter if meter is not None else metrics.NoOpMeter(SCOPE)
        # Spans, metrics, or both are recorded. Metrics alone (a Prometheus scrape, no OTLP endpoint)
        # still time scans and verifications; only spans need Envoy's trace context.
        self.tracing = not isinstance(self.tracer, trace.NoOpTracer)
        self.enabled = self.tracing or not isinstance(meter, metrics.NoOpMeter)
        self.exchanges = Tally(
            meter, EXCHANGES_METRIC, "{exchange}", "exchanges by decision, policy and error code"
        )
        self.findings = Tally(
            meter, FINDINGS_METRIC, "{finding}", "findings by entity, direction, action and policy"
        )
        self.duration = meter.create_histogram(
            DURATION_METRIC,
            unit="s",
            description="an exchange from its first message to its last",
            explicit_bucket_boundaries_advisory=EXCHANGE_BUCKETS,
        )
        self.scan = meter.create_histogram(
            SCAN_METRIC,
            unit="s",
            description="time spent scanning and masking one body",
            explicit_bucket_boundaries_advisory=WORK_BUCKETS,
        )
        self.verify = meter.create_histogram(
            VERIFY_METRIC,
            unit="s",
            description="time spent verifying one bearer token",
            explicit_bucket_boundaries_advisory=WORK_BUCKETS,
        )
        self.records_lost = meter.create_counter(
            RECORDS_LOST_METRIC, unit="{record}", description="session records that could not be written"
        )
        self.reloads = meter.create_counter(
            RELOADS_METRIC,
            unit="{reload}",
            description='settings and rules reloads by "result": ok | refused',
        )
        # A counter has no series until its first point, and these two may never get one: started at
        # zero, a scrape shows "no record lost, no reload" instead of nothing, and an alert on their
        # increase() sees the first one (an increase from no series at all is not one).
        self.records_lost.add(0)
        for result in RELOAD_RESULTS:
            self.reloads.add(0, {"result": result})

    def begin(self, metadata: Mapping[str, str]) -> ExchangeTrace:
        """The trace of a new exchange, joined to the context Envoy propagated in ``metadata`` (the
        gRPC stream's invocation metadata: ``traceparent`` and ``tracestate``). A malformed context is
        ignored (the propagator drops it): the exchange is traced as a root, never failed."""
        parent = otel_context.Context()
        if self.tracing and metadata:
            parent = extract(metadata)
        return ExchangeTrace(self, parent)


@dataclass
class _Scan:
    span: trace.Span
    busy: float = 0.0
    size: int = 0
    chunks: int = 0
    held_max: int = 0
    ended: bool = False


class _Timing:
    """Adds the time spent inside to a scan's busy time (a class: a token stream enters one per event,
    and a generator-based context costs several times more)."""

    __slots__ = ("_scan", "_size", "_started")

    def __init__(self, scan: _Scan, size: int) -> None:
        self._scan = scan
        self._size = size
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        scan = self._scan
        scan.busy += time.perf_counter() - self._started
        scan.size += self._size
        scan.chunks += 1


@dataclass
class ExchangeTrace:
    """The span of one exchange and its children. The exchange calls ``verifying`` and ``scanning``
    around its work and the server calls ``finish`` once, whatever happened."""

    instruments: Instruments
    parent: otel_context.Context
    span: trace.Span = field(init=False)
    _context: otel_context.Context = field(init=False)
    _started: float = field(init=False)
    _scans: dict[Direction, _Scan] = field(init=False, default_factory=dict)
    _finished: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._started = time.perf_counter()
        self.span = self.instruments.tracer.start_span(EXCHANGE_SPAN, self.parent, kind=SpanKind.SERVER)
        self._context = trace.set_span_in_context(self.span, self.parent)

    @property
    def recording(self) -> bool:
        return self.span.is_recording()

    @property
    def trace_id(self) -> str | None:
        """The W3C trace id (32 hex digits) when the exchange is traced, for the session record."""
        span_context = self.span.get_span_context()
        return format(span_context.trace_id, "032x") if span_context.is_valid else None

    def verifying(self) -> AbstractContextManager[None]:
        """Around the verification of a bearer token; a refusal marks the span with its code."""
        return self._verifying() if self.instruments.enabled else _IDLE

    def scanning(self, direction: Direction, size: int) -> AbstractContextManager[None]:
        """Around the scanning of one body chunk of ``size`` bytes. The direction's scan span opens with
        its first chunk and closes with ``scanned``; only the time inside counts as busy. Untraced, the
        chunk pays for one shared no-op context and nothing else."""
        return self._scanning(direction, size) if self.instruments.enabled else _IDLE

    @contextmanager
    def _verifying(self) -> Iterator[None]:
        span = self.instruments.tracer.start_span(VERIFY_SPAN, self._context)
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            code = getattr(exc, "code", type(exc).__name__)
            span.set_attribute(ERROR_CODE, str(code))
            span.set_status(Status(StatusCode.ERROR, str(code)))
            raise
        finally:
            elapsed = time.perf_counter() - started
            span.end()
            self.instruments.verify.record(elapsed)

    def _scanning(self, direction: Direction, size: int) -> _Timing:
        scan = self._scans.get(direction)
        if scan is None:
            span = self.instruments.tracer.start_span(
                SCAN_SPAN, self._context, attributes={DIRECTION: direction.value}
            )
            scan = self._scans[direction] = _Scan(span)
        return _Timing(scan, size)

    def event(self, name: str, attributes: dict[str, str]) -> None:
        """A step of the exchange worth a point in time on its span (an approval asked for, decided)."""
        if self.span.is_recording():
            self.span.add_event(name, attributes)

    def held(self, direction: Direction, characters: int) -> None:
        scan = self._scans.get(direction)
        if scan is not None and characters > scan.held_max:
            scan.held_max = characters

    def scanned(self, direction: Direction, error_code: str | None = None) -> None:
        """The direction's body is finished (or failed with ``error_code``): its scan span ends."""
        scan = self._scans.get(direction)
        if scan is None or scan.ended:
            return
        scan.ended = True
        span = scan.span
        if span.is_recording():
            span.set_attributes(
                {
                    BYTES_SCANNED: scan.size,
                    SCAN_BUSY_MS: round(scan.busy * 1000, 3),
                    SCAN_CHUNKS: scan.chunks,
                    HELD_MAX: scan.held_max,
                }
            )
            if error_code:
                span.set_attribute(ERROR_CODE, error_code)
                span.set_status(Status(StatusCode.ERROR, error_code))
        span.end()
        self.instruments.scan.record(scan.busy, {DIRECTION: direction.value})

    def finish(self, outcome: Outcome) -> None:
        """Ends every span of the exchange, with ``outcome`` as attributes, and counts it."""
        if self._finished:
            return
        self._finished = True
        failed = outcome.error_code if outcome.decision in ("error", "cut") else None
        for scanned in list(self._scans):
            self.scanned(scanned, failed)
        if self.span.is_recording():
            self.span.set_attributes(span_attributes(outcome))
            if outcome.decision == "error":
                self.span.set_status(Status(StatusCode.ERROR, outcome.error_code or "error"))
        self.span.end()
        if not self.instruments.enabled:
            return
        # The error code is a code of errors.py or a policy's (policy_blocked, approval_required): a
        # bounded set, like the decisions; "" when the exchange was not refused.
        labels = {
            DECISION: outcome.decision,
            POLICY: outcome.policy or "",
            ERROR_CODE: outcome.error_code or "",
        }
        self.instruments.exchanges.add(1, labels)
        self.instruments.duration.record(time.perf_counter() - self._started, {DECISION: outcome.decision})
        for way, actions in outcome.actions.items():
            for _rule, entity, action in actions:
                self.instruments.findings.add(
                    1, {"entity": entity, DIRECTION: way, "action": action, POLICY: outcome.policy or ""}
                )


def span_attributes(outcome: Outcome) -> dict[str, str | bool | int | list[str]]:
    """The exchange span's attributes for ``outcome``: codes, ids and counts only."""
    attributes: dict[str, str | bool | int | list[str]] = {
        DECISION: outcome.decision,
        DECISION_ID: outcome.decision_id,
        FINDINGS_TOTAL: sum(outcome.entities.values()),
    }
    if outcome.snapshot:
        attributes["extproc.snapshot.version"] = outcome.snapshot
    if outcome.approval_id:
        attributes["extproc.approval.id"] = outcome.approval_id
        attributes["extproc.approval.status"] = outcome.approval_status or ""
    if outcome.request_id:
        attributes[REQUEST_ID] = outcome.request_id
    if outcome.error_code:
        attributes[ERROR_CODE] = outcome.error_code
    if outcome.policy:
        attributes[POLICY] = outcome.policy
        attributes[POLICY_ENFORCE] = outcome.enforce
    if outcome.rules:
        attributes[RULES] = list(outcome.rules)
    actions = [
        f"{direction}:{rule}:{action}"
        for direction, made in outcome.actions.items()
        for rule, _entity, action in made
    ]
    if actions:
        attributes[ACTIONS] = actions
    for entity, count in outcome.entities.items():
        attributes[FINDINGS_ENTITY + entity] = count
    if outcome.would_refuse:
        attributes[WOULD_REFUSE] = list(outcome.would_refuse)
    if outcome.shadow:
        attributes[SHADOW] = True
        attributes[SHADOW_POLICIES] = sorted(outcome.shadow)
        refused = [
            f"{policy}:{code}" for policy, shadowed in outcome.shadow.items() for code in shadowed.refused
        ]
        if refused:
            attributes[SHADOW_REFUSED] = refused
        shadow_actions = [
            f"{policy}:{direction}:{rule}:{action}"
            for policy, shadowed in outcome.shadow.items()
            for direction, made in shadowed.actions.items()
            for rule, _entity, action in made
        ]
        if shadow_actions:
            attributes[SHADOW_ACTIONS] = shadow_actions
    if outcome.subject_hash:
        attributes[SUBJECT_HASH] = outcome.subject_hash
    if outcome.issuer:
        attributes[ISSUER] = outcome.issuer
    if outcome.unmasked:
        attributes[UNMASKED] = True
    if outcome.route:
        attributes[ROUTE] = outcome.route
    if outcome.method:
        attributes[METHOD] = outcome.method
    if outcome.model:
        attributes[MODEL] = outcome.model
    return attributes
