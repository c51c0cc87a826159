"""Benchmarks against baselines measured in the same run: scan, proxy overhead, streamed answers.

Parts (``--only`` picks one; all three run by default):
  scan    the detection engine alone, against Python ``re`` and Presidio (see bench/scan.py)
  proxy   throughput and latency of whole requests through five paths, all in front of the same demo
          model server:
            direct   client -> demo model
            envoy    client -> Envoy (no ext_proc filter) -> demo model
            extproc  client -> Envoy -> ext_proc (all phases, bodies scanned) -> demo model
            recorded extproc with the session record (originals sealed, checkpoints signed, fsync per batch)
            traced   extproc exporting spans and metrics, and Envoy its trace, to a local OTLP collector
          Each path gets a warm-up, then a sequential pass (latency) and a concurrent pass (throughput).
  stream  streamed (SSE) answers through envoy and extproc: time to first token, delay added per
          event, characters held back, unpaced events/s (see bench/stream.py)

Machines here are shared and noisy: read the ratios between paths of one run, not absolute numbers
across runs. Results go to bench/results/<part>-<timestamp>.json and .md (and <part>-latest.*).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench import scan, stream
from extproc.audit.keys import generate_keys
from extproc.devenv import Process, Stack, Upstream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PARTS = ("scan", "proxy", "stream")
PROMPT = json.dumps(
    {
        "model": "demo-small",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarise the quarterly report for the support team. " * 20},
        ],
    }
).encode()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def _run(url: str, requests: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                async with session.post(
                    url + "/v1/chat/completions", data=PROMPT, headers={"content-type": "application/json"}
                ) as answer:
                    await answer.read()
                    if answer.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return {
        "requests": requests,
        "concurrency": concurrency,
        "errors": errors,
        "rps": requests / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


def _measure(url: str, requests: int, concurrency: int) -> dict[str, Any]:
    asyncio.run(_run(url, max(50, requests // 10), concurrency))  # warm-up
    return {
        "sequential": asyncio.run(_run(url, requests, 1)),
        "concurrent": asyncio.run(_run(url, requests, concurrency)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per pass (default 1000)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="proxy: passes per path, interleaved; medians (default 3)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="clients in the concurrent pass (default 8)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument(
        "--scan-rounds", type=int, default=3, help="passes over the scan messages (default 3)"
    )
    parser.add_argument("--only", choices=PARTS, help="run one of the benchmarks")
    streamed = parser.add_argument_group("stream", "the streamed-answer benchmark (--only stream)")
    streamed.add_argument("--stream-runs", type=int, default=5, help="runs per answer and path (default 5)")
    streamed.add_argument(
        "--stream-chars", type=int, default=1500, help="length of the paced answers (default 1500)"
    )
    streamed.add_argument(
        "--stream-chunk-chars", type=int, default=4, help="characters per token event (default 4)"
    )
    streamed.add_argument(
        "--stream-delay-ms", type=int, default=20, help="pause between paced events (default 20)"
    )
    streamed.add_argument(
        "--stream-throughput-chars",
        type=int,
        default=8192,
        help="length of the unpaced answer (default 8192)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    header = {"when": stamp, "machine": _machine()}
    wanted = [part for part in PARTS if args.only in (None, part)]
    status = 0
    if "scan" in wanted:
        scan_report = {**header, **scan.run(rounds=args.scan_rounds)}
        _write(out, "scan", stamp, scan_report, scan.markdown(scan_report))
    if "proxy" in wanted or "stream" in wanted:
        with _stacks(out, audited="proxy" in wanted) as paths:
            if "proxy" in wanted:
                proxy_report = {**header, **_proxy(args, paths)}
                _write(out, "proxy", stamp, proxy_report, _markdown(proxy_report))
            if "stream" in wanted:
                stream_report = {**header, **_stream(args, paths)}
                _write(out, "stream", stamp, stream_report, stream.markdown(stream_report))
                status = 1 if stream_report["errors"] else 0
    return status


def _write(out: Path, name: str, stamp: str, report: dict[str, Any], markdown: str) -> None:
    for label in (f"{name}-{stamp}", f"{name}-latest"):
        (out / f"{label}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{label}.md").write_text(markdown)
    print(markdown)
    print(f"written to {out / (name + '-' + stamp + '.json')}")


def _machine() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()}


@contextlib.contextmanager
def _stacks(out: Path, audited: bool = False) -> Iterator[dict[str, str]]:
    """Stacks in front of one demo model: Envoy + extproc, Envoy alone (no ext_proc filter) and, when
    ``audited``, Envoy + extproc with the session record on (recorded), and with spans and metrics
    exported (traced). Yields the URL of each path: direct (the demo model), envoy, extproc, recorded,
    traced; and the record's path as ``record``."""
    log = out / "stack.log"
    log.write_text("")
    stacks: list[Stack] = []
    receiver: Process | None = None
    sink: IO[str] | None = None
    try:
        # The benchmark measures scanning, not token checks: no identity, said so.
        anonymous = {"EXTPROC_IDENTITY__MODE": "none"}
        # No upstream key: the paths without extproc could not pass the demo's check otherwise.
        full = Stack(log_path=log, demo_key=False, extra_env=dict(anonymous)).start()
        stacks.append(full)
        assert full.upstream is not None
        upstream = Upstream("127.0.0.1", full.upstream.port)
        bare = Stack(log_path=log, upstream=upstream, with_extproc=False).start()
        stacks.append(bare)
        paths = {"direct": full.demo_url, "envoy": bare.url, "extproc": full.url}
        if audited:
            keys = generate_keys(bare.workdir / "audit-keys")
            record = bare.workdir / "session.jsonl"
            env = {
                "EXTPROC_AUDIT__RECORD_PATH": str(record),
                "EXTPROC_AUDIT__SEALING_KEY_FILE": str(keys["auditor_pub"]),
                "EXTPROC_AUDIT__SIGNING_KEY_FILE": str(keys["signing_key"]),
                **anonymous,
            }
            recorded = Stack(log_path=log, upstream=upstream, extra_env=env).start()
            stacks.append(recorded)
            # An OTLP collector that accepts and discards, in a process of its own: a real one runs on
            # another machine, this one shares the CPUs with everything measured.
            sink = log.open("a", encoding="utf-8")
            python_path = {**os.environ, "PYTHONPATH": str(ROOT)}
            receiver = Process("otlp", [sys.executable, "-m", "tests.otlp"], sink, python_path)
            otlp = "http://" + receiver.wait_ready(60)["grpc"]
            traced = Stack(
                log_path=log, upstream=upstream, otlp_endpoint=otlp, extra_env=dict(anonymous)
            ).start()
            stacks.append(traced)
            paths.update(recorded=recorded.url, traced=traced.url, record=str(record))
        yield paths
    finally:
        for stack in reversed(stacks):
            stack.stop()
        if receiver is not None:
            receiver.stop()
        if sink is not None:
            sink.close()


def _median_pass(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass's figures from several: the median of each, the errors of all."""
    merged = {key: statistics.median(p[key] for p in passes) for key in ("rps", "p50_ms", "p99_ms")}
    first = passes[0]
    return {
        **merged,
        "requests": first["requests"] * len(passes),
        "concurrency": first["concurrency"],
        "errors": sum(p["errors"] for p in passes),
    }


def _proxy(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any]:
    """Every path measured once per round, the rounds one after the other, so that a slow spell of a
    shared machine falls on every path alike; each figure is the median over the rounds."""
    urls = {name: url for name, url in paths.items() if name != "record"}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for _ in range(args.rounds):
        for name, url in urls.items():
            rounds[name].append(_measure(url, args.requests, args.concurrency))
    results = {
        name: {kind: _median_pass([r[kind] for r in measured]) for kind in ("sequential", "concurrent")}
        for name, measured in rounds.items()
    }
    report: dict[str, Any] = {"prompt_bytes": len(PROMPT), "rounds": args.rounds, "paths": results}
    record = Path(paths["record"])
    with record.open("rb") as lines:
        exchanges = sum(1 for line in lines if b'"type":"exchange"' in line)
    if exchanges:
        report["record_bytes_per_exchange"] = round(record.stat().st_size / exchanges)
    return report


def _stream(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any]:
    return stream.run(
        paths["direct"],
        paths["envoy"],
        paths["extproc"],
        runs=args.stream_runs,
        chars=args.stream_chars,
        chunk_chars=args.stream_chunk_chars,
        delay_ms=args.stream_delay_ms,
        throughput_chars=args.stream_throughput_chars,
    )


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _markdown(report: dict[str, Any]) -> str:
    paths = report["paths"]
    envoy_seq = paths["envoy"]["sequential"]
    envoy_con = paths["envoy"]["concurrent"]
    c = envoy_con["concurrency"]
    machine = report["machine"]
    lines = [
        f"Proxy overhead, {report['when']}, {machine['cpus']} CPUs, prompt {report['prompt_bytes']} B, "
        f"medians of {report['rounds']} interleaved rounds",
        "",
        f"| path | p50 ms (seq) | p99 ms (seq) | rps (seq) | rps (c={c}) | p99 ms (c={c}) | rps vs envoy "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in paths.items():
        seq, con = result["sequential"], result["concurrent"]
        lines.append(
            f"| {name} | {seq['p50_ms']:.2f} | {seq['p99_ms']:.2f} | {seq['rps']:.0f} | {con['rps']:.0f} "
            f"| {con['p99_ms']:.2f} | {con['rps'] / envoy_con['rps']:.2f}x "
            f"| {seq['errors'] + con['errors']} |"
        )
    extproc_seq = paths["extproc"]["sequential"]
    lines += [
        "",
        f"extproc adds {extproc_seq['p50_ms'] - envoy_seq['p50_ms']:.2f} ms at p50 over Envoy alone "
        f"({extproc_seq['p50_ms'] / envoy_seq['p50_ms']:.2f}x), sequential.",
    ]
    extproc_con = paths["extproc"]["concurrent"]
    doing = {"recorded": "The session record adds", "traced": "Spans and metrics (and Envoy's trace) add"}
    for name, what in doing.items():
        if name in paths:
            seq, con = paths[name]["sequential"], paths[name]["concurrent"]
            lines.append(
                f"{what} {seq['p50_ms'] - extproc_seq['p50_ms']:.2f} ms at p50 over extproc "
                f"({seq['p50_ms'] / extproc_seq['p50_ms']:.2f}x), sequential; throughput at c={c} is "
                f"{con['rps'] / extproc_con['rps']:.2f}x extproc's."
            )
    if "record_bytes_per_exchange" in report:
        lines.append(f"One exchange record: {report['record_bytes_per_exchange']:,} bytes.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
