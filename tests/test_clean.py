"""``Detector.clean``: one Hyperscan pass over many strings says which of them hold nothing, so that
only the others are scanned. A string it calls clean must be one ``scan`` finds nothing in; anything
else would let a value through unmasked."""

import base64
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.engine import Detector
from extproc.detect.rules import load_rules
from extproc.errors import ExtProcError
from extproc.mask import Inspector, MaskSpec
from extproc.mask import headers as headers_module
from extproc.mask.bodies import BufferedJson
from extproc.mask.headers import scan_headers
from extproc.model import Finding

from .test_joined_request import INSPECTOR

PACK = INSPECTOR.detector
SAMPLES = [
    text for loaded in PACK.rules for text in (*loaded.rule.samples.match, *loaded.rule.samples.no_match)
]
# Credentials hidden in base64, which only the decoding of runs finds.
SAMPLES += [
    base64.b64encode(text.encode()).decode()
    for loaded in PACK.rules
    if loaded.rule.category == "credential" and loaded.rule.severity in ("high", "critical")
    for text in loaded.rule.samples.match
]
FILLER = ["user", "assistant", "content", "You are a helpful assistant.", "demo-small", "", "\n", "x"]


def test_every_sample_the_pack_finds_something_in_is_not_clean_among_the_others() -> None:
    found = [text for text in SAMPLES if PACK.scan(text)]
    assert len(found) > 100  # the shipped pack's samples, every rule's
    texts = [*FILLER, *SAMPLES, *FILLER]
    for text, clean in zip(texts, PACK.clean(texts), strict=True):
        if clean:
            assert PACK.scan(text) == [], text
    assert not any(clean for text, clean in zip(texts, PACK.clean(texts), strict=True) if text in found)
    assert all(PACK.clean(FILLER))  # and it does clear what holds nothing


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(SAMPLES),
            st.text(alphabet="0123456789 -./:@abcdefAKIsk_=\n\t\u0661\uff14", max_size=40),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_a_string_called_clean_holds_nothing_whatever_is_around_it(texts: list[str]) -> None:
    for text, clean in zip(texts, PACK.clean(texts), strict=True):
        if clean:
            assert PACK.scan(text) == [], text


def _pack(tmp_path: Path, pattern: str) -> Detector:
    (tmp_path / "r.yaml").write_text(
        textwrap.dedent(
            f"""\
            rules:
            - id: project
              entity: PROJECT
              category: confidential
              severity: high
              pattern: '{pattern}'
              samples:
                match: ["PRJ-1234"]
                no_match: ["a PRJ-12"]
            """
        ),
        encoding="utf-8",
    )
    return Detector(load_rules([tmp_path]))


def test_a_rule_anchored_at_a_string_start_and_end_is_seen_inside_the_joined_text(tmp_path: Path) -> None:
    detector = _pack(tmp_path, r"^PRJ-\d{4}$")
    texts = ["before", "PRJ-1234", "after PRJ-1234", "PRJ-1234 after"]
    assert [bool(detector.scan(text)) for text in texts] == [False, True, False, False]
    assert detector.clean(texts)[1] is False
    assert detector.clean(texts)[0] is True


def test_a_rule_anchored_at_the_buffer_ends_turns_the_pass_off(tmp_path: Path) -> None:
    detector = _pack(tmp_path, r"\APRJ-\d{4}\Z")
    texts = ["before", "PRJ-1234"]
    assert detector.scan("PRJ-1234")
    assert detector.clean(texts) == [False, False]


def _counting(inspector: Inspector) -> tuple[Inspector, list[str]]:
    scanned: list[str] = []
    real = inspector.detector.scan

    def scan(text: str, *, merged: bool = True, label: str | None = None) -> list[object]:
        scanned.append(text)
        return real(text, merged=merged, label=label)  # type: ignore[return-value]

    detector = mock.Mock(wraps=inspector.detector)
    detector.scan = scan
    detector.clean = inspector.detector.clean
    return Inspector(detector, inspector.masker), scanned


def test_a_json_body_scans_alone_only_the_strings_that_may_hold_something() -> None:
    inspector, scanned = _counting(INSPECTOR)
    messages = [{"role": "user", "content": f"question number {n} about the weather"} for n in range(30)]
    messages.append({"role": "user", "content": "the card is 4111 1111 1111 1111"})
    body = json.dumps({"model": "demo-small", "messages": messages}).encode()
    processor = BufferedJson(inspector, 1 << 20, ExtProcError("too large"), ExtProcError("invalid"))
    processor.feed(body)
    masked = json.loads(processor.finish())
    assert masked["messages"][-1]["content"] == "the card is **** **** **** 1111"
    alone = [text for text in scanned if "question number" in text and len(text) < 40]
    assert alone == []  # none of the 30 clean strings was scanned on its own
    assert "the card is 4111 1111 1111 1111" in scanned


@dataclass(frozen=True)
class _Mask:
    action: str = "mask"
    strategy: MaskSpec | None = None


class _MaskAll:
    may_refuse = False

    def verdict(self, finding: Finding) -> _Mask:
        return _Mask()

    def refuses(self, finding: Finding) -> bool:
        return False


def test_headers_scan_alone_only_the_values_that_may_hold_something() -> None:
    inspector, scanned = _counting(INSPECTOR)
    headers = [
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("user-agent", "OpenAI/Python 1.0"),
        ("x-note", "card 4111111111111111"),
    ]
    result = scan_headers(headers, inspector.detector, inspector.masker, _MaskAll())
    assert [f.entity for f in result.findings] == ["CREDIT_CARD"]
    assert "application/json" not in scanned
    assert "user-agent" not in scanned
    assert "card 4111111111111111" in scanned


def test_json_with_escapes_in_a_short_string_is_still_decoded_and_read() -> None:
    """A tool call's arguments (JSON in a string) hide an address behind an escape: the one pass must
    not clear the string before it is decoded, leading blanks included."""
    arguments = ' {"to": "jane\\u0040example.com"}'
    document = {"model": "demo-small", "messages": [{"role": "assistant", "content": arguments}]}
    processor = BufferedJson(INSPECTOR, 1 << 20, ExtProcError("too large"), ExtProcError("invalid"))
    processor.feed(json.dumps(document).encode())
    masked = json.loads(processor.finish())
    assert "jane" not in masked["messages"][0]["content"]
    assert "EMAIL_ADDRESS" in {f.entity for f in processor.findings}


def test_every_base64_run_of_the_pass_is_decoded_not_only_the_first() -> None:
    """Regression: the pass asked the single-match run database, which reports one run for the whole
    joined text; a credential in base64 in any later string was called clean and let through."""
    harmless = base64.b64encode(b"hello world, this is a harmless sentence").decode()
    hidden = base64.b64encode(b"aws_access_key_id = AKIA4OIGBRJZNX47IW6J").decode()
    uuid = "3b6c1a2e-7f4d-4c2a-9b1e-0a5f2c7d8e91"  # a run that decodes to nothing
    assert PACK.scan(hidden)
    assert PACK.clean([harmless, uuid, hidden, "/v1/chat/completions"]) == [True, True, False, True]
    document = {"messages": [{"role": "user", "content": c} for c in (harmless, hidden)]}
    processor = BufferedJson(INSPECTOR, 1 << 20, ExtProcError("too large"), ExtProcError("invalid"))
    processor.feed(json.dumps(document).encode())
    masked = json.loads(processor.finish())
    assert masked["messages"][1]["content"] == "[REDACTED:AWS_ACCESS_KEY]"


@pytest.mark.parametrize(
    ("key", "hidden"),
    [
        ('{"to": "jane\\u0040example.com"}', "jane"),
        ('{"card": "4111\\u00201111\\u00201111\\u00201111"}', "4111"),
        ('[" AKIA4OIGBRJZNX47IW6\\u004a"]', "AKIA4OIGBRJZNX47IW6"),
    ],
)
def test_json_with_escapes_in_a_key_is_decoded_and_read_like_a_value(key: str, hidden: str) -> None:
    """Regression: keys went into the one pass without the check values had, so a key holding JSON
    whose value hid behind an escape was called clean and never decoded."""
    document = {"messages": [{"role": "user", "content": "hi", key: 1}], "metadata": {key: "x"}}
    processor = BufferedJson(INSPECTOR, 1 << 20, ExtProcError("too large"), ExtProcError("invalid"))
    processor.feed(json.dumps(document).encode())
    masked = processor.finish().decode()
    assert hidden not in masked
    assert len(processor.findings) >= 2


def test_json_with_escapes_repeated_in_a_document_is_masked_every_time() -> None:
    """Regression: a string found clean as written was remembered as clean before it was decoded, so
    the second copy of the same tool-call arguments (a conversation repeats them) went out unmasked."""
    arguments = '{"to": "jane\\u0040example.com"}'
    document = {"messages": [{"role": "assistant", "content": arguments} for _ in range(3)]}
    processor = BufferedJson(INSPECTOR, 1 << 20, ExtProcError("too large"), ExtProcError("invalid"))
    processor.feed(json.dumps(document).encode())
    masked = json.loads(processor.finish())
    assert [m["content"] for m in masked["messages"]] == ['{"to":"[REDACTED:EMAIL_ADDRESS]"}'] * 3


def test_a_long_header_value_is_scanned_alone_not_in_the_one_pass() -> None:
    """Every position of a base64 run is a call into Python in the pass: a long value (a token, a
    cookie) would cost more there than its own scan, which stops at the first run."""
    inspector, scanned = _counting(INSPECTOR)
    passed: list[list[str]] = []
    real = inspector.detector.clean

    def clean(texts: list[str]) -> list[bool]:
        passed.append(list(texts))
        return real(texts)

    inspector.detector.clean = clean  # type: ignore[method-assign]
    blob = base64.b64encode(b"x" * 3000).decode()
    headers = [("content-type", "application/json"), ("x-blob", blob)]
    scan_headers(headers, inspector.detector, inspector.masker, _MaskAll())
    assert all(blob not in texts for texts in passed)
    assert blob in scanned


def _passing(inspector: Inspector) -> list[list[str]]:
    """The texts of each one-pass call of ``inspector``'s detector (a ``_counting`` one)."""
    passed: list[list[str]] = []
    real = INSPECTOR.detector.clean

    def clean(texts: list[str]) -> list[bool]:
        passed.append(list(texts))
        return real(texts)

    inspector.detector.clean = clean  # type: ignore[method-assign]
    return passed


def test_header_texts_found_clean_once_are_not_read_again_by_the_same_detector() -> None:
    """The headers of one deployment repeat: what one message's headers showed clean is remembered
    (per detector), and the next message with them costs neither the pass nor a scan."""
    inspector, scanned = _counting(INSPECTOR)
    passed = _passing(inspector)
    headers = [
        (":authority", "127.0.0.1:10000"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("date", "Sun, 06 Dec 2026 20:00:00 GMT"),
    ]
    scan_headers(headers, inspector.detector, inspector.masker, _MaskAll())
    assert passed
    assert scanned
    passed.clear()
    scanned.clear()
    again = scan_headers(
        [*headers, ("x-request-id", "7f4d")], inspector.detector, inspector.masker, _MaskAll()
    )
    assert passed == [["x-request-id", "7f4d"]]
    assert scanned == []
    assert again.findings == []
    other, scanned_by_other = _counting(INSPECTOR)  # another detector (a reload) remembers nothing
    scan_headers(headers, other.detector, other.masker, _MaskAll())
    assert scanned_by_other


def test_a_header_value_with_a_finding_is_never_remembered_and_is_masked_every_time() -> None:
    """Only clean texts are remembered: a value with something in it is read and masked on every
    message, an IP address in a header that names addresses included when something else is with it."""
    inspector, scanned = _counting(INSPECTOR)
    headers = [("x-note", "card 4111111111111111"), ("x-forwarded-for", "10.0.0.1, jane.doe@example.com")]
    for _ in range(3):
        scanned.clear()
        result = scan_headers(headers, inspector.detector, inspector.masker, _MaskAll())
        assert {f.entity for f in result.findings} == {"CREDIT_CARD", "EMAIL_ADDRESS"}
        assert dict(result.set) == {
            "x-note": "card ************1111",
            "x-forwarded-for": "10.0.0.1, [REDACTED:EMAIL_ADDRESS]",
        }
        assert "card 4111111111111111" in scanned
        assert "10.0.0.1, jane.doe@example.com" in scanned


def test_the_memory_of_clean_texts_is_bounded_and_starts_over_when_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(headers_module, "KNOWN_CLEAN_MAX", 8)
    known = headers_module.KnownClean()
    for n in range(20):
        known.add(f"text {n}")
    assert "text 19" in known
    assert "text 0" not in known
    assert sum(f"text {n}" in known for n in range(20)) <= 8
    known.add("x" * 1000)  # longer than a text of the one pass: never kept
    assert "x" * 1000 not in known
