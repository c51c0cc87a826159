"""Body processors: bytes in, masked bytes out, chunk by chunk. Pure: no I/O, no protobuf.

A processor is fed the body as it arrives and returns what may be released now; ``finish`` returns the
rest. Text is decoded as UTF-8 with ``surrogateescape``, so bytes that are not UTF-8 survive unchanged and
nothing outside a finding is ever altered.
"""

from __future__ import annotations

import codecs
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

from extproc.errors import ExtProcError
from extproc.mask import Inspector
from extproc.model import Finding

ENCODING = "utf-8"
ERRORS = "surrogateescape"


class BodyProcessor(Protocol):
    @property
    def findings(self) -> list[Finding]: ...

    @property
    def held(self) -> int:
        """Characters a streamed body holds back right now (0 for bodies masked whole)."""
        ...

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Buffered(ABC):
    """Holds the whole body up to ``limit`` bytes, then masks it at once."""

    def __init__(self, inspector: Inspector, limit: int, too_large: ExtProcError) -> None:
        self._inspector = inspector
        self._limit = limit
        self._too_large = too_large
        self._parts: list[bytes] = []
        self._size = 0
        self.findings: list[Finding] = []
        self.held = 0

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self._limit:
            raise self._too_large
        self._parts.append(data)
        return b""

    def finish(self) -> bytes:
        body = b"".join(self._parts)
        self._parts = []
        return self._mask(body)

    @abstractmethod
    def _mask(self, body: bytes) -> bytes:
        """The whole body, masked."""


class BufferedText(_Buffered):
    def _mask(self, body: bytes) -> bytes:
        masked, self.findings = self._inspector.mask_text(body.decode(ENCODING, ERRORS))
        return masked.encode(ENCODING, ERRORS) if self.findings else body


class BufferedJson(_Buffered):
    """Masks every string value of a JSON document; the document stays valid JSON.

    A body that is not JSON is refused with ``invalid``, unless ``as_text`` is set: then it is masked as
    plain text (a deployment whose clients send JSON-ish bodies that do not always parse).

    ``admit``, when given, sees the parsed document (``None`` for a body masked as text) and its size
    before anything is masked: it may refuse it (raise), rewrite it in place (and say so), and it returns
    the inspector to mask with (the policy this document falls under)."""

    def __init__(
        self,
        inspector: Inspector,
        limit: int,
        too_large: ExtProcError,
        invalid: ExtProcError,
        *,
        as_text: bool = False,
        admit: Admit | None = None,
    ) -> None:
        super().__init__(inspector, limit, too_large)
        self._invalid = invalid
        self._as_text = as_text
        self._admit = admit

    def _mask(self, body: bytes) -> bytes:
        if not body.strip():
            if self._admit is not None:
                self._admit(None, len(body))
            return body
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            if not self._as_text:
                raise self._invalid from exc
            inspector = self._admit(None, len(body))[0] if self._admit is not None else self._inspector
            masked_text, self.findings = inspector.mask_text(body.decode(ENCODING, ERRORS))
            return masked_text.encode(ENCODING, ERRORS) if self.findings else body
        inspector, rewritten = self._inspector, False
        if self._admit is not None:
            inspector, rewritten = self._admit(document, len(body))
        masker = JsonMasker(inspector, self.findings)
        masked = masker.value(document)
        if not masker.changed and not rewritten:
            return body
        return dump_json(masked).encode(ENCODING)


class Admit(Protocol):
    def __call__(self, document: Any, size: int) -> tuple[Inspector, bool]: ...


_SURROGATE = re.compile("[\ud800-\udfff]")


def dump_json(node: Any) -> str:
    """Compact JSON. A lone surrogate (``"\\ud800"`` is valid JSON, but no UTF-8 can carry it) keeps
    its escape, so the output always encodes."""
    text = json.dumps(node, ensure_ascii=False, separators=(",", ":"))
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return json.dumps(node, ensure_ascii=True, separators=(",", ":"))


class JsonMasker:
    """Masks the string values of JSON documents (keys are kept) and collects the findings.

    A string that is itself a JSON document (tool-call arguments, tool results) is scanned as text and,
    when it holds escapes, also decoded and walked: ``"jane\\u0040example.com"`` inside arguments is an
    e-mail address only once decoded. It is re-encoded only when that finds something more.

    Short strings found clean are remembered: a token stream repeats its id, model and role in every
    event, and scanning them once is enough."""

    _CLEAN_MAX_CHARS = 256
    _CLEAN_MAX_ENTRIES = 4096

    def __init__(self, inspector: Inspector, findings: list[Finding] | None = None) -> None:
        self._inspector = inspector
        self.findings: list[Finding] = [] if findings is None else findings
        self.changed = False  # some string was masked (a finding a policy allows changes nothing)
        self._clean: set[str] = set()

    def value(self, node: Any) -> Any:
        """``node`` with every string value masked."""
        if isinstance(node, str):
            return self._string(node)
        if isinstance(node, list):
            return [self.value(item) for item in node]
        if isinstance(node, dict):
            return {key: self.value(value) for key, value in node.items()}
        return node

    def fields(self, node: dict[str, Any], skip: frozenset[str]) -> bool:
        """Mask, in place, every string under ``node`` except the values of the keys in ``skip`` (fields
        masked otherwise, or that are not text). Returns whether anything changed."""
        before = len(self.findings)
        for key, value in node.items():
            if key not in skip and isinstance(value, str | list | dict):
                node[key] = self.value(value)
        return len(self.findings) > before

    def _string(self, text: str) -> str:
        if text in self._clean:
            return text
        masked, found = self._inspector.mask_text(text)
        if not found and len(text) <= self._CLEAN_MAX_CHARS and len(self._clean) < self._CLEAN_MAX_ENTRIES:
            self._clean.add(text)
        self.findings.extend(found)
        if masked != text:
            self.changed = True
        if "\\" in masked and masked.lstrip()[:1] in ("{", "["):
            return self._nested(masked)
        return masked

    def _nested(self, text: str) -> str:
        try:
            inner = json.loads(text)
        except ValueError:
            return text
        if not isinstance(inner, dict | list):
            return text
        masked = self.value(inner)
        if masked == inner:
            return text
        self.changed = True
        return dump_json(masked)


_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_KNOWN_FIELDS = frozenset({"data", "event", "id", "retry"})


@dataclass(frozen=True, slots=True)
class SseField:
    """One line of an event: ``name`` is ``""`` for a comment (a line that starts with ``:``)."""

    raw: str
    name: str
    value: str


@dataclass(slots=True)
class SseEvent:
    fields: list[SseField]
    terminated: bool = True  # ended by a blank line; the last event of a stream may not be
    line_ended: bool = True  # its last line ended (not cut by the end of the stream)

    @property
    def data(self) -> str | None:
        """The data lines joined with LF, as a receiver builds its data buffer; ``None`` without any."""
        values = [f.value for f in self.fields if f.name == "data"]
        return "\n".join(values) if values else None

    @property
    def name(self) -> str | None:
        names = [f.value for f in self.fields if f.name == "event"]
        return names[-1] if names else None


def parse_field(line: str) -> SseField:
    if line.startswith(":"):
        return SseField(line, "", line[1:])
    name, colon, value = line.partition(":")
    return SseField(line, name, value.removeprefix(" ") if colon else "")


class SseEvents:
    """Server-sent events framed as the WHATWG specification parses them ("parsing an event stream"):
    one UTF-8 byte order mark is dropped at the very start of the stream; lines end at CRLF, LF or CR
    and nowhere else (not at U+2028, U+0085 or a form feed, which ``str.splitlines`` would split at);
    a blank line ends an event; a field's value follows its first colon, less one leading space.

    Events are written out again from what was parsed, each line ending in LF: what a receiver reads
    is what was scanned, whatever line ends the upstream mixed. Comments lose their text (a bare ``:``
    keeps a keep-alive a keep-alive); ``id``, ``event`` and ``retry`` values are masked; lines of any
    other field are dropped (a receiver ignores them). An event longer than ``max_event_bytes``,
    complete or not, ends the stream with ``too_large``.

    Here each event's data is masked as text on its own; ``extproc.mask.sse.EventStream`` joins texts
    across events."""

    def __init__(self, inspector: Inspector, max_event_bytes: int, too_large: ExtProcError) -> None:
        self._inspector = inspector
        self._max = max_event_bytes
        self._too_large = too_large
        self._pending = b""  # the line being received
        self._lines: list[SseField] = []  # the event being received
        self._event_bytes = 0
        self._started = False  # a leading byte order mark has been looked for
        self._found: list[Finding] = []

    @property
    def findings(self) -> list[Finding]:
        return self._found

    @property
    def held(self) -> int:
        return 0  # events go out whole; the token streams of EventStream hold characters

    def feed(self, data: bytes) -> bytes:
        search_from = max(0, len(self._pending) - 1)  # a CR at the end may be the start of a CRLF
        self._pending += data
        if not self._started:
            if len(self._pending) < len(_BOM) and _BOM.startswith(self._pending):
                return b""
            self._started = True
            if self._pending.startswith(_BOM):
                self._pending = self._pending[len(_BOM) :]
            search_from = 0
        return self._write(self._parse(search_from, final=False))

    def finish(self) -> bytes:
        self._started = True
        partial = bool(self._pending) and not self._pending.endswith((b"\r", b"\n"))
        events = self._parse(0, final=True)
        if self._lines:
            events.append(SseEvent(self._lines, terminated=False, line_ended=not partial))
            self._lines = []
        return self._write(events) + self._end()

    def cut(self) -> bytes:
        """The stream ends here, early: the incomplete event is dropped. Returns what may still go out."""
        self._pending, self._lines = b"", []
        return b""

    def _parse(self, search_from: int, final: bool) -> list[SseEvent]:
        events: list[SseEvent] = []
        position = 0
        pending = self._pending
        for match in _LINE_END.finditer(pending, search_from):
            if match.end() == len(pending) and match.group() == b"\r" and not final:
                break  # a CR at the end of what has arrived: it may be the start of a CRLF
            line = pending[position : match.start()]
            position = match.end()
            self._event_bytes += len(line) + 1
            if self._event_bytes > self._max:
                raise self._too_large
            if line:
                self._lines.append(parse_field(line.decode(ENCODING, ERRORS)))
            else:
                events.append(SseEvent(self._lines))
                self._lines, self._event_bytes = [], 0
        self._pending = pending[position:]
        if self._event_bytes + len(self._pending) > self._max:
            raise self._too_large
        if final and self._pending:
            self._lines.append(parse_field(self._pending.decode(ENCODING, ERRORS)))
            self._pending = b""
        return events

    def _write(self, events: list[SseEvent]) -> bytes:
        return "".join(self._event(event) for event in events).encode(ENCODING, ERRORS)

    def _end(self) -> bytes:
        """What goes out after the last event (events held back, in EventStream)."""
        return b""

    def _event(self, event: SseEvent) -> str:
        data = event.data
        if data is None:
            return self.render(event)
        masked, found = self._inspector.mask_text(data)
        self._found.extend(found)
        return self.render(event, masked if found else None)

    def render(self, event: SseEvent, data: str | None = None) -> str:
        """``event`` as it goes out: its data lines replaced by ``data`` when given (one line per LF)."""
        lines: list[str] = []
        data_written = False
        for line in event.fields:
            if line.name == "data":
                if data is None:
                    lines.append(line.raw)
                elif not data_written:
                    lines.extend("data: " + part for part in data.split("\n"))
                data_written = True
            elif line.name == "":
                lines.append(":")
            elif line.name in _KNOWN_FIELDS:
                masked, found = self._inspector.mask_text(line.value)
                self._found.extend(found)
                lines.append(f"{line.name}: {masked}" if found else line.raw)
        text = "\n".join(lines)
        if event.terminated:
            return text + "\n\n" if lines else "\n"
        return text + "\n" if lines and event.line_ended else text


class StreamingText:
    """Plain text released as it arrives, masked by the stream scanner: only the characters a match
    still in progress could cover are held back, and a value cut across chunks is still found whole."""

    def __init__(self, inspector: Inspector, limit: int, too_large: ExtProcError) -> None:
        self._masker = inspector.stream()
        self._decoder = codecs.getincrementaldecoder(ENCODING)(ERRORS)
        self._limit = limit
        self._too_large = too_large
        self._size = 0

    @property
    def findings(self) -> list[Finding]:
        return self._masker.findings

    @property
    def held(self) -> int:
        return self._masker.held

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self._limit:
            self._masker.close()
            raise self._too_large
        return self._masker.feed(self._decoder.decode(data)).encode(ENCODING, ERRORS)

    def finish(self) -> bytes:
        text = self._decoder.decode(b"", final=True)
        return (self._masker.feed(text) + self._masker.finish()).encode(ENCODING, ERRORS)


class Passthrough:
    """For bodies that carry no model data (local replies generated by Envoy)."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.held = 0

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""
