"""A real redis-server for the approval store tests: on a free port, in a folder of its own, saving
nothing to disk, stopped by whoever started it. `make test` installs redis-server when it is missing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

OPTIONS = {
    "bind": "127.0.0.1",
    "save": "",  # no snapshots, no append-only file: a restart starts empty, nothing is left behind
    "appendonly": "no",
    "daemonize": "no",  # a child the test can stop
    "loglevel": "warning",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process. ``start()`` picks a free port (another one if it was taken meanwhile);
    ``start(port)`` after ``stop()`` brings the same server address back, as a restarted Redis would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH; `make test` installs it (Debian: redis-server)")
        for _attempt in range(5):
            self.port = port or free_port()
            log = self.folder / f"redis-{self.port}.log"
            with log.open("ab") as output:
                options = {"port": str(self.port), "dir": str(self.folder), **OPTIONS}
                argv = [
                    executable,
                    *(part for name, value in options.items() for part in (f"--{name}", value)),
                ]
                self.process = subprocess.Popen(
                    argv,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                if ping(self.port):
                    return self
                time.sleep(0.02)
            self.stop()
            if port is not None:
                break  # a fixed port taken by someone else: no other port would do
        raise RuntimeError(f"redis-server did not start:\n{log.read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
