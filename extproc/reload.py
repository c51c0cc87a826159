"""Hot reload: rules, policies, keys and the settings that may change while serving, swapped in without
a dropped request.

A reload reads the settings again (the same file, environment and flags as at start), compiles a new
snapshot off the event loop, starts what it owns (the token verifier's key refreshes) and swaps it in
(``Runtime.swap``). An exchange keeps the snapshot it started with, so one in flight finishes as it
began. The old snapshot is closed once swapped out.

A reload is asked for by SIGHUP, by ``POST /reload`` on the admin port (loopback only), by ``extproc
reload``, and by the files themselves: every ``watch_seconds`` the inputs' fingerprint (the content of
the settings file, every rule and policy file, the JWKS files and keys) is compared with the active
snapshot's version, which is that fingerprint; a change is loaded once it has held still for one
interval, so a file caught half-written is not. A Kubernetes ConfigMap update (a swapped ``..data``
symlink) changes the content read through the mounted names, so it is seen like any edit.

A change that does not load (a bad rule, a bad policy, a pack that does not compile, a JWKS that does
not read) is refused: the old snapshot keeps serving, the problems are logged with their file and line,
counted, and shown on ``GET /snapshot`` until a later reload succeeds. Settings read once at start
(``RESTART_ONLY``: listen addresses, logging, telemetry, the session record, approvals) keep their
running values; a change to them is logged as needing a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from extproc.errors import ConfigError
from extproc.runtime import Runtime, Snapshot, build_snapshot, fingerprint
from extproc.settings import Settings

log = logging.getLogger("extproc.reload")

RESTART_ONLY: Final = ("server", "log", "telemetry", "audit", "approvals")
"""Settings sections the server reads once, when it starts."""


@dataclass
class ReloadState:
    """What ``GET /snapshot`` shows besides the active snapshot: the last refusal, until a reload
    succeeds, and the counts."""

    reloads: int = 0
    refused: int = 0
    last_error: dict[str, Any] | None = None
    restart_required: list[str] = field(default_factory=list)


class Reloader:
    """Builds and swaps snapshots; one reload at a time."""

    def __init__(
        self,
        runtime: Runtime,
        load: Callable[[], Settings],
        config_path: str | None = None,
        *,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        """``load`` reads the settings as the server did at start; ``on_result`` is told ``ok`` or
        ``refused`` after each reload (the metrics)."""
        self._runtime = runtime
        self._load = load
        self._config_path = config_path
        self._lock = asyncio.Lock()
        self._on_result = on_result
        self.state = ReloadState()
        self._refused_version: str | None = None  # a broken change is tried once, not every poll
        self._seen_version: str | None = None  # the fingerprint at the watch's previous look

    async def reload(self, reason: str) -> dict[str, Any]:
        """Reloads now. Returns what ``POST /reload`` answers: ``{"result": "ok" | "unchanged" |
        "refused", ...}``; never raises for a bad change."""
        async with self._lock:
            old = self._runtime.snapshot
            version: str | None = None
            try:
                settings = await asyncio.to_thread(self._load)
                version = await asyncio.to_thread(fingerprint, settings, self._config_path)
                if version == old.version and reason == "files changed":
                    return {"result": "unchanged", "version": version}
                settings, restart = _keep_restart_only(old.settings, settings)
                snapshot = await asyncio.to_thread(build_snapshot, settings, version)
                await snapshot.start()
            except ConfigError as exc:
                return self._refuse(reason, str(exc), version)
            except Exception as exc:  # a JWKS that does not load, a file that vanished mid-read
                log.exception("reload_failed", extra={"reason": reason})
                return self._refuse(reason, f"{type(exc).__name__}: {exc}", version)
            self._runtime.swap(snapshot)
            try:
                await old.close()
            except Exception:  # the old snapshot is out of service whatever its close says
                log.warning("snapshot_close_failed", exc_info=True)
            self.state.reloads += 1
            self.state.last_error = None
            self.state.restart_required = restart
            self._refused_version = None
            if restart:
                log.warning(
                    "restart_required",
                    extra={
                        "settings": restart,
                        "detail": "these settings are read at start only: the running values stay until "
                        "a restart",
                    },
                )
            log.info(
                "reloaded",
                extra={
                    "reason": reason,
                    "version": snapshot.version,
                    "previous": old.version,
                    "rules": len(snapshot.inspector.detector.rules),
                    "policies": 1 + len(snapshot.policies.ordered),
                },
            )
            if self._on_result is not None:
                self._on_result("ok")
            return {"result": "ok", "version": snapshot.version, "previous": old.version}

    def _refuse(self, reason: str, error: str, version: str | None) -> dict[str, Any]:
        problems = [line for line in error.splitlines() if line.strip()]
        self.state.refused += 1
        self.state.last_error = {"time": time.time(), "reason": reason, "problems": problems}
        self._refused_version = version
        log.error(
            "reload_refused",
            extra={
                "reason": reason,
                "problems": problems,
                "detail": f"the active snapshot {self._runtime.snapshot.version} keeps serving",
            },
        )
        if self._on_result is not None:
            self._on_result("refused")
        return {"result": "refused", "version": self._runtime.snapshot.version, "problems": problems}

    async def watch(self, seconds: float) -> None:
        """Calls ``check`` every ``seconds`` until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            await self.check()

    async def check(self) -> None:
        """One look at the files. Reloads when the inputs' fingerprint differs from the active
        snapshot's version (and from a change already refused) and is the same as at the look before:
        a file caught half-written by an in-place edit (a valid but shorter rule file is still valid)
        changes again by the next look, so only content that has held still for a whole interval is
        loaded."""
        try:
            settings = await asyncio.to_thread(self._load)
            version = await asyncio.to_thread(fingerprint, settings, self._config_path)
        except ConfigError as exc:  # the settings file itself is broken: refuse it once
            self._seen_version = None
            if self.state.last_error is None or self.state.last_error.get("problems") != [str(exc)]:
                self._refuse("files changed", str(exc), None)
            return
        except Exception:
            log.warning("reload_watch_failed", exc_info=True)
            return
        settled = version == self._seen_version
        self._seen_version = version
        if settled and version not in (self._runtime.snapshot.version, self._refused_version):
            await self.reload("files changed")

    def status(self) -> dict[str, Any]:
        """The active snapshot as ``GET /snapshot`` shows it: ids and counts, never patterns or keys."""
        snapshot = self._runtime.snapshot
        return {
            **describe_snapshot(snapshot),
            "reloads": self.state.reloads,
            "refused": self.state.refused,
            "last_error": self.state.last_error,
            "restart_required": self.state.restart_required,
        }


def describe_snapshot(snapshot: Snapshot) -> dict[str, Any]:
    rules = [r.id for r in snapshot.inspector.detector.rules]
    policies = [snapshot.policies.default.id, *(p.id for p in snapshot.policies.ordered)]
    return {
        "version": snapshot.version,
        "loaded_at": snapshot.loaded_at,
        "rules": {"count": len(rules), "ids": rules},
        "policies": {"count": len(policies), "ids": policies},
    }


def _keep_restart_only(running: Settings, loaded: Settings) -> tuple[Settings, list[str]]:
    """``loaded`` with the running values of the sections read at start only, and the names of those
    that changed."""
    changed = [name for name in RESTART_ONLY if getattr(running, name) != getattr(loaded, name)]
    if not changed:
        return loaded, []
    return loaded.model_copy(update={name: getattr(running, name) for name in changed}), changed
