"""What a stream must hold back: the text a match still in progress could cover.

A stream scanner may release text only where no match of any rule can still change with what comes next.
A match that changes must start at a position ``p`` from which the regular expression can consume all the
text up to the end of what has arrived: ``text[p:]`` is a *prefix* of something the pattern can consume.
So for every rule this module derives, once, a regular expression for the non-empty prefixes of the
rule's pattern (``P+``), and a stream holds back from the earliest position where ``P+`` matches up to
the end of the text. Ordinary prose is then held for a word or so; a card number, a key or a PEM block
being typed out is held from its first character.

The prefix expression is built from the pattern's own parse tree (``re._parser``), so it reads
characters exactly as the rule does (same flags, same classes, same case folding):

- a character or class: itself; a sequence ``e1 e2 ...``: ``P+(e1) | e1 P+(e2 ...)``; an alternation:
  the alternation of the prefixes; ``e{m,n}``: ``e{0,n-1} P+(e)``; groups and flags are kept.
- zero-width assertions stay in the full form of a consumed element (``\\b`` between two characters that
  have both arrived is decided), and an assertion that reads ``r`` characters ahead (``$`` reads 2,
  ``(?!\\.\\d)`` reads 2) adds, as its own prefix, "up to ``r - 1`` characters of anything": a match whose
  lookahead runs past the end of the text is still undecided.
- lazy, possessive and atomic constructs are read as plain greedy ones: that only admits more prefixes.

Prefixes are closed under shortening, so a position that is not a match in progress at one length of
the stream never becomes one later: each stream keeps, per expression, the earliest position still in
progress and searches only from there. That keeps the work per token event proportional to what is held,
not to the stream. Most expressions need no search at all: a position automaton read off the same parse
tree gives, per character, which expressions a match can start with it, have it second, or go on with it,
and one walk back over what arrived keeps only the expressions a match in progress is possible for. The
search itself first checks the first characters against plain classes, which Python tests in one step.
Case-insensitive ASCII letters are written out as ``[aA]`` for the same reason (checked against ``re``).

A pattern the analysis cannot read (back references, conditionals, an unbounded length, a lookahead
reading further than the engine's context) keeps the fixed hold it had before: its width plus the
context, or, for a long rule starting with a literal, its width from where that literal appears.
Exact-match lists are held from a word start whose text so far is a prefix of a listed value.

The internals read here are CPython's own and change between versions. Before the analysis is trusted it
is checked once on reference patterns whose prefixes are known (``unavailable()``); on a Python whose
internals are missing or read differently, every rule keeps the fixed hold and a warning says why.
"""

from __future__ import annotations

import bisect
import importlib
import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("extproc.detect")


class _Absent:
    """Stands in for a module of ``re``'s internals this Python lacks: every name is a placeholder no parse
    tree holds, so the tables below still build, and ``unavailable()`` keeps the analysis switched off."""

    MAXREPEAT = 4294967295

    def __getattr__(self, name: str) -> object:
        placeholder = object()
        setattr(self, name, placeholder)
        return placeholder


def _load_internals(
    import_module: Callable[[str], Any] = importlib.import_module,
) -> tuple[Any, Any, Any, str | None]:
    """The parser ``re`` itself uses, its constants and its compiler's program builder, or placeholders and
    what is missing."""
    try:
        parser = import_module("re._parser")
        constants = import_module("re._constants")
        code = import_module("re._compiler")._code  # a parsed pattern's program, as `re` compiles it
    except (ImportError, AttributeError) as exc:
        return _Absent(), _Absent(), None, f"this Python's re module lacks what the analysis reads ({exc})"
    return parser, constants, code, None


_parser, _c, _code, _MISSING = _load_internals()

MAXREPEAT = int(_c.MAXREPEAT)
# The flags a parsed pattern can carry that change how the prefix expression must be compiled.
_COMPILE_FLAGS = re.IGNORECASE | re.MULTILINE | re.DOTALL | re.ASCII | re.UNICODE
_SCOPED_ADD = (
    (re.IGNORECASE, "i"),
    (re.MULTILINE, "m"),
    (re.DOTALL, "s"),
    (re.ASCII, "a"),
    (re.UNICODE, "u"),
)
_SCOPED_DEL = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))
_IGNORED_FLAGS = re.VERBOSE  # only changes how the pattern is read, and the parse tree is already read
_CATEGORIES = {
    _c.CATEGORY_DIGIT: r"\d",
    _c.CATEGORY_NOT_DIGIT: r"\D",
    _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S",
    _c.CATEGORY_WORD: r"\w",
    _c.CATEGORY_NOT_WORD: r"\W",
}
# Zero-width assertions: how they are written, and how many characters from their position they read
# (``\b`` reads the character at its position, ``$`` that character and whether another follows).
_ASSERTIONS = {
    _c.AT_BEGINNING: ("^", 0),
    _c.AT_BEGINNING_STRING: (r"\A", 0),
    _c.AT_BOUNDARY: (r"\b", 1),
    _c.AT_NON_BOUNDARY: (r"\B", 1),
    _c.AT_END: ("$", 2),
    _c.AT_END_STRING: (r"\Z", 1),
}
ANYTHING = r"[\s\S]"
GUARD_PLACES = 4  # characters a prefix expression checks, one class each, before trying its alternatives


class Unsupported(ValueError):
    """The analysis cannot model a pattern; its rule keeps the fixed hold."""


def _char(code: int) -> str:
    char = chr(code)
    if char.isascii() and char.isalnum():
        return char
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


@dataclass(frozen=True, slots=True)
class _Style:
    """How parsed elements are written back. ``faithful`` keeps capturing groups, laziness and
    possessiveness (to check the writing against the original); otherwise they are dropped, which keeps
    every text an element can consume. ``fold`` (None: write case-insensitivity as flags) writes it out
    instead, ``[aA]`` for ``a``: ASCII case folding only changes ASCII letters, and a class Python can
    test in one step lets an alternation skip the branches that cannot start at a position."""

    faithful: bool = False
    fold: bool | None = None

    def scoped(self, add: int, remove: int) -> _Style:
        if self.fold is None:
            return self
        return _Style(self.faithful, (self.fold or bool(add & re.IGNORECASE)) and not remove & re.IGNORECASE)


FAITHFUL = _Style(faithful=True)
LOOSE = _Style()
_checked: dict[tuple[str, str], bool] = {}
_SAMPLES = [chr(code) for code in range(128)] + [
    "\x80",
    "\xe9",
    "\u0130",
    "\u0131",
    "\u017f",
    "\u212a",
    "\uffff",
]


def _folded(original: str, folded: str) -> str:
    """``folded``, after checking it matches what ``original`` matches case-insensitively (ASCII rules)."""
    known = _checked.get((original, folded))
    if known is None:
        caseless = re.compile(original, re.IGNORECASE | re.ASCII)
        written = re.compile(folded, re.ASCII)
        known = _checked[(original, folded)] = all(
            bool(caseless.fullmatch(c)) == bool(written.fullmatch(c)) for c in _SAMPLES
        )
    if not known:
        raise Unsupported(f"case folding of {original}")
    return folded


def _swapped(low: int, high: int) -> str:
    """The other case of the ASCII letters between ``low`` and ``high``, as class items."""
    out = []
    for first, last, shift in ((ord("a"), ord("z"), -32), (ord("A"), ord("Z"), 32)):
        a, b = max(low, first), min(high, last)
        if a <= b:
            out.append(f"{_char(a + shift)}-{_char(b + shift)}" if a < b else _char(a + shift))
    return "".join(out)


def _class(items: Sequence[tuple[Any, Any]], fold: bool) -> str:
    out = ["["]
    for op, av in items:
        if op is _c.NEGATE:
            out.append("^")
        elif op is _c.LITERAL:
            out.append(_char(av) + (_swapped(av, av) if fold else ""))
        elif op is _c.RANGE:
            out.append(f"{_char(av[0])}-{_char(av[1])}" + (_swapped(av[0], av[1]) if fold else ""))
        elif op is _c.CATEGORY and av in _CATEGORIES:
            out.append(_CATEGORIES[av])
        else:
            raise Unsupported(f"character class item {op} {av}")
    out.append("]")
    written = "".join(out)
    return _folded(_class(items, fold=False), written) if fold else written


def _scoped(add: int, remove: int, style: _Style = LOOSE) -> str:
    """The opening of a non-capturing group carrying inline flags, as the parser recorded them (without
    case-insensitivity when the style writes it out)."""
    add &= ~_IGNORED_FLAGS
    remove &= ~_IGNORED_FLAGS
    if (add | remove) & ~(re.IGNORECASE | re.MULTILINE | re.DOTALL | re.ASCII) and style.fold is not None:
        raise Unsupported("a scoped change to how characters are read")
    if style.fold is not None:
        add &= ~re.IGNORECASE
        remove &= ~re.IGNORECASE
    letters = "".join(letter for flag, letter in _SCOPED_ADD if add & flag)
    removed = "".join(letter for flag, letter in _SCOPED_DEL if remove & flag)
    known = sum(flag for flag, _ in _SCOPED_ADD if add & flag) == add
    if not known or sum(flag for flag, _ in _SCOPED_DEL if remove & flag) != remove:
        raise Unsupported(f"inline flags {add} -{remove}")
    if not letters and not removed:
        return "(?:"
    return f"(?{letters}{'-' + removed if removed else ''}:"


def _bounds(low: int, high: int) -> str:
    return f"{{{low},}}" if high >= MAXREPEAT else f"{{{low},{high}}}"


def _full(items: Iterable[tuple[Any, Any]], style: _Style) -> str:
    return "".join(_node(op, av, style) for op, av in items)


def _node(op: Any, av: Any, style: _Style) -> str:
    """One element written back as a pattern."""
    fold = bool(style.fold)
    if op is _c.LITERAL:
        return _class([(op, av)], fold) if fold and chr(av).isascii() and chr(av).isalpha() else _char(av)
    if op is _c.NOT_LITERAL:
        return _class([(_c.NEGATE, None), (_c.LITERAL, av)], fold)
    if op is _c.ANY:
        return "."
    if op is _c.IN:
        return _class(av, fold)
    if op is _c.BRANCH:
        return "(?:" + "|".join(_full(branch, style) for branch in av[1]) + ")"
    if op is _c.SUBPATTERN:
        group, add, remove, body = av
        inner = _scoped(add, remove, style) + _full(body, style.scoped(add, remove)) + ")"
        return f"({inner})" if style.faithful and group is not None else inner
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        low, high, body = av
        mode = ""
        if style.faithful:
            mode = "?" if op is _c.MIN_REPEAT else "+" if op is _c.POSSESSIVE_REPEAT else ""
        return f"(?:{_full(body, style)}){_bounds(low, high)}{mode}"
    if op is _c.ATOMIC_GROUP:
        return ("(?>" if style.faithful else "(?:") + _full(av, style) + ")"
    if op is _c.AT and av in _ASSERTIONS:
        return _ASSERTIONS[av][0]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        direction, body = av
        kind = ("<" if direction < 0 else "") + ("=" if op is _c.ASSERT else "!")
        return f"(?{kind}{_full(body, style)})"
    raise Unsupported(f"pattern element {op}")


def _reach(items: Iterable[tuple[Any, Any]]) -> int:
    """How many characters past its own position any assertion in ``items`` may read."""
    reach = 0
    for op, av in items:
        if op is _c.AT:
            if av not in _ASSERTIONS:
                raise Unsupported(f"assertion {av}")
            reach = max(reach, _ASSERTIONS[av][1])
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            reach = max(reach, _assertion_reach(op, av))
        elif op is _c.BRANCH:
            reach = max([reach, *(_reach(branch) for branch in av[1])])
        elif op is _c.SUBPATTERN:
            reach = max(reach, _reach(av[3]))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            reach = max(reach, _reach(av[2]))
        elif op is _c.ATOMIC_GROUP:
            reach = max(reach, _reach(av))
    return reach


def _assertion_reach(op: Any, av: Any) -> int:
    direction, body = av
    if direction < 0:  # a lookbehind reads backwards; only assertions inside it may read past its position
        return _reach(body)
    high = int(body.getwidth()[1])
    if high >= MAXREPEAT:
        raise Unsupported("a lookahead of unbounded length")
    return high + _reach(body)


def _anything(reach: int) -> str | None:
    """The prefix of an assertion that reads ``reach`` characters: up to ``reach - 1`` characters of
    anything (with none, the text before the assertion is already a prefix of its own)."""
    return f"{ANYTHING}{{1,{reach - 1}}}" if reach >= 2 else None


def _prefixes(items: Sequence[tuple[Any, Any]], style: _Style) -> str | None:
    """A pattern for the non-empty prefixes of what ``items`` can consume; None when there are none."""
    result: str | None = None
    for op, av in reversed(items):
        alternatives = []
        own = _node_prefixes(op, av, style)
        if own is not None:
            alternatives.append(own)
        if result is not None:
            alternatives.append(_node(op, av, style) + result)
        result = "(?:" + "|".join(alternatives) + ")" if alternatives else None
    return result


def _node_prefixes(op: Any, av: Any, style: _Style) -> str | None:
    if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
        return _node(op, av, style)
    if op is _c.BRANCH:
        branches = [p for p in (_prefixes(branch, style) for branch in av[1]) if p is not None]
        return "(?:" + "|".join(branches) + ")" if branches else None
    if op is _c.SUBPATTERN:
        _group, add, remove, body = av
        inner = _prefixes(body, style.scoped(add, remove))
        return None if inner is None else _scoped(add, remove, style) + inner + ")"
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
        _low, high, body = av
        inner = _prefixes(body, style)
        if inner is None or high == 0:
            return None
        if high == 1:
            return inner
        return f"(?:(?:{_full(body, style)}){_bounds(0, high - 1)}{inner})"
    if op is _c.ATOMIC_GROUP:
        return _prefixes(av, style)
    if op is _c.AT:
        if av not in _ASSERTIONS:
            raise Unsupported(f"assertion {av}")
        return _anything(_ASSERTIONS[av][1])
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return _anything(_assertion_reach(op, av))
    raise Unsupported(f"pattern element {op}")


class _Positions:
    """The position automaton (Glushkov's) of a pattern, read loosely: every character-consuming element is
    a position; a repeat of two or more loops (its counts forgotten); an assertion reading ahead is an
    optional run of any characters (its prefixes end in such a run); ``^`` and ``\\A`` end a path (they
    hold only at the start of the text). Its language holds every prefix the prefix expression admits
    anywhere but at the start, so the character sets read off it are safe to filter with: ``places``, the
    characters a prefix can have at each of its first places (``first``, ``second``); ``alphabet``, all
    the characters it can consume."""

    def __init__(self, items: Iterable[tuple[Any, Any]]) -> None:
        self.chars: list[str] = []  # per position, a pattern for its character (flags applied)
        self.follow: list[set[int]] = []
        self._consuming: set[int] = set()
        self.begins = False
        _nullable, first, _last = self._sequence(items, "", "")
        # The characters at each of the first places of a prefix, place by place.
        self.places: list[list[str]] = []
        reached = first
        for _ in range(GUARD_PLACES):
            self.places.append([self.chars[i] for i in sorted(reached)])
            reached = set().union(*(self.follow[i] for i in reached))
        self.first, self.second = self.places[0], self.places[1]
        self.alphabet = [self.chars[i] for i in sorted(self._consuming)]

    def _add(self, char: str, consuming: bool) -> int:
        self.chars.append(char)
        self.follow.append(set())
        if consuming:
            self._consuming.add(len(self.chars) - 1)
        return len(self.chars) - 1

    def _sequence(
        self, items: Iterable[tuple[Any, Any]], before: str, after: str
    ) -> tuple[bool, set[int], set[int]]:
        nullable, first, last = True, set[int](), set[int]()
        for op, av in items:
            item_nullable, item_first, item_last = self._element(op, av, before, after)
            for position in last:
                self.follow[position] |= item_first
            if nullable:
                first |= item_first
            last = item_last | last if item_nullable else item_last
            nullable = nullable and item_nullable
        return nullable, first, last

    def _element(self, op: Any, av: Any, before: str, after: str) -> tuple[bool, set[int], set[int]]:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            position = self._add(before + _node(op, av, LOOSE) + after, consuming=True)
            return False, {position}, {position}
        if op is _c.BRANCH:
            nullable, first, last = False, set[int](), set[int]()
            for branch in av[1]:
                branch_nullable, branch_first, branch_last = self._sequence(branch, before, after)
                nullable = nullable or branch_nullable
                first |= branch_first
                last |= branch_last
            return nullable, first, last
        if op is _c.SUBPATTERN:
            return self._sequence(av[3], before + _scoped(av[1], av[2]), ")" + after)
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            low, high, body = av
            if high == 0:
                return True, set(), set()
            nullable, first, last = self._sequence(body, before, after)
            if high >= 2:
                for position in last:
                    self.follow[position] |= first
            return nullable or low == 0, first, last
        if op is _c.ATOMIC_GROUP:
            return self._sequence(av, before, after)
        if op is _c.AT and av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
            # Only at the start of the text: no match starts after it anywhere else (``begins`` tells the
            # stream to look at its first characters whatever they are).
            self.begins = True
            return False, set(), set()
        if op is _c.AT or op in (_c.ASSERT, _c.ASSERT_NOT):
            reach = _assertion_reach(op, av) if op is not _c.AT else _ASSERTIONS[av][1]
            if reach < 2:
                return True, set(), set()
            position = self._add(ANYTHING, consuming=False)
            if reach > 2:
                self.follow[position].add(position)
            return True, {position}, {position}
        raise Unsupported(f"pattern element {op}")


@dataclass(frozen=True, slots=True)
class Prefixes:
    """``pattern``, ``(?:P+)\\Z``, matches at ``p`` when a match starting at ``p`` could still be in
    progress at the end of the text. Cheap necessary conditions, to skip the search: such a match starts
    with a character of ``first``, then (if there is one) one of ``second``, and goes on with characters
    of ``alphabet``, except for the last ``wildcard`` characters, which an assertion reading ahead may
    cover (None: any character)."""

    pattern: re.Pattern[str]
    first: re.Pattern[str] | None
    second: re.Pattern[str] | None
    alphabet: re.Pattern[str] | None
    wildcard: int
    begins: bool = False  # a match can start with ``^`` or ``\\A``: the conditions do not hold at offset 0
    third: re.Pattern[str] | None = None  # the characters a match can have third (None: any)
    # The position automaton the conditions are read off: per position, a pattern for its character and
    # the bit set of the positions that may follow it; and the flags to compile the patterns with.
    automaton: tuple[tuple[str, ...], tuple[int, ...], int] | None = None


def prefix_pattern(regex: re.Pattern[str], max_reach: int) -> Prefixes:
    """The prefixes of ``regex``. Raises Unsupported when the pattern cannot be modelled: its length is
    unbounded, an assertion reads more than ``max_reach`` characters ahead, or it uses something this
    module does not write back exactly (checked by compiling the written-back pattern to the same program
    as the original)."""
    parsed = _parser.parse(regex.pattern, regex.flags)
    flags = int(parsed.state.flags)
    if flags & ~(_COMPILE_FLAGS | _IGNORED_FLAGS):
        raise Unsupported(f"flags {flags}")
    if parsed.state.lookbehindgroups is not None or any(
        op in (_c.GROUPREF, _c.GROUPREF_EXISTS) for op, _ in _walk(parsed)
    ):
        raise Unsupported("back references")
    if int(parsed.getwidth()[1]) >= MAXREPEAT:
        raise Unsupported("unbounded length")
    if _reach(parsed) > max_reach:
        raise Unsupported(f"an assertion reads more than {max_reach} characters ahead")
    compile_flags = flags & _COMPILE_FLAGS
    written = _full(parsed, FAITHFUL)
    if _code(_parser.parse(written, compile_flags), compile_flags) != _code(parsed, flags):
        raise Unsupported("the pattern does not survive being written back")
    positions = _Positions(parsed)
    prefixes = None
    prefix_flags = compile_flags
    if compile_flags & re.ASCII:
        try:
            prefixes = _prefixes(parsed, _Style(fold=bool(flags & re.IGNORECASE)))
            prefix_flags &= ~re.IGNORECASE
        except Unsupported:
            prefixes = None
    if prefixes is None:
        prefixes = _prefixes(parsed, LOOSE)
        prefix_flags = compile_flags
    if prefixes is None or not positions.first or not positions.alphabet:
        raise Unsupported("the pattern consumes nothing")

    def chars(patterns: list[str]) -> re.Pattern[str] | None:
        return None if ANYTHING in patterns else re.compile("(?:" + "|".join(patterns) + ")", compile_flags)

    first, second = chars(positions.first), chars(positions.second)
    # The first characters' conditions in front of the expression, as plain classes Python tests in one
    # step: a start that fails them costs a few steps, not a walk through every alternative.
    guard = ""
    for place in reversed(positions.places):
        if ANYTHING in place:
            guard = ""
        elif not place:
            guard = "(?!)"  # no prefix is this long: the text must end before
        else:
            chars_at = re.compile("(?:" + "|".join(place) + ")", compile_flags)
            guard = _class_of(chars_at, place) + (f"(?:{guard}|\\Z)" if guard else "")
    if guard:
        guard = f"(?:\\A|(?={guard}))" if positions.begins else f"(?={guard})"
    return Prefixes(
        re.compile(guard + prefixes + r"\Z", prefix_flags),
        first,
        second,
        chars(positions.alphabet),
        max(0, _reach(parsed) - 1),
        positions.begins,
        chars(positions.places[2]),
        (
            tuple(positions.chars),
            tuple(sum(1 << i for i in follow) for follow in positions.follow),
            compile_flags,
        ),
    )


def _class_of(chars: re.Pattern[str], patterns: list[str]) -> str:
    """One character class holding at least what ``chars`` (the alternation of ``patterns``) matches: its
    ASCII characters one by one, and every non-ASCII character when it may match one: a negated class,
    ``\\W``, ``.``, an escape, or (unless characters are read as ASCII) a class, a category or case
    folding, all of which reach beyond ASCII in Unicode."""
    members = [code for code in range(128) if chars.fullmatch(chr(code))]
    written = "".join(patterns)
    marks = ["[^", "\\W", "\\D", "\\S", ".", "\\x8", "\\x9", "\\xa", "\\xb", "\\xc", "\\xd", "\\xe", "\\xf"]
    marks += ["\\u", "\\U"]
    if not chars.flags & re.ASCII:
        marks += ["\\w", "\\d", "\\s", "(?i"]
    wide = any(mark in written for mark in marks) or bool(
        chars.flags & re.IGNORECASE and not chars.flags & re.ASCII
    )
    return "[" + "".join(_char(code) for code in members) + ("\\x80-\\U0010ffff" if wide else "") + "]"


def _walk(items: Iterable[tuple[Any, Any]]) -> Iterable[tuple[Any, Any]]:
    for op, av in items:
        yield op, av
        if op is _c.BRANCH:
            for branch in av[1]:
                yield from _walk(branch)
        elif op is _c.SUBPATTERN:
            yield from _walk(av[3])
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            yield from _walk(av[2])
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            yield from _walk(av[1])
        elif op is _c.ATOMIC_GROUP:
            yield from _walk(av)
        elif op is _c.GROUPREF_EXISTS:
            for branch in av[1:]:
                if branch is not None:
                    yield from _walk(branch)


def longest(regex: re.Pattern[str]) -> int:
    """The longest text ``regex`` can match."""
    return int(_parser.parse(regex.pattern, regex.flags).getwidth()[1])


@dataclass(frozen=True, slots=True)
class _Group:
    """One prefix expression, shared by the rules whose patterns give the same one."""

    prefixes: Prefixes
    reach: int  # the longest text it matches: no match in progress starts further back
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _List:
    """A literal exact-match list. A listed value is reported only where it does not continue a word,
    and Hyperscan matches it on the text with every non-ASCII character read as ``?`` (and ASCII case
    folded, unless the list is case-sensitive): a value in progress starts at a word start, and the text
    from there, read the same way, is a prefix of a listed value (sorted, so one bisection tells)."""

    values: tuple[bytes, ...]
    caseless: bool
    starts: re.Pattern[str]
    reach: int
    rule: str

    @classmethod
    def build(cls, rule: str, values: Iterable[str], caseless: bool) -> _List:
        folded = sorted({_fold(value, caseless) for value in values if value})
        firsts = {value[:1] for value in folded}
        chars = "".join(_char(first[0]) for first in sorted(firsts))
        if b"?" in firsts:  # Hyperscan reads every non-ASCII character as "?"
            chars += "\\x80-\\U0010ffff"
        # (?<![^\W_]): not after a letter or digit as str.isalnum() sees them, which is what the engine
        # checks before accepting a listed value. Case folding here is Unicode's: a superset of ASCII's.
        if not chars:  # an empty list: nothing can be in progress
            return cls((), caseless, re.compile(r"(?!)"), 0, rule)
        starts = re.compile(rf"(?<![^\W_])(?=[{chars}])", re.IGNORECASE if caseless else 0)
        return cls(tuple(folded), caseless, starts, max((len(v) for v in folded), default=0), rule)

    def earliest(self, text: str, low: int) -> int | None:
        """The first position from ``low`` where a listed value may be in progress at the end of ``text``."""
        values = self.values
        for found in self.starts.finditer(text, low):
            start = found.start()
            piece = _fold(text[start:], self.caseless)
            index = bisect.bisect_left(values, piece)
            if index < len(values) and values[index].startswith(piece):
                return start
        return None


def _fold(text: str, caseless: bool) -> bytes:
    data = text.encode("ascii", "replace")
    return data.lower() if caseless else data


class _Masks(dict[str, tuple[int, int, int, int]]):
    """Per character, four bit sets of groups: those whose matches can start with it, those whose
    matches can have it second, those whose matches can have it third, and those whose matches can go on
    with it. Filled as characters are seen
    (the ASCII ones up front); past ``LIMIT`` distinct characters the table starts over (only a cache)."""

    LIMIT = 8192

    def __init__(self, groups: Sequence[_Group]) -> None:
        super().__init__()
        self._groups = groups
        self._ascii()

    def _ascii(self) -> None:
        for code in range(128):
            self[chr(code)] = self._compute(chr(code))

    def _compute(self, char: str) -> tuple[int, int, int, int]:
        first = second = third = alphabet = 0
        for index, group in enumerate(self._groups):
            bit = 1 << index
            prefixes = group.prefixes
            if prefixes.first is None or prefixes.first.fullmatch(char):
                first |= bit
            if prefixes.second is None or prefixes.second.fullmatch(char):
                second |= bit
            if prefixes.third is None or prefixes.third.fullmatch(char):
                third |= bit
            if prefixes.alphabet is None or prefixes.alphabet.fullmatch(char):
                alphabet |= bit
        return first, second, third, alphabet

    def __missing__(self, char: str) -> tuple[int, int, int, int]:
        if len(self) >= self.LIMIT:
            self.clear()
            self._ascii()
        masks = self[char] = self._compute(char)
        return masks


class _Pairs(dict[str, int]):
    """Per pair of ASCII characters, the groups whose matches can have the second right after the first:
    some position of the group's automaton holds the first and is followed by one that holds the second.
    Any other pair (one character beyond ASCII, or a group without an automaton) rules out no group: a
    table over every pair of characters of every script would grow without bound. Filled as pairs are
    seen; at most 16,384 of them."""

    def __init__(self, groups: Sequence[_Group]) -> None:
        super().__init__()
        self._groups = groups
        self._all = (1 << len(groups)) - 1
        self._compiled: dict[tuple[str, int], re.Pattern[str]] = {}
        # Per ASCII character, per group: the positions holding it, and the positions that may follow those
        # (-1, every position, for a group without an automaton).
        self._chars: dict[str, tuple[list[int], list[int]]] = {}

    def _positions(self, char: str) -> tuple[list[int], list[int]]:
        known = self._chars.get(char)
        if known is not None:
            return known
        holding: list[int] = []
        following: list[int] = []
        matched: dict[tuple[str, int], bool] = {}
        for group in self._groups:
            automaton = group.prefixes.automaton
            if automaton is None:
                holding.append(-1)
                following.append(-1)
                continue
            patterns, follows, flags = automaton
            at = after = 0
            for position, pattern in enumerate(patterns):
                key = (pattern, flags)
                hit = matched.get(key)
                if hit is None:
                    compiled = self._compiled.get(key)
                    if compiled is None:
                        compiled = self._compiled[key] = re.compile(pattern, flags)
                    hit = matched[key] = compiled.fullmatch(char) is not None
                if hit:
                    at |= 1 << position
                    after |= follows[position]
            holding.append(at)
            following.append(after)
        known = self._chars[char] = (holding, following)
        return known

    def __missing__(self, pair: str) -> int:
        if not pair.isascii():
            return self._all
        _, after = self._positions(pair[0])
        at, _ = self._positions(pair[1])
        mask = 0
        for index, (possible, holding) in enumerate(zip(after, at, strict=True)):
            if possible & holding:
                mask |= 1 << index
        self[pair] = mask
        return mask


class TailState:
    """One stream's view of the tail: what it had at the last call and where matches were in progress."""

    __slots__ = ("end", "floor", "floored", "lists", "pending", "starts")

    def __init__(self, groups: int, lists: int) -> None:
        self.end = 0  # stream offset of the end of the text at the last call
        self.pending = 0  # bit set of the groups a match may be in progress for at that end
        self.starts = [0] * groups  # for those, the earliest offset where one may start
        # Of those, the ones not searched (no match of theirs could start before the limit): none starts
        # before ``floor``, the limit the others gave, and ``starts`` does not say more.
        self.floored = 0
        self.floor = 0
        self.lists = [0] * lists


# Patterns whose prefixes are known: how this Python's internals are checked before the analysis trusts them.
# (pattern, longest match, texts that are prefixes of a match, texts that are not)
_REFERENCE = (
    (r"\bghp_[A-Za-z0-9]{36}\b", 40, ("g", "ghp", "ghp_x9", "ghp_" + "a" * 36), ("gx", "ghp_-", "hp_")),
    (r"(?i)\b4\d{3}(?:[ -]?\d{4}){3}\b", 19, ("4", "4111 1", "4111-1111-11"), ("5", "4a", "4111  1")),
    (r"(?:ab|cd){2,3}(?!x)", 6, ("a", "abc", "abcdab"), ("b", "ac", "abcdabcda")),
)
_unavailable: list[str | None] = []


def unavailable() -> str | None:
    """Why the analysis cannot run on this Python, or None when it can. Checked once per process, on
    reference patterns whose prefixes are known, so internals that moved or changed meaning switch the
    analysis off (every rule keeps the fixed hold, which is always safe) instead of failing at start-up or
    modelling a rule wrongly. The reason is logged as a warning."""
    if not _unavailable:
        reason = _MISSING if _MISSING is not None else _self_check()
        if reason is not None:
            log.warning("stream_hold_fixed", extra={"reason": reason, "python": sys.version.split()[0]})
        _unavailable.append(reason)
    return _unavailable[0]


def _self_check() -> str | None:
    try:
        for pattern, width, prefixes, others in _REFERENCE:
            regex = re.compile(pattern)
            if longest(regex) != width:
                return f"{pattern!r} reads as {longest(regex)} characters long, not {width}"
            model = prefix_pattern(regex, 8).pattern
            wrong = [t for t in prefixes if not model.match(t)] + [t for t in others if model.match(t)]
            if wrong:
                return f"the prefixes of {pattern!r} read wrongly at {wrong!r}"
    except Exception as exc:  # internals that differ fail in any way: every one turns the analysis off
        return f"this Python's regex internals differ from what the analysis reads ({exc!r})"
    return None


class TailBuilder:
    """Collects what each rule contributes to the hold; ``build()`` makes the shared TailModel."""

    def __init__(self, context: int) -> None:
        self._context = context
        self._groups: dict[tuple[str, int], tuple[Prefixes, list[str]]] = {}
        self._lists: list[_List] = []
        self._fixed = 0
        self._fixed_rules: dict[str, int] = {}

    def add_pattern(self, rule: str, regex: re.Pattern[str]) -> int | None:
        """Model ``regex``: the index of its group, or None (and nothing added) when it cannot be modelled."""
        if unavailable() is not None:
            return None
        try:
            prefixes = prefix_pattern(regex, self._context)
        except (Unsupported, re.error, RecursionError):
            return None
        return self._add(rule, prefixes)

    def add_anchor(self, rule: str, anchor: str, width: int, caseless: bool) -> None:
        """A long rule not modelled whose matches start with ``anchor``: held from the anchor (or its
        beginning, at the very end) while a match from there could still be within reach."""
        chars = [_char(ord(c)) for c in anchor]
        after = f"{ANYTHING}{{0,{max(0, width + self._context - len(anchor))}}}"
        alternatives = ["".join(chars) + after] + ["".join(chars[:i]) for i in range(1, len(chars))]
        flags = re.IGNORECASE if caseless else 0
        pattern = re.compile("(?:" + "|".join(alternatives) + r")\Z", flags)
        first = re.compile(chars[0], flags) if chars else None
        second = re.compile(chars[1], flags) if len(chars) > 1 else None
        third = re.compile(chars[2], flags) if len(chars) > 2 else None
        self._add(rule, Prefixes(pattern, first, second, None, 0, third=third))
        self._fixed_rules[rule] = width + self._context

    def add_fixed(self, rule: str, hold: int) -> None:
        """A rule not modelled: the last ``hold`` characters are always held for it."""
        self._fixed_rules[rule] = hold
        self._fixed = max(self._fixed, hold)

    def add_list(self, rule: str, values: Iterable[str], case_sensitive: bool) -> None:
        self._lists.append(_List.build(rule, values, not case_sensitive))

    def _add(self, rule: str, prefixes: Prefixes) -> int:
        key = (prefixes.pattern.pattern, prefixes.pattern.flags)
        if key not in self._groups:
            self._groups[key] = (prefixes, [])
        self._groups[key][1].append(rule)
        return list(self._groups).index(key)

    def build(self) -> TailModel:
        groups = tuple(
            _Group(prefixes, longest(prefixes.pattern), tuple(rules))
            for prefixes, rules in self._groups.values()
        )
        return TailModel(groups, tuple(self._lists), self._fixed, dict(self._fixed_rules))


class TailModel:
    """The hold of a whole rule set, shared by every stream of a detector; each stream keeps a
    ``TailState`` of its own (``state()``)."""

    def __init__(
        self, groups: tuple[_Group, ...], lists: tuple[_List, ...], fixed: int, fixed_rules: dict[str, int]
    ) -> None:
        self.groups = groups
        self.lists = lists
        self.fixed = fixed  # characters always held for the rules the analysis could not model
        self.fixed_rules = fixed_rules  # those rules, with the hold each keeps (anchored: from the anchor)
        self._masks = _Masks(groups)
        self._pairs = _Pairs(groups)
        self._all = (1 << len(groups)) - 1
        self._begins = sum(1 << i for i, g in enumerate(groups) if g.prefixes.begins)
        # _wild[d]: the groups for which the character ``d`` places from the end may be one an assertion
        # reads ahead (any character), not one the match consumes.
        longest_wildcard = max((g.prefixes.wildcard for g in groups), default=0)
        self._wild = [
            sum(1 << i for i, g in enumerate(groups) if g.prefixes.wildcard > d)
            for d in range(longest_wildcard)
        ]

    def state(self) -> TailState:
        """A new stream's state."""
        return TailState(len(self.groups), len(self.lists))

    def limit(self, text: str, base: int, state: TailState) -> int:
        """The earliest stream offset where a match may still be in progress at the end of ``text`` (which
        starts at stream offset ``base``; everything before ``state.end`` was seen by the last call); the
        end of the text when there is none.

        Prefixes cut short are still prefixes, so a start ruled out once stays ruled out: a group with
        nothing in progress at the last call can only have a match in progress now from a character that
        arrived since. Before any search, one walk back from the end over what arrived (and the characters
        an assertion reading ahead left undecided last time) keeps the groups that can: a match in
        progress starts with one of the group's first characters (then one of its second, then one of
        its third) and goes on with characters of its alphabet. Only those groups are searched, each
        from where its earliest match may start: where it was in progress last time, if the walk never
        ruled that out, or else the furthest place back the walk found it may start (a search costs for
        every place it tries, and most are ruled out here).

        Only the earliest start of all is the limit, so a group whose search could only find a start at
        or after the limit the others gave is not searched: it is kept as possibly in progress from that
        limit (``floor``), which is as much as ``settled`` promises of it and where the next call looks.
        On prose most searches are skipped so: the groups a word in progress is a prefix for start at that
        word, and a group reading the space before it has already put the limit there."""
        end = base + len(text)
        last = state.end
        masks = self._masks
        wild = self._wild
        alive = self._all
        started = 0
        follows = alive  # the groups the character after the current one can be second for
        follows_next = next_third = alive  # ... the one after that third for; the next one's third
        pairs = self._pairs
        following = ""  # the character after the current one
        hits = []  # per character walked (from the end back), the groups a match may start with it
        for distance, char in enumerate(reversed(text[max(last - len(wild) - base, 0) :])):
            first, second, third, alphabet = masks[char]
            pair = pairs[char + following] if following else alive
            hit = alive & first & follows & follows_next & pair
            hits.append(hit)
            started |= hit
            follows, follows_next, next_third = second, next_third, third
            if distance < len(wild):
                alphabet |= wild[distance]
            alive &= alphabet & pair
            following = char
            if not alive:
                break
        before = state.pending
        floored, floor = state.floored & before, state.floor
        kept = before & alive  # in progress last time, and nothing walked over rules that out
        if not last:  # the start of the stream: matches anchored there pass no filter
            kept |= self._begins
        starts = state.starts
        groups = self.groups
        limit = end - self.fixed
        pending = pruned = 0
        # First the groups still in progress, from where they were: they hold the most, so the limit
        # they give is low early and lets the search of most others be skipped.
        rest = kept
        while rest:
            bit = rest & -rest
            rest ^= bit
            index = bit.bit_length() - 1
            group = groups[index]
            held = (floor if floored & bit else starts[index]) if before & bit else last
            low = max(held, end - group.reach, base)
            if low >= limit:
                pruned |= bit
                continue
            found = group.prefixes.pattern.search(text, low - base)
            if found is not None:
                start = base + found.start()
                starts[index] = start
                pending |= bit
                limit = min(limit, start)
        # Then the others the walk found may start, from the furthest place back, for as long as a start
        # there could still move the limit.
        unplaced = started & ~kept
        distance = len(hits)
        while unplaced and distance:
            distance -= 1
            place = end - 1 - distance
            if place >= limit:
                break
            new = hits[distance] & unplaced
            unplaced ^= new
            while new:
                bit = new & -new
                new ^= bit
                index = bit.bit_length() - 1
                group = groups[index]
                held = (floor if floored & bit else starts[index]) if before & bit else last
                low = max(place, held, end - group.reach, base)
                if low >= limit:
                    pruned |= bit
                    continue
                found = group.prefixes.pattern.search(text, low - base)
                if found is not None:
                    start = base + found.start()
                    starts[index] = start
                    pending |= bit
                    limit = min(limit, start)
        # A group not searched may have a match in progress, but from no earlier than the limit.
        pruned |= unplaced
        state.floored = pruned
        state.floor = limit
        pending |= pruned
        for index, values in enumerate(self.lists):
            low = max(state.lists[index], end - values.reach, base)
            position = values.earliest(text, low - base)
            start = end if position is None else base + position
            state.lists[index] = start
            limit = min(limit, start)
        state.end = end
        state.pending = pending
        return limit

    @staticmethod
    def settled(state: TailState, group: int) -> int:
        """The stream offset before which no match of ``group``'s rules was in progress at the last call."""
        if not state.pending >> group & 1:
            return state.end
        return state.floor if state.floored >> group & 1 else state.starts[group]

    def holding(self, text: str) -> dict[str, int]:
        """For reports: per rule, how many characters at the end of ``text`` it alone would hold."""
        held: dict[str, int] = {}
        for group in self.groups:
            found = group.prefixes.pattern.search(text, max(0, len(text) - group.reach))
            if found is not None:
                for rule in group.rules:
                    held[rule] = len(text) - found.start()
        for values in self.lists:
            position = values.earliest(text, max(0, len(text) - values.reach))
            if position is not None:
                held[values.rule] = len(text) - position
        grouped = {rule for group in self.groups for rule in group.rules}
        for rule, hold in self.fixed_rules.items():
            if rule not in grouped:  # an anchored one holds only from its anchor, found above
                held[rule] = min(hold, len(text))
        return held
