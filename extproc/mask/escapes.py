"""JSON text streamed in pieces (tool-call arguments), read as the receiver decodes it.

A model streams a tool call's arguments as the text of a JSON document, a few characters per event
(``delta.tool_calls[].function.arguments``, ``response.function_call_arguments.delta``, Anthropic's
``partial_json``). The client joins the pieces and parses them, and so does the tool: a value written
with escapes (``jane\\u0040example.com``, ``\\u0034\\u0031\\u0031\\u0031...``) is read decoded. Scanning
the pieces as written misses it, so the scanner reads a decoded view, built as pieces arrive:

- ``\\u`` and four hex digits become their character, a surrogate pair (``\\ud83d\\ude00``) one character;
- ``\\"``, ``\\\\``, ``\\/``, ``\\b``, ``\\f``, ``\\n``, ``\\r``, ``\\t`` become theirs;
- an escape cut at the end of a piece (``\\u00`` | ``40``), and a high surrogate that may still be
  followed by its low half, wait for the next piece: the view holds them, and so does the stream;
- anything else, a backslash that starts no valid escape included, is its own character.

Escapes are decoded wherever they are, inside strings or not: outside a string a backslash is not JSON,
and the view only feeds the scanner. ``origin`` maps a view offset back to the raw text: every view
character comes from one raw character or one whole escape, so a finding maps to a raw span that starts
and ends on escape boundaries, and masking it never leaves half an escape behind.
"""

from __future__ import annotations

import json
import re
from typing import Final

from extproc.detect.normalize import OffsetMap

_SIMPLE: Final = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_ESCAPE: Final = re.compile(r'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
_LOW: Final = re.compile(r"\\u([dD][c-fC-F][0-9a-fA-F]{2})")
# What may still become an escape, or a high surrogate's low half, when more text comes.
_PARTIAL: Final = re.compile(r"\\(?:u[0-9a-fA-F]{0,3})?")
_PARTIAL_LOW: Final = re.compile(r"(?:\\(?:u(?:[dD](?:[c-fC-F][0-9a-fA-F]?)?)?)?)?")


class JsonTextView:
    """The decoded view of a JSON text fed in pieces, and the map from view offsets to raw offsets (both
    counted from the start of the text)."""

    def __init__(self) -> None:
        self._offsets = OffsetMap()
        self._pending = ""  # raw text not decoded yet: a cut escape
        self.decoded = 0  # view characters produced
        self.raw = 0  # raw characters decoded (not counting the pending ones)
        # Raw spans ``[start, end)`` of the escapes decoded since the caller last emptied the list.
        self.escapes: list[tuple[int, int]] = []

    @property
    def held(self) -> int:
        """Raw characters waiting for the rest of their escape."""
        return len(self._pending)

    def feed(self, raw: str) -> str:
        """The view characters ``raw`` completes (an escape cut at its end waits for the next piece)."""
        return self._decode(self._pending + raw, final=False)

    def finish(self) -> str:
        """The end of the text: a cut escape is what it is, characters as written."""
        return self._decode(self._pending, final=True)

    def origin(self, view: int) -> int:
        """The raw offset view offset ``view`` comes from; at the end of the view, the end of what it
        decoded. A view span ``[start, end)`` covers raw ``[origin(start), origin(end))``."""
        return self._offsets.origin(view)

    def forget(self, view: int) -> None:
        """No offset before ``view`` will be asked for again."""
        self._offsets.drop_before(view)

    def _decode(self, text: str, final: bool) -> str:
        self._pending = ""
        if "\\" not in text:
            self._plain(text)
            return text
        out: list[str] = []
        position = 0
        while position < len(text):
            slash = text.find("\\", position)
            if slash < 0:
                slash = len(text)
            if slash > position:
                out.append(self._plain(text[position:slash]))
            if slash == len(text):
                break
            found = _ESCAPE.match(text, slash)
            if found is None:
                if not final and _PARTIAL.fullmatch(text, slash):
                    self._pending = text[slash:]
                    break
                out.append(self._plain("\\"))  # not an escape: the backslash is itself
                position = slash + 1
                continue
            end = found.end()
            if found.group(2) is not None:
                char = _SIMPLE[found.group(2)]
            else:
                code = int(found.group(1), 16)
                if 0xD800 <= code <= 0xDBFF:
                    low = _LOW.match(text, end)
                    if low is not None:
                        code = 0x10000 + ((code - 0xD800) << 10) + (int(low.group(1), 16) - 0xDC00)
                        end = low.end()
                    elif not final and _PARTIAL_LOW.fullmatch(text, end):
                        self._pending = text[slash:]
                        break
                char = chr(code)
            self._offsets.add(self.decoded, self.raw)
            self.escapes.append((self.raw, self.raw + end - slash))
            self.decoded += 1
            self.raw += end - slash
            self._offsets.add(self.decoded, self.raw)
            out.append(char)
            position = end
        return "".join(out)

    def _plain(self, run: str) -> str:
        """Raw characters that are their own view characters."""
        if run:
            self._offsets.add(self.decoded, self.raw)
            self.decoded += len(run)
            self.raw += len(run)
        return run


def string_content(text: str) -> str:
    """``text`` as the content of a JSON string: quotes, backslashes and control characters escaped, so a
    replacement written into JSON text keeps it JSON and reads back as ``text``."""
    return json.dumps(text, ensure_ascii=False)[1:-1]
