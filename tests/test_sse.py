"""Chat token streams are masked on the assembled text of each choice and tool call."""

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import UpstreamError
from extproc.mask.sse import ChatEventStream

from .rules_fixture import inspector

TOO_LARGE = UpstreamError("too large", code="upstream_too_large")
ANSWER = "Card 4111 1111 1111 1111, write to jane@example.com. Done."
MASKED = "Card [REDACTED:CREDIT_CARD], write to [REDACTED:EMAIL_ADDRESS]. Done."


def event(delta: dict[str, Any], finish: str | None = None, index: int = 0, **extra: Any) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunk["choices"] = [{"index": index, "delta": delta, "finish_reason": finish, **extra}]
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def token_stream(text: str, size: int = 2, finish: bool = True) -> bytes:
    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": text[i : i + size]}) for i in range(0, len(text), size)]
    if finish:
        events.append(event({}, "stop"))
    return b"".join(events) + b"data: [DONE]\n\n"


def run(body: bytes, cuts: list[int] | None = None) -> tuple[list[Any], ChatEventStream]:
    processor = ChatEventStream(inspector(), 1 << 16, TOO_LARGE)
    out, position = b"", 0
    for size in cuts or []:
        out += processor.feed(body[position : position + size])
        position += size
    out += processor.feed(body[position:]) + processor.finish()
    assert out.endswith(b"data: [DONE]\n\n")
    events = [e for e in out.decode().split("\n\n") if e]
    parsed = [json.loads(e.removeprefix("data: ")) for e in events if e != "data: [DONE]"]
    return parsed, processor


def text_of(chunks: list[Any], key: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def test_a_card_split_across_many_token_events_comes_out_masked() -> None:
    chunks, processor = run(token_stream(ANSWER, size=2))
    assert text_of(chunks) == MASKED
    assert "1111" not in json.dumps(chunks)
    assert sorted(f.entity for f in processor.findings) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


def test_every_event_is_kept_and_stays_a_chat_chunk() -> None:
    body = token_stream(ANSWER, size=3)
    chunks, _ = run(body)
    assert len(chunks) == body.count(b"\n\n") - 1  # no event lost, none added
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_held_text_is_flushed_before_done_when_no_choice_finishes() -> None:
    chunks, _ = run(token_stream("mail jane@example.com", size=4, finish=False))
    assert text_of(chunks) == "mail [REDACTED:EMAIL_ADDRESS]"
    assert chunks[-1]["id"] == "c1"  # the added event looks like the others


def test_tool_call_arguments_are_masked_per_call() -> None:
    arguments = json.dumps({"to": "jane@example.com", "card": "4111111111111111"})
    events = [
        event({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "pay", "arguments": ""}}]}),
        *[
            event({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i : i + 3]}}]})
            for i in range(0, len(arguments), 3)
        ],
        event({}, "tool_calls"),
    ]
    chunks, _ = run(b"".join(events) + b"data: [DONE]\n\n")
    joined = "".join(
        call["function"].get("arguments", "")
        for c in chunks
        for call in c["choices"][0]["delta"].get("tool_calls") or []
    )
    assert json.loads(joined) == {"to": "[REDACTED:EMAIL_ADDRESS]", "card": "[REDACTED:CREDIT_CARD]"}


def test_logprobs_are_dropped_because_they_repeat_tokens() -> None:
    body = event({"content": "4111"}, logprobs={"content": [{"token": "4111"}]}) + b"data: [DONE]\n\n"
    chunks, _ = run(body)
    assert chunks[0]["choices"][0]["logprobs"] is None


def test_other_events_are_masked_whole() -> None:
    processor = ChatEventStream(inspector(), 1 << 16, TOO_LARGE)
    out = processor.feed(b"event: note\ndata: mail jane@example.com\n\n") + processor.finish()
    assert out == b"event: note\ndata: mail [REDACTED:EMAIL_ADDRESS]\n\n"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=9), st.lists(st.integers(min_value=1, max_value=200), max_size=20))
def test_the_text_is_the_same_however_tokens_and_bytes_are_cut(token: int, cuts: list[int]) -> None:
    chunks, _ = run(token_stream(ANSWER, size=token), cuts)
    assert text_of(chunks) == MASKED
