"""Headers and the URL as a channel (issue 12, class 6): the exchange driven with plain events."""

import json
from pathlib import Path

import pytest

from extproc.envoy import encode
from extproc.exchange import DECISION_HEADER, Exchange
from extproc.mask.headers import MAX_HEADER_CHARS, percent_view
from extproc.model import (
    Body,
    BodyMode,
    ContinueHeaders,
    Direction,
    HeaderChanges,
    Headers,
    ProtocolConfig,
    Reject,
)
from extproc.runtime import build_snapshot
from extproc.settings import load_settings

from .rules_fixture import EDM_KEY_FILE, PLAIN_POLICIES, RULES

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
BUFFERED, FDS = BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED
SNAPSHOT = build_snapshot(
    load_settings(
        None,
        detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
        policy={"paths": [str(PLAIN_POLICIES)]},
    )
)
CARD = "4111 1111 1111 1111"
CARD_DIGITS = "4111111111111111"
REDACTED_CARD = "[REDACTED:CREDIT_CARD]"
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def exchange(snapshot: object = SNAPSHOT) -> Exchange:
    return Exchange(snapshot, ProtocolConfig(BUFFERED, FDS), "d-1")  # type: ignore[arg-type]


def request(ex: Exchange, *items: tuple[str, str]) -> ContinueHeaders | Reject:
    base = ((":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json"))
    given = {name for name, _ in items}
    [reply] = ex.handle(Headers(REQ, tuple(p for p in base if p[0] not in given) + items, False))
    assert isinstance(reply, ContinueHeaders | Reject)
    return reply


def changed(reply: ContinueHeaders | Reject) -> dict[str, list[str]]:
    assert isinstance(reply, ContinueHeaders), reply
    out: dict[str, list[str]] = {}
    for name, value in reply.changes.set:
        out[name] = [value]
    for name, value in reply.changes.append:
        out.setdefault(name, []).append(value)
    return out


def refused(reply: ContinueHeaders | Reject) -> tuple[int, str]:
    assert isinstance(reply, Reject), reply
    return reply.status, json.loads(reply.body)["error"]


def answer(ex: Exchange, *items: tuple[str, str]) -> ContinueHeaders | Reject:
    ex.handle(Body(REQ, CHAT, True))
    replies = ex.handle(
        Headers(RESP, ((":status", "200"), ("content-type", "text/event-stream"), *items), False)
    )
    [reply] = replies
    assert isinstance(reply, ContinueHeaders | Reject)
    return reply


def test_a_card_in_a_request_header_is_masked_before_the_model_sees_it() -> None:
    ex = exchange()
    reply = request(ex, ("x-debug", f"card={CARD}"))
    assert changed(reply)["x-debug"] == [f"card={REDACTED_CARD}"]
    assert [f.entity for f in ex.findings[REQ]] == ["CREDIT_CARD"]


def test_a_card_in_a_header_name_removes_the_header() -> None:
    reply = request(exchange(), (f"x-{CARD_DIGITS}", "1"))
    assert isinstance(reply, ContinueHeaders)
    assert f"x-{CARD_DIGITS}" in reply.changes.remove


@pytest.mark.parametrize(
    ("path", "masked"),
    [
        (
            f"/v1/chat/completions?card={CARD_DIGITS}",
            "/v1/chat/completions?card=%5BREDACTED%3ACREDIT_CARD%5D",
        ),
        (
            "/v1/chat/completions?card=4111+1111+1111+1111",
            "/v1/chat/completions?card=%5BREDACTED%3ACREDIT_CARD%5D",
        ),
        (
            "/v1/chat/completions?card=4111%201111%201111%201111",
            "/v1/chat/completions?card=%5BREDACTED%3ACREDIT_CARD%5D",
        ),
        (
            "/v1/chat/completions?c=%34%31%31%31%31%31%31%31%31%31%31%31%31%31%31%31",
            "/v1/chat/completions?c=%5BREDACTED%3ACREDIT_CARD%5D",
        ),
        (
            "/v1/chat/completions?m=jane%2540example.com",
            "/v1/chat/completions?m=%5BREDACTED%3AEMAIL_ADDRESS%5D",
        ),
        (f"/v1/{CARD_DIGITS}/completions", "/v1/%5BREDACTED%3ACREDIT_CARD%5D/completions"),
    ],
    ids=["plain", "plus-as-space", "encoded-separator", "encoded-digits", "double-encoded-at", "in-the-path"],
)
def test_a_value_in_the_path_or_query_is_masked_however_it_is_percent_encoded(path: str, masked: str) -> None:
    assert changed(request(exchange(), (":path", path)))[":path"] == [masked]


def test_plus_is_a_space_only_in_the_query_and_decoding_keeps_offsets_to_the_raw_text() -> None:
    text, starts = percent_view("/a+b?c+%E2%82%AC", plus_from=4)
    assert text == "/a+b?c €"
    assert starts == [0, 1, 2, 3, 4, 5, 6, 7, 16]


def test_a_card_split_across_repeated_headers_is_masked_in_each_piece() -> None:
    ex = exchange()
    reply = request(ex, ("x-note", "4111 1111"), ("x-note", "1111 1111"))
    assert changed(reply)["x-note"] == [REDACTED_CARD, ""]
    mutation = encode(reply).request_headers.response.header_mutation
    [first, second] = [h for h in mutation.set_headers if h.header.key == "x-note"]
    assert (first.append_action, second.append.value) == (2, True)  # overwrite, then append


def test_other_values_of_a_repeated_header_are_kept_when_one_is_masked() -> None:
    ex = exchange()
    request(ex)
    reply = answer(ex, ("set-cookie", "a=1"), ("set-cookie", f"b={CARD}"), ("set-cookie", "c=3"))
    assert changed(reply)["set-cookie"] == ["a=1", f"b={REDACTED_CARD}", "c=3"]
    mutation = encode(reply).response_headers.response.header_mutation
    appended = [h.append.value for h in mutation.set_headers if h.header.key == "set-cookie"]
    assert appended == [False, True, True]


@pytest.mark.parametrize("header", ["host", ":authority", "content-type", "content-length", "x-envoy-note"])
def test_a_value_in_a_header_that_cannot_be_rewritten_refuses_the_request(header: str) -> None:
    value = f"{CARD_DIGITS}.example.com" if header in ("host", ":authority") else f"x {CARD}"
    assert refused(request(exchange(), (header, value))) == (403, "header_not_maskable")


def test_the_callers_credential_is_not_scanned_when_it_is_removed(tmp_path: Path) -> None:
    key = tmp_path / "model.key"
    key.write_text("model-key\n")
    snapshot = build_snapshot(
        load_settings(
            None,
            detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
            upstream={"credential_file": str(key)},
            policy={"paths": [str(PLAIN_POLICIES)]},
        )
    )
    ex = exchange(snapshot)
    reply = request(ex, ("authorization", f"Bearer {CARD_DIGITS}"), ("x-api-key", CARD_DIGITS))
    assert isinstance(reply, ContinueHeaders)
    assert dict(reply.changes.set)["authorization"] == "Bearer model-key"
    assert "x-api-key" in reply.changes.remove
    assert not ex.findings[REQ]


def test_regression_credential_headers_forwarded_without_an_upstream_credential_are_scanned() -> None:
    # Without upstream.credential_* nothing replaces or removes the caller's credential headers: they
    # reach the model as sent, so they are a channel like any other header.
    ex = exchange()
    reply = request(
        ex, ("authorization", f"Bearer {CARD_DIGITS}"), ("x-api-key", CARD), ("api-key", f"k {CARD}")
    )
    masked = changed(reply)
    assert masked["authorization"] == [f"Bearer {REDACTED_CARD}"]
    assert masked["x-api-key"] == [REDACTED_CARD]
    assert masked["api-key"] == [f"k {REDACTED_CARD}"]
    assert [f.entity for f in ex.findings[REQ]] == ["CREDIT_CARD"] * 3


POLICIES = """
policies:
  - id: default
    default: true
    request: {default: allow}
  - id: blocking-route
    match: {routes: ["/v1/blocked/*"]}
    request: {default: block}
  - id: strict-model
    match: {models: ["secret-*"]}
    request: {default: mask}
"""


@pytest.fixture
def policed(tmp_path: pytest.TempPathFactory) -> object:
    path = tmp_path / "policies.yaml"  # type: ignore[operator]
    path.write_text(POLICIES)
    return build_snapshot(
        load_settings(
            None,
            detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
            policy={"paths": [str(path)]},
        )
    )


def test_a_policy_that_blocks_a_header_finding_refuses_the_request(policed: object) -> None:
    ex = exchange(policed)
    reply = request(ex, (":path", "/v1/blocked/chat"), ("x-debug", CARD))
    assert refused(reply) == (403, "policy_blocked")
    assert ex.outcome().actions["request"] == (("credit-card", "CREDIT_CARD", "block"),)


def test_a_header_finding_allowed_is_let_through_and_recorded(policed: object) -> None:
    ex = exchange(policed)
    assert "x-debug" not in changed(request(ex, ("x-debug", CARD)))
    ex.handle(Body(REQ, CHAT, True))
    assert ex.outcome().actions["request"] == (("credit-card", "CREDIT_CARD", "allow"),)


def test_a_model_whose_policy_masks_what_the_headers_let_through_is_refused(policed: object) -> None:
    ex = exchange(policed)
    assert "x-debug" not in changed(request(ex, ("x-debug", CARD)))
    body = json.dumps({"model": "secret-1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    [reply] = ex.handle(Body(REQ, body, True))
    assert isinstance(reply, Reject)
    assert (reply.status, json.loads(reply.body)["error"]) == (403, "header_not_maskable")
    assert ex.outcome().policy == "strict-model"


def test_headers_over_the_bound_are_refused_before_any_scan() -> None:
    assert refused(request(exchange(), ("x-big", "a" * (MAX_HEADER_CHARS + 1)))) == (431, "headers_too_large")


def test_header_findings_reach_the_outcome_without_their_values() -> None:
    ex = exchange()
    request(ex, ("x-debug", f"card={CARD}"))
    ex.handle(Body(REQ, CHAT, True))
    outcome = ex.outcome()
    assert [f.rule_id for f in outcome.findings["request_headers"]] == ["credit-card"]
    assert outcome.actions["request"][0][2] == "mask"
    assert outcome.entities == {"CREDIT_CARD": 1}
    assert CARD not in repr(outcome)


def test_a_card_in_a_response_header_is_masked_before_the_client_sees_it() -> None:
    ex = exchange()
    request(ex)
    reply = answer(ex, ("x-debug", f"card={CARD}"), ("location", f"https://x.test/cb?token={CARD_DIGITS}"))
    masked = changed(reply)
    assert masked["x-debug"] == [f"card={REDACTED_CARD}"]
    assert masked["location"] == ["https://x.test/cb?token=%5BREDACTED%3ACREDIT_CARD%5D"]
    assert masked[DECISION_HEADER] == ["d-1"]
    assert ex.outcome().findings["response_headers"]


def test_a_value_in_a_response_header_that_cannot_be_rewritten_is_a_502() -> None:
    ex = exchange()
    request(ex)
    ex.handle(Body(REQ, CHAT, True))
    head = Headers(RESP, ((":status", "200"), ("content-type", f"text/plain; x={CARD_DIGITS}")), False)
    [reply] = ex.handle(head)
    assert isinstance(reply, Reject)
    assert (reply.status, json.loads(reply.body)["error"]) == (502, "upstream_header_not_maskable")


def test_a_body_less_answer_has_its_headers_masked_too() -> None:
    ex = exchange()
    request(ex)
    ex.handle(Body(REQ, CHAT, True))
    [reply] = ex.handle(Headers(RESP, ((":status", "204"), ("x-debug", CARD)), True))
    assert changed(reply)["x-debug"] == [REDACTED_CARD]


def test_a_header_value_that_is_not_utf8_goes_back_as_the_same_bytes() -> None:
    raw = b"\xff\xfe card " + CARD.encode()
    value = raw.decode("utf-8", "surrogateescape")
    reply = request(exchange(), ("x-bin", value))
    mutation = encode(reply).request_headers.response.header_mutation  # type: ignore[arg-type]
    [header] = [h for h in mutation.set_headers if h.header.key == "x-bin"]
    assert header.header.raw_value == b"\xff\xfe card " + REDACTED_CARD.encode()


def test_no_change_when_headers_hold_nothing() -> None:
    reply = request(exchange(), ("x-note", "hello"), (":path", "/v1/chat/completions?a=%41"))
    assert isinstance(reply, ContinueHeaders)
    assert reply.changes.append == ()
    assert {name for name, _ in reply.changes.set} == {DECISION_HEADER}
    assert reply.changes == HeaderChanges(set=reply.changes.set, remove=reply.changes.remove)
