"""Failing closed under faults, with real processes: `extproc dev` killed hard, extproc killed or stopped
under load, the model server dying mid-stream, clients leaving mid-stream, and a stop signal with
streams in flight. Every byte a client receives is checked against what the scanned answer would be."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

import extproc.server
from extproc.audit.keys import generate_keys
from extproc.audit.record import iter_records
from extproc.devenv import REPO_ENVOY_CONFIG, Stack
from extproc.exchange import Exchange
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server
from extproc.settings import load_settings

from .conftest import Demo, chat, start_stack

pytestmark = pytest.mark.slow


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])  # the name may hold spaces and parentheses


def descendants(root: int) -> set[int]:
    """Every process below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def wait_gone(pidfds: dict[int, int], timeout: float) -> set[int]:
    """Waits until every process behind ``pidfds`` has ended (a pidfd turns readable then), or the
    timeout; returns the pids still running."""
    poll = select.poll()
    by_fd = {fd: pid for pid, fd in pidfds.items()}
    for fd in by_fd:
        poll.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    running = set(by_fd)
    while running and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poll.poll(left * 1000):
            running.discard(fd)
            poll.unregister(fd)
    return {by_fd[fd] for fd in running}


@pytest.fixture
def reaper() -> Iterator[dict[int, int]]:
    """pid -> pidfd of processes a test must not leave behind: killed at the end if still there."""
    pidfds: dict[int, int] = {}
    yield pidfds
    for fd in pidfds.values():
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)


@pytest.mark.envoy
def test_extproc_dev_killed_hard_takes_envoy_extproc_and_the_model_with_it(
    tmp_path: Path, reaper: dict[int, int]
) -> None:
    ports = ["--port", "0", "--envoy-admin-port", "0", "--extproc-port", "0", "--admin-port", "0"]
    ports += ["--approvals-port", "0", "--demo-port", "0"]
    dev = subprocess.Popen(
        [sys.executable, "-m", "extproc", "dev", *ports, "--dev-dir", str(tmp_path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "EXTPROC_SERVER__DRAIN_SECONDS": "0"},
    )
    lines: list[str] = []
    up = threading.Event()

    def read() -> None:  # dev's output is read to its end, so that it never blocks on a full pipe
        assert dev.stderr is not None
        for line in dev.stderr:
            lines.append(line)
            if line.strip().startswith("curl -s "):
                up.set()
        up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(120)
        assert dev.poll() is None, "".join(lines[-30:])
        children = descendants(dev.pid)
        for pid in children:
            reaper[pid] = os.pidfd_open(pid)
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in children}
        assert "envoy" in names
        assert len(children) >= 3  # Envoy, extproc serve, the demo model
        [envoy_url] = [line.split()[1] for line in lines if line.strip().startswith("Envoy ")]
        envoy_port = int(envoy_url.rpartition(":")[2])

        dev.kill()
        dev.wait(10)
        assert wait_gone(reaper, timeout=15) == set()
        # Their ports are free again: nothing listens where Envoy did.
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", envoy_port))
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait(10)
        reader.join(10)
        assert dev.stderr is not None
        dev.stderr.close()


# -- a stack of our own, whose components a test may kill -----------------------------------------------

CARD = "4111 1111 1111 1111"
CARD_MASKED = "**** **** **** 1111"
EMAIL = "jane.doe@example.com"
EMAIL_MASKED = "[REDACTED:EMAIL_ADDRESS]"
SECRET = "".join(f"Entry {n}: card {CARD}, mail {EMAIL}. " for n in range(5))
SECRET_MASKED = SECRET.replace(CARD, CARD_MASKED).replace(EMAIL, EMAIL_MASKED)
MESSAGE_TIMEOUT_SECONDS = 2  # Envoy's ext_proc message_timeout in these tests (10 s in envoy/envoy.yaml)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Envoy + extproc (session record on) + demo model, with a short ext_proc message timeout."""
    folder = tmp_path_factory.mktemp("faults")
    config = yaml.safe_load(REPO_ENVOY_CONFIG.read_text(encoding="utf-8"))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [ext_proc] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    ext_proc["typed_config"]["message_timeout"] = f"{MESSAGE_TIMEOUT_SECONDS}s"
    envoy_config = folder / "envoy.yaml"
    envoy_config.write_text(yaml.safe_dump(config), encoding="utf-8")
    keys = generate_keys(folder / "keys")
    record = folder / "session.jsonl"
    env = {
        "EXTPROC_AUDIT__RECORD_PATH": str(record),
        "EXTPROC_AUDIT__SEALING_KEY_FILE": str(keys["auditor_pub"]),
        "EXTPROC_AUDIT__SIGNING_KEY_FILE": str(keys["signing_key"]),
    }
    running = start_stack(folder / "stack.log", envoy_config=envoy_config, extra_env=env)
    yield running
    running.stop()


@pytest.fixture
def stack(faulty: Stack) -> Stack:
    """The module's stack with every component running: one a test before left dead is started again,
    on its port, with Envoy left as it was."""
    if faulty.processes["demo"].popen.poll() is not None:
        faulty.start_demo()
    if faulty.processes["extproc"].popen.poll() is not None:
        faulty.start_extproc()
    return faulty


def record_path(stack: Stack) -> Path:
    return Path(stack.extra_env["EXTPROC_AUDIT__RECORD_PATH"])


@dataclass
class Seen:
    """What one client received: status, raw bytes, and the exception that ended it, if one did."""

    kind: str  # "json" or "sse"
    status: int | None = None
    body: bytes = b""
    error: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # sent: the record keeps it
    flowing: asyncio.Event = field(default_factory=asyncio.Event)  # text (or the answer) has arrived

    @property
    def text(self) -> str:
        """The answer's text as the client assembles it: the deltas of the complete SSE events, or the
        JSON body as it came."""
        if self.kind == "json":
            return self.body.decode("utf-8", "replace")
        text = ""
        for event in self.body.split(b"\n\n")[:-1]:
            for line in event.split(b"\n"):
                if line.startswith(b"data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    text += choices[0].get("delta", {}).get("content") or ""
        return text

    @property
    def complete(self) -> bool:
        """Whether the client could take this for a whole answer."""
        if self.error is not None or self.status != 200:
            return False
        if self.kind == "sse":
            return self.body.endswith(b"data: [DONE]\n\n") and b"event: error" not in self.body
        return True

    def assert_nothing_in_clear(self) -> None:
        text, raw = self.text, self.body.decode("utf-8", "replace")
        for secret in (CARD, CARD.replace(" ", ""), EMAIL):
            assert secret not in raw, self
            assert secret not in text, self
        if self.kind == "sse" and self.status == 200:
            # Released text is the start of the masked answer: never a byte the scan had not passed.
            assert SECRET_MASKED.startswith(text), self


async def ask(client: httpx.AsyncClient, seen: Seen, reply: str, tag: str = "") -> Seen:
    headers = {"content-type": "application/json", "x-demo-reply": reply, "x-test-tag": tag}
    headers["x-request-id"] = seen.request_id
    body = chat("tell me", stream=seen.kind == "sse")
    try:
        async with client.stream("POST", "/v1/chat/completions", content=body, headers=headers) as answer:
            seen.status = answer.status_code
            async for chunk in answer.aiter_raw():
                seen.body += chunk
                if seen.kind == "json" or seen.text:
                    seen.flowing.set()
    except httpx.HTTPError as exc:
        seen.error = f"{type(exc).__name__}: {exc}"
    return seen


def scripts(demo: Demo) -> dict[str, str]:
    """Slow answers holding card numbers and addresses: an SSE stream of 3-character tokens (about 4 s)
    and a JSON answer coming 24 bytes at a time (about 3 s)."""
    return {
        "sse": demo.script(content=SECRET, chunk_chars=3, delay_ms=50),
        "json": demo.script(content=SECRET, chunk_chars=24, delay_ms=100),
    }


async def wait_in_flight(demo: Demo, tag: str, seen: list[Seen]) -> None:
    """Until every request has reached the model and every stream is flowing: the answers are on their
    way when the fault comes. (A JSON answer shows nothing to its client before it is whole, so the
    model's own list of requests received says when it is being answered.)"""
    async with asyncio.timeout(20):
        for one in seen:
            if one.kind == "sse":
                await one.flowing.wait()
        while len(await asyncio.to_thread(demo.received, tag)) < len(seen):  # noqa: ASYNC110 - no push
            await asyncio.sleep(0.05)


async def service_resumes(client: httpx.AsyncClient, demo: Demo) -> None:
    """Asks until an answer comes back (Envoy reconnects to the restarted extproc by itself), then checks
    that both kinds of answer come masked and whole."""
    async with asyncio.timeout(30):
        while (await ask(client, Seen("json"), demo.script(content="hello"))).status != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    sse, whole = await asyncio.gather(
        ask(client, Seen("sse"), demo.script(content=SECRET, chunk_chars=3)),
        ask(client, Seen("json"), demo.script(content=SECRET)),
    )
    for seen in (sse, whole):
        assert seen.complete, seen
        seen.assert_nothing_in_clear()
    assert sse.text == SECRET_MASKED
    assert json.loads(whole.body)["choices"][0]["message"]["content"] == SECRET_MASKED


def envoy_counter(stack: Stack, name: str) -> int:
    with urllib.request.urlopen(f"{stack.envoy_admin_url}/stats?format=json&filter={name}") as answer:  # noqa: S310
        stats = json.load(answer)["stats"]
    return sum(int(stat.get("value", 0)) for stat in stats if stat.get("name", "").endswith(name))


@pytest.mark.envoy
@pytest.mark.parametrize("fault", ["killed", "stopped"])
async def test_extproc_killed_or_stopped_under_load_fails_every_request_closed_and_comes_back(
    stack: Stack, fault: str
) -> None:
    """extproc SIGKILLed, or SIGSTOPped until Envoy's message timeout fires and then killed, with
    buffered JSON and streamed SSE answers in flight: every request in flight and every new one ends in
    an error, nothing unscanned reaches a client, and once extproc is started again on its port the
    same Envoy serves masked answers again."""
    demo = Demo(stack.demo_url)
    envoy_pid = stack.processes["envoy"].popen.pid
    extproc = stack.processes["extproc"].popen
    tag = uuid.uuid4().hex
    reply = scripts(demo)
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as client:
        in_flight = [Seen(kind) for kind in ("sse", "json") * 4]
        asking = [asyncio.create_task(ask(client, one, reply[one.kind], tag)) for one in in_flight]
        await wait_in_flight(demo, tag, in_flight)
        timeouts_before = envoy_counter(stack, "ext_proc.dlp.message_timeouts")

        if fault == "killed":
            extproc.kill()
            extproc.wait(10)
            expected_status = 503  # status_on_error: the processor is gone
        else:
            extproc.send_signal(signal.SIGSTOP)
            expected_status = 504  # Envoy's message timeout, which status_on_error does not cover
        # New requests, whose prompts carry a card: refused, and never seen by the model.
        late_tag = uuid.uuid4().hex
        started = time.monotonic()
        late = await asyncio.gather(
            *(ask(client, Seen(kind), reply[kind], late_tag) for kind in ("sse", "json"))
        )
        waited = time.monotonic() - started
        if fault == "stopped":
            assert waited >= MESSAGE_TIMEOUT_SECONDS * 0.9
            assert envoy_counter(stack, "ext_proc.dlp.message_timeouts") > timeouts_before
            extproc.send_signal(signal.SIGKILL)  # killed while stopped: it never runs again
            extproc.send_signal(signal.SIGCONT)
            extproc.wait(10)
        for seen in late:
            assert seen.status == expected_status, seen
            assert not seen.complete
        assert demo.received(late_tag) == []

        for seen in await asyncio.gather(*asking):
            assert not seen.complete, seen
            seen.assert_nothing_in_clear()

        stack.start_extproc()
        await service_resumes(client, demo)
    assert stack.processes["envoy"].popen.pid == envoy_pid
    assert stack.processes["envoy"].popen.poll() is None


def recorded(stack: Stack, request_id: str) -> dict[str, Any]:
    """The session record's line for the exchange of this request id, read again until the writer
    thread has put it there (it writes off the request path)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for _, line in iter_records(record_path(stack), skip_invalid=True):  # a torn last line: next pass
            if line.get("type") == "exchange" and line.get("request_id") == request_id:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no record of the request {request_id}")


@pytest.mark.envoy
@pytest.mark.parametrize("kind", ["sse", "json"])
async def test_a_model_server_dying_mid_answer_ends_the_answer_in_error_and_is_recorded_incomplete(
    stack: Stack, kind: str
) -> None:
    demo = Demo(stack.demo_url)
    reply = scripts(demo)[kind]
    tag = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        seen = Seen(kind)
        asking = asyncio.create_task(ask(client, seen, reply, tag))
        await wait_in_flight(demo, tag, [seen])
        stack.processes["demo"].popen.kill()
        await asking
    assert not seen.complete, seen
    seen.assert_nothing_in_clear()
    if kind == "sse":
        # Its headers were out: Envoy resets the stream to the client, and ends the side stream before
        # extproc could say anything in band. The client sees the transfer cut, never a whole answer.
        assert seen.status == 200
        assert seen.error is not None or b"event: error" in seen.body
    else:
        assert seen.status == 502  # the answer's headers were still held: Envoy can still say so
    record = await asyncio.to_thread(recorded, stack, seen.request_id)
    assert record["decision"] == "incomplete"
    for secret in (CARD, EMAIL):
        assert secret not in json.dumps(record)


# -- clients leaving mid-stream ---------------------------------------------------------------------------

CHAT_STREAM = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


def sse_event(content: str) -> bytes:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _headers(*items: tuple[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items])


async def leave_mid_stream(stub: pb_grpc.ExternalProcessorStub) -> None:
    """One exchange as Envoy runs it, reset (as Envoy resets the side stream when its client goes away)
    while a card number is half streamed: held by the answer's scanners at that moment."""
    call = stub.Process()
    request = _headers((":path", "/v1/chat/completions"), ("content-type", "application/json"))
    await call.write(
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=request),
            protocol_config=pb.ProtocolConfiguration(request_body_mode=2, response_body_mode=4),
        )
    )
    await call.read()
    await call.write(
        pb.ProcessingRequest(request_body=pb.HttpBody(body=CHAT_STREAM.encode(), end_of_stream=True))
    )
    await call.read()
    answer = _headers((":status", "200"), ("content-type", "text/event-stream"))
    await call.write(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=answer)))
    await call.read()
    for content in ("Noted. ", "Here it is: ", "4111 11"):
        await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=sse_event(content))))
    released = await call.read()  # the text before the card: the card begun is held
    assert b"Noted." in released.response_body.response.body_mutation.streamed_response.body
    call.cancel()


async def cancel_many(stub: pb_grpc.ExternalProcessorStub) -> None:
    async with asyncio.timeout(120):
        for _ in range(CANCELLATIONS):
            await leave_mid_stream(stub)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CANCELLATIONS = 1000
# Of what a run allocated, what is still held at its end (measured: about 62 KiB, and the same after
# 2,000: free lists and bounded caches, not a per-exchange residue), and the RSS a run adds (measured:
# under 2 MiB).
TRACED_GROWTH_LIMIT = 256 * 1024
RSS_GROWTH_LIMIT = 8 * 1024 * 1024


@pytest.mark.unit
async def test_a_thousand_clients_leaving_mid_stream_leave_no_task_memory_or_exchange_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each exchange is closed and recorded as incomplete, and after 1,000 of them the process holds no
    more asyncio tasks, no exchange, and no more memory than before (within the limits above)."""
    live: weakref.WeakSet[Exchange] = weakref.WeakSet()

    class Watched(Exchange):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            live.add(self)

    monkeypatch.setattr(extproc.server, "Exchange", Watched)
    record = tmp_path / "session.jsonl"
    settings = load_settings(
        None,
        server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0},
        audit={"record_path": str(record)},
        identity={"mode": "none"},
    )
    server = Server(settings, Runtime(build_snapshot(settings)))
    await server.start()

    def exchanges_recorded() -> list[dict[str, Any]]:
        return [line for _, line in iter_records(record, skip_invalid=True) if line["type"] == "exchange"]

    async def settled(count: int) -> None:
        """Until every exchange so far is recorded (the server's side of a reset stream ends on loop
        turns of its own, the record is written by a thread) and none is alive."""
        async with asyncio.timeout(60):
            while len(exchanges_recorded()) < count or len(live):
                gc.collect()
                await asyncio.sleep(0.05)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            warm = 50  # the channel, the server's pools, the caches of a first exchange
            async with asyncio.timeout(30):
                for _ in range(warm):
                    await leave_mid_stream(stub)
            await settled(warm)
            gc.collect()
            tasks_before = len(asyncio.all_tasks())
            # RSS over a first thousand (tracemalloc off: its own tables would count), which sees what
            # Hyperscan allocates in C too; then tracemalloc over a second, which sees every Python
            # allocation of the run that is still held at its end.
            rss_before = rss_bytes()
            started = time.monotonic()
            await cancel_many(stub)
            elapsed = time.monotonic() - started
            await settled(warm + CANCELLATIONS)
            gc.collect()
            rss_after = rss_bytes()
            tracemalloc.start()
            try:
                await cancel_many(stub)
                await settled(warm + 2 * CANCELLATIONS)
                gc.collect()
                traced, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            tasks_after = len(asyncio.all_tasks())
    finally:
        await server.stop(drain=False)
    print(
        f"\n{CANCELLATIONS} cancellations in {elapsed:.1f} s: RSS {rss_before / 2**20:.1f} -> "
        f"{rss_after / 2**20:.1f} MiB; {CANCELLATIONS} more: {traced} B of what they allocated still held; "
        f"asyncio tasks {tasks_before} -> {tasks_after}"
    )
    assert tasks_after <= tasks_before
    assert len(live) == 0
    assert traced < TRACED_GROWTH_LIMIT
    assert rss_after - rss_before < RSS_GROWTH_LIMIT
    lines = exchanges_recorded()
    assert len(lines) == warm + 2 * CANCELLATIONS
    assert {line["decision"] for line in lines} == {"incomplete"}


@pytest.mark.envoy
async def test_a_client_leaving_mid_stream_through_envoy_closes_the_exchange_and_records_it_incomplete(
    stack: Stack,
) -> None:
    demo = Demo(stack.demo_url)
    seen = Seen("sse")
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        asking = asyncio.create_task(ask(client, seen, scripts(demo)["sse"]))
        async with asyncio.timeout(20):
            await seen.flowing.wait()
        asking.cancel()  # the client goes away: its connection to Envoy closes mid-stream
        with contextlib.suppress(asyncio.CancelledError):
            await asking
    record = await asyncio.to_thread(recorded, stack, seen.request_id)
    assert record["decision"] == "incomplete"
    assert record["response"]["status"] == "200"
    for secret in (CARD, EMAIL):
        assert secret not in json.dumps(record)
    seen.assert_nothing_in_clear()


# -- a stop signal with streams in flight ----------------------------------------------------------------


@pytest.mark.envoy
async def test_sigterm_lets_streams_in_flight_finish_and_accepts_no_new_one(stack: Stack) -> None:
    """extproc sent SIGTERM (no drain period here: EXTPROC_SERVER__DRAIN_SECONDS=0) while SSE and JSON
    answers stream: each finishes whole and masked within the grace period, a request that comes after
    the listener closed is refused and never reaches the model, and extproc exits 0."""
    demo = Demo(stack.demo_url)
    process = stack.processes["extproc"]
    reply = scripts(demo)
    tag = uuid.uuid4().hex
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=stack.url, timeout=60, limits=limits) as client:
        in_flight = [Seen(kind) for kind in ("sse", "json") * 3]
        asking = [asyncio.create_task(ask(client, one, reply[one.kind], tag)) for one in in_flight]
        await wait_in_flight(demo, tag, in_flight)
        draining, stopped = process.watch("draining"), process.watch("stopped")
        stopping = time.monotonic()
        process.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(draining.wait, 10)
        late_tag = uuid.uuid4().hex
        late = await asyncio.gather(
            *(ask(client, Seen(kind), reply[kind], late_tag) for kind in ("sse", "json"))
        )
        for seen in late:
            assert seen.status == 503, seen
        assert demo.received(late_tag) == []
        assert process.popen.poll() is None  # still finishing the streams in flight
        for seen in await asyncio.gather(*asking):
            assert seen.complete, seen
            seen.assert_nothing_in_clear()
            if seen.kind == "sse":
                assert seen.text == SECRET_MASKED
            else:
                assert json.loads(seen.body)["choices"][0]["message"]["content"] == SECRET_MASKED
        assert await asyncio.to_thread(process.popen.wait, 30) == 0
        assert stopped.is_set()
        grace = 20.0  # server.grace_seconds' default
        assert time.monotonic() - stopping < grace
        stack.start_extproc()
        await service_resumes(client, demo)
