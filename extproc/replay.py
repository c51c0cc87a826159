"""Replay of the session record: past exchanges decided again under other rules and policies.

Each ``exchange`` record's sealed originals are opened with the auditor's private key and run through a
real Exchange built from the new settings, with the recorded caller, route, method and content types.
What the new rules decide is compared with what was recorded: the decision, its error code, and the
actions per finding. That is how a team tries a new rule pack on real past traffic before rolling it out.

Not reproduced: time (an answer cut at ``max_stream_seconds`` is replayed whole), bodies beyond the
record's cap (a truncated original is replayed as recorded, and said so), and streaming: bodies are
replayed whole, so an answer cut mid-stream (``cut``) and the same answer refused whole (``refused``)
with the same code count as the same decision.

An exchange that cannot be replayed is reported with the reason why (``NOT_REPLAYABLE``), never silently
passed: a gate that decided nothing must not read as a gate that found nothing to change. Which lines are
trusted is the caller's choice: ``audit replay`` verifies the file's chain first and replays only the lines
it verified (``through_line``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from extproc.audit.record import OtherKeyError, SealError, iter_records, open_sealed
from extproc.audit.session import RECORD_TYPE, open_originals
from extproc.errors import ExtProcError
from extproc.exchange import UNMASKED_HEADER, Exchange
from extproc.identity import Principal
from extproc.model import Body, BodyMode, Direction, Headers, Outcome, ProtocolConfig
from extproc.runtime import Snapshot

_BUFFERED = ProtocolConfig(BodyMode.BUFFERED, BodyMode.BUFFERED)
SIZE_CODES = frozenset({"body_too_large", "upstream_too_large"})

# Why an exchange could not be replayed, as the summary counts them.
OTHER_KEY = "sealed to another auditor key"  # the wrong --key, most often
NOT_SEALED = "no sealed originals"  # written without audit.sealing_key_file, or the field was removed
NOT_OPENED = "originals do not open"  # altered ciphertext, copied from another record, or bad framing
DAMAGED = "damaged record"  # a record replay could not read
NOT_REPLAYABLE = (OTHER_KEY, NOT_SEALED, NOT_OPENED, DAMAGED)


@dataclass(frozen=True)
class Replayed:
    """One recorded exchange decided again."""

    line: int
    record_id: str
    summary: str  # method, route, policy
    before: dict[str, Any]  # decision, error_code, actions as recorded
    after: dict[str, Any] | None  # the same, decided again; None when it could not be replayed
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # False when the originals were recorded in part (over the record's cap, or refused for their size):
    # deciding part of a body again says nothing about the decision on the whole.
    comparable: bool = True
    bodies: bool = True  # False: the exchange had no body to replay (a local reply, a refused token)
    unreplayable: str | None = None  # one of NOT_REPLAYABLE when it could not be replayed

    @property
    def changed(self) -> bool:
        return self.comparable and bool(self.changes)


@dataclass
class Tally:
    """What a replay came to, as its summary line and its exit status tell it."""

    total: int = 0
    changed: int = 0
    partial: int = 0  # recorded in part: decided again, not compared
    bodiless: int = 0
    unreplayable: Counter[str] = field(default_factory=Counter)  # reason -> exchanges

    def add(self, result: Replayed) -> None:
        self.total += 1
        if result.unreplayable is not None:
            self.unreplayable[result.unreplayable] += 1
        elif not result.bodies:
            self.bodiless += 1
        elif not result.comparable:
            self.partial += 1
        elif result.changed:
            self.changed += 1

    @property
    def not_replayed(self) -> int:
        return sum(self.unreplayable.values())

    def describe(self) -> str:
        """``N decided differently, ..., M not replayable (why), ...``"""
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.unreplayable.items()))
        return (
            f"{self.changed} decided differently, {self.partial} recorded in part (not compared), "
            f"{self.not_replayed} not replayable"
            + (f" ({why})" if why else "")
            + f", {self.bodiless} without a body"
        )


def _actions(actions: Any) -> dict[str, Counter[str]]:
    """``rule:action`` counts per direction, from a record's or an Outcome's actions."""
    return {
        direction: Counter(f"{entry[0]}:{entry[2]}" for entry in made) for direction, made in actions.items()
    }


def _verdict(decision: str, error_code: str | None, actions: dict[str, Counter[str]]) -> dict[str, Any]:
    return {
        "decision": decision,
        "error_code": error_code,
        "actions": {d: sorted(c.elements()) for d, c in actions.items() if c},
    }


def _same_decision(before: dict[str, Any], after: dict[str, Any]) -> bool:
    if before["error_code"] != after["error_code"]:
        return False
    ended = {before["decision"], after["decision"]}
    return len(ended) == 1 or ended == {"cut", "refused"}


def _compare(before: dict[str, Any], after: dict[str, Any], *, timed: bool = False) -> list[str]:
    """What differs; ``timed``: the recorded decision was a cut in time, which replay cannot repeat."""
    changes = []
    if not _same_decision(before, after) and not timed:
        was = before["decision"] + (f" ({before['error_code']})" if before["error_code"] else "")
        now = after["decision"] + (f" ({after['error_code']})" if after["error_code"] else "")
        changes.append(f"decision: {was} -> {now}")
    for direction in ("request", "response"):
        old = Counter(before["actions"].get(direction, []))
        new = Counter(after["actions"].get(direction, []))
        added = sorted((new - old).elements())
        removed = sorted((old - new).elements())
        if added or removed:
            parts = [f"+{a}" for a in added] + [f"-{r}" for r in removed]
            changes.append(f"{direction}: " + " ".join(parts))
    return changes


def _principal(record: dict[str, Any]) -> Principal | None:
    entry = record.get("principal")
    if not entry:
        return None
    return Principal(
        subject=str(entry["subject"]),
        issuer=str(entry.get("issuer") or ""),
        groups=frozenset(entry.get("groups") or ()),
        claims={},
        expires_at=None,
    )


def decide_again(snapshot: Snapshot, record: dict[str, Any], bodies: dict[str, bytes | None]) -> Outcome:
    """``record``'s exchange run through a fresh Exchange of ``snapshot`` with its original bodies."""
    exchange = Exchange(snapshot, _BUFFERED, str(record["id"]), caller=_principal(record))
    request, response = record.get("request"), record.get("response")
    route = str(record.get("route") or "/")
    items: list[tuple[str, str]] = [(":method", str(record.get("method") or "POST")), (":path", route)]
    if request is not None:
        items.append(("content-type", str(request.get("content_type") or "")))
    if record.get("unmasked_requested") or record.get("unmasked"):
        items.append((UNMASKED_HEADER, "true"))
    request_body = bodies.get("request")
    try:
        exchange.handle(Headers(Direction.REQUEST, tuple(items), end_of_stream=request_body is None))
        if request_body is not None and not exchange.finished:
            exchange.handle(Body(Direction.REQUEST, request_body, True))
        response_body = bodies.get("response")
        if not exchange.finished and response is not None:
            media = str(response.get("content_type") or "")
            answer = ((":status", str(response.get("status") or "200")), ("content-type", media))
            exchange.handle(Headers(Direction.RESPONSE, answer, end_of_stream=response_body is None))
            if response_body is not None and not exchange.finished:
                exchange.handle(Body(Direction.RESPONSE, response_body, True))
        elif not exchange.finished:  # an answer with no body (or none recorded): headers end it
            exchange.handle(Headers(Direction.RESPONSE, ((":status", "200"),), end_of_stream=True))
    except ExtProcError as error:
        return exchange.outcome(error.code)
    return exchange.outcome()


def replay(
    path: Path, key: X25519PrivateKey, snapshot: Snapshot, *, through_line: int | None = None
) -> Iterator[Replayed]:
    """Every exchange record of ``path``, decided again under ``snapshot``. A record that cannot be
    replayed (no sealed originals, another auditor key, a damaged record) is reported with its reason,
    never fatal; lines that are not records (torn by a crash) are skipped: ``audit verify`` judges those.
    ``through_line``: stop after that line (the last one a verification read: lines a live writer
    appends after it were not verified)."""
    for line, record in iter_records(path, skip_invalid=True):
        if through_line is not None and line > through_line:
            return
        if record.get("type") != RECORD_TYPE:
            continue
        try:
            yield _replay_one(line, record, key, snapshot)
        except Exception as exc:  # a damaged record: say which, and go on
            summary = f"{record.get('method', '')} {record.get('route', '')}"
            notes = [f"not replayable: {type(exc).__name__}: {exc}"]
            yield Replayed(line, str(record.get("id")), summary, {}, None, notes=notes, unreplayable=DAMAGED)


def _replay_one(line: int, record: dict[str, Any], key: X25519PrivateKey, snapshot: Snapshot) -> Replayed:
    record_id = str(record.get("id"))
    summary = f"{record.get('method', '')} {record.get('route', '')} policy {record.get('policy')}"
    recorded_actions = _actions(record.get("actions") or {})
    before = _verdict(str(record.get("decision")), record.get("error_code"), recorded_actions)
    sealed = record.get("sealed")
    if sealed is None and record.get("request") is None and record.get("response") is None:
        return Replayed(line, record_id, summary, before, None, notes=["no body to replay"], bodies=False)
    if sealed is None:
        notes = ["no sealed originals: not replayed"]
        return Replayed(line, record_id, summary, before, None, notes=notes, unreplayable=NOT_SEALED)
    try:
        bodies = open_originals(open_sealed(sealed, key, record_id))
    except (SealError, ValueError) as exc:
        reason = OTHER_KEY if isinstance(exc, OtherKeyError) else NOT_OPENED
        return Replayed(
            line, record_id, summary, before, None, notes=[f"cannot open: {exc}"], unreplayable=reason
        )
    notes = []
    partial = record.get("error_code") in SIZE_CODES
    for direction in ("request", "response"):
        entry = record.get(direction)
        if isinstance(entry, dict) and entry.get("bytes", 0) > len(bodies.get(direction) or b""):
            partial = True
            notes.append(f"the {direction} was recorded in part: decided again, not compared")
    if record.get("error_code") in SIZE_CODES:
        notes.append(f"refused for its size ({record['error_code']}): decided again, not compared")
    # Cut at its time limit, or left unfinished by the client: what ended it cannot happen again.
    timed = record.get("decision") == "incomplete" or (
        record.get("decision") == "cut" and record.get("error_code") == "upstream_timeout"
    )
    if timed:
        notes.append("the answer ended early in time: replayed whole, decisions compared per finding")
    outcome = decide_again(snapshot, record, bodies)
    after = _verdict(outcome.decision, outcome.error_code, _actions(outcome.actions))
    changes = _compare(before, after, timed=timed)
    return Replayed(line, record_id, summary, before, after, changes, notes, comparable=not partial)
