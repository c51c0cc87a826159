"""Every format through real Envoy 1.40, the extproc server and the demo model: the Responses API and
Anthropic streams read by their official clients, tool calls and tool results, NDJSON, compressed bodies,
and answers cut short by the stream limits."""

import base64
import gzip
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from extproc.devenv import Stack

from .conftest import Demo, anthropic_stream, start_stack

CARD = "4111 1111 1111 1111"
CARD_MASKED = "**** **** **** 1111"
EMAIL = "jane.doe@example.com"
EMAIL_MASKED = "[REDACTED:EMAIL_ADDRESS]"
ANSWER = f"Your card {CARD} is on file for {EMAIL}."
MASKED = f"Your card {CARD_MASKED} is on file for {EMAIL_MASKED}."


def sse_body(events: list[dict[str, object]]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as opened:
        yield opened


def drain(stream: openai.Stream[ChatCompletionChunk]) -> str:
    """The streamed content, read to the end (or to the error the client raises)."""
    received: list[str] = []
    try:
        for chunk in stream:
            received.extend(c.delta.content or "" for c in chunk.choices)
    finally:
        stream.close()
    return "".join(received)


def chat_post(stack: Stack, body: object, **headers: str) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_the_openai_client_streams_a_masked_responses_api_answer(
    stack: Stack, demo: Demo, client: openai.OpenAI
) -> None:
    reply = demo.script(content=ANSWER, chunk_chars=2)
    stream = client.responses.create(
        model="demo-small", input="hi", stream=True, extra_headers={"x-demo-reply": reply}
    )
    deltas: list[str] = []
    done_text = completed_text = ""
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.output_text.done":
            done_text = event.text
        elif event.type == "response.completed":
            completed_text = event.response.output_text
    assert "".join(deltas) == done_text == completed_text == MASKED


def test_the_anthropic_client_streams_a_masked_answer(stack: Stack, demo: Demo) -> None:
    reply = demo.script(content=ANSWER, chunk_chars=3)
    with anthropic_stream(stack, reply) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == MASKED
    assert final.content[0].type == "text"
    assert final.content[0].text == MASKED


def test_tool_call_arguments_and_tool_results_in_a_prompt_are_masked(
    stack: Stack, demo: Demo, tag: str
) -> None:
    # The e-mail in the arguments is escaped as \u0040 inside a JSON string inside the JSON body.
    arguments = json.dumps({"to": "jane.doe\\u0040example.com"}).replace("\\\\u0040", "\\u0040")
    assert "\\u0040" in arguments
    body = {
        "model": "demo-small",
        "messages": [
            {"role": "user", "content": "pay"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "pay", "arguments": arguments}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"card": CARD})},
        ],
    }
    answer = chat_post(stack, body, **{"x-test-tag": tag})
    assert answer.status_code == 200
    [seen] = demo.received(tag)
    messages = json.loads(seen["body"])["messages"]
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"to": EMAIL_MASKED}
    assert json.loads(messages[2]["content"]) == {"card": CARD_MASKED}
    assert messages[2]["tool_call_id"] == "c1"


def test_streamed_tool_call_arguments_are_masked_for_the_openai_client(
    stack: Stack, demo: Demo, client: openai.OpenAI
) -> None:
    arguments = json.dumps({"card": CARD, "to": EMAIL})
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "demo-small"}
    events: list[dict[str, object]] = []
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "pay", "arguments": ""}}
    events.append({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [first]}}]})
    for start in range(0, len(arguments), 3):
        call = {"index": 0, "function": {"arguments": arguments[start : start + 3]}}
        events.append({**head, "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    reply = demo.script(
        raw_b64=base64.b64encode(sse_body(events).encode()).decode(), content_type="text/event-stream"
    )
    stream = client.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "pay"}],
        stream=True,
        extra_headers={"x-demo-reply": reply},
    )
    joined = ""
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                joined += (call.function.arguments or "") if call.function else ""
    assert json.loads(joined) == {"card": CARD_MASKED, "to": EMAIL_MASKED}


def test_a_gzip_answer_is_masked_and_sent_on_uncompressed(stack: Stack, demo: Demo) -> None:
    document = {"choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}}]}
    reply = demo.script(
        raw_b64=base64.b64encode(gzip.compress(json.dumps(document).encode())).decode(),
        headers={"content-encoding": "gzip"},
    )
    answer = chat_post(stack, {"model": "demo-small", "messages": []}, **{"x-demo-reply": reply})
    assert answer.status_code == 200
    assert "content-encoding" not in answer.headers
    assert answer.json()["choices"][0]["message"]["content"] == MASKED


def test_a_gzip_event_stream_is_masked_as_it_arrives(stack: Stack, demo: Demo, client: openai.OpenAI) -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "demo-small"}
    events = [
        {**head, "choices": [{"index": 0, "delta": {"content": ANSWER[i : i + 2]}}]}
        for i in range(0, len(ANSWER), 2)
    ]
    reply = demo.script(
        raw_b64=base64.b64encode(gzip.compress(sse_body(events).encode())).decode(),
        content_type="text/event-stream",
        headers={"content-encoding": "gzip"},
    )
    stream = client.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-demo-reply": reply},
    )
    assert drain(stream) == MASKED


def test_a_gzip_prompt_reaches_the_model_masked_and_uncompressed(stack: Stack, demo: Demo, tag: str) -> None:
    body = json.dumps({"model": "demo-small", "messages": [{"role": "user", "content": f"card {CARD}"}]})
    answer = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=gzip.compress(body.encode()),
        headers={"content-type": "application/json", "content-encoding": "gzip", "x-test-tag": tag},
        timeout=30,
    )
    assert answer.status_code == 200
    [seen] = demo.received(tag)
    assert "content-encoding" not in seen["headers"]
    assert json.loads(seen["body"])["messages"][0]["content"] == f"card {CARD_MASKED}"


def test_a_compression_bomb_is_stopped_at_the_size_limit(stack: Stack, demo: Demo) -> None:
    # 64 MiB of zeros in about 64 KiB: over limits.max_response_bytes (16 MiB) once inflated.
    packer = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=9)
    reply = demo.script(raw_b64=base64.b64encode(packer).decode(), headers={"content-encoding": "gzip"})
    answer = chat_post(stack, {"model": "demo-small", "messages": []}, **{"x-demo-reply": reply})
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_too_large"


def test_an_answer_with_an_unknown_encoding_is_refused(stack: Stack, demo: Demo) -> None:
    reply = demo.script(
        raw_b64=base64.b64encode(b"\x1f\x9d\x90").decode(), headers={"content-encoding": "compress"}
    )
    answer = chat_post(stack, {"model": "demo-small", "messages": []}, **{"x-demo-reply": reply})
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_unscannable"


def test_an_answer_that_is_not_the_json_it_claims_is_refused(stack: Stack, demo: Demo) -> None:
    reply = demo.script(raw_b64=base64.b64encode(f'{{"content": "{CARD}"'.encode()).decode())
    answer = chat_post(stack, {"model": "demo-small", "messages": []}, **{"x-demo-reply": reply})
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_unscannable"
    assert CARD not in answer.text


def test_an_ndjson_stream_is_masked_line_by_line(stack: Stack, demo: Demo) -> None:
    lines = [
        {"model": "llama", "message": {"role": "assistant", "content": ANSWER[i : i + 2]}, "done": False}
        for i in range(0, len(ANSWER), 2)
    ]
    lines.append({"model": "llama", "message": {"role": "assistant", "content": ""}, "done": True})
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    reply = demo.script(raw_b64=base64.b64encode(raw).decode(), content_type="application/x-ndjson")
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/chat/completions",
        json={"model": "m", "messages": []},
        headers={"x-demo-reply": reply},
        timeout=30,
    ) as answer:
        received = [json.loads(line) for line in answer.iter_lines() if line]
    assert "".join(line["message"]["content"] for line in received) == MASKED
    assert received[-1]["done"] is True


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose streamed answers may last 1.5 s and carry 64 KiB at most."""
    env = {"EXTPROC_LIMITS__MAX_STREAM_SECONDS": "1.5", "EXTPROC_LIMITS__MAX_STREAM_BYTES": "65536"}
    running = start_stack(tmp_path_factory.mktemp("limited") / "stack.log", extra_env=env)
    yield running
    running.stop()


def cut_short(stack: Stack, **script: object) -> openai.APIError:
    """The error the openai client raises reading the scripted answer through ``stack``."""
    reply = Demo(stack.demo_url).script(**script)
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="demo-small",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-demo-reply": reply},
        )
        with pytest.raises(openai.APIError) as raised:
            drain(stream)
    return raised.value


def test_a_quiet_stream_past_its_duration_ends_with_an_error_event_the_client_raises(
    limited: Stack,
) -> None:
    # The first token comes at once, the next after 3 s: the cut at 1.5 s can only come from the
    # server's own timer, not from a message of Envoy's.
    started = time.monotonic()
    assert cut_short(limited, content="tick tock", chunk_chars=5, delay_ms=3000).body == "upstream_timeout"
    assert time.monotonic() - started < 2.9


def test_a_stream_over_its_size_limit_ends_with_an_error_event(limited: Stack) -> None:
    assert cut_short(limited, content="word " * 40_000, chunk_chars=50).body == "upstream_too_large"


def test_the_limited_stack_still_serves_short_answers(limited: Stack) -> None:
    answer = chat_post(limited, {"model": "demo-small", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "You said: hi"
