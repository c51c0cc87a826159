"""The model server's paths the proxy forwards, and what each API calls its output-token limit. Pure.

A path pattern ending in ``/`` is a prefix (``/v1/``: every OpenAI and Anthropic path); any other is
one exact path (``/api/chat``), the query string apart. Envoy routes these patterns to the model
(``extproc.devenv.render_envoy_config`` writes one route each) and refuses every other path with 404
``not_found``; the exchange refuses the same paths itself, so a route added to Envoy alone still
reaches nothing unscanned and unconfigured.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final
from urllib.parse import unquote

# OpenAI and Anthropic (and every OpenAI-compatible server: vLLM, TGI, llama.cpp, Ollama), Ollama's
# native API (generation and read-only model information; pull, push, create, copy and delete change
# the server and are not forwarded), TGI's native API and llama.cpp server's.
DEFAULT_MODEL_PATHS: Final[tuple[str, ...]] = (
    "/v1/",
    "/api/chat",
    "/api/generate",
    "/api/tags",
    "/api/show",
    "/api/ps",
    "/api/version",
    "/generate",
    "/generate_stream",
    "/completion",
)

# Where each API reads the most tokens it may generate: a key path in the request document. Every one
# present is held to a policy's ``max_tokens``, whatever the route, so no API's spelling goes around it.
OUTPUT_TOKEN_FIELDS: Final[tuple[tuple[str, ...], ...]] = (
    ("max_tokens",),  # OpenAI chat and completions (legacy), Anthropic, llama.cpp (alias)
    ("max_completion_tokens",),  # OpenAI chat
    ("max_output_tokens",),  # OpenAI Responses
    ("options", "num_predict"),  # Ollama native (-1: no limit, -2: fill the context)
    ("parameters", "max_new_tokens"),  # TGI native
    ("n_predict",),  # llama.cpp server (-1: no limit)
)


def check_pattern(pattern: str) -> str:
    """A path pattern as the settings accept it: absolute, no query, no dot segments or doubled slashes
    (Envoy normalises those away before it routes, so such a pattern would never match)."""
    if not pattern.startswith("/"):
        raise ValueError(f"a model path starts with '/': {pattern!r}")
    if any(c in pattern for c in "?#*") or any(c.isspace() for c in pattern):
        raise ValueError(f"a model path is a plain path or a prefix ending in '/', not {pattern!r}")
    segments = pattern.split("/")[1:-1] if pattern.endswith("/") else pattern.split("/")[1:]
    if pattern != "/" and any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"a model path has no empty, '.' or '..' segment: {pattern!r}")
    return pattern


def is_model_path(path: str, patterns: Iterable[str]) -> bool:
    """Whether ``path`` (without its query) is one the patterns forward. A path with a dot segment or an
    empty one, percent-encoded or not, or a backslash, is none: a model server that resolves it could
    serve another path than the one that matched (``/v1/../api/pull``)."""
    decoded = unquote(path)
    if "\\" in decoded or "//" in decoded or any(s in (".", "..") for s in decoded.split("/")):
        return False
    return any(path.startswith(p) if p.endswith("/") else path == p for p in patterns)


def envoy_match(pattern: str) -> dict[str, str]:
    """The Envoy route ``match`` of one pattern."""
    return {"prefix": pattern} if pattern.endswith("/") else {"path": pattern}


def output_token_field(route: str) -> tuple[str, ...]:
    """The field a policy's ``max_tokens`` is written to when the request sets none."""
    if route.endswith("/responses"):
        return ("max_output_tokens",)
    if route in ("/api/chat", "/api/generate"):
        return ("options", "num_predict")
    if route in ("/generate", "/generate_stream"):
        return ("parameters", "max_new_tokens")
    if route == "/completion":
        return ("n_predict",)
    return ("max_tokens",)


def within(value: Any, limit: int) -> bool:
    """Whether a requested output-token limit keeps to ``limit``: a count from 0 to it. Null, a negative
    count (no limit, in Ollama and llama.cpp) and any other value do not."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def get_field(document: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """Whether the key path is present in ``document``, and its value."""
    node: Any = document
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def set_field(document: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    """Sets the key path, making the objects on the way; False when one on the way is not an object."""
    node: Any = document
    for key in path[:-1]:
        if key not in node:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            return False
    node[path[-1]] = value
    return True
