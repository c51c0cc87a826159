"""Hostile and broken bodies through the exchange, in process, as the server drives it: headers, then the
body in the chunks Envoy would send. For any input the only outcomes are the documented refusal, an
error the format says in band (a stream whose headers already left), a reset (an ``ExtProcError``
raised: the server aborts the stream), or output that parses as what it claims to be and holds no
planted value in clear. Each example ends within a wall-clock bound; nothing but the project's errors
is ever raised."""

import contextlib
import gzip
import json
import signal
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import brotli
import pytest
from backports import zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.errors import HTTP_STATUS, ExtProcError
from extproc.exchange import Exchange
from extproc.mask.bodies import loads_strict
from extproc.model import (
    Body,
    BodyMode,
    ContinueHeaders,
    Direction,
    Headers,
    ProtocolConfig,
    Reject,
    ReplaceBody,
    Reply,
    StreamChunk,
)
from extproc.runtime import build_snapshot
from extproc.settings import load_settings

from .rules_fixture import EDM_KEY_FILE, PLAIN_POLICIES, RULES

pytestmark = pytest.mark.unit

KIB = 1024
REQUEST_LIMIT = 64 * KIB
RESPONSE_LIMIT = 64 * KIB
STREAM_LIMIT = 256 * KIB
EVENT_LIMIT = 8 * KIB
SNAPSHOT = build_snapshot(
    load_settings(
        None,
        limits={
            "max_request_bytes": REQUEST_LIMIT,
            "max_response_bytes": RESPONSE_LIMIT,
            "max_stream_bytes": STREAM_LIMIT,
            "max_event_bytes": EVENT_LIMIT,
        },
        detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
        policy={"paths": [str(PLAIN_POLICIES)]},
    )
)
REQ, RESP = Direction.REQUEST, Direction.RESPONSE
FDS, BUFFERED = BodyMode.FULL_DUPLEX_STREAMED, BodyMode.BUFFERED

CARD = "4111 1111 1111 1111"
EMAIL = "jane@example.com"
PLANTS = (CARD, EMAIL, "4111111111111111", "5500-0000-0000-0004")
"""Values the test pack masks wherever they stand between separators."""
CLEAR = PLANTS  # what must never be read whole in output

SECONDS = 10.0
"""Per example: far above what any example takes (milliseconds), far below a hang."""

ERROR_CODES = frozenset(HTTP_STATUS)
REQUEST_ERRORS = frozenset(
    {
        "invalid_json",
        "invalid_body",
        "invalid_content_encoding",
        "body_too_large",
        "unsupported_media_type",
        "unsupported_content_encoding",
        "policy_blocked",
        "prompt_blocked",
    }
)
RESPONSE_ERRORS = frozenset({"upstream_unscannable", "upstream_too_large", "policy_blocked"})


class Hang(Exception):
    """An example ran past its wall-clock bound."""


@contextlib.contextmanager
def bounded(seconds: float = SECONDS) -> Iterator[None]:
    """Interrupts (SIGALRM) an example still running after ``seconds``, and fails one that took longer."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < seconds


# -- driving the exchange ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one exchange did with one body: refused (``status``, ``code``), reset (``reset``: the server
    aborts the stream), or released ``out`` (and perhaps ended it in band with an error)."""

    status: int | None = None
    code: str | None = None
    reset: str | None = None
    out: bytes = b""
    headers_released: bool = False
    replies: list[Reply] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return self.status is not None or self.reset is not None


def take(outcome: Outcome, replies: list[Reply], original: bytes | None = None) -> None:
    for reply in replies:
        outcome.replies.append(reply)
        if isinstance(reply, Reject):
            body = json.loads(reply.body)
            assert set(body) >= {"error", "message", "request_id"}
            assert body["error"] in ERROR_CODES
            assert reply.status == HTTP_STATUS[body["error"]]
            outcome.status, outcome.code = reply.status, body["error"]
        elif isinstance(reply, ReplaceBody):
            outcome.out += original if reply.data is None else reply.data
            if reply.data is not None:
                length = dict(reply.changes.set).get("content-length")
                assert length is None or int(length) == len(reply.data)
        elif isinstance(reply, StreamChunk):
            outcome.out += reply.data
        elif isinstance(reply, ContinueHeaders):
            if reply.direction is RESP:
                outcome.headers_released = True
        else:
            pytest.fail(f"unexpected reply {reply!r}")


def header_items(content_type: str | None, encoding: str | None) -> list[tuple[str, str]]:
    items = []
    if content_type is not None:
        items.append(("content-type", content_type))
    if encoding is not None:
        items.append(("content-encoding", encoding))
    return items


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def request(body: bytes, content_type: str | None, encoding: str | None = None) -> Outcome:
    """A BUFFERED request body: Envoy sends it whole, in one message."""
    outcome = Outcome()
    ex = Exchange(SNAPSHOT, ProtocolConfig(BUFFERED, FDS), "d-hostile")
    try:
        items = [
            (":path", "/v1/chat/completions"),
            (":method", "POST"),
            *header_items(content_type, encoding),
        ]
        take(outcome, ex.handle(Headers(REQ, tuple(items), False)))
        if outcome.refused:
            return outcome
        take(outcome, ex.handle(Body(REQ, body, True)), original=body)
    finally:
        ex.close()
    return outcome


def response(
    body: bytes,
    content_type: str | None,
    encoding: str | None = None,
    cuts: list[int] | None = None,
    mode: BodyMode = FDS,
) -> Outcome:
    """An answer to a plain chat request, its body cut into chunks of the given sizes (the rest in a last
    one) as Envoy forwards what the upstream writes."""
    outcome = Outcome()
    ex = Exchange(SNAPSHOT, ProtocolConfig(BUFFERED, mode), "d-hostile")
    try:
        ex.handle(
            Headers(REQ, ((":path", "/v1/chat/completions"), ("content-type", "application/json")), False)
        )
        ex.handle(Body(REQ, CHAT, True))
        items = ((":status", "200"), *header_items(content_type, encoding))
        take(outcome, ex.handle(Headers(RESP, items, False)))
        if outcome.refused:
            return outcome
        if mode is BUFFERED:
            take(outcome, ex.handle(Body(RESP, body, True)), original=body)
            return outcome
        pieces, position = [], 0
        for size in cuts or []:
            if position >= len(body):
                break
            pieces.append(body[position : position + size])
            position += size
        pieces.append(body[position:])
        for index, piece in enumerate(pieces):
            try:
                take(outcome, ex.handle(Body(RESP, piece, index == len(pieces) - 1)))
            except ExtProcError as error:  # a format with no in-band error: the server resets the stream
                outcome.reset = error.code
                break
            if outcome.status is not None or ex.finished:
                break
    finally:
        ex.close()
    assert outcome.reset is None or outcome.reset in RESPONSE_ERRORS
    return outcome


def assert_no_plant_in_clear(text: str) -> None:
    for value in CLEAR:
        assert value not in text, f"{value!r} passed in clear"


def strings_of(node: Any) -> Iterator[str]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int | float) and not isinstance(item, bool):
            yield str(item)


# -- generated documents -----------------------------------------------------------------------------

FILLER = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="|"), max_size=12)
SEP = " | "


@st.composite
def planted_text(draw: st.DrawFn) -> str:
    """Filler with planted values between separators, so no neighbouring character can glue onto them."""
    parts = draw(st.lists(st.one_of(FILLER, st.sampled_from(PLANTS)), max_size=5))
    return SEP.join(["", *parts, ""]) if parts else draw(FILLER)


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.just(4111111111111111),
    st.floats(allow_nan=False, allow_infinity=False),
    planted_text(),
)
JSON_DOCS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(planted_text(), inner, max_size=4),
    max_leaves=20,
)


# -- JSON request and response bodies ----------------------------------------------------------------


def check_json(outcome: Outcome, allowed: frozenset[str]) -> Any:
    if outcome.refused:
        assert (outcome.code or outcome.reset) in allowed
        return None
    if not outcome.out.strip():  # an empty body (or a compressed one that decodes to nothing)
        return None
    document = loads_strict(outcome.out)  # what passes is JSON as strict as the one that was scanned
    for text in strings_of(document):
        assert_no_plant_in_clear(text)
    assert_no_plant_in_clear(outcome.out.decode("utf-8", "surrogateescape"))
    return document


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=JSON_DOCS, ascii_only=st.booleans())
def test_any_json_request_is_masked_whole_or_refused(document: Any, ascii_only: bool) -> None:
    body = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    with bounded():
        outcome = request(body, "application/json")
    check_json(outcome, REQUEST_ERRORS)
    if len(body) <= REQUEST_LIMIT and isinstance(document, dict | list):
        assert not outcome.refused or outcome.code in ("policy_blocked", "prompt_blocked"), outcome.code


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=JSON_DOCS,
    content_type=st.sampled_from(["application/json", "application/vnd.x+json", "text/plain", None]),
    cuts=st.lists(st.integers(min_value=1, max_value=64), max_size=8),
    mode=st.sampled_from([FDS, BUFFERED]),
)
def test_any_json_answer_is_masked_whole_or_refused(
    document: Any, content_type: str | None, cuts: list[int], mode: BodyMode
) -> None:
    body = json.dumps(document).encode()
    with bounded():
        outcome = response(body, content_type, cuts=cuts, mode=mode)
    if content_type in (None, "text/plain") and not isinstance(document, dict | list):
        # read as text: masked as text, whatever it holds
        if not outcome.refused:
            assert_no_plant_in_clear(outcome.out.decode("utf-8", "surrogateescape"))
        return
    check_json(outcome, RESPONSE_ERRORS)
    assert not outcome.refused, outcome.code  # a valid document under the limit is never refused


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.text(alphabet='{}[]":,\\ 0123456789.eE+-tfnrul\x00\ud800é', max_size=300).map(
            lambda t: t.encode("utf-8", "surrogatepass")
        ),
    ),
    content_type=st.sampled_from(
        ["application/json", "application/json; charset=utf-16", "application/x-ndjson", "text/plain", None]
    ),
)
def test_arbitrary_bytes_as_a_request_are_refused_or_pass_as_what_they_claim(
    body: bytes, content_type: str | None
) -> None:
    with bounded():
        outcome = request(body, content_type)
    if outcome.refused:
        assert outcome.code in REQUEST_ERRORS
        return
    if content_type is not None and content_type.startswith("application/json") and body.strip():
        if content_type.endswith("utf-16"):
            loads_strict(outcome.out.decode("utf-16"))
        else:
            loads_strict(outcome.out)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=400),
    content_type=st.sampled_from(
        ["application/json", "text/event-stream", "application/x-ndjson", "text/plain", None]
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=8),
)
def test_arbitrary_bytes_as_an_answer_end_in_output_or_a_documented_error(
    body: bytes, content_type: str | None, cuts: list[int]
) -> None:
    with bounded():
        outcome = response(body, content_type, cuts=cuts)
    if outcome.refused:
        assert (outcome.code or outcome.reset) in RESPONSE_ERRORS
    elif content_type == "application/json" and outcome.out.strip():  # blank: nothing to scan
        loads_strict(outcome.out)
    elif content_type == "text/event-stream":
        assert b"\r" not in outcome.out  # written out again with LF line ends only
    elif content_type == "application/x-ndjson":
        assert outcome.out.count(b"\n") >= body.count(b"\n")  # no line lost (a line may be added)


# -- SSE ---------------------------------------------------------------------------------------------


def chat_event(content: str) -> bytes:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def sse_events(out: bytes) -> list[tuple[str | None, str | None]]:
    """(event name, data) of every event, parsed as the WHATWG specification reads a stream."""
    text = out.decode("utf-8", "replace")
    events: list[tuple[str | None, str | None]] = []
    name: str | None = None
    data: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line:
            if data or name:
                events.append((name, "\n".join(data) if data else None))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
    if data or name:
        events.append((name, "\n".join(data) if data else None))
    return events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=planted_text(),
    token=st.integers(min_value=1, max_value=7),
    cuts=st.lists(st.integers(min_value=1, max_value=80), max_size=12),
    done=st.booleans(),
)
def test_a_chat_stream_cut_anywhere_never_shows_a_planted_value(
    text: str, token: int, cuts: list[int], done: bool
) -> None:
    body = b"".join(chat_event(text[i : i + token]) for i in range(0, len(text), token))
    body += b"data: [DONE]\n\n" if done else b""
    with bounded():
        outcome = response(body, "text/event-stream", cuts=cuts)
    assert not outcome.refused, outcome.code
    assembled = ""
    for name, data in sse_events(outcome.out):
        assert name is None, name
        assert data is not None
        if data == "[DONE]":
            continue
        chunk = json.loads(data)  # every event is still a chat chunk
        assembled += "".join(choice["delta"].get("content") or "" for choice in chunk["choices"])
    assert_no_plant_in_clear(assembled)
    if not any(p in text for p in PLANTS):
        assert assembled == text  # nothing else changes


LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
FIELDS = st.one_of(
    st.builds(lambda t: "data: " + t, planted_text()),
    st.builds(lambda t: "data:" + t, FILLER),
    st.builds(lambda t: "event: " + t, planted_text()),
    st.builds(lambda t: "id: " + t, planted_text()),
    st.builds(lambda t: ": " + t, planted_text()),
    st.just("retry: 1000"),
    st.builds(lambda t: "x-other: " + t, planted_text()),
    st.just("data"),
)


@st.composite
def sse_bodies(draw: st.DrawFn) -> bytes:
    events = draw(
        st.lists(st.lists(FIELDS.filter(lambda f: "\r" not in f and "\n" not in f), max_size=4), max_size=6)
    )
    end = draw(LINE_ENDS)
    text = "".join(end.join(fields) + end + end for fields in events)
    if draw(st.booleans()):
        text = "\ufeff" + text
    if draw(st.booleans()):
        text = text[: draw(st.integers(min_value=0, max_value=len(text)))]  # the stream ends mid-event
    return text.encode("utf-8", "surrogateescape")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=sse_bodies(), cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=10))
def test_events_built_from_random_field_lines_come_out_as_events_with_nothing_in_clear(
    body: bytes, cuts: list[int]
) -> None:
    with bounded():
        outcome = response(body, "text/event-stream", cuts=cuts)
    assert not outcome.refused, outcome.code
    assert b"\r" not in outcome.out
    for line in outcome.out.decode("utf-8", "surrogateescape").split("\n"):
        # only the fields a receiver reads, and bare comments
        assert line in ("", ":", "data") or line.split(":", 1)[0] in ("data", "event", "id", "retry"), line
    for name, data in sse_events(outcome.out):
        assert_no_plant_in_clear(name or "")
        assert_no_plant_in_clear(data or "")


def test_an_sse_answer_with_no_line_end_at_all_ends_at_the_event_limit() -> None:
    body = b"data: " + b"x" * (2 * EVENT_LIMIT)
    with bounded():
        outcome = response(body, "text/event-stream", cuts=[1024] * (len(body) // 1024))
    assert outcome.headers_released
    assert outcome.out.endswith(b"\n\n")
    [(name, data)] = sse_events(outcome.out)
    assert name == "error"
    assert data is not None
    assert json.loads(data)["error"] == "upstream_too_large"


# -- NDJSON ------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(JSON_DOCS.filter(lambda d: isinstance(d, dict | list)), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=10),
    final_newline=st.booleans(),
)
def test_ndjson_lines_of_any_json_come_out_as_json_lines_with_nothing_in_clear(
    lines: list[Any], cuts: list[int], final_newline: bool
) -> None:
    body = b"\n".join(json.dumps(line).encode() for line in lines) + (b"\n" if final_newline else b"")
    with bounded():
        outcome = response(body, "application/x-ndjson", cuts=cuts)
    if outcome.refused:
        assert outcome.code in RESPONSE_ERRORS or outcome.reset in RESPONSE_ERRORS
        return
    for line in filter(None, outcome.out.decode().split("\n")):  # NDJSON lines end at LF, not at U+0085
        parsed = json.loads(line)
        if isinstance(parsed, dict) and parsed.get("done") is True and "error" in parsed:
            assert parsed["error"] in RESPONSE_ERRORS  # ended in band
            continue
        for text in strings_of(parsed):
            assert_no_plant_in_clear(text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(JSON_DOCS.filter(lambda d: isinstance(d, dict)), min_size=1, max_size=4),
)
def test_ndjson_requests_are_masked_line_by_line_or_refused(lines: list[Any]) -> None:
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    with bounded():
        outcome = request(body, "application/x-ndjson")
    if outcome.refused:
        assert outcome.code in REQUEST_ERRORS
        return
    for line in filter(None, outcome.out.decode().split("\n")):
        for text in strings_of(json.loads(line)):
            assert_no_plant_in_clear(text)


# -- compressed bodies -------------------------------------------------------------------------------


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "deflate": zlib.compress,
    "deflate-raw": raw_deflate,
    "br": brotli.compress,
    "zstd": zstd.compress,
}


def coding(label: str) -> str:
    return label.removesuffix("-raw")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=JSON_DOCS.filter(lambda d: isinstance(d, dict | list)),
    label=st.sampled_from(sorted(ENCODERS)),
    damage=st.sampled_from(["none", "truncate", "concatenate", "trailing", "flip"]),
    where=st.floats(min_value=0, max_value=1),
    direction=st.sampled_from([REQ, RESP]),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=6),
)
def test_compressed_bodies_whole_truncated_concatenated_or_damaged(
    document: Any,
    label: str,
    damage: str,
    where: float,
    direction: Direction,
    cuts: list[int],
) -> None:
    plain = json.dumps(document).encode()
    encode = ENCODERS[label]
    body = encode(plain)
    if damage == "truncate":
        body = body[: int(len(body) * where)]
    elif damage == "concatenate":  # two members (gzip and zstd allow it), the halves of one document
        middle = int(len(plain) * where)
        body = encode(plain[:middle]) + encode(plain[middle:])
    elif damage == "trailing":
        body += b"garbage"
    elif damage == "flip" and body:
        index = int((len(body) - 1) * where)
        body = body[:index] + bytes([body[index] ^ 0x55]) + body[index + 1 :]
    with bounded():
        if direction is REQ:
            outcome = request(body, "application/json", coding(label))
        else:
            outcome = response(body, "application/json", coding(label), cuts=cuts)
    allowed = REQUEST_ERRORS if direction is REQ else RESPONSE_ERRORS
    document_out = check_json(outcome, allowed)
    if damage == "none":
        assert document_out is not None, outcome.code
    if document_out is not None and damage in ("none", "concatenate"):
        # decoding is transparent: what passes is what the same document sent plain gives, never the
        # first member alone
        if direction is REQ:
            assert outcome.out == request(plain, "application/json").out
        else:
            assert outcome.out == response(plain, "application/json").out


BOMB_PLAIN = b"[" + b" " * (64 * 1024 * 1024) + b"]"  # 64 MiB of JSON whitespace, 1000x the limits


@pytest.mark.parametrize("label", sorted(ENCODERS))
@pytest.mark.parametrize("direction", [REQ, RESP])
def test_a_compression_bomb_is_refused_at_the_limit_with_bounded_memory(
    label: str, direction: Direction
) -> None:
    body = bomb(label)
    tracemalloc.start()
    try:
        with bounded():
            if direction is REQ:
                outcome = request(body, "application/json", coding(label))
            else:
                outcome = response(body, "application/json", coding(label), cuts=[4096] * (len(body) // 4096))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.code == ("body_too_large" if direction is REQ else "upstream_too_large")
    # the body as sent, plus at most the limit and one piece decoded: never the 64 MiB it inflates to
    assert peak < len(body) * 3 + 4 * REQUEST_LIMIT + 2 * 1024 * 1024, peak


_BOMBS: dict[str, bytes] = {}


def bomb(label: str) -> bytes:
    if label not in _BOMBS:
        _BOMBS[label] = ENCODERS[label](BOMB_PLAIN)
    return _BOMBS[label]


# -- regressions found by the properties above ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[\n", "a line that starts like JSON and does not parse"),
        (b'{"a": 1, "a": 2}\n', "a key repeated in one object"),
        (b"[" * 200 + b"]" * 200 + b"\n", "nesting past the limit"),
    ],
)
def test_a_broken_ndjson_request_line_is_the_clients_400_not_an_upstream_502(
    body: bytes, reason: str
) -> None:
    # A request's NDJSON line that cannot be read one way only was refused with the answer's code
    # (502 upstream_unscannable), blaming the model server for the client's body.
    outcome = request(body, "application/x-ndjson")
    assert (outcome.status, outcome.code) == (400, "invalid_json"), reason
    [reject] = [r for r in outcome.replies if isinstance(r, Reject)]
    assert json.loads(reject.body)["message"].startswith("request body is not valid JSON: a line is JSON")
