"""Token streams masked on the assembled text, not event by event.

A model streams its answer a few characters per event. Masking each event alone leaks both halves of a card
number split across two events. Here every string of every event goes through stream scanners that span
events (``extproc.mask.joined``), and each event is held until the scanners have released all of its text,
then goes out whole, masked. Events are neither added nor removed, so sequence numbers, indexes and the
``finish_reason`` / ``.done`` / ``content_block_stop`` events stay where the upstream put them, and every
event stays valid JSON of its kind.

Dialects are recognised per event, not per route, so a proxy that rewrites paths changes nothing. The
strings of an event are of three kinds:

- **Text deltas**, which a receiver joins into a text: chat ``choices[].delta.{content,reasoning_content,
  reasoning,refusal}``, ``delta.tool_calls[].function.arguments``, ``delta.function_call.arguments``,
  ``delta.audio.transcript``, ``choices[].text`` (completions); the Responses API's ``delta`` of every
  ``response.*.delta`` event; Anthropic ``content_block_delta`` text, ``partial_json``, ``thinking`` (and
  the text a ``content_block_start`` opens with). Each feeds the channel of its text (choice and field,
  tool call, item and part, block) and the stream's one answer channel. A text field of an unexpected
  shape (``content`` as a list of parts, ``delta`` as a string, ``arguments`` as an object) still feeds
  them: every string in it but its ``type``, ``id``, ``index`` and ``name``. Tool-call arguments
  (chat ``arguments``, Responses ``*_arguments.delta``, ``partial_json``) are the text of a JSON
  document that the client and the tool parse: they also feed a channel that reads them decoded
  (``\\u0040`` as ``@``, ``extproc.mask.escapes``), masked on the raw text, on whole escapes.
- **Whole values**, known fields no receiver joins across events (ids, model, role, ``finish_reason``,
  ``obfuscation``, usage, signatures, ``message_start``'s message): each string masked whole, as in a
  JSON body. A string of a Responses event that repeats, character for character, a text its deltas
  streamed (``.done`` events, parts, items, ``response.completed``) goes out as the deltas were
  released (``EventStream._repeats``); one that differs is masked whole.
- **TGI's native stream** (``/generate_stream``): ``token.text`` is the text's delta (a special token's,
  such as the end of sequence, is scanned but is no part of it), and the last event repeats the text in
  ``generated_text``, which goes out as the deltas were released, as a Responses final text does.
- **Everything else**: fields the dialect does not know, and every string of an event of no known dialect
  (llama.cpp's ``content``, a plain-text ``data:``). They feed a channel per field path (list positions
  left out), across events, and one channel joining them all in arrival order, so a value split across
  events of an unknown shape is found too. Such an event may be held until a later event, or the end of
  the stream, settles the scanner: an unknown field is never a way around it.

Per-token copies of the text (``logprobs``, TGI's ``top_tokens``) and token ids (TGI's ``token.id``,
vLLM's ``token_ids``, llama.cpp's ``tokens``) cannot be masked in step with the text: they are emptied
in every event (``extproc.mask.tokens``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.errors import ExtProcError, UpstreamError
from extproc.mask import Inspector
from extproc.mask.bodies import (
    ENCODING,
    ERRORS,
    BodyProcessor,
    DuplicateKey,
    JsonMasker,
    JsonRejected,
    SseEvent,
    SseEvents,
    StreamingText,
    dump_json,
    loads_strict,
)
from extproc.mask.joined import ANSWER, MAX_CHANNELS, EventFields, HeldEvent, JsonText, Router
from extproc.mask.tokens import strip_token_detail
from extproc.model import Finding

_CHAT_META = frozenset(
    {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
        "obfuscation",
        "usage",
        "provider",
        "citations",
    }
)
_CHAT_CHOICE_META = frozenset({"finish_reason", "stop_reason", "native_finish_reason", "matched_stop"})
_CHAT_TEXT = frozenset({"content", "reasoning_content", "reasoning", "refusal"})
_PART_META = frozenset({"type", "id", "index", "name"})
# Responses-API deltas that carry no text (base64 audio): masked as a whole, never assembled.
_RESPONSES_BINARY = frozenset({"response.audio.delta"})
_RESPONSES_DELTA_META = frozenset(
    {"type", "item_id", "sequence_number", "obfuscation", *("output_index", "content_index", "summary_index")}
)
_ARGUMENTS_DELTA = "_arguments.delta"  # function_call_arguments, mcp_call_arguments: JSON text
_POSITION = ("item_id", "output_index", "content_index", "summary_index")
# The parts and items of the Responses API that repeat a streamed text whole, and the delta kind that
# streamed it: a part by its ``type`` (and ``content_index`` or ``summary_index``), an item by its ``type``
# (its ``id`` is the deltas' ``item_id``; its place in ``output`` their ``output_index``).
_PART_TEXT = {
    "output_text": ("response.output_text", "text"),
    "refusal": ("response.refusal", "refusal"),
    "reasoning_text": ("response.reasoning_text", "text"),
    "summary_text": ("response.reasoning_summary_text", "text"),
}
_ITEM_TEXT = {
    "function_call": ("response.function_call_arguments", "arguments"),
    "mcp_call": ("response.mcp_call_arguments", "arguments"),
    "custom_tool_call": ("response.custom_tool_call_input", "input"),
    "code_interpreter_call": ("response.code_interpreter_call_code", "code"),
}
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
_ANTHROPIC_BLOCK_TEXT = {"text": ("text", "text_delta"), "thinking": ("thinking", "thinking_delta")}
_ANTHROPIC_META = frozenset({"type", "index", "message", "usage", "error", "content_block", "delta"})
_TGI_TEXT = ("tgi", "text")
_TGI_META = frozenset({"index", "details", "top_tokens"})


def load_json(text: str) -> Any:
    """One event's JSON, through the strict loader every body uses (``loads_strict``). The one place events
    are parsed. Data that is not JSON at all is read as text; data that starts as JSON but cannot be read
    one way only (a repeated key, nesting past the limit, ``NaN``, a broken document a lenient client may
    still read) ends the stream: receivers differ on what they make of it, and the bytes that go out must
    be the bytes that were scanned."""
    try:
        return loads_strict(text)
    except JsonRejected as exc:
        # Never the key itself: it is the sender's text, unscanned, and the message reaches the client.
        reason = "a key repeated in one object" if isinstance(exc, DuplicateKey) else str(exc)
        raise UpstreamError(f"an event of the answer is JSON that cannot be scanned: {reason}") from exc
    except ValueError as exc:
        if text.lstrip().startswith(("{", "[")):
            raise UpstreamError("an event of the answer is JSON that cannot be read one way only") from exc
        raise


def _key(value: Any) -> Hashable:
    """A hashable stand-in for an index or position the sender chose (any JSON value)."""
    if isinstance(value, str | int | float | None):
        return value
    return dump_json(value)


@dataclass(eq=False)
class _Streamed:
    """A text the deltas carried, piece by piece: as the pieces came, and as each was released (None
    until it is)."""

    raw: list[str] = field(default_factory=list)
    masked: list[str | None] = field(default_factory=list)


class EventStream(SseEvents, EventFields):
    _json: JsonMasker

    def __init__(self, inspector: Inspector, max_event_bytes: int, too_large: ExtProcError) -> None:
        super().__init__(inspector, max_event_bytes, too_large)
        too_many = UpstreamError(f"the answer opens more than {MAX_CHANNELS} texts")
        self._router = Router(inspector, too_many)
        self._json = JsonMasker(inspector, self._found)
        self._streamed: dict[Hashable, _Streamed] = {}  # the texts a later event may repeat, by text

    @property
    def findings(self) -> list[Finding]:
        return self._found + self._router.findings

    @property
    def held(self) -> int:
        return self._router.held

    def cut(self) -> bytes:
        """The stream ends here, early: the incomplete event is dropped; the events held so far go out,
        masked, so the client keeps the whole of what it was shown."""
        super().cut()
        return self._end()

    def _end(self) -> bytes:
        return "".join(held.render(held) for held in self._router.finish()).encode(ENCODING, ERRORS)

    def _write(self, events: list[SseEvent]) -> bytes:
        for event in events:
            self._take(event)
        return "".join(held.render(held) for held in self._router.flush()).encode(ENCODING, ERRORS)

    def _take(self, event: SseEvent) -> None:
        data = event.data
        if data is None or data.strip() == "[DONE]":
            self._router.seal(self._router.event(lambda _: self.render(event)))
            return
        try:
            document = load_json(data)
        except ValueError:
            document = None
        if isinstance(document, str):  # a JSON string: read as its receiver decodes it (escapes undone)
            string = [document]
            held = self._router.event(
                lambda h: self.render(event, dump_json(string[0]) if h.changed else None)
            )
            self._residual(held, string, 0, ("<data>",))
            self._router.seal(held)
            return
        if not isinstance(document, dict | list):  # text, or a bare JSON number: read as the text it is
            box = {"data": data}
            held = self._router.event(lambda h: self.render(event, box["data"] if h.changed else None))
            self._residual(held, box, "data", ("<data>",))
            self._router.seal(held)
            return
        stripped = strip_token_detail(document)
        document, masked = self._json.keys_and_numbers(document)  # no scanner reads keys and numbers
        root = [document]
        held = self._router.event(lambda h: self.render(event, dump_json(root[0]) if _filled(h) else None))
        held.changed = masked or stripped
        kind = document.get("type") if isinstance(document, dict) else None
        if isinstance(document, list):
            self._residual(held, root, 0, ())
        elif isinstance(document.get("choices"), list):
            self._chat(held, document)
        elif isinstance(kind, str) and kind.startswith("response."):
            self._responses(held, document, kind)
        elif kind in _ANTHROPIC_TYPES:
            self._anthropic(held, document, str(kind))
        elif isinstance(document.get("token"), dict) and isinstance(document["token"].get("text"), str):
            self._tgi(held, document)
        else:
            self._residual(held, root, 0, ())
        self._router.seal(held)

    # -- the three kinds of strings --------------------------------------------------------------------

    def _text(
        self,
        held: HeldEvent,
        node: Any,
        key: Any,
        text: tuple[Any, ...],
        json_text: bool = False,
        repeated: bool = False,
    ) -> None:
        """A text delta (or a text field of an unexpected shape) of the text ``text``. ``json_text``: the
        text is a JSON document (tool-call arguments), also read decoded, as its receiver parses it.
        ``repeated``: the dialect repeats the whole text in a later event (``_repeats``), so the pieces
        are remembered as they came and as they are released."""
        value = node[key]
        if isinstance(value, str):
            channel = ("text", *text)
            channels = (channel, JsonText(channel), ANSWER) if json_text else (channel, ANSWER)
            if not (repeated and value):
                self._router.piece(held, value, lambda final: node.__setitem__(key, final), channels)
                return
            streamed = self._streamed.get(text)
            if streamed is None:
                streamed = self._streamed[text] = _Streamed()
            number = len(streamed.raw)
            streamed.raw.append(value)
            streamed.masked.append(None)

            def write(final: str) -> None:
                node[key] = final
                streamed.masked[number] = final

            self._router.piece(held, value, write, channels)
        elif isinstance(value, dict):
            for inner in list(value):
                if inner in _PART_META:
                    self._whole(held, value, inner)
                else:
                    self._text(held, value, inner, text, repeated=repeated)
        elif isinstance(value, list):
            for position in range(len(value)):
                self._text(held, value, position, text, repeated=repeated)

    # -- OpenAI chat completions and completions --------------------------------------------------------

    def _chat(self, held: HeldEvent, chunk: dict[str, Any]) -> None:
        for key in list(chunk):
            if key in _CHAT_META:
                self._whole(held, chunk, key)
            elif key != "choices":
                self._residual(held, chunk, key, (key,))
        choices = chunk["choices"]
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                self._residual(held, choices, position, ("choices",))
                continue
            number = _key(choice.get("index", 0))
            for key in list(choice):
                value = choice[key]
                if key == "logprobs":  # emptied already (strip_token_detail)
                    self._whole(held, choice, key)
                elif key == "delta" and isinstance(value, dict):
                    self._chat_delta(held, number, value)
                elif key == "delta":
                    self._text(held, choice, key, ("chat", number, "content"))
                elif key == "text":
                    self._text(held, choice, key, ("chat", number, "text"))
                elif key == "index" or key in _CHAT_CHOICE_META:
                    self._whole(held, choice, key)
                else:
                    self._residual(held, choice, key, ("choices", key))

    def _chat_delta(self, held: HeldEvent, number: Hashable, delta: dict[str, Any]) -> None:
        for key in list(delta):
            value = delta[key]
            if key in _CHAT_TEXT:
                self._text(held, delta, key, ("chat", number, key))
            elif key == "role":
                self._whole(held, delta, key)
            elif key == "tool_calls" and isinstance(value, list):
                for position, call in enumerate(value):
                    if isinstance(call, dict):
                        self._tool_call(held, number, call)
                    else:
                        self._text(held, value, position, ("chat", number, "tool", None))
            elif key == "function_call" and isinstance(value, dict):
                self._function(held, value, ("chat", number, "function"))
            elif key == "audio" and isinstance(value, dict):
                for inner in list(value):
                    if inner == "transcript":
                        self._text(held, value, inner, ("chat", number, "audio"))
                    else:
                        self._whole(held, value, inner)
            else:
                self._residual(held, delta, key, ("choices", "delta", key))

    def _tool_call(self, held: HeldEvent, number: Hashable, call: dict[str, Any]) -> None:
        text = ("chat", number, "tool", _key(call.get("index", 0)))
        for key in list(call):
            if key == "function" and isinstance(call[key], dict):
                self._function(held, call[key], text)
            elif key in ("index", "id", "type"):
                self._whole(held, call, key)
            else:
                self._residual(held, call, key, ("choices", "delta", "tool_calls", key))

    def _function(self, held: HeldEvent, function: dict[str, Any], text: tuple[Any, ...]) -> None:
        for key in list(function):
            if key == "arguments":
                self._text(held, function, key, text, json_text=True)
            elif key == "name":
                self._whole(held, function, key)
            else:
                self._residual(held, function, key, ("function", key))

    # -- OpenAI Responses API ----------------------------------------------------------------------------

    def _responses(self, held: HeldEvent, chunk: dict[str, Any], kind: str) -> None:
        if not kind.endswith(".delta") or kind in _RESPONSES_BINARY:
            self._repeats(held, chunk, kind)
            for key in list(chunk):  # whole values: full texts, items, the response
                self._whole(held, chunk, key)
            return
        text = ("responses", kind.removesuffix(".delta"), *(_key(chunk.get(f)) for f in _POSITION))
        for key in list(chunk):
            if key == "delta":
                json_text = kind.endswith(_ARGUMENTS_DELTA)
                self._text(held, chunk, key, text, json_text=json_text, repeated=True)
            elif key in _RESPONSES_DELTA_META or key == "logprobs":
                self._whole(held, chunk, key)
            else:
                self._residual(held, chunk, key, (kind, key))

    def _repeats(self, held: HeldEvent, chunk: dict[str, Any], kind: str) -> None:
        """The strings of ``chunk`` that repeat, whole and as they came, a text its deltas streamed (a
        ``.done`` event's text, a part, an item, ``response.completed``'s output) go out as the deltas
        were released, so a client never reads two versions of one text. Such a string holds nothing
        the deltas did not, all of which was scanned on the stream; it is left out of the whole-value
        masking (emptied), and written in as the event goes out, once every piece is final. A string
        that differs from what the deltas carried, even by one character, is masked whole as any other
        value: an upstream cannot use a final text to say something its deltas did not."""
        for path, text in _final_texts(chunk, kind):
            self._repeat(held, chunk, path, text)

    def _repeat(self, held: HeldEvent, chunk: dict[str, Any], path: tuple[Any, ...], text: Hashable) -> bool:
        """When the string at ``path`` repeats ``text`` whole and as its deltas came, empties it and
        writes it in as they were released once the event goes out (``_repeats``); returns whether it
        does. A string that differs is left for the caller to mask whole."""
        streamed = self._streamed.get(text)
        if streamed is None:
            return False
        value = _at(chunk, path)
        if not isinstance(value, str) or value != "".join(streamed.raw):
            return False
        _at(chunk, path[:-1])[path[-1]] = ""
        held.fills.append(_fill(chunk, path, streamed, len(streamed.raw), value))
        return True

    # -- Anthropic messages ----------------------------------------------------------------------------

    def _anthropic(self, held: HeldEvent, chunk: dict[str, Any], kind: str) -> None:
        index = _key(chunk.get("index", 0))
        delta = chunk.get("delta")
        block = chunk.get("content_block")
        for key in list(chunk):
            if key == "delta" and kind == "content_block_delta":
                if isinstance(delta, dict):
                    self._anthropic_delta(held, index, delta)
                else:
                    self._text(held, chunk, key, ("anthropic", index, "text_delta"))
            elif key == "content_block" and kind == "content_block_start" and isinstance(block, dict):
                opens = _ANTHROPIC_BLOCK_TEXT.get(str(block.get("type")))
                for inner in list(block):
                    if opens is not None and inner == opens[0]:
                        self._text(held, block, inner, ("anthropic", index, opens[1]))
                    else:
                        self._whole(held, block, inner)
            elif key in _ANTHROPIC_META:
                self._whole(held, chunk, key)
            else:
                self._residual(held, chunk, key, (kind, key))

    def _anthropic_delta(self, held: HeldEvent, index: Hashable, delta: dict[str, Any]) -> None:
        kind = delta.get("type")
        field = _ANTHROPIC_TEXT.get(str(kind))
        known = field is not None or kind in ("signature_delta", "citations_delta")
        for key in list(delta):
            if key == field:
                json_text = field == "partial_json"
                self._text(held, delta, key, ("anthropic", index, kind), json_text=json_text)
            elif (
                key == "type"
                or (kind == "signature_delta" and key == "signature")
                or (kind == "citations_delta" and key == "citation")
            ):
                self._whole(held, delta, key)
            elif not known:  # a delta type of its own: its strings are the block's text
                self._text(held, delta, key, ("anthropic", index, _key(kind)))
            else:
                self._residual(held, delta, key, ("content_block_delta", key))

    # -- TGI's native stream -----------------------------------------------------------------------------

    def _tgi(self, held: HeldEvent, chunk: dict[str, Any]) -> None:
        """One event of TGI's ``/generate_stream``: ``token.text`` is a delta of the one text, and the last
        event repeats the text whole in ``generated_text`` (without the special tokens' text, such as the
        end of sequence, which its clients leave out too)."""
        token = chunk["token"]
        special = token.get("special") is True
        for inner in list(token):
            if inner == "text":
                self._text(held, token, inner, _TGI_TEXT, repeated=not special)
            else:
                self._whole(held, token, inner)
        for key in list(chunk):
            if key == "token":
                continue
            if key == "generated_text":
                if not self._repeat(held, chunk, (key,), _TGI_TEXT):
                    self._whole(held, chunk, key)
            elif key in _TGI_META:
                self._whole(held, chunk, key)
            else:
                self._residual(held, chunk, key, (key,))


def _filled(held: HeldEvent) -> bool:
    """Writes in what ``held`` waited for (``HeldEvent.fills``); whether the event changed."""
    for fill in held.fills:
        held.changed |= fill()
    held.fills.clear()
    return held.changed


def _fill(
    chunk: dict[str, Any], path: tuple[Any, ...], streamed: _Streamed, count: int, value: str
) -> Callable[[], bool]:
    """Writes at ``path`` the first ``count`` pieces of ``streamed`` as they were released."""

    def fill() -> bool:
        pieces = streamed.masked[:count]
        if any(piece is None for piece in pieces):  # cannot be: the deltas' events went out first
            raise UpstreamError("a final text of the answer is ready before the deltas it repeats")
        final = "".join(piece for piece in pieces if piece is not None)
        _at(chunk, path[:-1])[path[-1]] = final
        return final != value

    return fill


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path`` (keys and list positions) under ``node``."""
    for step in path:
        node = node[step]
    return node


def _final_texts(chunk: dict[str, Any], kind: str) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """Where a Responses-API event that is not a delta may repeat a streamed text whole: the path of each
    string, and the text (as ``EventStream._responses`` names the deltas' text) it would repeat."""
    found: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
    if kind.endswith(".done"):  # response.output_text.done's text, *_arguments.done's arguments, ...
        text = ("responses", kind.removesuffix(".done"), *(_key(chunk.get(f)) for f in _POSITION))
        found += [
            ((key,), text)
            for key, value in chunk.items()
            if isinstance(value, str) and key not in _RESPONSES_DELTA_META
        ]
    part = chunk.get("part")
    if isinstance(part, dict):
        position = tuple(chunk.get(f) for f in _POSITION)
        found += _part_text(part, ("part",), *position)
    item = chunk.get("item")
    if isinstance(item, dict):
        found += _item_texts(item, ("item",), chunk.get("output_index"))
    response = chunk.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    if isinstance(output, list):
        for number, entry in enumerate(output):
            if isinstance(entry, dict):
                found += _item_texts(entry, ("response", "output", number), number)
    return found


def _part_text(
    part: dict[str, Any], path: tuple[Any, ...], item: Any, output: Any, content: Any, summary: Any
) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    kind = part.get("type")
    spec = _PART_TEXT.get(kind) if isinstance(kind, str) else None
    if spec is None:
        return []
    delta, key = spec
    return [((*path, key), ("responses", delta, *(_key(v) for v in (item, output, content, summary))))]


def _item_texts(
    item: dict[str, Any], path: tuple[Any, ...], output: Any
) -> list[tuple[tuple[Any, ...], tuple[Any, ...]]]:
    found: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
    kind = item.get("type")
    spec = _ITEM_TEXT.get(kind) if isinstance(kind, str) else None
    if spec is not None:
        delta, key = spec
        found.append(((*path, key), ("responses", delta, _key(item.get("id")), _key(output), None, None)))
    for key, summary in (("content", False), ("summary", True)):
        parts = item.get(key)
        if isinstance(parts, list):
            for number, part in enumerate(parts):
                if isinstance(part, dict):
                    index = (None, number) if summary else (number, None)
                    found += _part_text(part, (*path, key, number), item.get("id"), output, *index)
    return found


_BOM = b"\xef\xbb\xbf"
_SSE_FIRST_LINE = (b"data:", b"event:", b"id:", b"retry:", b":")
_DATA_LINE = re.compile(rb"[\r\n]data:")
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff")  # UTF-16 (and UTF-32) byte order marks
_JSON_SPACE = b" \t\r\n"


class SniffedStream:
    """A streamed answer served as text or with no content type, read the way its client would read it.
    A client asking for a stream parses server-sent events whatever the content type says, so masking
    such a body as plain text would let the JSON of each event split a value in two; and the ``openai``
    client parses a text answer to a request that is not streamed as JSON, decoding its escapes.

    The first bytes decide. After an optional byte order mark and whitespace, a body that starts with
    ``{`` or ``[``, or one in UTF-16 or UTF-32 (a NUL in its first two bytes, or their byte order mark:
    only JSON readers decode those), is held whole and read as JSON (``json``, a ``SniffedJson``: one
    document, lines of JSON objects, or text). Otherwise, after the byte order mark and blank lines, a
    first line that starts with ``data:``, ``event:``, ``id:``, ``retry:`` or ``:`` (a comment) makes the
    body an event stream (``EventStream``); anything else is streamed text (``StreamingText``). A text
    body in which a line later starts with ``data:`` ends with ``unscannable``: a client could read
    events out of what was masked as text. Nothing is released before the choice is made (at most the
    first line), and ``streaming`` says, once it is, whether the body is released as it is masked."""

    def __init__(
        self,
        events: Callable[[], EventStream],
        text: Callable[[], StreamingText],
        json: Callable[[], BodyProcessor],
        max_head: int,
        too_large: ExtProcError,
        unscannable: ExtProcError,
    ) -> None:
        self._events = events
        self._text = text
        self._json = json
        self._max_head = max_head
        self._too_large = too_large
        self._unscannable = unscannable
        self.chosen: EventStream | StreamingText | BodyProcessor | None = None
        self._head = b""
        self._tail = b"\n"  # the last bytes of a text body; the stream starts at the start of a line

    @property
    def findings(self) -> list[Finding]:
        return self.chosen.findings if self.chosen is not None else []

    @property
    def held(self) -> int:
        return self.chosen.held if self.chosen is not None else len(self._head)

    def feed(self, data: bytes) -> bytes:
        if self.chosen is None:
            self._head += data
            if not self._choose(final=False):
                if len(self._head) > self._max_head:
                    raise self._too_large
                return b""
            data, self._head = self._head, b""
        return self._feed(data)

    def finish(self) -> bytes:
        out = b""
        if self.chosen is None:
            self._choose(final=True)
            out, self._head = self._feed(self._head), b""
        assert self.chosen is not None
        return out + self.chosen.finish()

    @property
    def streaming(self) -> bool | None:
        """Whether the chosen body is released as it is masked; None before the choice."""
        return self.chosen.streaming if self.chosen is not None else None

    def cut(self) -> bytes:
        if self.chosen is None:
            self._head = b""
            return b""
        return self.chosen.cut()

    def terminal(self, error: Mapping[str, str]) -> bytes | None:
        return self.chosen.terminal(error) if self.chosen is not None else None

    def _choose(self, final: bool) -> bool:
        head = self._head
        if not final and (len(head) < 2 or (len(head) < len(_BOM) and _BOM.startswith(head))):
            return False
        if b"\x00" in head[:2] or head.startswith(_WIDE_BOMS):
            self.chosen = self._json()
            return True
        body = head.removeprefix(_BOM)
        start = body.lstrip(_JSON_SPACE)
        if not start and not final:
            return False
        if start.startswith((b"{", b"[")):
            self.chosen = self._json()
            return True
        first = body.lstrip(b"\r\n")
        longest = max(len(start) for start in _SSE_FIRST_LINE)
        if not final and len(first) < longest and b"\r" not in first and b"\n" not in first:
            return False
        framed = first.startswith(_SSE_FIRST_LINE)
        self.chosen = self._events() if framed else self._text()
        return True

    def _feed(self, data: bytes) -> bytes:
        assert self.chosen is not None
        if isinstance(self.chosen, StreamingText):
            window = self._tail + data
            if _DATA_LINE.search(window):
                raise self._unscannable
            self._tail = window[-5:]
        return self.chosen.feed(data)
