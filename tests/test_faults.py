"""Failing closed under faults, with real processes: `extproc dev` killed hard, extproc killed or stopped
under load, the model server dying mid-stream, clients leaving mid-stream, and a stop signal with
streams in flight. Every byte a client receives is checked against what the scanned answer would be."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
