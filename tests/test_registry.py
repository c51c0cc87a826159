"""The body registry: what the headers and the body mode say in, a processor (or a refusal) out."""

import json
from typing import Any

import pytest

from extproc.errors import ExtProcError
from extproc.mask import Inspector
from extproc.mask.bodies import BodyProcessor, BufferedJson, Passthrough, StreamingText
from extproc.mask.ndjson import NdjsonStream, SniffedJson
from extproc.mask.registry import READERS, BodyLimits, Reading, Refused, Scope, choose
from extproc.mask.sse import EventStream, SniffedStream
from extproc.model import BodyMode, Direction, Headers

from .rules_fixture import inspector

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
FDS, BUFFERED = BodyMode.FULL_DUPLEX_STREAMED, BodyMode.BUFFERED
INSPECTOR = inspector()
LIMITS = BodyLimits(body=1000, stream=5000, event=300)
ERROR = {"error": "upstream_too_large", "message": "too large", "request_id": "r-1"}


def read(
    direction: Direction,
    content_type: str | None,
    mode: BodyMode = FDS,
    encoding: str | None = None,
    scope: Scope | None = None,
) -> Reading | Refused:
    items = [("content-type", content_type)] if content_type is not None else []
    if encoding is not None:
        items.append(("content-encoding", encoding))
    return choose(Headers(direction, tuple(items), False), mode, scope or Scope(INSPECTOR, LIMITS))


def processor(direction: Direction, content_type: str | None, mode: BodyMode = FDS) -> BodyProcessor:
    reading = read(direction, content_type, mode)
    assert isinstance(reading, Reading), reading
    return reading.processor


def refusal(direction: Direction, content_type: str | None, mode: BodyMode = FDS, **kw: Any) -> ExtProcError:
    refused = read(direction, content_type, mode, **kw)
    assert isinstance(refused, Refused), refused
    return refused.error


@pytest.mark.parametrize(
    ("direction", "content_type", "mode", "kind", "reason"),
    [
        (REQ, "application/json", BUFFERED, BufferedJson, "a JSON prompt is held whole"),
        (REQ, "application/vnd.api+json", BUFFERED, BufferedJson, "a +json type is JSON"),
        (REQ, "Application/JSON ; charset=UTF-8", BUFFERED, BufferedJson, "type and charset in any case"),
        (REQ, "text/plain", BUFFERED, BufferedJson, "text is read as JSON when it parses as such"),
        (REQ, None, BUFFERED, BufferedJson, "an untyped body likewise"),
        (REQ, "text/event-stream", BUFFERED, BufferedJson, "a request is never read as events"),
        (REQ, "application/json", FDS, BufferedJson, "a streamed request is held whole too"),
        (REQ, "application/json; charset=utf-16", BUFFERED, BufferedJson, "held whole: any charset"),
        (REQ, "application/x-ndjson", BUFFERED, NdjsonStream, "NDJSON lines"),
        (REQ, "application/jsonl", BUFFERED, NdjsonStream, "JSON lines is NDJSON"),
        (REQ, "application/x-ndjson; charset=ascii", BUFFERED, NdjsonStream, "ASCII is UTF-8"),
        (RESP, "text/event-stream", FDS, EventStream, "token events, masked as they stream"),
        (RESP, "text/event-stream; charset=utf-8", FDS, EventStream, "UTF-8 declared"),
        (RESP, "text/event-stream", BUFFERED, EventStream, "events buffered by Envoy are still events"),
        (RESP, "application/x-ndjson", FDS, NdjsonStream, "Ollama's streams"),
        (RESP, "application/ndjson", BUFFERED, NdjsonStream, "NDJSON, buffered"),
        (RESP, "application/json", FDS, BufferedJson, "a JSON answer is held whole"),
        (RESP, "application/problem+json", FDS, BufferedJson, "a +json answer too"),
        (RESP, "application/json; charset=utf-16", FDS, BufferedJson, "held whole: any charset"),
        (RESP, "text/plain", FDS, SniffedStream, "streamed text: its first bytes choose"),
        (RESP, "text/html", FDS, SniffedStream, "any text type"),
        (RESP, None, FDS, SniffedStream, "no content type at all"),
        (RESP, "text/plain", BUFFERED, BufferedJson, "buffered text: read as JSON when it is"),
        (RESP, "text/plain; charset=latin-1", BUFFERED, BufferedJson, "held whole: any charset"),
    ],
)
def test_each_body_is_read_by_one_processor(
    direction: Direction, content_type: str | None, mode: BodyMode, kind: type, reason: str
) -> None:
    assert type(processor(direction, content_type, mode)) is kind, reason


@pytest.mark.parametrize(
    ("direction", "content_type", "mode", "code", "status", "message", "reason"),
    [
        (
            *(REQ, "multipart/form-data; boundary=x", BUFFERED, "unsupported_media_type", 415),
            "request content-type 'multipart/form-data' cannot be scanned",
            "no reader takes it",
        ),
        (
            *(REQ, "text/plain; charset=klingon", BUFFERED, "unsupported_media_type", 415),
            "request charset cannot be read (unknown encoding: klingon)",
            "an unknown charset",
        ),
        (
            *(REQ, "text/plain; charset=utf-8; charset=utf-16", BUFFERED, "unsupported_media_type", 415),
            "request charset cannot be read (more than one charset)",
            "readers would pick different charsets",
        ),
        (
            *(REQ, "image/png; charset=klingon", BUFFERED, "unsupported_media_type", 415),
            "request charset cannot be read (unknown encoding: klingon)",
            "a request names its charset first",
        ),
        (
            *(REQ, "application/x-ndjson; charset=utf-16", BUFFERED, "unsupported_media_type", 415),
            "request content-type 'application/x-ndjson' cannot be scanned",
            "lines are read as UTF-8 only",
        ),
        (
            *(RESP, "image/png", FDS, "upstream_unscannable", 502),
            "response content-type 'image/png' cannot be scanned",
            "no reader takes it",
        ),
        (
            *(RESP, "image/png; charset=klingon", FDS, "upstream_unscannable", 502),
            "response content-type 'image/png' cannot be scanned",
            "an answer names its media type first",
        ),
        (
            *(RESP, "application/json; charset=unicode_escape", FDS, "upstream_unscannable", 502),
            "response charset cannot be read ('unicode_escape' is not a character set)",
            "a codec that is no charset",
        ),
        (
            *(RESP, "text/event-stream; charset=utf-16", FDS, "upstream_unscannable", 502),
            "a streamed response in charset utf-16 cannot be scanned",
            "events are read as UTF-8 only",
        ),
        (
            *(RESP, "text/event-stream; charset=utf-16", BUFFERED, "upstream_unscannable", 502),
            "a streamed response in charset utf-16 cannot be scanned",
            "also when Envoy buffers them",
        ),
        (
            *(RESP, "text/plain; charset=latin-1", FDS, "upstream_unscannable", 502),
            "a streamed response in charset iso8859-1 cannot be scanned",
            "streamed text is read as UTF-8 only",
        ),
    ],
)
def test_bodies_that_cannot_be_scanned_are_refused_before_they_are_read(
    direction: Direction,
    content_type: str,
    mode: BodyMode,
    code: str,
    status: int,
    message: str,
    reason: str,
) -> None:
    error = refusal(direction, content_type, mode)
    assert (error.code, error.http_status, error.message) == (code, status, message), reason


@pytest.mark.parametrize(
    ("direction", "code", "status"),
    [(REQ, "unsupported_content_encoding", 415), (RESP, "upstream_unscannable", 502)],
)
def test_an_unknown_content_encoding_is_refused(direction: Direction, code: str, status: int) -> None:
    error = refusal(direction, "application/json", encoding="compress")
    assert (error.code, error.http_status) == (code, status)
    assert "compress" in error.message


def test_a_known_content_encoding_gets_its_decoder() -> None:
    reading = read(RESP, "text/event-stream", encoding="gzip, identity, br")
    assert isinstance(reading, Reading)
    assert reading.decoder.codings == ["gzip", "br"]


@pytest.mark.parametrize(
    ("direction", "content_type", "mode", "limit", "message", "reason"),
    [
        (REQ, "application/json", BUFFERED, 1000, "request body exceeds 1000 bytes", "a request's size"),
        (REQ, "application/x-ndjson", FDS, 1000, "request body exceeds 1000 bytes", "also when streamed"),
        (RESP, "application/json", FDS, 1000, "response body exceeds 1000 bytes", "held whole"),
        (RESP, "text/plain", BUFFERED, 1000, "response body exceeds 1000 bytes", "held whole"),
        (RESP, "text/event-stream", FDS, 5000, "response body exceeds 5000 bytes", "a stream"),
        (RESP, "text/event-stream", BUFFERED, 5000, "response body exceeds 5000 bytes", "a stream, buffered"),
        (RESP, "application/x-ndjson", FDS, 5000, "response body exceeds 5000 bytes", "a stream"),
        (RESP, "text/plain", FDS, 5000, "response body exceeds 5000 bytes", "sniffed: may stream"),
    ],
)
def test_the_decoder_stops_a_body_at_its_readers_limit(
    direction: Direction, content_type: str, mode: BodyMode, limit: int, message: str, reason: str
) -> None:
    limits = BodyLimits(body=1000, stream=1000 if direction is REQ else 5000, event=300)
    reading = read(direction, content_type, mode, scope=Scope(INSPECTOR, limits))
    assert isinstance(reading, Reading)
    assert reading.decoder.feed(b"x" * limit) == b"x" * limit, reason
    with pytest.raises(ExtProcError) as raised:
        reading.decoder.feed(b"x")
    assert raised.value.message == message, reason


def test_a_request_is_admitted_when_its_body_is_parsed_and_a_line_stream_when_it_is_chosen() -> None:
    admitted: list[tuple[Any, int]] = []

    def admit(document: Any, size: int) -> tuple[Inspector, bool]:
        admitted.append((document, size))
        return INSPECTOR, False

    scope = Scope(INSPECTOR, BodyLimits(1000, 1000, 300), admit=admit)
    json_body = processor_of(read(REQ, "application/json", BUFFERED, scope=scope))
    assert admitted == []
    json_body.feed(b'{"model": "m"}')
    json_body.finish()
    assert admitted == [({"model": "m"}, 14)]
    admitted.clear()
    processor_of(read(REQ, "application/x-ndjson", BUFFERED, scope=scope))
    assert admitted == [(None, 0)]


def processor_of(chosen: Reading | Refused) -> BodyProcessor:
    assert isinstance(chosen, Reading), chosen
    return chosen.processor


def test_every_reader_is_named_and_a_direction_reads_nothing_twice() -> None:
    for readers in READERS.values():
        names = [reader.name for reader in readers]
        assert all(names)
        assert len(set(names)) == len(names)


# -- what the exchange asks a processor ------------------------------------------------------------


def sse_error(error: dict[str, str]) -> bytes:
    return b"event: error\ndata: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"


def ndjson_error(error: dict[str, str]) -> bytes:
    return json.dumps({**error, "done": True}, separators=(",", ":")).encode() + b"\n"


@pytest.mark.parametrize(
    ("content_type", "first", "streaming", "terminal", "reason"),
    [
        ("text/event-stream", b"", True, sse_error(ERROR), "events end with an error event"),
        ("application/x-ndjson", b"", True, ndjson_error(ERROR), "lines end with a done line"),
        ("application/json", b"", False, None, "a JSON document cannot say it in band"),
        ("text/plain", b"", None, None, "sniffed: nothing known before the first bytes"),
        ("text/plain", b"data: {}\n\n", True, sse_error(ERROR), "framed as events: an event stream"),
        ("text/plain", b'{"a": ', False, None, "starts like JSON: held whole"),
        ("text/plain", b"hello there\n", True, None, "plain text streams, and is reset when cut"),
    ],
)
def test_a_processor_says_whether_it_streams_and_how_it_ends_in_error(
    content_type: str, first: bytes, streaming: bool | None, terminal: bytes | None, reason: str
) -> None:
    body = processor(RESP, content_type)
    body.feed(first)
    assert body.streaming is streaming, reason
    assert body.terminal(ERROR) == terminal, reason


def test_a_cut_stream_releases_the_events_it_finished_and_drops_the_rest() -> None:
    body = processor(RESP, "text/plain")
    chunk = {"choices": [{"index": 0, "delta": {"content": "hello"}}]}
    out = body.feed(b"data: " + json.dumps(chunk).encode() + b'\n\ndata: {"choi')
    released = out + body.cut()
    assert released.count(b"data: ") == 1
    assert b"hello" in released


@pytest.mark.parametrize(
    "made",
    [
        lambda: BufferedJson(INSPECTOR, 100, ExtProcError("x"), ExtProcError("y")),
        lambda: SniffedJson(INSPECTOR, 100, ExtProcError("x"), ExtProcError("y"), 10),
        lambda: StreamingText(INSPECTOR, 100, ExtProcError("x")),
        Passthrough,
    ],
)
def test_bodies_with_no_error_framing_release_nothing_more_when_cut(made: Any) -> None:
    body: BodyProcessor = made()
    body.feed(b"card 4111 1111 1111")
    assert body.cut() == b""
    assert body.terminal(ERROR) is None
