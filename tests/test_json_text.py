"""Streamed tool-call arguments are read decoded, as the client and the tool parse them: a value written
with JSON escapes (``jane\\u0040example.com``) is found however the raw text is cut, and what goes out is
still valid JSON."""

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.mask.escapes import JsonTextView, string_content
from extproc.mask.sse import EventStream

from .rules_fixture import inspector
from .test_sse import TOO_LARGE, anthropic_stream, event, parse, sse

EMAIL = "jane@example.com"
CARD = "4111 1111 1111 1111"


def view_of(pieces: list[str]) -> tuple[str, JsonTextView]:
    view = JsonTextView()
    out = "".join(view.feed(piece) for piece in pieces)
    return out + view.finish(), view


def cut(text: str, cuts: list[int]) -> list[str]:
    pieces, position = [], 0
    for size in cuts:
        pieces.append(text[position : position + size])
        position += size
    return [*pieces, text[position:]]


@pytest.mark.parametrize(
    ("raw", "decoded", "why"),
    [
        ("plain", "plain", "no escape: its own view"),
        ("jane\\u0040example.com", EMAIL, "a \\u escape"),
        ('\\"\\\\\\/\\b\\f\\n\\r\\t', '"\\/\b\f\n\r\t', "every short escape"),
        ("\\ud83d\\ude00!", "\U0001f600!", "a surrogate pair is one character"),
        ("\\ud83dx", "\ud83dx", "a lone high surrogate stays one"),
        ("\\x\\u12G4", "\\x\\u12G4", "no valid escape: the backslash is itself"),
        ("end\\u00", "end\\u00", "an escape cut by the end of the text is written as it is"),
    ],
)
def test_the_view_decodes_what_a_json_parser_decodes(raw: str, decoded: str, why: str) -> None:
    assert view_of([raw])[0] == decoded, why


def test_an_escape_cut_across_pieces_waits_for_its_end() -> None:
    view = JsonTextView()
    assert view.feed("jane\\u00") == "jane"
    assert (view.held, view.raw) == (4, 4)
    assert view.feed("40ex") == "@ex"
    assert view.feed("\\ud83d") == ""  # a high surrogate may still get its low half
    assert view.feed("\\ude00") == "\U0001f600"
    assert [view.origin(i) for i in range(6)] == [0, 1, 2, 3, 4, 10]
    assert view.origin(7) == 12  # after the emoji: the end of its two escapes


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.lists(st.integers(min_value=0, max_value=9), max_size=12), st.booleans())
def test_the_view_of_any_json_string_content_is_the_string_however_it_is_cut(
    text: str, cuts: list[int], ascii_only: bool
) -> None:
    raw = json.dumps(text, ensure_ascii=ascii_only)[1:-1]
    decoded, view = view_of(cut(raw, cuts))
    assert decoded == text
    # Each view character maps back to the raw escape (or character) that decodes to it.
    for index, char in enumerate(text):
        assert json.loads('"' + raw[view.origin(index) : view.origin(index + 1)] + '"') == char


def test_a_replacement_is_written_as_json_string_content() -> None:
    for text in ('a"b', "a\\b", "a\nb", "[REDACTED:EMAIL_ADDRESS]"):
        assert json.loads('"' + string_content(text) + '"') == text


# -- through the event stream --------------------------------------------------------------------------


def escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


ARGUMENTS = (
    '{"to": "jane' + escaped("@") + 'example.com", "card": "' + escaped(CARD) + '", "note": "a\\"b\\\\c"}'
)
MASKED = {"to": "[REDACTED:EMAIL_ADDRESS]", "card": "[REDACTED:CREDIT_CARD]", "note": 'a"b\\c'}


def feed(body: bytes, cuts: list[int]) -> bytes:
    processor = EventStream(inspector(), 1 << 16, TOO_LARGE)
    out, position = b"", 0
    for size in cuts:
        out += processor.feed(body[position : position + size])
        position += size
    return out + processor.feed(body[position:]) + processor.finish()


def chat_tool_call(pieces: list[str]) -> bytes:
    events = [event({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "pay", "arguments": ""}}]})]
    events += [event({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
    return b"".join([*events, event({}, "tool_calls"), b"data: [DONE]\n\n"])


def chat_arguments(out: bytes) -> str:
    return "".join(
        call["function"].get("arguments", "")
        for _, chunk in parse(out)
        if chunk != "[DONE]"
        for call in chunk["choices"][0]["delta"].get("tool_calls") or []
    )


def responses_arguments(pieces: list[str]) -> bytes:
    events: list[tuple[str | None, dict[str, Any]]] = []
    for piece in pieces:
        delta = {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0}
        events.append((delta["type"], {**delta, "delta": piece, "sequence_number": len(events)}))
    return sse(events)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=7), max_size=40),
    st.lists(st.integers(min_value=1, max_value=64), max_size=6),
)
def test_escaped_chat_tool_arguments_are_masked_however_they_are_cut(
    pieces: list[int], bytes_cut: list[int]
) -> None:
    out = feed(chat_tool_call(cut(ARGUMENTS, pieces)), bytes_cut)
    assert json.loads(chat_arguments(out)) == MASKED


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=7), max_size=40))
def test_escaped_responses_arguments_are_masked_however_they_are_cut(pieces: list[int]) -> None:
    parsed = parse(feed(responses_arguments(cut(ARGUMENTS, pieces)), []))
    assert json.loads("".join(data["delta"] for _, data in parsed)) == MASKED


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=9))
def test_escaped_anthropic_partial_json_is_masked_however_it_is_cut(size: int) -> None:
    parsed = parse(feed(anthropic_stream(ARGUMENTS, size=size, kind="input_json_delta"), []))
    joined = "".join(d["delta"].get("partial_json", "") for n, d in parsed if n == "content_block_delta")
    assert json.loads(joined) == MASKED


def test_a_value_found_both_as_written_and_decoded_is_counted_once() -> None:
    arguments = json.dumps({"to": EMAIL, "card": CARD})
    processor = EventStream(inspector(), 1 << 16, TOO_LARGE)
    out = processor.feed(chat_tool_call(cut(arguments, [5] * 10))) + processor.finish()
    assert json.loads(chat_arguments(out)) == {
        "to": "[REDACTED:EMAIL_ADDRESS]",
        "card": "[REDACTED:CREDIT_CARD]",
    }
    assert sorted(f.entity for f in processor.findings) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


# A match read on the text as written may take in an escape's hex digits ("\u00e9 4111111111111112" reads
# as the card 9 4111 1111 1111 1112): it is masked from the escape's end, and the escape stays whole.
BESIDE_ESCAPES = (
    json.dumps({"note": "caf\u00e9 4111111111111112"}),
    '{"note": "4111 1111 1111 111\\u0031 and \\u00e9"}',
    '{"note": "\\\\' + "4111 1111 1111 1111" + '\\n"}',
)


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(BESIDE_ESCAPES), st.lists(st.integers(min_value=0, max_value=7), max_size=40))
def test_a_match_read_as_written_never_cuts_an_escape(arguments: str, pieces: list[int]) -> None:
    out = feed(chat_tool_call(cut(arguments, pieces)), [])
    text = chat_arguments(out)
    note = json.loads(text)["note"]  # still parses, every escape whole
    assert "4111111111111111" not in text.replace(" ", "")
    assert "\\u00e9" in text or "\\u00e9" not in arguments
    assert "4111111111111111" not in note.replace(" ", "")
