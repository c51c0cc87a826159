"""Media in a request (images, audio, video, files) reach the model unscanned, so they are refused unless
the caller's policy lets that kind through: every API's shape is found, anywhere in the document."""

import json
from typing import Any

import pytest

from extproc.media import media_in
from extproc.model import Reject, ReplaceBody

from .test_policy import chat, refused, run_request

PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def user(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "what is this?"}, *parts]}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (  # OpenAI chat: an image, by data URL or by link
            {
                "messages": [
                    user({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}})
                ]
            },
            [("image", "messages[0].content[1]")],
        ),
        (
            {"messages": [user({"type": "image_url", "image_url": {"url": "https://example.com/card.png"}})]},
            [("image", "messages[0].content[1]")],
        ),
        (  # OpenAI chat: audio in, and a PDF
            {
                "messages": [
                    user({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})
                ]
            },
            [("audio", "messages[0].content[1]")],
        ),
        (
            {"messages": [user({"type": "file", "file": {"filename": "p.pdf", "file_data": "JVBERi0="}})]},
            [("file", "messages[0].content[1]")],
        ),
        (  # OpenAI chat: the answer as speech
            {"messages": [], "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
            [("audio", "modalities"), ("audio", "audio")],
        ),
        (  # Responses: input parts, and the image generation tool
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
                ]
            },
            [("image", "input[0].content[0]")],
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-123"}]}]},
            [("file", "input[0].content[0]")],
        ),
        ({"input": "draw it", "tools": [{"type": "image_generation"}]}, [("image", "tools[0]")]),
        (  # Anthropic: an image block, a PDF document, inside a tool result too
            {"messages": [user({"type": "image", "source": {"type": "base64", "data": PIXEL}})]},
            [("image", "messages[0].content[1]")],
        ),
        (
            {"messages": [user({"type": "document", "source": {"type": "base64", "data": "JVBERi0="}})]},
            [("file", "messages[0].content[1]")],
        ),
        (
            {
                "messages": [
                    user({"type": "tool_result", "content": [{"type": "image", "source": {"type": "url"}}]})
                ]
            },
            [("image", "messages[0].content[1].content[0]")],
        ),
        (  # Ollama: images on a chat message and on a generate request
            {"messages": [{"role": "user", "content": "and this?", "images": [PIXEL]}]},
            [("image", "messages[0].images")],
        ),
        ({"prompt": "and this?", "images": [PIXEL]}, [("image", "images")]),
        ({"prompt": "[img-1] this?", "image_data": [{"data": PIXEL, "id": 1}]}, [("image", "image_data")]),
        (  # vLLM: an image as its embeddings
            {"messages": [user({"type": "image_embeds", "image_embeds": "AAAA"})]},
            [("image", "messages[0].content[1]")],
        ),
        (  # vLLM: video and audio by URL
            {"messages": [user({"type": "video_url", "video_url": {"url": "https://x/v.mp4"}})]},
            [("video", "messages[0].content[1]")],
        ),
    ],
)
def test_every_apis_media_is_found(document: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert sorted(media_in(document)) == sorted(expected)


@pytest.mark.parametrize(
    "document",
    [
        {"messages": [user()]},
        {"messages": [user({"type": "document", "source": {"type": "text", "data": "plain text"}})]},
        {"messages": [{"role": "user", "content": "hi", "images": []}], "audio": None},
        {"messages": [], "modalities": ["text"]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"messages": [{"role": "user", "content": "the word image, a type: image_url, in text"}]},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {"audio": {"type": "string"}}},
            }
        },
    ],
)
def test_text_is_no_media(document: dict[str, Any]) -> None:
    assert media_in(document) == []


IMAGE = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}


def test_an_image_is_refused_by_a_policy_that_does_not_let_images_through() -> None:
    body = chat("x") | {"messages": [user(IMAGE)]}
    ex, replies = run_request(body)
    assert refused(replies) == (403, "media_not_allowed")
    reject = next(r for r in replies if isinstance(r, Reject))
    assert "messages[0].content[1]" in json.loads(reject.body)["message"]
    assert ex.outcome().policy == "base"


def test_a_policy_that_lets_images_and_files_through_still_refuses_audio() -> None:
    body = chat("x") | {"messages": [user(IMAGE, {"type": "file", "file": {"file_data": "JVBERi0="}})]}
    _, replies = run_request(body, "investigators")
    assert [r for r in replies if isinstance(r, Reject)] == []
    assert [r.data for r in replies if isinstance(r, ReplaceBody)] == [None]  # sent as it came
    speech = chat("x") | {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    assert refused(run_request(speech, "investigators")[1]) == (403, "media_not_allowed")


def test_a_shadow_policy_records_the_media_it_would_refuse() -> None:
    ex, replies = run_request(chat("x", model="large-1") | {"messages": [user(IMAGE)]}, "pilot")
    assert refused(replies) == (403, "media_not_allowed")  # the policy that acts (base) refuses it too
    assert ex.outcome().shadow["shadow"].refused == ("model_not_allowed", "media_not_allowed")
