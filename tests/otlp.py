"""A real OTLP/gRPC receiver for tests: the collector's trace and metrics services from
``opentelemetry-proto``, on a free port, keeping what Envoy and extproc export."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any] = field(hash=False)
    status_code: int = 0
    start_ns: int = 0
    end_ns: int = 0


class Receiver:
    """Start with ``start()``, point exporters at ``endpoint``, read ``spans`` and ``metric_names``."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.spans: list[Span] = []
        self.metrics: list[tuple[str, str, list[Any]]] = []  # (service, metric name, data points)
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        receiver = self

        class Traces(trace_grpc.TraceServiceServicer):
            def Export(
                self, request: trace_pb.ExportTraceServiceRequest, context: grpc.ServicerContext
            ) -> trace_pb.ExportTraceServiceResponse:
                receiver._traces(request)
                return trace_pb.ExportTraceServiceResponse()

        class Metrics(metrics_grpc.MetricsServiceServicer):
            def Export(
                self, request: metrics_pb.ExportMetricsServiceRequest, context: grpc.ServicerContext
            ) -> metrics_pb.ExportMetricsServiceResponse:
                receiver._metrics(request)
                return metrics_pb.ExportMetricsServiceResponse()

        trace_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        metrics_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None

    def _traces(self, request: trace_pb.ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Span(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={kv.key: _value(kv.value) for kv in span.attributes},
                            status_code=span.status.code,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._lock:
            self.spans.extend(found)
            self._lock.notify_all()

    def _metrics(self, request: metrics_pb.ExportMetricsServiceRequest) -> None:
        found = []
        for resource_metrics in request.resource_metrics:
            resource = {kv.key: _value(kv.value) for kv in resource_metrics.resource.attributes}
            service = str(resource.get("service.name", ""))
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = getattr(metric, metric.WhichOneof("data") or "sum")
                    points = [
                        ({kv.key: _value(kv.value) for kv in p.attributes}, p) for p in data.data_points
                    ]
                    found.append((service, metric.name, points))
        with self._lock:
            self.metrics.extend(found)
            self._lock.notify_all()

    def wait_for(self, predicate: Callable[[Receiver], Any], timeout: float = 30.0) -> Any:
        """Waits until ``predicate(self)`` is truthy (re-checked on every export); returns its value."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate(self)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({(s.service, s.name) for s in self.spans})
                    raise AssertionError(f"not received within {timeout:.0f}s; spans so far: {names}")
                self._lock.wait(remaining)


def main() -> None:
    """A collector on its own, for the benchmark's traced path: it accepts OTLP trace and metrics
    exports and discards them unparsed (a real collector runs on another machine; here it shares the
    CPUs with everything measured, so it should cost little). Prints a ready line with its address,
    the messages and bytes it received when stopped by SIGTERM."""
    import json
    import signal

    received = {"exports": 0, "bytes": 0}
    lock = threading.Lock()

    def accept(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            received["exports"] += 1
            received["bytes"] += len(request)
        return b""  # an empty Export*ServiceResponse

    handler = grpc.unary_unary_rpc_method_handler(accept)  # no (de)serializers: raw bytes
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    for service in (
        "opentelemetry.proto.collector.trace.v1.TraceService",
        "opentelemetry.proto.collector.metrics.v1.MetricsService",
    ):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"event": "ready", "grpc": f"127.0.0.1:{port}"}), flush=True)
    stop.wait()
    server.stop(grace=1).wait()
    print(json.dumps({"event": "stopped", **received}), flush=True)


if __name__ == "__main__":
    main()
