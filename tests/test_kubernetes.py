"""deploy/kubernetes, without a cluster: the base and each overlay rendered as `kubectl kustomize` renders
them, every object checked against the Kubernetes API's schemas, the Envoy config each Pod runs loaded by
Envoy, the settings each ships loaded by extproc, and the parts that must agree with each other checked
against each other."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from extproc.cli import build_parser
from extproc.cli import main as extproc_main
from extproc.devenv import envoy_binary
from extproc.identity.dev import DEV_ISSUER, dev_identity, ensure_dev_key, mint_dev_token
from extproc.identity.jwt import Verifier
from extproc.settings import PLACEHOLDER, Settings, load_settings
from extproc.supervisor import require_shared_approvals

from .kubernetes_fixture import (
    KUBERNETES,
    KUSTOMIZATIONS,
    ROOT,
    Object,
    containers,
    one,
    operator_settings_text,
    pod,
    rendered,
    runs_extproc,
    settings_text,
)

# The Kubernetes versions every rendered object is validated against: the oldest the manifests are
# written for (native sidecar containers are on by default from 1.29, the preStop `sleep` action from
# 1.30), so that no field of a later release slips in, and the newest the locked kubernetes-validate has
# schemas for, so that nothing they use has been removed since.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Made by the operator with kubectl create before the first apply (README, "Deploy to Kubernetes"):
# keys are not kept in the repository.
OPERATOR_MADE = {
    "Secret": {"model-credential", "extproc-audit"},
    "ConfigMap": {"extproc-dev-jwks"},
}
OVERLAYS = ("overlays/dev", "overlays/production")
SHARED_SECTIONS = ("server", "log", "limits", "detect", "policy", "upstream", "audit")
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEPLOY_SECTION = README[README.index("## Deploy to Kubernetes") :].split("\n## ", 1)[0]


def _settings(kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The kustomization's settings with the placeholders set, loaded as the sidecar loads them (without
    the test session's own EXTPROC_* variables)."""
    for name in ("EXTPROC_DETECT__CACHE_DIR", "EXTPROC_APPROVALS__API_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "settings.yaml"
    path.write_text(operator_settings_text(settings_text(kustomization)), encoding="utf-8")
    return load_settings(path)


def _mounts(container: Object) -> list[str]:
    return [m["mountPath"] for m in container.get("volumeMounts", [])]


def _under_a_mount(file: str, container: Object) -> bool:
    return any(file.startswith(mount + "/") for mount in _mounts(container))


def _envoy_arguments(kustomization: str) -> Any:
    return build_parser().parse_args([str(a) for a in containers(kustomization)["envoy"]["args"]])


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _pod_labels(kustomization: str) -> dict[str, str]:
    labels: dict[str, str] = one(rendered(kustomization), "Deployment", "llm")["spec"]["template"][
        "metadata"
    ]["labels"]
    return labels


def test_every_kustomization_is_tested() -> None:
    found = {str(p.parent.relative_to(KUBERNETES)) for p in KUBERNETES.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_is_valid_for_the_kubernetes_api(kustomization: str, version: str) -> None:
    objects = rendered(kustomization)
    assert objects
    for obj in objects:
        # strict: a field the API does not have (a typo, or one from a later release) is an error
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_settings_in_the_config_maps_are_the_files() -> None:
    for kustomization in KUSTOMIZATIONS:
        file = KUBERNETES / kustomization / "settings.yaml"
        assert settings_text(kustomization) == file.read_text(encoding="utf-8"), kustomization


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_rules_config_map_is_the_repository_rules_mounted_as_laid_out(kustomization: str) -> None:
    objects = rendered(kustomization)
    # No hash suffix: a changed rule updates this ConfigMap, and the files of the running Pods, in place.
    config_map = one(objects, "ConfigMap", "extproc-rules")
    [volume] = [
        v for v in pod(kustomization)["volumes"] if v.get("configMap", {}).get("name") == "extproc-rules"
    ]
    items = volume["configMap"]["items"]
    assert sorted(i["key"] for i in items) == sorted(config_map["data"])  # every key projected, once
    layout = {i["path"]: config_map["data"][i["key"]] for i in items}
    shipped = {
        str(p.relative_to(ROOT / "rules")): p.read_text(encoding="utf-8")
        for p in (ROOT / "rules").rglob("*.yaml")
    }
    assert layout == shipped
    [mount] = [m for m in containers(kustomization)["extproc"]["volumeMounts"] if m["name"] == volume["name"]]
    # A subPath mount would never see the ConfigMap change.
    assert "subPath" not in mount
    assert mount["mountPath"] == "/etc/extproc/rules"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_settings_read_the_mounted_rules_and_files(
    kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(kustomization, tmp_path, monkeypatch)
    extproc = containers(kustomization)["extproc"]
    mounts = {m["mountPath"]: m for m in extproc["volumeMounts"]}
    assert settings.detect.rules == ["/etc/extproc/rules"]
    assert settings.policy.paths == ["/etc/extproc/rules/policies"]
    assert settings.detect.cache_dir in mounts
    files = [settings.upstream.credential_file, settings.audit.record_path]
    files += [settings.audit.sealing_key_file, settings.audit.signing_key_file]
    files += [i.jwks_file for i in settings.identity.issuers if i.jwks_file]
    for file in files:
        assert file is not None
        assert _under_a_mount(file, extproc), file
    # The container reads the settings where the ConfigMap is mounted.
    arguments = build_parser().parse_args([str(a) for a in extproc["args"]])
    assert arguments.command == "serve"
    assert Path(arguments.config).parent.as_posix() in mounts


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_extproc_is_a_native_sidecar_ready_before_envoy_and_stopped_after_it(kustomization: str) -> None:
    spec = pod(kustomization)
    sidecars = {c["name"]: c for c in spec["initContainers"]}
    assert list(sidecars) == ["model", "extproc"]  # started in this order, stopped in the reverse one
    assert all(c["restartPolicy"] == "Always" for c in sidecars.values())
    assert [c["name"] for c in spec["containers"]] == ["envoy"]
    # The kubelet starts Envoy once this probe passes: extproc serves, its rules compiled.
    startup = sidecars["extproc"]["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_and_ports_agree_with_the_settings_and_envoy(
    kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(kustomization, tmp_path, monkeypatch)
    extproc, envoy = containers(kustomization)["extproc"], containers(kustomization)["envoy"]
    assert extproc["ports"] == [{"name": "admin", "containerPort": _port(settings.server.admin_address)}]
    assert extproc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert extproc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    arguments = _envoy_arguments(kustomization)
    assert arguments.extproc == ("127.0.0.1", _port(settings.server.grpc_address))
    assert envoy["ports"] == [{"name": "http", "containerPort": arguments.listen[1]}]
    # The Service exposes Envoy's port, and only it.
    service = one(rendered(kustomization), "Service", "llm")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["selector"] == _pod_labels(kustomization)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_the_pod_has_time_for_envoy_to_drain_then_extproc(
    kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a stop Envoy goes first (its preStop, then its drain), and the sidecars after it: the grace
    period covers both, one after the other."""
    settings = _settings(kustomization, tmp_path, monkeypatch)
    envoy = containers(kustomization)["envoy"]
    envoy_args = _envoy_arguments(kustomization).envoy_args
    drain_time = float(envoy_args[envoy_args.index("--drain-time-s") + 1])
    envoy_stop = envoy["lifecycle"]["preStop"]["sleep"]["seconds"] + drain_time
    extproc_stop = settings.server.drain_seconds + settings.server.grace_seconds
    assert pod(kustomization)["terminationGracePeriodSeconds"] > envoy_stop + extproc_stop


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_extproc_container_runs_a_real_command(kustomization: str) -> None:
    ran = {c["name"]: c for c in containers(kustomization).values() if runs_extproc(c)}
    assert {"extproc", "envoy"} <= set(ran)
    for container in ran.values():
        parsed = build_parser().parse_args([str(a) for a in container["args"]])
        assert parsed.command in {"serve", "envoy", "demo"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_envoy_accepts_the_config_the_pod_renders(
    kustomization: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Envoy container runs `extproc envoy ARGS`, which renders envoy/envoy.yaml (the image's
    /etc/extproc/envoy.yaml) for its addresses: the same rendering, loaded by Envoy 1.40."""
    args = [str(a) for a in containers(kustomization)["envoy"]["args"]]
    in_image = "--envoy-config=/etc/extproc/envoy.yaml"
    assert in_image in args
    assert "COPY envoy/envoy.yaml /etc/extproc/envoy.yaml" in (ROOT / "deploy/Dockerfile").read_text()
    here = [f"--envoy-config={ROOT / 'envoy/envoy.yaml'}" if a == in_image else a for a in args]
    parsed = build_parser().parse_args(here)
    dashdash = here.index("--")
    capsys.readouterr()
    assert extproc_main([*here[:dashdash], "--print"]) == 0
    config_text = capsys.readouterr().out
    config = yaml.safe_load(config_text)
    path = tmp_path / "envoy.yaml"
    path.write_text(config_text, encoding="utf-8")
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id", *parsed.envoy_args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert (listener["address"], listener["port_value"]) == parsed.listen
    clusters = {c["name"] for c in config["static_resources"]["clusters"]}
    assert ("otel_collector" in clusters) == (parsed.otlp is not None)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_envoy_and_extproc_trace_to_the_same_collector(
    kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(kustomization, tmp_path, monkeypatch)
    assert _envoy_arguments(kustomization).otlp == settings.telemetry.otlp_endpoint


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_one_replica_keeps_approvals_in_memory_several_share_them(
    kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(kustomization, tmp_path, monkeypatch)
    replicas = one(rendered(kustomization), "Deployment", "llm")["spec"]["replicas"]
    assert (settings.approvals.store == "memory") == (replicas == 1)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_workers_have_a_core_each_and_share_approvals(
    kustomization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extproc = containers(kustomization)["extproc"]
    for variable in extproc.get("env", []):
        monkeypatch.setenv(variable["name"], str(variable["value"]))
    settings = _settings(kustomization, tmp_path, monkeypatch)
    require_shared_approvals(settings)  # serve refuses several workers with approvals in memory
    cpu = str(extproc["resources"]["requests"]["cpu"])
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    # One worker may share a core; several are there to use one each.
    assert cores >= settings.server.workers or settings.server.workers == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlays_change_only_what_differs_in_the_settings(overlay: str) -> None:
    base = yaml.safe_load((KUBERNETES / "base/settings.yaml").read_text(encoding="utf-8"))
    theirs = yaml.safe_load((KUBERNETES / overlay / "settings.yaml").read_text(encoding="utf-8"))
    for section in SHARED_SECTIONS:
        assert theirs[section] == base[section], section


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_what_the_pod_reads_is_rendered_or_made_by_the_operator(kustomization: str) -> None:
    objects = rendered(kustomization)
    spec = pod(kustomization)
    present = {(o["kind"], o["metadata"]["name"]) for o in objects}
    wanted: set[tuple[str, str]] = set()
    for volume in spec["volumes"]:
        if "configMap" in volume:
            wanted.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            wanted.add(("Secret", volume["secret"]["secretName"]))
    for container in containers(kustomization).values():
        for variable in container.get("env", []):
            if "secretKeyRef" in variable.get("valueFrom", {}):
                wanted.add(("Secret", variable["valueFrom"]["secretKeyRef"]["name"]))
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in {v["name"] for v in spec["volumes"]}, mount
    for kind, name in wanted - present:
        assert name in OPERATOR_MADE[kind], (kind, name)
        # ... and the walk-through says how to make it.
        assert f"create {kind.lower() if kind == 'ConfigMap' else 'secret generic'} {name}" in DEPLOY_SECTION


async def test_a_token_of_extproc_token_verifies_with_the_dev_overlays_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dev overlay trusts the issuer `extproc token` signs for, with the JWKS of the developer's own
    key (the ConfigMap extproc-dev-jwks): a token minted on the laptop verifies in the Pod."""
    settings = _settings("overlays/dev", tmp_path, monkeypatch)
    [issuer] = settings.identity.issuers
    dev = tmp_path / "dev"  # where `extproc token` keeps its key pair (~/.cache/extproc)
    expected = dev_identity(dev)["issuers"][0]
    for field in ("issuer", "audiences", "algorithms", "groups_claim"):
        assert getattr(issuer, field) == expected[field], field
    assert issuer.issuer == DEV_ISSUER
    assert issuer.jwks_file == "/etc/extproc/identity/jwks.json"
    # The walk-through's kubectl create configmap names the key the settings read.
    assert f"--from-file={Path(issuer.jwks_file).name}=" in DEPLOY_SECTION
    mounted = tmp_path / "jwks.json"  # the mounted ConfigMap, where the test can put it
    mounted.write_bytes(ensure_dev_key(dev).read_bytes())
    identity = settings.identity.model_copy(
        update={"issuers": [issuer.model_copy(update={"jwks_file": str(mounted)})]}
    )
    verifier = Verifier(identity)
    await verifier.start()
    try:
        principal = verifier.verify(mint_dev_token(dev, "dev-user", ["support"], 60))
    finally:
        await verifier.close()
    assert principal.subject == "dev-user"
    assert principal.groups == frozenset({"support"})


def test_the_dev_overlay_traces_to_its_jaeger() -> None:
    objects = rendered("overlays/dev")
    service = one(objects, "Service", "jaeger")
    otlp = urlsplit(_envoy_arguments("overlays/dev").otlp)
    assert otlp.hostname == service["metadata"]["name"]
    assert otlp.port in {p["port"] for p in service["spec"]["ports"]}
    # The same Jaeger as deploy/compose.yaml's.
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text(encoding="utf-8"))
    [jaeger] = one(objects, "Deployment", "jaeger")["spec"]["template"]["spec"]["containers"]
    assert jaeger["image"] == compose["services"]["jaeger"]["image"]
    assert jaeger["args"] == compose["services"]["jaeger"]["command"]


def test_the_dev_overlay_runs_the_demo_model_with_the_models_key() -> None:
    model = containers("overlays/dev")["model"]
    parsed = build_parser().parse_args([str(a) for a in model["args"]])
    assert parsed.command == "demo"
    assert (parsed.host, parsed.port) == ("127.0.0.1", 8000)
    assert _envoy_arguments("overlays/dev").upstream == "http://127.0.0.1:8000"
    # The demo requires the key extproc sets, from the same Secret.
    [mount] = [m for m in model["volumeMounts"] if parsed.api_key_file.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod("overlays/dev")["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "model-credential"


def test_production_runs_three_replicas_that_a_drain_takes_one_at_a_time() -> None:
    objects = rendered("overlays/production")
    assert one(objects, "Deployment", "llm")["spec"]["replicas"] == 3
    budget = one(objects, "PodDisruptionBudget", "llm")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == {"matchLabels": _pod_labels("overlays/production")}
    spread = pod("overlays/production")["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread:
        assert constraint["labelSelector"] == {"matchLabels": _pod_labels("overlays/production")}


def test_production_admits_envoys_port_and_the_admin_port_from_monitoring_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings("overlays/production", tmp_path, monkeypatch)
    policy = one(rendered("overlays/production"), "NetworkPolicy", "llm")["spec"]
    assert policy["podSelector"] == {"matchLabels": _pod_labels("overlays/production")}
    assert policy["policyTypes"] == ["Ingress"]
    envoy_port = _envoy_arguments("overlays/production").listen[1]
    admin_port = _port(settings.server.admin_address)
    anyone, monitoring = policy["ingress"]
    assert anyone == {"ports": [{"protocol": "TCP", "port": envoy_port}]}
    assert monitoring["ports"] == [{"protocol": "TCP", "port": admin_port}]
    assert monitoring["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_production_is_scraped_by_prometheus_on_the_admin_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings("overlays/production", tmp_path, monkeypatch)
    template = one(rendered("overlays/production"), "Deployment", "llm")["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(_port(settings.server.admin_address)),
        "prometheus.io/path": "/metrics",
    }


def test_production_sets_requests_and_limits_for_every_container() -> None:
    for name, container in containers("overlays/production").items():
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)


def test_production_placeholders_are_the_documented_ones() -> None:
    """Beside the settings' placeholders (refused by the sidecar: tests/test_deploy.py), two are left
    in the manifests: the registry holding your image and the model to serve. The walk-through names
    both."""
    found: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, str) and PLACEHOLDER in value:
            found.append(value)

    for obj in rendered("overlays/production"):
        if not obj["metadata"]["name"].startswith("extproc-settings-"):
            collect(obj)
    assert sorted(set(found)) == sorted({PLACEHOLDER, f"registry.{PLACEHOLDER}.example/extproc:0.1.0"})
    model = containers("overlays/production")["model"]["args"]
    assert model[model.index("--model") + 1] == PLACEHOLDER
    assert f"registry.{PLACEHOLDER}.example" in DEPLOY_SECTION
    assert "--model" in DEPLOY_SECTION


def test_the_walkthrough_renders_with_the_load_restrictor_lifted() -> None:
    """The rules live outside deploy/kubernetes: every command of the walk-through that builds an
    overlay lifts the restriction, and none applies a folder with `kubectl apply -k`, which cannot."""
    blocks = re.findall(r"```sh\n(.*?)```", DEPLOY_SECTION, flags=re.DOTALL)
    inline = re.findall(r"`([^`]+)`", re.sub(r"```sh\n.*?```", "", DEPLOY_SECTION, flags=re.DOTALL))
    commands = [" ".join(c.split()) for c in [*"".join(blocks).splitlines(), *inline]]
    builds = [c for c in commands if "kubectl kustomize" in c and "deploy/kubernetes/" in c]
    assert len(builds) >= 2
    for command in builds:
        assert "--load-restrictor LoadRestrictionsNone" in command, command
    assert not [c for c in commands if "apply -k" in c and "deploy/kubernetes" in c]
