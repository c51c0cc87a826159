"""Load from wrk: a C load generator, so that the client is not what the proxy bench measures.

A Python client on the same two CPUs as Envoy, the processor and the model spends more per request than
Envoy alone does, which flattens every ratio towards 1. wrk sends the POST body and headers a Lua
script sets, and the script's ``done`` hook prints the figures as one JSON line (latency in µs, from
wrk's own histogram).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, '
    .. '"timeout": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


class WrkMissing(RuntimeError):
    """wrk is not on PATH."""


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise WrkMissing(
            "the proxy benchmark drives its load with wrk, which is not on PATH: `make bench` installs "
            "Debian's package (make wrk), or install it yourself (apt-get install wrk, brew install wrk)"
        )
    return found


def _lua_string(text: str) -> str:
    """``text`` as a Lua long-bracket literal whose closing bracket it does not contain."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def script(body: bytes, headers: dict[str, str]) -> str:
    """The Lua script: every request a POST of ``body`` with ``headers``, then the JSON report."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body.decode('utf-8'))}"]
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n" + _REPORT


def run(url: str, lua: Path, *, connections: int, seconds: float, threads: int = 1) -> dict[str, Any]:
    """One wrk pass against ``url``: requests/s, p50 and p99 latency in ms, and errors (connection
    errors, timeouts and non-2xx answers together)."""
    argv = [wrk_path(), f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "-s", str(lua), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    report = next((line for line in done.stdout.splitlines() if line.startswith("{")), None)
    if done.returncode != 0 or report is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    figures = json.loads(report)
    errors = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "connections": connections,
        "requests": figures["requests"],
        "errors": errors,
        "rps": figures["requests"] / (figures["duration_us"] / 1e6),
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
        "mean_ms": figures["mean_us"] / 1000,
    }


def write_script(body: bytes, headers: dict[str, str]) -> Path:
    """The script in a temporary file (wrk reads it by path); the caller removes it."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False, encoding="utf-8") as out:
        out.write(script(body, headers))
    return Path(out.name)
