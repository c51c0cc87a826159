import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.detect.interim import InterimScanner, luhn_valid
from extproc.errors import ExtProcError, UpstreamError
from extproc.mask import mask_text, redact
from extproc.mask.bodies import BufferedJson, BufferedText, SseEvents
from extproc.model import Finding

SCANNER = InterimScanner()
TOO_LARGE = UpstreamError("too large", code="upstream_too_large")
INVALID = UpstreamError("invalid")


@pytest.mark.parametrize("number", ["4111111111111111", "5500 0000 0000 0004", "3400-0000-0000-009"])
def test_luhn_valid_cards_are_found(number: str) -> None:
    found = SCANNER.scan(f"card: {number}.")
    assert [(f.entity, f.start, f.end) for f in found] == [("CREDIT_CARD", 6, 6 + len(number))]


@pytest.mark.parametrize(
    "text",
    ["4111111111111112", "order 1234567890123", "41111111111111111111111", "phone 555-0100"],
)
def test_numbers_failing_luhn_or_length_are_not_cards(text: str) -> None:
    assert [f for f in SCANNER.scan(text) if f.entity == "CREDIT_CARD"] == []


def test_luhn() -> None:
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


def test_redact_touches_only_findings() -> None:
    text = "mail jane@example.com now"
    masked, findings = mask_text(text, SCANNER)
    assert masked == "mail [REDACTED:EMAIL_ADDRESS] now"
    assert findings == [Finding("email-address", "EMAIL_ADDRESS", 5, 21)]


def test_overlapping_findings_merge() -> None:
    findings = [Finding("a", "A", 2, 6), Finding("b", "B", 4, 9)]
    assert redact("0123456789", findings) == "01[REDACTED:A]9"


@given(st.text(alphabet=st.sampled_from("ab @.-4 1x\n"), max_size=80))
def test_masking_is_idempotent(text: str) -> None:
    once, _ = mask_text(text, SCANNER)
    twice, found = mask_text(once, SCANNER)
    assert twice == once
    assert found == []


def test_json_values_are_masked_and_document_stays_valid() -> None:
    body = json.dumps({"a": ["x", {"b": "card 4111 1111 1111 1111"}], "n": 3, "e": "jane\u0040example.com"})
    processor = BufferedJson(SCANNER, 1 << 20, TOO_LARGE, INVALID)
    out = processor.feed(body.encode()) + processor.finish()
    assert json.loads(out) == {
        "a": ["x", {"b": "card [REDACTED:CREDIT_CARD]"}],
        "n": 3,
        "e": "[REDACTED:EMAIL_ADDRESS]",
    }


def test_json_without_findings_is_released_byte_for_byte() -> None:
    body = b'{ "a" : "plain",   "b": [1, 2] }'
    processor = BufferedJson(SCANNER, 1 << 20, TOO_LARGE, INVALID)
    assert processor.feed(body) + processor.finish() == body


def test_invalid_json_and_size_limit() -> None:
    processor = BufferedJson(SCANNER, 1 << 20, TOO_LARGE, INVALID)
    processor.feed(b"{not json")
    with pytest.raises(ExtProcError, match="invalid"):
        processor.finish()
    small = BufferedText(
        SCANNER,
        10,
        TOO_LARGE,
    )
    small.feed(b"12345")
    with pytest.raises(ExtProcError, match="too large"):
        small.feed(b"123456")


def test_text_keeps_non_utf8_bytes() -> None:
    body = b"\xff\xfe jane@example.com \x80"
    processor = BufferedText(SCANNER, 1 << 20, TOO_LARGE)
    assert processor.feed(body) + processor.finish() == b"\xff\xfe [REDACTED:EMAIL_ADDRESS] \x80"


def _sse(events: list[str]) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_sse_output_is_the_same_however_the_stream_is_cut(cuts: list[int]) -> None:
    stream = _sse(["hello", "mail jane@example.com", "card 4111111111111111", "[DONE]"])
    processor = SseEvents(SCANNER, 1 << 16, TOO_LARGE)
    out = b""
    position = 0
    for size in cuts:
        out += processor.feed(stream[position : position + size])
        position += size
    out += processor.feed(stream[position:]) + processor.finish()
    assert out == _sse(["hello", "mail [REDACTED:EMAIL_ADDRESS]", "card [REDACTED:CREDIT_CARD]", "[DONE]"])


def test_sse_releases_whole_events_and_holds_the_rest() -> None:
    processor = SseEvents(SCANNER, 1 << 16, TOO_LARGE)
    assert processor.feed(b"data: one\n\ndata: tw") == b"data: one\n\n"
    assert processor.feed(b"o\r\n\r\n") == b"data: two\r\n\r\n"
    assert processor.finish() == b""


@pytest.mark.parametrize("terminator", [b"", b"\n\n"])
def test_sse_event_over_the_limit_is_refused_complete_or_not(terminator: bytes) -> None:
    processor = SseEvents(SCANNER, 1024, TOO_LARGE)
    assert processor.feed(b"data: small\n\n") == b"data: small\n\n"
    with pytest.raises(ExtProcError):
        processor.feed(b"data: " + b"x" * 2000 + terminator)
