"""JSON read one way only: the strict loader, keys and long numbers masked, text bodies read as JSON,
declared charsets, and the depth limit. Unit level, then through the exchange."""

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.errors import ClientError, ExtProcError, UpstreamError
from extproc.exchange import Exchange
from extproc.mask.bodies import (
    MAX_JSON_DEPTH,
    BufferedJson,
    BufferedText,
    DuplicateKey,
    JsonMasker,
    TooDeep,
    json_depth,
    loads_strict,
    text_codec,
)
from extproc.mask.registry import declared_codec
from extproc.model import Body, BodyMode, Direction, Headers, ProtocolConfig, Reject, ReplaceBody, StreamChunk

from .rules_fixture import inspector
from .test_exchange import SNAPSHOT, headers, json_request

INSPECTOR = inspector()
TOO_LARGE = ClientError("too large", code="body_too_large")
INVALID = ClientError("request body is not valid JSON", code="invalid_json")
UNDECODABLE = ClientError("request body cannot be read", code="invalid_body")
CARD = "4111111111111111"
REQ, RESP = Direction.REQUEST, Direction.RESPONSE


def process(body: bytes, **options: Any) -> bytes:
    processor = BufferedJson(INSPECTOR, 1 << 20, TOO_LARGE, INVALID, **options)
    return processor.feed(body) + processor.finish()


def refusal(body: bytes, **options: Any) -> ExtProcError:
    with pytest.raises(ExtProcError) as caught:
        process(body, **options)
    return caught.value


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- the strict loader --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error", "reason"),
    [
        ('{"a": 1, "a": 2}', DuplicateKey, "the same key twice in one object"),
        ('{"a": {"b": 1, "b": 1}}', DuplicateKey, "even with equal values, deeper down"),
        ('[{"a": 1}, {"a": 2, "c": 3, "a": 4}]', DuplicateKey, "in the second object of an array"),
        (nested(MAX_JSON_DEPTH + 1), TooDeep, "one level past the limit"),
        (nested(1000), TooDeep, "the depth that used to crash the exchange"),
        ('{"a": NaN}', ValueError, "NaN is no JSON number"),
        ("[-Infinity]", ValueError, "nor is Infinity"),
        ("[1e400]", ValueError, "a number a double cannot hold would be re-serialised as Infinity"),
        ('\ufeff{"a": 1}', ValueError, "a BOM before a str document"),
    ],
)
def test_strict_loader_refuses(text: str, error: type[Exception], reason: str) -> None:
    with pytest.raises(error):
        loads_strict(text)
    assert issubclass(error, ValueError), reason  # every refusal is a ValueError to callers


@pytest.mark.parametrize(
    ("text", "expected", "reason"),
    [
        ('{"a": 1, "b": {"a": 2}}', {"a": 1, "b": {"a": 2}}, "one key in two objects is no duplicate"),
        (nested(3), [[[]]], "nesting within the limit"),
        ('["[[[[[[", "{{{{{{"]', ["[[[[[[", "{{{{{{"], "brackets inside strings do not count"),
        ('["\\"[[["]', ['"[[['], "nor after an escaped quote"),
    ],
)
def test_strict_loader_accepts(text: str, expected: Any, reason: str) -> None:
    assert loads_strict(text) == expected, reason


def test_the_depth_limit_is_inclusive() -> None:
    loads_strict(nested(MAX_JSON_DEPTH))
    with pytest.raises(TooDeep):
        loads_strict(nested(MAX_JSON_DEPTH + 1))


def test_strict_loader_reads_bytes_as_rfc_8259_allows() -> None:
    document = {"a": "é"}
    for encoding in ("utf-8", "utf-16", "utf-32-le"):
        assert loads_strict(json.dumps(document, ensure_ascii=False).encode(encoding)) == document, encoding


@given(st.integers(min_value=0, max_value=300))
def test_json_depth_is_exact_on_nested_arrays_and_objects(depth: int) -> None:
    text = "".join('{"k": [' for _ in range(depth)) + '"]}"' + "".join("]}" for _ in range(depth))
    assert json_depth(text) == 2 * depth
    assert json_depth(json.dumps({"a": [1, {"b": "[[[["}]})) == 3


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9\ud800', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=30,
)


def reference_depth(node: Any) -> int:
    if isinstance(node, list):
        return 1 + max(map(reference_depth, node), default=0)
    if isinstance(node, dict):
        return 1 + max(map(reference_depth, node.values()), default=0)
    return 0


@given(JSON_VALUES, st.booleans())
def test_json_depth_matches_a_recursive_count_on_any_document(document: Any, ascii_only: bool) -> None:
    # Brackets, quotes and backslashes inside strings and keys must not count.
    assert json_depth(json.dumps(document, ensure_ascii=ascii_only)) == reference_depth(document)


def test_depth_is_checked_before_anything_recurses() -> None:
    # Far past the interpreter's recursion limit: refused by counting, not by a RecursionError.
    with pytest.raises(TooDeep):
        loads_strict(nested(100_000))


# -- duplicate keys, numbers and keys through the JSON body processor ----------------------------------


def test_duplicate_keys_are_refused_naming_the_key_not_the_value() -> None:
    error = refusal(f'{{"content": "{CARD}", "content": "hello"}}'.encode())
    assert error.code == "invalid_json"
    assert error.message == 'request body is not valid JSON: duplicate key "content"'
    assert CARD not in error.message
    assert "hello" not in error.message


def test_a_duplicated_key_holding_a_value_is_named_masked() -> None:
    error = refusal(f'{{"{CARD}": 1, "{CARD}": 2}}'.encode())
    assert CARD not in error.message
    assert "[REDACTED:CREDIT_CARD]" in error.message


def test_duplicate_keys_are_refused_even_when_unparseable_json_is_masked_as_text() -> None:
    assert refusal(b'{"a": 1, "a": 2}', as_text=True).code == "invalid_json"


def test_duplicate_keys_in_json_held_in_a_string_are_refused() -> None:
    # Tool arguments are JSON in a string; with an escape in them they are decoded, strictly, too.
    arguments = '{"to": "jane\\u0040example.com", "to": "nobody"}'
    body = json.dumps({"tool_calls": [{"function": {"arguments": arguments}}]}).encode()
    assert "duplicate key" in refusal(body).message


@pytest.mark.parametrize(
    ("body", "expected", "reason"),
    [
        ('{"n": 4111111111111111}', {"n": "[REDACTED:CREDIT_CARD]"}, "a card as a JSON integer"),
        ('{"n": -4111111111111111}', {"n": "-[REDACTED:CREDIT_CARD]"}, "negative"),
        ("[4111111111111111.0]", ["[REDACTED:CREDIT_CARD].0"], "a card as the integer part of a float"),
        ("[4.111111111111111e15]", ["[REDACTED:CREDIT_CARD].0"], "exponent form, re-serialised as digits"),
        ('{"n": 4111111111111112}', None, "fails Luhn: stays a number"),
        ('{"n": 123456789012}', None, "a 12-digit id that no rule reports"),
        ('{"n": 1700000000, "t": 0.4}', None, "short numbers are not scanned"),
        ('{"n": true, "m": null}', None, "literals are not numbers"),
    ],
)
def test_long_numbers_are_scanned_and_masked_as_strings(body: str, expected: Any, reason: str) -> None:
    out = process(body.encode())
    if expected is None:
        assert out == body.encode(), reason
    else:
        assert json.loads(out) == expected, reason


def test_a_float_is_scanned_as_its_literal_and_as_it_would_be_re_serialised() -> None:
    # Nothing here but the float's literal form differs from repr: an e-mail elsewhere forces a rewrite.
    body = b'{"e": "jane@example.com", "n": 4.111111111111111e15}'
    out = json.loads(process(body))
    assert out == {"e": "[REDACTED:EMAIL_ADDRESS]", "n": "[REDACTED:CREDIT_CARD].0"}


@pytest.mark.parametrize(
    ("body", "expected", "reason"),
    [
        (f'{{"{CARD}": 1}}', {"[REDACTED:CREDIT_CARD]": 1}, "a card as an object key"),
        (
            f'{{"a": {{"jane@example.com": "x"}}, "b": [{{"{CARD}": "y"}}]}}',
            {"a": {"[REDACTED:EMAIL_ADDRESS]": "x"}, "b": [{"[REDACTED:CREDIT_CARD]": "y"}]},
            "keys at any depth",
        ),
        (
            '{"4111111111111111": 1, "5500000000000004": 2}',
            {"[REDACTED:CREDIT_CARD]": 1, "[REDACTED:CREDIT_CARD]#2": 2},
            "two keys masked alike are kept apart",
        ),
        (
            '{"[REDACTED:CREDIT_CARD]": 0, "4111111111111111": 1, "[REDACTED:CREDIT_CARD]#2": 2}',
            {"[REDACTED:CREDIT_CARD]": 0, "[REDACTED:CREDIT_CARD]#3": 1, "[REDACTED:CREDIT_CARD]#2": 2},
            "a masked key never takes the place of a key that was sent as is",
        ),
    ],
)
def test_object_keys_are_masked_and_kept_distinct(body: str, expected: Any, reason: str) -> None:
    out = json.loads(process(body.encode()))
    assert out == expected, reason
    assert list(out) == list(expected), reason  # order kept


def test_masked_keys_in_place_keep_their_order() -> None:
    node: dict[str, Any] = {"id": "x", CARD: 1, "choices": [], "z": 4111111111111111}
    masker = JsonMasker(INSPECTOR)
    assert masker.fields(node, frozenset({"choices"}))
    assert node == {"id": "x", "[REDACTED:CREDIT_CARD]": 1, "choices": [], "z": "[REDACTED:CREDIT_CARD]"}
    assert list(node) == ["id", "[REDACTED:CREDIT_CARD]", "choices", "z"]


def test_a_document_past_the_depth_limit_is_invalid_json() -> None:
    error = refusal(nested(1000).encode())
    assert (error.code, error.message) == (
        "invalid_json",
        f"request body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels",
    )


def test_json_in_a_string_counts_towards_the_depth_limit() -> None:
    inner = json.dumps([[["a\\u0040b"]]])  # 3 levels, decoded because of its escape
    assert process(json.dumps({"arguments": inner}).encode())  # 1 + 3 levels: fine
    deep: Any = {"arguments": inner}
    for _ in range(MAX_JSON_DEPTH - 3):
        deep = [deep]
    assert json_depth(json.dumps(deep)) == MAX_JSON_DEPTH - 2  # the outer document alone is fine
    assert "nested deeper" in refusal(json.dumps(deep).encode()).message


# -- text and untyped bodies read as JSON --------------------------------------------------------------

ESCAPED_CARD = "".join(f"\\u{ord(c):04x}" for c in CARD)


@pytest.mark.parametrize(
    ("body", "expected", "reason"),
    [
        (
            f'{{"content": "{ESCAPED_CARD}"}}',
            b'{"content":"[REDACTED:CREDIT_CARD]"}',
            "escapes are decoded: the receiver parses JSON",
        ),
        (f'["{ESCAPED_CARD}"]', b'["[REDACTED:CREDIT_CARD]"]', "an array too"),
        (f'"{ESCAPED_CARD}"', f'"{ESCAPED_CARD}"'.encode(), "a JSON string alone is text, as sent"),
        ("my card is 4111 1111 1111 1111", b"my card is [REDACTED:CREDIT_CARD]", "prose is text"),
        ("{not json 4111111111111111", b"{not json [REDACTED:CREDIT_CARD]", "JSON-looking text is text"),
    ],
)
def test_a_text_body_that_parses_as_json_is_read_as_json(body: str, expected: bytes, reason: str) -> None:
    assert process(body.encode(), sniff=True) == expected, reason


def test_a_text_body_with_duplicate_keys_is_refused_not_read_as_text() -> None:
    assert refusal(b'{"content": "x", "content": "y"}', sniff=True).code == "invalid_json"


# -- declared charsets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "codec", "reason"),
    [
        ("utf-8", "utf-8", "the default"),
        ("UTF8", "utf-8", "an alias"),
        ("us-ascii", "ascii", "read as UTF-8, a superset"),
        ('"latin-1"', "iso8859-1", "quoted"),
        ("utf-16", "utf-16", "a wide charset"),
    ],
)
def test_declared_charsets_map_to_python_codecs(charset: str, codec: str, reason: str) -> None:
    assert text_codec(charset) == codec, reason


@pytest.mark.parametrize(
    ("charset", "reason"),
    [
        ("klingon", "unknown"),
        ("rot13", "a codec that is not a character set"),
        ("base64", "bytes to bytes"),
        ("unicode_escape", "Python's escapes, no charset a receiver knows"),
        ("", "empty"),
    ],
)
def test_charsets_that_are_not_charsets_are_refused(charset: str, reason: str) -> None:
    with pytest.raises(LookupError):
        text_codec(charset)
    assert reason


def test_two_different_charsets_in_one_content_type_are_refused() -> None:
    both = Headers(REQ, (("content-type", "text/plain; charset=utf-8; charset=utf-16"),), False)
    with pytest.raises(LookupError):
        declared_codec(both)
    same = Headers(REQ, (("content-type", "text/plain; charset=utf-8; Charset=UTF8"),), False)
    assert declared_codec(same) == "utf-8"


@pytest.mark.parametrize("charset", ["utf-16", "utf-16-be", "iso8859-1", "cp1252", "utf-32"])
def test_text_in_a_declared_charset_is_masked_and_stays_in_it(charset: str) -> None:
    body = "café, card 4111 1111 1111 1111".encode(charset)
    processor = BufferedText(INSPECTOR, 1 << 20, TOO_LARGE, charset=charset, undecodable=UNDECODABLE)
    out = processor.feed(body) + processor.finish()
    assert out.decode(charset) == "café, card [REDACTED:CREDIT_CARD]"


@pytest.mark.parametrize("charset", ["utf-16", "iso8859-1"])
def test_json_in_a_declared_charset_is_masked_and_stays_in_it(charset: str) -> None:
    body = json.dumps({"a": f"café {CARD}"}, ensure_ascii=False).encode(charset)
    out = process(body, charset=charset, undecodable=UNDECODABLE)
    assert json.loads(out.decode(charset)) == {"a": "café [REDACTED:CREDIT_CARD]"}


def test_a_body_that_does_not_decode_as_declared_is_refused() -> None:
    error = refusal(b'{"a": "x"}\xff', charset="utf-16", undecodable=UNDECODABLE)
    assert (error.code, error.message) == (
        "invalid_body",
        "request body cannot be read: the body does not decode as utf-16",
    )


def test_a_body_that_reads_as_a_value_in_utf8_is_refused_whatever_its_declared_charset() -> None:
    # Even-length UTF-8 decodes as UTF-16 into CJK characters with nothing to find; a receiver ignoring
    # the charset reads the card.
    body = b"card 4111 1111 1111 1111 !"
    assert len(body) % 2 == 0
    assert "4111" not in body.decode("utf-16")
    processor = BufferedText(INSPECTOR, 1 << 20, TOO_LARGE, charset="utf-16", undecodable=UNDECODABLE)
    processor.feed(body)
    with pytest.raises(ExtProcError, match="reads differently as UTF-8"):
        processor.finish()


# -- through the exchange ---------------------------------------------------------------------------


def request(content_type: str | None, body: bytes) -> Any:
    ex = Exchange(SNAPSHOT, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d-1")
    items = [("content-length", str(len(body))), ("x-request-id", "r-1")]
    if content_type is not None:
        items.append(("content-type", content_type))
    [reply] = ex.handle(Headers(REQ, ((":path", "/v1/chat/completions"), *items), False))
    if isinstance(reply, Reject):
        return reply
    [reply] = ex.handle(Body(REQ, body, True))
    return reply


@pytest.mark.parametrize(
    ("content_type", "body", "code", "status", "reason"),
    [
        ("application/json", b'{"a": 1, "a": 2}', "invalid_json", 400, "duplicate keys"),
        ("application/json", nested(1000).encode(), "invalid_json", 400, "too deep, not a 503"),
        ("text/plain", b'{"a": 1, "a": 2}', "invalid_json", 400, "duplicate keys in a text body"),
        (None, b'{"a": 1, "a": 2}', "invalid_json", 400, "duplicate keys in an untyped body"),
        ("text/plain; charset=klingon", b"hi", "unsupported_media_type", 415, "an unknown charset"),
        ("application/json; charset=rot13", b"{}", "unsupported_media_type", 415, "not a charset"),
        ("text/plain; charset=utf-16", b"abc", "invalid_body", 400, "odd bytes in UTF-16"),
        ("application/x-ndjson; charset=utf-16", b"{}", "unsupported_media_type", 415, "NDJSON is UTF-8"),
    ],
)
def test_requests_read_differently_are_refused(
    content_type: str | None, body: bytes, code: str, status: int, reason: str
) -> None:
    reply = request(content_type, body)
    assert isinstance(reply, Reject), reason
    assert (reply.status, json.loads(reply.body)["error"]) == (status, code), reason


@pytest.mark.parametrize(
    ("content_type", "body", "expected", "reason"),
    [
        (None, f'{{"c": "{ESCAPED_CARD}"}}'.encode(), b'{"c":"[REDACTED:CREDIT_CARD]"}', "untyped JSON"),
        ("text/plain", f'{{"c": {CARD}}}'.encode(), b'{"c":"[REDACTED:CREDIT_CARD]"}', "text JSON, a number"),
        (
            "text/plain; charset=utf-16",
            "card 4111 1111 1111 1111".encode("utf-16"),
            "card [REDACTED:CREDIT_CARD]".encode("utf-16"),
            "UTF-16 text",
        ),
        (
            "application/json; charset=latin-1",
            f'{{"c": "café {CARD}"}}'.encode("latin-1"),
            b'{"c":"caf\\u00e9 [REDACTED:CREDIT_CARD]"}',
            "latin-1 JSON, re-encoded in latin-1 (escaped, so in any charset)",
        ),
    ],
)
def test_requests_are_masked_as_the_model_server_reads_them(
    content_type: str | None, body: bytes, expected: bytes, reason: str
) -> None:
    reply = request(content_type, body)
    assert isinstance(reply, ReplaceBody), reason
    assert reply.data == expected, reason
    assert reply.changes.set == (("content-length", str(len(expected))),), reason


def test_a_text_request_read_as_json_gets_the_policy_checks_of_json() -> None:
    # The model named in a text body that is JSON is the model the policy decides on.
    ex = Exchange(SNAPSHOT, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d-1")
    ex.handle(Headers(REQ, ((":path", "/v1/chat/completions"), ("content-type", "text/plain")), False))
    ex.handle(Body(REQ, b'{"model": "m-1", "messages": []}', True))
    assert ex.model == "m-1"


def response(content_type: str, body: bytes, mode: BodyMode = BodyMode.BUFFERED) -> list[Any]:
    ex = Exchange(SNAPSHOT, ProtocolConfig(BodyMode.BUFFERED, mode), "d-1")
    json_request(ex)
    replies = ex.handle(headers(RESP, (":status", "200"), ("content-type", content_type)))
    if replies and isinstance(replies[0], Reject):
        return replies
    return replies + ex.handle(Body(RESP, body, True))


@pytest.mark.parametrize(
    ("content_type", "body", "mode", "reason"),
    [
        ("application/json", b'{"a": 1, "a": 2}', BodyMode.FULL_DUPLEX_STREAMED, "duplicate keys"),
        ("application/json", nested(1000).encode(), BodyMode.FULL_DUPLEX_STREAMED, "too deep"),
        ("text/plain", b'{"a": 1, "a": 2}', BodyMode.BUFFERED, "duplicate keys in a buffered text answer"),
        ("text/plain; charset=klingon", b"x", BodyMode.BUFFERED, "an unknown charset"),
        ("text/event-stream; charset=utf-16", b"x", BodyMode.FULL_DUPLEX_STREAMED, "a stream is UTF-8"),
        ("text/plain; charset=latin-1", b"x", BodyMode.FULL_DUPLEX_STREAMED, "streamed text is UTF-8"),
    ],
)
def test_answers_read_differently_are_unscannable(
    content_type: str, body: bytes, mode: BodyMode, reason: str
) -> None:
    replies = response(content_type, body, mode)
    rejects = [r for r in replies if isinstance(r, Reject)]
    assert rejects, reason
    assert (rejects[0].status, json.loads(rejects[0].body)["error"]) == (502, "upstream_unscannable"), reason


def test_a_buffered_text_answer_that_is_json_is_read_as_json() -> None:
    replies = response("text/plain", f'{{"content": "{ESCAPED_CARD}"}}'.encode())
    [reply] = [r for r in replies if isinstance(r, ReplaceBody | StreamChunk)]
    assert reply.data == b'{"content":"[REDACTED:CREDIT_CARD]"}'


def test_a_json_answer_in_latin1_is_masked_in_latin1() -> None:
    body = f'{{"content": "olé {CARD}"}}'.encode("latin-1")
    replies = response("application/json; charset=iso-8859-1", body, BodyMode.FULL_DUPLEX_STREAMED)
    [chunk] = [r for r in replies if isinstance(r, StreamChunk)]
    assert json.loads(chunk.data.decode("latin-1")) == {"content": "olé [REDACTED:CREDIT_CARD]"}


def test_undecodable_answers_are_upstream_errors() -> None:
    replies = response("application/json; charset=utf-16", b'{"a": 1}\xff', BodyMode.FULL_DUPLEX_STREAMED)
    [reject] = [r for r in replies if isinstance(r, Reject)]
    assert json.loads(reject.body)["error"] == "upstream_unscannable"
    assert UpstreamError("x").code == "upstream_unscannable"
