"""The grpc.aio servers: the Process loop, health, the approvers' API, admin endpoints and graceful
shutdown. Thin on purpose:
per-request state and decisions live in the Exchange."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import envoy
from extproc.approvals.grpc_api import ApprovalsApi, add_approvals_api
from extproc.approvals.model import Approval, ApprovalError, Event
from extproc.approvals.notify import Notifier
from extproc.approvals.page import add_approval_routes
from extproc.approvals.service import ApprovalService
from extproc.approvals.store import open_store
from extproc.audit.session import SessionRecorder
from extproc.audit.spans import ExchangeTrace, Instruments
from extproc.errors import ExtProcError
from extproc.exchange import Exchange
from extproc.model import Actions, AwaitApproval, ExtendTimeout, Outcome, ProtocolConfig, Reply
from extproc.reload import Reloader
from extproc.runtime import Runtime
from extproc.settings import Settings, require_identity_choice
from extproc.telemetry import Telemetry

log = logging.getLogger("extproc.server")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
SWITCH_INTERVAL_SECONDS = 0.0005
LOOPBACK = frozenset({"127.0.0.1", "::1"})
HOLD_MARGIN_SECONDS = 5.0  # Envoy waits this much longer than a hold, to get the answer after it


class ExternalProcessor:
    """Moves messages between Envoy and one Exchange per stream; never decides anything itself."""

    def __init__(
        self,
        runtime: Runtime,
        instruments: Instruments,
        recorder: SessionRecorder | None = None,
        approvals: ApprovalService | None = None,
    ) -> None:
        self._runtime = runtime
        self._instruments = instruments
        self._recorder = recorder
        self._approvals = approvals

    async def Process(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        snapshot = self._runtime.snapshot
        exchange: Exchange | None = None
        messages = _Messages(request_iterator)
        # Envoy's ext_proc client span is the parent: its traceparent is in the stream's metadata.
        metadata = _metadata(context)
        trace = self._instruments.begin(metadata)
        failure: str | None = None
        try:
            while True:
                deadline = exchange.deadline if exchange is not None else None
                message = await messages.next(deadline)
                if message is _EXPIRED:
                    assert exchange is not None
                    for reply in exchange.expire():
                        yield envoy.encode(reply)
                    continue
                if message is _END:
                    break
                if exchange is None:
                    protocol = envoy.protocol_config(message) or ProtocolConfig()
                    exchange = Exchange(
                        snapshot,
                        protocol,
                        uuid.uuid4().hex,
                        trace,
                        unavailable=self._unavailable(),
                        approvals=self._approvals is not None,
                    )
                for reply in exchange.handle(envoy.decode(message)):
                    if isinstance(reply, AwaitApproval):
                        async for decided in self._approval(exchange, reply):
                            yield envoy.encode(decided)
                    else:
                        yield envoy.encode(reply)
        except ExtProcError as error:
            # Never end the stream cleanly here: a clean close makes Envoy forward the request unprocessed.
            failure = error.code
            log.error(
                "exchange_failed",
                extra={"code": error.code, "reason": error.message, **_ids(exchange)},
            )
            await context.abort(grpc.StatusCode.INTERNAL, f"{error.code}: {error.message}")
        except Exception:
            failure = "internal_error"
            log.exception("exchange_crashed", extra=_ids(exchange))
            await context.abort(grpc.StatusCode.INTERNAL, "internal_error")
        finally:
            # Also when the stream is cancelled: the exchange's span and record are never lost.
            messages.close()
            if exchange is not None:
                exchange.close()
            self._finish(exchange, trace, failure, metadata)

    async def _approval(self, exchange: Exchange, waiting: AwaitApproval) -> AsyncIterator[Reply]:
        """Asks for the approval ``waiting`` describes, or uses the one the caller presented, and yields
        what the exchange answers then. A hold first tells Envoy to wait longer for this answer; a client
        that leaves meanwhile cancels the stream, and the wait with it."""
        service = self._approvals
        assert service is not None
        trace = exchange.trace
        result: Approval | ApprovalError
        try:
            if waiting.redeem is not None:
                assert waiting.caller is not None
                result = await service.redeem(waiting.redeem, waiting.caller, waiting.body_digest)
                trace.event("approval.used", {"approval.id": result.id})
            else:
                assert waiting.request is not None
                result = await service.request(waiting.request)
                trace.event(
                    "approval.requested", {"approval.id": result.id, "approval.mode": result.request.mode}
                )
                if waiting.hold:
                    yield ExtendTimeout(waiting.hold_seconds + HOLD_MARGIN_SECONDS)
                    result = await service.wait(result.id, waiting.hold_seconds)
                    trace.event(f"approval.{result.status}", {"approval.id": result.id})
                    if result.status == "approved":  # sent on now: the grant cannot be used again
                        assert waiting.caller is not None
                        result = await service.redeem(result.id, waiting.caller, waiting.body_digest)
        except ApprovalError as error:
            trace.event("approval.refused", {"error.code": error.code})
            result = error
        url = service.approve_url(result.id) if isinstance(result, Approval) else ""
        for reply in exchange.resume(result, url):
            yield reply

    def _unavailable(self) -> ExtProcError | None:
        if self._recorder is not None and not self._recorder.serving:
            return ExtProcError("the session record cannot be written", code="audit_unavailable")
        return None

    def _finish(
        self,
        exchange: Exchange | None,
        trace: ExchangeTrace,
        failure: str | None,
        metadata: dict[str, str],
    ) -> None:
        """The exchange's span, log line and record. Runs in the stream's ``finally``: it must not raise,
        and a record that cannot be made is counted as lost (the file gets a gap naming it)."""
        try:
            if exchange is None:  # the stream ended, or failed, before an exchange could begin
                decision = "passthrough" if failure is None else "error"
                trace.finish(Outcome(decision_id="", decision=decision, error_code=failure))
                return
            outcome = exchange.outcome(failure)
        except Exception:
            log.exception("exchange_outcome_failed", extra=_ids(exchange))
            if exchange is not None:
                failed = Outcome(
                    decision_id=exchange.decision_id, decision="error", error_code="internal_error"
                )
                with contextlib.suppress(Exception):
                    trace.finish(failed)
                if self._recorder is not None:
                    self._recorder.lost(exchange.decision_id, "the exchange's outcome could not be computed")
            return
        try:
            trace.finish(outcome)
            _log_exchange(exchange, outcome)
        except Exception:
            log.exception("exchange_trace_failed", extra=_ids(exchange))
        if self._recorder is not None:
            try:
                trace_id = trace.trace_id or _traceparent_trace_id(metadata)
                self._recorder.record(exchange.recorded(), outcome, trace_id)
            except Exception:
                log.exception("exchange_record_failed", extra=_ids(exchange))
                self._recorder.lost(exchange.decision_id, "the exchange's record could not be queued")


def _traceparent_trace_id(metadata: dict[str, str]) -> str | None:
    """The trace id of Envoy's trace when extproc itself does not trace (no exporter): the session record
    still names the trace that Envoy's spans and access log carry."""
    parts = metadata.get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return None
        return parts[1].lower()
    return None


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    metadata = context.invocation_metadata() or ()
    return {key: value for key, value in metadata if isinstance(value, str)}


_END = object()
_EXPIRED = object()


class _Messages:
    """Envoy's messages, read with an optional deadline (``time.monotonic()``).

    Without a deadline a message is read directly. With one (every streamed answer has one), a reader
    task started once appends each message to a list, waking the consumer's one waiter if it waits, and
    the waiter is awaited under ``asyncio.timeout_at``: a read that times out is not cancelled (that would
    break the gRPC stream), the message it brings waits in the list, and no task or ``asyncio.wait`` is
    made per message: measured over a plain read, this costs 0.55-0.6x what a task and ``asyncio.wait``
    per message did, and nothing for a message already waiting. A list and a future rather than an
    ``asyncio.Queue``: a stream holds one reader for minutes, and a queue's three deques cost 2.3 KiB."""

    def __init__(self, iterator: AsyncIterator[Any]) -> None:
        self._iterator = aiter(iterator)
        self._arrived: list[object] | None = None  # read by the reader task, not yet taken
        self._waiter: asyncio.Future[None] | None = None  # the consumer, waiting for the next one
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> object:
        try:
            return await anext(self._iterator)
        except StopAsyncIteration:
            return _END

    async def _feed(self, arrived: list[object]) -> None:
        """Reads every message into ``arrived``; a failed read is put there too, to be raised in order."""
        while True:
            try:
                message = await self._read()
            except Exception as exc:  # the stream broke: the consumer raises it where it reads
                message = _Failed(exc)
            arrived.append(message)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if message is _END or isinstance(message, _Failed):
                return

    async def next(self, deadline: float | None) -> object:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            if deadline is None:
                return await self._read()
            self._arrived = []
            self._reader = loop.create_task(self._feed(self._arrived))
        if not self._arrived:  # a burst of chunks: no waiting, no timer
            waiter = self._waiter = loop.create_future()
            try:
                if deadline is None:
                    await waiter
                else:
                    # time.monotonic() and the loop's clock are one clock in asyncio's default loop
                    when = loop.time() + (deadline - time.monotonic())
                    try:
                        async with asyncio.timeout_at(when):
                            await waiter
                    except TimeoutError:
                        return _EXPIRED
            finally:
                self._waiter = None
        message = self._arrived.pop(0)
        if isinstance(message, _Failed):
            raise message.error
        return message

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _ids(exchange: Exchange | None) -> dict[str, str]:
    if exchange is None:
        return {}
    return {"decision_id": exchange.decision_id, "request_id": exchange.shown_request_id}


def _decision(outcome: Outcome) -> dict[str, object]:
    """What the policy decided, for the exchange's log line: ``rule:action`` per finding and direction,
    and what policies in shadow mode would have done."""
    if outcome.policy is None:
        return {"refused": outcome.error_code} if outcome.error_code else {}

    def made(actions: Actions) -> dict[str, list[str]]:
        return {d: [f"{rule}:{action}" for rule, _, action in found] for d, found in actions.items()}

    return {
        "policy": outcome.policy,
        "enforce": outcome.enforce,
        "findings": made(outcome.actions),
        "refused": outcome.error_code if outcome.decision == "refused" else None,
        "would_refuse": list(outcome.would_refuse),
        "shadow": {
            policy: {"findings": made(shadowed.actions), "refused": list(shadowed.refused)}
            for policy, shadowed in outcome.shadow.items()
        },
    }


def _log_exchange(exchange: Exchange, outcome: Outcome) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    counts = {
        direction.value: dict(Counter(f.entity for f in findings))
        for direction, findings in exchange.findings.items()
        if findings
    }
    log.info(
        "exchange",
        extra={
            **_ids(exchange),
            "outcome": outcome.decision,
            "findings": counts,
            "passthrough": exchange.passthrough,
            "decision": _decision(outcome),
        },
    )


NO_IDENTITY = (
    "identity.mode is none: callers are not authenticated and every exchange gets the default policy"
)
"""Logged at start-up and shown by /readyz when the settings choose no identity (still ready)."""


APPROVERS_UNAUTHENTICATED = (
    "the approvers' API verifies approvers' tokens with identity.mode jwt only: with this mode it refuses "
    "every call"
)


def _bind(server: grpc.aio.Server, address: str, what: str) -> int:
    """Binds ``server`` to ``address`` (HOST:PORT, port 0 for any free one); returns the bound port.
    Raises OSError naming the address, as for every address the settings give."""
    try:
        port: int = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's own word for a failed bind
        raise OSError(f"cannot bind the {what} address {address} (in use, or not local)") from exc
    if port == 0:
        raise OSError(f"cannot bind the {what} address {address}")
    return port


class Server:
    """The ext_proc gRPC server, the approvers' gRPC API and the admin HTTP endpoints, with a graceful
    stop."""

    def __init__(
        self,
        settings: Settings,
        runtime: Runtime,
        instruments: Instruments | None = None,
        *,
        load_settings: Callable[[], Settings] | None = None,
        config_path: str | None = None,
        worker: int | None = None,
        admin_socket: str | None = None,
    ) -> None:
        """``instruments``: given by tests that read spans in memory; otherwise built from the telemetry
        settings (no-op ones when nothing is pushed or scraped). ``load_settings`` reads the settings
        again for a reload, as they were read for this start (file, environment, flags; the same
        ``settings`` when not given); ``config_path`` is the settings file, an input of the snapshot's
        version. Raises ConfigError when the settings choose no identity mode: a server authenticates
        callers, or is told in so many words not to.

        ``worker`` and ``admin_socket``: set in a worker process of ``extproc serve --workers N``
        (``extproc.supervisor``): the admin endpoints listen on that Unix socket, for the supervisor,
        which owns the admin address, and the line saying the server serves is ``worker_ready``."""
        require_identity_choice(settings)
        self._settings = settings
        self._worker = worker
        self._admin_socket = admin_socket
        # Several workers share the listen addresses; one server alone must hold them, so that a second
        # sidecar started on the same port is an error rather than half of the traffic.
        self._reuseport = 1 if settings.server.workers > 1 else 0
        self._runtime = runtime

        self._watcher: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[dict[str, Any]]] = set()
        self._telemetry: Telemetry | None = None
        if instruments is None:
            self._telemetry = Telemetry(settings.telemetry)
            instruments = self._telemetry.instruments
        self._instruments = instruments
        self.reloader = Reloader(
            runtime,
            load_settings or (lambda: settings),
            config_path,
            on_result=lambda result: instruments.reloads.add(1, {"result": result}),
        )
        # One approval service per server: the exchange, the approvers' API, the page and every listener
        # (record, logs, notifications) share it, so a step taken through one is seen by all.
        self.approvals = ApprovalService(
            open_store(settings.approvals), [log_approval], public_url=settings.approvals.public_url
        )
        self.notifier: Notifier | None = None
        if settings.approvals.webhook.url:
            self.notifier = Notifier(settings.approvals.webhook, self.approvals.approve_url)
            self.approvals.listeners.append(self.notifier.listener)
        self.recorder: SessionRecorder | None = None
        self._health = health.aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None
        self._serving = False
        self._admin_runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._approvals_grpc: grpc.aio.Server | None = None
        self._approvals_api: ApprovalsApi | None = None
        self.grpc_port = 0
        self.admin_port = 0
        self.approvals_port = 0  # the approvers' API, once started; 0 while not served

    async def start(self) -> None:
        # Every JWKS loaded before the first stream, refreshed from now on; a reload starts its own.
        await self._runtime.snapshot.start()
        if self._settings.audit.record_path:
            self.recorder = SessionRecorder(self._settings.audit, self._instruments)
            await asyncio.to_thread(self.recorder.start)
            self.approvals.listeners.append(self.recorder.approval)
        if self.notifier is not None:
            self.notifier.start()  # before the first stream: an approval asked for is announced at once
        if self.recorder is not None or self._instruments.enabled:
            # The record writer's thread seals and serialises records, the span exporter's encodes spans.
            # Python hands the GIL from a busy thread to a waiting one only every switch interval (5 ms
            # by default), so that work could stall the event loop up to 5 ms at a time; a shorter
            # interval bounds the stall.
            sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        # grpc.aio binds its server to the running event loop: create it here, not in __init__.
        limit = self._settings.server.max_message_bytes
        self._grpc = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", self._reuseport),
            ]
        )
        processor = ExternalProcessor(self._runtime, self._instruments, self.recorder, self.approvals)
        envoy.add_servicer(processor, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        host = self._settings.server.grpc_address.rpartition(":")[0]
        self.grpc_port = _bind(self._grpc, self._settings.server.grpc_address, "gRPC")
        await self._grpc.start()
        approvals = await self._start_approvals_api()
        self.admin_port = await self._start_admin()
        self._sweeper = asyncio.create_task(self._sweep(), name="extproc-approval-sweep")
        if self._settings.server.reload_watch_seconds > 0:
            watching = self.reloader.watch(self._settings.server.reload_watch_seconds)
            self._watcher = asyncio.create_task(watching, name="extproc-reload-watch")
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        if self._settings.identity.mode == "none":
            log.warning("identity_none", extra={"detail": NO_IDENTITY})
        if approvals and self._settings.identity.mode != "jwt":
            log.warning("approvals_api_unauthenticated", extra={"detail": APPROVERS_UNAUTHENTICATED})
        ports: dict[str, object] = {"grpc": f"{host}:{self.grpc_port}"}
        if self._admin_socket is None:
            ports["admin"] = f"{self._admin_host()}:{self.admin_port}"
        else:
            ports["admin"] = self._admin_socket
            ports["worker"] = self._worker
        if approvals:
            ports["approvals"] = approvals
        log.info("ready" if self._worker is None else "worker_serving", extra=ports)

    async def _start_approvals_api(self) -> str:
        """The approvers' API on its own gRPC server, apart from the ext_proc one: it is reached by
        people's tools, may listen on another interface than the one Envoy uses, and must keep serving
        while ext_proc streams drain (a held request waits for an approver's vote). Returns HOST:PORT, or
        an empty string when ``approvals.api_address`` is empty."""
        address = self._settings.approvals.api_address
        if not address:
            return ""
        self._approvals_grpc = grpc.aio.server(options=[("grpc.so_reuseport", self._reuseport)])
        self._approvals_api = add_approvals_api(
            self._approvals_grpc, self.approvals, lambda: self._runtime.snapshot.verifier
        )
        self.approvals_port = _bind(self._approvals_grpc, address, "approvals API")
        await self._approvals_grpc.start()
        return f"{address.rpartition(':')[0]}:{self.approvals_port}"

    async def _sweep(self) -> None:
        """Marks approvals nobody decided in time as expired, so that the record says so even when no
        caller comes back for them."""
        while True:
            await asyncio.sleep(self._settings.approvals.sweep_seconds)
            try:
                await self.approvals.sweep()
            except Exception:  # the store may be down for a while: try again next time
                log.warning("approval_sweep_failed", exc_info=True)

    def _admin_host(self) -> str:
        return self._settings.server.admin_address.rpartition(":")[0]

    async def _start_admin(self) -> int:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/snapshot", self._snapshot_status)
        app.router.add_post("/reload", self._reload)
        add_approval_routes(app, self.approvals, lambda: self._runtime.snapshot.verifier)
        if self._telemetry is not None:
            self._telemetry.add_routes(app)  # GET /metrics, unless telemetry.prometheus is false
        self._admin_runner = web.AppRunner(app, access_log=None)
        await self._admin_runner.setup()
        if self._admin_socket is not None:
            await web.UnixSite(self._admin_runner, self._admin_socket).start()
            return 0
        port = int(self._settings.server.admin_address.rpartition(":")[2])
        site = web.TCPSite(self._admin_runner, self._admin_host(), port)
        await site.start()
        return int(self._admin_runner.addresses[0][1])

    def _sighup(self) -> None:
        log.info("signal_received", extra={"signal": "SIGHUP", "detail": "reloading"})
        task = asyncio.get_running_loop().create_task(self.reloader.reload("SIGHUP"))
        self._reloads.add(task)  # kept until done: a task nobody holds may be collected mid-reload
        task.add_done_callback(self._reloads.discard)

    async def _snapshot_status(self, _request: web.Request) -> web.Response:
        """The active snapshot (version, when loaded, rule and policy ids and counts; never a pattern or a
        key) and the last refused reload, until one succeeds."""
        return web.json_response(self.reloader.status())

    async def _reload(self, request: web.Request) -> web.Response:
        """Reloads now (``extproc reload``). Only from this host: the admin port may be reachable by the
        cluster's probes and scrapers, which must not be able to make the sidecar reload. A worker's
        admin socket is reached by its supervisor only (a folder only the sidecar's user opens), which
        checked the caller itself."""
        if self._admin_socket is None and request.remote not in LOOPBACK:
            return web.json_response(
                {"error": "reload_not_allowed", "message": "POST /reload is accepted from loopback only"},
                status=403,
            )
        result = await self.reloader.reload("admin")
        return web.json_response(result, status=200 if result["result"] != "refused" else 422)

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        verifier = self._runtime.snapshot.verifier
        if verifier is not None and not verifier.keys_loaded:
            return web.json_response({"status": "no_keys"}, status=503)
        if self.recorder is not None and not self.recorder.serving:
            return web.json_response({"status": "audit_unavailable"}, status=503)
        if self._serving:
            body = {"status": "serving", "identity": self._settings.identity.mode}
            if self._settings.identity.mode == "none":
                body["warning"] = NO_IDENTITY
            return web.json_response(body)
        return web.json_response({"status": "not_serving"}, status=503)

    async def stop(self, *, drain: bool = True) -> None:
        """NOT_SERVING first, so Envoy and Kubernetes stop sending new streams; then drain, then stop
        with grace for the streams still open. Safe on a server whose start failed part way (``drain``
        False): whatever did start is closed, and the session record still gets its final checkpoint."""
        server = self._settings.server
        self._serving = False
        await self._health.enter_graceful_shutdown()
        if drain:
            log.info("draining", extra={"drain_seconds": server.drain_seconds})
            await asyncio.sleep(server.drain_seconds)
        if self._grpc is not None:
            await self._grpc.stop(server.grace_seconds if drain else 0)
        # Approvers could still decide while the streams above drained; now their watches end (they never
        # end by themselves) and their calls get the same grace.
        if self._approvals_api is not None:
            self._approvals_api.close()
        if self._approvals_grpc is not None:
            await self._approvals_grpc.stop(server.grace_seconds if drain else 0)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.notifier is not None:
            await self.notifier.stop()  # the approvals asked for until now are announced if they can be
        await self.approvals.store.close()  # last: every interface that used it has stopped
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._runtime.snapshot.close()
        # Every exchange has finished: its record and its spans go out before the process ends.
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.close)
        if self._telemetry is not None:
            await asyncio.to_thread(self._telemetry.shutdown)
        log.info("stopped")

    async def run_until_signal(self, lifeline: int | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully. SIGHUP reloads rules, policies and settings
        (``Reloader``), as a process manager's reload signal means. ``lifeline``: the read end of a pipe
        whose write end the supervisor holds (a worker); its end, the supervisor gone, stops the server
        as SIGTERM does.

        Raises what made start-up or serving fail, after closing what had started: the session record then
        still ends with its final checkpoint."""
        # Handlers first: once the readiness line is out, a SIGTERM must already mean a graceful stop.
        stop = asyncio.Event()
        received: list[str] = []
        loop = asyncio.get_running_loop()

        def stopping(sig: signal.Signals) -> None:
            if received:
                log.info("signal_received", extra={"signal": sig.name, "detail": "already stopping"})
                return
            received.append(sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping, sig)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

        def orphaned() -> None:
            assert lifeline is not None
            loop.remove_reader(lifeline)
            log.error("supervisor_gone", extra={"detail": "stopping as on SIGTERM"})
            if not received:
                received.append("supervisor_gone")
                stop.set()

        if lifeline is not None:
            loop.add_reader(lifeline, orphaned)  # readable only at its end: nothing is ever written
        try:
            await self.start()
            await stop.wait()
        except BaseException:
            # Start-up or the serving loop failed (or was cancelled): close what started, then let the
            # caller log why. A failure while closing must not hide the first one.
            try:
                await self.stop(drain=False)
            except Exception:
                log.exception("stop_failed")
            raise
        if received[0] != "supervisor_gone":
            log.info("signal_received", extra={"signal": received[0]})
        await self.stop()


def log_approval(event: Event) -> None:
    """Every approval step as one log line: ids, people and codes, never the prompt."""
    approval = event.approval
    extra: dict[str, Any] = {
        "approval_id": approval.id,
        "event": event.kind,
        "status": approval.status,
        "policy": approval.request.policy_id,
        "decision_id": approval.request.decision_id,
        "requester": approval.request.requester.subject,
    }
    if event.actor is not None:
        extra["actor"] = event.actor.subject
    if event.detail.get("reason"):
        extra["reason"] = event.detail["reason"]
    log.info("approval", extra=extra)


def sighup_before_serving() -> None:
    """SIGHUP while the rules compile at start: nothing to reload yet (what is being loaded is read
    now), and the default action would end the process."""
    log.info("signal_received", extra={"signal": "SIGHUP", "detail": "starting: the files are being read"})
