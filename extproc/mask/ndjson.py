"""Newline-delimited JSON streams (``application/x-ndjson``): one JSON document per line.

Ollama streams its answers this way: ``/api/chat`` lines carry ``message.content`` (and
``message.thinking``), ``/api/generate`` lines carry ``response`` (and ``thinking``), and the last line
has ``"done": true``. Those texts are assembled across lines and masked with the stream scanner, like
server-sent token events (``extproc.mask.sse``); the held text goes out in the ``done`` line, or in a
line added at the end when the upstream stops without one. Every other string of a line is masked as a
whole; lines of no known shape have every string value masked, and lines that are not JSON are masked
as text. A line longer than ``max_line_bytes``, complete or not, ends the stream with ``too_large``.
"""

from __future__ import annotations

from typing import Any

from extproc.errors import ExtProcError
from extproc.mask import Inspector
from extproc.mask.bodies import ENCODING, ERRORS, JsonMasker, dump_json, loads_strict
from extproc.mask.sse import TokenStreams
from extproc.model import Finding

MEDIA_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
_MESSAGE_TEXT = ("content", "thinking")
_TOP_TEXT = ("response", "thinking")
_TOP_SKIP = frozenset({"message", *_TOP_TEXT})


class NdjsonStream:
    def __init__(self, inspector: Inspector, max_line_bytes: int, too_large: ExtProcError) -> None:
        self._inspector = inspector
        self._max = max_line_bytes
        self._too_large = too_large
        self._pending = b""
        self._found: list[Finding] = []
        self._json = JsonMasker(inspector, self._found)
        self._texts = TokenStreams(inspector)
        self._template: dict[str, Any] = {}

    @property
    def findings(self) -> list[Finding]:
        return self._found + self._texts.findings

    @property
    def held(self) -> int:
        return self._texts.held

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
        return b"".join(self._line(line) + b"\n" for line in lines)

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        out = self._line(rest) if rest else b""
        return out + self._flush()

    def cut(self) -> bytes:
        """The stream ends here, early: the incomplete line is dropped; what the texts still hold goes
        out, masked."""
        self._pending = b""
        return self._flush()

    def _line(self, line: bytes) -> bytes:
        text = line.decode(ENCODING, ERRORS)
        try:
            document = loads_strict(text) if text.strip() else None
        except ValueError:
            document = None
        if not isinstance(document, dict):
            if document is not None:
                before = len(self._found)
                masked_doc = self._json.value(document)
                return dump_json(masked_doc).encode(ENCODING) if len(self._found) > before else line
            masked, found = self._inspector.mask_text(text)
            self._found.extend(found)
            return masked.encode(ENCODING, ERRORS) if found else line
        changed = self._document(document)
        return dump_json(document).encode(ENCODING) if changed else line

    def _document(self, document: dict[str, Any]) -> bool:
        self._template = {k: document[k] for k in ("model", "created_at") if k in document}
        changed = self._json.fields(document, _TOP_SKIP)
        message = document.get("message")
        if isinstance(message, dict):
            changed |= self._json.fields(message, frozenset(_MESSAGE_TEXT))
            for field in _MESSAGE_TEXT:
                changed |= self._replace(message, field, ("message", field))
        elif message is not None:
            document["message"] = self._json.value(message)
        for field in _TOP_TEXT:
            changed |= self._replace(document, field, ("top", field))
        if document.get("done") is True:
            changed |= self._close(document)
        return changed

    def _replace(self, node: dict[str, Any], field: str, key: tuple[str, str]) -> bool:
        value = node.get(field)
        if not isinstance(value, str):
            if value is not None:
                node[field] = self._json.value(value)
            return False
        released = self._texts.feed(key, value)
        if released == value:
            return False
        node[field] = released
        return True

    def _close(self, document: dict[str, Any]) -> bool:
        """Every open text is finished: what it still holds goes out in ``document``."""
        changed = False
        for key in self._texts.open():
            rest = self._texts.close(key)
            if not rest:
                continue
            changed = True
            where, field = key
            if where == "message":
                message = document.get("message")
                if not isinstance(message, dict):
                    message = document["message"] = {"role": "assistant"}
                message[field] = (message.get(field) or "") + rest
            else:
                document[field] = (document.get(field) or "") + rest
        return changed

    def _flush(self) -> bytes:
        line: dict[str, Any] = {**self._template, "done": False}
        if not self._close(line):
            return b""
        return dump_json(line).encode(ENCODING) + b"\n"
