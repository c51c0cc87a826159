"""Where a keyword rule's context comes from: the words before a value, a label naming it, or the header
of the table column it sits in.

A rule with ``keywords`` (a bare SSN, a phone number in a national layout, a Canadian SIN) reports a
value only when one of its keywords is near it. Near is, in order:

1. **the window**: within ``keyword_window`` characters before the value, or inside the match;
2. **a label** the caller knows names the value: the key of a JSON string (``{"ssn": "..."}``), read as
   if ``key: value`` were written;
3. **a table header**: the value sits in a delimited row (``,`` ``;`` tab ``|``) of a table whose header
   row, the first row of the block or the row before a Markdown ``|---|`` line, names a keyword in the
   same column; the header cell is read as a label.

A label is matched as ``<label>: `` (a header cell ``SIN`` is ``SIN: ``, so the keyword ``sin:`` finds
it), also with its words split apart (``phoneNumber``, ``employee_sin`` read ``phone number``,
``employee sin``). A label of one character, and a keyword with fewer than two characters before its
``:`` (``T:``), count in running text only: a column named ``T`` is not a phone column.

A keyword starting with a space matches at the start of a word: after any character that is not a
letter or a digit, or at the start of the text (`` T:`` matches ``T: 030...`` on a line of its own, not
``Input: 030...``). Other keywords match anywhere, as written.

**Tables are bounded.** The header is looked for at most ``TABLE_LINES`` lines and ``TABLE_CHARS``
characters above the value's row; every row between must hold the delimiter and be at most
``ROW_CHARS`` characters long (a blank line, a line without the delimiter or a longer line ends the
table); a value more than ``ROW_CHARS`` characters into its row has no column. A quoted field (``"Doe,
Jane"``) is one cell; a quoted field holding a line break is not followed. The work is done only for a
candidate whose window holds no keyword, once per row per scan (``Tables`` keeps the rows it read), and
reads only the text before the value: a stream can decide as soon as the value is complete, and needs
to remember only the header of the table it is in (``TableState``), not the rows since.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from extproc.detect.normalize import normalize

DELIMITERS: Final = ("|", "\t", ";", ",")
TABLE_LINES: Final = 1000
"""How many lines above a value its table's header may be."""
TABLE_CHARS: Final = 64 * 1024
"""How many characters above a value's row its table's header may start."""
ROW_CHARS: Final = 2048
"""The longest table row: a longer line ends a table, a value further into its row has no column."""

_SEPARATOR: Final = re.compile(r"\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?")
_WORDS: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[_\-.]+")
_LABEL_STRIP: Final = " \t\r\"'*_`"
# The cells of a row: a quoted field (opened at a field's start only, as CSV readers do), or a delimiter.
_CELLS: Final = {
    d: re.compile(rf'(?:^|(?<={re.escape(d)}))[ \t]*"(?:[^"]|"")*"?|{re.escape(d)}')
    for d in DELIMITERS
    if d != "|"
}
_PIPE: Final = re.compile(r"(?<!\\)\|")


def label_forms(label: str) -> tuple[str, ...]:
    """How a label reads to keywords: ``<label>: `` in lower case, as written and with its words split
    (``phoneNumber`` is also ``phone number: ``). Nothing for a label of fewer than two characters."""
    label = normalize(label).text.strip(_LABEL_STRIP)
    if len(label) < 2:
        return ()
    written = f"{label.lower()}: "
    split = f"{' '.join(w for w in _WORDS.split(label) if w).lower()}: "
    return (written,) if split == written else (written, split)


def _matcher(keywords: Sequence[str]) -> re.Pattern[str] | None:
    """One pattern for ``keywords`` (lower case): those starting with a space not after a letter or digit."""
    if not keywords:
        return None
    parts = [
        "(?<![^\\W_])" + re.escape(k.lstrip(" ")) if k.startswith(" ") else re.escape(k)
        for k in sorted(set(keywords), key=len, reverse=True)
    ]
    return re.compile("|".join(parts))


class Keywords:
    """A rule's keywords, matched in a window of text or in a label."""

    def __init__(self, keywords: Sequence[str]) -> None:
        lowered = [k.lower() for k in keywords]
        self._window = _matcher(lowered)
        # What a label must hold for a keyword to match `<label>: `: the keyword without its `:` or `: `.
        stems = []
        for keyword in lowered:
            stem = keyword.strip(" ")
            stem = stem[:-1] if stem.endswith(":") else stem
            stems.append(stem if len(stem) >= 2 else "")
        self._label = _matcher([k for k, s in zip(lowered, stems, strict=True) if s])
        # Some of these is in any text a keyword of the rule can be found for, in a window or a label.
        self.prefilter = tuple(
            dict.fromkeys(s if s else k.lstrip(" ") for k, s in zip(lowered, stems, strict=True))
        )

    def in_window(self, text: str, start: int, end: int) -> bool:
        """Whether a keyword lies in ``text[start:end]`` (one starting with a space: not after a letter
        or digit, the character before ``start`` included)."""
        if self._window is None:
            return False
        before = text[start - 1 : start].lower()[-1:] if start > 0 else ""
        return self._window.search(before + text[start:end].lower(), len(before)) is not None

    def in_label(self, forms: Sequence[str]) -> bool:
        matcher = self._label
        return matcher is not None and any(matcher.search(form) is not None for form in forms)


@dataclass(frozen=True, slots=True)
class _Row:
    start: int  # offset of the row in the whole text or stream
    line: int  # its line number (only differences are read)
    text: str


_FAR: Final = _Row(-1, -(1 << 40), "")  # a row too far above: a header there is out of reach
_Column = tuple[_Row | None, _Row | None]  # per delimiter: the header that applies, the row before
_NO_TABLES: Final[tuple[_Column, ...]] = ((None, None),) * len(DELIMITERS)


@dataclass(frozen=True, slots=True)
class TableState:
    """What the rows above a line leave for it: per delimiter, the header of the table it continues and
    the row before it. ``partial``: the text starts inside a line longer than ``ROW_CHARS`` (a stream
    dropped its start), which is no table row and ends any table."""

    line: int = 0
    columns: tuple[_Column, ...] = _NO_TABLES
    partial: bool = False

    def advance(self, text: str, start: int, stop: int, base: int) -> TableState:
        """The state at ``stop``, a line start in ``text`` after ``start``, where this state is; ``text``
        starts at offset ``base``."""
        columns, line, position, partial = self.columns, self.line, start, self.partial
        while position < stop:
            end = text.find("\n", position, stop)
            if end == -1:
                end = stop
            columns = _next(columns, text, position, end, base, line, partial)
            partial = False
            line += 1
            position = end + 1
        return TableState(line, columns, partial)

    def dropped(self) -> TableState:
        """This state with the start of its first line dropped (a line longer than a row)."""
        return TableState(self.line, self.columns, True)

    def headers(self) -> str:
        """The header rows this state knows, for a test of whether a keyword could be there."""
        return "\n".join(h.text for h, _ in self.columns if h is not None and h is not _FAR)


def _next(
    columns: tuple[_Column, ...], text: str, start: int, end: int, base: int, line: int, partial: bool
) -> tuple[_Column, ...]:
    """The columns after the line ``text[start:end]``."""
    if partial or end - start > ROW_CHARS:
        return _NO_TABLES
    content = text[start:end]
    if not any(d in content for d in DELIMITERS):
        return _NO_TABLES
    row = _Row(start + base, line, content)
    out: list[_Column] = []
    for d, (header, _prev) in zip(DELIMITERS, columns, strict=True):
        if d not in content:
            out.append((None, None))
        elif header is None:
            out.append((row, row))
        elif d == "|" and _SEPARATOR.fullmatch(content.strip()):
            out.append((_prev, row))
        else:
            out.append((header, row))
    return tuple(out)


def _cells(row: str, delimiter: str) -> list[str]:
    """The cells of ``row``, quotes and escaped pipes kept as written."""
    if delimiter == "|":
        bounds = [m.start() for m in _PIPE.finditer(row)]
    else:
        bounds = [m.start() for m in _CELLS[delimiter].finditer(row) if row[m.start()] == delimiter]
    cells, position = [], 0
    for bound in bounds:
        cells.append(row[position:bound])
        position = bound + 1
    cells.append(row[position:])
    return cells


def _label(cell: str) -> str:
    cell = cell.strip(" \t\r")
    if len(cell) >= 2 and cell[0] == '"' and cell[-1] == '"':
        cell = cell[1:-1].replace('""', '"')
    return cell


class Tables:
    """The table headers over the rows of one text, read on demand: one per scan, or per confirmation of
    a stream's buffer (``base``: its offset in the stream; ``state``: what the rows before it left).
    ``known``: the answers so far, by the value's offsets from the start of the stream (they depend only
    on the text before the value: a stream keeps them while it keeps the value's text)."""

    def __init__(
        self,
        text: str,
        base: int = 0,
        state: TableState | None = None,
        known: dict[tuple[int, int], list[tuple[str, ...]]] | None = None,
    ) -> None:
        self._text = text
        self._base = base
        self._state = state
        self._known: dict[tuple[int, int], list[tuple[str, ...]]] = {} if known is None else known
        self._cursor: tuple[int, TableState] | None = None  # a line start and the state there
        self._rows: dict[int, TableState] = {}
        self._labels: dict[tuple[int, int, int], tuple[str, ...]] = {}

    def labels(self, start: int, end: int) -> list[tuple[str, ...]]:
        """The forms (``label_forms``) of the header cells over the value at ``text[start:end]``, one per
        delimiter whose table holds it."""
        key = (start + self._base, end + self._base)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = self._read(start, end)
        return known

    def _read(self, start: int, end: int) -> list[tuple[str, ...]]:
        text = self._text
        row_start = text.rfind("\n", 0, start) + 1
        if start - row_start > ROW_CHARS:
            return []
        state = self._state
        if row_start == 0 and state is not None and state.partial:
            return []
        above = self._rows.get(row_start)
        if above is None:
            above = self._rows[row_start] = self._state_at(row_start)
        value = text[start:end]
        line = above.line
        found = []
        for index, (d, (header, _)) in enumerate(zip(DELIMITERS, above.columns, strict=True)):
            if header is None or header is _FAR or d in value:
                continue
            if line - header.line > TABLE_LINES or row_start + self._base - header.start > TABLE_CHARS:
                continue
            column = len(_cells(text[row_start:start], d)) - 1
            key = (index, header.start, column)
            forms = self._labels.get(key)
            if forms is None:
                cells = _cells(header.text, d)
                forms = label_forms(_label(cells[column])) if column < len(cells) else ()
                self._labels[key] = forms
            if forms:
                found.append(forms)
        return found

    def _state_at(self, row_start: int) -> TableState:
        cursor = self._cursor
        if cursor is None or cursor[0] > row_start or row_start - cursor[0] > TABLE_CHARS:
            cursor = self._restart(row_start)
        position, state = cursor
        if position < row_start:
            state = state.advance(self._text, position, row_start, self._base)
        self._cursor = (row_start, state)
        return state

    def _restart(self, row_start: int) -> tuple[int, TableState]:
        """Where to read the rows above ``row_start`` from: the start of the text, or the last line that
        starts more than ``TABLE_CHARS`` above it (a header there or before is out of reach, but whether
        that line is a row decides whether a table starts after it)."""
        bound = row_start - TABLE_CHARS
        first = self._text.rfind("\n", 0, bound - 1) + 1 if bound > 0 else 0
        if first == 0:
            return 0, self._state if self._state is not None else TableState()
        far: _Column = (_FAR, _FAR)
        return first, TableState(0, (far,) * len(DELIMITERS), False)
