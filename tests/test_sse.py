"""Chat token streams are masked on the assembled text of each choice and tool call."""

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.engine import Detector, StreamScanner
from extproc.errors import UpstreamError
from extproc.mask.bodies import StreamingText
from extproc.mask.joined import MAX_CHANNELS, Router
from extproc.mask.ndjson import SniffedJson
from extproc.mask.sse import EventStream, SniffedStream
from extproc.model import Finding

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


# -- framing as the specification parses it -----------------------------------------------------------


def chat(content: Any, index: int = 0, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": {"content": content}, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra}


def raw(chunk: dict[str, Any], end: str = "\n") -> bytes:
    """One event as a model may write it: JSON with its non-ASCII characters unescaped."""
    return ("data: " + json.dumps(chunk, ensure_ascii=False) + end + end).encode()


def assembled(out: bytes) -> str:
    text = ""
    for _, data in parse(out):
        if data != "[DONE]":
            text += "".join(c["delta"].get("content") or "" for c in data["choices"])
    return text


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_a_unicode_line_separator_inside_an_event_does_not_split_it(separator: str) -> None:
    body = raw(chat("Card 4111 1111")) + raw(chat(" 1111 1111 ok", note=separator)) + b"data: [DONE]\n\n"
    out, processor = feed_all(body)
    assert b"1111 1111" not in out
    assert assembled(out) == "Card [REDACTED:CREDIT_CARD] ok"
    assert separator in parse(out)[1][1]["note"]  # the separator is kept, inside its event
    assert [f.entity for f in processor.findings] == ["CREDIT_CARD"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=12, max_size=12),
    st.lists(st.integers(min_value=1, max_value=60), max_size=20),
)
def test_lines_end_at_cr_lf_or_crlf_however_they_are_cut(ends: list[str], cuts: list[int]) -> None:
    pieces = [ANSWER[i : i + 5] for i in range(0, len(ANSWER), 5)]
    body = b"".join(raw(chat(piece), ends[n]) for n, piece in enumerate(pieces)) + b"data: [DONE]\r\r"
    out, _ = feed_all(body, cuts)
    assert assembled(out) == MASKED
    assert b"\r" not in out  # written out again with LF only


def test_a_leading_byte_order_mark_is_dropped_once_even_when_cut() -> None:
    body = b"\xef\xbb\xbf" + raw(chat("Card 4111 1111")) + raw(chat(" 1111 1111 ok")) + b"data: [DONE]\n\n"
    out, _ = feed_all(body, [1, 1, 1, 1])
    assert not out.startswith(b"\xef\xbb\xbf")
    assert assembled(out) == "Card [REDACTED:CREDIT_CARD] ok"
    # A second mark is part of the first field's name: receivers ignore that line, and so does the scan.
    out, _ = feed_all(b"\xef\xbb\xbf\xef\xbb\xbfdata: jane@example.com\n\n")
    assert out == b"\n"


def test_comments_are_emptied_unknown_fields_dropped_and_other_values_masked() -> None:
    card = "4111111111111111"
    body = (
        f": {card}\nid: {card}\nevent: note {card}\nretry: {card}\nfoo: {card}\n{card}\ndata: ok\n\n".encode()
    )
    out, processor = feed_all(body)
    assert out == (
        b":\nid: [REDACTED:CREDIT_CARD]\nevent: note [REDACTED:CREDIT_CARD]\n"
        b"retry: [REDACTED:CREDIT_CARD]\ndata: ok\n\n"
    )
    assert len(processor.findings) == 3


def test_an_event_the_stream_ends_in_is_scanned_and_kept_as_it_came() -> None:
    out, _ = feed_all(b"data: ok\n\ndata: mail jane@example.com")
    assert out == b"data: ok\n\ndata: mail [REDACTED:EMAIL_ADDRESS]"


# -- one scanner across choices, indexes and blocks -----------------------------------------------------


def test_a_finish_reason_on_every_event_does_not_reset_the_scanner() -> None:
    pieces = [ANSWER[i : i + 3] for i in range(0, len(ANSWER), 3)]
    out, _ = feed_all(b"".join(raw(chat(p, finish="stop")) for p in pieces) + b"data: [DONE]\n\n")
    assert assembled(out) == MASKED


def test_a_new_choice_index_for_every_piece_is_still_one_answer() -> None:
    pieces = [ANSWER[i : i + 3] for i in range(0, len(ANSWER), 3)]
    out, processor = feed_all(b"".join(raw(chat(p, index=n)) for n, p in enumerate(pieces)))
    assert assembled(out) == MASKED
    assert sorted(f.entity for f in processor.findings) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


def test_interleaved_choices_are_each_masked_on_their_own_text() -> None:
    first, second = "Card 4111 1111 1111 1111 ok", "Mail jane@example.com okay"
    events = []
    for n in range(0, 27, 3):
        events.append(raw(chat(first[n : n + 3], index=0)))
        events.append(raw(chat(second[n : n + 3], index=1)))
    parsed = parse(feed_all(b"".join(events))[0])
    texts = [
        "".join(d["choices"][0]["delta"]["content"] for _, d in parsed if d["choices"][0]["index"] == i)
        for i in (0, 1)
    ]
    assert texts == ["Card [REDACTED:CREDIT_CARD] ok", "Mail [REDACTED:EMAIL_ADDRESS] okay"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3), min_size=20, max_size=20), st.integers(1, 5))
def test_a_value_split_across_any_choices_is_found_however_it_is_spread(
    indexes: list[int], size: int
) -> None:
    pieces = [ANSWER[i : i + size] for i in range(0, len(ANSWER), size)]
    events = [
        raw(chat(p, index=indexes[n % 20], finish="stop" if n % 2 else None)) for n, p in enumerate(pieces)
    ]
    out, _ = feed_all(b"".join(events) + b"data: [DONE]\n\n")
    parsed = [d for _, d in parse(out) if d != "[DONE]"]
    per_choice = {
        i: "".join(d["choices"][0]["delta"]["content"] for d in parsed if d["choices"][0]["index"] == i)
        for i in set(indexes)
    }
    # Neither a client printing every delta in order nor one assembling each choice reads a value.
    for text in (assembled(out), *per_choice.values()):
        assert inspector().detector.scan(text) == [], text
    assert "1111" not in assembled(out)
    assert "jane@" not in assembled(out)


def test_a_new_content_index_or_block_for_every_piece_is_still_one_answer() -> None:
    events: list[tuple[str | None, dict[str, Any]]] = []
    for n in range(0, len(ANSWER), 4):
        delta = {"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": n}
        events.append((delta["type"], {**delta, "delta": ANSWER[n : n + 4], "sequence_number": n}))
    parsed = parse(feed_all(sse(events))[0])
    assert "".join(d["delta"] for _, d in parsed) == MASKED
    events = []
    for n in range(0, len(ANSWER), 4):
        delta = {"type": "text_delta", "text": ANSWER[n : n + 4]}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": n, "delta": delta}))
    assert anthropic_text(parse(feed_all(sse(events))[0])) == MASKED


def test_too_many_texts_end_the_stream() -> None:
    body = b"".join(raw(chat("x", index=n)) for n in range(400))
    with pytest.raises(UpstreamError):
        feed_all(body)


@pytest.mark.parametrize("twinned", [True, False])
def test_the_texts_of_a_stream_are_counted_the_same_with_a_shared_scanner(
    twinned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer channel counts toward MAX_CHANNELS from the first text, shared or not: 255 texts fit
    beside it, the 256th does not."""
    if not twinned:
        _without_twins(monkeypatch)
    fits = b"".join(raw(chat("x", index=n)) for n in range(MAX_CHANNELS - 1))
    assert feed_all(fits + b"data: [DONE]\n\n")[0].endswith(b"data: [DONE]\n\n")
    with pytest.raises(UpstreamError, match="more than"):
        feed_all(fits + raw(chat("x", index=MAX_CHANNELS)))


# -- shapes a dialect does not expect -------------------------------------------------------------------


def test_content_as_a_list_of_parts_is_scanned_with_the_text() -> None:
    body = raw(chat("Card 4111 1111")) + raw(chat([{"type": "text", "text": " 1111 1111 ok"}]))
    parsed = parse(feed_all(body)[0])
    assert parsed[0][1]["choices"][0]["delta"]["content"] == "Card [REDACTED:CREDIT_CARD]"
    assert parsed[1][1]["choices"][0]["delta"]["content"] == [{"type": "text", "text": " ok"}]


def test_a_delta_as_a_string_is_scanned_with_the_text() -> None:
    second = {"id": "c1", "choices": [{"index": 0, "delta": " 1111 1111 ok"}]}
    parsed = parse(feed_all(raw(chat("Card 4111 1111")) + raw(second))[0])
    assert parsed[1][1]["choices"][0]["delta"] == " ok"


def test_tool_arguments_as_an_object_are_scanned() -> None:
    call = {"index": 0, "function": {"name": "pay", "arguments": {"card": "4111111111111111"}}}
    chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}
    parsed = parse(feed_all(raw(chunk))[0])
    arguments = parsed[0][1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
    assert arguments == {"card": "[REDACTED:CREDIT_CARD]"}


def test_values_in_finish_reason_obfuscation_and_done_logprobs_are_masked() -> None:
    out, _ = feed_all(raw(chat("hi", finish="4111111111111111", obfuscation="jane@example.com")))
    assert b"4111" not in out
    assert b"jane@" not in out
    done = {
        "type": "response.output_text.done",
        "text": "ok",
        "obfuscation": "jane@example.com",
        "logprobs": [{"token": "4111 1111"}, {"token": " 1111 1111"}],
    }
    parsed = parse(feed_all(sse([(done["type"], done)]))[0])
    assert parsed[0][1]["logprobs"] == []
    assert parsed[0][1]["obfuscation"] == "[REDACTED:EMAIL_ADDRESS]"


def test_extra_fields_of_a_signature_delta_are_scanned_across_events() -> None:
    events: list[tuple[str | None, dict[str, Any]]] = []
    for part in ("Card 4111 1111", " 1111 1111 ok"):
        delta = {"type": "signature_delta", "signature": "EqQBCg", "note": part}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    parsed = parse(feed_all(sse(events))[0])
    assert "".join(d["delta"]["note"] for _, d in parsed) == "Card [REDACTED:CREDIT_CARD] ok"
    assert all(d["delta"]["signature"] == "EqQBCg" for _, d in parsed)


def test_an_unknown_field_split_across_events_is_found() -> None:
    body = raw(chat("a", extra={"x": "Card 4111 1111"})) + raw(chat("b", extra={"x": " 1111 1111 ok"}))
    parsed = parse(feed_all(body)[0])
    assert "".join(d["extra"]["x"] for _, d in parsed) == "Card [REDACTED:CREDIT_CARD] ok"


# -- dialects of no known shape ------------------------------------------------------------------------


def test_tgi_token_text_split_across_events_is_found() -> None:
    events = [
        (None, {"index": n, "token": {"id": n, "text": ANSWER[n : n + 3], "special": False}, "details": None})
        for n in range(0, len(ANSWER), 3)
    ]
    parsed = parse(feed_all(sse(events))[0])
    assert "".join(d["token"]["text"] for _, d in parsed) == MASKED


def test_plain_text_events_split_a_value_in_vain() -> None:
    body = b"".join(f"data: {ANSWER[n : n + 3]}\n\n".encode() for n in range(0, len(ANSWER), 3))
    out, _ = feed_all(body)
    assert "".join(e.removeprefix("data: ") for e in out.decode().split("\n\n")) == MASKED


def test_a_duplicate_key_in_an_event_ends_the_stream() -> None:
    with pytest.raises(UpstreamError):
        feed_all(b'data: {"choices": [], "choices": []}\n\n')


# -- sniffing a text or untyped answer --------------------------------------------------------------------


def sniffed() -> SniffedStream:
    return SniffedStream(
        lambda: EventStream(inspector(), 1 << 16, TOO_LARGE),
        lambda: StreamingText(inspector(), 1 << 20, TOO_LARGE),
        lambda: SniffedJson(inspector(), 1 << 20, TOO_LARGE, UpstreamError("not JSON"), 1 << 16),
        1 << 16,
        TOO_LARGE,
        UpstreamError("data line in text"),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([b"", b"\xef\xbb\xbf", b"\n", b"\xef\xbb\xbf\r\n\r\n"]),
    st.sampled_from([b"", b": keep-alive\n\n", b"event: x\n", b"id: 1\n", b"retry: 10\n"]),
    st.lists(st.integers(min_value=1, max_value=8), max_size=10),
)
def test_a_body_framed_as_sse_is_read_as_sse_however_it_starts_and_is_cut(
    prefix: bytes, first: bytes, cuts: list[int]
) -> None:
    body = prefix + first + raw(chat("Card 4111 1111")) + raw(chat(" 1111 1111 ok")) + b"data: [DONE]\n\n"
    processor, out, position = sniffed(), b"", 0
    for size in cuts:
        out += processor.feed(body[position : position + size])
        position += size
    out += processor.feed(body[position:]) + processor.finish()
    assert isinstance(processor.chosen, EventStream)
    events = b"".join(e + b"\n\n" for e in out.split(b"\n\n") if b"data:" in e)  # not the comment
    assert assembled(events) == "Card [REDACTED:CREDIT_CARD] ok"


def test_a_body_that_starts_as_text_stays_text_until_a_data_line_appears() -> None:
    processor = sniffed()
    out = processor.feed(b"Hello, card 4111 1111 1111 1111 and data: no\n") + processor.feed(b"more")
    assert isinstance(processor.chosen, StreamingText)
    with pytest.raises(UpstreamError):
        processor.feed(b"\ndata: {}\n\n")
    assert b"4111" not in out


def escaped(text: str) -> str:
    """``text`` with every character written as a JSON ``\\u`` escape of four hex digits."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def sniff_all(body: bytes, cuts: list[int]) -> tuple[bytes, SniffedStream]:
    processor, out, position = sniffed(), b"", 0
    for size in cuts:
        out += processor.feed(body[position : position + size])
        position += size
    return out + processor.feed(body[position:]) + processor.finish(), processor


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([b"", b"\xef\xbb\xbf", b"\n", b" \t\r\n"]),
    st.lists(st.integers(min_value=1, max_value=8), max_size=10),
)
def test_a_text_answer_that_starts_like_json_is_read_as_json_however_it_is_cut(
    prefix: bytes, cuts: list[int]
) -> None:
    document = '{"choices": [{"message": {"content": "card ' + escaped("4111 1111 1111 1111") + '"}}]}'
    out, processor = sniff_all(prefix + document.encode(), cuts)
    assert isinstance(processor.chosen, SniffedJson)
    assert processor.streaming is False
    assert json.loads(out)["choices"][0]["message"]["content"] == "card [REDACTED:CREDIT_CARD]"


def test_a_text_answer_in_utf16_is_read_as_json() -> None:
    document = json.dumps({"content": "write to jane@example.com"})
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        out, processor = sniff_all(document.encode(encoding), [1, 1, 3])
        assert isinstance(processor.chosen, SniffedJson)
        assert json.loads(out) == {"content": "write to [REDACTED:EMAIL_ADDRESS]"}


def test_text_that_starts_with_a_bracket_but_is_not_json_is_masked_as_text() -> None:
    out, processor = sniff_all(b"[1] Your card: 4111 1111 1111 1111\n[2] done", [4])
    assert isinstance(processor.chosen, SniffedJson)
    assert out == b"[1] Your card: [REDACTED:CREDIT_CARD]\n[2] done"


def ollama(text: str, size: int = 3) -> bytes:
    lines = [
        json.dumps({"model": "m", "response": escaped(text[i : i + size]), "done": False})
        for i in range(0, len(text), size)
    ]
    return (
        "\n".join(lines).replace("\\\\u", "\\u").encode()
        + b'\n{"model": "m", "response": "", "done": true}\n'
    )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=6))
def test_ndjson_served_as_text_is_read_line_by_line_however_it_is_cut(cuts: list[int]) -> None:
    out, processor = sniff_all(ollama(ANSWER), cuts)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert "".join(line["response"] for line in lines) == MASKED
    assert lines[-1]["done"] is True
    assert isinstance(processor.chosen, SniffedJson)


def test_json_lines_among_text_lines_that_would_mask_more_are_refused() -> None:
    body = ollama("4111 1111 1111 1111", size=19) + b"note\n"
    with pytest.raises(UpstreamError):
        sniff_all(body, [])
    fine = b'{"response": "hello"}\n' + b"note 4111 1111 1111 1111\n"
    out, _ = sniff_all(fine, [])
    assert out == b'{"response": "hello"}\nnote [REDACTED:CREDIT_CARD]\n'


def _without_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Router, "_untwinned", lambda self, keys: keys)


def test_a_one_choice_stream_is_read_by_one_scanner(monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer channel is the choice's own while the stream has one text: one scanner, not two."""
    made: list[object] = []
    real = Detector.stream

    def stream(self: Detector, label: str | None = None) -> object:
        made.append(self)
        return real(self, label)

    monkeypatch.setattr(Detector, "stream", stream)
    chunks, processor = run(token_stream(ANSWER, size=2))
    assert text_of(chunks) == MASKED
    assert len(made) == 1
    assert sorted(f.entity for f in processor.findings) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Card 4111 ", "1111 1111", " 1111 ok", "jane@", "example.com", " words ", "x"]),
            st.sampled_from([0, 0, 0, 1, 2]),
            st.booleans(),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_twinned_channels_change_nothing_a_client_receives(
    pieces: list[tuple[str, int, bool]],
) -> None:
    """The same stream through a router whose answer channel starts as its choice's twin, and through
    one where every channel has its own scanner from the start: byte for byte the same output and the
    same findings, whatever mix of choices and tool-call arguments the pieces come in."""
    events = []
    for text, index, tool in pieces:
        if tool:
            call = {"index": 0, "function": {"arguments": json.dumps({"note": text})[:-1]}}
            chunk = {"id": "c1", "object": "chat.completion.chunk"}
            chunk["choices"] = [{"index": index, "delta": {"tool_calls": [call]}, "finish_reason": None}]
            events.append(raw(chunk))
        else:
            events.append(raw(chat(text, index=index)))
    body = b"".join(events) + b"data: [DONE]\n\n"
    twinned, first = feed_all(body)
    with pytest.MonkeyPatch.context() as patch:
        _without_twins(patch)
        apart, second = feed_all(body)
    assert twinned == apart
    assert [(f.rule_id, f.start, f.end) for f in first.findings] == [
        (f.rule_id, f.start, f.end) for f in second.findings
    ]


def test_the_events_of_one_chunk_are_fed_to_the_scanner_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer that arrives faster than it is read comes in chunks of many events: their text is fed
    in one piece per chunk, not one per event, and comes out masked the same."""
    fed: list[str] = []
    real = StreamScanner.feed

    def feed(self: StreamScanner, text: str) -> tuple[str, list[Finding]]:
        fed.append(text)
        return real(self, text)

    monkeypatch.setattr(StreamScanner, "feed", feed)
    body = token_stream(ANSWER, size=2)
    processor = EventStream(inspector(), 1 << 16, TOO_LARGE)
    out = processor.feed(body) + processor.finish()
    assert [t for t in fed if t] == [ANSWER]  # one scanner (one choice), one feed for the whole chunk
    events = [e.removeprefix("data: ") for e in out.decode().split("\n\n") if e]
    assert text_of([json.loads(e) for e in events if e != "[DONE]"]) == MASKED
