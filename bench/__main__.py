"""Benchmarks against baselines measured in the same run: scan, exchange cost, proxy overhead, streamed
answers, memory per stream.

Parts (``--only`` picks one; all run by default):
  scan    the detection engine alone, against Python ``re`` and Presidio (see bench/scan.py)
  exchange  what one exchange costs extproc's own code in-process, without gRPC's transport: CPU per
          JSON exchange (with and without the session record) and per SSE event, and the profile's top
          entries (see bench/exchange.py)
  proxy   latency and throughput of whole requests through three paths, all in front of the same demo
          model server:
            envoy    client -> Envoy (no ext_proc filter) -> demo model
            floor    client -> Envoy -> a do-nothing ext_proc server (bench/floor.py) -> demo model
            extproc  client -> Envoy -> extproc (identity on, every phase, bodies scanned) -> demo model
            extproc-2w  the same with `serve --workers 2` (approvals in a local redis-server, as
                     several workers need)
          and, with ``--record-and-trace``, two more: extproc with the session record (originals sealed,
          checkpoints signed, fsync per batch), and extproc exporting spans and metrics, and Envoy its
          trace, to a local OTLP collector. The load comes from wrk (bench/load.py): per path and round
          a warm-up, a pass with one connection (latency) and one with ``--concurrency`` (throughput).
  stream  streamed (SSE) answers through the same three paths: time to first token, delay added per
          event, characters held back, unpaced events/s (see bench/stream.py)
  memory  resident memory of extproc serve per open streamed answer, at 1, 100 and 1,000 ext_proc
          streams (see bench/memory.py)

The floor is what extproc would cost if it did nothing: extproc/floor is the price of scanning,
masking and deciding, floor/envoy the price of being an ext_proc server in Python at all. Machines here
are shared and noisy: read the ratios between paths of one run, not absolute numbers across runs.
Results go to bench/results/<part>-<timestamp>.json and .md (and <part>-latest.*).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bench import exchange, load, memory, scan, stream
from bench.stacks import FloorStack
from extproc.audit.keys import generate_keys
from extproc.devenv import Process, Stack, Upstream
from extproc.identity.dev import mint_dev_token
from tests.redis_fixture import RedisServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PARTS = ("scan", "exchange", "proxy", "stream", "memory")
CARD, CARD_MASKED = "4111 1111 1111 1111", "**** **** **** 1111"
EMAIL, EMAIL_MASKED = "jane.doe@example.com", "[REDACTED:EMAIL_ADDRESS]"
_REPORT_TEXT = (
    "Summarise the quarterly report for the support team: tickets are down, refunds are faster and "
    "the new reports page is popular with the larger customers. "
)
PROMPT = json.dumps(
    {
        "model": "demo-small",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": _REPORT_TEXT * 3
                + f"The refund went to the card {CARD}; the customer asked for the receipt at {EMAIL}. "
                + _REPORT_TEXT * 3,
            },
        ],
    }
).encode()
PROXY_PATHS = ("envoy", "floor", "extproc")
WORKER_PATHS = ("extproc-2w",)  # proxy only: extproc with `serve --workers 2`, against "extproc"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="proxy: seconds per wrk pass (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="proxy: passes per path, interleaved; medians (default 3)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="proxy: connections in the throughput pass (default 16)"
    )
    parser.add_argument(
        "--record-and-trace",
        action="store_true",
        help="proxy: also measure extproc with the session record, and with tracing",
    )
    parser.add_argument(
        "--proxy-against",
        type=Path,
        metavar="TREE",
        help="proxy: also measure extproc run from another source tree (a folder holding its extproc/, as "
        "`git archive REV extproc | tar -x -C TREE` writes), interleaved with this one",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument(
        "--scan-rounds", type=int, default=3, help="passes over the scan messages (default 3)"
    )
    parser.add_argument(
        "--exchange-seconds", type=float, default=5.0, help="exchange: seconds of exchanges (default 5)"
    )
    parser.add_argument(
        "--scan-against",
        metavar="REV",
        help="scan: also time the rule pack of a git revision (or a rules folder), interleaved with today's",
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
    streamed.add_argument(
        "--stream-concurrency", type=int, default=8, help="unpaced streams read at once (default 8)"
    )
    held = parser.add_argument_group("memory", "memory per open stream (--only memory)")
    held.add_argument(
        "--memory-trace",
        action="store_true",
        help="run the server under tracemalloc and report what grows per stream (inflates RSS)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    header = {"when": stamp, "machine": _machine()}
    wanted = [part for part in PARTS if args.only in (None, part)]
    status = 0
    if "scan" in wanted:
        with tempfile.TemporaryDirectory(prefix="bench-rules-") as folder:
            against = _rules_at(args.scan_against, Path(folder)) if args.scan_against else None
            scan_report = {**header, **scan.run(rounds=args.scan_rounds, against=against)}
        _write(out, "scan", stamp, scan_report, scan.markdown(scan_report))
    if "exchange" in wanted:
        measured = exchange.run(args.exchange_seconds, PROMPT, (CARD, EMAIL), stream.answers()[1].content)
        exchange_report = {**header, "prompt_bytes": len(PROMPT), **measured}
        _write(out, "exchange", stamp, exchange_report, exchange.markdown(exchange_report))
    if "proxy" in wanted:
        load.wrk_path()  # before any stack starts: say what is missing at once
    if "proxy" in wanted or "stream" in wanted:
        audited = "proxy" in wanted and args.record_and_trace
        against = args.proxy_against if "proxy" in wanted else None
        with _stacks(out, audited=audited, workers="proxy" in wanted, against=against) as paths:
            if "proxy" in wanted:
                proxy_report = {**header, **_proxy(args, paths)}
                _write(out, "proxy", stamp, proxy_report, _markdown(proxy_report))
                status = 1 if _proxy_errors(proxy_report) else 0
            if "stream" in wanted:
                stream_report = {**header, **_stream(args, paths)}
                _write(out, "stream", stamp, stream_report, stream.markdown(stream_report))
                status = status or (1 if stream_report["errors"] else 0)
    if "memory" in wanted:
        memory_report = {**header, **memory.run(out=out, traced=args.memory_trace)}
        _write(out, "memory", stamp, memory_report, memory.markdown(memory_report))
    return status


def _write(out: Path, name: str, stamp: str, report: dict[str, Any], markdown: str) -> None:
    for label in (f"{name}-{stamp}", f"{name}-latest"):
        (out / f"{label}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{label}.md").write_text(markdown)
    print(markdown)
    print(f"written to {out / (name + '-' + stamp + '.json')}")


def _rules_at(revision: str, folder: Path) -> tuple[str, Path]:
    """The rules folder ``revision`` names: a folder as it is, or ``rules/`` of a git revision written out
    under ``folder``."""
    given = Path(revision)
    if given.is_dir():
        return str(given), given
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", revision, "rules"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"--scan-against {revision}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return revision, folder / "rules"


def _machine() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": _cpus()}


@contextlib.contextmanager
def _stacks(
    out: Path, audited: bool = False, workers: bool = False, against: Path | None = None
) -> Iterator[dict[str, str]]:
    """Stacks in front of one demo model: Envoy + extproc, Envoy alone (no ext_proc filter), Envoy +
    the floor and, when ``audited``, Envoy + extproc with the session record on (recorded), and with
    spans and metrics exported (traced); with ``against``, Envoy + extproc run from that source tree
    (its ``extproc`` package first on the path; the settings, rules and Envoy config are this tree's).
    Yields the URL of each path (direct: the demo model), the
    record's path as ``record``, and as ``token`` a token of the dev issuer every extproc verifies."""
    log = out / "stack.log"
    log.write_text("")
    stacks: list[Stack] = []
    receiver: Process | None = None
    sink: IO[str] | None = None
    redis: RedisServer | None = None
    identity = Path(tempfile.mkdtemp(prefix="extproc-bench-identity-"))
    try:
        # Identity on, as `make run` has it: callers' tokens are verified on every request. The demo's
        # own key is off, or the paths without extproc (which sets it) could not reach the model.
        full = Stack(log_path=log, demo_key=False, dev_identity=identity).start()
        stacks.append(full)
        assert full.upstream is not None
        upstream = Upstream("127.0.0.1", full.upstream.port)
        bare = Stack(log_path=log, upstream=upstream, with_extproc=False).start()
        stacks.append(bare)
        floor = FloorStack(log_path=log, upstream=upstream).start()
        stacks.append(floor)
        if workers:  # extproc-2w; several workers share approvals through Redis (memory is refused)
            redis = RedisServer(identity).start()
            store = {"EXTPROC_APPROVALS__STORE": "redis", "EXTPROC_APPROVALS__REDIS_URL": redis.url}
            two = Stack(
                log_path=log, upstream=upstream, dev_identity=identity, extproc_workers=2, extra_env=store
            )
            stacks.append(two.start())
        token = mint_dev_token(identity, "bench", [], 6 * 3600)
        paths = {
            "direct": full.demo_url,
            "envoy": bare.url,
            "floor": floor.url,
            "extproc": full.url,
            "token": token,
        }
        if workers:
            paths["extproc-2w"] = two.url
        if against is not None:
            if not (against / "extproc" / "__init__.py").is_file():
                raise SystemExit(f"--proxy-against {against}: no extproc package there")
            other = Stack(
                log_path=log,
                upstream=upstream,
                dev_identity=identity,
                # -m puts the working directory (this tree) before PYTHONPATH, unless told not to.
                extra_env={"PYTHONPATH": str(against.resolve()), "PYTHONSAFEPATH": "1"},
            )
            stacks.append(other.start())
            paths["against"] = other.url
        if audited:
            keys = generate_keys(bare.workdir / "audit-keys")
            record = bare.workdir / "session.jsonl"
            env = {
                "EXTPROC_AUDIT__RECORD_PATH": str(record),
                "EXTPROC_AUDIT__SEALING_KEY_FILE": str(keys["auditor_pub"]),
                "EXTPROC_AUDIT__SIGNING_KEY_FILE": str(keys["signing_key"]),
            }
            recorded = Stack(log_path=log, upstream=upstream, extra_env=env, dev_identity=identity)
            stacks.append(recorded.start())
            # An OTLP collector that accepts and discards, in a process of its own: a real one runs on
            # another machine, this one shares the CPUs with everything measured.
            sink = log.open("a", encoding="utf-8")
            python_path = {**os.environ, "PYTHONPATH": str(ROOT)}
            receiver = Process("otlp", [sys.executable, "-m", "tests.otlp"], sink, python_path)
            otlp = "http://" + receiver.wait_ready(60)["grpc"]
            traced = Stack(log_path=log, upstream=upstream, otlp_endpoint=otlp, dev_identity=identity)
            stacks.append(traced.start())
            paths.update(recorded=recorded.url, traced=traced.url, record=str(record))
        yield paths
    finally:
        for stack in reversed(stacks):
            stack.stop()
        if receiver is not None:
            receiver.stop()
        if redis is not None:
            redis.stop()
        if sink is not None:
            sink.close()
        shutil.rmtree(identity, ignore_errors=True)


def _median_pass(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass's figures from several: the median of each, the requests and errors of all."""
    merged = {key: statistics.median(p[key] for p in passes) for key in ("rps", "p50_ms", "p99_ms")}
    return {
        **merged,
        "connections": passes[0]["connections"],
        "requests": sum(p["requests"] for p in passes),
        "errors": sum(p["errors"] for p in passes),
    }


def _check_answers(urls: dict[str, str], headers: dict[str, str]) -> list[str]:
    """One request per path before the load: each answers 200 with the prompt echoed, extproc with the
    card and the address masked, the others with both as they were sent (the floor changes nothing)."""
    problems: list[str] = []
    for name, url in urls.items():
        request = urllib.request.Request(url + "/v1/chat/completions", data=PROMPT, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (loopback)
                content = json.load(answer)["choices"][0]["message"]["content"]
        except (OSError, ValueError, KeyError, IndexError) as error:
            problems.append(f"{name}: {type(error).__name__}: {error}")
            continue
        scanned = name not in ("envoy", "floor")
        wanted, unwanted = ((CARD_MASKED, EMAIL_MASKED), (CARD, EMAIL)) if scanned else ((CARD, EMAIL), ())
        if any(value not in content for value in wanted) or any(value in content for value in unwanted):
            problems.append(f"{name}: unexpected answer {content[:200]!r}")
    return problems


def _proxy(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any]:
    """Every path measured once per round, the rounds one after the other, so that a slow spell of a
    shared machine falls on every path alike; each figure is the median over the rounds."""
    optional = (*WORKER_PATHS, "recorded", "traced", "against")
    names = [*PROXY_PATHS, *(name for name in optional if name in paths)]
    urls = {name: paths[name] for name in names}
    headers = {"content-type": "application/json", "authorization": f"Bearer {paths['token']}"}
    problems = _check_answers(urls, headers)
    lua = load.write_script(PROMPT, headers)
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        n: {"sequential": [], "concurrent": []} for n in urls
    }
    try:
        for _ in range(args.rounds):
            for name, url in urls.items():
                target = url + "/v1/chat/completions"
                load.run(target, lua, connections=args.concurrency, seconds=min(2.0, args.seconds))
                rounds[name]["sequential"].append(load.run(target, lua, connections=1, seconds=args.seconds))
                rounds[name]["concurrent"].append(
                    load.run(target, lua, connections=args.concurrency, seconds=args.seconds)
                )
    finally:
        lua.unlink()
    results = {
        name: {kind: _median_pass(passes) for kind, passes in measured.items()}
        for name, measured in rounds.items()
    }
    report: dict[str, Any] = {
        "prompt_bytes": len(PROMPT),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "load": "wrk",
        "paths": results,
        "ratios": _ratios(results),
        "answer_problems": problems,
    }
    if "record" in paths:
        record = Path(paths["record"])
        with record.open("rb") as lines:
            exchanges = sum(1 for line in lines if b'"type":"exchange"' in line)
        if exchanges:
            report["record_bytes_per_exchange"] = round(record.stat().st_size / exchanges)
    return report


def _ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """The figures the project's targets are written in: extproc over the floor (the cost of the work
    extproc does) and the floor over Envoy alone (the cost of an ext_proc server in Python at all)."""
    ratios: dict[str, dict[str, float]] = {}
    pairs = [("extproc/floor", "extproc", "floor"), ("floor/envoy", "floor", "envoy")]
    if "against" in results:
        pairs += [("against/floor", "against", "floor"), ("extproc/against", "extproc", "against")]
    for label, top, bottom in pairs:
        a, b = results[top], results[bottom]
        ratios[label] = {
            "p50_ms_c1": a["sequential"]["p50_ms"] / b["sequential"]["p50_ms"],
            "p99_ms_c1": a["sequential"]["p99_ms"] / b["sequential"]["p99_ms"],
            "rps_c": a["concurrent"]["rps"] / b["concurrent"]["rps"],
        }
    return ratios


def _proxy_errors(report: dict[str, Any]) -> int:
    failed = sum(r["sequential"]["errors"] + r["concurrent"]["errors"] for r in report["paths"].values())
    return failed + len(report["answer_problems"])


def _stream(args: argparse.Namespace, paths: dict[str, str]) -> dict[str, Any]:
    return stream.run(
        paths["direct"],
        {name: paths[name] for name in PROXY_PATHS},
        token=paths["token"],
        runs=args.stream_runs,
        chars=args.stream_chars,
        chunk_chars=args.stream_chunk_chars,
        delay_ms=args.stream_delay_ms,
        throughput_chars=args.stream_throughput_chars,
        concurrency=args.stream_concurrency,
    )


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


_LABELS = {
    "envoy": "Envoy alone",
    "floor": "Envoy + floor",
    "extproc": "Envoy + extproc",
    "extproc-2w": "Envoy + extproc, 2 workers",
    "recorded": "... with the session record",
    "traced": "... with tracing",
    "against": "Envoy + extproc of the other tree (--proxy-against)",
}


def _markdown(report: dict[str, Any]) -> str:
    paths = report["paths"]
    c = paths["envoy"]["concurrent"]["connections"]
    machine = report["machine"]
    lines = [
        f"Proxy overhead, {report['when']}, {machine['cpus']} CPUs, prompt {report['prompt_bytes']} B, "
        f"wrk, {report['seconds']:g} s per pass, medians of {report['rounds']} interleaved rounds",
        "",
        f"| path | p50 ms (c=1) | p99 ms (c=1) | rps (c=1) | rps (c={c}) | p99 ms (c={c}) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in paths.items():
        seq, con = result["sequential"], result["concurrent"]
        lines.append(
            f"| {_LABELS[name]} | {seq['p50_ms']:.2f} | {seq['p99_ms']:.2f} | {seq['rps']:.0f} "
            f"| {con['rps']:.0f} | {con['p99_ms']:.2f} | {seq['errors'] + con['errors']} |"
        )
    lines += [
        "",
        f"| ratio | p50 (c=1) | p99 (c=1) | rps (c={c}) |",
        "|---|---:|---:|---:|",
    ]
    for label, r in report["ratios"].items():
        lines.append(f"| {label} | {r['p50_ms_c1']:.2f}x | {r['p99_ms_c1']:.2f}x | {r['rps_c']:.2f}x |")
    envoy, floor, extproc = (paths[n]["sequential"]["p50_ms"] for n in PROXY_PATHS)
    lines += [
        "",
        f"The floor (ext_proc doing nothing) adds {floor - envoy:.2f} ms at p50 over Envoy alone; extproc "
        f"adds {extproc - floor:.2f} ms over the floor.",
    ]
    extproc_seq, extproc_con = paths["extproc"]["sequential"], paths["extproc"]["concurrent"]
    doing = {"recorded": "The session record adds", "traced": "Spans and metrics (and Envoy's trace) add"}
    for name, what in doing.items():
        if name in paths:
            seq, con = paths[name]["sequential"], paths[name]["concurrent"]
            lines.append(
                f"{what} {seq['p50_ms'] - extproc_seq['p50_ms']:.2f} ms at p50 over extproc "
                f"({seq['p50_ms'] / extproc_seq['p50_ms']:.2f}x); throughput at c={c} is "
                f"{con['rps'] / extproc_con['rps']:.2f}x extproc's."
            )
    if "extproc-2w" in paths:
        two = paths["extproc-2w"]
        lines.append(
            f"Two workers: {two['concurrent']['rps'] / extproc_con['rps']:.2f}x one worker's throughput at "
            f"c={c}, p50 at c=1 {two['sequential']['p50_ms']:.2f} ms vs {extproc_seq['p50_ms']:.2f} ms."
        )
    if "record_bytes_per_exchange" in report:
        lines.append(f"One exchange record: {report['record_bytes_per_exchange']:,} bytes.")
    if report["answer_problems"]:
        lines += ["", "Answers checked before the load:"]
        lines += [f"- {problem}" for problem in report["answer_problems"]]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
