"""Masking strategies and the body processors, on the engine's test rule pack."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.errors import ExtProcError, UpstreamError
from extproc.mask import Masker
from extproc.mask.bodies import BufferedJson, BufferedText, SseEvents, StreamingText
from extproc.model import Finding

from .rules_fixture import HASH_KEY, inspector

INSPECTOR = inspector()
TOO_LARGE = UpstreamError("too large", code="upstream_too_large")
INVALID = UpstreamError("invalid")


def mask(text: str) -> str:
    return INSPECTOR.mask_text(text)[0]


def test_strategies() -> None:
    text = "jane@example.com, card 4111 1111 1111 1111, zip 94105, employee E123456, Geheimsache 12-ä!"
    assert mask(text) == (
        "[REDACTED:EMAIL_ADDRESS], card [REDACTED:CREDIT_CARD], zip ***05, "
        "employee [EMPLOYEE_ID:" + mask("employee E123456").split(":")[1][:16] + "], !"
    )


def test_hash_tokens_are_stable_and_keyed() -> None:
    first = mask("employee E123456")
    assert first == mask("staff E123456").replace("staff", "employee")
    assert first != mask("employee E654321")
    other_key = Masker({"employee-id": INSPECTOR.detector.rules[3].rule.mask}, b"another-key-0123456789")
    finding = Finding("employee-id", "EMPLOYEE_ID", 0, 7)
    assert other_key.replacement(finding, "E123456") != INSPECTOR.masker.replacement(finding, "E123456")
    assert HASH_KEY != b"another-key-0123456789"


def test_mask_keeps_separators_and_the_last_characters() -> None:
    masker = Masker({"c": INSPECTOR.detector.rules[4].rule.mask.model_copy(update={"keep": 4})}, HASH_KEY)
    assert masker.apply("4111-1111-1111-1111", [Finding("c", "CREDIT_CARD", 0, 19)]) == "****-****-****-1111"


def test_redaction_touches_only_findings() -> None:
    masked, findings = INSPECTOR.mask_text("mail jane@example.com now")
    assert masked == "mail [REDACTED:EMAIL_ADDRESS] now"
    assert findings == [Finding("email-address", "EMAIL_ADDRESS", 5, 21)]


def test_overlapping_findings_merge() -> None:
    masker = Masker({}, HASH_KEY)
    findings = [Finding("a", "A", 2, 6), Finding("b", "B", 4, 9)]
    assert masker.apply("0123456789", findings) == "01[REDACTED:A]9"


PIECES = [
    "jane@example.com",
    "4111 1111 1111 1111",
    "zip 94105",
    "employee E123456",
    "Bluebird-7",
    " ",
    "a",
    "-",
    "@",
]


@given(st.lists(st.sampled_from(PIECES), max_size=30).map(" ".join))
def test_masking_is_idempotent_and_leaves_no_value(text: str) -> None:
    once, _ = INSPECTOR.mask_text(text)
    twice, found = INSPECTOR.mask_text(once)
    assert twice == once
    assert found == []
    for value in ("jane@example.com", "4111 1111 1111 1111", "E123456", "Bluebird-7"):
        assert value not in once


def test_json_values_are_masked_and_document_stays_valid() -> None:
    body = json.dumps({"a": ["x", {"b": "card 4111 1111 1111 1111"}], "n": 3, "e": "jane\u0040example.com"})
    body = body.replace("\\u0040", "\\u0040")
    processor = BufferedJson(INSPECTOR, 1 << 20, TOO_LARGE, INVALID)
    out = processor.feed(body.encode()) + processor.finish()
    assert json.loads(out) == {
        "a": ["x", {"b": "card [REDACTED:CREDIT_CARD]"}],
        "n": 3,
        "e": "[REDACTED:EMAIL_ADDRESS]",
    }


def test_json_escapes_are_decoded_before_scanning() -> None:
    body = b'{"e": "jane\\u0040example.com"}'
    processor = BufferedJson(INSPECTOR, 1 << 20, TOO_LARGE, INVALID)
    assert json.loads(processor.feed(body) + processor.finish()) == {"e": "[REDACTED:EMAIL_ADDRESS]"}


def test_json_without_findings_is_released_byte_for_byte() -> None:
    body = b'{ "a" : "plain",   "b": [1, 2] }'
    processor = BufferedJson(INSPECTOR, 1 << 20, TOO_LARGE, INVALID)
    assert processor.feed(body) + processor.finish() == body


def test_invalid_json_and_size_limit() -> None:
    processor = BufferedJson(INSPECTOR, 1 << 20, TOO_LARGE, INVALID)
    processor.feed(b"{not json")
    with pytest.raises(ExtProcError, match="invalid"):
        processor.finish()
    small = BufferedText(INSPECTOR, 10, TOO_LARGE)
    small.feed(b"12345")
    with pytest.raises(ExtProcError, match="too large"):
        small.feed(b"123456")


def test_text_keeps_non_utf8_bytes() -> None:
    body = b"\xff\xfe jane@example.com \x80"
    processor = BufferedText(INSPECTOR, 1 << 20, TOO_LARGE)
    assert processor.feed(body) + processor.finish() == b"\xff\xfe [REDACTED:EMAIL_ADDRESS] \x80"


@given(st.lists(st.integers(min_value=1, max_value=12), max_size=40))
def test_streamed_text_masks_values_cut_across_chunks(cuts: list[int]) -> None:
    body = "Grüße: card 4111 1111 1111 1111 and jane@example.com, employee E123456.\n".encode() * 3
    processor = StreamingText(INSPECTOR, 1 << 20, TOO_LARGE)
    out, position = b"", 0
    for size in cuts:
        out += processor.feed(body[position : position + size])
        position += size
    out += processor.feed(body[position:]) + processor.finish()
    assert out == mask(body.decode()).encode()
    assert len(processor.findings) == 9


def _sse(events: list[str]) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_sse_output_is_the_same_however_the_stream_is_cut(cuts: list[int]) -> None:
    stream = _sse(["hello", "mail jane@example.com", "card 4111111111111111", "[DONE]"])
    processor = SseEvents(INSPECTOR, 1 << 16, TOO_LARGE)
    out = b""
    position = 0
    for size in cuts:
        out += processor.feed(stream[position : position + size])
        position += size
    out += processor.feed(stream[position:]) + processor.finish()
    assert out == _sse(["hello", "mail [REDACTED:EMAIL_ADDRESS]", "card [REDACTED:CREDIT_CARD]", "[DONE]"])


def test_sse_releases_whole_events_and_holds_the_rest() -> None:
    processor = SseEvents(INSPECTOR, 1 << 16, TOO_LARGE)
    assert processor.feed(b"data: one\n\ndata: tw") == b"data: one\n\n"
    assert processor.feed(b"o\r\n\r\n") == b"data: two\n\n"  # written out again, lines ending in LF
    assert processor.finish() == b""


@pytest.mark.parametrize("terminator", [b"", b"\n\n"])
def test_sse_event_over_the_limit_is_refused_complete_or_not(terminator: bytes) -> None:
    processor = SseEvents(INSPECTOR, 1024, TOO_LARGE)
    assert processor.feed(b"data: small\n\n") == b"data: small\n\n"
    with pytest.raises(ExtProcError):
        processor.feed(b"data: " + b"x" * 2000 + terminator)


def test_replacement_tokens_are_what_the_detector_skips() -> None:
    from extproc.detect.engine import MASK_TOKEN

    for rule_id in ("email-address", "employee-id"):
        token = INSPECTOR.masker.replacement(Finding(rule_id, "SOME_ENTITY_2", 0, 1), "value")
        assert MASK_TOKEN.fullmatch(token), token
