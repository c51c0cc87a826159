"""Text no scanner can read: token ids, embeddings, and the copies of a text an API returns token by token.

A model reads and writes tokens, and several APIs let a client use them directly. A prompt may be sent
as token ids (OpenAI's and vLLM's completions ``prompt``, embeddings ``input``, llama.cpp's ``prompt``,
Ollama's ``context``, vLLM's ``prompt_token_ids`` and ``prompt_embeds``), and an answer may carry its own
text again, token by token, beside the text: log probabilities with each token's text and UTF-8 bytes
(``logprobs``, ``top_logprobs``, llama.cpp's ``completion_probabilities``), token ids (Ollama's
``context``, TGI's ``token.id`` and ``details.tokens``, llama.cpp's ``tokens``, vLLM's ``token_ids``).
Token ids are the text to anyone holding the model's tokenizer, which for an open model is public; a
per-token copy cannot be masked in step with the text, since a card number is four harmless tokens.

- **Requests**: a prompt field holding token ids, or any embeddings or token-id field, is refused with
  400 ``prompt_unscannable`` (``refuse_token_input``), whatever the policy and its mode: it is not a
  policy's choice, it is text the scanners cannot read.
- **Answers**: every per-token field is emptied (``strip_token_detail``): a list becomes ``[]``, an
  object ``null``, TGI's streamed ``token.id`` 0 (its clients read an integer there). The answer's text
  is scanned and masked as always; a client that asked for log probabilities gets none.
"""

from __future__ import annotations

from typing import Any, Final

from extproc.errors import ClientError

# Request fields that hold a prompt: refused when they hold token ids (an integer, or lists of them).
_PROMPT_FIELDS: Final = frozenset({"prompt", "input", "inputs", "context"})
# Request fields that only ever hold token ids or embeddings: refused when set at all.
_TOKEN_FIELDS: Final = frozenset(
    {"prompt_token_ids", "input_ids", "token_ids", "prompt_embeds", "input_embeds", "inputs_embeds"}
)

# Answer fields that copy the text token by token, wherever they are: emptied.
_PER_TOKEN: Final = frozenset(
    {
        "logprobs",  # OpenAI chat (object), completions (object), Responses (list); Ollama; vLLM
        "top_logprobs",
        "token_logprobs",
        "prompt_logprobs",  # vLLM: the prompt, token by token
        "completion_probabilities",  # llama.cpp server
        "top_tokens",  # TGI
    }
)
# Answer fields that hold token ids, as lists of integers or of token objects: emptied.
_TOKEN_LISTS: Final = frozenset({"tokens", "prefill", "token_ids", "prompt_token_ids", "context"})
# Subtrees an answer echoes from the request's own configuration (tool and format schemas, metadata): a
# property named ``logprobs`` in a tool's schema is no token.
_ECHOED: Final = frozenset(
    {"tools", "tool_choice", "metadata", "parameters", "schema", "input_schema", "format"}
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A JSON number: a server validating leniently reads ``40.0`` as the token id 40."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _holds_ids(value: Any) -> bool:
    """A number, or a list holding one, in lists nested to any depth (``[[1, 2], [3]]``, llama.cpp's
    ``[12, "text", 34]``, ``[40.0, 1093.0]``): a prompt is never a number."""
    if _is_number(value):
        return True
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for item in node:
                if _is_number(item):
                    return True
                if isinstance(item, list):
                    stack.append(item)
    return False


def token_input(document: Any) -> str | None:
    """The name of the first field of a request ``document`` that carries its prompt as token ids or
    embeddings; None when there is none."""
    if not isinstance(document, dict):
        return None
    for key, value in document.items():
        if key in _TOKEN_FIELDS and value not in (None, [], "", {}):
            return str(key)
        if key in _PROMPT_FIELDS and _holds_ids(value):
            return str(key)
    return None


def refuse_token_input(document: Any) -> None:
    """Raises 400 ``prompt_unscannable`` when ``document`` carries token ids or embeddings."""
    name = token_input(document)
    if name is not None:
        message = f"{name!r} carries token ids or embeddings, which cannot be scanned; send the text instead"
        raise ClientError(message, code="prompt_unscannable")


def _token_list(key: str, value: Any) -> bool:
    """Whether ``value`` under ``key`` is a non-empty list of token ids or token objects."""
    if not isinstance(value, list) or not value:
        return False
    if key == "context":  # Ollama's: numbers only (other APIs use the name for documents)
        return all(_is_number(item) for item in value)
    return all(_is_number(item) or isinstance(item, dict) for item in value)


def strip_token_detail(document: Any) -> bool:
    """Empties, in place, every per-token copy of the text and every token id in an answer ``document``
    (see the module's docstring); returns whether anything changed."""
    changed = False
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, dict | list))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in _ECHOED:
                continue
            if key in _PER_TOKEN and isinstance(value, list | dict) and value:
                node[key] = [] if isinstance(value, list) else None
                changed = True
            elif key in _TOKEN_LISTS and _token_list(key, value):
                node[key] = []
                changed = True
            elif key == "token" and isinstance(value, dict) and _is_int(value.get("id")) and value["id"] != 0:
                value["id"] = 0  # TGI's streamed token: its id is the text; clients read an integer
                stack.append(value)
                changed = True
            elif isinstance(value, dict | list):
                stack.append(value)
    return changed
