"""Every Envoy config in the repository loads in Envoy 1.40 and keeps the rules that keep it safe."""

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.devenv import Upstream, envoy_binary, render_envoy_config
from extproc.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(
    p
    for folder in ("envoy", "deploy")
    for p in (ROOT / folder).rglob("*.yaml")
    if "static_resources:" in p.read_text(encoding="utf-8")
)


def _seconds(value: str) -> float:
    assert value.endswith("s"), value
    return float(value[:-1])


def _filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                found.extend(network_filter["typed_config"].get("http_filters", []))
    return found


def _hcms(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        f["typed_config"]
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
    ]


def test_configs_are_found() -> None:
    assert ROOT / "envoy" / "envoy.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_envoy_accepts_the_config(path: Path) -> None:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_ext_proc_rules(path: Path) -> None:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    [ext_proc] = [f["typed_config"] for f in _filters(config) if f["name"] == "envoy.filters.http.ext_proc"]
    # Fail closed: a dead or failing processor must never mean unscanned traffic.
    assert ext_proc["failure_mode_allow"] is False
    # The 200 ms default message timeout is too short to scan a large prompt.
    assert _seconds(ext_proc["message_timeout"]) >= 1
    mode = ext_proc["processing_mode"]
    assert mode["request_body_mode"] in ("BUFFERED", "FULL_DUPLEX_STREAMED")
    # Token streams need a streaming body mode (BUFFERED holds the whole stream); FDS needs trailers SEND.
    assert mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert mode["response_trailer_mode"] == "SEND"
    # A rejected mutation (say, removing a credential) must fail the request, not vanish.
    assert ext_proc["mutation_rules"]["disallow_is_error"] is True
    # The extproc cluster speaks gRPC: without HTTP/2 every request fails at runtime.
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "extproc"]
    protocol = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in protocol["explicit_http_config"]
    # Holds (approvals) and quiet streams must not be cut by an idle timer shorter than the hold ceiling.
    ceiling = _seconds(ext_proc["max_message_timeout"])
    for hcm in _hcms(config):
        assert _seconds(hcm["stream_idle_timeout"]) > ceiling
        for vhost in hcm["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                if "route" in route and route["route"].get("cluster") == "model":
                    assert _seconds(route["route"]["idle_timeout"]) > ceiling
                    # Responses reach ext_proc as sent: ask upstreams for identity encoding.
                    assert "accept-encoding" in route["request_headers_to_remove"]


def test_rendering_replaces_ports_and_can_drop_the_filter() -> None:
    base = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    config = render_envoy_config(
        base, listen_port=1, admin_port=2, extproc_port=3, upstream=Upstream.parse("http://model.local:4")
    )
    assert config["admin"]["address"]["socket_address"]["port_value"] == 2
    model = next(c for c in config["static_resources"]["clusters"] if c["name"] == "model")
    assert model["type"] == "STRICT_DNS"
    assert base["static_resources"]["clusters"][1]["type"] == "STATIC"  # the base is not modified
    bare = render_envoy_config(
        base,
        listen_port=1,
        admin_port=2,
        extproc_port=3,
        upstream=Upstream("127.0.0.1", 4),
        with_extproc=False,
    )
    assert all(f["name"] != "envoy.filters.http.ext_proc" for f in _filters(bare))


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently,
    and so may Envoy: a second `metadata_options` once erased the first)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    repeated = {k for k in keys if keys.count(k) > 1}
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_key_is_given_twice(path: Path) -> None:
    yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader


def test_the_trace_reaches_extproc_and_the_collector() -> None:
    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    [hcm] = _hcms(config)
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    cluster_name = provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster_name]
    protocol = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in protocol["explicit_http_config"]  # OTLP/gRPC
    [ext_proc] = [f["typed_config"] for f in _filters(config) if f["name"] == "envoy.filters.http.ext_proc"]
    # Without Envoy's client span the propagated context is unsampled and extproc's spans are dropped.
    assert ext_proc.get("emit_client_span", True) is not False
    # Identity mode envoy needs jwt_authn's payload forwarded, and the decision id comes back.
    options = ext_proc["metadata_options"]
    assert "envoy.filters.http.jwt_authn" in options["forwarding_namespaces"]["untyped"]
    assert "llm.extproc" in options["receiving_namespaces"]["untyped"]


def test_rendering_points_the_collector_or_turns_tracing_off() -> None:
    base = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    common: dict[str, Any] = {
        "listen_port": 1,
        "admin_port": 2,
        "extproc_port": 3,
        "upstream": Upstream("127.0.0.1", 4),
    }
    traced = render_envoy_config(base, **common, otlp=Upstream.parse("http://jaeger:4317"))
    [collector] = [c for c in traced["static_resources"]["clusters"] if c["name"] == "otel_collector"]
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "jaeger", "port_value": 4317}
    assert collector["type"] == "STRICT_DNS"
    assert "tracing" in _hcms(traced)[0]
    quiet = render_envoy_config(base, **common)
    assert "tracing" not in _hcms(quiet)[0]
    assert all(c["name"] != "otel_collector" for c in quiet["static_resources"]["clusters"])


def _percent(value: dict[str, Any] | None) -> float:
    return 100.0 if value is None else float(value["value"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_caller_cannot_decide_whether_a_request_is_traced(path: Path) -> None:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    for hcm in _hcms(config):
        if "tracing" not in hcm:
            continue
        # Envoy's defaults read the sampling decision from the caller's x-request-id (and rewrite it):
        # `x-request-id: job-42` meant no trace at all.
        extension = hcm["request_id_extension"]["typed_config"]
        assert extension["@type"].endswith("UuidRequestIdConfig")
        assert extension["use_request_id_for_trace_sampling"] is False
        assert extension["pack_trace_reason"] is False  # the caller's id is kept as sent
        # The tracer's sampler decides from the trace id, whatever sampled flag a caller's traceparent
        # has; the connection manager's percentages, no longer consulted, must not sample a second time.
        tracing = hcm["tracing"]
        sampler = tracing["provider"]["typed_config"]["sampler"]
        assert sampler["name"] == "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based"
        assert _percent(tracing.get("random_sampling")) == 100
        assert _percent(tracing.get("overall_sampling")) == 100


def test_rendering_keeps_the_request_id_settings() -> None:
    base = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    common: dict[str, Any] = {
        "listen_port": 1,
        "admin_port": 2,
        "extproc_port": 3,
        "upstream": Upstream("127.0.0.1", 4),
    }
    for config in (
        render_envoy_config(base, **common, otlp=Upstream.parse("http://jaeger:4317")),
        render_envoy_config(base, **common),
        render_envoy_config(base, **common, with_extproc=False),
    ):
        [hcm] = _hcms(config)
        assert hcm["request_id_extension"] == _hcms(base)[0]["request_id_extension"]
    [traced] = _hcms(render_envoy_config(base, **common, otlp=Upstream.parse("http://jaeger:4317")))
    assert traced["tracing"] == _hcms(base)[0]["tracing"]


def _model_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    [hcm] = _hcms(config)
    [vhost] = hcm["route_config"]["virtual_hosts"]
    return [r for r in vhost["routes"] if r.get("route", {}).get("cluster") == "model"]


def test_the_repo_config_routes_the_default_model_paths_and_refuses_the_rest() -> None:
    from extproc.routes import DEFAULT_MODEL_PATHS, envoy_match

    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    assert [r["match"] for r in _model_routes(config)] == [envoy_match(p) for p in DEFAULT_MODEL_PATHS]
    [hcm] = _hcms(config)
    last = hcm["route_config"]["virtual_hosts"][0]["routes"][-1]
    assert last["match"] == {"prefix": "/"}
    assert last["direct_response"]["status"] == 404


def test_rendering_writes_one_route_per_model_path_before_the_404(tmp_path: Path) -> None:
    base = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    config = render_envoy_config(
        base,
        listen_port=1,
        admin_port=2,
        extproc_port=3,
        upstream=Upstream("127.0.0.1", 4),
        model_paths=["/v1/", "/api/chat"],
    )
    routes = _model_routes(config)
    assert [(r["name"], r["match"]) for r in routes] == [
        ("model_v1", {"prefix": "/v1/"}),
        ("model_api_chat", {"path": "/api/chat"}),
    ]
    assert all(r["request_body_buffer_limit"] == 16777216 for r in routes)
    names = [r["name"] for r in _hcms(config)[0]["route_config"]["virtual_hosts"][0]["routes"]]
    assert names == ["healthz", "model_v1", "model_api_chat", "not_found"]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(ConfigError, match="segment"):
        render_envoy_config(
            base, listen_port=1, admin_port=2, extproc_port=3, upstream=Upstream("127.0.0.1", 4),
            model_paths=["/v1/../api/"],
        )  # fmt: skip


def _thresholds(cluster: dict[str, Any]) -> dict[str, int]:
    """The cluster's DEFAULT-priority circuit breaker, with Envoy's defaults for what it does not set."""
    limits = {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024}
    for threshold in cluster.get("circuit_breakers", {}).get("thresholds", []):
        if threshold.get("priority", "DEFAULT") == "DEFAULT":
            limits.update({k: int(v) for k, v in threshold.items() if k in limits})
    return limits


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_request_the_model_admits_can_get_an_ext_proc_stream(path: Path) -> None:
    """A request holds its ext_proc stream as long as it lasts: with Envoy's default of 1,024 concurrent
    requests on the extproc cluster, a busy pod would fail requests the model still had room for."""
    clusters = {c["name"]: c for c in yaml.safe_load(path.read_text())["static_resources"]["clusters"]}
    model, extproc = _thresholds(clusters["model"]), _thresholds(clusters["extproc"])
    admitted = model["max_connections"] + model["max_pending_requests"]
    assert extproc["max_requests"] >= admitted
    assert extproc["max_pending_requests"] >= admitted
