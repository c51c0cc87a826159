"""The snapshot an exchange runs against: settings plus everything compiled from them.

A snapshot is immutable: each exchange keeps the snapshot it started with."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from extproc.credential import Credential
from extproc.detect.engine import DetectorError
from extproc.detect.rules import RuleError, RuleSet, load_rules
from extproc.errors import ConfigError
from extproc.identity import Verifier
from extproc.mask import Inspector
from extproc.policy import KnownNames, PolicyError, PolicySet, load_policies
from extproc.settings import Settings

log = logging.getLogger("extproc.runtime")
MIN_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class Snapshot:
    settings: Settings
    inspector: Inspector
    policies: PolicySet
    rule_info: dict[str, tuple[str, str]]  # rule id -> (category, severity), for policy selectors
    credential: Credential  # the model server's own; set upstream when configured
    verifier: Verifier | None = None  # identity mode jwt: started and closed with the snapshot
    subject_key: bytes = b""  # keys the subject hash on spans (derived from the hash key)
    version: str = ""  # the fingerprint of its inputs (fingerprint()): spans and records name it
    loaded_at: float = field(default_factory=time.time)

    async def start(self) -> None:
        """Starts what the snapshot owns: the verifier loads every JWKS (and refreshes them from now)."""
        if self.verifier is not None:
            await self.verifier.start()

    async def close(self) -> None:
        """Stops what ``start`` started. Exchanges still running on this snapshot keep working with what
        was loaded."""
        if self.verifier is not None:
            await self.verifier.close()

    def subject_hash(self, issuer: str, subject: str) -> str:
        """A short keyed hash of a caller: the same caller gives the same value while the key stays,
        and the value does not reveal who it is."""
        message = issuer.encode() + b"\0" + subject.encode()
        return hmac.new(self.subject_key, message, hashlib.sha256).hexdigest()[:16]


def read_key(path: str, purpose: str) -> bytes:
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {purpose} key: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{path}: the {purpose} key must be at least {MIN_KEY_BYTES} bytes")
    return key


def build_snapshot(settings: Settings, version: str | None = None) -> Snapshot:
    """Load and compile everything the settings name. Raises ConfigError with every problem found.
    ``version``: the fingerprint of the inputs, taken before they were read (computed here without the
    settings file when not given)."""
    version = version if version is not None else fingerprint(settings)
    ruleset, inspector, hash_key = _detection(settings)
    snapshot = replace(_snapshot(settings, ruleset, inspector, hash_key), version=version)
    release_freed_memory()
    return snapshot


def release_freed_memory() -> None:
    """Hands back to the system the memory compiling the rules used and freed. glibc keeps freed heap
    memory for reuse and trims it only once the top of the heap is free, which the objects a server
    keeps there may postpone for good: measured, the default rules left 25 MiB of resident memory
    behind, given back only at some later free, under load. Nothing to do with another C library."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def build_inspector(settings: Settings) -> Inspector:
    """The rules the settings name, compiled, masking with their own strategies: what ``extproc scan``
    needs, without the policies (which may name the entities of another pack). Raises ConfigError."""
    return _detection(settings)[1]


def _detection(settings: Settings) -> tuple[RuleSet, Inspector, bytes]:
    detect = settings.detect
    try:
        ruleset = load_rules(detect.rules, detect.max_match_chars)
    except RuleError as exc:
        raise ConfigError("invalid rules:\n" + "\n".join(exc.problems)) from exc
    edm_key = read_key(detect.edm_key_file, "exact-match") if detect.edm_key_file else None
    if settings.mask.hash_key_file:
        hash_key = read_key(settings.mask.hash_key_file, "hash")
    else:
        hash_key = secrets.token_bytes(32)
        if any(r.rule.mask.strategy == "hash" for r in ruleset.rules):
            log.warning(
                "hash_key_missing",
                extra={"detail": "mask.hash_key_file is not set: hash tokens change on every restart"},
            )
    try:
        cache_dir = Path(detect.cache_dir) if detect.cache_dir else None
        inspector = Inspector.build(ruleset, hash_key=hash_key, edm_key=edm_key, cache_dir=cache_dir)
    except DetectorError as exc:
        raise ConfigError("invalid rules:\n" + "\n".join(exc.problems)) from exc
    return ruleset, inspector, hash_key


def _snapshot(settings: Settings, ruleset: RuleSet, inspector: Inspector, hash_key: bytes) -> Snapshot:
    try:
        known = KnownNames(
            frozenset(r.id for r in ruleset.rules), frozenset(r.rule.entity for r in ruleset.rules)
        )
        policies = load_policies(settings.policy.paths, known)
    except PolicyError as exc:
        raise ConfigError("invalid policies:\n" + "\n".join(exc.problems)) from exc
    for warning in policies.warnings:
        log.warning("policy_warning", extra={"detail": warning})
    rule_info: dict[str, tuple[str, str]] = {
        r.id: (r.rule.category, r.rule.severity) for r in inspector.detector.rules
    }
    credential = Credential(settings.upstream)
    verifier = Verifier(settings.identity) if settings.identity.mode == "jwt" else None
    return Snapshot(
        settings=settings,
        inspector=inspector,
        policies=policies,
        rule_info=rule_info,
        subject_key=hmac.new(hash_key, b"extproc subject hash", hashlib.sha256).digest(),
        credential=credential,
        verifier=verifier,
    )


def inputs(settings: Settings, config_path: str | None = None) -> list[Path]:
    """Every file a snapshot of ``settings`` is built from: the settings file, every file under the rule
    and policy folders (exact-match lists sit beside their rules), the JWKS files and the keys. Names
    starting with ``..`` (a ConfigMap's ``..data`` and its timestamped folders) are skipped: the files are
    read through the names mounted beside them."""
    found: list[Path] = []
    if config_path:
        found.append(Path(config_path))
    for raw in (*settings.detect.rules, *settings.policy.paths):
        path = Path(raw)
        if path.is_dir():
            found.extend(_files_under(path))
        else:
            found.append(path)
    for issuer in settings.identity.issuers:
        if issuer.jwks_file:
            found.append(Path(issuer.jwks_file))
    for key in (settings.detect.edm_key_file, settings.mask.hash_key_file):
        if key:
            found.append(Path(key))
    return list(dict.fromkeys(found))


def _files_under(folder: Path) -> Iterable[Path]:
    for root, folders, files in os.walk(folder, followlinks=False):
        folders[:] = sorted(name for name in folders if not name.startswith(".."))
        for name in sorted(files):
            if not name.startswith(".."):
                yield Path(root) / name
        # a symlinked folder (os.walk lists it among the folders, and does not follow it) is read too
        for name in list(folders):
            linked = Path(root) / name
            if linked.is_symlink():
                folders.remove(name)
                yield from _files_under(linked.resolve())


def fingerprint(settings: Settings, config_path: str | None = None) -> str:
    """The version of the inputs: a hash of every input's name and content (a missing or unreadable file
    counts as such), 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(inputs(settings, config_path)):
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            digest.update(f"unreadable:{exc.errno}".encode())
    return digest.hexdigest()[:16]


class Runtime:
    """Holds the current snapshot; each exchange reads it once, when its stream opens."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def swap(self, snapshot: Snapshot) -> Snapshot:
        """Makes ``snapshot`` the one new exchanges read; returns the one it replaces (exchanges under way
        keep it until they end). One assignment: an exchange sees the old or the new, never a mix."""
        old, self._snapshot = self._snapshot, snapshot
        return old
