"""The model servers' native APIs through real Envoy 1.40, the extproc server and the demo model: an
Ollama client's /api/chat and /api/generate, streamed (NDJSON) and not, masked both ways; TGI's
/generate and /generate_stream, llama.cpp's /completion; paths outside routes.model refused; the
caller's policy (models, output tokens) held on the native paths as on /v1/. And what every API can
return beside the text, token by token (log probabilities, token ids), emptied, read by the official
clients; a prompt sent as token ids refused."""

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from extproc.devenv import Stack
from extproc.identity.dev import mint_dev_token

from .conftest import Demo, start_stack

CARD = "4111 1111 1111 1111"
CARD_MASKED = "**** **** **** 1111"
EMAIL = "jane.doe@example.com"
EMAIL_MASKED = "[REDACTED:EMAIL_ADDRESS]"
PROMPT = f"my card is {CARD}, mail me at {EMAIL}"
ANSWER = f"Your card {CARD} is on file for {EMAIL}."
MASKED = f"Your card {CARD_MASKED} is on file for {EMAIL_MASKED}."


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dev-identity")


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory, dev_dir: Path) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("native") / "stack.log", dev_identity=dev_dir)
    yield running
    running.stop()


def token(dev_dir: Path, *groups: str) -> str:
    return mint_dev_token(dev_dir, "alice", list(groups), 600)


def auth(dev_dir: Path, *groups: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token(dev_dir, *groups)}", **headers}


def chat_body(content: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": "demo-small", "messages": [{"role": "user", "content": content}], **extra}


def generate_body(prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    return {"model": "demo-small", "prompt": prompt, **extra}


def ndjson(stack: Stack, path: str, body: dict[str, Any], headers: dict[str, str]) -> list[dict[str, Any]]:
    """The lines of a streamed answer, read as an Ollama client reads them: one JSON object per line."""
    lines: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{stack.url}{path}", json=body, headers=headers, timeout=30) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines.extend(json.loads(line) for line in answer.iter_lines() if line.strip())
    return lines


def test_a_streamed_chat_is_masked_both_ways_also_split_across_lines(
    native: Stack, dev_dir: Path, tag: str
) -> None:
    demo = Demo(native.demo_url)
    reply = demo.script(content=ANSWER, chunk_chars=3)  # the card and the address span several lines
    headers = auth(dev_dir, **{"x-demo-reply": reply, "x-test-tag": tag})
    lines = ndjson(native, "/api/chat", chat_body(), headers)
    assert "".join(line["message"]["content"] for line in lines) == MASKED
    assert lines[-1]["done"] is True
    assert all(line["done"] is False for line in lines[:-1])
    [seen] = demo.received(tag)
    prompt = json.loads(seen["body"])["messages"][0]["content"]
    assert prompt == f"my card is {CARD_MASKED}, mail me at {EMAIL_MASKED}"
    assert seen["path"] == "/api/chat"


def test_a_streamed_generate_is_masked_both_ways(native: Stack, dev_dir: Path, tag: str) -> None:
    demo = Demo(native.demo_url)
    reply = demo.script(content=ANSWER, chunk_chars=2)
    headers = auth(dev_dir, **{"x-demo-reply": reply, "x-test-tag": tag})
    lines = ndjson(native, "/api/generate", generate_body(), headers)  # "stream" unset: Ollama streams
    assert "".join(line["response"] for line in lines) == MASKED
    assert lines[-1]["done"] is True
    [seen] = demo.received(tag)
    assert json.loads(seen["body"])["prompt"] == f"my card is {CARD_MASKED}, mail me at {EMAIL_MASKED}"


def test_the_echoed_prompt_never_comes_back_whole(native: Stack, dev_dir: Path) -> None:
    lines = ndjson(native, "/api/generate", generate_body(), auth(dev_dir))
    text = "".join(line["response"] for line in lines)
    assert text == f"You said: my card is {CARD_MASKED}, mail me at {EMAIL_MASKED}"


@pytest.mark.parametrize(
    ("path", "body", "text"),
    [
        ("/api/chat", chat_body(stream=False), lambda a: a["message"]["content"]),
        ("/api/generate", generate_body(stream=False), lambda a: a["response"]),
    ],
    ids=["chat", "generate"],
)
def test_an_answer_that_is_not_streamed_is_masked(
    native: Stack, dev_dir: Path, tag: str, path: str, body: dict[str, Any], text: Any
) -> None:
    demo = Demo(native.demo_url)
    reply = demo.script(content=ANSWER)
    headers = auth(dev_dir, **{"x-demo-reply": reply, "x-test-tag": tag})
    answer = httpx.post(f"{native.url}{path}", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    document = answer.json()
    assert (text(document), document["done"]) == (MASKED, True)
    [seen] = demo.received(tag)
    assert CARD not in seen["body"]
    assert EMAIL not in seen["body"]


def test_ollama_model_information_is_forwarded(native: Stack, dev_dir: Path) -> None:
    answer = httpx.get(f"{native.url}/api/tags", headers=auth(dev_dir), timeout=30)
    assert answer.status_code == 200
    assert [m["name"] for m in answer.json()["models"]] == ["demo-small", "demo-large"]


@pytest.mark.parametrize(
    "path",
    ["/api/pull", "/api/delete", "/api/chat/", "/v1/../api/pull", "/v1/%2e%2e/api/pull", "/generate/x", "/"],
)
def test_a_path_outside_the_configured_ones_is_refused(
    native: Stack, dev_dir: Path, tag: str, path: str
) -> None:
    headers = auth(dev_dir, **{"x-test-tag": tag})
    answer = httpx.post(f"{native.url}{path}", json=generate_body(), headers=headers, timeout=30)
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["error"] == "not_found"
    assert answer.json()["message"] == "no such route"
    assert Demo(native.demo_url).received(tag) == []


@pytest.mark.parametrize(
    ("path", "body"),
    [("/api/chat", chat_body(model="demo-large")), ("/api/generate", generate_body(model="demo-large"))],
    ids=["chat", "generate"],
)
def test_a_model_the_policy_forbids_is_refused_on_the_native_path_as_on_v1(
    native: Stack, dev_dir: Path, tag: str, path: str, body: dict[str, Any]
) -> None:
    fraud = auth(dev_dir, "fraud-investigators", **{"x-test-tag": tag})
    for where, sent in ((path, body), ("/v1/chat/completions", chat_body(model="demo-large"))):
        answer = httpx.post(f"{native.url}{where}", json=sent, headers=fraud, timeout=30)
        assert (answer.status_code, answer.json()["error"]) == (403, "model_not_allowed"), where
    assert Demo(native.demo_url).received(tag) == []
    allowed = httpx.post(
        f"{native.url}{path}", json={**body, "model": "demo-small"}, headers=fraud, timeout=30
    )
    assert allowed.status_code == 200
    anyone = httpx.post(f"{native.url}{path}", json=body, headers=auth(dev_dir), timeout=30)
    assert anyone.status_code == 200  # the default policy allows every model


def test_a_body_without_a_model_is_refused_where_the_policy_allows_only_some(
    native: Stack, dev_dir: Path, tag: str
) -> None:
    """TGI's and llama.cpp's native bodies name no model: the server's one model would answer."""
    fraud = auth(dev_dir, "fraud-investigators", **{"x-test-tag": tag})
    for path, body in (("/generate", {"inputs": "hi"}), ("/completion", {"prompt": "hi"})):
        answer = httpx.post(f"{native.url}{path}", json=body, headers=fraud, timeout=30)
        assert (answer.status_code, answer.json()["error"]) == (403, "model_not_allowed"), path
    assert Demo(native.demo_url).received(tag) == []


def sse_documents(answer: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in answer.iter_lines() if line.startswith("data:")]


def test_tgi_generate_is_masked_both_ways_and_loses_its_token_details(
    native: Stack, dev_dir: Path, tag: str
) -> None:
    demo = Demo(native.demo_url)
    headers = auth(dev_dir, **{"x-demo-reply": demo.script(content=ANSWER), "x-test-tag": tag})
    body = {"inputs": PROMPT, "parameters": {"details": True, "max_new_tokens": 50}}
    answer = httpx.post(f"{native.url}/generate", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200
    document = answer.json()
    assert document["generated_text"] == MASKED
    assert (document["details"]["tokens"], document["details"]["prefill"]) == ([], [])
    [seen] = demo.received(tag)
    assert CARD not in seen["body"]
    assert EMAIL not in seen["body"]


def test_tgi_generate_stream_gives_the_masked_tokens_and_the_same_generated_text(
    native: Stack, dev_dir: Path
) -> None:
    demo = Demo(native.demo_url)
    headers = auth(dev_dir, **{"x-demo-reply": demo.script(content=ANSWER, chunk_chars=3)})
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 50}}
    with httpx.stream(
        "POST", f"{native.url}/generate_stream", json=body, headers=headers, timeout=30
    ) as answer:
        assert answer.status_code == 200
        events = sse_documents(answer)
    assembled = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert assembled == MASKED
    assert events[-1]["generated_text"] == MASKED  # the text the tokens assembled to, byte for byte
    assert {e["token"]["id"] for e in events} == {0}  # the ids are the text to a tokenizer


@pytest.mark.parametrize("stream", [True, False])
def test_llama_cpp_completion_is_masked_and_loses_its_token_ids(
    native: Stack, dev_dir: Path, tag: str, stream: bool
) -> None:
    demo = Demo(native.demo_url)
    headers = auth(dev_dir, **{"x-demo-reply": demo.script(content=ANSWER, chunk_chars=3), "x-test-tag": tag})
    body = {"prompt": PROMPT, "n_predict": 50, "stream": stream}
    answer = httpx.post(f"{native.url}/completion", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200
    documents = sse_documents(answer) if stream else [answer.json()]
    assert "".join(d["content"] for d in documents) == MASKED
    assert all(d["tokens"] == [] for d in documents)
    [seen] = demo.received(tag)
    assert CARD not in seen["body"]


def ollama_client(stack: Stack, dev_dir: Path, **headers: str) -> closing[ollama.Client]:
    """Ollama's official client, pointed at the proxy (closed on leaving the ``with``)."""
    return closing(ollama.Client(host=stack.url, headers=auth(dev_dir, **headers), timeout=30))


def test_the_ollama_client_chats_through_the_proxy_masked_both_ways(
    native: Stack, dev_dir: Path, tag: str
) -> None:
    demo = Demo(native.demo_url)
    reply = demo.script(content=ANSWER, chunk_chars=3)
    messages = [{"role": "user", "content": PROMPT}]
    with ollama_client(native, dev_dir, **{"x-demo-reply": reply}) as client:
        streamed = client.chat(model="demo-small", messages=messages, stream=True)
        assert "".join(part.message.content or "" for part in streamed) == MASKED
        whole = client.chat(model="demo-small", messages=messages)
        assert whole.message.content == MASKED
        assert whole.done is True
    with ollama_client(native, dev_dir, **{"x-test-tag": tag}) as client:
        echoed = client.chat(model="demo-small", messages=messages)
    assert echoed.message.content == f"You said: my card is {CARD_MASKED}, mail me at {EMAIL_MASKED}"
    [seen] = demo.received(tag)
    assert seen["path"] == "/api/chat"


@pytest.mark.parametrize("stream", [True, False])
def test_the_ollama_client_generates_through_the_proxy_and_gets_no_context_ids(
    native: Stack, dev_dir: Path, stream: bool
) -> None:
    """``context`` holds the conversation as token ids: the demo's ids read back as the text, card and
    all, to anyone with its tokenizer (as a real model's do with its public one)."""
    demo = Demo(native.demo_url)
    with ollama_client(
        native, dev_dir, **{"x-demo-reply": demo.script(content=ANSWER, chunk_chars=3)}
    ) as client:
        if stream:
            parts = list(client.generate(model="demo-small", prompt=PROMPT, stream=True))
            text, last = "".join(p.response for p in parts), parts[-1]
        else:
            last = client.generate(model="demo-small", prompt=PROMPT)
            text = last.response
    assert text == MASKED
    assert last.done is True
    assert not last.context
    with ollama_client(native, dev_dir) as client, pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="demo-small", prompt="go on", context=[1, 2, 3])  # an earlier answer's ids
    assert refused.value.status_code == 400
    assert "prompt_unscannable" in str(refused.value)


@pytest.mark.parametrize("stream", [True, False])
def test_the_openai_client_asking_for_logprobs_gets_none_and_a_masked_text(
    native: Stack, dev_dir: Path, stream: bool
) -> None:
    demo = Demo(native.demo_url)
    headers = auth(dev_dir, **{"x-demo-reply": demo.script(content=ANSWER, chunk_chars=3)})
    client = openai.OpenAI(
        base_url=f"{native.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    )
    messages: Any = [{"role": "user", "content": "hi"}]
    with client:
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="demo-small", messages=messages, logprobs=True, top_logprobs=2, stream=True
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
        else:
            completion = client.chat.completions.create(
                model="demo-small", messages=messages, logprobs=True, top_logprobs=2
            )
            text = completion.choices[0].message.content or ""
            assert completion.choices[0].logprobs is None
            assert CARD not in completion.model_dump_json()
    assert text == MASKED


def test_the_openai_client_sending_a_prompt_as_token_ids_is_refused(
    native: Stack, dev_dir: Path, tag: str
) -> None:
    headers = auth(dev_dir, **{"x-test-tag": tag})
    client = openai.OpenAI(
        base_url=f"{native.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    )
    with client, pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="demo-small", prompt=[[52, 49, 49, 49]], max_tokens=5)
    assert refused.value.status_code == 400
    assert refused.value.response.json()["error"] == "prompt_unscannable"
    assert Demo(native.demo_url).received(tag) == []


def test_output_tokens_are_held_to_the_policy_in_ollamas_spelling(
    native: Stack, dev_dir: Path, tag: str
) -> None:
    fraud = auth(dev_dir, "fraud-investigators")
    greedy = generate_body(stream=False, options={"num_predict": 5000})
    answer = httpx.post(f"{native.url}/api/generate", json=greedy, headers=fraud, timeout=30)
    assert (answer.status_code, answer.json()["error"]) == (400, "max_tokens_too_large")
    engineering = auth(dev_dir, "engineering", **{"x-test-tag": tag})
    for asked in (-1, 100000, None):  # -1: no limit in Ollama; capped, not refused, for engineering
        body = chat_body(stream=False, options={"num_predict": asked, "temperature": 0})
        assert (
            httpx.post(f"{native.url}/api/chat", json=body, headers=engineering, timeout=30).status_code
            == 200
        )
    unset = chat_body(stream=False)
    assert (
        httpx.post(f"{native.url}/api/chat", json=unset, headers=engineering, timeout=30).status_code == 200
    )
    seen = [json.loads(r["body"])["options"] for r in Demo(native.demo_url).received(tag)]
    assert seen == [{"num_predict": 8192, "temperature": 0}] * 3 + [{"num_predict": 8192}]


PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_media_the_policy_does_not_let_through_never_reach_the_model(
    native: Stack, dev_dir: Path, tag: str
) -> None:
    """A photo of a card reaches the model whole and unscanned: refused, from each official client."""
    headers = auth(dev_dir, **{"x-test-tag": tag})
    image: Any = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "read it"}, image]}]
    client = openai.OpenAI(
        base_url=f"{native.url}/v1", api_key="unused", max_retries=0, default_headers=headers
    )
    with client, pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="demo-small", messages=messages)
    assert refused.value.status_code == 403
    assert refused.value.response.json()["error"] == "media_not_allowed"
    with (
        ollama_client(native, dev_dir, **{"x-test-tag": tag}) as ollama_api,
        pytest.raises(ollama.ResponseError) as native_refused,
    ):
        ollama_api.chat(
            model="demo-small", messages=[{"role": "user", "content": "read it", "images": [PIXEL]}]
        )
    assert native_refused.value.status_code == 403
    assert Demo(native.demo_url).received(tag) == []
