"""An OpenAI-compatible demo model server (JSON and server-sent events).

Besides ``POST /v1/chat/completions`` and ``GET /v1/models`` it has a control surface for tests, reached
directly rather than through Envoy:

- ``POST /_demo/replies`` stores a scripted reply under an id; a request carrying ``x-demo-reply: <id>``
  gets it. The reply text therefore never passes through the prompt, so response masking is tested on
  its own. A script may set ``chunk_chars`` (characters per token event), ``delay_ms`` (pause between
  events), or replace the whole answer with ``raw`` bytes and a ``content_type``.
- ``GET /_demo/requests?tag=<x-test-tag>`` returns the requests received (headers and body), so a test
  can prove what reached the model.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

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
        headers=tuple((str(k), str(v)) for k, v in dict(payload.get("headers", {})).items()),
    )


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


async def chat_completions(request: web.Request) -> web.StreamResponse:
    raw_body = await request.read()
    request.app[_RECORDED].append(
        {
            "tag": request.headers.get("x-test-tag", ""),
            "path": request.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": raw_body.decode("utf-8", "replace"),
        }
    )
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
        return web.Response(
            body=script.raw, headers={"content-type": script.content_type, **dict(script.headers)}
        )
    model = str(body.get("model") or MODELS[0])
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.get("stream"):
        return await _stream(request, script, completion_id, created, model)
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": script.content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
        headers=dict(script.headers),
    )


async def _stream(
    request: web.Request, script: Script, completion_id: str, created: int, model: str
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache", **dict(script.headers)}
    )
    await response.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        event = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    await response.write(chunk({"role": "assistant", "content": ""}))
    text = script.content
    for start in range(0, len(text), script.chunk_chars):
        if script.delay_ms:
            await asyncio.sleep(script.delay_ms / 1000)
        await response.write(chunk({"content": text[start : start + script.chunk_chars]}))
    await response.write(chunk({}, "stop"))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(_request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": 0, "owned_by": "demo"} for m in MODELS],
        }
    )


async def put_reply(request: web.Request) -> web.Response:
    payload = await request.json()
    reply_id = str(payload["id"])
    request.app[_REPLIES][reply_id] = _script_from(payload)
    return web.json_response({"id": reply_id})


async def get_requests(request: web.Request) -> web.Response:
    tag = request.query.get("tag")
    found = [r for r in request.app[_RECORDED] if tag is None or r["tag"] == tag]
    return web.json_response(found)


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_RECORDED] = collections.deque(maxlen=2000)
    app[_REPLIES] = {}
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/_demo/replies", put_reply)
    app.router.add_get("/_demo/requests", get_requests)
    return app


async def run(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    log.info("ready", extra={"http": f"{bound[0]}:{bound[1]}"})
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
