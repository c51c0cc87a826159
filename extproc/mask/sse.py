"""Server-sent token streams masked on the assembled text, not event by event.

An OpenAI-style chat stream sends the answer a few characters per event (``choices[].delta.content``,
``delta.tool_calls[].function.arguments``). Masking each event alone leaks both halves of a card number
split across two events. Here every text of every choice (and every tool call) feeds a stream masker
of its own; each event goes out carrying only what is safe to release so far (possibly nothing), and
what is held back follows in later events: at the latest in the choice's ``finish_reason`` event, or in
an event added before ``[DONE]``. Every event stays valid JSON and every client still parses it.

Events that are not chat chunks are masked whole, as text. ``logprobs`` repeat the tokens verbatim and
cannot be masked in step with the text: they are replaced by ``null``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from extproc.errors import ExtProcError
from extproc.mask import Inspector, StreamMasker
from extproc.mask.bodies import ENCODING, ERRORS, SseEvents
from extproc.model import Finding

_SEPARATOR = re.compile(r"(\r\n\r\n|\n\n|\r\r)")
_TEXT_KEYS = ("content", "reasoning_content", "refusal")
# (choice index, "text", key) or (choice index, "tool", tool call index)
StreamKey = tuple[int, str, str | int]


class ChatEventStream(SseEvents):
    def __init__(self, inspector: Inspector, max_event_bytes: int, too_large: ExtProcError) -> None:
        super().__init__(inspector, max_event_bytes, too_large)
        self._streams: dict[StreamKey, StreamMasker] = {}
        self._template: dict[str, Any] = {}

    @property
    def findings(self) -> list[Finding]:
        return self._found + [f for s in self._streams.values() for f in s.findings]

    def finish(self) -> bytes:
        out = super().finish()
        flushed = self._flush_event()
        return out + flushed

    def _mask(self, data: bytes) -> bytes:
        if not data:
            return data
        parts = _SEPARATOR.split(data.decode(ENCODING, ERRORS))
        out: list[str] = []
        for index in range(0, len(parts), 2):
            event = parts[index]
            separator = parts[index + 1] if index + 1 < len(parts) else ""
            if not event and not separator:
                continue
            out.append(self._event(event, separator))
        return "".join(out).encode(ENCODING, ERRORS)

    def _event(self, event: str, separator: str) -> str:
        lines = event.splitlines()
        data_lines = [line for line in lines if line.startswith("data:")]
        other = [line for line in lines if not line.startswith("data:")]
        payload = "\n".join(line[5:].removeprefix(" ") for line in data_lines)
        if payload.strip() == "[DONE]":
            return self._flush_event().decode(ENCODING, ERRORS) + event + separator
        try:
            chunk = json.loads(payload) if data_lines else None
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
            masked, found = self._inspector.mask_text(event + separator)
            self._found.extend(found)
            return masked
        self._template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        if self._chunk(chunk):
            return "\n".join(
                [*other, "data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))]
            ) + (separator)
        return event + separator

    def _chunk(self, chunk: dict[str, Any]) -> bool:
        changed = False
        for choice in chunk["choices"]:
            if not isinstance(choice, dict):
                continue
            number = choice.get("index", 0)
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
                changed = True
            delta = choice.get("delta")
            if isinstance(delta, dict):
                changed |= self._delta(number, delta)
            if choice.get("finish_reason") is not None:
                if not isinstance(delta, dict):
                    delta = choice["delta"] = {}
                changed |= self._close_choice(number, delta)
        return changed

    def _delta(self, number: int, delta: dict[str, Any]) -> bool:
        changed = False
        for key in _TEXT_KEYS:
            value = delta.get(key)
            if isinstance(value, str):
                released = self._stream((number, "text", key)).feed(value)
                if released != value:
                    delta[key] = released
                    changed = True
        for call in delta.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                value = function["arguments"]
                released = self._stream((number, "tool", int(call.get("index", 0)))).feed(value)
                if released != value:
                    function["arguments"] = released
                    changed = True
        return changed

    def _stream(self, key: StreamKey) -> StreamMasker:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = self._inspector.stream()
        return stream

    def _close_choice(self, number: int, delta: dict[str, Any]) -> bool:
        """The choice is finished: everything it still holds goes out in this event."""
        changed = False
        for key in [k for k in self._streams if k[0] == number]:
            stream = self._streams.pop(key)
            rest = stream.finish()
            self._found.extend(stream.findings)
            if not rest:
                continue
            changed = True
            if key[1] == "text":
                delta[str(key[2])] = (delta.get(str(key[2])) or "") + rest
            else:
                calls = delta.setdefault("tool_calls", [])
                call = next((c for c in calls if c.get("index", 0) == key[2]), None)
                if call is None:
                    calls.append({"index": key[2], "function": {"arguments": rest}})
                else:
                    function = call.setdefault("function", {})
                    function["arguments"] = (function.get("arguments") or "") + rest
        return changed

    def _flush_event(self) -> bytes:
        """An event carrying what every open stream still holds (the upstream ended without closing its
        choices); empty when nothing is held."""
        choices: dict[int, dict[str, Any]] = {}
        for number in sorted({k[0] for k in self._streams}):
            delta: dict[str, Any] = {}
            if self._close_choice(number, delta):
                choices[number] = {"index": number, "delta": delta, "finish_reason": None}
        if not choices:
            return b""
        event = {**self._template, "choices": list(choices.values())}
        return ("data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n\n").encode(
            ENCODING
        )
