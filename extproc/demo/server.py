"""A demo model server speaking the APIs the sidecar understands, as JSON and as streams.

- ``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI; ``stream: true`` gives
  server-sent token events),
- ``POST /v1/responses`` (OpenAI Responses API, streamed as ``response.*`` events),
- ``POST /v1/messages`` (Anthropic messages, streamed as ``content_block_delta`` events),
- ``GET /v1/models``,
- Ollama's native ``POST /api/chat`` and ``POST /api/generate`` (streamed by default, as NDJSON lines
  of ``message.content`` or ``response`` ending with ``"done": true``; JSON with ``"stream": false``),
  ``GET /api/tags`` and ``GET /api/version``,
- TGI's native ``POST /generate`` and ``POST /generate_stream`` (``token`` events, the last with
  ``generated_text``), llama.cpp server's ``POST /completion`` (``content`` events with ``"stream":
  true``).

Like the real servers, answers carry the text token by token too when asked (chat ``logprobs``,
completions ``logprobs``, TGI ``details``) and always where the real ones do (Ollama's ``context``, TGI's
``token.id``). The demo's tokenizer is plain: a token is four characters of the text, and its id the
token's UTF-8 bytes read as one integer (``token_id``, ``detokenize``), so a test can read back what
token ids would tell anyone holding a model's tokenizer.

The answer echoes the last user message, unless a script says otherwise. A control surface for tests is
reached directly rather than through Envoy:

- ``POST /_demo/replies`` stores a scripted reply under an id; a request carrying ``x-demo-reply: <id>``
  gets it. The reply text therefore never passes through the prompt, so response masking is tested on
  its own. A script may set ``chunk_chars`` (characters per token event), ``delay_ms`` (pause between
  events; a JSON answer with a delay comes chunked, ``chunk_chars`` bytes at a time), or replace the
  whole answer with ``raw`` bytes and a ``content_type``; ``headers`` (an object, or a list of
  ``[name, value]`` pairs to repeat a header) are added to the answer.
- With ``--api-key-file``, every path but ``/_demo/`` answers 401 unless the request carries that key,
  as a hosted model API would: ``extproc dev`` makes one and gives it to extproc as the upstream credential.
- ``GET /_demo/requests?tag=<x-test-tag>`` returns the requests received (headers, every header line in
  ``header_list``, the path as sent with its query in ``raw_path``, and the body), so a test can prove
  what reached the model.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import web

log = logging.getLogger("extproc.demo")

MODELS = ("demo-small", "demo-large")
_RECORDED = web.AppKey("recorded", collections.deque)
_REPLIES = web.AppKey("replies", dict)


@dataclass(frozen=True)
class Script:
    content: str = ""
    chunk_chars: int = 4
    delay_ms: int = 0
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def _script_from(payload: dict[str, Any]) -> Script:
    raw = payload.get("raw_b64")
    return Script(
        content=str(payload.get("content", "")),
        chunk_chars=max(1, int(payload.get("chunk_chars", 4))),
        delay_ms=max(0, int(payload.get("delay_ms", 0))),
        raw=base64.b64decode(raw) if raw is not None else None,
        content_type=str(payload.get("content_type", "application/json")),
        headers=tuple((str(k), str(v)) for k, v in _pairs(payload.get("headers", {}))),
    )


def _pairs(headers: Any) -> list[tuple[Any, Any]]:
    """Headers as an object, or as a list of ``[name, value]`` pairs (a name may repeat)."""
    return list(headers.items()) if isinstance(headers, dict) else [tuple(pair) for pair in headers]


def _last_user_text(body: dict[str, Any]) -> str:
    if isinstance(body.get("prompt"), str):
        return str(body["prompt"])
    if isinstance(body.get("input"), str):
        return str(body["input"])
    if isinstance(body.get("inputs"), str):  # TGI's native API
        return str(body["inputs"])
    for message in reversed(body.get("messages") or body.get("input") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _handler(api: str) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await _answer(request, api)

    return handle


async def _record(request: web.Request) -> bytes:
    """Keeps the request for ``GET /_demo/requests``; returns its body."""
    raw_body = await request.read()
    request.app[_RECORDED].append(
        {
            "tag": request.headers.get("x-test-tag", ""),
            "path": request.path,
            "raw_path": request.raw_path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "header_list": [[k.lower(), v] for k, v in request.headers.items()],
            "body": raw_body.decode("utf-8", "replace"),
        }
    )
    return raw_body


async def not_served(request: web.Request) -> web.Response:
    """Any other path: recorded (tests prove what reached the model on every forwarded path), then 404."""
    await _record(request)
    error = {"message": f"{request.method} {request.path} is not served", "type": "not_found"}
    return web.json_response({"error": error}, status=404)


async def _answer(request: web.Request, api: str) -> web.StreamResponse:
    raw_body = await _record(request)
    try:
        body = json.loads(raw_body)
    except ValueError:
        return web.json_response(
            {"error": {"message": "invalid JSON", "type": "invalid_request"}}, status=400
        )
    if not isinstance(body, dict):
        return web.json_response(
            {"error": {"message": "expected an object", "type": "invalid_request"}}, status=400
        )
    script = request.app[_REPLIES].get(request.headers.get("x-demo-reply", ""))
    if script is None:
        script = Script(content=f"You said: {_last_user_text(body)}")
    if script.raw is not None:
        named = {name.lower() for name, _ in script.headers}
        default = [] if "content-type" in named else [("content-type", script.content_type)]
        return web.Response(body=script.raw, headers=[*default, *script.headers])
    model = str(body.get("model") or MODELS[0])
    kind = _API[api]
    answer = kind(script.content, model, f"{api}-{uuid.uuid4().hex[:24]}", int(time.time()), body)
    streamed = body.get("stream", kind.streams_by_default) or request.path == "/generate_stream"
    if not streamed:
        if not script.delay_ms:
            return web.json_response(answer.whole(), headers=list(script.headers))
        # A slow JSON answer: its bytes come in pieces, chunked, with the pause between them.
        whole = json.dumps(answer.whole()).encode()
        response = web.StreamResponse(headers=[("content-type", "application/json"), *script.headers])
        await response.prepare(request)
        for start in range(0, len(whole), script.chunk_chars):
            if start:
                await asyncio.sleep(script.delay_ms / 1000)
            await response.write(whole[start : start + script.chunk_chars])
        await response.write_eof()
        return response
    response = web.StreamResponse(
        headers=[("content-type", kind.stream_type), ("cache-control", "no-cache"), *script.headers]
    )
    await response.prepare(request)
    text = script.content
    pieces = [text[i : i + script.chunk_chars] for i in range(0, len(text), script.chunk_chars)]
    for number, event in enumerate(answer.events(pieces)):
        if script.delay_ms and number:
            await asyncio.sleep(script.delay_ms / 1000)
        await response.write(event)
    await response.write_eof()
    return response


TOKEN_CHARS = 4


def token_id(token: str) -> int:
    """The demo tokenizer's id of ``token``: its UTF-8 bytes as one big-endian integer."""
    return int.from_bytes(token.encode(), "big")


def detokenize(ids: list[int]) -> str:
    """The text of the demo tokenizer's ``ids``."""
    return "".join(i.to_bytes((i.bit_length() + 7) // 8, "big").decode() for i in ids if i > 0)


def _tokens(text: str) -> list[str]:
    return [text[i : i + TOKEN_CHARS] for i in range(0, len(text), TOKEN_CHARS)]


def _logprob(token: str) -> dict[str, Any]:
    """One token of a chat answer's ``logprobs.content``, with its one alternative."""
    entry = {"token": token, "logprob": -0.25, "bytes": list(token.encode())}
    return {**entry, "top_logprobs": [entry]}


def _sse(data: Any, name: str | None = None) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


@dataclass(frozen=True)
class _Answer(ABC):
    """One answer of one API: whole (JSON) or as the stream of events carrying ``pieces`` of the text."""

    text: str
    model: str
    id: str
    created: int
    request: dict[str, Any]  # the request's body: what it asked for (logprobs, details)
    streams_by_default: ClassVar[bool] = False  # without "stream" in the request
    stream_type: ClassVar[str] = "text/event-stream"

    @abstractmethod
    def whole(self) -> dict[str, Any]: ...

    @abstractmethod
    def events(self, pieces: list[str]) -> Iterator[bytes]: ...


class _Chat(_Answer):
    def whole(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "logprobs": self._logprobs(_tokens(self.text)),
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def _logprobs(self, tokens: list[str]) -> dict[str, Any] | None:
        if not self.request.get("logprobs"):
            return None
        return {"content": [_logprob(token) for token in tokens], "refusal": None}

    def events(self, pieces: list[str]) -> Iterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            logprobs = self._logprobs([delta["content"]] if delta.get("content") else [])
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created}
            return _sse({**head, "model": self.model, "choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        for piece in pieces:
            yield chunk({"content": piece})
        yield chunk({}, "stop")
        yield _sse(b"[DONE]")


class _Completion(_Answer):
    def _body(self, text: str, finish: str | None) -> dict[str, Any]:
        tokens = _tokens(text)
        logprobs = None
        if self.request.get("logprobs") is not None:  # the legacy shape: parallel lists
            logprobs = {
                "tokens": tokens,
                "token_logprobs": [-0.25] * len(tokens),
                "top_logprobs": [{token: -0.25} for token in tokens],
                "text_offset": [TOKEN_CHARS * n for n in range(len(tokens))],
            }
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        head = {"id": self.id, "object": "text_completion", "created": self.created}
        return {**head, "model": self.model, "choices": [choice]}

    def whole(self) -> dict[str, Any]:
        return self._body(self.text, "stop")

    def events(self, pieces: list[str]) -> Iterator[bytes]:
        for piece in pieces:
            yield _sse(self._body(piece, None))
        yield _sse(self._body("", "stop"))
        yield _sse(b"[DONE]")


class _Responses(_Answer):
    def whole(self, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": self.text, "annotations": []}]
        item = {"id": "msg_1", "type": "message", "role": "assistant", "status": status, "content": content}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": status,
            "output": [item],
        }

    def events(self, pieces: list[str]) -> Iterator[bytes]:
        sequence = iter(range(1 << 30))

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(sequence), **fields}, kind)

        started = {**self.whole("in_progress"), "output": []}
        yield event("response.created", response=started)
        item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        position = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", **position, part=part)
        for piece in pieces:
            yield event("response.output_text.delta", **position, delta=piece, logprobs=[])
        yield event("response.output_text.done", **position, text=self.text, logprobs=[])
        yield event("response.content_part.done", **position, part={**part, "text": self.text})
        whole = self.whole()
        yield event("response.output_item.done", output_index=0, item=whole["output"][0])
        yield event("response.completed", response=whole)


class _Messages(_Answer):
    def whole(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }

    def events(self, pieces: list[str]) -> Iterator[bytes]:
        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, **fields}, kind)

        yield event("message_start", message={**self.whole(), "content": [], "stop_reason": None})
        yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        for piece in pieces:
            yield event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
        yield event("content_block_stop", index=0)
        yield event(
            "message_delta",
            delta={"stop_reason": "end_turn", "stop_sequence": None},
            usage={"output_tokens": 1},
        )
        yield event("message_stop")


class _Ollama(_Answer):
    """Ollama's native answers: one JSON object, or NDJSON lines whose last has ``"done": true``."""

    streams_by_default = True
    stream_type = "application/x-ndjson"

    @abstractmethod
    def _line(self, text: str, done: bool) -> dict[str, Any]:
        """One line: the text of the answer it carries, and the closing fields on the last."""

    def _head(self) -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        return {"model": self.model, "created_at": stamp}

    @staticmethod
    def _done() -> dict[str, Any]:
        return {"done": True, "done_reason": "stop", "total_duration": 1, "eval_count": 1}

    def whole(self) -> dict[str, Any]:
        return self._line(self.text, True)

    def events(self, pieces: list[str]) -> Iterator[bytes]:
        for piece in pieces:
            yield json.dumps(self._line(piece, False)).encode() + b"\n"
        yield json.dumps(self._line("", True)).encode() + b"\n"


class _OllamaChat(_Ollama):
    def _line(self, text: str, done: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {**self._head(), "message": message, **(self._done() if done else {"done": False})}


class _OllamaGenerate(_Ollama):
    def _line(self, text: str, done: bool) -> dict[str, Any]:
        line = {**self._head(), "response": text, **(self._done() if done else {"done": False})}
        if done:  # the conversation as token ids, for the next request's "context"
            prompt = _last_user_text(self.request)
            line["context"] = [token_id(token) for token in _tokens(prompt) + _tokens(self.text)]
        return line


class _Tgi(_Answer):
    """TGI's native API: ``/generate`` (JSON, token details when ``parameters.details``) and
    ``/generate_stream`` (one ``token`` event per token, the last an end-of-sequence token with the whole
    ``generated_text``)."""

    @staticmethod
    def _token(text: str) -> dict[str, Any]:
        return {"id": token_id(text), "text": text, "logprob": -0.25, "special": False}

    def whole(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"generated_text": self.text}
        parameters = self.request.get("parameters")
        if isinstance(parameters, dict) and parameters.get("details"):
            tokens = [self._token(token) for token in _tokens(self.text)]
            answer["details"] = {
                "finish_reason": "eos_token",
                "generated_tokens": len(tokens),
                "seed": None,
                "prefill": [self._token(token) for token in _tokens(_last_user_text(self.request))],
                "tokens": tokens,
            }
        return answer

    def events(self, pieces: list[str]) -> Iterator[bytes]:
        for number, piece in enumerate(pieces):
            yield _sse(
                {
                    "index": number,
                    "token": self._token(piece),
                    "generated_text": None,
                    "details": None,
                    "top_tokens": None,
                }
            )
        end = {"id": 2, "text": "</s>", "logprob": -0.01, "special": True}
        details = {"finish_reason": "eos_token", "generated_tokens": len(pieces) + 1, "seed": None}
        yield _sse(
            {
                "index": len(pieces),
                "token": end,
                "generated_text": self.text,
                "details": details,
                "top_tokens": None,
            }
        )


class _LlamaCpp(_Answer):
    """llama.cpp server's native ``/completion``: ``content`` and the tokens' ids (``tokens``) per event,
    the last with ``"stop": true`` and an empty ``content``."""

    def _body(self, text: str, stop: bool) -> dict[str, Any]:
        tokens = [token_id(token) for token in _tokens(text)]
        return {"index": 0, "content": text, "tokens": tokens, "stop": stop, "id_slot": 0}

    def whole(self) -> dict[str, Any]:
        return {**self._body(self.text, True), "model": self.model, "tokens_predicted": 1}

    def events(self, pieces: list[str]) -> Iterator[bytes]:
        for piece in pieces:
            yield _sse(self._body(piece, False))
        yield _sse({**self._body("", True), "model": self.model, "tokens_predicted": len(pieces)})


_API: dict[str, type[_Answer]] = {
    "ollama_chat": _OllamaChat,
    "ollama_generate": _OllamaGenerate,
    "chat": _Chat,
    "completion": _Completion,
    "responses": _Responses,
    "messages": _Messages,
    "tgi": _Tgi,
    "llama_cpp": _LlamaCpp,
}


async def models(_request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "demo"} for m in MODELS],
        }
    )


async def ollama_tags(_request: web.Request) -> web.Response:
    found = [{"name": m, "model": m, "size": 0, "digest": "0" * 64, "details": {}} for m in MODELS]
    return web.json_response({"models": found})


async def ollama_version(_request: web.Request) -> web.Response:
    return web.json_response({"version": "0.0.0-demo"})


async def put_reply(request: web.Request) -> web.Response:
    payload = await request.json()
    reply_id = str(payload["id"])
    request.app[_REPLIES][reply_id] = _script_from(payload)
    return web.json_response({"id": reply_id})


async def get_requests(request: web.Request) -> web.Response:
    tag = request.query.get("tag")
    found = [r for r in request.app[_RECORDED] if tag is None or r["tag"] == tag]
    return web.json_response(found)


def _require_key(key_file: Path) -> Any:
    """Like a hosted model API: every path of the API needs the server's own key (``authorization: Bearer`` or
    ``x-api-key``). The file is read on each request, so a rotated key takes effect at once."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/_demo/"):
            key = (await asyncio.to_thread(key_file.read_text, encoding="utf-8")).strip()
            offered = str(request.headers.get("x-api-key") or request.headers.get("authorization") or "")
            if not hmac.compare_digest(offered.removeprefix("Bearer ").encode(), key.encode()):
                error = {"message": "invalid API key", "type": "authentication_error"}
                return web.json_response({"error": error}, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    return check


def make_app(key_file: Path | None = None) -> web.Application:
    middlewares = [_require_key(key_file)] if key_file is not None else []
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=middlewares)
    app[_RECORDED] = collections.deque(maxlen=2000)
    app[_REPLIES] = {}
    app.router.add_post("/v1/chat/completions", _handler("chat"))
    app.router.add_post("/v1/completions", _handler("completion"))
    app.router.add_post("/v1/responses", _handler("responses"))
    app.router.add_post("/v1/messages", _handler("messages"))
    app.router.add_get("/v1/models", models)
    app.router.add_post("/api/chat", _handler("ollama_chat"))
    app.router.add_post("/api/generate", _handler("ollama_generate"))
    app.router.add_get("/api/tags", ollama_tags)
    app.router.add_get("/api/version", ollama_version)
    app.router.add_post("/generate", _handler("tgi"))
    app.router.add_post("/generate_stream", _handler("tgi"))
    app.router.add_post("/completion", _handler("llama_cpp"))
    app.router.add_post("/_demo/replies", put_reply)
    app.router.add_get("/_demo/requests", get_requests)
    app.router.add_route("*", "/{path:.*}", not_served)
    return app


async def run(host: str, port: int, key_file: Path | None = None) -> None:
    runner = web.AppRunner(make_app(key_file), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    log.info("ready", extra={"http": f"{bound[0]}:{bound[1]}"})
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
