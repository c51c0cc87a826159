"""Throughput and latency through Envoy alone and through Envoy + extproc, measured in the same run.

The paths compared, all in front of the same demo model server:
  direct   client -> demo model
  envoy    client -> Envoy (no ext_proc filter) -> demo model
  extproc  client -> Envoy -> ext_proc (all phases, bodies scanned) -> demo model

Each path gets a warm-up, then a sequential pass (latency) and a concurrent pass (throughput). Machines
here are shared and noisy: read the ratios between paths of one run, not absolute numbers across runs.
Results go to bench/results/<timestamp>.json and .md (and latest.*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import scan
from extproc.devenv import Stack, Upstream

RESULTS = Path(__file__).resolve().parent / "results"
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
        "--concurrency", type=int, default=8, help="clients in the concurrent pass (default 8)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument(
        "--scan-rounds", type=int, default=3, help="passes over the scan messages (default 3)"
    )
    parser.add_argument("--only", choices=("proxy", "scan"), help="run one of the two benchmarks")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    header = {"when": stamp, "machine": _machine()}
    if args.only != "proxy":
        scan_report = {**header, **scan.run(rounds=args.scan_rounds)}
        _write(out, "scan", stamp, scan_report, scan.markdown(scan_report))
    if args.only != "scan":
        proxy_report = {**header, **_proxy(args, out)}
        _write(out, "proxy", stamp, proxy_report, _markdown(proxy_report))
    return 0


def _write(out: Path, name: str, stamp: str, report: dict[str, Any], markdown: str) -> None:
    for label in (f"{name}-{stamp}", f"{name}-latest"):
        (out / f"{label}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{label}.md").write_text(markdown)
    print(markdown)
    print(f"written to {out / (name + '-' + stamp + '.json')}")


def _machine() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()}


def _proxy(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    log = out / "stack.log"
    log.write_text("")
    full = Stack(log_path=log).start()
    bare: Stack | None = None
    try:
        assert full.upstream is not None
        bare = Stack(
            log_path=log, upstream=Upstream("127.0.0.1", full.upstream.port), with_extproc=False
        ).start()
        paths = {"direct": full.demo_url, "envoy": bare.url, "extproc": full.url}
        results = {name: _measure(url, args.requests, args.concurrency) for name, url in paths.items()}
    finally:
        if bare is not None:
            bare.stop()
        full.stop()

    return {"prompt_bytes": len(PROMPT), "paths": results}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _markdown(report: dict[str, Any]) -> str:
    paths = report["paths"]
    envoy_seq = paths["envoy"]["sequential"]
    envoy_con = paths["envoy"]["concurrent"]
    c = envoy_con["concurrency"]
    machine = report["machine"]
    lines = [
        f"Proxy overhead, {report['when']}, {machine['cpus']} CPUs, prompt {report['prompt_bytes']} B",
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
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
