"""The session record of the running sidecar: one ``exchange`` record per exchange, written by the
RecordWriter's thread into the hash-chained JSON Lines file.

A record holds ids, the caller, the policy's decision, the findings (rule, entity, offsets in the scanned
text) and the bodies as they were sent on (masked), each cut at ``audit.max_body_bytes``. The bodies as
they came (originals) are sealed to the auditor's public key: the sidecar can write them but not read
them back; ``extproc audit replay`` opens them with the auditor's private key.

Records are built and sealed on the writer's thread, never on the event loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from extproc.approvals.model import Event, Person
from extproc.audit.keys import load_sealing_key, load_signing_key
from extproc.audit.record import seal
from extproc.audit.spans import Instruments
from extproc.audit.writer import RecordWriter, iso_time
from extproc.model import Finding, Outcome, Recorded, RecordedBody
from extproc.settings import AuditSettings

log = logging.getLogger("extproc.audit")

RECORD_TYPE = "exchange"
APPROVAL_RECORD_TYPE = "approval"  # one step of an approval: requested, voted, approved, denied...
DIRECTIONS = ("request", "response")
# After a record is lost, fail_closed keeps refusing requests this long, even once writes succeed again.
LOSS_COOLDOWN_SECONDS = 5.0


def _body(body: RecordedBody | None) -> dict[str, Any] | None:
    if body is None:
        return None
    entry: dict[str, Any] = {
        "content_type": body.content_type,
        "bytes": body.original_bytes,
        "sent_bytes": body.masked_bytes,
    }
    if body.masked is None:
        entry["masked"] = None
        entry["withheld"] = (
            "a value went out unmasked (allowed by the policy): only the sealed original has it"
        )
    else:
        entry["masked"] = body.masked.decode("utf-8", "replace")
        entry["truncated"] = body.masked_bytes > len(body.masked)
    if body.status:
        entry["status"] = body.status
    return entry


def seal_originals(request: RecordedBody | None, response: RecordedBody | None) -> bytes:
    """The plaintext that is sealed: a JSON header line, then the raw bodies it describes, back to back
    (no base64 inside the seal)."""
    header: dict[str, Any] = {}
    parts = []
    for name, body in zip(DIRECTIONS, (request, response), strict=True):
        if body is None or body.original is None:
            header[name] = None
            continue
        header[name] = {"length": len(body.original), "truncated": body.original_bytes > len(body.original)}
        parts.append(body.original)
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(parts)


def open_originals(opened: bytes) -> dict[str, bytes | None]:
    """The original bodies from the opened plaintext of a record's ``sealed`` field. Raises ValueError."""
    line, sep, rest = opened.partition(b"\n")
    header = json.loads(line) if sep else None
    if not isinstance(header, dict):
        raise ValueError("the sealed originals have no header")
    bodies: dict[str, bytes | None] = {}
    offset = 0
    for name in DIRECTIONS:
        entry = header.get(name)
        if entry is None:
            bodies[name] = None
            continue
        length = entry.get("length") if isinstance(entry, dict) else None
        if not isinstance(length, int) or length < 0 or offset + length > len(rest):
            raise ValueError(f"the sealed {name} body is not as long as its header says")
        bodies[name] = rest[offset : offset + length]
        offset += length
    if offset != len(rest):
        raise ValueError("the sealed originals are longer than their header says")
    return bodies


def build_record(
    outcome: Outcome, recorded: Recorded, trace_id: str | None, sealing_key: X25519PublicKey | None
) -> dict[str, Any]:
    """The ``exchange`` record of one exchange (without its chain fields)."""
    principal = None
    if outcome.subject is not None:
        principal = {"subject": outcome.subject, "issuer": outcome.issuer, "groups": list(outcome.groups)}
    record: dict[str, Any] = {
        "type": RECORD_TYPE,
        "id": outcome.decision_id,
        "time": iso_time(recorded.started),
        "duration_ms": round(recorded.duration * 1000, 3),
        "request_id": outcome.request_id,
        "trace_id": trace_id,
        "principal": principal,
        "method": outcome.method,
        "route": outcome.route,
        "model": outcome.model,
        "policy": outcome.policy,
        "snapshot": outcome.snapshot,
        "enforce": outcome.enforce,
        "decision": outcome.decision,
        "error_code": outcome.error_code,
        "unmasked": outcome.unmasked,
        "unmasked_requested": outcome.unmasked_requested,
        "actions": {d: [list(a) for a in made] for d, made in outcome.actions.items()},
        "findings": {d: [_finding(f) for f in found] for d, found in outcome.findings.items()},
        "would_refuse": list(outcome.would_refuse),
        "shadow": {
            policy: {
                "refused": list(shadowed.refused),
                "actions": {d: [list(a) for a in made] for d, made in shadowed.actions.items()},
            }
            for policy, shadowed in outcome.shadow.items()
        },
        "request": _body(recorded.request),
        "response": _body(recorded.response),
    }
    if outcome.approval_id is not None:
        record["approval"] = {"id": outcome.approval_id, "status": outcome.approval_status}
    kept = [b for b in (recorded.request, recorded.response) if b is not None and b.original is not None]
    if sealing_key is not None and kept:
        plaintext = seal_originals(recorded.request, recorded.response)
        record["sealed"] = seal(plaintext, sealing_key, outcome.decision_id)
    return record


class _Builder:
    """Builds one record on the writer's thread; carries its id so a lost record is named."""

    __slots__ = ("_build", "_done", "record_id")

    def __init__(self, record_id: str, build: Callable[[], dict[str, Any]], done: Callable[[], None]) -> None:
        self.record_id = record_id
        self._build = build
        self._done = done

    def __call__(self) -> Mapping[str, Any]:
        try:
            return self._build()
        finally:
            self._done()


class SessionRecorder:
    """Hands each finished exchange to the record writer, and says whether requests may be served."""

    def __init__(self, settings: AuditSettings, instruments: Instruments) -> None:
        assert settings.record_path is not None
        self._settings = settings
        self._instruments = instruments
        self._sealing = (
            load_sealing_key(Path(settings.sealing_key_file)) if settings.sealing_key_file else None
        )
        signing = load_signing_key(Path(settings.signing_key_file)) if settings.signing_key_file else None
        if self._sealing is None:
            log.warning("audit_originals_not_recorded", extra={"detail": "audit.sealing_key_file is not set"})
        if signing is None:
            log.warning(
                "audit_unsigned", extra={"detail": "audit.signing_key_file is not set: no checkpoints"}
            )
        self._writer = RecordWriter(
            path=Path(settings.record_path),
            signing_key=signing,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_seconds=settings.checkpoint_seconds,
            fsync=settings.fsync,
            queue_size=settings.queue_size,
        )
        self._lock = threading.Lock()
        self._pending_bytes = 0  # body bytes of records queued and not yet built
        self._seen_lost = 0
        self._refuse_until = 0.0
        self._logged_loss = 0.0

    def start(self) -> None:
        """Opens the record and continues its chain. Blocking; raises ConfigError."""
        self._writer.start()

    @property
    def serving(self) -> bool:
        """False, with ``on_error: fail_closed``, while records cannot be written and for a while after
        one was lost (a full queue, a record that could not be built)."""
        if self._settings.on_error == "continue":
            return True
        self._note_losses()
        return self._writer.healthy and time.monotonic() >= self._refuse_until

    @property
    def writer(self) -> RecordWriter:
        return self._writer

    def _note_losses(self) -> None:
        lost = self._writer.lost
        if lost > self._seen_lost:
            self._instruments.records_lost.add(lost - self._seen_lost)
            self._seen_lost = lost
            self._refuse_until = time.monotonic() + LOSS_COOLDOWN_SECONDS

    def record(self, recorded: Recorded, outcome: Outcome, trace_id: str | None) -> None:
        """Queues the exchange's record; never blocks. Its size counts against ``max_queue_bytes`` until
        the writer has built it."""
        size = sum(
            len(body.masked or b"") + len(body.original or b"")
            for body in (recorded.request, recorded.response)
            if body is not None
        )
        with self._lock:
            full = self._pending_bytes + size > self._settings.max_queue_bytes
            if not full:
                self._pending_bytes += size
        if full:
            self.lost(outcome.decision_id, "queue over audit.max_queue_bytes")
            return
        sealing = self._sealing

        def build() -> dict[str, Any]:
            return build_record(outcome, recorded, trace_id, sealing)

        def built() -> None:
            with self._lock:
                self._pending_bytes -= size

        if not self._writer.submit(_Builder(outcome.decision_id, build, built)):
            built()
            self._lost_log(outcome.decision_id, "queue full")
        self._note_losses()

    def approval(self, event: Event) -> None:
        """One approval step as an ``approval`` record in the chain (a listener of the approval service):
        who asked and who decided, the rules, the body's digest, never the prompt. Never blocks."""
        record = approval_record(event)
        if not self._writer.submit(record):
            self._lost_log(str(record["id"]), "queue full")
        self._note_losses()

    def lost(self, decision_id: str, reason: str) -> None:
        """An exchange whose record could not even be queued: the file gets a gap naming it."""
        self._writer.mark_lost(decision_id, reason)
        self._lost_log(decision_id, reason)
        self._note_losses()

    def _lost_log(self, decision_id: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._logged_loss >= 1.0:  # at most once a second: the writer's gap records count them all
            self._logged_loss = now
            log.error("audit_record_lost", extra={"decision_id": decision_id, "reason": reason})

    def close(self) -> None:
        """Writes what is queued and a last checkpoint. Blocking."""
        self._writer.close()


def _finding(finding: Finding) -> dict[str, Any]:
    """One value found: the rule that reports it, and the other rules that found it too (if any)."""
    entry: dict[str, Any] = {
        "rule": finding.rule_id,
        "entity": finding.entity,
        "start": finding.start,
        "end": finding.end,
    }
    if finding.also_matched:
        entry["also_matched"] = list(finding.also_matched)
    return entry


def _person(person: Person | None) -> dict[str, Any] | None:
    if person is None:
        return None
    return {"subject": person.subject, "issuer": person.issuer, "groups": list(person.groups)}


def approval_record(event: Event) -> dict[str, Any]:
    """The ``approval`` record of one step (without its chain fields)."""
    approval = event.approval
    request = approval.request
    record: dict[str, Any] = {
        "type": APPROVAL_RECORD_TYPE,
        "id": uuid.uuid4().hex,
        "time": iso_time(event.at or time.time()),
        "event": event.kind,
        "approval_id": approval.id,
        "status": approval.status,
        "decision_id": request.decision_id,
        "policy": request.policy_id,
        "mode": request.mode,
        "requester": _person(request.requester),
        "actor": _person(event.actor),
        "route": request.route,
        "model": request.model,
        "rule_ids": list(request.rule_ids),
        "body_sha256": request.body_digest,
        "approver_groups": list(request.approver_groups),
        "min_approvals": request.min_approvals,
        "approvals": sum(1 for vote in approval.votes if vote.approve),
    }
    if event.detail.get("reason"):
        record["reason"] = str(event.detail["reason"])
    return record
