"""OpenTelemetry SDK wiring: providers, the OTLP/gRPC exporters and their shutdown. The only module that
imports the SDK; the rest of the package speaks the API (``extproc.audit.spans``).

No endpoint configured: no provider is built and the instruments are the API's no-op ones, so an exchange
pays nothing for telemetry. With one, spans leave through a batch processor (export happens on its own
thread, never on the event loop) and metrics through a periodic reader. Spans follow the sampling decision
Envoy propagates; an exchange arriving without trace context is sampled at ``sample_ratio``.
"""

from __future__ import annotations

import logging

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from extproc import __version__
from extproc.audit.spans import SCOPE, Instruments
from extproc.errors import ConfigError
from extproc.settings import TelemetrySettings

log = logging.getLogger("extproc.telemetry")


class Telemetry:
    """The providers of one server process; ``shutdown`` flushes what is still buffered."""

    def __init__(self, settings: TelemetrySettings) -> None:
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        endpoint = settings.otlp_endpoint
        if not endpoint:
            self.instruments = Instruments()
            return
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
        resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
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
        meter = None
        if settings.metrics:
            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=endpoint, timeout=timeout),
                export_interval_millis=settings.metrics_interval_seconds * 1000,
                export_timeout_millis=timeout * 1000,
            )
            self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
            meter = self._meter_provider.get_meter(SCOPE, __version__)
        self.instruments = Instruments(self._tracer_provider.get_tracer(SCOPE, __version__), meter)
        log.info("telemetry_exporting", extra={"endpoint": endpoint, "service": settings.service_name})

    def shutdown(self) -> None:
        """Exports what is buffered and stops the exporters. Blocking: call it off the event loop."""
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
            self._tracer_provider = None
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
            self._meter_provider = None
