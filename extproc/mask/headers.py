"""Headers and the URL: every header a receiver reads, scanned as it reads it, masked in place.

Pure: header pairs in, findings and the header changes that mask them out; no I/O, no protobuf.

- **What is read.** Every header of one name is scanned with its values joined with ``", "``, as an
  HTTP receiver combines repeated fields (RFC 9110, 5.3), and, when it repeats, joined with nothing and
  with a space, as a reader reassembling pieces would: a value split across ``x-a: 4111 1111`` and
  ``x-a: 1111 1111`` is found whole and masked in each piece (the replacement in the first). Only values
  of one header are joined, so no match pairs text of two different headers. A name is
  scanned too: ``x-<card>: 1`` is a channel. Headers the caller says to skip (its credential, removed
  anyway) are not scanned, nor are ``:method``, ``:scheme`` and ``:status``, which Envoy validates.
- **Percent-encoding.** Each value is scanned as sent and percent-decoded once (as a server reads a
  URL), then once more (a value encoded twice for a receiver that decodes twice): ``%34%31...`` and
  ``%2534%2531...`` are found. A third layer is not decoded: work stays bounded and a receiver that
  decodes three times is its own channel. In URLs (``:path``, ``location``, ...) ``+`` in the query is a
  space. A finding in a decoded view is masked on the exact span of the raw text it came from, and in a
  URL the replacement is itself percent-encoded.
- **What cannot be masked.** Some headers cannot be rewritten (Envoy refuses to set ``host``,
  ``:authority`` and ``x-envoy-*``) or would change the message's meaning if they were
  (``content-type``, ``content-length``, ...). A finding there that the policy would mask raises
  ``HeaderNotMaskable``: the exchange refuses instead. A header whose *name* holds a finding is removed.
  In headers that name addresses (``:authority``, ``x-forwarded-for``, ...) an IP address is what the
  header is for and is not reported; anything else in them is.
- **Bounded work.** Headers over ``MAX_HEADER_CHARS`` in all raise ``HeadersTooLarge`` before any scan
  (Envoy's own limit, ``max_request_headers_kb``, is 60 KiB by default); each view is one linear pass.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

from extproc.detect.engine import Detector
from extproc.detect.rules import MaskSpec
from extproc.mask import Masker, Verdicts
from extproc.model import Finding, HeaderChanges

MAX_HEADER_CHARS = 256 * 1024
JOIN = ", "
# Pseudo-headers Envoy validates and that cannot carry data.
NO_DATA = frozenset({":method", ":scheme", ":status"})
# Headers whose value is a URL: percent-decoded, with "+" as a space in the query.
URLS = frozenset({":path", "location", "content-location", "referer", "origin", "link"})
# Envoy refuses to set these (without mutation_rules allowing it): a finding there cannot be masked.
UNSETTABLE = frozenset({":authority", "host", ":method", ":scheme", ":status"})
UNSETTABLE_PREFIX = "x-envoy-"
# Rewriting these changes how the message is framed or read: a finding there is refused, not masked.
MEANINGFUL = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "te",
        "connection",
        "upgrade",
        "expect",
    }
)
# Headers that name network addresses: an IP address there is the address, not data hidden in it (the
# sidecar's own address in :authority, the client's in x-forwarded-for). Every other entity still counts.
ADDRESS_HEADERS = frozenset(
    {":authority", "host", "x-forwarded-for", "x-real-ip", "x-envoy-external-address", "forwarded", "via"}
)
ADDRESS_ENTITIES = frozenset({"IP_ADDRESS"})
_HEX = frozenset("0123456789abcdefABCDEF")


class HeaderNotMaskable(Exception):
    """A finding the policy masks is in a header that cannot be rewritten. ``header`` is safe to show:
    it is one of the fixed names above (or ``x-envoy-*``), never a name chosen by the sender."""

    def __init__(self, header: str) -> None:
        super().__init__(f"a value in header {header!r} cannot be masked there")
        self.header = header


class HeadersTooLarge(Exception):
    """The headers are over ``MAX_HEADER_CHARS``; nothing was scanned."""


@dataclass
class HeaderScan:
    """What the headers of one message came to: findings (offsets in the header's joined raw value, or in
    its name), each with the verdict action applied, and the changes that mask them."""

    findings: list[Finding] = field(default_factory=list)
    applied: list[tuple[Finding, str]] = field(default_factory=list)
    set: list[tuple[str, str]] = field(default_factory=list)
    append: list[tuple[str, str]] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)

    @property
    def changes(self) -> HeaderChanges:
        return HeaderChanges(set=tuple(self.set), remove=tuple(self.remove), append=tuple(self.append))


def settable(name: str) -> bool:
    return name not in UNSETTABLE and not name.startswith(UNSETTABLE_PREFIX) and name not in MEANINGFUL


def _shown(name: str) -> str:
    return UNSETTABLE_PREFIX + "*" if name.startswith(UNSETTABLE_PREFIX) else name


def percent_view(text: str, plus_from: int | None = None) -> tuple[str, list[int]]:
    """``text`` percent-decoded once (bytes decoded as UTF-8, invalid ones kept as surrogate escapes),
    and where each decoded character starts in ``text`` (one entry more: ``len(text)``). From index
    ``plus_from`` on, ``+`` is a space (a query string)."""
    data = bytearray()
    starts: list[int] = []
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char == "%" and index + 2 < length and text[index + 1] in _HEX and text[index + 2] in _HEX:
            data.append(int(text[index + 1 : index + 3], 16))
            starts.append(index)
            index += 3
            continue
        if char == "+" and plus_from is not None and index >= plus_from:
            encoded = b" "
        else:
            encoded = char.encode("utf-8", "surrogateescape")
        data += encoded
        starts.extend([index] * len(encoded))
        index += 1
    decoded = data.decode("utf-8", "surrogateescape")
    positions: list[int] = []
    offset = 0
    for char in decoded:
        positions.append(starts[offset])
        offset += len(char.encode("utf-8", "surrogateescape"))
    positions.append(length)
    return decoded, positions


def _views(raw: str, url: bool) -> list[tuple[str, list[int] | None]]:
    """The texts a receiver may read in ``raw``: as sent, decoded once, decoded twice (each only when it
    differs), with a map from each view's character offsets to ``raw``'s (None: the identity)."""
    views: list[tuple[str, list[int] | None]] = [(raw, None)]
    plus_from = (raw.find("?") if "?" in raw else None) if url else None
    if "%" not in raw and (plus_from is None or "+" not in raw[plus_from:]):
        return views
    once, first = percent_view(raw, plus_from)
    if once == raw:
        return views
    views.append((once, first))
    if "%" in once:
        twice, second = percent_view(once)
        if twice != once:
            views.append((twice, [first[i] for i in second]))
    return views


def scan_headers(
    items: Iterable[tuple[str, str]],
    detector: Detector,
    masker: Masker,
    verdicts: Verdicts,
    *,
    skip: Collection[str] = (),
    into: HeaderScan | None = None,
) -> HeaderScan:
    """Scan and mask the headers ``items`` (lower-case names, in order). ``verdicts`` decides each
    finding: mask, allow, or refuse by raising (``PolicyDenied``). Raises HeaderNotMaskable and
    HeadersTooLarge. ``into`` is filled as the scan goes, so what was found before a refusal is known."""
    grouped: dict[str, list[str]] = {}
    total = 0
    for name, value in items:
        total += len(name) + len(value)
        grouped.setdefault(name, []).append(value)
    if total > MAX_HEADER_CHARS:
        raise HeadersTooLarge(f"headers of {total} characters exceed {MAX_HEADER_CHARS}")
    scan = into if into is not None else HeaderScan()
    read = {name: _readings(name, values) for name, values in grouped.items() if name not in skip}
    read = {name: readings for name, readings in read.items() if name not in NO_DATA}
    texts = list(
        dict.fromkeys(text for readings in read.values() for _, _, views in readings for text, _ in views)
    )
    names = [name for name in read if not name.startswith(":")]
    reader = _Reader(detector, [*names, *texts])
    for name, readings in read.items():
        if not name.startswith(":"):
            _scan_name(name, reader, verdicts, scan)
            if name in scan.remove:
                continue
        _scan_values(name, grouped[name], readings, reader, masker, verdicts, scan)
    return scan


_BATCH_MAX_CHARS = 256  # longer header values (tokens, cookies) are scanned alone, never batched
KNOWN_CLEAN_MAX = 2048  # short texts remembered as clean, per detector


class KnownClean:
    """The short texts (``_BATCH_MAX_CHARS`` at most) one detector found nothing in, remembered: the
    headers of one deployment repeat (names, the route, the host, content types, the server), and each
    costs a pass or a scan per message otherwise. Only clean texts are kept, keyed by the text itself:
    a remembered text is one ``Detector.scan`` returned nothing for, exactly, and no value the rules
    found stays in memory. Bounded: full, it starts over (a sender of ever new values gets the cost of
    no memory, not more). A reload builds a new detector, and with it a new memory."""

    __slots__ = ("_texts",)

    def __init__(self) -> None:
        self._texts: dict[str, None] = {}

    def __contains__(self, text: str) -> bool:
        return text in self._texts

    def add(self, text: str) -> None:
        if len(text) > _BATCH_MAX_CHARS:
            return
        texts = self._texts
        if len(texts) >= KNOWN_CLEAN_MAX:
            texts.clear()
        texts[text] = None


_KNOWN: weakref.WeakKeyDictionary[Detector, KnownClean] = weakref.WeakKeyDictionary()


def _memory(memories: weakref.WeakKeyDictionary[Detector, KnownClean], detector: Detector) -> KnownClean:
    """``detector``'s memory in ``memories`` (made on first use, gone with the detector)."""
    known = memories.get(detector)
    if known is None:
        known = memories[detector] = KnownClean()
    return known


def known_clean(detector: Detector) -> KnownClean:
    """``detector``'s memory of clean short texts."""
    return _memory(_KNOWN, detector)


def scan_short(detector: Detector, text: str) -> list[Finding]:
    """``detector.scan(text)``, answered from the memory of clean texts when ``text`` is in it."""
    known = known_clean(detector)
    if text in known:
        return []
    findings = detector.scan(text)
    if not findings:
        known.add(text)
    return findings


class _Reader:
    """``Detector.scan`` for the texts of one set of headers, skipping those known clean (``KnownClean``)
    and those one pass over all the others found clean (``Detector.clean``): most header values hold
    nothing. Only short texts go into the pass: it hears every position of a base64 run, which for a
    long value costs more than its scan. ``address`` reads a text of a header that names addresses
    (``ADDRESS_HEADERS``), where an IP address is not a finding: a text that holds nothing else is
    remembered apart, as clean there."""

    def __init__(self, detector: Detector, texts: list[str]) -> None:
        self._detector = detector
        self._known = known = known_clean(detector)
        self._addresses = addresses = _known_addresses(detector)
        # A text remembered clean in an address header is not clean anywhere else (it holds an address):
        # the pass would not clear it.
        short = [
            text
            for text in texts
            if len(text) <= _BATCH_MAX_CHARS and text not in known and text not in addresses
        ]
        if short:
            for text, clean in zip(short, detector.clean(short), strict=True):
                if clean:
                    known.add(text)

    def scan(self, text: str) -> list[Finding]:
        if text in self._known:
            return []
        findings = self._detector.scan(text)
        if not findings:
            self._known.add(text)
        return findings

    def address(self, text: str) -> list[Finding]:
        if text in self._addresses:
            return []
        findings = [f for f in self.scan(text) if f.entity not in ADDRESS_ENTITIES]
        if not findings:
            self._addresses.add(text)
        return findings


_ADDRESSES: weakref.WeakKeyDictionary[Detector, KnownClean] = weakref.WeakKeyDictionary()


def _known_addresses(detector: Detector) -> KnownClean:
    """``detector``'s memory of texts clean in a header that names addresses."""
    return _memory(_ADDRESSES, detector)


# One reading of a header's values: the separator they are joined with, where each value starts in that
# join, and the views of the join (as sent, percent-decoded once and twice), with their offset maps.
_Reading = tuple[str, list[int], list[tuple[str, list[int] | None]]]


def _readings(name: str, values: list[str]) -> list[_Reading]:
    url = name in URLS
    readings: list[_Reading] = []
    for separator in (JOIN, "", " ") if len(values) > 1 else (JOIN,):
        starts = []
        offset = 0
        for value in values:
            starts.append(offset)
            offset += len(value) + len(separator)
        readings.append((separator, starts, _views(separator.join(values), url)))
    return readings


def _scan_name(name: str, reader: _Reader, verdicts: Verdicts, scan: HeaderScan) -> None:
    masked = False
    for finding in reader.scan(name):
        scan.findings.append(finding)
        action = verdicts.verdict(finding).action
        scan.applied.append((finding, action))
        masked = masked or action == "mask"
    if masked:
        if name in UNSETTABLE or name.startswith(UNSETTABLE_PREFIX) or name in MEANINGFUL:
            raise HeaderNotMaskable(_shown(name))
        scan.remove.append(name)


def _scan_values(
    name: str,
    values: list[str],
    readings: list[_Reading],
    reader: _Reader,
    masker: Masker,
    verdicts: Verdicts,
    scan: HeaderScan,
) -> None:
    url = name in URLS
    address = name in ADDRESS_HEADERS
    # (rules, raw span) -> finding, value as read. One value read in several views is decided once per
    # set of rules that found it: a view that adds a rule puts the value to the policy under it too.
    found: dict[tuple[tuple[str, ...], int, int], tuple[Finding, str]] = {}
    for separator, starts, views in readings:
        shift = len(JOIN) - len(separator)
        for text, positions in views:
            for finding in reader.address(text) if address else reader.scan(text):
                start = finding.start if positions is None else positions[finding.start]
                end = finding.end if positions is None else positions[finding.end]
                start, end = _canonical(starts, shift, start, False), _canonical(starts, shift, end, True)
                key = (finding.rule_ids, start, end)
                if end > start and key not in found:
                    raw = finding.at(start, end)
                    found[key] = (raw, text[finding.start : finding.end])
    if not found:
        return
    kept: list[tuple[Finding, str, MaskSpec | None]] = []
    for raw, value in sorted(found.values(), key=lambda pair: (pair[0].start, -pair[0].end)):
        scan.findings.append(raw)
        verdict = verdicts.verdict(raw)
        scan.applied.append((raw, verdict.action))
        if verdict.action == "mask":
            kept.append((raw, value, verdict.strategy))
    if not kept:
        return
    if not settable(name):
        raise HeaderNotMaskable(_shown(name))
    masked = _mask(values, kept, masker, url)
    if masked == values:
        return
    scan.set.append((name, masked[0]))
    scan.append.extend((name, value) for value in masked[1:])


def _canonical(starts: list[int], shift: int, position: int, end: bool) -> int:
    """An offset in a join whose values start at ``starts``, as an offset in the ``JOIN`` join (where
    findings are masked); ``shift``: how much longer ``JOIN`` is than that join's separator."""
    index = (bisect_left if end else bisect_right)(starts, position) - 1
    return position + max(index, 0) * shift


def _mask(
    values: list[str], kept: list[tuple[Finding, str, MaskSpec | None]], masker: Masker, url: bool
) -> list[str]:
    """``values`` with the spans of ``kept`` (offsets in their join) masked. Overlapping spans merge and
    take the first finding's replacement; a span across values leaves its replacement in the first."""
    bounds: list[tuple[int, int]] = []
    offset = 0
    for value in values:
        bounds.append((offset, offset + len(value)))
        offset += len(value) + len(JOIN)
    spans: list[tuple[int, int, str]] = []
    for finding, value, strategy in kept:
        if spans and finding.start < spans[-1][1]:
            start, end, replacement = spans[-1]
            spans[-1] = (start, max(end, finding.end), replacement)
            continue
        replacement = masker.replacement(finding, value, strategy)
        spans.append((finding.start, finding.end, quote(replacement, safe="*") if url else replacement))
    first_touched = {
        index: next((k for k, (low, high) in enumerate(bounds) if span[1] > low and span[0] < high), -1)
        for index, span in enumerate(spans)
    }
    out: list[str] = []
    for position, (value, (low, high)) in enumerate(zip(values, bounds, strict=True)):
        parts: list[str] = []
        cursor = low
        for index, (start, end, replacement) in enumerate(spans):
            if end <= low or start >= high:
                continue
            if start > cursor:
                parts.append(value[cursor - low : start - low])
            if first_touched[index] == position:
                parts.append(replacement)
            cursor = max(cursor, min(end, high))
        parts.append(value[cursor - low :])
        out.append("".join(parts))
    return out
