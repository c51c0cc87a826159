"""The exchange as a pure state machine: plain events in, plain replies out."""

import gzip
import json
import zlib

import pytest

from extproc.errors import ProtocolError, UpstreamError
from extproc.exchange import DECISION_HEADER, Exchange
from extproc.model import (
    Body,
    BodyMode,
    ContinueHeaders,
    ContinueTrailers,
    Direction,
    Headers,
    ProtocolConfig,
    Reject,
    ReplaceBody,
    StreamChunk,
    Trailers,
)
from extproc.runtime import build_snapshot
from extproc.settings import load_settings

from .rules_fixture import EDM_KEY_FILE, PLAIN_POLICIES, RULES

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
FDS, BUFFERED, NONE = BodyMode.FULL_DUPLEX_STREAMED, BodyMode.BUFFERED, BodyMode.NONE
SNAPSHOT = build_snapshot(
    load_settings(
        None,
        limits={"max_response_bytes": 4096, "max_event_bytes": 1024},
        detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
        policy={"paths": [str(PLAIN_POLICIES)]},
    )
)
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def exchange(request_mode: BodyMode = BUFFERED, response_mode: BodyMode = FDS) -> Exchange:
    return Exchange(SNAPSHOT, ProtocolConfig(request_mode, response_mode), "d-1")


def headers(direction: Direction, *items: tuple[str, str], eos: bool = False) -> Headers:
    """Envoy's headers message; a request's carries a forwarded path unless ``items`` name one."""
    if direction is REQ and not any(name == ":path" for name, _ in items):
        items = ((":path", "/v1/chat/completions"), *items)
    return Headers(direction, tuple(items), eos)


def json_request(ex: Exchange, body: bytes = CHAT) -> None:
    ex.handle(
        headers(
            REQ,
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("x-request-id", "r-1"),
        )
    )
    ex.handle(Body(REQ, body, True))


def test_request_headers_carry_the_decision_id_upstream_and_into_metadata() -> None:
    ex = exchange()
    [reply] = ex.handle(headers(REQ, ("content-type", "application/json")))
    assert isinstance(reply, ContinueHeaders)
    assert (DECISION_HEADER, "d-1") in reply.changes.set
    assert reply.metadata == {"llm.extproc": {"decision_id": "d-1"}}


def test_unchanged_buffered_request_body_is_not_rewritten() -> None:
    ex = exchange()
    ex.handle(headers(REQ, ("content-type", "application/json"), ("content-length", str(len(CHAT)))))
    assert ex.handle(Body(REQ, CHAT, True)) == [ReplaceBody(REQ, None)]


def test_masked_request_body_gets_a_matching_content_length() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "I am jane@example.com"}]}).encode()
    ex = exchange()
    ex.handle(headers(REQ, ("content-type", "application/json"), ("content-length", str(len(body)))))
    [reply] = ex.handle(Body(REQ, body, True))
    assert isinstance(reply, ReplaceBody)
    assert reply.data is not None
    assert b"[REDACTED:EMAIL_ADDRESS]" in reply.data
    assert reply.changes.set == (("content-length", str(len(reply.data))),)


def test_invalid_json_request_is_refused_with_a_stable_code() -> None:
    ex = exchange()
    ex.handle(headers(REQ, ("content-type", "application/json"), ("x-request-id", "r-9")))
    [reply] = ex.handle(Body(REQ, b"{oops", True))
    assert isinstance(reply, Reject)
    assert reply.status == 400
    assert json.loads(reply.body) == {
        "error": "invalid_json",
        "message": "request body is not valid JSON",
        "request_id": "r-9",
    }
    assert ("content-type", "application/json") in reply.headers
    assert ex.finished


@pytest.mark.parametrize(
    ("header", "value", "code", "status"),
    [
        ("content-encoding", "compress", "unsupported_content_encoding", 415),
        ("content-type", "multipart/form-data; boundary=x", "unsupported_media_type", 415),
    ],
)
def test_request_bodies_that_cannot_be_scanned_are_refused(
    header: str, value: str, code: str, status: int
) -> None:
    [reply] = exchange().handle(headers(REQ, (header, value)))
    assert isinstance(reply, Reject)
    assert (reply.status, json.loads(reply.body)["error"]) == (status, code)


def test_json_response_headers_wait_for_the_masked_body() -> None:
    ex = exchange()
    json_request(ex)
    assert ex.handle(headers(RESP, (":status", "200"), ("content-type", "application/json"))) == []
    body = b'{"choices":[{"message":{"content":"card 4111111111111111"}}]}'
    assert ex.handle(Body(RESP, body[:20], False)) == []
    first, second = ex.handle(Body(RESP, body[20:], True))
    assert isinstance(first, ContinueHeaders)
    assert first.direction is RESP
    assert isinstance(second, StreamChunk)
    assert second.end_of_stream
    assert json.loads(second.data)["choices"][0]["message"]["content"] == "card [REDACTED:CREDIT_CARD]"
    assert ex.finished
    assert [f.entity for f in ex.findings[RESP]] == ["CREDIT_CARD"]


def test_invalid_json_response_becomes_a_502_before_any_header_leaves() -> None:
    ex = exchange()
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "application/json")))
    [reply] = ex.handle(Body(RESP, b"<html>", True))
    assert isinstance(reply, Reject)
    assert reply.status == 502


def test_response_over_the_limit_is_refused() -> None:
    ex = exchange()
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "application/json")))
    [reply] = ex.handle(Body(RESP, b"[" + b"1," * 3000, False))
    assert isinstance(reply, Reject)
    assert json.loads(reply.body)["error"] == "upstream_too_large"


def test_sse_events_are_released_whole_once_scanned() -> None:
    ex = exchange()
    json_request(ex)
    [reply] = ex.handle(headers(RESP, ("content-type", "text/event-stream")))
    assert isinstance(reply, ContinueHeaders)
    assert ex.handle(Body(RESP, b"data: a@b", False)) == []
    # Events of no known dialect are scanned across events: one goes out once later text settles it.
    released = ex.handle(Body(RESP, b".com now\n\ndata: x" + b" and more text" * 8 + b"\n\n", False))
    assert released == [StreamChunk(RESP, b"data: [REDACTED:EMAIL_ADDRESS] now\n\n", False)]
    [last] = ex.handle(Body(RESP, b"", True))
    assert last.data == b"data: x" + b" and more text" * 8 + b"\n\n"
    assert last.end_of_stream


def test_sse_event_over_the_limit_ends_the_stream_with_an_error_event() -> None:
    ex = exchange()
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "text/event-stream")))
    [reply] = ex.handle(Body(RESP, b"data: " + b"x" * 2000, False))
    assert isinstance(reply, StreamChunk)
    assert reply.end_of_stream
    assert reply.data.startswith(b"event: error\ndata: ")
    assert json.loads(reply.data.split(b"data: ", 1)[1])["error"] == "upstream_too_large"
    # The rest of the upstream body is dropped, not released.
    assert ex.handle(Body(RESP, b"data: more\n\n", False)) == []
    assert ex.handle(Body(RESP, b"", True)) == []


def test_trailers_flush_what_is_held() -> None:
    ex = exchange()
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "text/event-stream")))
    assert ex.handle(Body(RESP, b"data: held", False)) == []
    assert ex.handle(Trailers(RESP)) == [StreamChunk(RESP, b"data: held", False), ContinueTrailers(RESP)]


def test_unscannable_response_type_or_encoding_is_refused() -> None:
    for item in (("content-type", "image/png"), ("content-encoding", "compress")):
        ex = exchange()
        json_request(ex)
        [reply] = ex.handle(headers(RESP, item))
        assert isinstance(reply, Reject)
        assert reply.status == 502


def test_buffered_response_mode_replaces_the_body_and_fixes_content_length() -> None:
    ex = exchange(BUFFERED, BUFFERED)
    json_request(ex)
    [reply] = ex.handle(headers(RESP, ("content-type", "text/plain"), ("content-length", "16")))
    assert isinstance(reply, ContinueHeaders)
    [body] = ex.handle(Body(RESP, b"x jane@example.com", True))
    assert body == ReplaceBody(RESP, b"x [REDACTED:EMAIL_ADDRESS]", body.changes)
    assert body.changes.set == (("content-length", "26"),)


def test_body_less_exchange() -> None:
    ex = exchange()
    assert isinstance(ex.handle(headers(REQ, (":method", "GET"), eos=True))[0], ContinueHeaders)
    assert isinstance(ex.handle(headers(RESP, (":status", "204"), eos=True))[0], ContinueHeaders)
    assert ex.finished


def test_stream_opened_by_a_local_reply_passes_through() -> None:
    ex = exchange()
    assert ex.handle(headers(RESP, (":status", "413"), ("content-type", "text/plain"))) == [
        ContinueHeaders(RESP)
    ]
    assert ex.handle(Body(RESP, b"payload too large", True)) == [
        StreamChunk(RESP, b"payload too large", True)
    ]
    assert ex.passthrough


@pytest.mark.parametrize(
    "events",
    [
        [Body(REQ, b"x", True)],  # a stream must open with headers
        [Trailers(RESP)],
        [headers(REQ), headers(REQ)],  # headers twice
        [headers(REQ), Body(REQ, b"{}", True), Body(REQ, b"{}", True)],  # BUFFERED body twice
        [headers(REQ, eos=True), Body(REQ, b"x", True)],  # a body after headers that ended the stream
        [headers(REQ), Body(REQ, b"{}", True), headers(RESP, ("content-type", "text/plain")), headers(REQ)],
        [headers(REQ), Body(REQ, b"{}", True), headers(RESP, eos=True), Body(RESP, b"late", True)],
    ],
)
def test_out_of_order_messages_are_protocol_errors(events: list[Headers | Body | Trailers]) -> None:
    ex = exchange()
    *accepted, offending = events
    for event in accepted:
        ex.handle(event)
    with pytest.raises(ProtocolError):
        ex.handle(offending)


def test_body_in_mode_none_is_a_protocol_error() -> None:
    ex = exchange(NONE, NONE)
    ex.handle(headers(REQ))
    with pytest.raises(ProtocolError, match="mode NONE"):
        ex.handle(Body(REQ, b"x", True))


@pytest.mark.parametrize("mode", [BodyMode.STREAMED, BodyMode.BUFFERED_PARTIAL, BodyMode.GRPC])
def test_unsafe_body_modes_are_refused_when_the_stream_opens(mode: BodyMode) -> None:
    with pytest.raises(ProtocolError, match="not supported"):
        Exchange(SNAPSHOT, ProtocolConfig(BUFFERED, mode), "d")


def sse_headers(ex: Exchange, *extra: tuple[str, str]) -> ContinueHeaders:
    json_request(ex)
    [reply] = ex.handle(headers(RESP, ("content-type", "text/event-stream"), *extra))
    assert isinstance(reply, ContinueHeaders)
    return reply


def test_a_gzip_request_is_decoded_masked_and_sent_on_uncompressed() -> None:
    ex = exchange()
    body = json.dumps({"messages": [{"role": "user", "content": "mail jane@example.com"}]}).encode()
    packed = gzip.compress(body)
    items = (("content-type", "application/json"), ("content-encoding", "gzip"))
    [head] = ex.handle(headers(REQ, *items, ("content-length", str(len(packed)))))
    assert isinstance(head, ContinueHeaders)
    assert "content-encoding" in head.changes.remove
    [reply] = ex.handle(Body(REQ, packed, True))
    assert isinstance(reply, ReplaceBody)
    assert reply.data is not None
    assert json.loads(reply.data)["messages"][0]["content"] == "mail [REDACTED:EMAIL_ADDRESS]"
    assert reply.changes.set == (("content-length", str(len(reply.data))),)


def test_a_corrupt_compressed_request_is_refused() -> None:
    ex = exchange()
    ex.handle(headers(REQ, ("content-type", "application/json"), ("content-encoding", "gzip")))
    [reply] = ex.handle(Body(REQ, b"\x1f\x8b\x08\x00garbage", True))
    assert isinstance(reply, Reject)
    assert (reply.status, json.loads(reply.body)["error"]) == (400, "invalid_content_encoding")


def test_a_compressed_json_answer_is_masked_and_its_headers_lose_the_encoding() -> None:
    ex = exchange()
    json_request(ex)
    assert (
        ex.handle(headers(RESP, ("content-type", "application/json"), ("content-encoding", "deflate"))) == []
    )
    packed = zlib.compress(b'{"content":"card 4111111111111111"}')
    head, chunk = ex.handle(Body(RESP, packed, True))
    assert isinstance(head, ContinueHeaders)
    assert "content-encoding" in head.changes.remove
    assert isinstance(chunk, StreamChunk)
    assert json.loads(chunk.data) == {"content": "card [REDACTED:CREDIT_CARD]"}


def test_a_compressed_event_stream_is_decoded_as_it_arrives() -> None:
    ex = exchange()
    assert sse_headers(ex, ("content-encoding", "gzip")).changes.remove == ("content-encoding",)
    packer = zlib.compressobj(wbits=31)
    first = packer.compress(b"data: mail jane@example.com now\n\n") + packer.flush(zlib.Z_SYNC_FLUSH)
    assert ex.handle(Body(RESP, first, False)) == []  # held until the scanner is settled: the end
    assert ex.handle(Body(RESP, packer.flush(), True)) == [
        StreamChunk(RESP, b"data: mail [REDACTED:EMAIL_ADDRESS] now\n\n", True)
    ]


def test_a_compression_bomb_stops_at_the_response_limit() -> None:
    ex = exchange()
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "application/json"), ("content-encoding", "gzip")))
    bomb = gzip.compress(b"[" + b"0," * 5_000_000 + b"0]")  # 10 MB from about 10 KB; the limit is 4 KiB
    assert len(bomb) < 20_000
    [reply] = ex.handle(Body(RESP, bomb, True))
    assert isinstance(reply, Reject)
    assert json.loads(reply.body)["error"] == "upstream_too_large"


def test_a_json_body_that_does_not_parse_is_masked_as_text_when_configured() -> None:
    settings = load_settings(
        None,
        detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE), "unparseable": "text"},
        policy={"paths": [str(PLAIN_POLICIES)]},
    )
    ex = Exchange(build_snapshot(settings), ProtocolConfig(BUFFERED, FDS), "d-2")
    ex.handle(headers(REQ, ("content-type", "application/json")))
    [reply] = ex.handle(Body(REQ, b"{'mail': 'jane@example.com'", True))
    assert isinstance(reply, ReplaceBody)
    assert reply.data == b"{'mail': '[REDACTED:EMAIL_ADDRESS]'"


def test_an_ndjson_answer_streams_masked_lines() -> None:
    ex = exchange()
    json_request(ex)
    [reply] = ex.handle(headers(RESP, ("content-type", "application/x-ndjson")))
    assert isinstance(reply, ContinueHeaders)
    assert ex.handle(Body(RESP, b'{"note":"jane@example.com now"}\n{"no', False)) == []
    [chunk] = ex.handle(Body(RESP, b'te":"' + b" and more text" * 8 + b'"}\n', False))
    assert chunk == StreamChunk(RESP, b'{"note":"[REDACTED:EMAIL_ADDRESS] now"}\n', False)


def token(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"


def released_text(data: bytes) -> str:
    text = ""
    for block in data.decode().split("\n\n"):
        if block.startswith("data: {"):
            text += json.loads(block[6:])["choices"][0]["delta"].get("content") or ""
    return text


def test_a_stream_past_its_deadline_ends_with_the_held_text_and_an_error_event() -> None:
    ex = exchange()
    sse_headers(ex)
    assert ex.deadline is not None
    held = ex.handle(Body(RESP, token("mail jane@exam"), False))
    [reply] = ex.expire()
    assert isinstance(reply, StreamChunk)
    assert reply.end_of_stream
    events = reply.data.decode().split("\n\n")
    assert events[-2].startswith("event: error\ndata: ")
    assert json.loads(events[-2].split("data: ", 1)[1])["error"] == "upstream_timeout"
    released = "".join(released_text(r.data) for r in held if isinstance(r, StreamChunk))
    assert released + released_text(reply.data) == "mail jane@exam"  # the held text, masked on its own
    assert ex.deadline is None
    assert ex.handle(Body(RESP, token("ple.com"), False)) == []
    assert ex.expire() == []


def test_an_ndjson_stream_over_its_size_limit_ends_with_an_error_line() -> None:
    settings = load_settings(
        None,
        limits={"max_stream_bytes": 64},
        detect={"rules": [str(RULES)], "edm_key_file": str(EDM_KEY_FILE)},
        policy={"paths": [str(PLAIN_POLICIES)]},
    )
    ex = Exchange(build_snapshot(settings), ProtocolConfig(BUFFERED, FDS), "d-3")
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "application/x-ndjson")))
    [reply] = ex.handle(Body(RESP, b'{"response":"' + b"x" * 80 + b'"}\n', False))
    assert isinstance(reply, StreamChunk)
    assert reply.end_of_stream
    last = json.loads(reply.data.decode().splitlines()[-1])
    assert (last["error"], last["done"]) == ("upstream_too_large", True)


def test_a_plain_text_stream_past_its_deadline_is_reset() -> None:
    ex = exchange()
    json_request(ex)
    assert ex.handle(headers(RESP, ("content-type", "text/plain"))) == []  # until the first bytes decide
    sent, *_ = ex.handle(Body(RESP, b"just text, ", False))
    assert isinstance(sent, ContinueHeaders)
    with pytest.raises(UpstreamError):
        ex.expire()


def test_a_text_answer_past_its_deadline_before_its_first_bytes_is_a_504() -> None:
    ex = exchange()
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "text/plain")))
    [reply] = ex.expire()
    assert isinstance(reply, Reject)
    assert reply.status == 504


def test_a_lone_surrogate_escape_in_a_json_prompt_is_masked_around_and_kept_escaped() -> None:
    # "\ud800" is valid JSON but cannot be UTF-8: the body goes on with the escape, and the card is masked.
    ex = exchange()
    ex.handle(headers(REQ, ("content-type", "application/json")))
    body = b'{"model":"m","messages":[{"role":"user","content":"a\\ud800b 4111 1111 1111 1111"}]}'
    [reply] = ex.handle(Body(REQ, body, True))
    assert isinstance(reply, ReplaceBody)
    assert reply.data is not None
    assert b"\\ud800" in reply.data
    assert b"4111 1111 1111 1111" not in reply.data
    assert json.loads(reply.data)["messages"][0]["content"].startswith("a\ud800b")


def test_a_text_answer_framed_as_sse_is_read_as_sse() -> None:
    for content_type in (("content-type", "text/plain"),), ():
        ex = exchange()
        json_request(ex)
        ex.handle(headers(RESP, *content_type))
        body = b"\xef\xbb\xbf\r\n" + token("Card 4111 1111") + token(" 1111 1111 ok") + b"data: [DONE]\n\n"
        out = b"".join(r.data for r in ex.handle(Body(RESP, body[:3], False)) if isinstance(r, StreamChunk))
        out += b"".join(r.data for r in ex.handle(Body(RESP, body[3:], True)) if isinstance(r, StreamChunk))
        assert b"1111 1111" not in out
        assert b"[REDACTED:CREDIT_CARD]" in out


def test_a_text_answer_with_a_data_line_after_its_start_is_cut() -> None:
    ex = exchange()
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "text/plain")))
    ex.handle(Body(RESP, b"just text\n", False))
    with pytest.raises(UpstreamError):  # a plain body has no in-band error: the server resets the stream
        ex.handle(Body(RESP, token("Card 4111 1111"), False))


@pytest.mark.parametrize("content_type", [(("content-type", "text/plain"),), ()])
@pytest.mark.parametrize("prefix", [b"", b"\xef\xbb\xbf", b" \r\n\t"])
def test_a_streamed_text_answer_that_is_json_is_masked_as_json(
    content_type: tuple[tuple[str, str], ...], prefix: bytes
) -> None:
    # The openai client parses a text answer as JSON: its escapes are digits to it.
    escaped = "".join(f"\\u{ord(c):04x}" for c in "4111 1111 1111 1111")
    body = prefix + b'{"choices":[{"message":{"content":"card ' + escaped.encode() + b'"}}]}'
    ex = exchange()
    json_request(ex)
    assert ex.handle(headers(RESP, *content_type)) == []
    assert ex.handle(Body(RESP, body[:5], False)) == []
    assert ex.handle(Body(RESP, body[5:20], False)) == []
    [sent, chunk] = ex.handle(Body(RESP, body[20:], True))
    assert isinstance(sent, ContinueHeaders)
    assert isinstance(chunk, StreamChunk)
    assert json.loads(chunk.data)["choices"][0]["message"]["content"] == "card [REDACTED:CREDIT_CARD]"


def test_a_streamed_text_answer_that_starts_like_json_but_is_too_large_is_refused() -> None:
    ex = exchange()  # max_response_bytes 4096
    json_request(ex)
    ex.handle(headers(RESP, ("content-type", "text/plain")))
    assert ex.handle(Body(RESP, b'["' + b"x" * 3000, False)) == []
    [reply] = ex.handle(Body(RESP, b"x" * 3000, False))
    assert isinstance(reply, Reject)
    assert reply.status == 502
