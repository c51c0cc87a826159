"""Findings are values, not rule hits: one value found by several rules is one finding, reported as the
most specific rule with the others named in ``also_matched``; a policy still weighs every one of them, and
streams report what block mode reports."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.audit.session import build_record
from extproc.audit.spans import FINDINGS_ENTITY, FINDINGS_TOTAL, RULES, span_attributes
from extproc.detect.engine import Detector
from extproc.detect.rules import load_rules
from extproc.exchange import Exchange
from extproc.model import Body, BodyMode, Direction, Finding, Headers, ProtocolConfig, Reject, ReplaceBody
from extproc.runtime import build_snapshot
from extproc.settings import REPO_RULES, load_settings

from .rules_fixture import hyperscan_cache

REQ = Direction.REQUEST
CARD = "4111 1111 1111 1111"
CARD_TEXT = f"my credit card is {CARD}, thanks"
PACK = load_rules([REPO_RULES])
_DETECTOR = Detector(PACK, cache_dir=hyperscan_cache())


@pytest.fixture(scope="module")
def detector() -> Detector:
    return _DETECTOR


def card(start: int = 18) -> Finding:
    return Finding("credit-card", "CREDIT_CARD", start, start + len(CARD), ("credit-card-keyword",))


# -- the detector -----------------------------------------------------------------------------------------


def test_one_card_is_one_finding_and_names_the_other_rule(detector: Detector) -> None:
    assert detector.scan(CARD_TEXT) == [card()]
    # Each rule still finds it on its own: what a rule's samples are checked against.
    assert [f.rule_id for f in detector.scan(CARD_TEXT, merged=False)] == [
        "credit-card",
        "credit-card-keyword",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Same span: both without keywords, same severity and length: the earlier rule in file order wins.
        (
            "phone +1 415-555-0176",
            Finding(
                "phone-number-us",
                "PHONE_NUMBER",
                6,
                21,
                ("phone-number-international", "phone-number-keyword"),
            ),
        ),
        # Different spans (the keyword rule leaves out "+44 "): one finding over both, the rule without
        # keywords reports it.
        (
            "mobile: +44 20 7123 4567",
            Finding("phone-number-international", "PHONE_NUMBER", 8, 24, ("phone-number-keyword",)),
        ),
    ],
)
def test_one_phone_number_is_one_finding_over_the_span_every_rule_covers(
    detector: Detector, text: str, expected: Finding
) -> None:
    assert detector.scan(text) == [expected]


def test_two_values_stay_two_findings(detector: Detector) -> None:
    text = f"card {CARD} and card 5555 5555 5555 4444"
    found = detector.scan(text)
    assert [(f.rule_id, text[f.start : f.end], f.also_matched) for f in found] == [
        ("credit-card", CARD, ("credit-card-keyword",)),
        ("credit-card", "5555 5555 5555 4444", ("credit-card-keyword",)),
    ]


def test_the_most_specific_rule_reports_the_value() -> None:
    """Higher severity, then the rule without keywords, then the longer span, then file order."""
    detector = Detector(PACK, cache_dir=hyperscan_cache())
    detector._rank = {  # (minus the severity, whether it needs keywords, file order)
        "low-wide": (0, False, 0),
        "high-keyword": (-2, True, 1),
        "high-short": (-2, False, 2),
        "high-long": (-2, False, 3),
        "high-long-later": (-2, False, 4),
    }
    one = [
        Finding("low-wide", "X", 0, 20),
        Finding("high-keyword", "X", 0, 20),
        Finding("high-short", "X", 2, 10),
        Finding("high-long", "X", 1, 12),
        Finding("high-long-later", "X", 1, 12),
    ]
    assert detector.merge(one) == [
        Finding("high-long", "X", 0, 20, ("high-long-later", "high-short", "high-keyword", "low-wide"))
    ]
    # Another entity over the same characters is another finding.
    assert len(detector.merge([*one, Finding("other", "Y", 0, 20)])) == 2
    # Merging is idempotent.
    assert detector.merge(detector.merge(one)) == detector.merge(one)


# -- streams report what block mode reports -----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([CARD_TEXT, "phone +1 415-555-0176", "mobile: +44 20 7123 4567 or cell (212) 555-0187"]),
    st.lists(st.integers(min_value=1, max_value=7), max_size=30),
)
def test_a_stream_cut_anywhere_merges_as_block_mode_does(text: str, sizes: list[int]) -> None:
    detector = _DETECTOR
    scanner = detector.stream()
    found, position = [], 0
    for size in [*sizes, len(text)]:
        found += scanner.feed(text[position : position + size])[1]
        position += size
    found += scanner.finish()[1]
    assert sorted(found, key=lambda f: (f.start, f.end, f.rule_id)) == detector.scan(text)
    assert all(f.also_matched for f in found)


# -- the exchange: counts, spans, the record, and the policy ------------------------------------------------


def _exchange(tmp_path: Path, policy: str, content: str) -> tuple[Exchange, list[object]]:
    (tmp_path / "p.yaml").write_text(policy, encoding="utf-8")
    snapshot = build_snapshot(
        load_settings(None, detect={"rules": [str(REPO_RULES)]}, policy={"paths": [str(tmp_path)]})
    )
    ex = Exchange(snapshot, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d")
    items = ((":path", "/v1/chat/completions"), ("content-type", "application/json"))
    replies: list[object] = list(ex.handle(Headers(REQ, items, False)))
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    replies += ex.handle(Body(REQ, json.dumps(body).encode(), True))
    return ex, replies


MASKING = "policies:\n  - id: base\n    default: true\n"


def test_one_card_counts_once_in_the_outcome_the_span_and_the_record(tmp_path: Path) -> None:
    ex, replies = _exchange(tmp_path, MASKING, CARD_TEXT)
    [reply] = [r for r in replies if isinstance(r, ReplaceBody)]
    assert reply.data is not None
    assert json.loads(reply.data)["messages"][0]["content"] == "my credit card is **** **** **** 1111, thanks"
    outcome = ex.outcome()
    assert outcome.entities == {"CREDIT_CARD": 1}
    assert outcome.actions == {"request": (("credit-card", "CREDIT_CARD", "mask"),)}
    assert outcome.rules == ("credit-card", "credit-card-keyword")  # every rule that found something
    attributes = span_attributes(outcome)
    assert attributes[FINDINGS_TOTAL] == 1
    assert attributes[FINDINGS_ENTITY + "CREDIT_CARD"] == 1
    assert attributes[RULES] == ["credit-card", "credit-card-keyword"]
    record = build_record(outcome, ex.recorded(), None, None)
    [finding] = record["findings"]["request"]
    assert finding["rule"] == "credit-card"
    assert finding["also_matched"] == ["credit-card-keyword"]


@pytest.mark.parametrize(
    ("selector", "action", "code"),
    [
        ("{ rules: [credit-card-keyword] }", "block", "policy_blocked"),
        ("{ rules: [credit-card-keyword] }", "approve", "approval_required"),
        ("{ rules: [phone-number-keyword] }", "block", None),  # names neither rule: the card is masked
    ],
)
def test_a_policy_acting_on_a_rule_that_does_not_report_the_value_still_acts(
    tmp_path: Path, selector: str, action: str, code: str | None
) -> None:
    policy = (
        "policies:\n  - id: base\n    default: true\n    request:\n      actions:\n"
        f"        - when: {selector}\n          do: {action}\n"
    )
    ex, replies = _exchange(tmp_path, policy, CARD_TEXT)
    rejects = [r for r in replies if isinstance(r, Reject)]
    if code is None:
        assert rejects == []
        assert [(r, a) for r, _, a in ex.outcome().actions["request"]] == [("credit-card", "mask")]
    else:
        [reject] = rejects
        assert (reject.status, json.loads(reject.body)["error"]) == (403, code)
        # The decision names the rule that reports the value, with the strictest action any rule got.
        assert [(r, a) for r, _, a in ex.outcome().actions["request"]] == [("credit-card", action)]


def test_the_strictest_action_wins_whichever_rule_reports_the_value(tmp_path: Path) -> None:
    policy = (
        "policies:\n  - id: base\n    default: true\n    request:\n      actions:\n"
        "        - when: { rules: [credit-card] }\n          do: allow\n"
        "        - when: { rules: [credit-card-keyword] }\n          do: mask\n          strategy: redact\n"
    )
    ex, replies = _exchange(tmp_path, policy, CARD_TEXT)
    [reply] = [r for r in replies if isinstance(r, ReplaceBody)]
    assert reply.data is not None
    assert (
        json.loads(reply.data)["messages"][0]["content"] == "my credit card is [REDACTED:CREDIT_CARD], thanks"
    )
    assert ex.outcome().actions == {"request": (("credit-card", "CREDIT_CARD", "mask"),)}


def test_a_rule_only_the_joined_strings_reveal_still_reaches_the_policy(tmp_path: Path) -> None:
    """Read alone, the second message's card is found by credit-card only (and let through); read joined
    with the first, by credit-card-keyword too. The joined finding has the same span and reporting rule as
    the one found alone, but the policy blocking the keyword rule must still hear of it."""
    policy = (
        "policies:\n  - id: base\n    default: true\n    request:\n      actions:\n"
        "        - when: { rules: [credit-card] }\n          do: allow\n"
        "        - when: { rules: [credit-card-keyword] }\n          do: block\n"
    )
    (tmp_path / "p.yaml").write_text(policy, encoding="utf-8")
    snapshot = build_snapshot(
        load_settings(None, detect={"rules": [str(REPO_RULES)]}, policy={"paths": [str(tmp_path)]})
    )
    ex = Exchange(snapshot, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d")
    items = ((":path", "/v1/chat/completions"), ("content-type", "application/json"))
    list(ex.handle(Headers(REQ, items, False)))
    messages = [{"role": "user", "content": "here is my debit card"}, {"role": "user", "content": CARD}]
    body = json.dumps({"model": "m", "messages": messages}).encode()
    [reply] = ex.handle(Body(REQ, body, True))
    assert isinstance(reply, Reject)
    assert json.loads(reply.body)["error"] == "policy_blocked"


@pytest.mark.parametrize("alone", ["mask", "allow"])
def test_a_refusal_only_the_joined_strings_reveal_holds_when_the_value_was_masked_alone(
    tmp_path: Path, alone: str
) -> None:
    """Regression: masked alone (credit-card: mask), the card was gone from the joined reading, so the
    keyword rule's block never fired and a refusal became a mask."""
    policy = (
        "policies:\n  - id: base\n    default: true\n    request:\n      actions:\n"
        f"        - when: {{ rules: [credit-card] }}\n          do: {alone}\n"
        "        - when: { rules: [credit-card-keyword] }\n          do: block\n"
    )
    (tmp_path / "p.yaml").write_text(policy, encoding="utf-8")
    snapshot = build_snapshot(
        load_settings(None, detect={"rules": [str(REPO_RULES)]}, policy={"paths": [str(tmp_path)]})
    )
    for messages in (
        [{"role": "user", "content": "here is my debit card"}, {"role": "user", "content": CARD}],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "credit card:"}, {"type": "text", "text": CARD}],
            }
        ],
    ):
        ex = Exchange(snapshot, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d")
        items = ((":path", "/v1/chat/completions"), ("content-type", "application/json"))
        list(ex.handle(Headers(REQ, items, False)))
        body = json.dumps({"model": "m", "messages": messages}).encode()
        [reply] = ex.handle(Body(REQ, body, True))
        assert isinstance(reply, Reject), messages
        assert json.loads(reply.body)["error"] == "policy_blocked"
        assert [a for _, _, a in ex.outcome().actions["request"]][-1] == "block"
