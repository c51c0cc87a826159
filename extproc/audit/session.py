"""The session record of the running sidecar: one ``exchange`` record per exchange, written by the
RecordWriter's thread into the hash-chained JSON Lines file.

A record holds ids, the caller, the policy's decision, the findings (rule, entity, offsets in the scanned
text) and the bodies as they were sent on (masked), each cut at ``audit.max_body_bytes``. The bodies as
they came (originals) are sealed to the auditor's public key: the sidecar can write them but not read
them back; ``extproc audit replay`` opens them with the auditor's private key.

Records are built and sealed on the writer's thread, never on the event loop.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from extproc.audit.keys import load_sealing_key, load_signing_key
from extproc.audit.record import seal
from extproc.audit.spans import Instruments
from extproc.audit.writer import RecordWriter, iso_time
from extproc.model import Outcome, Recorded, RecordedBody
from extproc.settings import AuditSettings

log = logging.getLogger("extproc.audit")

RECORD_TYPE = "exchange"


def _body(body: RecordedBody | None) -> dict[str, Any] | None:
    if body is None:
        return None
    entry: dict[str, Any] = {
        "content_type": body.content_type,
        "bytes": body.original_bytes,
        "sent_bytes": body.masked_bytes,
        "masked": body.masked.decode("utf-8", "replace"),
        "truncated": body.masked_bytes > len(body.masked),
    }
    if body.status:
        entry["status"] = body.status
    return entry


def _original(body: RecordedBody | None) -> dict[str, Any] | None:
    if body is None:
        return None
    return {
        "body": base64.b64encode(body.original).decode("ascii"),
        "truncated": body.original_bytes > len(body.original),
    }


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
        "enforce": outcome.enforce,
        "decision": outcome.decision,
        "error_code": outcome.error_code,
        "unmasked": outcome.unmasked,
        "actions": {d: [list(a) for a in made] for d, made in outcome.actions.items()},
        "findings": {
            d: [{"rule": f.rule_id, "entity": f.entity, "start": f.start, "end": f.end} for f in found]
            for d, found in outcome.findings.items()
        },
        "would_refuse": list(outcome.would_refuse),
        "shadow": {policy: list(codes) for policy, codes in outcome.shadow.items()},
        "request": _body(recorded.request),
        "response": _body(recorded.response),
    }
    if sealing_key is not None and (recorded.request is not None or recorded.response is not None):
        originals = {"request": _original(recorded.request), "response": _original(recorded.response)}
        plaintext = json.dumps(originals, separators=(",", ":")).encode()
        record["sealed"] = seal(plaintext, sealing_key, outcome.decision_id)
    return record


def open_originals(record: dict[str, Any], opened: bytes) -> dict[str, bytes | None]:
    """The original bodies from the plaintext of a record's ``sealed`` field."""
    originals = json.loads(opened)
    bodies: dict[str, bytes | None] = {}
    for direction in ("request", "response"):
        entry = originals.get(direction)
        bodies[direction] = None if entry is None else base64.b64decode(entry["body"], validate=True)
    return bodies


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
        self._lost = 0

    def start(self) -> None:
        """Opens the record and continues its chain. Blocking; raises ConfigError."""
        self._writer.start()

    @property
    def serving(self) -> bool:
        """False while records cannot be written and ``on_error`` is fail_closed."""
        return self._settings.on_error == "continue" or self._writer.healthy

    @property
    def writer(self) -> RecordWriter:
        return self._writer

    def record(self, recorded: Recorded, outcome: Outcome, trace_id: str | None) -> None:
        sealing = self._sealing

        def build() -> dict[str, Any]:
            return build_record(outcome, recorded, trace_id, sealing)

        if not self._writer.submit(build):
            log.error("audit_record_lost", extra={"decision_id": outcome.decision_id, "reason": "queue full"})
        lost = self._writer.lost  # full queue, failed writes: the writer counts every record it lost
        if lost > self._lost:
            self._instruments.records_lost.add(lost - self._lost)
            self._lost = lost

    def close(self) -> None:
        """Writes what is queued and a last checkpoint. Blocking."""
        self._writer.close()
