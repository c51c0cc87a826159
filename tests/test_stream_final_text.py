"""A text repeated whole at the end of a token stream goes out exactly as its deltas were released.

The Responses API streams a text in deltas, then repeats it in ``.done`` events, in the item's parts and
in ``response.completed``; TGI's ``/generate_stream`` repeats it in its last event's ``generated_text``
(the other dialects, chat completions, Anthropic messages and Ollama's NDJSON, never repeat a text).
The client must never read two versions of one text, and a final text that is not what the deltas
carried must not carry a value out unmasked."""

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.rules import load_rules
from extproc.errors import UpstreamError
from extproc.mask import Inspector
from extproc.mask.sse import EventStream

from .rules_fixture import EDM_KEY, HASH_KEY, hyperscan_cache, inspector

ROOT = Path(__file__).resolve().parent.parent
PACKS = {
    "fixture": inspector(),
    "shipped": Inspector.build(
        load_rules([ROOT / "rules"]), hash_key=HASH_KEY, edm_key=EDM_KEY, cache_dir=hyperscan_cache()
    ),
}
CARD = "4111 1111 1111 1111"
EMAIL = "jane@example.com"
# Values that must never come out, in every form a client could read them in.
SECRETS = (CARD, "4111111111111111", EMAIL, "jane\\u0040example.com", "jane\\\\u0040example.com")
# Look like values and are none: a social security number no one is given, a card failing Luhn.
DECOYS = ("912-75-5356", "4111111111111112", "4111 1111 1111 1112")
WORDS = ("see", "and", "order", ",", "\n", "card", "mail", "ssn", "caf\u00e9")

# Joined with spaces: a value run into a digit on either side is a longer number, not that value.
segments = st.lists(st.sampled_from((CARD, EMAIL, *DECOYS, *WORDS)), min_size=1, max_size=12)
cuts = st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=40)
# A stream: the pack, a message and a JSON document's note (its "@" escaped or not), cut into deltas by
# ``sizes``, fed to the scanner in chunks of ``chunk`` bytes.
STREAMS = {
    "pack": st.sampled_from(sorted(PACKS)),
    "message": segments,
    "note": segments,
    "escape": st.booleans(),
    "sizes": cuts,
    "chunk": st.integers(min_value=7, max_value=400),
}


def arguments_text(parts: list[str], escape: bool) -> str:
    """Tool-call arguments as a model writes them: a JSON document, ``@`` escaped when ``escape``."""
    text = json.dumps({"note": " ".join(parts), "to": EMAIL, "ssn": DECOYS[0], "n": DECOYS[1]})
    return text.replace("@", "\\u0040") if escape else text


def pieces(text: str, sizes: list[int]) -> list[str]:
    out, position, index = [], 0, 0
    while position < len(text):
        size = sizes[index % len(sizes)]
        out.append(text[position : position + size])
        position, index = position + size, index + 1
    return out


def responses(message: str, arguments: str, sizes: list[int], finals: dict[str, str] | None = None) -> bytes:
    """A Responses stream: a message (``msg_1``, output 0) and a function call (``fc_1``, output 1), each
    streamed in deltas cut by ``sizes``, then repeated in every final event. ``finals`` gives the final
    texts when they differ from the deltas (``text``, ``arguments``)."""
    final_text = (finals or {}).get("text", message)
    final_arguments = (finals or {}).get("arguments", arguments)
    message_item = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": final_text, "annotations": []}],
    }
    call_item = {
        "id": "fc_1",
        "type": "function_call",
        "call_id": "call_1",
        "name": "send",
        "arguments": final_arguments,
        "status": "completed",
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {"id": "r1", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": {**message_item, "content": []}},
    ]
    text_at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events += [
        {"type": "response.output_text.delta", **text_at, "delta": piece, "logprobs": []}
        for piece in pieces(message, sizes)
    ]
    events += [
        {"type": "response.output_text.done", **text_at, "text": final_text, "logprobs": []},
        {"type": "response.content_part.done", **text_at, "part": message_item["content"][0]},  # type: ignore[index]
        {"type": "response.output_item.done", "output_index": 0, "item": message_item},
        {"type": "response.output_item.added", "output_index": 1, "item": {**call_item, "arguments": ""}},
    ]
    call_at = {"item_id": "fc_1", "output_index": 1}
    events += [
        {"type": "response.function_call_arguments.delta", **call_at, "delta": piece}
        for piece in pieces(arguments, list(reversed(sizes)))
    ]
    events += [
        {"type": "response.function_call_arguments.done", **call_at, "arguments": final_arguments},
        {"type": "response.output_item.done", "output_index": 1, "item": call_item},
        {"type": "response.completed", "response": {"id": "r1", "output": [message_item, call_item]}},
    ]
    return b"".join(
        f"event: {e['type']}\ndata: ".encode() + json.dumps({**e, "sequence_number": n}).encode() + b"\n\n"
        for n, e in enumerate(events)
    )


def run(pack: Inspector, body: bytes, chunk: int) -> bytes:
    stream = EventStream(pack, 1 << 20, UpstreamError("too large"))
    out = b"".join(stream.feed(body[start : start + chunk]) for start in range(0, len(body), chunk))
    return out + stream.finish()


def parse(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(block.split("data: ", 1)[1]) for block in out.decode().split("\n\n") if block]


def texts(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Every text of the answer, by what carries it: the deltas assembled, then each final repeat."""
    found: dict[str, list[str]] = {"text": [], "arguments": []}
    deltas: dict[str, str] = {"text": "", "arguments": ""}
    for event in events:
        kind = event["type"]
        if kind == "response.output_text.delta":
            deltas["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            deltas["arguments"] += event["delta"]
        elif kind == "response.output_text.done":
            found["text"].append(event["text"])
        elif kind == "response.content_part.done":
            found["text"].append(event["part"]["text"])
        elif kind == "response.function_call_arguments.done":
            found["arguments"].append(event["arguments"])
        items = [event["item"]] if kind == "response.output_item.done" else []
        items += event["response"]["output"] if kind == "response.completed" else []
        for item in items:
            if item["type"] == "message":
                found["text"].append(item["content"][0]["text"])
            else:
                found["arguments"].append(item["arguments"])
    return {key: [deltas[key], *found[key]] for key in found}


def assert_nothing_unmasked(pack: Inspector, out: bytes, events: list[dict[str, Any]]) -> None:
    for secret in SECRETS:
        assert secret.encode() not in out
    for key, versions in texts(events).items():
        for version in versions:
            readings = [version]
            if key == "arguments":
                readings += [str(v) for v in json.loads(version).values()]  # as the tool reads them
            for reading in readings:
                assert all(secret not in reading for secret in SECRETS)


@settings(max_examples=40, deadline=None)
@given(**STREAMS)
def test_every_final_text_is_exactly_what_its_deltas_assembled_to(
    pack: str, message: list[str], note: list[str], escape: bool, sizes: list[int], chunk: int
) -> None:
    arguments = arguments_text(note, escape)
    out = run(PACKS[pack], responses(" ".join(message), arguments, sizes), chunk)
    events = parse(out)
    for key, (assembled, *finals) in texts(events).items():
        assert finals == [assembled] * (4 if key == "text" else 3), key
    json.loads(texts(events)["arguments"][0])  # the arguments still parse
    assert_nothing_unmasked(PACKS[pack], out, events)


@settings(max_examples=25, deadline=None)
@given(pack=st.sampled_from(sorted(PACKS)), sizes=cuts, escape=st.booleans())
def test_a_final_text_that_differs_from_its_deltas_is_masked_whole(
    pack: str, sizes: list[int], escape: bool
) -> None:
    message = "see you soon"
    arguments = arguments_text(["nothing here"], False).replace(EMAIL, "joe")
    extra = arguments_text([f"card {CARD}"], escape)
    finals = {"text": f"see you soon, {EMAIL} card {CARD}", "arguments": extra}
    out = run(PACKS[pack], responses(message, arguments, sizes, finals), 64)
    events = parse(out)
    assert_nothing_unmasked(PACKS[pack], out, events)
    versions = texts(events)
    assert versions["text"][0] == message
    assert all(version != message for version in versions["text"][1:])  # the upstream's, masked
    assert all("example.com" not in version for version in versions["arguments"])


def test_a_repeated_text_that_matches_is_not_counted_again() -> None:
    body = responses(f"card {CARD}", arguments_text(["x"], True), [3])
    stream = EventStream(PACKS["fixture"], 1 << 20, UpstreamError("too large"))
    out = stream.feed(body) + stream.finish()
    assert CARD.encode() not in out
    assert sorted(f.entity for f in stream.findings) == ["CREDIT_CARD", "EMAIL_ADDRESS"]


@pytest.mark.parametrize("pack", sorted(PACKS))
def test_a_final_text_repeating_only_the_deltas_so_far_gets_them_as_released(pack: str) -> None:
    """A ``.done`` event in the middle of the deltas repeats what came before it; what comes after is
    still masked with the rest of the text."""
    events = [
        {
            "type": "response.output_text.delta",
            "item_id": "m",
            "output_index": 0,
            "content_index": 0,
            "delta": d,
        }
        for d in ("mail jane", "@example.com")
    ]
    done = {"type": "response.output_text.done", "item_id": "m", "output_index": 0, "content_index": 0}
    events.insert(1, {**done, "text": "mail jane"})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    parsed = parse(run(PACKS[pack], body, 1000))
    assert [e.get("text") for e in parsed if "text" in e] == [parsed[0]["delta"]]
    assert "".join(e["delta"] for e in parsed if "delta" in e) == "mail [REDACTED:EMAIL_ADDRESS]"


def tgi(message: str, sizes: list[int], final: str | None = None) -> bytes:
    """A TGI ``/generate_stream``: a token event per piece of ``message`` cut by ``sizes``, then the
    end-of-sequence token (special, its text no part of the answer) with ``generated_text``."""
    events: list[dict[str, Any]] = [
        {"index": n, "token": {"id": 7 + n, "text": piece, "logprob": -0.5, "special": False}}
        for n, piece in enumerate(pieces(message, sizes))
    ]
    end = {"id": 2, "text": "</s>", "logprob": -0.1, "special": True}
    details = {"finish_reason": "eos_token", "generated_tokens": len(events) + 1, "seed": None}
    events.append(
        {"index": len(events), "token": end, "generated_text": final or message, "details": details}
    )
    for event in events[:-1]:
        event.update(generated_text=None, details=None, top_tokens=None)
    return b"".join(b"data:" + json.dumps(e).encode() + b"\n\n" for e in events)


@settings(max_examples=40, deadline=None)
@given(**STREAMS)
def test_tgis_generated_text_is_exactly_what_its_tokens_assembled_to(
    pack: str, message: list[str], note: list[str], escape: bool, sizes: list[int], chunk: int
) -> None:
    """The answer is prose and a JSON document, as a model asked for JSON writes it."""
    text = " ".join(message) + "\n" + arguments_text(note, escape)
    out = run(PACKS[pack], tgi(text, sizes), chunk)
    events = parse(out)
    assembled = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert events[-1]["generated_text"] == assembled
    assert [e["generated_text"] for e in events[:-1]] == [None] * (len(events) - 1)
    for secret in (CARD, "4111111111111111", EMAIL):  # escapes in a text are not decoded: it is no JSON
        assert secret.encode() not in out


@pytest.mark.parametrize("pack", sorted(PACKS))
def test_a_tgi_generated_text_that_differs_from_its_tokens_is_masked_whole(pack: str) -> None:
    events = parse(run(PACKS[pack], tgi("see you soon", [4], final=f"see you soon, card {CARD}"), 50))
    assert "".join(e["token"]["text"] for e in events[:-1]) == "see you soon"
    assert CARD not in events[-1]["generated_text"]
    assert events[-1]["generated_text"].startswith("see you soon, card ")
