"""`extproc serve --workers N`: a supervisor and its worker processes, through real Envoy, with real Redis
for the approvals every worker shares and a session record file per worker."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.audit.keys import generate_keys
from extproc.audit.record import iter_records
from extproc.devenv import REPO_ENVOY_CONFIG, Stack
from extproc.errors import ConfigError
from extproc.settings import MAX_WORKERS, load_settings
from extproc.supervisor import WORKER_LABEL, merge_scrapes, worker_record_path

from .conftest import Demo, chat, start_stack
from .redis_fixture import RedisServer
from .test_signals import Serve

CARD = "4111 1111 1111 1111"
CARD_MASKED = "**** **** **** 1111"
ROOT = Path(__file__).resolve().parent.parent


def spreading_envoy_config(folder: Path) -> Path:
    """The repo's Envoy config with one ext_proc stream per connection to extproc. The kernel spreads
    connections over the workers, not streams: with Envoy's usual few long-lived HTTP/2 connections, a
    handful of requests could all reach one worker and prove nothing about the other."""
    config = yaml.safe_load(REPO_ENVOY_CONFIG.read_text(encoding="utf-8"))
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "extproc":
            options = cluster["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]
            options["common_http_protocol_options"] = {"max_requests_per_connection": 1}
    path = folder / "envoy-spreading.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_keys(tmp_path_factory.mktemp("worker-keys"))


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-record") / "session.jsonl"


def worker_env(redis: RedisServer, prefix: str) -> dict[str, str]:
    return {
        "EXTPROC_APPROVALS__STORE": "redis",
        "EXTPROC_APPROVALS__REDIS_URL": redis.url,
        "EXTPROC_APPROVALS__KEY_PREFIX": f"{prefix}:",
    }


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    keys: dict[str, Path],
    record: Path,
) -> Iterator[Stack]:
    """Envoy + `extproc serve --workers 2` + the demo model, the session record on."""
    folder = tmp_path_factory.mktemp("workers")
    env = {
        **worker_env(redis_server, f"workers-{uuid.uuid4().hex}"),
        "EXTPROC_AUDIT__RECORD_PATH": str(record),
        "EXTPROC_AUDIT__SEALING_KEY_FILE": str(keys["auditor_pub"]),
        "EXTPROC_AUDIT__SIGNING_KEY_FILE": str(keys["signing_key"]),
        "EXTPROC_AUDIT__CHECKPOINT_EVERY": "5",
    }
    running = start_stack(
        folder / "stack.log",
        extproc_workers=2,
        envoy_config=spreading_envoy_config(folder),
        extra_env=env,
    )
    yield running
    running.stop()


def admin(stack: Stack, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{stack.admin_port}{path}", timeout=30)


def supervisor_pid(stack: Stack) -> int:
    return stack.processes["extproc"].popen.pid


def worker_pids(stack: Stack) -> list[int]:
    return [w["pid"] for w in admin(stack, "/readyz").json()["workers"]]


def exchanges_by_worker(stack: Stack) -> dict[str, float]:
    """extproc_exchanges_total summed per worker, from the supervisor's /metrics."""
    counts: dict[str, float] = {}
    for line in admin(stack, "/metrics").text.splitlines():
        if line.startswith("extproc_exchanges_total{"):
            worker = line.split(f'{WORKER_LABEL}="', 1)[1].split('"', 1)[0]
            counts[worker] = counts.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def masked_chat(stack: Stack) -> str:
    answer = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=chat(f"my card is {CARD}"),
        headers={"content-type": "application/json", "connection": "close"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    content: str = answer.json()["choices"][0]["message"]["content"]
    return content


def wait_until(check: Any, what: str, seconds: float = 60.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not within {seconds:.0f} s: {what}")


def test_two_workers_each_serve_and_mask(workers: Stack, record: Path) -> None:
    before = exchanges_by_worker(workers)
    for _ in range(40):
        content = masked_chat(workers)
        assert CARD not in content
        assert CARD_MASKED in content
    after = exchanges_by_worker(workers)
    served = {worker: after.get(worker, 0.0) - before.get(worker, 0.0) for worker in ("0", "1")}
    assert all(count > 0 for count in served.values()), served
    assert sum(served.values()) == 40
    # Each worker records the exchanges it served in a file of its own, none in the shared name.
    assert not record.exists()
    files = [Path(worker_record_path(str(record), index)) for index in (0, 1)]

    def recorded() -> list[list[dict[str, Any]]]:
        per_file = [[r for _, r in iter_records(f) if r.get("type") == "exchange"] for f in files]
        return per_file if all(per_file) else []

    found = wait_until(recorded, "both workers' records written")
    for exchanges in found:  # masked in every worker's record: the card never lands in clear
        assert all(CARD not in json.dumps(r) for r in exchanges)


def test_admin_answers_for_every_worker(workers: Stack) -> None:
    ready = admin(workers, "/readyz")
    assert ready.status_code == 200
    assert [w["worker"] for w in ready.json()["workers"]] == [0, 1]
    assert all(w["status"] == "serving" for w in ready.json()["workers"])
    assert admin(workers, "/healthz").json()["running"] == 2
    snapshot = admin(workers, "/snapshot").json()
    assert snapshot["version"]
    assert {w["version"] for w in snapshot["workers"]} == {snapshot["version"]}
    # Every series once: the same name and labels never come from two workers.
    metrics = admin(workers, "/metrics")
    samples = [line.rsplit(" ", 1)[0] for line in metrics.text.splitlines() if not line.startswith("#")]
    assert samples
    assert len(samples) == len(set(samples))
    assert all(f'{WORKER_LABEL}="' in sample for sample in samples)
    # OpenMetrics, when the scraper asks for it (Prometheus does)
    negotiated = httpx.get(
        f"http://127.0.0.1:{workers.admin_port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert negotiated.headers["content-type"].startswith("application/openmetrics-text")
    assert negotiated.text.rstrip().endswith("# EOF")
    # The approval page is served through the supervisor's admin address (by a worker).
    page = admin(workers, "/approvals")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]


def test_reload_reaches_every_worker(workers: Stack) -> None:
    def reloads() -> list[int]:
        return [w["reloads"] for w in admin(workers, "/snapshot").json()["workers"]]

    before = reloads()
    os.kill(supervisor_pid(workers), signal.SIGHUP)
    wait_until(lambda: all(a > b for a, b in zip(reloads(), before, strict=True)), "every worker reloaded")
    # POST /reload (extproc reload) asks every worker and answers for all
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "reload",
            "--admin-address",
            f"127.0.0.1:{workers.admin_port}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["result"] == "ok"
    assert [w["result"] for w in answer["workers"]] == ["ok", "ok"]


def stream_chat(stack: Stack, reply: str, seen: list[str], started: threading.Event) -> None:
    """Reads one streamed answer through Envoy; ``seen`` gets what arrived and how it ended."""
    received = ""
    try:
        with httpx.stream(
            "POST",
            f"{stack.url}/v1/chat/completions",
            content=chat("hello", stream=True),
            headers={"content-type": "application/json", "x-demo-reply": reply, "connection": "close"},
            timeout=60,
        ) as answer:
            received += f"status {answer.status_code}\n"
            for chunk in answer.iter_text():
                received += chunk
                started.set()
        received += "\nend: complete"
    except httpx.HTTPError as error:
        received += f"\nend: {type(error).__name__}"
    seen.append(received)
    started.set()


def assembled(received: str) -> str:
    """The text of a chat stream's deltas, as a client puts it together."""
    text = ""
    for line in received.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                event = json.loads(line[len("data: ") :])
            except ValueError:
                continue
            for choice in event.get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_killed_worker_fails_closed_and_is_restarted(workers: Stack, demo_of_workers: Demo) -> None:
    # A slow answer whose card comes late: streams on the killed worker are cut before it, or never start.
    words = ["word "] * 30 + [f"card {CARD} "] + ["end "] * 5
    reply = demo_of_workers.script(content="".join(words), chunk_chars=5, delay_ms=100)
    pids = worker_pids(workers)
    seen: list[str] = []
    started = [threading.Event() for _ in range(16)]
    threads = [threading.Thread(target=stream_chat, args=(workers, reply, seen, event)) for event in started]
    for thread in threads:
        thread.start()
    for event in started:
        assert event.wait(30)
    os.kill(pids[1], signal.SIGKILL)
    # At once not ready: a worker is down, and the streams the kernel hands it would fail.
    assert wait_until(
        lambda: admin(workers, "/readyz").status_code == 503, "not ready while a worker is down"
    )
    for thread in threads:
        thread.join(90)
    assert len(seen) == 16
    texts = [assembled(answer) for answer in seen]
    # Never unscanned: each stream was cut, refused, or masked.
    assert all(CARD not in text and CARD not in answer for text, answer in zip(texts, seen, strict=True))
    completed = [
        t for t, a in zip(texts, seen, strict=True) if a.endswith("end: complete") and "status 200" in a
    ]
    assert len(completed) < 16, "no stream was on the killed worker"
    assert all(CARD_MASKED in text for text in completed)

    def restarted() -> bool:
        ready = admin(workers, "/readyz")
        return ready.status_code == 200 and ready.json()["workers"][1]["pid"] != pids[1]

    wait_until(restarted, "the killed worker restarted and ready")
    assert admin(workers, "/readyz").json()["workers"][1]["restarts"] == 1
    assert worker_pids(workers)[0] == pids[0]  # the other worker kept serving throughout
    for _ in range(10):
        assert CARD_MASKED in masked_chat(workers)


@pytest.fixture
def demo_of_workers(workers: Stack) -> Demo:
    return Demo(workers.demo_url)


def serve_workers(redis: RedisServer, tmp_path: Path, **env: str) -> Serve:
    return Serve(
        {
            **worker_env(redis, f"serve-{uuid.uuid4().hex}"),
            "EXTPROC_SERVER__WORKERS": "2",
            "EXTPROC_SERVER__GRPC_ADDRESS": "127.0.0.1:0",
            "EXTPROC_SERVER__ADMIN_ADDRESS": "127.0.0.1:0",
            "EXTPROC_APPROVALS__API_ADDRESS": "127.0.0.1:0",
            **env,
        }
    )


def test_sigterm_stops_every_worker_and_each_record_verifies(
    redis_server: RedisServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    record = tmp_path / "session.jsonl"
    serve = serve_workers(
        redis_server,
        tmp_path,
        EXTPROC_AUDIT__RECORD_PATH=str(record),
        EXTPROC_AUDIT__SIGNING_KEY_FILE=str(keys["signing_key"]),
    )
    try:
        ready = serve.wait_for("ready")
        assert ready["workers"] == 2
        pids = ready["pids"]
        serve.process.send_signal(signal.SIGTERM)
        assert serve.finish() == 0
    finally:
        serve.kill()
    events = serve.events()
    assert events.count("worker_stopped") == 2
    assert events[-1] == "stopped"
    for pid in pids:  # no worker outlives its supervisor
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    files = [str(worker_record_path(str(record), index)) for index in (0, 1)]
    verified = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc",
            "audit",
            "verify",
            *files,
            "--public-key",
            str(keys["signing_pub"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.count("hash chain intact") == 2


def test_workers_that_keep_dying_stop_the_service(redis_server: RedisServer, tmp_path: Path) -> None:
    serve = serve_workers(redis_server, tmp_path)
    try:
        ready = serve.wait_for("ready")
        admin_url = f"http://{ready['admin']}"
        killed: set[int] = set()
        deadline = time.monotonic() + 120
        while serve.process.poll() is None and time.monotonic() < deadline:
            try:
                pids = [w["pid"] for w in httpx.get(f"{admin_url}/readyz", timeout=5).json()["workers"]]
            except httpx.HTTPError:
                break  # the supervisor closed its admin endpoint: it is stopping
            for pid in pids:
                if pid is not None and pid not in killed:
                    killed.add(pid)
                    with_suppressed_lookup(pid)
            time.sleep(0.1)
        assert serve.finish(timeout=60) == 1
    finally:
        serve.kill()
    events = serve.events()
    assert "workers_failed" in events
    assert events.count("worker_exited") >= 5
    for pid in killed:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def with_suppressed_lookup(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_several_workers_refuse_the_memory_approval_store(tmp_path: Path) -> None:
    serve = Serve({"EXTPROC_SERVER__WORKERS": "2", "EXTPROC_SERVER__ADMIN_ADDRESS": "127.0.0.1:0"})
    try:
        assert serve.finish() == 2
    finally:
        serve.kill()
    failed = next(line for line in serve.lines if line["event"] == "serve_failed")
    assert "server.workers" in failed["error"]
    assert "approvals.store" in failed["error"]


def test_one_worker_keeps_the_port_exclusive(tmp_path: Path) -> None:
    """Without workers the listen address is never shared: a second sidecar on it is an error."""
    first = Serve(
        {"EXTPROC_SERVER__GRPC_ADDRESS": "127.0.0.1:0", "EXTPROC_SERVER__ADMIN_ADDRESS": "127.0.0.1:0"}
    )
    try:
        grpc_port, _ = first.ports()
        second = Serve(
            {
                "EXTPROC_SERVER__GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
                "EXTPROC_SERVER__ADMIN_ADDRESS": "127.0.0.1:0",
            }
        )
        try:
            assert second.finish() == 2
        finally:
            second.kill()
        failed = next(line for line in second.lines if line["event"] == "serve_failed")
        assert str(grpc_port) in failed["error"]
    finally:
        first.kill()


def test_workers_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().server.workers == 1
    assert load_settings(server={"workers": MAX_WORKERS}).server.workers == MAX_WORKERS
    for bad in (0, -1, MAX_WORKERS + 1, "two"):
        with pytest.raises(ConfigError, match=r"server\.workers"):
            load_settings(server={"workers": bad})
    monkeypatch.setenv("EXTPROC_SERVER__WORKERS", "3")
    assert load_settings().server.workers == 3
    monkeypatch.setenv("EXTPROC_SERVER__WORKERS", "0")
    with pytest.raises(ConfigError, match=r"\$EXTPROC_SERVER__WORKERS"):
        load_settings()


def test_worker_record_paths() -> None:
    assert (
        worker_record_path("/var/log/extproc/session.jsonl", 0) == "/var/log/extproc/session.worker-0.jsonl"
    )
    assert worker_record_path("record", 3) == "record.worker-3"


def test_merged_scrape_labels_every_worker() -> None:
    text = (
        "# HELP extproc_exchanges_total exchanges\n# TYPE extproc_exchanges_total counter\n"
        'extproc_exchanges_total{extproc_decision="masked"} 3.0\n'
        "# HELP extproc_scan_duration_seconds scan\n# TYPE extproc_scan_duration_seconds histogram\n"
        'extproc_scan_duration_seconds_bucket{le="0.1"} 1.0\n'
        'extproc_scan_duration_seconds_bucket{le="+Inf"} 2.0\n'
        "extproc_scan_duration_seconds_count 2.0\nextproc_scan_duration_seconds_sum 0.5\n"
    )
    body, content_type = merge_scrapes({0: text, 1: text.replace("3.0", "4.0")})
    merged = body.decode()
    assert content_type.startswith("text/plain")
    assert merged.count("# TYPE extproc_exchanges_total counter") == 1
    assert 'extproc_exchanges_total{extproc_decision="masked",extproc_worker="0"} 3.0' in merged
    assert 'extproc_exchanges_total{extproc_decision="masked",extproc_worker="1"} 4.0' in merged
    assert 'extproc_scan_duration_seconds_bucket{extproc_worker="1",le="+Inf"} 2.0' in merged
