"""``extproc serve`` with ``server.workers`` above 1: a supervisor and N worker processes.

One Python process scans on one core. The supervisor (the process ``serve`` started) runs N workers,
each a whole ``extproc serve`` with its own snapshot, listening on the one gRPC address (and the one
approvers' API address) with ``SO_REUSEPORT``: the kernel spreads Envoy's connections over them. The
supervisor serves nothing to Envoy itself. It:

- reserves the listen ports (binding them with ``SO_REUSEPORT``, never listening), so port 0 becomes one
  concrete port every worker binds, and a restarted worker binds it again;
- starts the workers (the first one alone when the Hyperscan cache is configured, so the others load
  what it compiled), restarts one that dies, and stops everything when workers keep dying
  (``CRASH_LIMIT`` exits within ``CRASH_WINDOW_SECONDS``): half a service is never kept silently;
- forwards SIGTERM and SIGINT (each worker drains as a single server does) and SIGHUP (each reloads);
- owns the admin address: /healthz, /readyz (ready only when every worker is), /snapshot and POST
  /reload (every worker's), /metrics (every worker's series, labelled ``extproc_worker``) and the
  approval page (any worker's: with several workers the approvals live in Redis, shared by all).

Workers talk to the supervisor through their admin endpoints on Unix sockets in a private folder, and
each holds the read end of a pipe whose write end only the supervisor has: when the supervisor is gone
(even by SIGKILL), the pipe ends and the worker stops as on SIGTERM. No worker outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from extproc.errors import ConfigError
from extproc.settings import Settings

log = logging.getLogger("extproc.supervisor")

CRASH_LIMIT: Final = 5
"""Unexpected worker exits within ``CRASH_WINDOW_SECONDS`` after which the supervisor gives up."""
CRASH_WINDOW_SECONDS: Final = 60.0
RESTART_DELAY_SECONDS: Final = 0.5
"""Pause before a dead worker is started again: a worker that dies at once does not spin the CPU."""
STOP_MARGIN_SECONDS: Final = 10.0
"""After a stop signal a worker gets drain_seconds + grace_seconds, and this much more, before SIGKILL."""
WORKER_QUERY_SECONDS: Final = 5.0
"""Longest the admin endpoints wait for one worker's answer."""
RELOAD_QUERY_SECONDS: Final = 120.0
"""A reload compiles the rules: it may take a while on a big pack without the cache."""
WORKER_LABEL: Final = "extproc_worker"
"""The label /metrics adds to every series of a worker."""
LOOPBACK: Final = frozenset({"127.0.0.1", "::1"})
APPROVAL_HEADERS: Final = ("authorization", "content-type", "accept")
"""The request headers the approval page and its JSON API read; the proxy forwards these only."""


def worker_record_path(path: str, worker: int) -> str:
    """Worker ``worker``'s session record beside ``path``: ``session.jsonl`` -> ``session.worker-0.jsonl``.
    One file per worker: each keeps its own hash chain, with no chain head shared between processes."""
    record = Path(path)
    return str(record.with_name(f"{record.stem}.worker-{worker}{record.suffix}"))


def record_files(settings: Settings) -> list[Path]:
    """The session record files the settings write: ``audit.record_path`` itself with one worker, one
    file per worker (``worker_record_path``) with several."""
    path = settings.audit.record_path
    if not path:
        return []
    if settings.server.workers == 1:
        return [Path(path)]
    return [Path(worker_record_path(path, index)) for index in range(settings.server.workers)]


def require_shared_approvals(settings: Settings) -> None:
    """Raise ConfigError when several workers would keep approvals in memory: a pending approval lives in
    the worker that asked for it, and the approver's vote, the held request and the caller's retry can
    each reach another worker, which does not know it."""
    workers = settings.server.workers
    if workers > 1 and settings.approvals.store == "memory":
        raise ConfigError(
            f"server.workers is {workers} but approvals.store is memory: each worker would keep its own "
            "approvals, and a vote or a retry reaching another worker would not find them. Set "
            "approvals.store: redis (with approvals.redis_url), which every worker shares, or "
            "server.workers: 1"
        )


def _reserve(address: str, what: str) -> tuple[socket.socket, str]:
    """Binds ``address`` with SO_REUSEPORT without listening, so that the workers bind the very same port
    (port 0 becomes one free port) and nothing else takes it between a worker's death and its restart.
    Returns the socket, kept open while the supervisor runs, and the address with the bound port."""
    host, _, port = address.rpartition(":")
    bare = host[1:-1] if host.startswith("[") else host
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        reserved = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot bind the {what} address {address}: {exc}") from exc
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(where)
    except OSError as exc:
        reserved.close()
        raise OSError(f"cannot bind the {what} address {address} (in use, or not local)") from exc
    return reserved, f"{host}:{reserved.getsockname()[1]}"


@dataclass
class _Worker:
    index: int
    socket_path: str
    process: asyncio.subprocess.Process | None = None
    lifeline: int | None = None  # the write end of the pipe the worker watches; closed when it exits
    started: bool = False  # its admin endpoint has answered since this process started
    restarts: int = 0
    session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class WorkerFailed(Exception):
    """The workers could not be kept running; ``exit_code`` is what ``serve`` exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Supervisor:
    """Runs ``settings.server.workers`` workers of ``extproc serve``; see the module docstring."""

    def __init__(self, settings: Settings, serve_args: list[str]) -> None:
        """``serve_args``: the arguments every worker's ``extproc serve`` gets besides the ones the
        supervisor sets (addresses, worker index): the settings file."""
        self._settings = settings
        self._serve_args = serve_args
        self._folder = tempfile.mkdtemp(prefix="extproc-workers-")  # 0700: only this user reaches it
        self._workers = [
            _Worker(index, os.path.join(self._folder, f"worker-{index}.sock"))
            for index in range(settings.server.workers)
        ]
        self._reserved: list[socket.socket] = []
        self._grpc_address = ""
        self._approvals_address = ""
        self._stopping = False
        self._serving = False
        self._crashes: deque[float] = deque()
        self._failure: WorkerFailed | None = None
        self._done = asyncio.Event()
        self._watchers: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._next_page = 0
        self.admin_port = 0

    # -- start and stop -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT (exit 0 once every worker stopped cleanly), or until the workers
        cannot be kept running (WorkerFailed, after stopping every one)."""
        loop = asyncio.get_running_loop()
        received: list[str] = []

        def stopping(sig: signal.Signals) -> None:
            if received:
                log.info("signal_received", extra={"signal": sig.name, "detail": "already stopping"})
                return
            received.append(sig.name)
            log.info("signal_received", extra={"signal": sig.name, "detail": "stopping every worker"})
            self._stop_workers(sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping, sig)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        try:
            await self._start()
            await self._done.wait()
        finally:
            await self._close()
        if self._failure is not None:
            raise self._failure
        codes = {w.index: w.process.returncode for w in self._workers if w.process is not None}
        unclean = {index: code for index, code in codes.items() if code != 0}
        if unclean:
            log.error("workers_stopped_uncleanly", extra={"exit_codes": unclean})
            return 1
        log.info("stopped")
        return 0

    async def _start(self) -> None:
        server = self._settings.server
        grpc_socket, self._grpc_address = _reserve(server.grpc_address, "gRPC")
        self._reserved.append(grpc_socket)
        if self._settings.approvals.api_address:
            api_socket, self._approvals_address = _reserve(
                self._settings.approvals.api_address, "approvals API"
            )
            self._reserved.append(api_socket)
        self.admin_port = await self._start_admin()
        first, rest = self._workers[:1], self._workers[1:]
        if self._settings.detect.cache_dir:
            # The first worker compiles the rules into the cache; the others then load them from it.
            await self._start_all(first)
            if not self._stopping:
                await self._start_all(rest)
        else:
            await self._start_all(self._workers)
        if self._stopping:
            return
        self._serving = True
        ready: dict[str, Any] = {
            "grpc": self._grpc_address,
            "admin": f"{self._admin_host()}:{self.admin_port}",
            "workers": len(self._workers),
            "pids": [w.pid for w in self._workers],
        }
        if self._approvals_address:
            ready["approvals"] = self._approvals_address
        log.info("ready", extra=ready)

    async def _start_all(self, workers: list[_Worker]) -> None:
        for worker in workers:
            await self._spawn(worker)
        await asyncio.gather(*(self._started(worker) for worker in workers))

    async def _spawn(self, worker: _Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.socket_path)
        readable, writable = os.pipe()
        argv = [
            sys.executable, "-m", "extproc", "serve", *self._serve_args,
            "--grpc-address", self._grpc_address,
            "--approvals-address", self._approvals_address,
            "--workers", str(len(self._workers)),
            "--worker", str(worker.index),
            "--worker-admin", worker.socket_path,
            "--supervisor-fd", str(readable),
        ]  # fmt: skip
        try:
            # A session of its own: a signal reaches a worker once, through the supervisor, never also
            # from a terminal's Ctrl-C to the whole group.
            worker.process = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, pass_fds=(readable,), start_new_session=True
            )
        except BaseException:
            os.close(writable)
            raise
        finally:
            os.close(readable)
        worker.lifeline = writable
        worker.started = False
        if self._stopping:  # a stop signal came while it was being started
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        log.info("worker_started", extra={"worker": worker.index, "pid": worker.process.pid})
        watcher = asyncio.create_task(self._watch(worker, worker.process), name=f"worker-{worker.index}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _started(self, worker: _Worker) -> None:
        """Waits until ``worker``'s admin endpoint answers (its gRPC listener is up by then), or it exits."""
        process = worker.process
        assert process is not None
        while process.returncode is None and not self._stopping:
            if await self._get(worker, "/healthz", seconds=1.0) is not None:
                worker.started = True
                log.info("worker_ready", extra={"worker": worker.index, "pid": process.pid})
                return
            await asyncio.sleep(0.05)

    async def _watch(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        """Waits for the worker's exit; restarts it, or gives up, unless the supervisor is stopping."""
        code = await process.wait()
        if worker.lifeline is not None:
            os.close(worker.lifeline)
            worker.lifeline = None
        if self._stopping:
            log.info("worker_stopped", extra={"worker": worker.index, "pid": process.pid, "exit_code": code})
            if all(not w.running for w in self._workers):
                self._done.set()
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        if not self._serving:
            # Still starting: a worker that cannot start (bad rules, an address in use) is the
            # service not starting; its own serve_failed line says why.
            self._give_up(f"worker {worker.index} exited while starting ({how})", code if code > 0 else 1)
            return
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - CRASH_WINDOW_SECONDS:
            self._crashes.popleft()
        log.error(
            "worker_exited",
            extra={"worker": worker.index, "pid": process.pid, "exit_code": code, "detail": how},
        )
        if len(self._crashes) >= CRASH_LIMIT:
            self._give_up(
                f"{len(self._crashes)} worker exits within {CRASH_WINDOW_SECONDS:.0f} s: stopping every "
                "worker rather than serve with part of them",
                1,
            )
            return
        await asyncio.sleep(RESTART_DELAY_SECONDS)
        if self._stopping:
            return
        worker.restarts += 1
        log.warning("worker_restarting", extra={"worker": worker.index, "restarts": worker.restarts})
        try:
            await self._spawn(worker)
        except OSError as exc:
            self._give_up(f"worker {worker.index} cannot be started again: {exc}", 1)
            return
        await self._started(worker)

    def _give_up(self, reason: str, exit_code: int) -> None:
        if self._stopping:
            return
        log.critical("workers_failed", extra={"detail": reason, "exit_code": exit_code})
        self._failure = WorkerFailed(reason, exit_code)
        # The survivors stop without a drain: the service is going away, and Kubernetes restarts it.
        self._stop_workers(signal.SIGTERM)

    def _stop_workers(self, sig: signal.Signals) -> None:
        """Forwards ``sig`` to every worker; each drains and stops as a single server does."""
        self._stopping = True
        self._serving = False
        running = [w for w in self._workers if w.running]
        if not running:
            self._done.set()
            return
        for worker in running:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)
        server = self._settings.server
        deadline = server.drain_seconds + server.grace_seconds + STOP_MARGIN_SECONDS
        killer = asyncio.get_running_loop().create_task(self._kill_after(deadline))
        self._watchers.add(killer)
        killer.add_done_callback(self._watchers.discard)

    async def _kill_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        for worker in self._workers:
            if worker.running:
                assert worker.process is not None
                log.error(
                    "worker_killed",
                    extra={"worker": worker.index, "detail": f"still running after {seconds:.0f} s"},
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    async def _close(self) -> None:
        """Whatever started is stopped: workers (SIGKILL for any still running, e.g. when start-up was
        cancelled), the admin server, the reserved ports, the sockets' folder."""
        if not self._stopping:
            self._stop_workers(signal.SIGTERM)
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(worker.process.wait()), self._stop_seconds())
                if worker.process.returncode is None:
                    worker.process.kill()
                    await worker.process.wait()
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        for worker in self._workers:
            if worker.lifeline is not None:
                os.close(worker.lifeline)
                worker.lifeline = None
            if worker.session is not None:
                await worker.session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for reserved in self._reserved:
            reserved.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _stop_seconds(self) -> float:
        server = self._settings.server
        return server.drain_seconds + server.grace_seconds + STOP_MARGIN_SECONDS

    def _sighup(self) -> None:
        """Every started worker reloads (one still starting reads the files as they are now anyway)."""
        started = [w for w in self._workers if w.running and w.started]
        log.info("signal_received", extra={"signal": "SIGHUP", "detail": f"reloading {len(started)} workers"})
        for worker in started:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGHUP)

    # -- the workers' admin endpoints -----------------------------------------------------------------

    def _session(self, worker: _Worker) -> aiohttp.ClientSession:
        if worker.session is None:
            # No connection kept: a restarted worker is a new server on the same socket path.
            connector = aiohttp.UnixConnector(path=worker.socket_path, force_close=True)
            worker.session = aiohttp.ClientSession(connector=connector)
        return worker.session

    async def _request(
        self,
        worker: _Worker,
        method: str,
        path: str,
        *,
        seconds: float = WORKER_QUERY_SECONDS,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes] | None:
        """One request to ``worker``'s admin endpoint: status, headers and body, or None when it does not
        answer (not running, starting, or stuck past ``timeout``)."""
        if not worker.running:
            return None
        try:
            async with self._session(worker).request(
                method,
                f"http://worker{path}",
                headers=headers,
                data=data,
                timeout=aiohttp.ClientTimeout(total=seconds),
                allow_redirects=False,
            ) as answer:
                return answer.status, dict(answer.headers), await answer.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def _get(self, worker: _Worker, path: str, seconds: float = WORKER_QUERY_SECONDS) -> Any:
        """``worker``'s JSON answer to GET ``path`` (whatever its status), or None."""
        answered = await self._request(worker, "GET", path, seconds=seconds)
        if answered is None:
            return None
        try:
            return _json(answered[2])
        except ValueError:
            return None

    async def _each(self, ask: Callable[[_Worker], Awaitable[Any]]) -> list[Any]:
        return list(await asyncio.gather(*(ask(worker) for worker in self._workers)))

    # -- the admin server ------------------------------------------------------------------------------

    def _admin_host(self) -> str:
        return self._settings.server.admin_address.rpartition(":")[0]

    async def _start_admin(self) -> int:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/snapshot", self._snapshot)
        app.router.add_post("/reload", self._reload)
        if self._settings.telemetry.prometheus:
            app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/approvals", self._approvals)
        app.router.add_route("*", "/approvals/{rest:.*}", self._approvals)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = int(self._settings.server.admin_address.rpartition(":")[2])
        site = web.TCPSite(self._runner, self._admin_host(), port)
        try:
            await site.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    f"cannot bind the admin address {self._settings.server.admin_address} (in use)"
                ) from exc
            raise
        return int(self._runner.addresses[0][1])

    def _state(self, worker: _Worker) -> dict[str, Any]:
        return {"worker": worker.index, "pid": worker.pid, "restarts": worker.restarts}

    async def _healthz(self, _request: web.Request) -> web.Response:
        """Alive while the supervisor runs: it restarts a dead worker itself, and gives up (exits) when
        it cannot keep them running. A Pod restarted for one worker's crash would drop every stream."""
        running = sum(1 for w in self._workers if w.running)
        return web.json_response({"status": "alive", "workers": len(self._workers), "running": running})

    async def _readyz(self, _request: web.Request) -> web.Response:
        """Ready when every worker is: a worker that is down or restarting would fail the streams the
        kernel sends to it (Envoy answers them 503), so the Pod takes no traffic until it is back."""
        answers = await self._each(lambda w: self._request(w, "GET", "/readyz"))
        workers: list[dict[str, Any]] = []
        ready = self._serving
        for worker, answered in zip(self._workers, answers, strict=True):
            state = self._state(worker)
            if answered is None:
                state["status"] = "restarting" if not self._stopping else "stopping"
                ready = False
            else:
                status, _, answer = answered
                with contextlib.suppress(ValueError):
                    state.update(_json(answer))
                ready = ready and status == 200
            workers.append(state)
        status = "serving" if ready else "not_serving"
        body: dict[str, Any] = {"status": status, "workers": workers}
        if ready and workers:
            for key in ("identity", "warning"):
                if key in workers[0]:
                    body[key] = workers[0][key]
        return web.json_response(body, status=200 if ready else 503)

    async def _snapshot(self, _request: web.Request) -> web.Response:
        """Every worker's snapshot; ``version`` is theirs when they all run the same one, else null (a
        reload under way, or refused by some)."""
        answers = await self._each(lambda w: self._get(w, "/snapshot"))
        workers = []
        for worker, answer in zip(self._workers, answers, strict=True):
            state = self._state(worker)
            state.update(answer if isinstance(answer, dict) else {"status": "unavailable"})
            workers.append(state)
        versions = {w.get("version") for w in workers}
        version = versions.pop() if len(versions) == 1 else None
        return web.json_response({"version": version, "workers": workers})

    async def _reload(self, request: web.Request) -> web.Response:
        """Every worker reloads (POST /reload on each, at once); loopback only, as for one server. 200
        when all reloaded or had nothing to change, 422 when any refused (the problems are its), 503
        when any could not be asked (restarting: it reads the files as they are when it starts)."""
        if request.remote not in LOOPBACK:
            return web.json_response(
                {"error": "reload_not_allowed", "message": "POST /reload is accepted from loopback only"},
                status=403,
            )
        answers = await self._each(
            lambda w: self._request(w, "POST", "/reload", seconds=RELOAD_QUERY_SECONDS)
        )
        workers: list[dict[str, Any]] = []
        for worker, answered in zip(self._workers, answers, strict=True):
            state = self._state(worker)
            if answered is None:
                state["result"] = "unavailable"
            else:
                with contextlib.suppress(ValueError):
                    state.update(_json(answered[2]))
            workers.append(state)
        return _reload_answer(workers)

    async def _metrics(self, request: web.Request) -> web.Response:
        """Every worker's series, each with the label ``extproc_worker``: a worker's counters restart
        from 0 when it does, which rate() reads as that series' reset, where a sum over workers would
        drop and look like one to the whole sum. ``sum without (extproc_worker)`` gives the Pod's
        figure. A worker that does not answer is left out of this scrape."""
        answers = await self._each(
            lambda w: self._request(w, "GET", "/metrics", headers={"Accept": "text/plain"})
        )
        texts = {
            worker.index: answered[2].decode("utf-8")
            for worker, answered in zip(self._workers, answers, strict=True)
            if answered is not None and answered[0] == 200
        }
        body, content_type = await asyncio.to_thread(merge_scrapes, texts, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _approvals(self, request: web.Request) -> web.Response:
        """The approval page and its JSON API, answered by a started worker in turn: with several workers
        approvals live in Redis, so every worker shows and decides the same ones."""
        started = [w for w in self._workers if w.running and w.started]
        if not started:
            return web.json_response(
                {"error": "approval_unavailable", "message": "no worker is serving"}, status=503
            )
        worker = started[self._next_page % len(started)]
        self._next_page += 1
        headers = {name: request.headers[name] for name in APPROVAL_HEADERS if name in request.headers}
        body = await request.read()
        answered = await self._request(
            worker, request.method, request.rel_url.path_qs, headers=headers, data=body or None
        )
        if answered is None:
            return web.json_response(
                {"error": "approval_unavailable", "message": "the worker did not answer"}, status=503
            )
        status, answer_headers, answer = answered
        kept = {
            name: value
            for name, value in answer_headers.items()
            if name.lower() in ("content-type", "cache-control", "content-security-policy", "x-frame-options")
            or name.lower().startswith(("x-content-type", "referrer-policy"))
        }
        return web.Response(status=status, body=answer, headers=kept)


def _json(data: bytes) -> Any:
    return json.loads(data)


def _reload_answer(workers: list[dict[str, Any]]) -> web.Response:
    results = [w.get("result") for w in workers]
    versions = {w.get("version") for w in workers}
    body: dict[str, Any] = {"version": versions.pop() if len(versions) == 1 else None, "workers": workers}
    if "refused" in results:
        problems = [f"worker {w['worker']}: {p}" for w in workers for p in w.get("problems", [])]
        return web.json_response({"result": "refused", "problems": problems, **body}, status=422)
    if "unavailable" in results or any(r not in ("ok", "unchanged") for r in results):
        missing = [w["worker"] for w in workers if w.get("result") not in ("ok", "unchanged")]
        return web.json_response(
            {
                "result": "unavailable",
                "error": "worker_unavailable",
                "message": f"workers {missing} did not answer; each reads the files anew when it starts",
                **body,
            },
            status=503,
        )
    return web.json_response({"result": "ok" if "ok" in results else "unchanged", **body})


class _Merged:
    """A collector of already collected families, for prometheus_client's encoders."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_scrapes(texts: dict[int, str], accept: str = "") -> tuple[bytes, str]:
    """One exposition of several workers' scrapes (Prometheus text format): every sample gets the label
    ``extproc_worker``, each family is written once, in the format ``accept`` prefers."""
    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, WORKER_LABEL: str(worker)}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(families.values()))
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
