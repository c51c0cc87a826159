"""OpenTelemetry SDK wiring: providers, the OTLP/gRPC exporters, the Prometheus scrape endpoint and their
shutdown. The only module that imports the SDK; the rest of the package speaks the API
(``extproc.audit.spans``).

One MeterProvider feeds every metric reader: the OTLP one pushes on its own thread every
``metrics_interval_seconds``, the Prometheus one is read when ``GET /metrics`` is scraped. Both read the
same instruments, so the two never disagree on a name or a label. With neither (no endpoint and
``prometheus: false``), no provider is built and the instruments are the API's no-op ones: an exchange
pays nothing for telemetry. Spans need an endpoint: they leave through a batch processor (export happens on
its own thread, never on the event loop), follow the sampling decision Envoy propagates, and an exchange
arriving without trace context is sampled at ``sample_ratio``.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from aiohttp import web
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from extproc import __version__
from extproc.audit.spans import SCOPE, Instruments
from extproc.errors import ConfigError
from extproc.settings import TelemetrySettings

log = logging.getLogger("extproc.telemetry")

METRICS_PATH = "/metrics"


class Telemetry:
    """The providers of one server process; ``shutdown`` flushes what is still buffered."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        # A registry of its own: prometheus_client's global one also collects the
        # interpreter's process and GC metrics, and two servers in one process (the tests) would mix.
        self._registry: CollectorRegistry | None = None
        # One scrape at a time: the reader hands each collection to its collector through a shared
        # queue, and two scrapes at once could take each other's (one answer doubled, the other empty).
        # The window is a few bytecodes wide; the lock costs nothing at the rate scrapes come.
        self._scraping = threading.Lock()
        endpoint = settings.otlp_endpoint
        resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
        readers: list[MetricReader] = []
        if endpoint:
            readers += self._start_otlp(settings, endpoint, resource)
        if settings.prometheus:
            self._registry = CollectorRegistry()
            # Without the otel_scope_* labels: every instrument has the one scope "extproc", so they
            # would repeat on every series what the metric names already say.
            readers.append(PrometheusMetricReader(registry=self._registry, scope_info_enabled=False))
        meter = None
        if readers:
            self._meter_provider = MeterProvider(resource=resource, metric_readers=readers)
            meter = self._meter_provider.get_meter(SCOPE, __version__)
        tracer = None
        if self._tracer_provider is not None:
            tracer = self._tracer_provider.get_tracer(SCOPE, __version__)
        self.instruments = Instruments(tracer, meter)

    def _start_otlp(
        self, settings: TelemetrySettings, endpoint: str, resource: Resource
    ) -> list[MetricReader]:
        """The span pipeline to ``endpoint``, and the OTLP metric reader when metrics are pushed too."""
        # Imported here: only a configured endpoint needs them, and they can be broken by another package.
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigError(
                f"telemetry.otlp_endpoint is set but the OTLP exporter cannot load ({exc}). xds-protos ships "
                "an old copy of opentelemetry-proto's modules (grpc/grpc#42926) and was installed after it: "
                "pip install --force-reinstall --no-deps opentelemetry-proto==<its version>"
            ) from exc
        timeout = settings.export_timeout_seconds
        self._tracer_provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio))
        )
        self._tracer_provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, timeout=timeout),
                schedule_delay_millis=settings.export_delay_seconds * 1000,
                export_timeout_millis=timeout * 1000,
            )
        )
        log.info("telemetry_exporting", extra={"endpoint": endpoint, "service": settings.service_name})
        if not settings.metrics:
            return []
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=endpoint, timeout=timeout),
            export_interval_millis=settings.metrics_interval_seconds * 1000,
            export_timeout_millis=timeout * 1000,
        )
        return [reader]

    def add_routes(self, app: web.Application) -> None:
        """``GET /metrics`` on ``app`` (the admin server) when Prometheus scraping is on."""
        if self._registry is not None:
            app.router.add_get(METRICS_PATH, self._scrape)

    async def _scrape(self, request: web.Request) -> web.Response:
        """Prometheus' text format, or OpenMetrics when the scraper asks for it (the negotiation of
        prometheus_client's own server). Collected on a worker thread: a scrape of many series takes
        milliseconds, and the event loop keeps serving exchanges meanwhile."""
        body, content_type = await asyncio.to_thread(self.exposition, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics as a scrape gets them, in the format ``accept`` (an Accept header) prefers, and
        that format's content type. Blocking."""
        registry = self._registry
        if registry is None:
            raise RuntimeError("telemetry.prometheus is off: there is nothing to scrape")
        encode, content_type = choose_encoder(accept)
        with self._scraping:
            return encode(registry), content_type

    def shutdown(self) -> None:
        """Exports what is buffered and stops the exporters. Blocking: call it off the event loop."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
            self._tracer_provider = None
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
            self._meter_provider = None
