"""Texts scanned across the events that carry them; each event held until every piece of it is released.

A token stream carries its texts a few characters per event, and the sender chooses how: which choice,
which index, which field. A receiver may assemble them one way (per choice, per block) or another (every
delta in order, as a naive client prints them). So each piece of text is fed to one or more *channels*:
a channel is one stream scanner over the concatenation, in arrival order, of the pieces fed to it, with
no separator. A dialect feeds a text delta both to the channel of the text it belongs to (a choice's
content, a tool call's arguments) and to the one *answer* channel every text delta of the stream feeds,
so a value split across choices, indexes or blocks is found as well as one split across events of one
text. Channels are never reset by the sender: a ``finish_reason`` or a new index opens or ends nothing;
they all finish with the stream. A ``JsonText`` channel reads its pieces as JSON text decoded
(tool-call arguments, ``extproc.mask.escapes``): its findings land on the raw pieces, from the start of
an escape to the end of one, and their replacements are written as JSON string content.

An event is held until every channel it fed has released the text of its pieces (what ``StreamScanner``
releases is settled: no later text can change a finding in it). A finding lands in every piece that holds
part of it: the first gets the whole replacement, the others lose their part, so a receiver joining the
pieces reads exactly one replacement. Findings are de-duplicated by where they land, so a value found by
two channels is counted (and put to the policy) once. Events go out in the order they came.

Joining without a separator can only create a match across two texts a receiver could also join: a false
match needs the end of one piece and the start of the next to form a value that passes the rule's
validator (Luhn, a checksum, a prefix with its length), and the cost of one is over-masking, never a leak.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from extproc.detect.engine import StreamScanner
from extproc.errors import ExtProcError
from extproc.mask import Inspector
from extproc.mask.escapes import JsonTextView, string_content
from extproc.model import Finding

ANSWER = ("answer",)  # the channel every text delta of a stream feeds
MAX_CHANNELS = 256  # a sender opening texts without end is refused, not given a scanner each


@dataclass(eq=False)
class Piece:
    text: str
    write: Callable[[str], None]
    event: HeldEvent
    serial: int
    waiting: int = 0  # channels that have not released all of it yet
    marks: list[tuple[int, int, str]] = field(default_factory=list)
    # Of a JSON text: the offsets (0 to its length) that fall inside an escape, where no mark may begin
    # or end, or half an escape would be left behind.
    inside: set[int] | None = None

    def final(self) -> str:
        """The text with every finding that lands in it masked; overlapping marks merge, keeping the first
        replacement of the group."""
        if not self.marks:
            return self.text
        ordered = sorted(self.marks, key=lambda m: (m[0], -m[1]))
        parts: list[str] = []
        cursor = 0
        index = 0
        while index < len(ordered):
            start, end, replacement = ordered[index]
            index += 1
            while index < len(ordered) and ordered[index][0] < end:
                end = max(end, ordered[index][1])
                replacement = replacement or ordered[index][2]
                index += 1
            start = max(start, cursor)
            if end <= cursor:
                continue
            parts.append(self.text[cursor:start])
            parts.append(replacement)
            cursor = end
        parts.append(self.text[cursor:])
        return "".join(parts)


class HeldEvent:
    """One event of the stream: its pieces, and how to write it out once they are all final."""

    def __init__(self, render: Callable[[HeldEvent], str]) -> None:
        self.render = render
        # Its pieces are not listed here: a piece names its event, and each naming the other would make
        # every event a reference cycle, freed only by the cycle collector.
        self.waiting = 0  # pieces not final yet
        self.sealed = False  # every piece has been added
        self.changed = False  # something in it was masked or rewritten
        # Writes, as the event goes out, what only then is final (a text repeating a streamed one); each
        # says whether it changed the event.
        self.fills: list[Callable[[], bool]] = []


@dataclass(frozen=True, slots=True)
class JsonText:
    """The key of a channel that reads its pieces as JSON text decoded (tool-call arguments): the
    scanner reads the view of ``extproc.mask.escapes``, findings land on the raw pieces, on whole
    escapes, and replacements are written as JSON string content."""

    key: Hashable


class _Channel:
    """One stream scanner over the pieces fed to it, in arrival order. Offsets (``fed``, the log, the
    findings ``flush`` returns) count characters of the pieces as they came. Pieces are added as events
    are read and fed to the scanner together (``flush``): what a scanner releases and finds does not
    depend on how its text is cut, and one feed costs about as much as one piece."""

    escape = False  # replacements are written as JSON string content

    def __init__(self, scanner: StreamScanner) -> None:
        self.scanner = scanner
        self.log: deque[tuple[int, Piece]] = deque()  # (offset, piece) added, not all released yet
        self.fed = 0  # characters added
        self.pending: list[str] = []  # added, not fed to the scanner yet

    def add(self, text: str) -> None:
        self.pending.append(text)
        self.fed += len(text)

    def flush(self) -> tuple[int, list[tuple[Finding, str]]]:
        """Feeds what was added; returns where what is released ends, and the findings released with
        their values."""
        text = "".join(self.pending)
        self.pending.clear()
        return self._released(*self.scanner.feed(text))

    def finish(self) -> tuple[int, list[tuple[Finding, str]]]:
        fed = self.flush()
        limit, found = self._released(*self.scanner.finish())
        return limit, fed[1] + found

    def _released(self, text: str, findings: list[Finding]) -> tuple[int, list[tuple[Finding, str]]]:
        limit = self.fed - self.scanner.held
        start = limit - len(text)
        return limit, [(f, text[f.start - start : f.end - start]) for f in findings]

    def fork(self) -> _Channel:
        """A channel fed what this one was fed, from now on apart (``StreamScanner.fork``); the pieces
        this one holds are held by both."""
        assert not self.pending, "a channel is forked once what was added to it is fed"
        twin = _Channel(self.scanner.fork())
        twin.log = deque(self.log)
        twin.fed = self.fed
        for _, piece in twin.log:
            piece.waiting += 1
        return twin


class _JsonTextChannel(_Channel):
    """The scanner reads the decoded view of the pieces; findings are mapped back to raw offsets.

    The pieces are decoded as they are added, and each learns where its escapes are (``Piece.inside``):
    the other channels it feeds read it as written, and a finding of theirs must not cut an escape
    (``_off_escapes``)."""

    escape = True

    def __init__(self, scanner: StreamScanner) -> None:
        super().__init__(scanner)
        self.view = JsonTextView()

    def add(self, text: str) -> None:
        self.pending.append(self.view.feed(text))
        self.fed += len(text)
        self._mark(self.fed - self.view.held)

    def flush(self) -> tuple[int, list[tuple[Finding, str]]]:
        text = "".join(self.pending)
        self.pending.clear()
        return self._mapped(*self.scanner.feed(text))

    def finish(self) -> tuple[int, list[tuple[Finding, str]]]:
        fed = self.flush()
        rest = self.scanner.feed(self.view.finish())
        self._mark(self.fed)
        end = self.scanner.finish()
        limit, found = self._mapped(rest[0] + end[0], rest[1] + end[1])
        return limit, fed[1] + found

    def _mark(self, decoded: int) -> None:
        """Tells the pieces where the escapes just decoded lie, and where the cut one after ``decoded``,
        not decoded yet, lies so far."""
        spans = self.view.escapes
        if decoded < self.fed:
            spans.append((decoded, self.fed + 1))
        for start, end in spans:
            for offset, piece in reversed(self.log):
                stop = offset + len(piece.text)
                if stop <= start:
                    break
                if piece.inside is None:
                    piece.inside = set()
                piece.inside.update(range(max(start + 1, offset) - offset, min(end - 1, stop) - offset + 1))
        spans.clear()

    def _mapped(self, text: str, findings: list[Finding]) -> tuple[int, list[tuple[Finding, str]]]:
        view = self.view
        limit = view.decoded - self.scanner.held
        start = limit - len(text)
        found = [
            (
                f.at(view.origin(f.start), view.origin(f.end)),
                text[f.start - start : f.end - start],
            )
            for f in findings
        ]
        raw_limit = view.origin(limit)
        view.forget(limit)
        return raw_limit, found


class Router:
    """Pieces in, through their channels; whole events out, in order, once every piece is final."""

    def __init__(self, inspector: Inspector, too_many: ExtProcError) -> None:
        self._inspector = inspector
        self._too_many = too_many
        self._channels: dict[Hashable, _Channel] = {}
        self._added: dict[Hashable, _Channel] = {}  # the channels with text not fed yet, in order
        self._queue: deque[HeldEvent] = deque()
        self._serial = itertools.count()
        # Where findings landed, and the rules that found them there.
        self._seen: dict[tuple[tuple[int, int, int], ...], set[str]] = {}
        self.findings: list[Finding] = []
        self.held = 0  # characters of pieces not final yet
        # While every text delta belongs to one text, the answer channel reads exactly what that text's
        # channel reads: it is that channel (same text, same findings, released together) until a piece
        # goes to one and not the other, when it becomes a channel of its own (``_Channel.fork``). A
        # one-choice token stream, by far the most common, is then scanned once instead of twice.
        self._twin: Hashable | None = None
        # A verdict refused a finding (it raised): the stream ends, and nothing it held goes out. Findings
        # released with the refused one, and the refused value's own pieces, were never marked.
        self._refused = False

    def event(self, render: Callable[[HeldEvent], str]) -> HeldEvent:
        held = HeldEvent(render)
        self._queue.append(held)
        return held

    def piece(
        self, event: HeldEvent, text: str, write: Callable[[str], None], channels: Iterable[Hashable]
    ) -> None:
        """Adds ``text`` to each channel, fed at the next ``flush``; ``write`` gets its final text once
        all have released it."""
        if not text:
            return
        piece = Piece(text, write, event, next(self._serial))
        keys = self._untwinned(list(dict.fromkeys(channels)))
        piece.waiting = len(keys)
        event.waiting += 1
        self.held += len(text)
        for key in keys:
            channel = self._channels.get(key)
            if channel is None:
                if len(self._channels) + (self._twin is not None) >= MAX_CHANNELS:  # a twin counts
                    raise self._too_many
                kind = _JsonTextChannel if isinstance(key, JsonText) else _Channel
                channel = self._channels[key] = kind(self._inspector.detector.stream(_label(key)))
            channel.log.append((channel.fed, piece))
            channel.add(text)
            self._added[key] = channel

    def _untwinned(self, keys: list[Hashable]) -> list[Hashable]:
        """The channels a piece for ``keys`` is fed to: the answer channel's twin stands for it; a piece
        for one of the two and not the other gives the answer channel a scanner of its own first."""
        twin = self._twin
        if twin is None:
            if ANSWER in keys and not self._channels and len(keys) == 2:
                other = keys[0] if keys[1] == ANSWER else keys[1]
                if not isinstance(other, JsonText):  # reads a decoded view: not the answer's text
                    self._twin = other
                    return [other]
            return keys
        if ANSWER in keys and twin in keys and len(keys) == 2:
            return [twin]
        if ANSWER in keys or twin in keys:
            channel = self._channels[twin]
            if self._added.pop(twin, None) is not None:
                self._released(channel, *channel.flush())
            self._channels[ANSWER] = channel.fork()
            self._twin = None
        return keys

    def seal(self, event: HeldEvent) -> None:
        """No more pieces for ``event``."""
        event.sealed = True

    def flush(self) -> list[HeldEvent]:
        """Feeds every channel what was added to it since the last flush (the pieces of every event read
        from one body chunk: a stream that comes faster than the events are read is scanned in fewer,
        longer feeds); returns the events now ready, in order."""
        added, self._added = self._added, {}
        for channel in added.values():
            self._released(channel, *channel.flush())
        return self._ready()

    def finish(self) -> list[HeldEvent]:
        """The stream ends: every channel releases all it holds; every event is ready. After a refused
        finding, nothing more is ready: what was held is dropped, never released unmasked."""
        if self._refused:
            self.close()
            self._queue.clear()
            return []
        self._added.clear()  # finish feeds what each channel still has
        for channel in self._channels.values():
            self._released(channel, *channel.finish())
        self._channels.clear()
        return self._ready()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.scanner.close()
        self._channels.clear()
        self._added.clear()

    def _released(self, channel: _Channel, limit: int, findings: list[tuple[Finding, str]]) -> None:
        for finding, value in findings:
            self._land(channel, finding, value)
        while channel.log:
            offset, piece = channel.log[0]
            if offset + len(piece.text) > limit:
                break
            channel.log.popleft()
            piece.waiting -= 1
            if piece.waiting == 0:
                piece.write(piece.final())
                if piece.marks:
                    piece.event.changed = True
                piece.event.waiting -= 1
                self.held -= len(piece.text)

    def _land(self, channel: _Channel, finding: Finding, value: str) -> None:
        spans: list[tuple[Piece, int, int]] = []
        for offset, piece in channel.log:
            if offset >= finding.end:
                break
            end = offset + len(piece.text)
            if end > finding.start:
                spans.append((piece, max(finding.start, offset) - offset, min(finding.end, end) - offset))
        if not channel.escape:
            spans = _off_escapes(spans)
            if not spans:
                return  # wholly inside escapes: no reader reads it so, and the decoded view is read
        # A value another channel landed here already is counted and decided once, unless this channel
        # found it by a rule that one did not (a keyword only the joined text holds): a policy acting on
        # that rule must hear of it.
        where = tuple((p.serial, s, e) for p, s, e in spans)
        seen = self._seen.setdefault(where, set())
        if seen.issuperset(finding.rule_ids):
            return
        seen.update(finding.rule_ids)
        self.findings.append(finding)
        try:
            replacement = self._inspector.masker.apply(value, [finding.at(0, len(value))])
        except BaseException:
            self._refused = True
            raise
        if replacement == value:  # the policy lets it through
            return
        if channel.escape:
            replacement = string_content(replacement)
        for number, (piece, start, end) in enumerate(spans):
            piece.marks.append((start, end, replacement if number == 0 else ""))

    def _ready(self) -> list[HeldEvent]:
        ready: list[HeldEvent] = []
        while self._queue and self._queue[0].sealed and self._queue[0].waiting == 0:
            ready.append(self._queue.popleft())
        return ready


def _off_escapes(spans: list[tuple[Piece, int, int]]) -> list[tuple[Piece, int, int]]:
    """A finding read on a JSON text as written, narrowed to begin and end between escapes. The text is
    also read decoded, where every character an escape stands for is found whole; here, a match that
    takes in the last hex digit of ``\\u00e9`` would otherwise be masked with the first five left behind,
    and the text would no longer parse."""
    if not any(piece.inside for piece, _, _ in spans):
        return spans
    spans = list(spans)
    while spans:
        piece, start, end = spans[0]
        inside = piece.inside or set()
        while start < end and start in inside:
            start += 1
        if start < end:
            spans[0] = (piece, start, end)
            break
        spans.pop(0)
    while spans:
        piece, start, end = spans[-1]
        inside = piece.inside or set()
        while end > start and end in inside:
            end -= 1
        if end > start:
            spans[-1] = (piece, start, end)
            break
        spans.pop()
    return spans


def _label(channel: Hashable) -> str | None:
    """The key a field channel's text is the value of (its path's last key), a label for keyword rules."""
    if isinstance(channel, tuple) and len(channel) == 2 and channel[0] == "path":
        path = channel[1]
        if isinstance(path, tuple) and path and isinstance(path[-1], str):
            return path[-1]
    return None


class _Values(Protocol):
    def value(self, node: Any, depth: int = 0, key: str | None = None) -> Any: ...


class EventFields:
    """How the fields of one event or line are fed, shared by the SSE and NDJSON readers: a known value
    masked whole (``_whole``), or a field the dialect does not know scanned across events, by its path
    and with all the answer's text (``_residual``)."""

    _router: Router
    _json: _Values

    def _whole(self, held: HeldEvent, node: Any, key: Any) -> None:
        """A known value no receiver joins across events: every string in it masked whole."""
        value = node[key]
        if isinstance(value, str | list | dict):
            masked = self._json.value(value, 0, key if isinstance(key, str) else None)
            if masked != value:
                node[key] = masked
                held.changed = True

    def _residual(self, held: HeldEvent, node: Any, key: Any, path: tuple[Any, ...]) -> None:
        """A field the dialect does not know: scanned across events, by path and all joined."""
        value = node[key]
        if isinstance(value, str):
            channels = (("path", path),)
            self._router.piece(held, value, lambda final: node.__setitem__(key, final), channels)
        elif isinstance(value, dict):
            for inner in list(value):
                self._residual(held, value, inner, (*path, inner))
        elif isinstance(value, list):
            for position in range(len(value)):
                self._residual(held, value, position, path)
