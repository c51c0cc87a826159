"""Newline-delimited JSON streams (Ollama): texts assembled across lines, every line valid JSON."""

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import UpstreamError
from extproc.mask.ndjson import NdjsonStream

from .rules_fixture import inspector

TOO_LARGE = UpstreamError("too large", code="upstream_too_large")
ANSWER = "Card 4111 1111 1111 1111, write to jane@example.com. Done."
MASKED = "Card [REDACTED:CREDIT_CARD], write to [REDACTED:EMAIL_ADDRESS]. Done."


def chat_lines(text: str, size: int = 2, done: bool = True) -> bytes:
    lines = [
        {
            "model": "llama",
            "created_at": "t",
            "message": {"role": "assistant", "content": text[i : i + size]},
            "done": False,
        }
        for i in range(0, len(text), size)
    ]
    if done:
        lines.append(
            {"model": "llama", "message": {"role": "assistant", "content": ""}, "done": True, "eval_count": 9}
        )
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def feed_all(
    body: bytes, cuts: list[int] | None = None, limit: int = 1 << 16
) -> tuple[list[Any], NdjsonStream]:
    processor = NdjsonStream(inspector(), limit, TOO_LARGE)
    out, position = b"", 0
    for size in cuts or []:
        out += processor.feed(body[position : position + size])
        position += size
    out += processor.feed(body[position:]) + processor.finish()
    return [json.loads(line) for line in out.decode().splitlines()], processor


def content(lines: list[Any]) -> str:
    return "".join(line["message"]["content"] for line in lines)


def test_chat_lines_are_masked_on_the_assembled_text_and_flushed_in_the_done_line() -> None:
    lines, processor = feed_all(chat_lines(ANSWER))
    assert content(lines) == MASKED
    assert lines[-1]["done"] is True
    assert lines[-1]["eval_count"] == 9
    assert len(lines) == len(ANSWER) // 2 + 1  # no line lost, none added
    assert sorted(f.entity for f in processor.findings) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


def test_generate_lines_and_a_stream_without_done_are_flushed_in_an_added_line() -> None:
    body = b"".join(
        json.dumps({"model": "llama", "response": ANSWER[i : i + 3], "done": False}).encode() + b"\n"
        for i in range(0, len(ANSWER), 3)
    )
    lines, _ = feed_all(body)
    assert "".join(line["response"] for line in lines) == MASKED
    assert lines[-1] == {"model": "llama", "done": False, "response": lines[-1]["response"]}


def test_other_lines_have_every_string_masked_and_text_lines_are_masked_as_text() -> None:
    body = b'{"note": "jane@example.com"}\n["jane@example.com"]\nplain jane@example.com\n'
    processor = NdjsonStream(inspector(), 1 << 16, TOO_LARGE)
    out = processor.feed(body) + processor.finish()
    assert out.decode().splitlines() == [
        '{"note":"[REDACTED:EMAIL_ADDRESS]"}',
        '["[REDACTED:EMAIL_ADDRESS]"]',
        "plain [REDACTED:EMAIL_ADDRESS]",
    ]


def test_a_line_longer_than_the_limit_ends_the_stream() -> None:
    processor = NdjsonStream(inspector(), 64, TOO_LARGE)
    with pytest.raises(UpstreamError):
        processor.feed(b'{"response": "' + b"a" * 100)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=9), st.lists(st.integers(min_value=1, max_value=200), max_size=20))
def test_the_text_is_the_same_however_lines_and_bytes_are_cut(token: int, cuts: list[int]) -> None:
    lines, _ = feed_all(chat_lines(ANSWER, size=token), cuts)
    assert content(lines) == MASKED


def test_lines_of_an_unknown_shape_are_scanned_across_lines() -> None:
    lines = [{"token": {"text": ANSWER[i : i + 3]}} for i in range(0, len(ANSWER), 3)]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    out, processor = feed_all(body, [7, 30, 1])
    assert "".join(line["token"]["text"] for line in out) == MASKED
    text_lines = b"".join(ANSWER[i : i + 4].encode() + b"\n" for i in range(0, len(ANSWER), 4))
    processor = NdjsonStream(inspector(), 1 << 16, TOO_LARGE)
    masked = (processor.feed(text_lines) + processor.finish()).decode()
    assert masked.replace("\n", "") == MASKED


def test_a_done_line_does_not_reset_the_scanner() -> None:
    lines = [
        {"model": "llama", "message": {"role": "assistant", "content": ANSWER[i : i + 3]}, "done": True}
        for i in range(0, len(ANSWER), 3)
    ]
    out, _ = feed_all(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert content(out) == MASKED
