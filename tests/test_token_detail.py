"""Text the scanners cannot read: a prompt sent as token ids is refused, and an answer's per-token copies
of its text (log probabilities, token ids) are emptied in every way an answer is read.

Each answer below is shaped as the real server writes it: OpenAI chat and completions with ``logprobs``,
the Responses API, TGI's ``/generate`` and ``/generate_stream``, llama.cpp's ``/completion``, vLLM's
``token_ids``, Ollama's ``context``. Without the emptying, each one carries the card number out in clear
beside its masked text (as token strings, UTF-8 byte lists, or ids a tokenizer reads back)."""

import json
from typing import Any

import pytest

from extproc.demo.server import detokenize, token_id
from extproc.errors import ClientError
from extproc.mask.registry import BodyLimits, Reading, Scope, choose
from extproc.mask.tokens import strip_token_detail, token_input
from extproc.model import BodyMode, Direction, Headers

from .rules_fixture import inspector

INSPECTOR = inspector()
LIMITS = BodyLimits(body=1 << 20, stream=1 << 20, event=1 << 16)
CARD = "4111 1111 1111 1111"
TOKENS = ["Card", " 411", "1 11", "11 1", "111 ", "1111"]  # the text, four characters a token
TEXT = "".join(TOKENS)
assert CARD in TEXT
IDS = [token_id(token) for token in TOKENS]
assert detokenize(IDS) == TEXT  # what anyone with the tokenizer reads from the ids


def read(direction: Direction, content_type: str, body: bytes, cuts: int = 0) -> bytes:
    """``body`` through the reader the registry chooses, fed in pieces of ``cuts`` bytes (whole if 0)."""
    headers = Headers(direction, (("content-type", content_type),), False)
    reading = choose(headers, BodyMode.FULL_DUPLEX_STREAMED, Scope(INSPECTOR, LIMITS))
    assert isinstance(reading, Reading), reading
    size = cuts or len(body)
    out = b"".join(reading.processor.feed(body[i : i + size]) for i in range(0, len(body), size))
    return out + reading.processor.finish()


def answer(document: Any) -> Any:
    return json.loads(read(Direction.RESPONSE, "application/json", json.dumps(document).encode()))


def leaks(out: Any) -> list[str]:
    """Every way the card is still readable in ``out``: as text, as byte lists, as token ids."""
    text = out if isinstance(out, str) else json.dumps(out)
    found = [form for form in (CARD, "4111111111111111", "[32, 52, 49, 49]") if form in text]
    found += [f"id {i}" for i in IDS[1:] if str(i) in text]
    return found


def chat_logprob(token: str) -> dict[str, Any]:
    entry = {"token": token, "logprob": -0.25, "bytes": list(token.encode())}
    return {**entry, "top_logprobs": [entry, {"token": "x", "logprob": -3.0, "bytes": [120]}]}


def test_a_chat_answers_logprobs_are_emptied_and_its_text_masked() -> None:
    logprobs = {"content": [chat_logprob(t) for t in TOKENS], "refusal": None}
    message = {"role": "assistant", "content": TEXT}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}
    out = answer({"id": "c-1", "object": "chat.completion", "choices": [choice]})
    assert out["choices"][0]["logprobs"] is None
    assert out["choices"][0]["message"]["content"] != TEXT
    assert leaks(out) == []


def test_a_legacy_completions_logprobs_object_is_emptied() -> None:
    logprobs = {
        "tokens": TOKENS,
        "token_logprobs": [-0.25] * len(TOKENS),
        "top_logprobs": [{t: -0.25} for t in TOKENS],  # the tokens as keys
        "text_offset": list(range(0, 24, 4)),
    }
    choice = {"index": 0, "text": TEXT, "logprobs": logprobs, "finish_reason": "stop"}
    out = answer({"id": "c-1", "object": "text_completion", "choices": [choice]})
    assert out["choices"][0]["logprobs"] is None
    assert leaks(out) == []


def test_a_responses_answers_part_logprobs_are_emptied() -> None:
    part = {
        "type": "output_text",
        "text": TEXT,
        "annotations": [],
        "logprobs": [chat_logprob(t) for t in TOKENS],
    }
    item = {"id": "msg_1", "type": "message", "role": "assistant", "content": [part]}
    out = answer({"id": "r-1", "object": "response", "output": [item], "top_logprobs": 2})
    assert out["output"][0]["content"][0]["logprobs"] == []
    assert out["top_logprobs"] == 2  # the request's setting, echoed, is no token
    assert leaks(out) == []


def test_tgi_generate_details_lose_their_tokens_and_prefill() -> None:
    tokens = [
        {"id": i, "text": t, "logprob": -0.25, "special": False} for i, t in zip(IDS, TOKENS, strict=True)
    ]
    best = {"generated_text": TEXT, "finish_reason": "length", "generated_tokens": 6, "tokens": tokens}
    details = {
        "finish_reason": "length",
        "generated_tokens": 6,
        "seed": None,
        "prefill": tokens,
        "tokens": tokens,
        "top_tokens": [tokens],
        "best_of_sequences": [best],
    }
    out = answer({"generated_text": TEXT, "details": details})
    assert out["details"]["tokens"] == []
    assert out["details"]["prefill"] == []
    assert out["details"]["top_tokens"] == []
    assert out["details"]["best_of_sequences"][0]["tokens"] == []
    assert out["details"]["generated_tokens"] == 6
    assert leaks(out) == []


def test_ollamas_context_is_emptied_in_a_json_answer_and_on_the_last_ndjson_line() -> None:
    whole = {"model": "m", "response": TEXT, "done": True, "context": IDS}
    assert answer(whole)["context"] == []
    assert answer({**whole, "context": [float(i) for i in IDS]})["context"] == []
    lines = [{"model": "m", "response": t, "done": False} for t in TOKENS]
    lines.append({"model": "m", "response": "", "done": True, "context": [1, 2, *IDS]})
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    out = [
        json.loads(line) for line in read(Direction.RESPONSE, "application/x-ndjson", body, 7).splitlines()
    ]
    assert out[-1]["context"] == []
    assert leaks(out) == []


def sse(documents: list[Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(d).encode() + b"\n\n" for d in documents)


def events(out: bytes) -> list[Any]:
    data = [line[6:] for line in out.decode().split("\n") if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def tgi_stream(final: str = TEXT) -> bytes:
    documents = [
        {
            "index": n,
            "token": {"id": token_id(t), "text": t, "logprob": -0.25, "special": False},
            "generated_text": None,
            "details": None,
            "top_tokens": [{"id": token_id(t), "text": t, "logprob": -0.25, "special": False}],
        }
        for n, t in enumerate(TOKENS)
    ]
    end = {"id": 2, "text": "</s>", "logprob": -0.01, "special": True}
    details = {"finish_reason": "eos_token", "generated_tokens": 7, "seed": None}
    documents.append(
        {"index": 6, "token": end, "generated_text": final, "details": details, "top_tokens": None}
    )
    return sse(documents)


@pytest.mark.parametrize("cuts", [0, 1, 5, 13])
def test_tgis_stream_loses_token_ids_and_its_final_text_is_the_deltas(cuts: int) -> None:
    out = events(read(Direction.RESPONSE, "text/event-stream", tgi_stream(), cuts))
    assert len(out) == len(TOKENS) + 1
    assert all(e["token"]["id"] == 0 for e in out[:-1])
    assert out[-1]["token"]["id"] == 0
    assert all(e["top_tokens"] == [] for e in out[:-1])
    assembled = "".join(e["token"]["text"] for e in out if not e["token"]["special"])
    assert out[-1]["generated_text"] == assembled
    assert out[-1]["token"]["text"] == "</s>"
    assert CARD not in assembled
    assert leaks(out) == []


def test_a_tgi_final_text_other_than_the_deltas_is_masked_whole() -> None:
    other = f"and also {CARD}"
    out = events(read(Direction.RESPONSE, "text/event-stream", tgi_stream(final=other)))
    assert out[-1]["generated_text"] != other
    assert CARD not in out[-1]["generated_text"]


def test_llama_cpp_stream_tokens_and_probabilities_are_emptied() -> None:
    def probability(t: str) -> dict[str, Any]:
        return {
            "id": token_id(t),
            "token": t,
            "bytes": list(t.encode()),
            "logprob": -0.25,
            "top_logprobs": [],
        }

    documents = [
        {
            "index": 0,
            "content": t,
            "tokens": [token_id(t)],
            "stop": False,
            "completion_probabilities": [probability(t)],
        }
        for t in TOKENS
    ]
    documents.append({"index": 0, "content": "", "tokens": [], "stop": True, "tokens_predicted": 6})
    out = events(read(Direction.RESPONSE, "text/event-stream", sse(documents), 9))
    assert all(e["tokens"] == [] for e in out)
    assert all(e.get("completion_probabilities", []) == [] for e in out)
    assert out[-1]["tokens_predicted"] == 6
    assert leaks(out) == []


def test_vllm_token_ids_and_chat_stream_logprobs_are_emptied() -> None:
    documents: list[Any] = [
        {"id": "c-1", "object": "chat.completion.chunk", "prompt_token_ids": IDS, "choices": []},
    ]
    documents += [
        {
            "id": "c-1",
            "object": "chat.completion.chunk",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": t},
                    "logprobs": {"content": [chat_logprob(t)]},
                    "token_ids": [token_id(t)],
                    "finish_reason": None,
                }
            ],
        }
        for t in TOKENS
    ]
    out = events(read(Direction.RESPONSE, "text/event-stream", sse(documents) + b"data: [DONE]\n\n", 11))
    assert out[0]["prompt_token_ids"] == []
    assert all(e["choices"][0]["logprobs"] is None and e["choices"][0]["token_ids"] == [] for e in out[1:])
    assert leaks(out) == []


def test_a_tool_schema_the_answer_echoes_keeps_fields_named_like_token_detail() -> None:
    """A Responses answer echoes the request's tools: a property named ``logprobs`` or ``tokens`` in a
    tool's schema is the caller's configuration, no token."""
    schema = {"type": "object", "properties": {"logprobs": {"type": "number"}, "tokens": {"type": "array"}}}
    tool = {"type": "function", "name": "f", "parameters": schema}
    document = {
        "id": "r-1",
        "object": "response",
        "tools": [tool],
        "metadata": {"context": [1, 2]},
        "output": [],
    }
    assert strip_token_detail(json.loads(json.dumps(document))) is False
    assert answer(document) == document


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"model": "m", "prompt": [40, 1093, 4111]}, "prompt"),  # OpenAI / vLLM completions
        ({"model": "m", "prompt": [[40, 1093], [4111]]}, "prompt"),  # a batch of them
        ({"prompt": [12, " and then", 34]}, "prompt"),  # llama.cpp: ids and text mixed
        ({"prompt": 4111}, "prompt"),
        ({"model": "m", "prompt": [52.0, 49.0, 49.0, 49.0]}, "prompt"),  # read as ids by a lenient server
        ({"model": "m", "input": [[40, 1093, 4111]]}, "input"),  # OpenAI embeddings
        ({"model": "m", "prompt": "hi", "context": [1, 2, 3]}, "context"),  # Ollama's /api/generate
        ({"model": "m", "prompt_token_ids": [1, 2]}, "prompt_token_ids"),
        ({"model": "m", "prompt_embeds": "AAAA"}, "prompt_embeds"),  # vLLM: a base64 tensor
        ({"inputs_embeds": [[0.1, 0.2]]}, "inputs_embeds"),
    ],
)
def test_a_prompt_as_token_ids_or_embeddings_is_refused(document: dict[str, Any], field: str) -> None:
    assert token_input(document) == field
    with pytest.raises(ClientError) as refused:
        read(Direction.REQUEST, "application/json", json.dumps(document).encode())
    assert refused.value.code == "prompt_unscannable"
    assert field in refused.value.message
    line = json.dumps(document).encode() + b"\n"
    with pytest.raises(ClientError) as refused:
        read(Direction.REQUEST, "application/x-ndjson", line)
    assert refused.value.code == "prompt_unscannable"


@pytest.mark.parametrize(
    "document",
    [
        {"model": "m", "prompt": "text"},
        {"model": "m", "prompt": ["two", "prompts"]},
        {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]},
        {
            "model": "m",
            "messages": [{"role": "user", "content": "4111"}],
            "logprobs": True,
            "top_logprobs": 3,
        },
        {"model": "m", "prompt": "hi", "context": []},
        {"model": "m", "prompt_embeds": None, "options": {"num_predict": 3}},
        {"inputs": "text", "parameters": {"details": True, "top_n_tokens": 2}},
    ],
)
def test_prompts_as_text_are_read_as_always(document: dict[str, Any]) -> None:
    assert token_input(document) is None
    read(Direction.REQUEST, "application/json", json.dumps(document).encode())
