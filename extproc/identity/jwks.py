"""Where an issuer's JWKS comes from (a file or a URL) and the issuer's current keys.

All of this runs in the background, never on the request path: a file is stat-ed and read in a worker
thread, a URL is fetched with aiohttp under a time limit. A refresh that fails keeps the keys already
loaded (an identity provider that is briefly down must not lock every caller out) and says so in the log
and in the issuer's status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from extproc.identity.keys import MAX_JWKS_BYTES, JwksError, KeySet, parse_jwks
from extproc.settings import IssuerSettings

log = logging.getLogger(__name__)


class JwksSource(Protocol):
    """Fetches a JWKS document; ``None`` means unchanged since the last fetch that returned bytes."""

    description: str

    async def fetch(self) -> bytes | None: ...

    async def close(self) -> None: ...


class FileSource:
    """A JWKS file, re-read only when its mtime, size or inode changes (a Kubernetes ConfigMap or Secret
    update swaps a symlink: the inode changes even when the mtime would not)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.description = f"jwks_file {path}"
        self._seen: tuple[int, int, int] | None = None

    async def fetch(self) -> bytes | None:
        try:
            return await asyncio.to_thread(self._read_if_changed)
        except OSError as exc:
            raise JwksError(f"{self.description}: cannot read: {exc.strerror or exc}") from exc

    def _read_if_changed(self) -> bytes | None:
        stat = os.stat(self.path)
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen == self._seen:
            return None
        if stat.st_size > MAX_JWKS_BYTES:
            raise JwksError(f"{self.description}: larger than {MAX_JWKS_BYTES} bytes")
        with open(self.path, "rb") as handle:
            data = handle.read(MAX_JWKS_BYTES + 1)
        self._seen = seen
        return data

    async def close(self) -> None:
        return None


class UrlSource:
    """A JWKS URL. Redirects are refused (an https URL must not be turned into another location by the
    answer), the body is bounded, and an ETag makes an unchanged JWKS a cheap 304."""

    def __init__(self, url: str, timeout_seconds: float) -> None:
        self.url = url
        self.description = f"jwks_url {url}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._etag: str | None = None

    async def fetch(self) -> bytes | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Accept": "application/jwk-set+json, application/json"}
        if self._etag:
            headers["If-None-Match"] = self._etag
        try:
            async with self._session.get(self.url, headers=headers, allow_redirects=False) as answer:
                if answer.status == 304 and self._etag:
                    return None
                if answer.status != 200:
                    raise JwksError(f"{self.description}: HTTP {answer.status}")
                body = bytearray()
                async for chunk in answer.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"{self.description}: larger than {MAX_JWKS_BYTES} bytes")
                self._etag = answer.headers.get("ETag")
                return bytes(body)
        except TimeoutError as exc:
            raise JwksError(f"{self.description}: no answer within {self._timeout.total} s") from exc
        except aiohttp.ClientError as exc:
            raise JwksError(f"{self.description}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def source_for(settings: IssuerSettings, timeout_seconds: float) -> JwksSource:
    if settings.jwks_url is not None:
        return UrlSource(settings.jwks_url, timeout_seconds)
    if settings.jwks_file is not None:
        return FileSource(settings.jwks_file)
    raise ValueError(f"issuer {settings.issuer}: neither jwks_file nor jwks_url is set")


@dataclass(frozen=True, slots=True)
class IssuerStatus:
    """What readiness and operators need to know of one issuer's keys."""

    issuer: str
    source: str
    keys: int
    kids: tuple[str, ...]
    fetches: int
    loaded_at: float | None
    checked_at: float | None
    last_error: str | None


class IssuerKeys:
    """One issuer's current KeySet, replaced whole by ``refresh`` (so a reader never sees half a set)."""

    def __init__(
        self, settings: IssuerSettings, source: JwksSource, on_change: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.source = source
        self.keys: KeySet | None = None
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._loaded_at: float | None = None
        self._checked_at: float | None = None
        self._last_error: str | None = None
        self.fetches = 0

    async def load(self) -> None:
        """The first load: errors propagate (a JWKS that cannot be read at start-up is a start-up error)."""
        async with self._lock:
            data = await self._fetch()
            if data is None:  # a source returns bytes on its first fetch; never None here
                raise JwksError(f"{self.source.description}: nothing to load")
            self._install(parse_jwks(data, self.settings.algorithms, where=self.source.description))

    async def refresh(self, reason: str) -> bool:
        """Fetch again; True when the keys changed. Failures are logged and keep the current keys."""
        async with self._lock:
            try:
                data = await self._fetch()
                if data is None:
                    log.debug("jwks_unchanged", extra={"issuer": self.settings.issuer, "reason": reason})
                    return False
                keys = parse_jwks(data, self.settings.algorithms, where=self.source.description)
            except JwksError as exc:
                self._last_error = str(exc)
                log.warning(
                    "jwks_refresh_failed",
                    extra={
                        "issuer": self.settings.issuer,
                        "reason": reason,
                        "error": str(exc),
                        "keys_kept": self.keys is not None,
                    },
                )
                return False
            if self.keys is not None and keys.fingerprint == self.keys.fingerprint:
                return False
            self._install(keys)
            return True

    async def _fetch(self) -> bytes | None:
        self.fetches += 1
        data = await self.source.fetch()
        self._checked_at = time.time()
        return data

    def _install(self, keys: KeySet) -> None:
        self.keys = keys
        self._loaded_at = time.time()
        self._last_error = None
        log.info(
            "jwks_loaded",
            extra={
                "issuer": self.settings.issuer,
                "source": self.source.description,
                "kids": sorted(key.kid for key in keys.keys if key.kid is not None),
            },
        )
        if self._on_change is not None:
            self._on_change()

    @property
    def status(self) -> IssuerStatus:
        keys = self.keys.keys if self.keys is not None else ()
        return IssuerStatus(
            issuer=self.settings.issuer,
            source=self.source.description,
            keys=len(keys),
            kids=tuple(sorted(key.kid for key in keys if key.kid is not None)),
            fetches=self.fetches,
            loaded_at=self._loaded_at,
            checked_at=self._checked_at,
            last_error=self._last_error,
        )
