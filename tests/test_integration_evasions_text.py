"""Values written to slip past the rules (separators, Unicode digits and spaces, invisible characters,
look-alike letters, glued prefixes, base64), through real Envoy, the extproc server and the demo model,
both ways: the prompt as the model receives it, and a streamed answer, cut into 3-character token events,
as the official `openai` client assembles it. Each case is a regression: every one delivered a value in
clear before the rules read the normalised view."""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from extproc.devenv import Stack

from .conftest import Demo, chat

AWS = "AKIA4OIGBRJZNX47IW6J"
GITHUB = "ghp_9Btr3dQAjQvDjPO9iaZzBjJK5LJbgr7uwliM"


def _digits(text: str, zero: int) -> str:
    return "".join(chr(zero + ord(c) - 48) if c.isdigit() else c for c in text)


# (the value as sent, what must not survive of it, checked on the ASCII view of what arrives)
CARDS = {
    "dots": "4111.1111.1111.1111",
    "slashes": "4111/1111/1111/1111",
    "tabs and newlines": "4111\t1111\n1111  1111",
    "no-break and thin spaces": "4111\u00a01111\u20091111\u00a01111",
    "fullwidth digits": _digits("4111 1111 1111 1111", 0xFF10),
    "Arabic-Indic digits": _digits("4111 1111 1111 1111", 0x0660),
    "Devanagari digits": _digits("4111 1111 1111 1111", 0x0966),
    "zero-width characters": "41\u200b11 11\u200d11 11\u206011 11\u00ad11",
    "a BOM inside": "41\ufeff11 1111 1111 1111",
    "letters glued before and after": "INV4111111111111111USD",
}
CREDENTIALS = {
    "Cyrillic look-alikes in AKIA": ("\u0410\u041a\u0406\u0410" + AWS[4:], AWS[4:]),
    "glued AWS key": ("creds=id" + AWS, AWS[4:]),
    "glued GitHub token": ("GH_TOKEN_" + GITHUB, GITHUB[4:]),
    "AWS key as base64": (base64.b64encode(f"key {AWS}".encode()).decode(), AWS[4:]),
}


def digits_left(text: str) -> str:
    """The decimal digits of ``text``, in any script, as ASCII: what a reader of the text recovers."""
    return "".join(str(unicodedata.decimal(c)) for c in text if unicodedata.decimal(c, None) is not None)


def ascii_view(text: str) -> str:
    """``text`` with invisible characters removed and compatibility forms folded, as a reader sees it."""
    folded = unicodedata.normalize("NFKC", text)
    return "".join(c for c in folded if unicodedata.category(c) != "Cf").replace("\u0410", "A")


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as opened:
        yield opened


def prompt_as_received(stack: Stack, demo: Demo, tag: str, text: str) -> str:
    sent = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=chat(text),
        headers={"content-type": "application/json", "x-test-tag": tag},
        timeout=30,
    )
    assert sent.status_code == 200, sent.text
    [seen] = demo.received(tag)
    content: str = json.loads(seen["body"])["messages"][0]["content"]
    return content


def answer_as_read(client: openai.OpenAI, demo: Demo, text: str) -> str:
    """``text`` streamed by the model in 3-character token events, as the openai client assembles it."""
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    chunks: list[dict[str, Any]] = [
        {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
        for choice in [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        + [{"index": 0, "delta": {"content": piece}, "finish_reason": None} for piece in pieces]
        + [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    ]
    body = "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    reply = demo.script(raw_b64=base64.b64encode(body.encode()).decode(), content_type="text/event-stream")
    stream = client.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-demo-reply": reply},
    )
    with stream:
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


@pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))
def test_a_disguised_card_in_a_prompt_reaches_the_model_masked(
    stack: Stack, demo: Demo, tag: str, card: str
) -> None:
    received = prompt_as_received(stack, demo, tag, f"charge {card} today")
    assert digits_left(received) == "1111", received  # only the last four digits are left


@pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))
def test_a_disguised_card_in_a_streamed_answer_reaches_the_client_masked(
    client: openai.OpenAI, demo: Demo, card: str
) -> None:
    read = answer_as_read(client, demo, f"your card {card} is on file")
    assert read.startswith("your card ")
    assert read.endswith(" is on file")
    assert digits_left(read) == "1111", read


@pytest.mark.parametrize(("value", "secret"), list(CREDENTIALS.values()), ids=list(CREDENTIALS))
def test_a_disguised_credential_in_a_prompt_never_reaches_the_model(
    stack: Stack, demo: Demo, tag: str, value: str, secret: str
) -> None:
    """Both keys are critical credentials, which the shipped base refuses in any prompt: only a value
    found through its disguise can be refused, and the model sees nothing of it."""
    sent = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=chat(f"use {value} now"),
        headers={"content-type": "application/json", "x-test-tag": tag},
        timeout=30,
    )
    assert (sent.status_code, sent.json()["error"]) == (403, "policy_blocked"), sent.text
    assert secret not in sent.text
    assert demo.received(tag) == []


@pytest.mark.parametrize(("value", "secret"), list(CREDENTIALS.values()), ids=list(CREDENTIALS))
def test_a_disguised_credential_in_a_streamed_answer_reaches_the_client_masked(
    client: openai.OpenAI, demo: Demo, value: str, secret: str
) -> None:
    read = answer_as_read(client, demo, f"use {value} now")
    assert secret not in ascii_view(read)
    assert "[REDACTED:" in read


def test_an_internationalised_email_is_masked_both_ways(
    stack: Stack, client: openai.OpenAI, demo: Demo, tag: str
) -> None:
    for address in ("josé.doe@exämple.com", "jane\uff20example.com"):
        expected = "mail [REDACTED:EMAIL_ADDRESS] now"
        assert prompt_as_received(stack, demo, tag, f"mail {address} now") == expected
        tag = tag + "x"
        assert answer_as_read(client, demo, f"mail {address} now") == expected
