"""Token streams masked on the assembled text, not event by event.

A model streams its answer a few characters per event. Masking each event alone leaks both halves of a card
number split across two events. Here each text a stream builds up (a chat choice's content, a tool call's
arguments, a Responses-API output part, an Anthropic content block) feeds a stream masker of its own. Each
event goes out carrying only what is safe to release so far (possibly an empty string); what is held back
follows later: in the event that ends that text, or in an event added just before it, or at the end of the
stream. Every event stays valid JSON of its kind and every client still parses it.

Dialects are recognised per event, not per route, so a proxy that rewrites paths changes nothing:

- OpenAI chat completions and completions: ``choices[].delta.{content,reasoning_content,refusal}``,
  ``choices[].delta.tool_calls[].function.arguments``, ``choices[].text``; held text goes out in the
  choice's ``finish_reason`` event, or in an event added before ``[DONE]``. ``logprobs`` repeat the tokens
  verbatim and cannot be masked in step with the text: they become ``null``.
- OpenAI Responses API: every ``response.*.delta`` event with a string ``delta``, closed by the matching
  ``response.*.done`` event; held text goes out in a delta event added just before the ``.done`` one, and
  ``sequence_number`` is renumbered so it stays strictly increasing. ``.done`` events and whole-response
  events (``response.completed``) are masked as a whole; block and stream masking find the same values,
  so they agree with the deltas.
- Anthropic messages: ``content_block_delta`` text, ``partial_json`` (tool input) and thinking, closed by
  ``content_block_stop``, before which an added delta event carries what was held. ``signature_delta`` is
  an opaque signature of the thinking text, not text: it passes unchanged.

Everything else in an event (ids, names, usage, whole messages, unknown fields) is masked as a whole, and
events of no known dialect are masked as JSON (every string value) or, when they are not JSON, as text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from extproc.errors import ExtProcError
from extproc.mask import Inspector, StreamMasker
from extproc.mask.bodies import ENCODING, ERRORS, JsonMasker, SseEvents, dump_json, loads_strict
from extproc.model import Finding

_SEPARATOR = re.compile(r"(\r\n\r\n|\n\n|\r\r)")
_CHAT_TEXT = ("content", "reasoning_content", "refusal")
_CHAT_CHOICE_SKIP = frozenset({"index", "delta", "text", "logprobs", "finish_reason"})
_CHAT_DELTA_SKIP = frozenset({*_CHAT_TEXT, "tool_calls"})
_CHAT_TOP_SKIP = frozenset({"choices"})
# Responses-API deltas that carry no text (base64 audio): masked as a whole, never assembled.
_RESPONSES_BINARY = frozenset({"response.audio.delta"})
# Responses-API fields that are not model text: the event type, and random padding against length
# side channels.
_RESPONSES_SKIP = frozenset({"type", "delta", "logprobs", "obfuscation", "sequence_number"})
_POSITION = ("item_id", "output_index", "content_index", "summary_index")
_ANTHROPIC_TYPES = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
        "error",
    }
)
_ANTHROPIC_TEXT = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}

# Keys of the open texts. ("chat", choice, "delta", field) | ("chat", choice, "tool", call index) |
# ("chat", choice, "text", "text") | ("responses", kind, *position) | ("anthropic", block, delta type)
StreamKey = tuple[Any, ...]


class TokenStreams:
    """One stream masker per open text, created on first use; their findings outlive them."""

    def __init__(self, inspector: Inspector) -> None:
        self._inspector = inspector
        self._open: dict[StreamKey, StreamMasker] = {}
        self._closed: list[Finding] = []

    @property
    def findings(self) -> list[Finding]:
        return self._closed + [f for s in self._open.values() for f in s.findings]

    @property
    def held(self) -> int:
        return sum(stream.held for stream in self._open.values())

    def feed(self, key: StreamKey, text: str) -> str:
        stream = self._open.get(key)
        if stream is None:
            stream = self._open[key] = self._inspector.stream()
        return stream.feed(text)

    def close(self, key: StreamKey) -> str:
        """Everything ``key`` still holds, masked; the text is finished."""
        stream = self._open.pop(key, None)
        if stream is None:
            return ""
        rest = stream.finish()
        self._closed.extend(stream.findings)
        return rest

    def open(self, *prefix: Any) -> list[StreamKey]:
        """The open keys that start with ``prefix``, in the order they were opened."""
        return [key for key in self._open if key[: len(prefix)] == prefix]


class EventStream(SseEvents):
    def __init__(self, inspector: Inspector, max_event_bytes: int, too_large: ExtProcError) -> None:
        super().__init__(inspector, max_event_bytes, too_large)
        self._texts = TokenStreams(inspector)
        self._json = JsonMasker(inspector, self._found)
        self._chat_template: dict[str, Any] = {}
        self._responses_templates: dict[StreamKey, tuple[str | None, dict[str, Any]]] = {}
        self._sequence_shift = 0  # events added to a Responses-API stream so far
        self._last_sequence = -1

    @property
    def findings(self) -> list[Finding]:
        return self._found + self._texts.findings

    @property
    def held(self) -> int:
        return self._texts.held

    def finish(self) -> bytes:
        out = super().finish()
        return out + "".join(self._flush_all()).encode(ENCODING, ERRORS)

    def cut(self) -> bytes:
        """The stream ends here, early: the incomplete event is dropped; what the texts still hold goes
        out, masked, so the client keeps the whole of what it was shown."""
        super().cut()
        return "".join(self._flush_all()).encode(ENCODING, ERRORS)

    def _mask(self, data: bytes) -> bytes:
        if not data:
            return data
        parts = _SEPARATOR.split(data.decode(ENCODING, ERRORS))
        out: list[str] = []
        for index in range(0, len(parts), 2):
            event = parts[index]
            separator = parts[index + 1] if index + 1 < len(parts) else ""
            if event or separator:
                out.append(self._event(event, separator))
        return "".join(out).encode(ENCODING, ERRORS)

    def _event(self, event: str, separator: str) -> str:
        lines = event.splitlines()
        data_lines = [line for line in lines if line.startswith("data:")]
        other = [line for line in lines if not line.startswith("data:")]
        payload = "\n".join(line[5:].removeprefix(" ") for line in data_lines)
        if payload.strip() == "[DONE]":
            return "".join(self._flush_all()) + event + separator
        try:
            chunk = loads_strict(payload) if data_lines else None
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            masked, found = self._inspector.mask_text(event + separator)
            self._found.extend(found)
            return masked
        name = next((line[6:].strip() for line in other if line.startswith("event:")), None)
        kind = chunk.get("type")
        before: list[str] = []
        if isinstance(chunk.get("choices"), list):
            changed = self._chat(chunk)
        elif isinstance(kind, str) and kind.startswith("response."):
            before, changed = self._responses(chunk, kind, name)
        elif kind in _ANTHROPIC_TYPES:
            before, changed = self._anthropic(chunk, str(kind))
        else:
            before_count = len(self._found)
            chunk = self._json.value(chunk)
            changed = len(self._found) > before_count
        if not changed:
            return "".join(before) + event + separator
        return "".join(before) + "\n".join([*other, "data: " + dump_json(chunk)]) + separator

    def _flush_all(self) -> Iterator[str]:
        """Events carrying what every open text still holds: the upstream ended without closing them."""
        yield from self._chat_flush()
        for key in self._texts.open("responses"):
            yield from self._responses_flush(key, self._last_sequence + 1)
        for key in self._texts.open("anthropic"):
            yield from self._anthropic_flush(key)

    # -- OpenAI chat completions and completions --------------------------------------------------------

    def _chat(self, chunk: dict[str, Any]) -> bool:
        self._chat_template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        changed = self._json.fields(chunk, _CHAT_TOP_SKIP)
        for choice in chunk["choices"]:
            if not isinstance(choice, dict):
                continue
            number = choice.get("index", 0)
            changed |= self._json.fields(choice, _CHAT_CHOICE_SKIP)
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
                changed = True
            delta = choice.get("delta")
            if isinstance(delta, dict):
                changed |= self._chat_delta(number, delta)
            if isinstance(choice.get("text"), str):
                changed |= self._replace(choice, "text", ("chat", number, "text", "text"))
            if choice.get("finish_reason") is not None:
                changed |= self._chat_close(number, choice)
        return changed

    def _replace(self, node: dict[str, Any], field: str, key: StreamKey) -> bool:
        value = node[field]
        released = self._texts.feed(key, value)
        if released == value:
            return False
        node[field] = released
        return True

    def _chat_delta(self, number: int, delta: dict[str, Any]) -> bool:
        changed = self._json.fields(delta, _CHAT_DELTA_SKIP)
        for field in _CHAT_TEXT:
            if isinstance(delta.get(field), str):
                changed |= self._replace(delta, field, ("chat", number, "delta", field))
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            changed |= self._json.fields(call, frozenset({"function", "index"}))
            function = call.get("function")
            if not isinstance(function, dict):
                continue
            changed |= self._json.fields(function, frozenset({"arguments"}))
            if isinstance(function.get("arguments"), str):
                key = ("chat", number, "tool", int(call.get("index", 0)))
                changed |= self._replace(function, "arguments", key)
        return changed

    def _chat_close(self, number: int, choice: dict[str, Any]) -> bool:
        """The choice is finished: everything it still holds goes out in ``choice``."""
        changed = False
        for key in self._texts.open("chat", number):
            rest = self._texts.close(key)
            if not rest:
                continue
            changed = True
            _, _, kind, name = key
            if kind == "text":
                choice["text"] = (choice.get("text") or "") + rest
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            if kind == "delta":
                delta[name] = (delta.get(name) or "") + rest
                continue
            calls = delta.setdefault("tool_calls", [])
            call = next((c for c in calls if c.get("index", 0) == name), None)
            if call is None:
                calls.append({"index": name, "function": {"arguments": rest}})
            else:
                function = call.setdefault("function", {})
                function["arguments"] = (function.get("arguments") or "") + rest
        return changed

    def _chat_flush(self) -> Iterator[str]:
        choices: list[dict[str, Any]] = []
        for number in dict.fromkeys(key[1] for key in self._texts.open("chat")):
            choice: dict[str, Any] = {"index": number, "finish_reason": None}
            if self._chat_close(number, choice):
                choices.append(choice)
        if choices:
            yield "data: " + dump_json({**self._chat_template, "choices": choices}) + "\n\n"

    # -- OpenAI Responses API ----------------------------------------------------------------------------

    def _responses(self, chunk: dict[str, Any], kind: str, name: str | None) -> tuple[list[str], bool]:
        before: list[str] = []
        sequence = chunk.get("sequence_number")
        changed = self._json.fields(chunk, _RESPONSES_SKIP)
        position = tuple(chunk.get(field) for field in _POSITION)
        if kind.endswith(".delta") and isinstance(chunk.get("delta"), str) and kind not in _RESPONSES_BINARY:
            key = ("responses", kind.removesuffix(".delta"), *position)
            template = {k: v for k, v in chunk.items() if k not in ("delta", "logprobs", "obfuscation")}
            self._responses_templates[key] = (name, template)
            changed |= self._replace(chunk, "delta", key)
            if chunk.get("logprobs"):
                chunk["logprobs"] = []
                changed = True
        else:
            if "delta" in chunk:
                changed |= self._json.fields(chunk, frozenset(_RESPONSES_SKIP - {"delta"}))
            if kind.endswith(".done") and isinstance(sequence, int):
                key = ("responses", kind.removesuffix(".done"), *position)
                before = list(self._responses_flush(key, sequence))
        if isinstance(sequence, int):
            self._last_sequence = sequence
            if self._sequence_shift:
                chunk["sequence_number"] = sequence + self._sequence_shift
                changed = True
        return before, changed

    def _responses_flush(self, key: StreamKey, sequence: int) -> Iterator[str]:
        """A delta event carrying what ``key`` still holds, numbered where the event it precedes was."""
        rest = self._texts.close(key)
        name, template = self._responses_templates.pop(key, (None, {}))
        if not rest:
            return
        event = {**template, "delta": rest}
        if "sequence_number" in template:
            event["sequence_number"] = sequence + self._sequence_shift
            self._sequence_shift += 1
        yield (f"event: {name}\n" if name else "") + "data: " + dump_json(event) + "\n\n"

    # -- Anthropic messages ----------------------------------------------------------------------------

    def _anthropic(self, chunk: dict[str, Any], kind: str) -> tuple[list[str], bool]:
        index = chunk.get("index", 0)
        delta = chunk.get("delta")
        if kind == "content_block_delta" and isinstance(delta, dict):
            field = _ANTHROPIC_TEXT.get(str(delta.get("type")))
            if delta.get("type") == "signature_delta":
                return [], False
            if field is not None and isinstance(delta.get(field), str):
                skip = frozenset({"type", field})
                changed = self._json.fields(delta, skip)
                return [], changed | self._replace(delta, field, ("anthropic", index, delta["type"]))
        before: list[str] = []
        if kind == "content_block_stop":
            for key in self._texts.open("anthropic", index):
                before.extend(self._anthropic_flush(key))
        return before, self._json.fields(chunk, frozenset({"type"}))

    def _anthropic_flush(self, key: StreamKey) -> Iterator[str]:
        rest = self._texts.close(key)
        if rest:
            _, index, delta_type = key
            event = {"type": "content_block_delta", "index": index, "delta": {"type": delta_type}}
            event["delta"][_ANTHROPIC_TEXT[delta_type]] = rest
            yield "event: content_block_delta\ndata: " + dump_json(event) + "\n\n"
