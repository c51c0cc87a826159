"""Newline-delimited JSON streams (``application/x-ndjson``): one JSON document per line.

Ollama streams its answers this way: ``/api/chat`` lines carry ``message.content`` (and
``message.thinking``), ``/api/generate`` lines carry ``response`` (and ``thinking``), and the last line
has ``"done": true``. Those texts are scanned across lines like server-sent token events
(``extproc.mask.sse``): each feeds the channel of its text and the stream's answer channel
(``extproc.mask.joined``), and a line is held until its text is released, then goes out whole. Known
fields (model, timestamps, the done reason, tool calls sent whole) are masked whole; ``context`` (the
token ids of the conversation) and other per-token fields of an answer are emptied, and a request line
carrying token ids is refused (``extproc.mask.tokens``); every other string, and every string of a line
of no known shape, feeds a channel per field path and one joining them all, across lines; a line that
is not JSON is such a string. A line longer than ``max_line_bytes``, complete or not, ends the stream
with ``too_large``; a line that is JSON only to a lenient reader (a repeated key, nesting past the
limit, a broken document that starts like one), or more texts than a stream may open, with ``invalid``
(an answer's ``upstream_unscannable`` by default; a request's ``invalid_json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.errors import ExtProcError, UpstreamError
from extproc.mask import Inspector
from extproc.mask.bodies import (
    ENCODING,
    ERRORS,
    Admit,
    BufferedJson,
    JsonMasker,
    JsonRejected,
    dump_json,
    error_line,
    loads_strict,
)
from extproc.mask.joined import ANSWER, MAX_CHANNELS, EventFields, HeldEvent, Router
from extproc.mask.sse import load_json
from extproc.mask.tokens import refuse_token_input, strip_token_detail
from extproc.model import Finding

MEDIA_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
_MESSAGE_TEXT = ("content", "thinking")
_TOP_TEXT = ("response", "thinking")
_MESSAGE_META = frozenset({"role", "images", "tool_calls"})
_TOP_META = frozenset({"model", "created_at", "done", "done_reason", "context"})


class NdjsonStream(EventFields):
    _json: JsonMasker

    def __init__(
        self,
        inspector: Inspector,
        max_line_bytes: int,
        too_large: ExtProcError,
        invalid: ExtProcError | None = None,
    ) -> None:
        self._max = max_line_bytes
        self._too_large = too_large
        self._invalid = invalid
        self._pending = b""
        self._found: list[Finding] = []
        self._json = JsonMasker(inspector, self._found)
        self._router = Router(inspector, self._refusal(f"opens more than {MAX_CHANNELS} texts"))

    def _refusal(self, reason: str) -> ExtProcError:
        """``invalid`` saying why (an answer's 502 when none was given)."""
        if self._invalid is None:
            return UpstreamError(f"the answer {reason}")
        return type(self._invalid)(f"{self._invalid.message}: {reason}", code=self._invalid.code)

    @property
    def findings(self) -> list[Finding]:
        return self._found + self._router.findings

    @property
    def held(self) -> int:
        return self._router.held

    @property
    def streaming(self) -> bool:
        return True

    def feed(self, data: bytes) -> bytes:
        search_from = len(self._pending)
        self._pending += data
        cut = self._pending.rfind(b"\n", search_from)
        if cut < 0:
            if len(self._pending) > self._max:
                raise self._too_large
            return b""
        complete, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
        if len(self._pending) > self._max:
            raise self._too_large
        lines = complete.split(b"\n")[:-1]
        if any(len(line) > self._max for line in lines):
            raise self._too_large
        for line in lines:
            self._line(line, b"\n")
        return self._ready()

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        if rest:
            self._line(rest, b"")
        return self._end()

    def cut(self) -> bytes:
        """The stream ends here, early: the incomplete line is dropped; the lines held so far go out,
        masked."""
        self._pending = b""
        return self._end()

    def terminal(self, error: Mapping[str, str]) -> bytes:
        return error_line(error)

    def close(self) -> None:
        self._router.close()

    def _end(self) -> bytes:
        return b"".join(held.render(held).encode(ENCODING, ERRORS) for held in self._router.finish())

    def _ready(self) -> bytes:
        return b"".join(held.render(held).encode(ENCODING, ERRORS) for held in self._router.flush())

    def _line(self, line: bytes, end: bytes) -> None:
        text = line.decode(ENCODING, ERRORS)
        try:
            document = load_json(text) if text.strip() else None
        except UpstreamError as exc:  # JSON that cannot be read one way only: said in this direction's words
            if self._invalid is None:
                raise
            raise self._refusal(f"a line {exc.message.removeprefix('an event of the answer ')}") from exc
        except ValueError:
            document = None
        # Text, or a bare JSON number, is read as the text it is; a JSON string as its receiver decodes it.
        as_text = not isinstance(document, dict | list | str)
        root: list[Any] = [text if as_text else document]

        def render(held: HeldEvent) -> str:
            if not held.changed:
                return text + end.decode()
            return (str(root[0]) if as_text else dump_json(root[0])) + end.decode()

        held = self._router.event(render)
        if not as_text:
            if self._invalid is None:  # an answer: per-token copies and token ids are emptied
                held.changed = strip_token_detail(document)
            else:  # a request: a prompt as token ids is refused
                refuse_token_input(document)
            root[0], masked = self._json.keys_and_numbers(root[0])  # no scanner reads keys and numbers
            held.changed |= masked
            document = root[0]
        if isinstance(document, dict):
            self._document(held, document)
        elif isinstance(document, str):
            self._residual(held, root, 0, ("<text>",))
        else:
            self._residual(held, root, 0, ("<text>",) if as_text else ())
        self._router.seal(held)

    def _document(self, held: HeldEvent, document: dict[str, Any]) -> None:
        for key in list(document):
            value = document[key]
            if key in _TOP_TEXT:
                self._text(held, document, key, ("top", key))
            elif key == "message" and isinstance(value, dict):
                for inner in list(value):
                    if inner in _MESSAGE_TEXT:
                        self._text(held, value, inner, ("message", inner))
                    elif inner in _MESSAGE_META:
                        self._whole(held, value, inner)
                    else:
                        self._residual(held, value, inner, ("message", inner))
            elif key in _TOP_META:
                self._whole(held, document, key)
            else:
                self._residual(held, document, key, (key,))

    def _text(self, held: HeldEvent, node: Any, key: Any, text: tuple[str, str]) -> None:
        value = node[key]
        if isinstance(value, str):
            channels = (("text", *text), ANSWER)
            self._router.piece(held, value, lambda final: node.__setitem__(key, final), channels)
        elif isinstance(value, dict | list):
            for inner in list(value) if isinstance(value, dict) else range(len(value)):
                self._text(held, value, inner, text)


class SniffedJson(BufferedJson):
    """A streamed answer served as text or untyped that starts like JSON (``{`` or ``[``, see
    ``extproc.mask.sse.SniffedStream``), held whole up to ``limit`` and read as its receivers may read it.
    The ``openai`` client parses a text answer as JSON, so ``\\u0034`` escapes in it become digits; a
    client of a line-delimited stream parses it line by line.

    - One JSON document (object or array): masked as a JSON body (``BufferedJson``, ``sniff``).
    - Otherwise, when every non-blank line is a JSON object: NDJSON, masked by ``NdjsonStream`` over the
      whole body (texts joined across lines, escapes decoded).
    - Otherwise text, masked as text. A client reading lines may still parse the lines that are JSON, so
      the masked text is read once more as NDJSON (JSON lines decoded, other lines as text): if that
      reading would mask anything more, the answer is refused with ``invalid``.

    A line that is JSON only to a lenient reader (a repeated key, too deep) refuses the answer in every
    case."""

    def __init__(
        self,
        inspector: Inspector,
        limit: int,
        too_large: ExtProcError,
        invalid: ExtProcError,
        max_line_bytes: int,
        admit: Admit | None = None,
    ) -> None:
        super().__init__(inspector, limit, too_large, invalid, sniff=True, admit=admit)
        self._max_line = max_line_bytes

    def _mask_text(self, inspector: Inspector, body: bytes) -> bytes:
        every, some = _json_lines(body)
        if every:
            out, self.findings = _as_lines(inspector, self._max_line, self._too_large, body)
            return out
        out = super()._mask_text(inspector, body)
        if some and _as_lines(inspector, self._max_line, self._too_large, out)[0] != out:
            reason = "part of it is masked differently when its lines are read as JSON"
            raise type(self._invalid)(f"{self._invalid.message}: {reason}", code=self._invalid.code)
        return out


def _as_lines(
    inspector: Inspector, max_line_bytes: int, too_large: ExtProcError, body: bytes
) -> tuple[bytes, list[Finding]]:
    lines = NdjsonStream(inspector, max_line_bytes, too_large)
    try:
        return lines.feed(body) + lines.finish(), lines.findings
    finally:
        lines.close()


def _json_lines(body: bytes) -> tuple[bool, bool]:
    """Whether every non-blank line of ``body`` is a JSON object (one at least), and whether one line at
    least is a JSON object or array (what a client reading lines would decode)."""
    every, some = True, False
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            document = loads_strict(line)
        except JsonRejected as exc:
            raise UpstreamError(f"a line of the answer is JSON that cannot be scanned: {exc}") from exc
        except ValueError:
            every = False
            continue
        every &= isinstance(document, dict)
        some |= isinstance(document, dict | list)
    return every and some, some
