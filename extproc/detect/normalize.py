"""The text the rules read: a normalised view of a text, with a map back to the original.

What people and models write is not always what rules expect, and a sender who wants a value through
writes it so on purpose: digits of another script (``٤١١١``), fullwidth forms (``４１１１``, ``＠``),
compatibility characters (``…``, ``①``, ``ﬁ``), invisible characters inside a value (U+200B, U+2060, a
soft hyphen, a BOM, combining marks, control characters), other spaces (U+00A0, U+2009, U+3000), other
line breaks (U+2028, U+0085), and Cyrillic or Greek letters that look like the Latin letters of a
credential's prefix (``АКІА``). The view, character by character:

- drops format characters (Unicode category Cf), nonspacing and enclosing marks (Mn, Me) and control
  characters other than tab, line feed, vertical tab, form feed and carriage return;
- maps line and paragraph separators (Zl, Zp) and NEL to a line feed;
- folds every Unicode decimal digit (category Nd, any script) to its ASCII digit;
- applies compatibility folding (NFKC) where the result is ASCII: fullwidth forms, Unicode spaces, ``…``;
- maps the Cyrillic and Greek letters that are drawn like Latin ones to those letters (``CONFUSABLES``).

Everything else (letters of other scripts, ``é``, CJK) stays as it is: rules reading those characters
see them unchanged. Each character maps on its own, without context, so a stream's view is built piece
by piece as text arrives, and the map back is exact: every character of the view comes from one
character of the original (``View.offsets``). A finding on the view covers, on the original, everything
from the character its first view character comes from through the one its last comes from, so the
invisible characters inside a value are masked with it.

ASCII text without control characters is its own view: the common case costs two C-speed passes.
"""

from __future__ import annotations

import bisect
import itertools
import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from typing import Final

# Letters of other scripts drawn like Latin letters, as they appear in spoofed credential prefixes
# (AKIA, ghp_, xoxb, sk_live_, AIza...): Unicode's confusables for the Latin alphabet from Cyrillic and
# Greek, the scripts whose keyboards put them one keystroke away. Mapped in every text: the view only feeds
# the rules, and a rule that reads Latin letters then also reads their look-alikes.
CONFUSABLES: Final = {
    # Cyrillic capitals
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
    "Т": "T", "Х": "X", "У": "Y", "І": "I", "Ј": "J", "Ѕ": "S", "Ԁ": "D", "Ԛ": "Q", "Ԝ": "W",
    # Cyrillic small letters
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j",
    "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l", "ь": "b",
    # Greek capitals
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    # Greek small letters
    "ο": "o", "ν": "v", "ι": "i", "κ": "k", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "α": "a",
}  # fmt: skip
_KEPT_CONTROLS = "\t\n\x0b\x0c\r"
_ASCII_CONTROLS: Final = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_SPECIAL: Final = re.compile(r"[^\t\n\x0b\x0c\r\x20-\x7e]+")  # what the view may change


@cache
def _tables() -> tuple[dict[int, str], frozenset[str]]:
    """The translation of every character the view changes, and the characters whose translation is not
    one character long (dropped or expanded): only texts holding one need an offset map. Built once per
    process (about a tenth of a second); ``Detector`` builds it at start-up, not on the first request.
    Only the planes where Unicode puts characters the view changes are read: the basic and supplementary
    multilingual planes and the supplementary special-purpose plane (tag characters, variation selectors);
    the others hold ideographs, private use and unassigned code points (a test checks this)."""
    table: dict[int, str] = {code: "" for code in range(0x80) if _drops(chr(code))}
    for code in itertools.chain(range(0x80, 0xD800), range(0xE000, 0x20000), range(0xE0000, 0xF0000)):
        char = chr(code)
        mapped = _map(char)
        if mapped != char:
            table[code] = mapped
    return table, frozenset(chr(code) for code, mapped in table.items() if len(mapped) != 1)


def _drops(char: str) -> bool:
    if char.isascii():
        return char not in _KEPT_CONTROLS and (char < " " or char == "\x7f")
    return unicodedata.category(char) in ("Cf", "Mn", "Me", "Cc") and char != "\x85"


def _map(char: str) -> str:
    if _drops(char):
        return ""
    if char == "\x85" or unicodedata.category(char) in ("Zl", "Zp"):
        return "\n"
    digit = unicodedata.decimal(char, None)
    if digit is not None:
        return str(digit)
    if char in CONFUSABLES:
        return CONFUSABLES[char]
    folded = unicodedata.normalize("NFKC", char)
    return folded if folded != char and folded.isascii() else char


def prepare() -> None:
    """Build the tables now (start-up) rather than on the first text that needs them."""
    _tables()


class OffsetMap:
    """Where the characters of a view come from in the original: segments, each starting at a view offset
    (``views``) that comes from an original offset (``origins``), inside which both advance together. A
    dropped character starts a segment after it, each character of an expansion one of its own. Texts
    that need no map have none (``View.offsets`` is None); one that does holds a segment per character
    dropped or expanded, not per character."""

    __slots__ = ("origins", "views")

    def __init__(self) -> None:
        self.views: list[int] = [0]
        self.origins: list[int] = [0]

    def add(self, view: int, origin: int) -> None:
        """From view offset ``view`` on (the last segment's start or later), offsets advance together from
        original offset ``origin``."""
        last_view, last_origin = self.views[-1], self.origins[-1]
        if view - last_view == origin - last_origin:
            return  # the last segment goes on
        if view == last_view:
            self.origins[-1] = origin
        else:
            self.views.append(view)
            self.origins.append(origin)

    def origin(self, view: int) -> int:
        """The original offset of view offset ``view`` (at the view's end: the original's end)."""
        index = bisect.bisect_right(self.views, view) - 1
        return self.origins[index] + view - self.views[index]

    def drop_before(self, view: int) -> None:
        """Forget the segments wholly before view offset ``view`` (a stream's released past)."""
        index = bisect.bisect_right(self.views, view) - 1
        if index > 0:
            del self.views[:index], self.origins[:index]


@dataclass(frozen=True, slots=True)
class View:
    """``text`` as the rules read it, and where its characters come from in the original: ``offsets`` is
    None when every character maps to exactly one (offsets agree)."""

    text: str
    offsets: OffsetMap | None = None

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span a view span ``[start, end)`` (``start < end``) covers: from the character its
        first view character comes from through the one its last comes from."""
        if self.offsets is None:
            return start, end
        return self.offsets.origin(start), self.offsets.origin(end - 1) + 1


def normalize(text: str) -> View:
    if text.isascii() and _ASCII_CONTROLS.search(text) is None:
        return View(text)
    table, resized = _tables()
    parts: list[str] = []
    offsets: OffsetMap | None = None
    length = 0  # of the view so far
    position = 0
    # Only runs of characters other than printable ASCII can change: translate those, and walk character
    # by character only through runs that hold a character the view drops or expands.
    for found in _SPECIAL.finditer(text):
        low, high = found.span()
        run = found.group()
        mapped = run.translate(table)
        length += low - position
        if not resized.isdisjoint(run):
            offsets = offsets or OffsetMap()
            view = length
            for origin, char in enumerate(run, low):
                size = len(table.get(ord(char), char))
                if size != 1:
                    for extra in range(size):  # each character of an expansion comes from this one
                        offsets.add(view + extra, origin)
                    offsets.add(view + size, origin + 1)
                view += size
        parts += (text[position:low], mapped)
        length += len(mapped)
        position = high
    parts.append(text[position:])
    return View("".join(parts), offsets)
