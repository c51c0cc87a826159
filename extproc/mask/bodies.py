"""Body processors: bytes in, masked bytes out, chunk by chunk. Pure: no I/O, no protobuf.

A processor is fed the body as it arrives and returns what may be released now; ``finish`` returns the
rest. Text is decoded as UTF-8 with ``surrogateescape``, so bytes that are not UTF-8 survive unchanged and
nothing outside a finding is ever altered. A buffered body declared in another charset is decoded as
declared (strictly) and masked text is encoded back into it.

Every JSON document read from a body goes through ``loads_strict``: a document that another parser could
read differently (duplicate keys), that nests deeper than ``MAX_JSON_DEPTH`` or that uses the constants
``NaN`` and ``Infinity`` is refused, so the bytes sent on always mean what was scanned.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import json
import math
import re
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final, Protocol

from extproc.errors import ExtProcError
from extproc.mask import Inspector
from extproc.model import Finding

ENCODING = "utf-8"
ERRORS = "surrogateescape"

MAX_JSON_DEPTH: Final = 128
"""Deepest nesting of arrays and objects accepted in a JSON body, counting JSON held in its strings (tool
arguments) where those are decoded too. Real chat, tool and schema documents stay under 30; the bound
keeps every walk of a document far below Python's recursion limit."""

LONG_NUMBER_DIGITS: Final = 12
"""A JSON number whose integer part has this many digits or more is scanned as text (a card number, an
account number written as a number); shorter ones cannot hold the values the rules look for."""


class JsonRejected(ValueError):
    """A body that is JSON only to a lenient reader: refused always, even with ``detect.unparseable: text``
    (masking it as text would not decode its escapes)."""


class DuplicateKey(JsonRejected):
    """An object names one key twice: parsers disagree on which value counts (Python's keeps the last,
    others keep the first or fail), so scanning one reading could miss what the model reads."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


class TooDeep(JsonRejected):
    def __init__(self, limit: int) -> None:
        super().__init__(f"nested deeper than {limit} levels")
        self.limit = limit


class JsonFloat(float):
    """A float whose literal may read differently from ``repr`` (``4.111111111111111e15`` is re-serialised
    as ``4111111111111111.0``): both are scanned, since either may be what is sent on."""

    __slots__ = ("literal",)
    literal: str


_ESCAPE = re.compile(r"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_LONG_INTEGER = re.compile(rf"-?\d{{{LONG_NUMBER_DIGITS},}}")
_INTEGER = re.compile(r"-?\d+")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (exact for valid JSON), without recursion
    and without a Python step per character: escapes go, then everything but quotes and brackets, then
    what lies between quotes; the brackets left are summed as +1 and -1."""
    if text.count("[") + text.count("{") == 0:
        return 0
    if "\\" in text:
        text = _ESCAPE.sub("", text)
    structure = text.encode(ENCODING, "surrogatepass").translate(None, _NOT_STRUCTURE)
    outside = b"".join(structure.split(b'"')[::2])
    steps = array("b")
    steps.frombytes(outside.translate(_STEPS))
    return max(accumulate(steps), default=0)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return document


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal[:32]} is out of range")
    head = literal[1 : LONG_NUMBER_DIGITS + 1] if literal[0] == "-" else literal[:LONG_NUMBER_DIGITS]
    if abs(value) >= _LONG_FLOAT or (len(head) == LONG_NUMBER_DIGITS and head.isdigit()):
        number = JsonFloat(value)
        number.literal = literal
        return number
    return value


_LONG_FLOAT: Final = 10.0 ** (LONG_NUMBER_DIGITS - 1)  # from here, repr writes 12 or more digits
_STRICT = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)


def loads_strict(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The one JSON parser for bodies. Like ``json.loads`` (bytes are read as UTF-8, -16 or -32 as
    RFC 8259 allows), but raises ``DuplicateKey`` for a key repeated in one object and ``TooDeep`` beyond
    ``max_depth`` levels (checked before parsing, so nothing recurses that deep), and refuses ``NaN``,
    ``Infinity`` and numbers out of a double's range, which other parsers reject or read differently.
    Every error is a ``ValueError``."""
    if isinstance(data, bytes | bytearray):
        text = bytes(data).decode(json.detect_encoding(data), "surrogatepass")
    else:
        text = data
    if text.count("[") + text.count("{") > max_depth and json_depth(text) > max_depth:
        raise TooDeep(max_depth)
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM", text, 0)
    return _STRICT.decode(text)


_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"})


def text_codec(charset: str) -> str:
    """The Python codec of a declared ``charset``, by its canonical name (``utf-8``, ``iso8859-1``,
    ``utf-16``). Raises LookupError for a name Python does not know, and for codecs that are not
    character sets (``rot13``, ``base64``, ``unicode_escape``)."""
    info = codecs.lookup(charset.strip().strip('"').strip())
    with contextlib.suppress(UnicodeError):  # a real charset that "xx" is not valid in
        b"xx".decode(info.name)  # LookupError for bytes-to-bytes and text-to-text codecs
    if info.name in _NOT_CHARSETS:
        raise LookupError(f"{charset!r} is not a character set")
    return info.name


UTF8_CODECS: Final = frozenset({"utf-8", "ascii"})


class BodyProcessor(Protocol):
    """How one body is read, whatever its format (``extproc.mask.registry`` chooses which): ``feed``
    returns what may be released now, ``finish`` the rest. What the exchange needs to know of the format
    is asked here, never of the processor's class."""

    @property
    def findings(self) -> list[Finding]: ...

    @property
    def held(self) -> int:
        """Characters a streamed body holds back right now (0 for bodies masked whole)."""

    @property
    def streaming(self) -> bool | None:
        """Whether the body is released as it is masked (True) or held whole until its end (False);
        None while its first bytes have not said which yet (``extproc.mask.sse.SniffedStream``)."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def cut(self) -> bytes:
        """The body ends here, early, after its headers went out: what is incomplete is dropped, and what
        may still go out (masked) is returned. Nothing is fed after a cut."""

    def terminal(self, error: Mapping[str, str]) -> bytes | None:
        """The last bytes of a body cut early, telling ``error`` in band as its format does (an SSE
        ``event: error``, an NDJSON line with ``"done": true``); None when the format has no way to say
        so (text, a JSON document): the stream is then reset."""


def error_event(error: Mapping[str, str]) -> bytes:
    """``error`` as the last server-sent event of a stream: ``event: error``, its JSON as data."""
    return b"event: error\ndata: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"


def error_line(error: Mapping[str, str]) -> bytes:
    """``error`` as the last line of an NDJSON stream, with ``"done": true`` as its last line has."""
    return json.dumps({**error, "done": True}, separators=(",", ":")).encode() + b"\n"


class _Buffered(ABC):
    """Holds the whole body up to ``limit`` bytes, then masks it at once.

    ``charset``: the codec the body is declared in (``text_codec``), None for UTF-8. Such a body is
    decoded strictly (bytes that do not decode raise ``undecodable``), and what is sent on is encoded
    back into it. It is also read as UTF-8, as a receiver that ignores the charset would read it: if
    the policy would mask anything in that reading, the body is refused with ``undecodable`` too."""

    def __init__(
        self,
        inspector: Inspector,
        limit: int,
        too_large: ExtProcError,
        *,
        charset: str | None = None,
        undecodable: ExtProcError | None = None,
    ) -> None:
        self._inspector = inspector
        self._limit = limit
        self._too_large = too_large
        self._charset = None if charset in UTF8_CODECS else charset
        self._undecodable = undecodable
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

    @property
    def streaming(self) -> bool:
        return False

    def cut(self) -> bytes:
        self._parts = []
        return b""

    def terminal(self, error: Mapping[str, str]) -> None:
        return None

    @abstractmethod
    def _mask(self, body: bytes) -> bytes:
        """The whole body, masked."""

    def _decode(self, body: bytes) -> str:
        if self._charset is None:
            return body.decode(ENCODING, ERRORS)
        try:
            return body.decode(self._charset)
        except UnicodeError as exc:
            raise self._cannot_decode() from exc

    def _encode(self, text: str) -> bytes:
        if self._charset is None:
            return text.encode(ENCODING, ERRORS)
        try:
            return text.encode(self._charset)
        except UnicodeError as exc:
            raise self._cannot_decode() from exc

    def _read_as_utf8(self, inspector: Inspector, out: bytes) -> bytes:
        """``out``, once checked as a receiver ignoring the declared charset would read it."""
        if self._charset is not None:
            view = out.decode(ENCODING, ERRORS)
            if inspector.mask_text(view)[0] != view:
                raise self._cannot_decode("reads differently as UTF-8")
        return out

    def _cannot_decode(self, why: str = "does not decode") -> ExtProcError:
        error = self._undecodable or self._too_large
        return type(error)(f"{error.message}: the body {why} as {self._charset}", code=error.code)

    def _mask_text(self, inspector: Inspector, body: bytes) -> bytes:
        masked, self.findings = inspector.mask_text(self._decode(body))
        out = self._encode(masked) if self.findings else body
        return self._read_as_utf8(inspector, out)


class BufferedText(_Buffered):
    def _mask(self, body: bytes) -> bytes:
        return self._mask_text(self._inspector, body)


class BufferedJson(_Buffered):
    """Masks every string value, key and long number of a JSON document; the document stays valid JSON.

    A body that is not JSON is refused with ``invalid``, unless ``as_text`` is set: then it is masked as
    plain text (a deployment whose clients send JSON-ish bodies that do not always parse). With ``sniff``
    (a text or untyped body), a body that parses as an object or an array is masked as JSON, as the
    receiver may parse it, and anything else as text. A document that is JSON only to a lenient reader
    (``JsonRejected``: duplicate keys, too deep) is refused with ``invalid`` in every case.

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
        sniff: bool = False,
        admit: Admit | None = None,
        charset: str | None = None,
        undecodable: ExtProcError | None = None,
    ) -> None:
        super().__init__(inspector, limit, too_large, charset=charset, undecodable=undecodable or invalid)
        self._invalid = invalid
        self._as_text = as_text
        self._sniff = sniff
        self._admit = admit

    def _mask(self, body: bytes) -> bytes:
        if not body.strip():
            if self._admit is not None:
                self._admit(None, len(body))
            return body
        try:
            document = loads_strict(body if self._charset is None else self._decode(body))
        except JsonRejected as exc:
            raise self._refused(exc) from exc
        except (ValueError, UnicodeDecodeError) as exc:
            if not (self._as_text or self._sniff):
                raise self._invalid from exc
            document = None
        if document is None or (self._sniff and not isinstance(document, dict | list)):
            inspector = self._admit(None, len(body))[0] if self._admit is not None else self._inspector
            return self._mask_text(inspector, body)
        inspector, rewritten = self._inspector, False
        if self._admit is not None:
            inspector, rewritten = self._admit(document, len(body))
        masker = JsonMasker(inspector, self.findings)
        masker.prime(document)
        try:
            masked = masker.value(document)
        except JsonRejected as exc:  # in JSON held in a string (tool arguments)
            raise self._refused(exc) from exc
        if masker.changed:  # what was masked alone is gone from the joined reading below
            refuse_across_strings(document, inspector, self.findings)
        # After each string is masked on its own: a false match across strings then meets replacement
        # tokens, never a value of one string it could cut short.
        joined = mask_across_strings(masked, inspector, self.findings)
        if not masker.changed and not rewritten and not joined:
            return self._read_as_utf8(inspector, body)
        if self._charset is None:
            return dump_json(masked).encode(ENCODING)
        return self._read_as_utf8(inspector, self._encode(dump_json(masked, ascii_only=True)))

    def _refused(self, exc: JsonRejected) -> ExtProcError:
        """``invalid``, saying why; a duplicate key is named as masked, and cut short."""
        reason = str(exc)
        if isinstance(exc, DuplicateKey):
            shown = self._inspector.mask_text(exc.key)[0]
            shown = shown if len(shown) <= 64 else shown[:64] + "..."
            reason = f"duplicate key {json.dumps(shown)}"
        return type(self._invalid)(f"{self._invalid.message}: {reason}", code=self._invalid.code)


class Admit(Protocol):
    def __call__(self, document: Any, size: int) -> tuple[Inspector, bool]: ...


_SURROGATE = re.compile("[\ud800-\udfff]")


def dump_json(node: Any, *, ascii_only: bool = False) -> str:
    """Compact JSON. A lone surrogate (``"\\ud800"`` is valid JSON, but no UTF-8 can carry it) keeps
    its escape, so the output always encodes. ``ascii_only``: every non-ASCII character escaped (for a
    body going out in another charset)."""
    if ascii_only:
        return json.dumps(node, ensure_ascii=True, separators=(",", ":"))
    text = json.dumps(node, ensure_ascii=False, separators=(",", ":"))
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return json.dumps(node, ensure_ascii=True, separators=(",", ":"))


# Values of these keys are labels, not text a reader runs together with the text around them: they stay
# out of the joined text, so a sender cannot break a value apart by putting a message's role between its
# halves.
JOIN_SKIP_KEYS: Final = frozenset(
    {"role", "type", "model", "object", "id", "tool_call_id", "index", "finish_reason", "system_fingerprint"}
)


def mask_across_strings(document: Any, inspector: Inspector, findings: list[Finding]) -> bool:
    """Find, and mask in place, what only the strings of ``document`` read together hold: a card in two
    content parts of one message, across two messages, or across the choices of an answer.

    Two readings: every string value (but the labels of ``JOIN_SKIP_KEYS``) in document order, then the
    strings of each key name apart (every ``content``, every ``text``...), so another field between two
    halves does not break a value apart. Strings are joined with nothing between, since a split can fall
    anywhere, even inside a group of digits. A value found across two or more strings is decided once;
    its replacement goes where its first piece was and its other pieces are removed. It runs on the
    document after every string was masked alone; a value inside one string that only the joined text
    reveals (its keyword in the string before) is masked in that string. A false match across strings
    needs the joined text to pass the rule and its validator (Luhn, checksums, entropy), and at worst
    masks a little more than needed. Returns whether anything changed; the findings (offsets in the
    joined text) are added."""
    leaves = _string_leaves(document)
    changed = _mask_joined(leaves, inspector, findings)
    groups: dict[Any, list[tuple[Any, Any]]] = {}
    for node, key in _string_leaves(document) if changed else leaves:
        groups.setdefault(key if isinstance(key, str) else None, []).append((node, key))
    for group in groups.values():
        if len(group) < len(leaves):  # a group of every string was read already
            changed = _mask_joined(group, inspector, findings) or changed
    return changed


def refuse_across_strings(document: Any, inspector: Inspector, findings: list[Finding]) -> None:
    """Raises what the policy refuses in the strings of ``document`` (as it came, unmasked) read
    together. ``mask_across_strings`` reads them after each string was masked alone, and a value masked
    there is gone from its reading: a rule only the joined text adds (the keyword in the message before)
    would never be heard, and a policy that blocks that rule would mask instead. Needed only when
    something was masked alone. Only a finding the policy refuses matters here; it is added to
    ``findings`` (offsets in the joined text) and nothing is recorded otherwise. Both readings of
    ``mask_across_strings`` are made; none when the policy refuses nothing at all."""
    if not inspector.masker.may_refuse:
        return
    leaves = _string_leaves(document)
    groups: dict[Any, list[tuple[Any, Any]]] = {}
    for node, key in leaves:
        groups.setdefault(key if isinstance(key, str) else None, []).append((node, key))
    for group in [leaves, *(g for g in groups.values() if len(g) < len(leaves))]:
        if len(group) < 2:
            continue
        for finding in inspector.detector.scan("".join(node[key] for node, key in group)):
            if inspector.masker.refuses(finding):
                findings.append(finding)
                inspector.masker.decide(finding)  # raises, with the decision recorded


def _string_leaves(document: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every non-empty string value but labels, in document order, without recursion."""
    leaves: list[tuple[Any, Any]] = []
    stack = [_members(document)]
    while stack:
        member = next(stack[-1], None)
        if member is None:
            stack.pop()
            continue
        node, key, value = member
        if isinstance(value, dict | list):
            stack.append(_members(value))
        elif isinstance(value, str) and value and key not in JOIN_SKIP_KEYS:
            leaves.append((node, key))
    return leaves


def _mask_joined(leaves: list[tuple[Any, Any]], inspector: Inspector, findings: list[Finding]) -> bool:
    if len(leaves) < 2:
        return False
    texts = [node[key] for node, key in leaves]
    starts = [0, *accumulate(len(text) for text in texts)]
    joined = "".join(texts)
    # What the strings read alone do not hold: values across strings, and values inside one string that
    # only its neighbours' words reveal (a keyword in the message before). A value its own string holds
    # was found there already (and is masked, or let through and counted once).
    alone: dict[int, dict[tuple[int, int], set[str]]] = {}  # per string: its findings' spans and rules
    crossing = []
    for f in inspector.detector.scan(joined):
        first = bisect.bisect_right(starts, f.start) - 1
        if first != bisect.bisect_left(starts, f.end) - 1:
            crossing.append(f)
            continue
        if first not in alone:
            alone[first] = {}
            for g in inspector.detector.scan(texts[first]):
                alone[first].setdefault((g.start, g.end), set()).update(g.rule_ids)
        # Found alone already, unless the joined text adds a rule (a keyword in the message before): a
        # policy acting on that rule must hear of the value.
        rules = alone[first].get((f.start - starts[first], f.end - starts[first]), set())
        if not rules.issuperset(f.rule_ids):
            crossing.append(f)
    edits: dict[int, list[tuple[int, int, str]]] = {}
    cursor = 0
    for finding in sorted(crossing, key=lambda f: (f.start, -f.end)):
        if finding.start < cursor:
            continue  # overlaps one already masked
        spec = inspector.masker.decide(finding)
        findings.append(finding)
        if spec is None:
            continue
        cursor = finding.end
        replacement = inspector.masker.replacement(finding, joined[finding.start : finding.end], spec)
        first = bisect.bisect_right(starts, finding.start) - 1
        last = bisect.bisect_left(starts, finding.end) - 1
        for leaf in range(first, last + 1):
            low = max(finding.start, starts[leaf]) - starts[leaf]
            high = min(finding.end, starts[leaf + 1]) - starts[leaf]
            edits.setdefault(leaf, []).append((low, high, replacement if leaf == first else ""))
    for leaf, spans in edits.items():
        node, key = leaves[leaf]
        text = texts[leaf]
        for low, high, replacement in sorted(spans, reverse=True):
            text = text[:low] + replacement + text[high:]
        node[key] = text
    return bool(edits)


def _members(node: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(container, key or index, value) of an object's or an array's members, in order."""
    if isinstance(node, dict):
        return ((node, key, value) for key, value in node.items())
    if isinstance(node, list):
        return ((node, index, value) for index, value in enumerate(node))
    return iter(())


_NO_KEYS: Final = frozenset[str]()


class JsonMasker:
    """Masks the string values, the keys and the long numbers of JSON documents, and collects the findings.

    A string that is itself a JSON document (tool-call arguments, tool results) is scanned as text and,
    when it holds escapes, also decoded (``loads_strict``, within what is left of ``MAX_JSON_DEPTH``) and
    walked: ``"jane\\u0040example.com"`` inside arguments is an e-mail address only once decoded. It is
    re-encoded only when that finds something more.

    A number whose integer part has ``LONG_NUMBER_DIGITS`` digits or more is scanned as its text; when
    that masks something, the number becomes the masked text, a JSON string. A masked key that collides
    with another key of its object is kept apart with a suffix (``[REDACTED:CREDIT_CARD]#2``): nothing
    is merged away, and nothing of the value shows.

    A value is scanned with its key as a label (``Detector.scan``): ``{"ssn": "594743681"}`` is a value
    named by its key, as ``ssn: 594743681`` would be in text, however far the key is from the value in
    the document. A string in an array, or JSON held in a string, has the key of the array or the
    string. A number under a key that names a value for some keyword rule is scanned whatever its
    length (``{"ssn": 594743681}``).

    Short strings found clean are remembered: a token stream repeats its id, model and role in every
    event, and scanning them once is enough. A string under such a key is not: it may be clean alone
    and a value under its key."""

    _CLEAN_MAX_CHARS = 256
    _CLEAN_MAX_ENTRIES = 4096

    def __init__(self, inspector: Inspector, findings: list[Finding] | None = None) -> None:
        self._inspector = inspector
        self.findings: list[Finding] = [] if findings is None else findings
        self.changed = False  # something was masked (a finding a policy allows changes nothing)
        self._clean: set[str] = set()
        self._primed: set[str] = set()  # the strings of the document ``prime`` found clean

    def prime(self, node: Any) -> None:
        """Finds, in one pass over all of them (``Detector.clean``), the keys and string values of
        ``node`` that hold nothing, so that masking it scans only the others: a chat request has dozens
        of short strings (roles, model, labels), each a whole scan otherwise. Long strings (the messages
        themselves, which mostly hold something a rule looks at) are scanned alone only, not twice; a
        string holding JSON with escapes is left to be decoded and read as it is today."""
        texts: list[str] = []
        stack = [node]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                if self._primable(item):
                    texts.append(item)
            elif isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, dict):
                texts.extend(key for key in item if self._primable(key))  # keys are strings too
                stack.extend(item.values())
        unique = list(dict.fromkeys(texts))
        for text, clean in zip(unique, self._inspector.detector.clean(unique), strict=True):
            if clean:
                self._primed.add(text)

    def _primable(self, text: str) -> bool:
        """Short, and not JSON with escapes (read by ``_nested`` once decoded, whatever the raw text
        holds): a key or a value alike."""
        return 0 < len(text) <= self._CLEAN_MAX_CHARS and not (
            "\\" in text and text.lstrip()[:1] in ("{", "[")
        )

    def value(self, node: Any, depth: int = 0, key: str | None = None) -> Any:
        """``node`` with every string value, key and long number masked. ``depth``: how deep ``node``
        sits in the document that holds it; ``key``: the key it is the value of, if any."""
        if isinstance(node, str):
            return self._string(node, depth, key)
        if isinstance(node, bool) or node is None:
            return node
        if isinstance(node, int | float):
            return self._number(node, key)
        if isinstance(node, list):
            return [self.value(item, depth + 1, key) for item in node]
        if isinstance(node, dict):
            return self._object(node, depth + 1)
        return node

    def fields(self, node: dict[str, Any], skip: frozenset[str]) -> bool:
        """Mask, in place, every key and value under ``node`` except the values of the keys in ``skip``
        (fields masked otherwise, or that are not text). Returns whether anything changed."""
        before = len(self.findings)
        for key, value in node.items():
            if key not in skip and value is not None and not isinstance(value, bool):
                node[key] = self.value(value, 1, key)
        keys = self._keys(node, 1, skip)
        if keys is not None:
            items = list(node.items())
            node.clear()
            node.update((keys[index], value) for index, (_, value) in enumerate(items))
        return len(self.findings) > before

    def keys_and_numbers(self, node: Any) -> tuple[Any, bool]:
        """``node`` with every object key and long number under it masked whole, in place, and whether
        anything was masked. String values are left alone: a token stream's strings go through its
        scanners, but nothing joins keys or numbers across events, and a receiver reads them too."""
        changed, self.changed = self.changed, False
        node = self._keys_and_numbers(node)
        masked, self.changed = self.changed, changed or self.changed
        return node, masked

    def _keys_and_numbers(self, node: Any, key: str | None = None) -> Any:
        if isinstance(node, bool) or node is None or isinstance(node, str):
            return node
        if isinstance(node, int | float):
            return self._number(node, key)
        if isinstance(node, list):
            for index, item in enumerate(node):
                if not (item is None or isinstance(item, str | bool)):  # those stay as they are
                    node[index] = self._keys_and_numbers(item, key)
        elif isinstance(node, dict):
            for name, value in node.items():
                if not (value is None or isinstance(value, str | bool)):
                    node[name] = self._keys_and_numbers(value, name)
            keys = self._keys(node, 1, _NO_KEYS)
            if keys is not None:
                values = list(node.values())
                node.clear()
                node.update(zip(keys, values, strict=True))
        return node

    def _object(self, node: dict[str, Any], depth: int) -> dict[str, Any]:
        values = [self.value(value, depth, key) for key, value in node.items()]
        keys = self._keys(node, depth, _NO_KEYS)
        return dict(zip(keys if keys is not None else node, values, strict=True))

    def _keys(self, node: dict[str, Any], depth: int, skip: frozenset[str]) -> list[str] | None:
        """The keys of ``node`` masked, in order, kept distinct; None when none changes."""
        clean, primed = self._clean, self._primed
        if all(key in clean or key in primed or key in skip for key in node):
            return None  # every key known clean (a token stream repeats the same keys in every event)
        masked = [key if key in skip else self._string(key, depth) for key in node]
        if masked == list(node):
            return None
        taken = {key for key, new in zip(node, masked, strict=True) if key == new}
        out: list[str] = []
        for key, new in zip(node, masked, strict=True):
            if key != new:
                candidate, suffix = new, 2
                while candidate in taken:
                    candidate, suffix = f"{new}#{suffix}", suffix + 1
                new = candidate
                taken.add(new)
            out.append(new)
        return out

    def _number(self, number: float, key: str | None = None) -> float | str:
        texts = [str(number)] if isinstance(number, int) else [repr(float(number))]
        if isinstance(number, JsonFloat) and number.literal not in texts:
            texts.insert(0, number.literal)
        label = key if key is not None and self._inspector.detector.label(key) else None
        for text in texts:
            if _LONG_INTEGER.match(text) or (label is not None and _INTEGER.match(text)):
                masked, found = self._inspector.mask_text(text, label)
                self.findings.extend(found)
                if masked != text:
                    self.changed = True
                    return masked
        return number

    def _string(self, text: str, depth: int = 0, key: str | None = None) -> str:
        label = key if key is not None and self._inspector.detector.label(key) else None
        if text in self._primed or (label is None and text in self._clean):
            return text
        masked, found = self._inspector.mask_text(text, label)
        self.findings.extend(found)
        if masked != text:
            self.changed = True
        if "\\" in masked and masked.lstrip()[:1] in ("{", "["):
            # Never remembered as clean: what it holds shows once decoded, and must be masked again
            # wherever the same string comes back (tool-call arguments repeated in a conversation).
            return self._nested(masked, depth, key)
        remember = label is None and len(text) <= self._CLEAN_MAX_CHARS
        if not found and remember and len(self._clean) < self._CLEAN_MAX_ENTRIES:
            self._clean.add(text)
        return masked

    def _nested(self, text: str, depth: int, key: str | None = None) -> str:
        try:
            inner = loads_strict(text, max_depth=max(MAX_JSON_DEPTH - depth, 0))
        except JsonRejected:
            raise
        except ValueError:
            return text
        if not isinstance(inner, dict | list):
            return text
        masked = self.value(inner, depth, key)
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

    @property
    def streaming(self) -> bool:
        return True

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

    def terminal(self, error: Mapping[str, str]) -> bytes:
        return error_event(error)

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

    @property
    def streaming(self) -> bool:
        return True

    def feed(self, data: bytes) -> bytes:
        self._size += len(data)
        if self._size > self._limit:
            self._masker.close()
            raise self._too_large
        return self._masker.feed(self._decoder.decode(data)).encode(ENCODING, ERRORS)

    def finish(self) -> bytes:
        text = self._decoder.decode(b"", final=True)
        return (self._masker.feed(text) + self._masker.finish()).encode(ENCODING, ERRORS)

    def cut(self) -> bytes:
        """What the scanner holds may be part of a value: it is dropped."""
        self._masker.close()
        return b""

    def terminal(self, error: Mapping[str, str]) -> None:
        return None  # plain text has no way to say it ends in error


class Passthrough:
    """For bodies that carry no model data (local replies generated by Envoy), and for a direction
    before its headers have chosen a processor: released as they come."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self.held = 0

    @property
    def streaming(self) -> bool:
        return True

    def feed(self, data: bytes) -> bytes:
        return data

    def finish(self) -> bytes:
        return b""

    def cut(self) -> bytes:
        return b""

    def terminal(self, error: Mapping[str, str]) -> None:
        return None
