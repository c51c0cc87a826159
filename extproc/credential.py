"""The model server's own credential, set on every upstream request so callers never hold it.

It comes from a file (mounted from a Kubernetes Secret) or an environment variable. A file is checked
on use (one ``stat``, no read unless it changed), so a rotated Secret takes effect on the next request
without a restart. A file that cannot be read after a rotation keeps the last good value and logs the
problem once per change; with no good value ever read, requests fail closed.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from extproc.errors import ConfigError, ExtProcError
from extproc.settings import UpstreamSettings

log = logging.getLogger("extproc.credential")


class CredentialUnavailable(ExtProcError):
    code = "upstream_credential_unavailable"


class Credential:
    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._path = Path(settings.credential_file) if settings.credential_file else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._value: str | None = None
        if settings.credential_env is not None:
            value = os.environ.get(settings.credential_env, "").strip()
            if not value:
                raise ConfigError(f"upstream.credential_env: ${settings.credential_env} is unset or empty")
            self._value = value
        elif self._path is not None:
            self._reload(strict=True)

    @property
    def configured(self) -> bool:
        return self._value is not None or self._path is not None

    def header(self) -> tuple[str, str]:
        """The header to set upstream, e.g. ``("authorization", "Bearer ...")``."""
        if self._path is not None:
            self._reload(strict=False)
        if self._value is None:
            raise CredentialUnavailable("the model server's credential cannot be read")
        scheme = self._settings.scheme
        return self._settings.header, f"{scheme} {self._value}" if scheme else self._value

    @property
    def strip(self) -> tuple[str, ...]:
        """The caller's credential headers, removed upstream (the one set is replaced anyway)."""
        return tuple(h for h in self._settings.strip_headers if h != self._settings.header)

    def _reload(self, *, strict: bool) -> None:
        assert self._path is not None
        try:
            status = self._path.stat()
        except OSError as exc:
            self._problem(f"{self._path}: cannot read the upstream credential: {exc.strerror}", strict)
            return
        stamp = (status.st_mtime_ns, status.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                value = self._path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                self._problem(f"{self._path}: cannot read the upstream credential: {exc}", strict)
                return
            if not value:
                self._problem(f"{self._path}: the upstream credential file is empty", strict)
                return
            changed = self._value is not None and value != self._value
            self._value = value
            if changed:
                log.info("upstream_credential_rotated", extra={"file": str(self._path)})

    def _problem(self, message: str, strict: bool) -> None:
        if strict:
            raise ConfigError(message)
        log.error(
            "upstream_credential_unreadable",
            extra={"detail": message, "kept_previous": self._value is not None},
        )
