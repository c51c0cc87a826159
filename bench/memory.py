"""Resident memory per open stream: what each streamed answer in flight costs ``extproc serve``.

A sidecar holds one ext_proc stream per HTTP request in flight, and a streamed (SSE) answer keeps its
stream, its exchange and its stream scanners for as long as the model writes. So this part starts a real
``extproc serve`` (identity on, as ``make run`` has it), opens 1, then 100, then 1,000 concurrent
ext_proc streams to it over gRPC, each driven the way Envoy drives a streamed chat answer with the
repo's config (``envoy/envoy.yaml``: request body BUFFERED, response body FULL_DUPLEX_STREAMED):

  request headers (a verified bearer token), the chat request body (``stream: true``) in one message,
  response headers ``200`` ``text/event-stream``, then the role event and a few token events, the last
  of which starts a card number: every stream is left open mid-answer with text held in its scanners.

Each stream is known to be in that state once extproc has released the prose before the card. After
each level settles, the server's memory is read from ``/proc/PID/status`` (RSS) and
``/proc/PID/smaps_rollup`` (PSS, USS = private clean + private dirty); the figure is

  per stream = (RSS at 1,000 streams - RSS at 1 stream) / 999.

The streams go over two HTTP/2 connections, as Envoy's two workers open them. After the last level
every stream is cancelled (as Envoy resets a side stream when its request ends) and memory is read
again: what the streams leave behind.

The same streams are first opened to the floor (bench/floor.py: a grpc.aio ext_proc server that echoes
every message and keeps nothing): what an open stream costs a Python gRPC server at all. extproc minus
the floor is what its exchanges, scanners and held events cost.

``--memory-trace`` runs the server under ``tracemalloc`` (``python -m bench.memory serve``, which then
runs ``extproc serve``) and diffs snapshots taken at 100 and at 1,000 streams: the Python allocations
that grow per stream, by line, and the objects of the scanning path alive per stream. Tracing itself
costs memory, so its RSS figures are not the measurement: run the plain part for those.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from extproc.devenv import Process
from extproc.identity.dev import dev_identity, mint_dev_token

LEVELS = (1, 100, 1000)
TARGET_KIB = 64  # per open stream, at 1,000 streams
CONNECTIONS = 2  # Envoy's two workers, each with its own HTTP/2 connection to the processor
BUFFERED, FULL_DUPLEX_STREAMED = 2, 4  # ProcessingMode.BodySendMode, as envoy/envoy.yaml sets them
OPENING = 50  # streams opened at once (a traced server, slower, takes them one by one)
SETTLE_SECONDS = 1.0
PROSE = ("The quarterly ", "report shows ", "fewer tickets ", "and faster ", "refunds; ", "the card ")
HELD = "4111 1111"  # a card number begun: the scanners hold it, waiting for the rest
RELEASED = "refunds; "  # the last text released: "the card 4111 1111" after it is held
SNAPSHOT_ENV = "BENCH_MEMORY_SNAPSHOTS"  # not EXTPROC_: those are settings
TRACE_FRAMES = 12
# The objects of one exchange's path, counted per stream in a traced run.
COUNTED = ("Exchange", "StreamScanner", "_Channel", "_JsonTextChannel", "Router", "EventStream", "Stream")


def _request(token: str) -> tuple[pb.ProcessingRequest, pb.ProcessingRequest]:
    body = json.dumps(
        {
            "model": "demo-small",
            "stream": True,
            "messages": [{"role": "user", "content": "Summarise the quarterly report for the team."}],
        }
    ).encode()
    headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "127.0.0.1:8080"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("authorization", f"Bearer {token}"),
        ("x-request-id", str(uuid.uuid4())),
    ]
    first = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=_header_map(headers)),
        protocol_config=pb.ProtocolConfiguration(
            request_body_mode=BUFFERED, response_body_mode=FULL_DUPLEX_STREAMED
        ),
    )
    return first, pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def _header_map(items: list[tuple[str, str]]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items])


def _event(delta: dict[str, str]) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1767225600,
        "model": "demo-small",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


ANSWER = (
    pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=_header_map(
                [(":status", "200"), ("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            )
        )
    ),
    *(
        pb.ProcessingRequest(response_body=pb.HttpBody(body=_event(delta)))
        for delta in (
            {"role": "assistant", "content": ""},
            *({"content": text} for text in PROSE),
            {"content": HELD},
        )
    ),
)


class _Stream:
    """One ext_proc stream, left open mid-answer."""

    def __init__(self, stub: pb_grpc.ExternalProcessorStub) -> None:
        self.call = stub.Process()

    async def open(self, token: str, scanned: bool = True) -> None:
        headers, body = _request(token)
        await self.call.write(headers)
        answer = await self.call.read()
        if not answer.HasField("request_headers"):
            raise RuntimeError(f"request headers answered with {answer.WhichOneof('response')}")
        await self.call.write(body)
        answer = await self.call.read()
        if not answer.HasField("request_body"):
            raise RuntimeError(f"request body answered with {answer.WhichOneof('response')}")
        for message in ANSWER:
            await self.call.write(message)
        released = b""
        while RELEASED.encode() not in released:
            answer = await self.call.read()
            if answer is grpc.aio.EOF:
                raise RuntimeError("the stream ended before the answer was released")
            kind = answer.WhichOneof("response")
            if kind == "response_body":
                released += answer.response_body.response.body_mutation.streamed_response.body
            elif kind != "response_headers":
                raise RuntimeError(f"the answer was answered with {kind}")
        if scanned and HELD.encode() in released:
            raise RuntimeError("the card number begun was released before the rest of it came")

    def cancel(self) -> None:
        self.call.cancel()


def _memory(pid: int) -> dict[str, int]:
    """The process's memory in KiB: RSS and its high-water mark, PSS, USS (private pages), anonymous."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[{"VmRSS": "rss", "VmHWM": "rss_peak"}[name]] = int(value.split()[0])
    rollup: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        rollup[name] = int(value.split()[0])
    figures["pss"] = rollup["Pss"]
    figures["uss"] = rollup["Private_Clean"] + rollup["Private_Dirty"]
    figures["anonymous"] = rollup["Anonymous"]
    return figures


async def _settled(pid: int) -> dict[str, int]:
    """Memory once it stops moving: read every half second until two readings agree within 64 KiB."""
    await asyncio.sleep(SETTLE_SECONDS)
    last = _memory(pid)
    for _ in range(10):
        await asyncio.sleep(0.5)
        now = _memory(pid)
        if abs(now["rss"] - last["rss"]) <= 64:
            return now
        last = now
    return last


class _Server:
    """``extproc serve`` on free ports, identity on (the dev issuer), output to ``log``; or, ``floor``,
    the do-nothing ext_proc server."""

    def __init__(self, log: Path, workdir: Path, traced: bool, floor: bool = False) -> None:
        self.workdir = workdir
        settings = workdir / "settings.yaml"
        settings.write_text(yaml.safe_dump({"identity": dev_identity(workdir / "identity")}))
        self.token = mint_dev_token(workdir / "identity", "bench", [], 3600)
        self.snapshots = workdir / "snapshots"
        self.scanned = not floor
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        addresses = ("--grpc-address", "--admin-address", "--approvals-address")
        if floor:
            argv = [sys.executable, "-m", "bench.floor", "--port", "0"]
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        else:
            if traced:
                self.snapshots.mkdir()
                env[SNAPSHOT_ENV] = str(self.snapshots)
                env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
                command = [sys.executable, "-m", "bench.memory", "serve"]
            else:
                command = [sys.executable, "-m", "extproc", "serve"]
            argv = [*command, *(f for a in addresses for f in (a, "127.0.0.1:0")), "--config", str(settings)]
        self._sink = log.open("a", encoding="utf-8")
        self.process = Process("floor" if floor else "extproc", argv, self._sink, env)
        try:
            self.address = self.process.wait_ready(120)["grpc"]
        except BaseException:
            self.stop()
            raise
        self.pid = self.process.popen.pid
        if traced:  # from here on: start-up (the rules compiling) would be slow to trace, and is no stream
            self.snapshot("start")

    def snapshot(self, label: str) -> Path:
        """Asks the traced server for a snapshot (``start``: to start tracing); returns its file once
        written."""
        path = self.snapshots / f"{label}.tracemalloc"
        (self.snapshots / "next").write_text(label)
        os.kill(self.process.popen.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not (self.snapshots / f"{label}.done").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not (self.snapshots / f"{label}.done").exists():
            raise RuntimeError(f"the traced server wrote no snapshot {label}")
        return path

    def stop(self) -> None:
        self.process.stop()
        self._sink.close()


async def _measure(server: _Server, levels: tuple[int, ...], traced: bool) -> dict[str, Any]:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(server.address, options=options) for _ in range(CONNECTIONS)]
    stubs = [pb_grpc.ExternalProcessorStub(channel) for channel in channels]
    streams: list[_Stream] = []
    gate = asyncio.Semaphore(1 if traced else OPENING)
    readings: dict[str, Any] = {"start": await _settled(server.pid)}
    snapshots: dict[int, Path] = {}

    async def opened(stream: _Stream) -> None:
        async with gate:
            await stream.open(server.token, server.scanned)

    try:
        for level in levels:
            new = [_Stream(stubs[(len(streams) + i) % CONNECTIONS]) for i in range(level - len(streams))]
            streams += new
            started = time.monotonic()
            await asyncio.gather(*(opened(stream) for stream in new))
            opening = time.monotonic() - started
            readings[str(level)] = {**await _settled(server.pid), "open_seconds": round(opening, 2)}
            rss = readings[str(level)]["rss"]
            print(f"memory: {server.process.name}: {level} streams open, RSS {rss:,} KiB", file=sys.stderr)
            if traced and level in levels[-2:]:
                snapshots[level] = await asyncio.to_thread(server.snapshot, str(level))
        for stream in streams:
            stream.cancel()
        streams.clear()
        readings["closed"] = await _settled(server.pid)
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            await channel.close()
    if traced:
        readings["trace"] = _compare(server.snapshots, snapshots, levels[-2:])
    return readings


def _compare(folder: Path, snapshots: dict[int, Path], levels: tuple[int, ...]) -> dict[str, Any]:
    """The Python allocations that grew between the last two levels, per stream, by line; and the
    objects of the scanning path per stream."""
    low, high = levels
    added = high - low
    before = tracemalloc.Snapshot.load(str(snapshots[low]))
    after = tracemalloc.Snapshot.load(str(snapshots[high]))
    stats = after.compare_to(before, "lineno")
    grown = sum(s.size_diff for s in stats)
    top = [
        {
            "where": f"{_short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
            "bytes_per_stream": round(s.size_diff / added),
            "blocks_per_stream": round(s.count_diff / added, 2),
        }
        for s in stats[:25]
    ]
    by_trace = after.compare_to(before, "traceback")[:8]
    chains = [
        {
            "bytes_per_stream": round(s.size_diff / added),
            "frames": [f"{_short(f.filename)}:{f.lineno}" for f in s.traceback][:TRACE_FRAMES],
        }
        for s in by_trace
    ]
    counts = {level: json.loads((folder / f"{level}.objects.json").read_text()) for level in (low, high)}
    objects = {
        name: round((counts[high].get(name, 0) - counts[low].get(name, 0)) / added, 2) for name in COUNTED
    }
    return {
        "traced_bytes_per_stream": round(grown / added),
        "top_lines": top,
        "top_tracebacks": chains,
        "objects_per_stream": objects,
        "hyperscan_stream_bytes": counts[high].get("hyperscan_stream_bytes", []),
    }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/extproc/", "/lib/python3"):
        if marker in filename:
            _head, _, tail = filename.partition(marker)
            return ("extproc/" if marker == "/extproc/" else "") + tail
    return filename


def run(levels: tuple[int, ...] = LEVELS, *, out: Path, traced: bool = False) -> dict[str, Any]:
    log = out / "memory-server.log"
    log.write_text("")
    measured: dict[str, dict[str, Any]] = {}
    for name in ("floor", "extproc"):
        with tempfile.TemporaryDirectory(prefix="extproc-bench-memory-") as folder:
            server = _Server(log, Path(folder), traced and name == "extproc", floor=name == "floor")
            try:
                readings = asyncio.run(_measure(server, levels, traced and name == "extproc"))
            finally:
                server.stop()
        first, last = readings[str(levels[0])], readings[str(levels[-1])]
        count = levels[-1] - levels[0]
        before_last = readings[str(levels[-2])]
        measured[name] = {
            "readings": readings,
            "per_stream_kib": {k: round((last[k] - first[k]) / count, 1) for k in ("rss", "pss", "uss")},
            # The same from the level before the last: memory freed at start-up but handed back only
            # later (as glibc trims its heap) would show as a fall between the first levels.
            "per_stream_kib_from_previous_level": round(
                (last["rss"] - before_last["rss"]) / (levels[-1] - levels[-2]), 1
            ),
            "left_after_close_kib": round(readings["closed"]["rss"] - readings["start"]["rss"]),
        }
    per_stream = measured["extproc"]["per_stream_kib"]
    return {
        "levels": list(levels),
        "connections": CONNECTIONS,
        "traced": traced,
        "servers": measured,
        "per_stream_kib": per_stream,
        "over_floor_kib": round(per_stream["rss"] - measured["floor"]["per_stream_kib"]["rss"], 1),
        "target_kib": TARGET_KIB,
        "within_target": per_stream["rss"] <= TARGET_KIB,
    }


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    levels = report["levels"]
    servers = report["servers"]
    traced = " (extproc under tracemalloc: not the measurement)" if report["traced"] else ""
    lines = [
        f"Memory per open stream, {report['when']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{report['connections']} HTTP/2 connections{traced}",
        "",
        "| server | open streams | RSS KiB | PSS KiB | USS KiB | opened in s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, measured in servers.items():
        readings = measured["readings"]
        rows = [("0 (started)", readings["start"])]
        rows += [(f"{level:,}", readings[str(level)]) for level in levels]
        rows.append(("0 (all cancelled)", readings["closed"]))
        for label, r in rows:
            opened = f"{r['open_seconds']:.2f}" if "open_seconds" in r else ""
            lines.append(f"| {name} | {label} | {r['rss']:,} | {r['pss']:,} | {r['uss']:,} | {opened} |")
    per = report["per_stream_kib"]
    floor = servers["floor"]["per_stream_kib"]
    verdict = "within" if report["within_target"] else "over"
    lines += [
        "",
        f"extproc per open stream, (RSS at {levels[-1]:,} - RSS at {levels[0]:,}) / "
        f"{levels[-1] - levels[0]:,}: **{per['rss']:.1f} KiB** RSS ({verdict} the {report['target_kib']} KiB "
        f"target), {per['pss']:.1f} KiB PSS, {per['uss']:.1f} KiB USS. The floor (a gRPC server keeping "
        f"nothing): {floor['rss']:.1f} KiB; extproc over the floor: {report['over_floor_kib']:.1f} KiB. "
        f"From {levels[-2]:,} to {levels[-1]:,} streams: extproc "
        f"{servers['extproc']['per_stream_kib_from_previous_level']:.1f} KiB RSS per stream, the floor "
        f"{servers['floor']['per_stream_kib_from_previous_level']:.1f} KiB.",
        f"After every stream was cancelled, extproc's RSS stays "
        f"{servers['extproc']['left_after_close_kib']:,} KiB above its start (the floor's: "
        f"{servers['floor']['left_after_close_kib']:,} KiB): memory the allocators keep for reuse.",
    ]
    trace = servers["extproc"]["readings"].get("trace")
    if trace:
        lines += [
            "",
            f"Python allocations (tracemalloc) per stream between {levels[-2]:,} and {levels[-1]:,} "
            f"streams: {trace['traced_bytes_per_stream']:,} bytes. Largest:",
            "",
            "| where | bytes per stream | blocks per stream |",
            "|---|---:|---:|",
        ]
        for entry in trace["top_lines"][:15]:
            lines.append(
                f"| {entry['where']} | {entry['bytes_per_stream']:,} | {entry['blocks_per_stream']:.2f} |"
            )
        objects = ", ".join(f"{k} {v:g}" for k, v in trace["objects_per_stream"].items())
        lines += ["", f"Objects alive per stream: {objects}."]
        if trace["hyperscan_stream_bytes"]:
            sizes = ", ".join(f"{n:,}" for n in trace["hyperscan_stream_bytes"])
            lines.append(f"Hyperscan stream state per scanner (hs_stream_size): {sizes} bytes.")
    lines.append("")
    return "\n".join(lines)


# -- the traced server ------------------------------------------------------------------------------


def _serve_traced(argv: list[str]) -> int:
    """``extproc serve`` under tracemalloc: on SIGUSR1 with the label ``start`` (in the ``next`` file of
    the folder the environment names) tracing starts; with another label a snapshot, and counts of the
    scanning path's objects, are written there under that label."""
    import gc
    import threading

    from extproc.cli import main as extproc_main

    folder = Path(os.environ[SNAPSHOT_ENV])
    requests = threading.Event()

    def dump() -> None:
        while True:
            requests.wait()
            requests.clear()
            label_file = folder / "next"  # written by the bench before it signals
            label = label_file.read_text().strip() if label_file.exists() else "snapshot"
            label_file.unlink(missing_ok=True)
            if label == "start":
                tracemalloc.start(TRACE_FRAMES)
                (folder / f"{label}.done").write_text("")
                continue
            gc.collect()
            counts: dict[str, Any] = {}
            sizes: set[int] = set()
            for item in gc.get_objects():
                name = type(item).__name__
                if name in COUNTED:
                    counts[name] = counts.get(name, 0) + 1
                if name == "StreamScanner":
                    sizes.update(len(stream) for stream in item._streams)
            counts["hyperscan_stream_bytes"] = sorted(sizes)
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            snapshot.dump(str(folder / f"{label}.tracemalloc"))
            (folder / f"{label}.objects.json").write_text(json.dumps(counts))
            (folder / f"{label}.done").write_text("")

    threading.Thread(target=dump, name="tracemalloc-dump", daemon=True).start()
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: requests.set())
    return extproc_main(["serve", *argv])


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        raise SystemExit("usage: python -m bench.memory serve [extproc serve options]")
    raise SystemExit(_serve_traced(sys.argv[2:]))
