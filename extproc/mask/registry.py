"""The one place that chooses how a body is read. Pure: no I/O, no protobuf.

The exchange asks once per direction, with the headers and the body mode, and gets back a ``Reading``
(the processor that masks the body and the decoder that undoes its content-encoding) or a ``Refused``
(the error that refuses a body that cannot be scanned, before any of it is read). What the exchange then
needs to know of the format, it asks the processor (``BodyProcessor``): whether the body is released as
it is masked (``streaming``), what may still go out when it is cut early (``cut``) and how its format
says so in band (``terminal``). A new body format is one reader in ``READERS`` and its processor.

The readers, per direction, first match wins:

| direction | media type | body mode | processor | size |
|---|---|---|---|---|
| request | JSON, text, none | any | ``BufferedJson``: token ids refused, then the policy's ``admit`` | body |
| request | NDJSON | any | ``NdjsonStream`` | body |
| response | ``text/event-stream`` | any | ``EventStream`` | stream |
| response | NDJSON | any | ``NdjsonStream`` | stream |
| response | JSON | any | ``BufferedJson``, per-token fields emptied | body |
| response | text, none | streamed | ``SniffedStream``: first bytes choose events, text or JSON | stream |
| response | text, none | buffered | ``BufferedJson`` | body |

JSON is ``application/json`` and ``application/*+json``. Text or no content type held whole is read as
JSON when it parses as an object or an array (as its receiver may read it), as text otherwise.

Anything else is refused (415 ``unsupported_media_type`` for a request, 502 ``upstream_unscannable``
for an answer), as is a charset Python does not know, or two different ones (readers would pick
different ones), and a charset other than UTF-8 on a body read as a stream (its processors read UTF-8
only). A body held whole is decoded from its declared charset. An unknown content-encoding is refused
last (415 ``unsupported_content_encoding``, 502).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extproc.errors import ClientError, ExtProcError, UpstreamError
from extproc.mask import Inspector
from extproc.mask.bodies import (
    UTF8_CODECS,
    Admit,
    BodyProcessor,
    BufferedJson,
    StreamingText,
    text_codec,
)
from extproc.mask.encoding import Decoder, UnsupportedEncoding, decoder_for, parse_content_encoding
from extproc.mask.ndjson import MEDIA_TYPES as NDJSON_MEDIA_TYPES
from extproc.mask.ndjson import NdjsonStream, SniffedJson
from extproc.mask.sse import EventStream, SniffedStream
from extproc.mask.tokens import refuse_token_input, strip_token_detail
from extproc.model import BodyMode, Direction, Headers

EVENT_STREAM = "text/event-stream"


def media_type(headers: Headers) -> str:
    """The content type without its parameters, lower-cased; ``""`` when there is none."""
    value = headers.get("content-type") or ""
    return value.split(";", 1)[0].strip().lower()


def declared_codec(headers: Headers) -> str | None:
    """The Python codec of the content type's ``charset`` parameter; None when there is none. Raises
    LookupError for an unknown charset, or for two that differ (readers would pick different ones)."""
    params = (headers.get("content-type") or "").split(";")[1:]
    names = {v.strip() for k, _, v in (p.partition("=") for p in params) if k.strip().lower() == "charset"}
    codecs = {text_codec(name) for name in names}
    if len(codecs) > 1:
        raise LookupError("more than one charset")
    return codecs.pop() if codecs else None


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def is_text(media: str) -> bool:
    """Text, or no content type at all: what a receiver may still parse as JSON or as events."""
    return media == "" or media.startswith("text/")


@dataclass(frozen=True, slots=True)
class BodyLimits:
    """Decoded sizes, in bytes."""

    body: int  # a body held whole
    stream: int  # a body read as a stream
    event: int  # one event or line of a stream


@dataclass(frozen=True, slots=True)
class Scope:
    """What one direction's processor is built with."""

    inspector: Inspector  # masks under the policy known from the headers
    limits: BodyLimits
    admit: Admit | None = None  # a request's parsed document goes through the policy's request rules
    json_as_text: bool = False  # a JSON body that does not parse is masked as text (detect.unparseable)


@dataclass(frozen=True, slots=True)
class Reading:
    """How a body is read: ``decoder`` undoes its content-encoding and stops it at its size limit,
    ``processor`` masks what it decodes."""

    processor: BodyProcessor
    decoder: Decoder


@dataclass(frozen=True, slots=True)
class Refused:
    """A body that cannot be scanned, refused before any of it is read."""

    error: ExtProcError


class _Words:
    """What each direction's refusals say: a request's are the client's fault (4xx), an answer's the
    upstream's (502)."""

    def __init__(self, direction: Direction) -> None:
        self.request = direction is Direction.REQUEST

    def too_large(self, limit: int) -> ExtProcError:
        if self.request:
            return ClientError(f"request body exceeds {limit} bytes", code="body_too_large")
        return UpstreamError(f"response body exceeds {limit} bytes", code="upstream_too_large")

    def event_too_large(self, limits: BodyLimits) -> ExtProcError:
        if self.request:  # a request is refused for its size, whatever its lines
            return self.too_large(limits.body)
        message = f"one event of the answer exceeds {limits.event} bytes"
        return UpstreamError(message, code="upstream_too_large")

    def invalid(self) -> ExtProcError:
        if self.request:
            return ClientError("request body is not valid JSON", code="invalid_json")
        return UpstreamError("response body is not valid JSON")

    def undecodable(self) -> ExtProcError:
        if self.request:
            return ClientError("request body cannot be read", code="invalid_body")
        return UpstreamError("response body cannot be read")

    def media(self, media: str) -> ExtProcError:
        if self.request:
            message = f"request content-type {media!r} cannot be scanned"
            return ClientError(message, code="unsupported_media_type")
        return UpstreamError(f"response content-type {media!r} cannot be scanned")

    def charset(self, exc: LookupError) -> ExtProcError:
        if self.request:
            return ClientError(f"request charset cannot be read ({exc})", code="unsupported_media_type")
        return UpstreamError(f"response charset cannot be read ({exc})")

    def streamed_charset(self, media: str, codec: str) -> ExtProcError:
        if self.request:
            return self.media(media)
        return UpstreamError(f"a streamed response in charset {codec} cannot be scanned")

    def encoding(self, exc: UnsupportedEncoding) -> ExtProcError:
        if self.request:
            return ClientError(str(exc), code="unsupported_content_encoding")
        return UpstreamError(str(exc))


_WORDS = {direction: _Words(direction) for direction in Direction}


@dataclass(frozen=True, slots=True)
class _Body:
    """What a reader builds from."""

    media: str
    mode: BodyMode
    charset: str | None  # a text_codec name; None: none declared
    scope: Scope
    words: _Words


@dataclass(frozen=True, slots=True)
class Reader:
    """One way to read a body: the bodies it takes (media type, body mode), whether it holds the body
    whole (then it is decoded from any charset and sized as a body) or reads it as a stream (UTF-8 only,
    sized as a stream), and how its processor is built."""

    name: str
    takes: Callable[[str, BodyMode], bool]
    whole: bool
    build: Callable[[_Body], BodyProcessor]


def _admit(body: _Body) -> Admit:
    """What a document held whole goes through before it is masked. A request: refused when it carries
    its prompt as token ids or embeddings, whatever the policy, then the policy's ``admit``. An answer:
    its per-token copies of the text and its token ids emptied (``extproc.mask.tokens``)."""
    scope = body.scope
    policy = scope.admit

    def request(document: Any, size: int) -> tuple[Inspector, bool]:
        refuse_token_input(document)
        return (scope.inspector, False) if policy is None else policy(document, size)

    def answer(document: Any, size: int) -> tuple[Inspector, bool]:
        return scope.inspector, document is not None and strip_token_detail(document)

    return request if body.words.request else answer


def _held_json(body: _Body) -> BodyProcessor:
    """A JSON document held whole. Text, or no content type, is read as JSON when it parses as an object
    or an array (as its receiver may read it), and as text otherwise."""
    scope, words = body.scope, body.words
    return BufferedJson(
        scope.inspector,
        scope.limits.body,
        words.too_large(scope.limits.body),
        words.invalid(),
        as_text=scope.json_as_text,
        sniff=is_text(body.media),
        admit=_admit(body),
        charset=body.charset,
        undecodable=words.undecodable(),
    )


def _lines(body: _Body) -> BodyProcessor:
    """NDJSON, masked as it streams. Its lines are not one document: a request is admitted on what its
    headers say."""
    scope = body.scope
    inspector = scope.inspector if scope.admit is None else scope.admit(None, 0)[0]
    words = body.words
    invalid = words.invalid() if words.request else None
    return NdjsonStream(inspector, scope.limits.event, words.event_too_large(scope.limits), invalid)


def _events(body: _Body) -> BodyProcessor:
    scope = body.scope
    return EventStream(scope.inspector, scope.limits.event, body.words.event_too_large(scope.limits))


def _sniffed(body: _Body) -> BodyProcessor:
    """A streamed answer served as text or untyped: framed as SSE, it is read as SSE whatever its content
    type says; starting like JSON, it is held whole and read as JSON (see ``SniffedStream``)."""
    scope, words = body.scope, body.words
    inspector, limits = scope.inspector, scope.limits
    return SniffedStream(
        lambda: EventStream(inspector, limits.event, words.event_too_large(limits)),
        lambda: StreamingText(inspector, limits.stream, words.too_large(limits.stream)),
        lambda: SniffedJson(
            inspector,
            limits.body,
            words.too_large(limits.body),
            words.invalid(),
            limits.event,
            admit=_admit(body),
        ),
        limits.event,
        words.event_too_large(limits),
        UpstreamError("a text answer holds a server-sent event data line"),
    )


def _json_or_text(media: str, mode: BodyMode) -> bool:
    return is_json(media) or is_text(media)


def _ndjson(media: str, mode: BodyMode) -> bool:
    return media in NDJSON_MEDIA_TYPES


def _event_stream(media: str, mode: BodyMode) -> bool:
    return media == EVENT_STREAM


def _json(media: str, mode: BodyMode) -> bool:
    return is_json(media)


def _streamed_text(media: str, mode: BodyMode) -> bool:
    return is_text(media) and mode is BodyMode.FULL_DUPLEX_STREAMED


def _text(media: str, mode: BodyMode) -> bool:
    return is_text(media)


HELD_JSON = Reader("held JSON", _json_or_text, whole=True, build=_held_json)
LINES = Reader("NDJSON lines", _ndjson, whole=False, build=_lines)

READERS: dict[Direction, tuple[Reader, ...]] = {
    Direction.REQUEST: (HELD_JSON, LINES),
    Direction.RESPONSE: (
        Reader("server-sent events", _event_stream, whole=False, build=_events),
        LINES,
        Reader("JSON answer", _json, whole=True, build=_held_json),
        Reader("sniffed stream", _streamed_text, whole=False, build=_sniffed),
        Reader("held text", _text, whole=True, build=_held_json),
    ),
}
"""The registry: per direction, the readers in the order they are tried."""


def reader_for(direction: Direction, media: str, mode: BodyMode) -> Reader | None:
    """The reader of a ``media`` body in ``direction`` and ``mode``; None when no reader takes it."""
    return next((reader for reader in READERS[direction] if reader.takes(media, mode)), None)


def choose(headers: Headers, mode: BodyMode, scope: Scope) -> Reading | Refused:
    """How the body that follows ``headers`` is read, or why it cannot be. Raises only what
    ``scope.admit`` raises (the policy refuses the request)."""
    direction = headers.direction
    words = _WORDS[direction]
    media = media_type(headers)
    reader = reader_for(direction, media, mode)
    try:
        charset = declared_codec(headers)
    except LookupError as exc:
        # A request names its charset before its media type, an answer after.
        if reader is not None or direction is Direction.REQUEST:
            return Refused(words.charset(exc))
        charset = None
    if reader is None:
        return Refused(words.media(media))
    if charset in UTF8_CODECS:
        charset = None
    if charset is not None and not reader.whole:
        return Refused(words.streamed_charset(media, charset))
    processor = reader.build(_Body(media, mode, charset, scope, words))
    limit = scope.limits.body if reader.whole else scope.limits.stream
    try:
        codings = parse_content_encoding(headers.get("content-encoding"))
        decoder = decoder_for(codings, limit, words.too_large(limit))
    except UnsupportedEncoding as exc:
        return Refused(words.encoding(exc))
    return Reading(processor, decoder)
