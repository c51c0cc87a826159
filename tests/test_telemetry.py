"""The SDK wiring: built only for a configured endpoint, and the OTLP exporter importable beside
xds-protos (which ships an old copy of opentelemetry-proto's modules: `make install` repairs it)."""

from extproc.settings import TelemetrySettings
from extproc.telemetry import Telemetry


def test_opentelemetry_proto_is_the_current_one_not_xds_protos_copy() -> None:
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope")  # the old copy has InstrumentationLibrary only


def test_nothing_pushed_or_scraped_builds_no_provider() -> None:
    telemetry = Telemetry(TelemetrySettings(prometheus=False))
    assert not telemetry.instruments.enabled
    telemetry.shutdown()


def test_without_an_endpoint_metrics_are_still_recorded_for_the_scrape() -> None:
    telemetry = Telemetry(TelemetrySettings())
    try:
        assert telemetry.instruments.enabled
        assert not telemetry.instruments.tracing  # spans need an endpoint
        telemetry.instruments.exchanges.add(1, {"extproc.decision": "allowed"})
        body, content_type = telemetry.exposition()
        assert content_type.startswith("text/plain")
        assert 'extproc_exchanges_total{extproc_decision="allowed"} 1.0' in body.decode()
    finally:
        telemetry.shutdown()


def test_an_endpoint_builds_exporting_instruments() -> None:
    settings = TelemetrySettings(
        otlp_endpoint="http://127.0.0.1:1", metrics=False, export_timeout_seconds=0.5
    )
    telemetry = Telemetry(settings)
    try:
        assert telemetry.instruments.enabled
        span = telemetry.instruments.tracer.start_span("probe")
        assert span.is_recording()
        span.end()
    finally:
        telemetry.shutdown()
