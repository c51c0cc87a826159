"""The session record's format: sealed bodies, the hash chain, signed checkpoints, and their checks.

A record file is JSON Lines, one canonical JSON object per line. Every record carries ``seq`` (contiguous
from 0), ``prev`` (the previous record's ``hash``) and ``hash`` (sha256 of the record's canonical form
without ``hash``), so an edited, deleted, inserted or moved record breaks the chain. A checkpoint record
signs its own ``seq`` and ``prev``: since ``prev`` commits everything before it, one signature covers the
whole file up to the checkpoint, and rewriting the chain after an edit needs the signing key.

A checkpoint vouches only for the records of its own run: those from the latest ``start`` record before it
up to it. Between runs nobody holding the key watches the file, so records found after a run's last
checkpoint may have been appended by anyone able to write the file; the next writer's checkpoints must not
lend them its signature, and ``verify`` reports them as protected by the chain only. The checkpoint a
writer writes when it closes is ``final`` (the signature covers that too): nothing but a new ``start`` may
follow it.

What the chain alone cannot show is a file cut back to a checkpoint, or records after the last checkpoint
rewritten with the chain recomputed. The writer logs every checkpoint's ``seq`` and ``hash`` (and, when it
continues a file, the last record it found): ``verify`` checks such pairs as ``anchors``, and reports the
records after the last valid checkpoint as its ``unsigned_tail``.

Canonical JSON escapes everything outside ASCII, so any Python string, even one holding a lone surrogate
from a header decoded with ``surrogateescape``, has a byte form: no record is lost to its encoding.

This module does no threading; only ``read_tail``, ``verify``, ``iter_records`` and ``find`` read files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from extproc.audit.keys import key_id

ZERO_HASH: Final = "0" * 64
"""The ``prev`` of the first record."""

SEAL_ALG: Final = "hpke-x25519-sha256-chacha20poly1305"
_SEAL_INFO: Final = b"extproc-audit-v1:"
_SUITE: Final = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)

ACK_TYPES: Final = frozenset({"start", "gap"})
"""Record types that may acknowledge a torn write (their ``torn`` field names it)."""

_CHAIN_FIELDS: Final = frozenset({"seq", "prev", "hash"})
_CHECKPOINT_FIELDS: Final = frozenset({"type", "time", "kid", "signed", "signature", "final"}) | _CHAIN_FIELDS
_SIGNED_FIELDS: Final = frozenset({"seq", "prev"})
_UNAUTHENTICATING: Final = frozenset({"start", "gap"})
"""Record types a writer writes on its own (at start, after a loss): a file of only these claims nothing,
so it needs no checkpoint."""
_TAIL_BLOCK: Final = 64 * 1024
_COUNT_BLOCK: Final = 1024 * 1024


class SealError(Exception):
    """A sealed body cannot be opened: another key, another record, or altered bytes."""


class OtherKeyError(SealError):
    """A sealed body was sealed to another auditor key than the one given (nothing is wrong with it)."""


class RecordError(ValueError):
    """A record file cannot be read, or holds a line that is not a JSON object."""


def canonical(obj: object) -> bytes:
    """The one byte form of a JSON value that hashes and signatures are computed over.

    ASCII only (``\\uXXXX`` escapes): every str encodes, lone surrogates included, and the bytes do not
    depend on an encoder's choice of UTF-8 form. NaN and infinities are refused: they are not JSON, and
    other verifiers could not parse them."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash a record must carry: sha256 of its canonical form without the ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def checkpoint_message(seq: int, prev: str, kid: str, time: str, final: bool = False) -> bytes:
    """What a checkpoint's signature covers.

    ``final`` is in the message only when true, so that checkpoints written before it existed keep their
    meaning (not final) and their signatures; a final flag added or removed without the key then fails."""
    message: dict[str, Any] = {"seq": seq, "prev": prev, "kid": kid, "time": time}
    if final:
        message["final"] = True
    return canonical(message)


# -- sealing ------------------------------------------------------------------------------------------


def seal(plaintext: bytes, public_key: x25519.X25519PublicKey, record_id: str) -> dict[str, str]:
    """Encrypt ``plaintext`` to the auditor's key, bound to ``record_id``.

    The record id is the HPKE ``info``: a sealed body copied into another record does not open there."""
    ct = _SUITE.encrypt(plaintext, public_key, info=_SEAL_INFO + record_id.encode())
    return {"alg": SEAL_ALG, "kid": key_id(public_key), "ct": base64.b64encode(ct).decode("ascii")}


def open_sealed(sealed: Mapping[str, Any], private_key: x25519.X25519PrivateKey, record_id: str) -> bytes:
    """The plaintext of a body sealed by ``seal`` for ``record_id``; SealError when it does not open."""
    alg = sealed.get("alg")
    if alg != SEAL_ALG:
        raise SealError(f"unsupported sealing algorithm {alg!r} (expected {SEAL_ALG})")
    mine = key_id(private_key.public_key())
    kid = sealed.get("kid")
    if kid != mine:
        raise OtherKeyError(f"sealed for key {kid!r}, but this is key {mine!r}")
    ct = sealed.get("ct")
    if not isinstance(ct, str):
        raise SealError("the sealed body has no ciphertext")
    try:
        raw = base64.b64decode(ct, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SealError("the sealed body's ciphertext is not valid base64") from exc
    try:
        return _SUITE.decrypt(raw, private_key, info=_SEAL_INFO + record_id.encode())
    except (InvalidTag, ValueError) as exc:
        raise SealError(
            f"the sealed body does not open for record {record_id!r}: "
            "its ciphertext was altered, or it was sealed for another record"
        ) from exc


# -- the chain ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Torn:
    """A run of lines at a file's end that are not records: a write cut short by a crash or a full disk.

    ``size`` is the byte length of the run without its final newline (lines joined by ``\\n``) and
    ``sha256`` the hash of those bytes; a ``start`` or ``gap`` record written after it names both."""

    line: int
    lines: int
    size: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"line": self.line, "lines": self.lines, "bytes": self.size, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Tail:
    """What a writer needs to continue a file: the next ``seq``, the last record's hash, and the torn
    write (if any) after that record. ``needs_newline``: the file does not end with a newline, so the
    writer must write one before its first record. ``regular`` is False for a device or a pipe, which
    has no tail to read."""

    seq: int = 0
    last_hash: str = ZERO_HASH
    torn: Torn | None = None
    needs_newline: bool = False
    regular: bool = True


class Chain:
    """The running state of a record file: the next ``seq`` and the hash of the last record."""

    __slots__ = ("last_hash", "seq")

    def __init__(self, seq: int = 0, last_hash: str = ZERO_HASH) -> None:
        self.seq = seq
        self.last_hash = last_hash

    @classmethod
    def following(cls, tail: Tail) -> Chain:
        return cls(tail.seq, tail.last_hash)

    def link(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``body`` with ``seq``, ``prev`` and ``hash`` added; the chain advances past it.

        Raises ValueError or TypeError (and the chain stays where it was) when the body has no string
        ``type``, carries a chain field of its own, or is not JSON."""
        if not isinstance(body.get("type"), str):
            raise ValueError("a record needs a string 'type'")
        reserved = _CHAIN_FIELDS & body.keys()
        if reserved:
            raise ValueError(f"a record must not carry {sorted(reserved)}: the chain sets them")
        record = {**body, "seq": self.seq, "prev": self.last_hash}
        digest = record_hash(record)
        record["hash"] = digest
        self.seq += 1
        self.last_hash = digest
        return record

    def checkpoint(
        self, signing_key: ed25519.Ed25519PrivateKey, time: str, *, final: bool = False
    ) -> dict[str, Any]:
        """A signed checkpoint over everything linked so far, linked like any record.

        ``final``: the writer is closing, so any record but a ``start`` after this one was not written by
        a writer holding the key."""
        kid = key_id(signing_key.public_key())
        signature = signing_key.sign(checkpoint_message(self.seq, self.last_hash, kid, time, final))
        body: dict[str, Any] = {
            "type": "checkpoint",
            "time": time,
            "kid": kid,
            "signed": {"seq": self.seq, "prev": self.last_hash},
            "signature": base64.b64encode(signature).decode("ascii"),
        }
        if final:
            body["final"] = True
        return self.link(body)


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """The record on a line (without its newline), or None and what is wrong with the line."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None, "is not JSON"
    if not isinstance(value, dict):
        return None, "is not a JSON object"
    seq = value.get("seq")
    if type(seq) is not int or seq < 0 or not isinstance(value.get("hash"), str):
        return None, "is not a record (no seq or hash)"
    return value, ""


# -- reading a file's tail ----------------------------------------------------------------------------


def read_tail(path: Path) -> Tail:
    """The state a writer continues ``path`` from; a missing, empty or non-regular file is a fresh chain."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return Tail()
    try:
        return read_tail_fd(fd)
    finally:
        os.close(fd)


def read_tail_fd(fd: int) -> Tail:
    """``read_tail`` on an open file, so a writer reads the very file it appends to even if the path was
    renamed or replaced. Reads backwards from the end in growing blocks until a complete record is found:
    memory stays proportional to the last record (and the torn write after it), not to the file."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return Tail(regular=False)
    start = info.st_size
    buf = b""
    block = _TAIL_BLOCK
    while start > 0:
        begin = max(0, start - block)
        buf = _pread_exact(fd, start - begin, begin) + buf
        start = begin
        found = _scan_tail(fd, buf, start)
        if found is not None:
            return found
        block *= 2
    return Tail()


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise OSError(f"the file shrank while its tail was read (at byte {offset})")
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _scan_tail(fd: int, buf: bytes, start: int) -> Tail | None:
    """The tail from ``buf`` (the file's bytes from offset ``start`` to its end), or None when ``buf``
    does not reach back to a complete record yet."""
    segments = buf.split(b"\n")
    needs_newline = segments[-1] != b""
    offsets: list[int] = []
    position = start
    for segment in segments:
        offsets.append(position)
        position += len(segment) + 1
    # Before the first newline in buf, a segment's beginning is unknown unless buf starts the file.
    first_known = 0 if start == 0 else 1
    run: list[int] = []
    for index in range(len(segments) - 1, first_known - 1, -1):
        if index == len(segments) - 1 and not needs_newline:
            continue
        record, _ = _parse(segments[index])
        if record is not None:
            torn = _torn(fd, segments, offsets, run)
            return Tail(record["seq"] + 1, record["hash"], torn, needs_newline)
        run.append(index)
    if start > 0:
        return None
    return Tail(0, ZERO_HASH, _torn(fd, segments, offsets, run), needs_newline)


def _torn(fd: int, segments: list[bytes], offsets: list[int], run: list[int]) -> Torn | None:
    if not run:
        return None
    indices = sorted(run)
    data = b"\n".join(segments[i] for i in indices)
    line = _count_newlines(fd, offsets[indices[0]]) + 1
    return Torn(line=line, lines=len(indices), size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _count_newlines(fd: int, end: int) -> int:
    """Newlines before byte ``end``: the line number of a torn write. Only read after a crash."""
    count = 0
    for offset in range(0, end, _COUNT_BLOCK):
        count += _pread_exact(fd, min(_COUNT_BLOCK, end - offset), offset).count(b"\n")
    return count


# -- verification -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Break:
    """The first place where a record file is not what the writer wrote."""

    line: int
    seq: int | None
    record_id: str | None
    reason: str

    def describe(self) -> str:
        """``line N (seq S, id I): reason``, as ``audit verify`` and ``audit replay`` print it."""
        where = f"line {self.line}"
        if self.seq is not None:
            where += f" (seq {self.seq}" + (f", id {self.record_id})" if self.record_id else ")")
        return f"{where}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Report:
    """The outcome of ``verify``.

    What is authenticated, and what only chained, is spelled out so that no reader mistakes an intact
    chain for a signed one. ``signed_through``: the ``seq`` of the last checkpoint whose signature
    verified with a given key (None: none did, or no key was given); everything of its run up to it is
    signed. ``unsigned_tail``: records after that checkpoint (all of them when there is none); only the chain
    protects them, and without an anchor a file cut back to a checkpoint looks intact. ``unsigned``: records
    anywhere in the file that no verified checkpoint of their own run vouches for (``start`` and ``gap``
    records are not counted: a writer writes them unasked): a run's records after its last checkpoint stay
    unsigned even when a later run's checkpoint verifies, since they may have been appended while no
    writer ran. ``unchecked``: checkpoints whose signature was not checked because no verify key was given.
    ``anchors_checked``: anchors found in the file with their hash. ``last_seq``/``last_hash`` describe the
    last good record, to compare with the ``audit_checkpoint`` anchors in the logs."""

    ok: bool
    records: int
    checkpoints: int
    first_break: Break | None
    warnings: list[str]
    unsigned_tail: int
    unsigned: int
    unchecked: int
    last_seq: int | None
    last_hash: str
    signed_through: int | None
    anchors_checked: int


class _Run:
    """Consecutive lines that are not records, waiting for the record that acknowledges them."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        self.problem = problem
        self.count = 0
        self.size = 0
        self.digest = hashlib.sha256()

    def add(self, data: bytes) -> None:
        if self.count:
            self.digest.update(b"\n")
            self.size += 1
        self.digest.update(data)
        self.size += len(data)
        self.count += 1

    def acknowledged_by(self, record: Mapping[str, Any]) -> bool:
        torn = record.get("torn")
        if record.get("type") not in ACK_TYPES or not isinstance(torn, dict):
            return False
        lines = torn.get("lines", 1)
        return (
            _is_int(torn.get("line"))
            and torn["line"] == self.line
            and _is_int(lines)
            and lines == self.count
            and _is_int(torn.get("bytes"))
            and torn["bytes"] == self.size
            and torn.get("sha256") == self.digest.hexdigest()
        )

    def where(self) -> str:
        return f"line {self.line}" if self.count == 1 else f"lines {self.line}-{self.line + self.count - 1}"


def _is_int(value: object) -> bool:
    return type(value) is int


class _Verifier:
    def __init__(
        self, keys: Mapping[str, ed25519.Ed25519PublicKey], strict: bool, anchors: Mapping[int, str]
    ) -> None:
        self.keys = keys
        self.strict = strict
        self.anchors = anchors
        self.anchors_checked = 0
        self.signed_through: int | None = None
        self.first_claim: tuple[int, int, str | None] | None = None
        self.lines = 0
        self.checkpoints = 0
        self.unchecked = 0
        self.seq = 0
        self.last_hash = ZERO_HASH
        self.last_line: int | None = None
        self.run: _Run | None = None
        self.unsigned = 0
        self.first_unsigned: tuple[int, int, str | None] | None = None
        # The current run's records that its next verified checkpoint would vouch for.
        self.pending = 0
        self.first_pending: tuple[int, int, str | None] | None = None
        self.last_pending = 0
        self.run_checkpointed = False
        self.earlier_unsigned = 0
        self.after_final = False
        self.warnings: list[str] = []
        self.failure: Break | None = None
        self.final_newline = True

    def feed(self, number: int, raw: bytes) -> bool:
        """Check one line; False once the file is broken (the first break is what matters)."""
        self.lines = number
        self.final_newline = raw.endswith(b"\n")
        line = raw[:-1] if self.final_newline else raw
        record, problem = _parse(line)
        if record is None:
            if self.run is None:
                self.run = _Run(number, problem)
            self.run.add(line)
            return True
        if self.run is not None:
            run, self.run = self.run, None
            if not run.acknowledged_by(record):
                self.failure = Break(
                    run.line,
                    None,
                    None,
                    f"line {run.line} {run.problem}, and the record after {run.where()} does not acknowledge "
                    "it as a torn write",
                )
                return False
            self.warnings.append(
                f"{run.where()}: a torn write ({run.size} bytes), acknowledged by the "
                f"{record['type']} record at line {number}"
            )
        return self._check(number, line, record)

    def _check(self, number: int, line: bytes, record: dict[str, Any]) -> bool:
        seq: int = record["seq"]
        record_id = record.get("id") if isinstance(record.get("id"), str) else None

        def fail(reason: str) -> bool:
            self.failure = Break(number, seq, record_id, reason)
            return False

        try:
            digest = record_hash(record)
            form = canonical(record)
        except (ValueError, TypeError, RecursionError):
            return fail(
                "the record holds NaN or an infinite number, or nests too deep: it has no canonical form "
                "and cannot be hashed (not written by the writer)"
            )
        if digest != record["hash"]:
            return fail("hash does not match the record's content (edited?)")
        if form != line:
            return fail("the line is not in canonical JSON form (edited by hand?)")
        if seq != self.seq:
            if self.last_line is None:
                return fail(f"the first record has seq {seq}, not 0 (the beginning of the file is missing?)")
            if seq > self.seq:
                return fail(f"seq {seq} follows seq {self.seq - 1} (a record deleted?)")
            return fail(f"seq {seq} follows seq {self.seq - 1} (a record inserted, duplicated or moved?)")
        if record.get("prev") != self.last_hash:
            if self.last_line is None:
                return fail(
                    "prev of the first record is not the zero hash (the beginning of the file is missing?)"
                )
            return fail(
                f"prev does not match line {self.last_line}'s hash (a record deleted, inserted or moved?)"
            )
        kind = record.get("type")
        if not isinstance(kind, str):
            return fail("the record has no type")
        if self.last_line is None and kind != "start":
            return fail(
                f"the first record is not a start record but {kind!r} (a writer begins every file with one: "
                "the beginning of the file is missing, or it was not written by the sidecar?)"
            )
        if self.after_final and kind != "start":
            return fail(
                "a record after the final checkpoint of a run, before any start: "
                "appended while no writer ran?"
            )
        if kind == "start" and not self._end_run(number):
            return False
        anchor = self.anchors.get(seq)
        if anchor is not None:
            if anchor != record["hash"]:
                return fail(f"anchor seq {seq}: hash differs (rewritten?)")
            self.anchors_checked += 1
        signed = False
        if kind == "checkpoint":
            self.checkpoints += 1
            reason, signed = self._checkpoint(record)
            if reason is not None:
                return fail(reason)
        elif kind == "gap":
            self.warnings.append(
                f"line {number}: gap record: {record.get('lost')} record(s) lost ({record.get('reason')})"
            )
        self.seq = seq + 1
        self.last_hash = record["hash"]
        self.last_line = number
        if self.first_claim is None and kind not in _UNAUTHENTICATING:
            self.first_claim = (number, seq, record_id)
        if signed:
            self.signed_through = seq
            self.unsigned = 0
            self.first_unsigned = None
            self.pending = 0
            self.first_pending = None
            self.run_checkpointed = True
            self.after_final = record.get("final") is True
        else:
            self.unsigned += 1
            if self.first_unsigned is None:
                self.first_unsigned = (number, seq, record_id)
            if kind not in _UNAUTHENTICATING:
                self.pending += 1
                self.last_pending = number
                if self.first_pending is None:
                    self.first_pending = (number, seq, record_id)
        return True

    def _end_run(self, start_line: int) -> bool:
        """A start record at ``start_line`` ends the run before it: its records that no checkpoint of that
        run vouched for stay unsigned for good. False when that is a break (``strict``)."""
        pending, first = self.pending, self.first_pending
        self.pending = 0
        self.first_pending = None
        self.run_checkpointed, checkpointed = False, self.run_checkpointed
        self.after_final = False
        if not pending or first is None:
            return True
        self.earlier_unsigned += pending
        if not self.keys:
            return True
        line, seq, record_id = first
        where = f"line {line}" if line == self.last_pending else f"lines {line}-{self.last_pending}"
        what = (
            "records after the last checkpoint of a run"
            if checkpointed
            else "records of a run without a checkpoint"
        )
        message = f"{where}: {what}, before the start at line {start_line}: protected by the chain only"
        if self.strict:
            self.failure = Break(line, seq, record_id, message + " (appended while no writer ran?)")
            return False
        self.warnings.append(message)
        return True

    def _checkpoint(self, record: Mapping[str, Any]) -> tuple[str | None, bool]:
        """(a break reason or None, whether the signature verified).

        A checkpoint holds exactly what the writer writes: its signature covers only ``seq``, ``prev``,
        ``kid``, ``time`` and ``final``, so any other field could be changed and the chain recomputed
        unnoticed."""
        kid, time, signed, signature = (record.get(k) for k in ("kid", "time", "signed", "signature"))
        if not (
            isinstance(kid, str)
            and isinstance(time, str)
            and isinstance(signed, dict)
            and isinstance(signature, str)
        ):
            return "checkpoint is malformed (kid, time, signed or signature missing)", False
        if record.get("final", True) is not True:
            return "checkpoint's final field is not true (a writer writes it only as true)", False
        extra = sorted(record.keys() - _CHECKPOINT_FIELDS) or [
            f"signed.{name}" for name in sorted(signed.keys() - _SIGNED_FIELDS)
        ]
        if extra:
            return f"unexpected field {extra[0]!r} in a checkpoint (its signature does not cover it)", False
        if not (
            _is_int(signed.get("seq"))
            and signed["seq"] == record["seq"]
            and signed.get("prev") == record["prev"]
        ):
            return "checkpoint's signed seq and prev are not its own (copied from elsewhere?)", False
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return "checkpoint signature is not base64", False
        if not self.keys:
            self.unchecked += 1
            return None, False
        key = self.keys.get(kid)
        if key is None:
            return (
                f"checkpoint signed by an unknown key (kid {kid}; given: {', '.join(sorted(self.keys))})",
                False,
            )
        try:
            key.verify(raw, checkpoint_message(record["seq"], record["prev"], kid, time, "final" in record))
        except InvalidSignature:
            return "checkpoint signature is invalid", False
        return None, True

    def finish(self) -> Report:
        if self.failure is None and self.lines == 0:
            self.failure = Break(
                1, None, None, "the record is empty (a writer's first line is its start record)"
            )
        if self.failure is None and self.run is not None:
            run = self.run
            self.failure = Break(
                run.line,
                None,
                None,
                f"line {run.line} {run.problem} and ends the file unacknowledged "
                "(a torn write: the writer crashed, or is still writing?)",
            )
        if self.failure is None:
            beyond = sorted(seq for seq in self.anchors if seq >= self.seq)
            if beyond:
                self.failure = Break(
                    self.lines + 1,
                    None,
                    None,
                    f"anchor seq {beyond[0]}: the file ends at seq {self.seq - 1} (truncated?)",
                )
        if self.failure is None and self.keys and self.signed_through is None and self.first_claim:
            line, seq, record_id = self.first_claim
            self.failure = Break(
                line,
                seq,
                record_id,
                "no checkpoint is signed by the given key(s): nothing in the file is authenticated "
                "(a writer with a signing key writes a checkpoint every checkpoint_every records or "
                "checkpoint_seconds, and when it closes: the file was written without a signing key, its "
                "checkpoints were removed, or it is younger than that)",
            )
        if self.failure is None and not self.final_newline:
            self.warnings.append(
                f"line {self.lines} has no final newline (a write in progress, or cut just before its end?)"
            )
        if self.unchecked:
            self.warnings.append(
                f"{self.unchecked} checkpoint signature(s) not checked: no verify key was given"
            )
        if self.failure is None and self.unsigned and self.first_unsigned is not None:
            line, seq, record_id = self.first_unsigned
            what = (
                f"{self.unsigned} record(s) from line {line} on are not covered by a verified checkpoint"
                + ("" if self.keys else " (no verify key was given)")
                + ": only the chain protects them, and without an anchor from the logs a file cut back to "
                "a checkpoint looks intact"
            )
            if self.strict:
                self.failure = Break(line, seq, record_id, what)
            else:
                self.warnings.append(what)
        return Report(
            ok=self.failure is None,
            records=self.lines,
            checkpoints=self.checkpoints,
            first_break=self.failure,
            warnings=self.warnings,
            unsigned_tail=self.unsigned,
            unsigned=self.earlier_unsigned + self.pending,
            unchecked=self.unchecked,
            last_seq=self.seq - 1 if self.last_line is not None else None,
            last_hash=self.last_hash,
            signed_through=self.signed_through,
            anchors_checked=self.anchors_checked,
        )


def verify(
    path: Path,
    verify_keys: Sequence[ed25519.Ed25519PublicKey] = (),
    *,
    strict: bool = False,
    anchors: Mapping[int, str] = {},
) -> Report:
    """Check a record file line by line: JSON, hashes, the chain, ``seq``, checkpoint signatures.

    A file that is altered or hostile is a ``Break`` in the report, never an exception; RecordError only
    when the file cannot be read at all (missing, a directory, a device). With no ``verify_keys`` the
    chain is checked but no signature is (a warning says so); with keys, a file with records but no
    checkpoint signed by one of them is a break. ``anchors`` maps a ``seq`` to the hash its record must
    have (from the writer's ``audit_checkpoint`` and ``audit_resumed`` logs): they make a truncation or a
    rewrite after the last checkpoint visible. A record after a verified ``final`` checkpoint that is not a
    ``start`` is a break. ``strict`` also fails a file with any record that no verified checkpoint of its own
    run covers (without ``strict`` a warning names them), and one whose last records are not covered."""
    for seq, digest in anchors.items():
        if not (_is_int(seq) and seq >= 0 and isinstance(digest, str)):
            raise ValueError(f"an anchor is a seq (an int, at least 0) and a hash, not {seq!r}: {digest!r}")
    verifier = _Verifier({key_id(key): key for key in verify_keys}, strict, anchors)
    try:
        with path.open("rb") as file:
            kind = os.fstat(file.fileno()).st_mode
            # A pipe ends (``<(zcat record.jsonl.gz)``); a device such as /dev/zero might never.
            if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):
                raise RecordError(f"{path}: not a regular file or a pipe")
            for number, raw in enumerate(file, 1):
                if not verifier.feed(number, raw):
                    break
    except OSError as exc:
        raise RecordError(f"{path}: cannot read the record: {exc.strerror or exc}") from exc
    return verifier.finish()


def iter_records(path: Path, *, skip_invalid: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every line of a record file as (line number, JSON object), nothing verified.

    A line that is not a JSON object raises RecordError, unless ``skip_invalid`` (torn writes are such
    lines)."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            try:
                value = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError) as exc:
                if skip_invalid:
                    continue
                raise RecordError(f"{path}: line {number} is not JSON") from exc
            if not isinstance(value, dict):
                if skip_invalid:
                    continue
                raise RecordError(f"{path}: line {number} is not a JSON object")
            yield number, value


def find(path: Path, record_id: str) -> dict[str, Any] | None:
    """The first record whose ``id`` is ``record_id`` (torn writes are skipped), or None."""
    for _, record in iter_records(path, skip_invalid=True):
        if record.get("id") == record_id:
            return record
    return None
