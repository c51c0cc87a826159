"""JSON that a receiver could read differently from the scanner, through real Envoy 1.40, the extproc
server and the demo model, both ways: the prompt as the model received it, the answer as the official
`openai` client reads it. Each test is a regression: every one of these delivered a value in clear."""

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from extproc.devenv import REPO_ENVOY_CONFIG, Stack
from extproc.mask.bodies import MAX_JSON_DEPTH

from .conftest import Demo, start_stack

CARD = "4111111111111111"
CARD_MASKED = "************1111"
SPACED_CARD = "4111 1111 1111 1111"
SPACED_MASKED = "**** **** **** 1111"
ESCAPED_CARD = "".join(f"\\u{ord(c):04x}" for c in CARD)  # what a JSON parser reads as the card


def post(stack: Stack, body: bytes, content_type: str | None, tag: str) -> httpx.Response:
    headers = {"x-test-tag": tag}
    if content_type is not None:
        headers["content-type"] = content_type
    return httpx.post(f"{stack.url}/v1/chat/completions", content=body, headers=headers, timeout=30)


def prompt(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo-small", "messages": [{"role": "user", "content": content}], **extra}


def answer(**extra: Any) -> dict[str, Any]:
    """A chat completion as a model server would send it, with ``extra`` top-level fields."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "demo-small",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
        **extra,
    }


def scripted(demo: Demo, raw: bytes, content_type: str = "application/json") -> str:
    return demo.script(raw_b64=base64.b64encode(raw).decode(), content_type=content_type)


def ask(stack: Stack, reply: str) -> Any:
    """The answer to ``reply`` as the official openai client returns it."""
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as client:
        return client.chat.completions.create(
            model="demo-small",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-demo-reply": reply},
        )


def refused_answer(stack: Stack, reply: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as raised:
        ask(stack, reply)
    return raised.value


# -- 1. duplicate keys --------------------------------------------------------------------------------


def test_duplicate_keys_in_a_prompt_are_refused_not_forwarded(stack: Stack, demo: Demo, tag: str) -> None:
    body = (
        '{"model": "demo-small", "messages": [{"role": "user", '
        f'"content": "{SPACED_CARD}", "content": "hello"}}]}}'
    ).encode()
    refused = post(stack, body, "application/json", tag)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_json"
    assert refused.json()["message"] == 'request body is not valid JSON: duplicate key "content"'
    assert SPACED_CARD not in refused.text
    assert demo.received(tag) == []


def test_duplicate_keys_in_an_answer_are_refused_not_forwarded(stack: Stack, demo: Demo) -> None:
    raw = json.dumps(answer()).replace('"content": "ok"', f'"content": "{SPACED_CARD}", "content": "ok"')
    error = refused_answer(stack, scripted(demo, raw.encode()))
    assert error.status_code == 502
    assert error.body == "upstream_unscannable"
    assert SPACED_CARD not in error.response.text


# -- 2. numbers and keys ------------------------------------------------------------------------------


def test_a_card_as_a_json_number_or_key_in_a_prompt_is_masked(stack: Stack, demo: Demo, tag: str) -> None:
    body = json.dumps(prompt("hi", metadata={"account": int(CARD), CARD: "on file"})).encode()
    assert post(stack, body, "application/json", tag).status_code == 200
    [seen] = demo.received(tag)
    assert CARD not in seen["body"]
    assert json.loads(seen["body"])["metadata"] == {"account": CARD_MASKED, CARD_MASKED: "on file"}


def test_a_card_as_a_json_number_or_key_in_an_answer_is_masked(stack: Stack, demo: Demo) -> None:
    raw = json.dumps(answer(metadata={"account": int(CARD), CARD: "on file"})).encode()
    completion = ask(stack, scripted(demo, raw))
    assert completion.to_dict()["metadata"] == {"account": CARD_MASKED, CARD_MASKED: "on file"}
    assert CARD not in completion.to_json()


def test_two_keys_masked_alike_are_kept_apart_not_merged(stack: Stack, demo: Demo, tag: str) -> None:
    other = "5500000000081111"  # a MasterCard number with the same last four digits
    body = json.dumps(prompt("hi", metadata={CARD: 1, other: 2})).encode()
    assert post(stack, body, "application/json", tag).status_code == 200
    [seen] = demo.received(tag)
    assert json.loads(seen["body"])["metadata"] == {CARD_MASKED: 1, f"{CARD_MASKED}#2": 2}


# -- 3. text and untyped bodies that are JSON ----------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_a_json_prompt_sent_as_text_is_unescaped_before_scanning(
    stack: Stack, demo: Demo, tag: str, content_type: str | None
) -> None:
    body = json.dumps(prompt("CARD")).replace("CARD", ESCAPED_CARD).encode()
    assert CARD not in body.decode()  # as text, nothing reads as a card
    reply = post(stack, body, content_type, tag)
    assert reply.status_code == 200
    [seen] = demo.received(tag)
    assert json.loads(seen["body"])["messages"][0]["content"] == CARD_MASKED
    assert reply.json()["choices"][0]["message"]["content"] == f"You said: {CARD_MASKED}"


@pytest.fixture(scope="module")
def buffered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose Envoy sends answers BUFFERED (one message), as a deployment without streaming may."""
    folder = tmp_path_factory.mktemp("buffered")
    config = yaml.safe_load(REPO_ENVOY_CONFIG.read_text(encoding="utf-8"))
    modes = list(_find(config, "processing_mode"))
    assert modes, "envoy.yaml has no ext_proc processing_mode"
    for mode in modes:
        mode["response_body_mode"] = "BUFFERED"
    path = folder / "envoy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    running = start_stack(folder / "stack.log", envoy_config=path)
    yield running
    running.stop()


def _find(node: Any, key: str) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key and isinstance(value, dict):
                yield value
            else:
                yield from _find(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _find(item, key)


def test_a_json_answer_served_as_text_is_unescaped_before_scanning(buffered: Stack) -> None:
    raw = json.dumps(answer()).replace('"content": "ok"', f'"content": "{ESCAPED_CARD}"').encode()
    completion = ask(buffered, scripted(Demo(buffered.demo_url), raw, "text/plain"))
    assert completion.choices[0].message.content == CARD_MASKED


# -- 4. charsets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("media", ["text/plain", "application/json"])
def test_a_utf16_prompt_is_masked_in_utf16_not_scanned_as_utf8(
    stack: Stack, demo: Demo, tag: str, media: str
) -> None:
    # Little-endian without a BOM: every byte is also valid UTF-8, so the demo's record keeps them all,
    # and the demo (like most servers) detects UTF-16 JSON by its zero bytes.
    body = json.dumps(prompt(f"my card is {SPACED_CARD}")).encode("utf-16-le")
    reply = post(stack, body, f"{media}; charset=utf-16le", tag)
    assert reply.status_code == 200
    [seen] = demo.received(tag)
    sent = seen["body"].encode("utf-8")
    assert json.loads(sent.decode("utf-16-le"))["messages"][0]["content"] == f"my card is {SPACED_MASKED}"
    assert seen["headers"]["content-length"] == str(len(sent))
    assert reply.json()["choices"][0]["message"]["content"] == f"You said: my card is {SPACED_MASKED}"


def test_a_latin1_json_prompt_is_decoded_as_declared(stack: Stack, demo: Demo, tag: str) -> None:
    body = json.dumps(prompt(f"olé {SPACED_CARD}"), ensure_ascii=False).encode("latin-1")
    assert post(stack, body, "application/json; charset=latin-1", tag).status_code == 200
    [seen] = demo.received(tag)
    assert json.loads(seen["body"])["messages"][0]["content"] == f"olé {SPACED_MASKED}"


def test_a_prompt_in_an_unknown_charset_is_refused(stack: Stack, demo: Demo, tag: str) -> None:
    refused = post(stack, b"my card", "text/plain; charset=x-klingon", tag)
    assert (refused.status_code, refused.json()["error"]) == (415, "unsupported_media_type")
    assert demo.received(tag) == []


def test_a_prompt_that_does_not_decode_as_declared_is_refused(stack: Stack, demo: Demo, tag: str) -> None:
    # Valid UTF-8 with a card, declared UTF-16: odd-length, so it does not decode as declared.
    refused = post(stack, f"my card is {SPACED_CARD}!".encode(), "text/plain; charset=utf-16", tag)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_body"
    assert demo.received(tag) == []


def test_a_utf16_answer_is_masked_not_scanned_as_utf8(stack: Stack, demo: Demo) -> None:
    raw = json.dumps(answer()).replace('"ok"', f'"{SPACED_CARD}"').encode("utf-16")
    completion = ask(stack, scripted(demo, raw, "application/json; charset=utf-16"))
    assert completion.choices[0].message.content == SPACED_MASKED


def test_an_answer_in_an_unknown_charset_is_refused(stack: Stack, demo: Demo) -> None:
    raw = json.dumps(answer()).encode()
    error = refused_answer(stack, scripted(demo, raw, "application/json; charset=x-klingon"))
    assert (error.status_code, error.body) == (502, "upstream_unscannable")


# -- 5. nesting -------------------------------------------------------------------------------------------


def test_a_prompt_nested_1000_deep_is_invalid_json_not_a_503(stack: Stack, demo: Demo, tag: str) -> None:
    body = json.dumps(prompt("hi", metadata="NEST")).replace('"NEST"', "[" * 1000 + "]" * 1000).encode()
    refused = post(stack, body, "application/json", tag)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_json"
    assert refused.json()["message"].endswith(f"nested deeper than {MAX_JSON_DEPTH} levels")
    assert demo.received(tag) == []


def test_an_answer_nested_1000_deep_is_unscannable_not_a_503(stack: Stack, demo: Demo) -> None:
    raw = json.dumps(answer(metadata="NEST")).replace('"NEST"', "[" * 1000 + "]" * 1000).encode()
    error = refused_answer(stack, scripted(demo, raw))
    assert (error.status_code, error.body) == (502, "upstream_unscannable")


def test_a_prompt_nested_to_the_limit_still_passes(stack: Stack, demo: Demo, tag: str) -> None:
    nested = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)  # plus the top-level object
    body = json.dumps(prompt("hi", metadata="NEST")).replace('"NEST"', nested).encode()
    assert post(stack, body, "application/json", tag).status_code == 200
    assert len(demo.received(tag)) == 1


# -- values split across strings ------------------------------------------------------------------------


def test_a_card_split_across_content_parts_and_messages_reaches_the_model_masked(
    stack: Stack, demo: Demo, tag: str
) -> None:
    body = {
        "model": "demo-small",
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "card 4111 11"}, {"type": "text", "text": "11 1"}],
            },
            {"role": "user", "content": "111 1111 thanks"},
        ],
    }
    assert post(stack, json.dumps(body).encode(), "application/json", tag).status_code == 200
    [seen] = demo.received(tag)
    messages = json.loads(seen["body"])["messages"]
    texts = [part["text"] for part in messages[0]["content"]] + [messages[1]["content"]]
    assert "".join(texts) == f"card {SPACED_MASKED} thanks"


def test_a_card_split_across_the_choices_of_an_answer_reaches_the_client_masked(
    stack: Stack, demo: Demo
) -> None:
    reply = answer()
    reply["choices"] = [
        {"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        for i, text in enumerate(["card 4111 1111", " 1111 1111 ok"])
    ]
    completion = ask(stack, scripted(demo, json.dumps(reply).encode()))
    texts = [choice.message.content for choice in completion.choices]
    assert "".join(texts) == f"card {SPACED_MASKED} ok"
