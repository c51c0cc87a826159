"""Media in a request: images, audio, video and files, which no text scanner reads. Pure.

A photo of a card, a PDF of a payslip or a voice message reaches the model whole, and the model reads
it; an answer asked for as audio speaks its text, card number and all, while only the transcript is
masked. So a request that carries media, or asks for an answer as audio or images, is refused unless its
policy names that kind in ``media`` (secure by default: a policy lets through only what it says).

The shapes, per API (``media_in`` finds them anywhere in the document):

- **image**: OpenAI ``image_url`` and ``input_image`` parts, the Responses ``image_generation`` tool and
  its calls sent back, computer screenshots; Anthropic ``image`` blocks; Ollama's ``images``; llama.cpp's
  ``image_data`` and ``multimodal_data``.
- **audio**: ``input_audio`` parts, vLLM's ``audio_url``; an answer asked for as speech (chat
  ``modalities`` with ``audio``, or an ``audio`` output setting).
- **video**: vLLM's ``video_url`` and ``input_video``.
- **file**: OpenAI ``file`` and ``input_file`` parts (``file_data``, ``file_url``, ``file_id``);
  Anthropic ``document`` blocks, but plain-text ones, and ``container_upload``.

An Anthropic ``document`` whose source is text is text, and scanned as such. A URL or an uploaded file's
id is refused as its content would be: the model server fetches what the scanner never sees.
"""

from __future__ import annotations

from typing import Any, Final, Literal

MediaKind = Literal["image", "audio", "video", "file"]
MEDIA_KINDS: Final[tuple[MediaKind, ...]] = ("image", "audio", "video", "file")

# A content part's ``type`` and the kind of media it carries.
_PART_TYPES: Final[dict[str, MediaKind]] = {
    "image_url": "image",
    "input_image": "image",
    "image": "image",
    "image_embeds": "image",  # vLLM: an image as its embeddings
    "image_pil": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "video_url": "video",
    "input_video": "video",
    "file": "file",
    "input_file": "file",
    "document": "file",
    "container_upload": "file",
    "image_generation": "image",  # a Responses tool: the answer is an image
    "image_generation_call": "image",  # an earlier answer's image, sent back
    "computer_screenshot": "image",
}
# Fields that hold media themselves (Ollama's base64 images, llama.cpp's image data).
_MEDIA_FIELDS: Final[dict[str, MediaKind]] = {
    "images": "image",
    "image_data": "image",
    "multimodal_data": "image",
}


def _text_document(node: dict[str, Any]) -> bool:
    """An Anthropic ``document`` block whose source is plain text (or inline content blocks): text the
    scanners read like any other string."""
    source = node.get("source")
    return isinstance(source, dict) and source.get("type") in ("text", "content")


def _speech(key: str, value: Any, path: str) -> bool:
    """Whether a chat request asks for the answer as speech: ``modalities`` naming audio, or the
    top-level ``audio`` output setting (voice, format)."""
    if key == "modalities":
        return isinstance(value, list) and "audio" in value
    return key == "audio" and not path and isinstance(value, dict)


def media_in(document: Any) -> list[tuple[MediaKind, str]]:
    """Every piece of media ``document`` carries or asks for, as (kind, where): ``where`` is the path of
    the field in the request (``messages[0].content[1]``)."""
    found: list[tuple[MediaKind, str]] = []
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{path}[{n}]") for n, item in reversed(list(enumerate(node))))
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        text = kind == "document" and _text_document(node)
        if isinstance(kind, str) and kind in _PART_TYPES and not text:
            found.append((_PART_TYPES[kind], path or "."))
            continue
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key in _MEDIA_FIELDS and value not in (None, [], "", {}):
                found.append((_MEDIA_FIELDS[key], where))
            elif _speech(key, value, path):
                found.append(("audio", where))
            elif isinstance(value, dict | list):
                stack.append((value, where))
    return found
