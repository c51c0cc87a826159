"""Token-stream evasions through real Envoy, the extproc server and a scripted model, read as the official
clients read them: each case is a way a model server once got a card past the stream masker."""

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from extproc.devenv import Stack

from .conftest import Demo, anthropic_stream
from .test_sse import escaped

HALVES = ("Your card 4111 1111", " 1111 1111 is on file.")


def chunk(content: Any, index: int = 0, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": {"content": content}, "finish_reason": finish}
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
        **extra,
    }


def events(*chunks: dict[str, Any], end: str = "\n", head: str = "") -> bytes:
    body = head + "".join("data: " + json.dumps(c, ensure_ascii=False) + end + end for c in chunks)
    return (body + "data: [DONE]" + end + end).encode()


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as opened:
        yield opened


def read(client: openai.OpenAI, demo: Demo, body: bytes, content_type: str = "text/event-stream") -> str:
    """Everything the openai client parsed from the stream, as JSON (extra fields included)."""
    reply = demo.script(raw_b64=base64.b64encode(body).decode(), content_type=content_type)
    stream = client.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-demo-reply": reply},
    )
    with stream:
        return json.dumps([c.model_dump(warnings=False) for c in stream])


def assert_masked(parsed: str) -> None:
    assert "1111 1111" not in parsed
    assert "4111" not in parsed
    assert "****" in parsed or "[REDACTED:CREDIT_CARD]" in parsed  # the card rule masks, keeping 4 digits


def test_regression_a_line_separator_inside_an_event_no_longer_splits_it(
    client: openai.OpenAI, demo: Demo
) -> None:
    body = events(chunk(HALVES[0]), chunk(HALVES[1], note="\u2028\u0085\x0c"))
    assert_masked(read(client, demo, body))


def test_regression_a_bom_cr_line_ends_and_comment_or_id_lines_no_longer_pass(
    client: openai.OpenAI, demo: Demo, stack: Stack
) -> None:
    body = b"\xef\xbb\xbf" + events(chunk(HALVES[0]), chunk(HALVES[1]), end="\r")
    assert_masked(read(client, demo, body))
    raw = b": 4111111111111111\nid: 4111111111111111\n" + events(chunk("ok"))
    reply = demo.script(raw_b64=base64.b64encode(raw).decode(), content_type="text/event-stream")
    answer = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"x-demo-reply": reply},
        timeout=30,
    )
    assert "4111" not in answer.text
    assert answer.text.startswith(":\nid: ")


@pytest.mark.parametrize("content_type", ["text/plain", ""])
def test_regression_an_event_stream_served_as_text_is_read_as_events(
    client: openai.OpenAI, demo: Demo, content_type: str
) -> None:
    assert_masked(read(client, demo, events(chunk(HALVES[0]), chunk(HALVES[1])), content_type))


def test_regression_a_new_choice_index_or_finish_reason_per_piece_no_longer_resets_the_scanner(
    client: openai.OpenAI, demo: Demo
) -> None:
    text = "".join(HALVES)
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    assert_masked(read(client, demo, events(*(chunk(p, index=n) for n, p in enumerate(pieces)))))
    assert_masked(read(client, demo, events(*(chunk(p, finish="stop") for p in pieces))))


def test_regression_shapes_the_dialect_does_not_expect_are_scanned(client: openai.OpenAI, demo: Demo) -> None:
    parts = chunk([{"type": "text", "text": HALVES[1]}])
    assert_masked(read(client, demo, events(chunk(HALVES[0]), parts)))
    assert_masked(read(client, demo, events(chunk("a", x=HALVES[0]), chunk("b", x=HALVES[1]))))
    assert_masked(
        read(client, demo, events(chunk("a", finish="4111111111111111", obfuscation="4111111111111111")))
    )


def test_regression_extra_fields_of_an_anthropic_signature_delta_are_scanned(
    stack: Stack, demo: Demo
) -> None:
    def event(kind: str, **data: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    message = {"id": "m1", "type": "message", "role": "assistant", "content": [], "model": "m"}
    message |= {"stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
    body = event("message_start", message=message)
    body += event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""})
    for half in HALVES:
        delta = {"type": "signature_delta", "signature": "EqQBCg", "note": half}
        body += event("content_block_delta", index=0, delta=delta)
    body += event("content_block_stop", index=0) + event("message_stop")
    reply = demo.script(raw_b64=base64.b64encode(body.encode()).decode(), content_type="text/event-stream")
    with anthropic_stream(stack, reply) as stream:
        parsed = json.dumps([e.model_dump() for e in stream])
    assert_masked(parsed)


def test_regression_an_unknown_dialect_split_across_events_is_found(stack: Stack, demo: Demo) -> None:
    text = "".join(HALVES)
    tokens = [
        {"index": n, "token": {"id": n, "text": text[n : n + 3], "special": False}}
        for n in range(0, len(text), 3)
    ]
    body = "".join(f"data: {json.dumps(t)}\n\n" for t in tokens).encode()
    reply = demo.script(raw_b64=base64.b64encode(body).decode(), content_type="text/event-stream")
    answer = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "demo-small", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        headers={"x-demo-reply": reply},
        timeout=30,
    )
    joined = "".join(
        json.loads(line[6:])["token"]["text"] for line in answer.text.split("\n") if line.startswith("data: ")
    )
    assert_masked(joined)


@pytest.mark.parametrize("content_type", ["text/plain", ""])
def test_regression_a_json_answer_served_as_text_has_its_escapes_read(
    client: openai.OpenAI, demo: Demo, content_type: str
) -> None:
    # The openai client parses a text answer as JSON, so the escapes are a card to it.
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "card " + escaped("4111 1111 1111 1111")},
                "finish_reason": "stop",
            }
        ],
    }
    body = json.dumps(completion).replace("\\\\u", "\\u").encode()
    reply = demo.script(raw_b64=base64.b64encode(body).decode(), content_type=content_type)
    answer = client.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-demo-reply": reply},
    )
    assert_masked(json.dumps(answer.model_dump()))


def test_regression_ndjson_served_as_text_is_read_line_by_line(stack: Stack, demo: Demo) -> None:
    text = "".join(HALVES)
    lines = [
        json.dumps({"model": "m", "response": escaped(text[i : i + 3]), "done": False})
        for i in range(0, len(text), 3)
    ]
    body = "\n".join(lines).replace("\\\\u", "\\u") + '\n{"model": "m", "response": "", "done": true}\n'
    reply = demo.script(raw_b64=base64.b64encode(body.encode()).decode(), content_type="text/plain")
    answer = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-demo-reply": reply},
        timeout=30,
    )
    assert_masked("".join(json.loads(line)["response"] for line in answer.text.splitlines()))


ESCAPED_ARGUMENTS = (
    '{"to": "jane' + escaped("@") + 'example.com", "card": "' + escaped("4111 1111 1111 1111") + '"}'
)


def test_regression_streamed_tool_arguments_with_json_escapes_are_read_decoded(
    client: openai.OpenAI, demo: Demo
) -> None:
    # The client joins the pieces and the tool parses them: \u0040 is an @ to both. Cut inside escapes.
    pieces = [ESCAPED_ARGUMENTS[i : i + 5] for i in range(0, len(ESCAPED_ARGUMENTS), 5)]
    opening = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "pay", "arguments": ""}}
    deltas = [{"role": "assistant", "tool_calls": [opening]}]
    deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in pieces]
    calls = [chunk(None) for _ in deltas] + [chunk(None, finish="tool_calls")]
    for call, delta in zip(calls, deltas, strict=False):
        call["choices"][0]["delta"] = delta
    reply = demo.script(raw_b64=base64.b64encode(events(*calls)).decode(), content_type="text/event-stream")
    stream = client.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-demo-reply": reply},
    )
    with stream:
        arguments = "".join(
            call.function.arguments or ""
            for c in stream
            for call in (c.choices[0].delta.tool_calls or [] if c.choices else [])
            if call.function is not None
        )
    decoded = json.loads(arguments)
    assert decoded["to"] == "[REDACTED:EMAIL_ADDRESS]"
    assert_masked(decoded["card"])


def test_regression_anthropic_partial_json_with_json_escapes_is_read_decoded(
    stack: Stack, demo: Demo
) -> None:
    def event(kind: str, **data: Any) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    message = {"id": "m1", "type": "message", "role": "assistant", "content": [], "model": "m"}
    message |= {"stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
    body = event("message_start", message=message)
    block = {"type": "tool_use", "id": "toolu_1", "name": "pay", "input": {}}
    body += event("content_block_start", index=0, content_block=block)
    for start in range(0, len(ESCAPED_ARGUMENTS), 4):
        delta = {"type": "input_json_delta", "partial_json": ESCAPED_ARGUMENTS[start : start + 4]}
        body += event("content_block_delta", index=0, delta=delta)
    body += event("content_block_stop", index=0)
    body += event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 9})
    body += event("message_stop")
    reply = demo.script(raw_b64=base64.b64encode(body.encode()).decode(), content_type="text/event-stream")
    with anthropic_stream(stack, reply) as stream:
        final = stream.get_final_message()
    [tool_use] = [b for b in final.content if b.type == "tool_use"]
    assert isinstance(tool_use.input, dict)
    assert tool_use.input["to"] == "[REDACTED:EMAIL_ADDRESS]"
    assert_masked(tool_use.input["card"])
