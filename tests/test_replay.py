"""The session record built from real exchanges, and replayed: unchanged rules decide the same, a new
rule shows where it changes a decision; what cannot be replayed is said, never fatal."""

import json
import uuid
from pathlib import Path

import pytest

from extproc.audit.keys import generate_keys, load_opening_key, load_sealing_key, load_signing_key
from extproc.audit.record import open_sealed
from extproc.audit.session import build_record, open_originals, seal_originals
from extproc.audit.writer import RecordWriter
from extproc.cli import REPLAY_CHANGED, REPLAY_NOT_REPLAYED, REPLAY_UNVERIFIED, main
from extproc.errors import ClientError, ConfigError
from extproc.exchange import UNMASKED_HEADER, Exchange
from extproc.identity import Principal
from extproc.model import Body, BodyMode, Direction, Headers, ProtocolConfig, RecordedBody
from extproc.replay import NOT_SEALED, OTHER_KEY, Replayed, replay
from extproc.runtime import Snapshot, build_snapshot
from extproc.settings import load_settings

from .rules_fixture import EDM_KEY_FILE, RULES

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
PROTOCOL = ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED)
POLICIES = Path(__file__).resolve().parent / "data" / "policies" / "policies.yaml"
CARD = "4111 1111 1111 1111"
CODENAME = """\
rules:
- id: codename
  entity: CODENAME
  category: confidential
  severity: high
  pattern: '\\bFalcon\\b'
  samples: {match: ["Project Falcon"], no_match: ["falcons"]}
"""


def snapshot(tmp_path: Path, *rules: Path) -> Snapshot:
    settings = load_settings(
        None,
        detect={"rules": [str(r) for r in rules or (RULES,)], "edm_key_file": str(EDM_KEY_FILE)},
        limits={"max_event_bytes": 1024},
        policy={"paths": [str(POLICIES)]},
        audit={
            "record_path": str(tmp_path / "unused.jsonl"),
            "sealing_key_file": str(tmp_path / "keys" / "auditor.pub"),
        },
    )
    return build_snapshot(settings)


def chat(text: str, stream: bool = False) -> bytes:
    return json.dumps(
        {"model": "m", "stream": stream, "messages": [{"role": "user", "content": text}]}
    ).encode()


def sse(*pieces: str) -> bytes:
    events = [
        "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}) + "\n\n" for p in pieces
    ]
    return "".join([*events, "data: [DONE]\n\n"]).encode()


def run(
    snap: Snapshot,
    prompt: bytes | None,
    answer: bytes | None,
    media: str = "application/json",
    groups: frozenset[str] = frozenset(),
    unmasked: bool = False,
) -> Exchange:
    caller = Principal("alice", "https://idp.test", groups, {}, None) if groups else None
    ex = Exchange(snap, PROTOCOL, uuid.uuid4().hex, caller=caller)
    items = [(":path", "/v1/chat/completions"), (":method", "POST"), ("content-type", "application/json")]
    if unmasked:
        items.append((UNMASKED_HEADER, "true"))
    ex.handle(Headers(REQ, tuple(items), prompt is None))
    if prompt is not None and not ex.finished:
        ex.handle(Body(REQ, prompt, True))
    if answer is not None and not ex.finished:
        ex.handle(Headers(RESP, ((":status", "200"), ("content-type", media)), False))
        ex.handle(Body(RESP, answer, True))
    return ex


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    return generate_keys(tmp_path / "keys")


def write(path: Path, keys: dict[str, Path], exchanges: list[Exchange], signed: bool = False) -> None:
    sealing = load_sealing_key(keys["auditor_pub"])
    writer = RecordWriter(path=path, signing_key=load_signing_key(keys["signing_key"]) if signed else None)
    writer.start()
    for ex in exchanges:
        writer.submit(build_record(ex.outcome(), ex.recorded(), None, sealing))
    writer.close()


def replayed(path: Path, keys: dict[str, Path], snap: Snapshot) -> dict[str, Replayed]:
    return {r.record_id: r for r in replay(path, load_opening_key(keys["auditor_key"]), snap)}


def test_the_same_rules_decide_every_recorded_exchange_the_same(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = snapshot(tmp_path)
    exchanges = [
        run(snap, chat(f"card {CARD}"), b'{"choices":[{"message":{"content":"mail jane@example.com"}}]}'),
        run(snap, chat("hi", stream=True), sse("mail jane@exa", "mple.com now"), media="text/event-stream"),
        run(snap, b"{not json", None),  # refused: invalid_json
        run(snap, None, b'{"data": []}'),  # no request body (a GET)
        run(snap, chat("x"), b"data: " + b"y" * 2048 + b"\n\n", media="text/event-stream"),  # cut: too large
        run(snap, chat(f"card {CARD}"), b"{}", unmasked=True),  # refused: unmasked_not_allowed
    ]
    decisions = [ex.outcome().decision for ex in exchanges]
    assert decisions == ["masked", "masked", "refused", "allowed", "cut", "refused"]
    path = tmp_path / "session.jsonl"
    write(path, keys, exchanges)
    results = replayed(path, keys, snap)
    assert len(results) == len(exchanges)
    for result in results.values():
        assert result.after is not None, result.notes
        assert not result.changed, (result.summary, result.changes)


def test_a_new_rule_shows_where_it_changes_decisions(tmp_path: Path, keys: dict[str, Path]) -> None:
    snap = snapshot(tmp_path)
    falcon = run(snap, chat("status of Falcon"), b'{"choices":[]}')
    other = run(snap, chat("nothing here"), b'{"choices":[]}')
    path = tmp_path / "session.jsonl"
    write(path, keys, [falcon, other])
    (tmp_path / "codename.yaml").write_text(CODENAME)
    results = replayed(path, keys, snapshot(tmp_path, RULES, tmp_path / "codename.yaml"))
    changed = results[falcon.decision_id]
    assert changed.changes == ["decision: allowed -> masked", "request: +codename:mask"]
    assert not results[other.decision_id].changed


def test_what_cannot_be_replayed_is_reported(tmp_path: Path, keys: dict[str, Path]) -> None:
    snap = snapshot(tmp_path)
    path = tmp_path / "session.jsonl"
    write(path, keys, [run(snap, chat("a"), b"{}"), run(snap, chat("b"), b"{}")])
    lines = path.read_text().splitlines()
    damaged = json.loads(lines[2])
    del damaged["sealed"]
    lines[2] = json.dumps(damaged)
    lines.insert(2, '{"type":"exch')  # a torn line: skipped here, judged by verify
    path.write_text("\n".join(lines) + "\n")
    other_keys = generate_keys(tmp_path / "other")
    results = list(replay(path, load_opening_key(other_keys["auditor_key"]), snap))
    assert [r.after for r in results] == [None, None]
    assert results[0].notes[0].startswith("cannot open: sealed for key")
    assert results[1].notes == ["no sealed originals: not replayed"]
    assert [r.unreplayable for r in results] == [OTHER_KEY, NOT_SEALED]


def test_a_body_sent_with_a_value_in_clear_is_kept_only_sealed(tmp_path: Path, keys: dict[str, Path]) -> None:
    # Fraud investigators may ask for unmasked answers: what they got holds the card in clear, so the
    # record keeps that body only in the sealed originals.
    snap = snapshot(tmp_path)
    answer = json.dumps({"choices": [{"message": {"content": f"card {CARD}"}}]}).encode()
    ex = run(snap, chat("the card?"), answer, groups=frozenset({"investigators"}), unmasked=True)
    outcome = ex.outcome()
    assert outcome.unmasked
    record = build_record(outcome, ex.recorded(), None, load_sealing_key(keys["auditor_pub"]))
    assert record["response"]["masked"] is None
    assert "withheld" in record["response"]
    assert "4111" not in json.dumps(record)
    opened = open_originals(
        open_sealed(record["sealed"], load_opening_key(keys["auditor_key"]), ex.decision_id)
    )
    assert opened["response"] == answer


@pytest.mark.parametrize(
    ("path", "request_id"),
    [(f"/v1/{CARD}", CARD), ("/v1/users/jane%40example.com/chat", "4111%201111%201111%201111")],
    ids=["plain", "percent-encoded"],
)
def test_client_chosen_strings_are_masked_before_they_are_shown(
    tmp_path: Path, path: str, request_id: str
) -> None:
    snap = snapshot(tmp_path)
    ex = Exchange(snap, PROTOCOL, "d-9")
    items = ((":path", path), ("x-request-id", request_id), ("content-type", "application/json"))
    ex.handle(Headers(REQ, items, False))
    ex.handle(Body(REQ, json.dumps({"model": CARD, "messages": []}).encode(), True))
    outcome = ex.outcome()
    for shown in (outcome.model, outcome.route, outcome.request_id):
        assert shown is not None
        assert "1111 1111" not in shown
        assert "1111%201111" not in shown
        assert "jane" not in shown
    assert ex.shown_request_id == outcome.request_id
    assert ex.error_body(ClientError("x"))["request_id"] == request_id  # the client still gets its own id


def test_a_plain_request_id_is_shown_as_it_is(tmp_path: Path) -> None:
    ex = Exchange(snapshot(tmp_path), PROTOCOL, "d-11")
    ex.handle(Headers(REQ, (("x-request-id", "a7101958-43ef-901f-a5f1-572ad462cb46"),), True))
    assert ex.outcome().request_id == "a7101958-43ef-901f-a5f1-572ad462cb46"


def test_a_cut_stream_is_recorded_with_the_request_id_as_shown(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    ex = Exchange(snap, PROTOCOL, "d-12")
    items = ((":path", "/v1/chat/completions"), ("x-request-id", "jane@example.com"))
    ex.handle(Headers(REQ, (*items, ("content-type", "application/json")), False))
    ex.handle(Body(REQ, chat("hi"), True))
    ex.handle(Headers(RESP, ((":status", "200"), ("content-type", "text/event-stream")), False))
    [cut] = ex.handle(Body(RESP, b"data: " + b"y" * 2048 + b"\n\n", False))
    assert b"jane@example.com" in cut.data  # type: ignore[union-attr]  # the client gets its own id
    response = ex.recorded().response
    assert response is not None
    assert response.masked is not None
    assert b"jane@example.com" not in response.masked
    assert b"upstream_too_large" in response.masked


def test_a_request_without_a_content_type_is_recorded_and_replays_the_same(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = snapshot(tmp_path)
    ex = Exchange(snap, PROTOCOL, "d-13")
    ex.handle(Headers(REQ, ((":path", "/v1/raw"),), False))  # scanned as text
    ex.handle(Body(REQ, f"card {CARD}".encode(), True))
    ex.handle(Headers(RESP, ((":status", "200"), ("content-type", "text/plain")), True))
    assert ex.recorded().request is not None
    path = tmp_path / "session.jsonl"
    write(path, keys, [ex])
    [result] = replayed(path, keys, snap).values()
    assert result.after is not None
    assert not result.changed, result.changes


def test_originals_recorded_in_part_are_decided_again_but_not_compared(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    snap = snapshot(tmp_path)
    small = build_snapshot(
        snap.settings.model_copy(
            update={"audit": snap.settings.audit.model_copy(update={"max_body_bytes": 40})}
        )
    )
    ex = run(small, chat(f"a long prompt with a card {CARD} at its end"), b'{"choices": []}')
    path = tmp_path / "session.jsonl"
    write(path, keys, [ex])
    [result] = replayed(path, keys, snap).values()
    assert not result.comparable
    assert not result.changed  # the cut JSON no longer parses: that is not a change of decision
    assert any("recorded in part" in note for note in result.notes)


def test_the_queue_must_hold_one_record() -> None:
    with pytest.raises(ConfigError, match="max_queue_bytes"):
        load_settings(None, audit={"max_body_bytes": 32 * 1024 * 1024, "max_queue_bytes": 64 * 1024 * 1024})


def test_an_exchange_that_ended_before_its_answer_is_incomplete(tmp_path: Path) -> None:
    snap = snapshot(tmp_path)
    ex = Exchange(snap, PROTOCOL, "d-10")
    ex.handle(Headers(REQ, ((":path", "/v1/chat/completions"), ("content-type", "application/json")), False))
    ex.handle(Body(REQ, chat("hi"), True))
    ex.handle(Headers(RESP, ((":status", "200"), ("content-type", "text/event-stream")), False))
    ex.handle(Body(RESP, sse("partial")[:40], False))
    assert ex.outcome().decision == "incomplete"


def test_sealed_originals_are_framed_raw_and_checked() -> None:
    request = RecordedBody("application/json", b"\x00\xffraw", 5, b"x", 1)
    response = RecordedBody("text/plain", b"answer", 10, b"y", 1, "200")
    opened = open_originals(seal_originals(request, response))
    assert opened == {"request": b"\x00\xffraw", "response": b"answer"}
    framed = seal_originals(None, response)
    assert open_originals(framed) == {"request": None, "response": b"answer"}
    with pytest.raises(ValueError, match="longer"):
        open_originals(framed + b"extra")
    with pytest.raises(ValueError, match="not as long"):
        open_originals(framed[:-1])
    with pytest.raises(ValueError, match="header"):
        open_originals(b"no header")


# -- `audit replay` as a CI gate: exit statuses, and the chain checked first ---------------------------


@pytest.fixture
def recorded(tmp_path: Path, keys: dict[str, Path]) -> Path:
    """A signed record of three exchanges, each with its originals sealed."""
    snap = snapshot(tmp_path)
    exchanges = [
        run(snap, chat(f"card {CARD}"), b'{"choices":[{"message":{"content":"mail jane@example.com"}}]}'),
        run(snap, chat("status of Falcon"), b'{"choices":[]}'),
        run(snap, b"{not json", None),
    ]
    path = tmp_path / "session.jsonl"
    write(path, keys, exchanges, signed=True)
    return path


def gate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: Path, key: Path, *extra: str
) -> tuple[int, str, str]:
    """``extproc audit replay`` with the test pack and policies: (exit status, stdout, stderr)."""
    config = tmp_path / "replay-settings.yaml"
    config.write_text(f"detect:\n  edm_key_file: {EDM_KEY_FILE}\n")
    args = ["audit", "replay", str(path), "--key", str(key), "--rules", str(RULES)]
    status = main([*args, "--policies", str(POLICIES), "--config", str(config), *extra])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_gate_passes_when_nothing_changes_and_says_the_chain_was_verified(
    tmp_path: Path, keys: dict[str, Path], recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = gate(tmp_path, capsys, recorded, keys["auditor_key"], "--fail-on-change")
    assert (status, out) == (0, ""), err
    assert "hash chain verified, signatures NOT checked (give --public-key); 3 exchanges" in err
    assert "0 decided differently" in err
    assert "0 not replayable," in err
    signed = gate(
        tmp_path,
        capsys,
        recorded,
        keys["auditor_key"],
        "--fail-on-change",
        "--public-key",
        str(keys["signing_pub"]),
    )
    assert signed[0] == 0, signed[2]
    assert "hash chain verified, signed through seq" in signed[2]


def test_the_gate_fails_when_the_key_opens_nothing(
    tmp_path: Path, keys: dict[str, Path], recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A wrong --key replays nothing: that is not "nothing changed".
    other = generate_keys(tmp_path / "other")
    status, out, err = gate(tmp_path, capsys, recorded, other["auditor_key"], "--fail-on-change")
    assert status == REPLAY_NOT_REPLAYED, err
    assert f"3 not replayable (3 {OTHER_KEY})" in err
    assert "cannot open: sealed for key" in out
    # Without --fail-on-change the report is the same, and the status says it ran.
    assert gate(tmp_path, capsys, recorded, other["auditor_key"])[0] == 0


def test_not_replayed_wins_over_changed(
    tmp_path: Path, keys: dict[str, Path], recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = recorded.read_text().splitlines()
    exchanges = [n for n, line in enumerate(lines) if json.loads(line)["type"] == "exchange"]
    for n, decision in zip(exchanges, ("allowed", None), strict=False):  # one changed, one unsealed
        record = json.loads(lines[n])
        if decision is None:
            del record["sealed"]
        else:
            record["decision"] = decision
        lines[n] = json.dumps(record)
    recorded.write_text("\n".join(lines) + "\n")
    status, _, err = gate(tmp_path, capsys, recorded, keys["auditor_key"], "--fail-on-change", "--no-verify")
    assert status == REPLAY_NOT_REPLAYED, err
    assert (
        f"1 decided differently, 0 recorded in part (not compared), 1 not replayable (1 {NOT_SEALED})" in err
    )


def test_a_tampered_record_is_refused_unless_no_verify_is_given(
    tmp_path: Path, keys: dict[str, Path], recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = recorded.read_text().splitlines()
    n = next(n for n, line in enumerate(lines) if json.loads(line).get("decision") == "masked")
    record = json.loads(lines[n])
    record["decision"] = "allowed"  # rewritten to hide what the rules did
    lines[n] = json.dumps(record)
    recorded.write_text("\n".join(lines) + "\n")
    for extra in ((), ("--fail-on-change",)):
        status, out, err = gate(tmp_path, capsys, recorded, keys["auditor_key"], *extra)
        assert status == REPLAY_UNVERIFIED, err
        assert out == ""
        assert f"line {n + 1} (seq " in err
        assert "hash does not match" in err
        assert "nothing replayed" in err
    status, out, err = gate(
        tmp_path, capsys, recorded, keys["auditor_key"], "--fail-on-change", "--no-verify"
    )
    assert status == REPLAY_CHANGED, err
    assert "warning: hash chain NOT verified (--no-verify)" in err
    assert "hash chain NOT verified; 3 exchanges" in err
    assert "decision: allowed -> masked" in out


def test_a_file_signed_by_another_key_is_refused(
    tmp_path: Path, keys: dict[str, Path], recorded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = generate_keys(tmp_path / "other")
    status, _, err = gate(
        tmp_path, capsys, recorded, keys["auditor_key"], "--public-key", str(other["signing_pub"])
    )
    assert status == REPLAY_UNVERIFIED, err
    assert "checkpoint signed by an" in err


def test_only_the_verified_lines_are_replayed(tmp_path: Path, keys: dict[str, Path], recorded: Path) -> None:
    # A writer still appending: what it writes after the check was not verified, and is not replayed.
    lines = recorded.read_text().splitlines()
    last = max(n for n, line in enumerate(lines, 1) if json.loads(line)["type"] == "exchange")
    key = load_opening_key(keys["auditor_key"])
    everything = list(replay(recorded, key, snapshot(tmp_path)))
    verified = list(replay(recorded, key, snapshot(tmp_path), through_line=last - 1))
    assert [r.line for r in verified] == [r.line for r in everything][:-1]


def test_replay_help_documents_its_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["audit", "replay", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for status in (REPLAY_CHANGED, REPLAY_NOT_REPLAYED, REPLAY_UNVERIFIED):
        assert f"\n  {status}  " in shown
    assert "--no-verify" in shown
