"""Chat token streams are masked on the assembled text of each choice and tool call."""

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import UpstreamError
from extproc.mask.sse import EventStream

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


def run(body: bytes, cuts: list[int] | None = None) -> tuple[list[Any], EventStream]:
    processor = EventStream(inspector(), 1 << 16, TOO_LARGE)
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
    processor = EventStream(inspector(), 1 << 16, TOO_LARGE)
    out = processor.feed(b"event: note\ndata: mail jane@example.com\n\n") + processor.finish()
    assert out == b"event: note\ndata: mail [REDACTED:EMAIL_ADDRESS]\n\n"


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=9), st.lists(st.integers(min_value=1, max_value=200), max_size=20))
def test_the_text_is_the_same_however_tokens_and_bytes_are_cut(token: int, cuts: list[int]) -> None:
    chunks, _ = run(token_stream(ANSWER, size=token), cuts)
    assert text_of(chunks) == MASKED


def sse(events: list[tuple[str | None, dict[str, Any]]]) -> bytes:
    return b"".join(
        (f"event: {name}\n".encode() if name else b"") + b"data: " + json.dumps(data).encode() + b"\n\n"
        for name, data in events
    )


def parse(out: bytes) -> list[tuple[str | None, Any]]:
    parsed: list[tuple[str | None, Any]] = []
    for block in out.decode().split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        parsed.append((name, data if data == "[DONE]" else json.loads(data)))
    return parsed


def feed_all(body: bytes, cuts: list[int] | None = None) -> tuple[bytes, EventStream]:
    processor = EventStream(inspector(), 1 << 16, TOO_LARGE)
    out, position = b"", 0
    for size in cuts or []:
        out += processor.feed(body[position : position + size])
        position += size
    return out + processor.feed(body[position:]) + processor.finish(), processor


def responses_stream(text: str, size: int = 2, done: bool = True) -> bytes:
    events: list[tuple[str | None, dict[str, Any]]] = [
        ("response.created", {"type": "response.created", "sequence_number": 0, "response": {"id": "r1"}}),
    ]
    position = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    for start in range(0, len(text), size):
        delta = {"type": "response.output_text.delta", **position, "delta": text[start : start + size]}
        events.append(
            ("response.output_text.delta", {**delta, "sequence_number": len(events), "logprobs": []})
        )
    if done:
        final = {"type": "response.output_text.done", **position, "text": text}
        events.append(("response.output_text.done", {**final, "sequence_number": len(events)}))
        completed = {
            "id": "r1",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}],
        }
        events.append(
            (
                "response.completed",
                {"type": "response.completed", "sequence_number": len(events), "response": completed},
            )
        )
    return sse(events)


def test_responses_api_deltas_are_masked_and_the_held_text_precedes_done() -> None:
    out, processor = feed_all(responses_stream(ANSWER, size=2))
    events = parse(out)
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert "".join(deltas) == MASKED
    [done] = [data for name, data in events if name == "response.output_text.done"]
    assert done["text"] == MASKED
    [completed] = [data for name, data in events if name == "response.completed"]
    assert completed["response"]["output"][0]["content"][0]["text"] == MASKED
    sequence = [data["sequence_number"] for _, data in events]
    assert sequence == list(range(len(events)))  # added events renumbered, still strictly increasing
    assert all(name == data["type"] for name, data in events)
    assert sorted({f.entity for f in processor.findings}) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


def test_responses_api_function_call_arguments_are_assembled_per_item() -> None:
    arguments = json.dumps({"to": "jane@example.com"})
    events: list[tuple[str | None, dict[str, Any]]] = []
    for item in ("call_a", "call_b"):
        for start in range(0, len(arguments), 3):
            piece = {"type": "response.function_call_arguments.delta", "item_id": item, "output_index": 0}
            events.append(
                (
                    piece["type"],
                    {**piece, "delta": arguments[start : start + 3], "sequence_number": len(events)},
                )
            )
    for item in ("call_a", "call_b"):
        done = {"type": "response.function_call_arguments.done", "item_id": item, "output_index": 0}
        events.append((done["type"], {**done, "arguments": arguments, "sequence_number": len(events)}))
    parsed = parse(feed_all(sse(events))[0])
    for item in ("call_a", "call_b"):
        joined = "".join(
            d["delta"] for _, d in parsed if d["type"].endswith(".delta") and d["item_id"] == item
        )
        assert json.loads(joined) == {"to": "[REDACTED:EMAIL_ADDRESS]"}


def test_a_responses_stream_cut_before_done_flushes_at_the_end() -> None:
    parsed = parse(feed_all(responses_stream("mail jane@example.com", size=4, done=False))[0])
    assert "".join(d["delta"] for _, d in parsed if "delta" in d) == "mail [REDACTED:EMAIL_ADDRESS]"
    assert [d["sequence_number"] for _, d in parsed] == list(range(len(parsed)))


def anthropic_stream(text: str, size: int = 2, kind: str = "text_delta", stop: bool = True) -> bytes:
    field = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}[kind]
    block = {
        "text_delta": {"type": "text", "text": ""},
        "input_json_delta": {"type": "tool_use", "id": "t1", "name": "pay", "input": {}},
        "thinking_delta": {"type": "thinking", "thinking": ""},
    }[kind]
    events: list[tuple[str | None, dict[str, Any]]] = [
        (
            "message_start",
            {"type": "message_start", "message": {"id": "m1", "role": "assistant", "content": []}},
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
    ]
    for start in range(0, len(text), size):
        delta = {"type": kind, field: text[start : start + size]}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    if kind == "thinking_delta":
        signature = {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}
        events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": signature})
        )
    if stop:
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}))
        events.append(("message_stop", {"type": "message_stop"}))
    return sse(events)


def anthropic_text(parsed: list[tuple[str | None, Any]], field: str = "text") -> str:
    return "".join(d["delta"].get(field, "") for n, d in parsed if n == "content_block_delta")


def test_anthropic_text_deltas_are_masked_and_flushed_before_the_block_stops() -> None:
    parsed = parse(feed_all(anthropic_stream(ANSWER, size=2))[0])
    assert anthropic_text(parsed) == MASKED
    names = [name for name, _ in parsed]
    last_delta = max(i for i, n in enumerate(names) if n == "content_block_delta")
    assert names[last_delta + 1] == "content_block_stop"
    assert all(name == data["type"] for name, data in parsed)


def test_anthropic_tool_input_and_thinking_are_masked_and_signatures_kept() -> None:
    arguments = json.dumps({"card": "4111111111111111"})
    parsed = parse(feed_all(anthropic_stream(arguments, size=3, kind="input_json_delta"))[0])
    assert json.loads(anthropic_text(parsed, "partial_json")) == {"card": "[REDACTED:CREDIT_CARD]"}
    parsed = parse(feed_all(anthropic_stream(ANSWER, size=5, kind="thinking_delta"))[0])
    assert anthropic_text(parsed, "thinking") == MASKED
    assert anthropic_text(parsed, "signature") == "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"


def test_an_anthropic_stream_cut_before_the_block_stops_flushes_at_the_end() -> None:
    parsed = parse(feed_all(anthropic_stream("mail jane@example.com", size=4, stop=False))[0])
    assert anthropic_text(parsed) == "mail [REDACTED:EMAIL_ADDRESS]"


def test_legacy_completions_text_is_masked_on_the_assembled_text() -> None:
    events: list[tuple[str | None, dict[str, Any]]] = [
        (
            None,
            {
                "id": "c",
                "object": "text_completion",
                "choices": [{"index": 0, "text": ANSWER[i : i + 3], "finish_reason": None}],
            },
        )
        for i in range(0, len(ANSWER), 3)
    ]
    events.append(
        (
            None,
            {
                "id": "c",
                "object": "text_completion",
                "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
            },
        )
    )
    parsed = parse(feed_all(sse(events) + b"data: [DONE]\n\n")[0])
    assert "".join(d["choices"][0]["text"] for _, d in parsed if d != "[DONE]") == MASKED
    assert all("delta" not in d["choices"][0] for _, d in parsed if d != "[DONE]")


def test_fields_beside_the_streamed_text_are_masked_too() -> None:
    body = event({"content": "hi", "audio": {"transcript": "mail jane@example.com"}}, usage_note="x")
    chunks, _ = run(body + b"data: [DONE]\n\n")
    assert chunks[0]["choices"][0]["delta"]["audio"]["transcript"] == "mail [REDACTED:EMAIL_ADDRESS]"


def test_json_events_of_no_known_dialect_have_every_string_masked() -> None:
    out, _ = feed_all(sse([("custom", {"note": "mail jane\u0040example.com", "n": 1})]))
    assert parse(out) == [("custom", {"note": "mail [REDACTED:EMAIL_ADDRESS]", "n": 1})]


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["responses", "anthropic"]),
    st.integers(min_value=1, max_value=9),
    st.lists(st.integers(min_value=1, max_value=200), max_size=20),
)
def test_every_dialect_gives_the_same_text_however_it_is_cut(
    dialect: str, token: int, cuts: list[int]
) -> None:
    if dialect == "responses":
        parsed = parse(feed_all(responses_stream(ANSWER, size=token), cuts)[0])
        text = "".join(d["delta"] for n, d in parsed if n == "response.output_text.delta")
    else:
        text = anthropic_text(parse(feed_all(anthropic_stream(ANSWER, size=token), cuts)[0]))
    assert text == MASKED
