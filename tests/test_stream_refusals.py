"""A streamed answer refused by the policy part-way (a ``block`` or ``approve`` verdict on a finding of the
answer) ends with an error event: what was held for the refused value must never go out in clear."""

import json
from functools import cache
from pathlib import Path

import pytest

from extproc.detect.rules import load_rules
from extproc.errors import ExtProcError, UpstreamError
from extproc.mask import Inspector
from extproc.mask.ndjson import NdjsonStream
from extproc.mask.sse import EventStream
from extproc.model import Finding
from extproc.policy import PolicyDenied

PACK = Path(__file__).resolve().parent.parent / "rules"
TOO_LARGE = UpstreamError("too large", code="upstream_too_large")


@cache
def default_pack() -> Inspector:
    return Inspector.build(load_rules([PACK]), hash_key=b"test-hash-key-0123456789")


class BlockCards:
    """Cards refused, everything else masked."""

    class _Mask:
        action = "mask"
        strategy = None

    def verdict(self, finding: Finding) -> "BlockCards._Mask":
        if finding.entity == "CREDIT_CARD":
            raise PolicyDenied("card refused", code="policy_blocked")
        return self._Mask()


def chat(text: str, index: int = 0) -> bytes:
    chunk = {"choices": [{"index": index, "delta": {"content": text}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def run_until_refused(processor: EventStream | NdjsonStream, pieces: list[bytes]) -> bytes:
    out = b""
    for piece in pieces:
        try:
            out += processor.feed(piece)
        except ExtProcError:
            return out + processor.cut()
    try:
        return out + processor.finish()
    except ExtProcError:
        return out + processor.cut()


def test_regression_a_refused_card_split_across_events_is_not_released_in_clear_on_the_cut() -> None:
    processor = EventStream(default_pack().scoped(BlockCards()), 1 << 16, TOO_LARGE)
    out = run_until_refused(
        processor,
        [chat("Hello there. "), chat("card 4111 1111 1111 111"), chat("1 and that is all. "), chat("More. ")],
    )
    assert b"4111" not in out
    assert b"1111 111" not in out


def test_regression_a_masked_value_released_with_a_refused_one_is_not_released_in_clear() -> None:
    # The e-mail (masked) and the card (refused) are settled by the same release: the card's refusal
    # must not leave the address's pieces unmasked in what the cut releases.
    processor = EventStream(default_pack().scoped(BlockCards()), 1 << 16, TOO_LARGE)
    out = run_until_refused(
        processor, [chat("Hi. jane@exam"), chat("ple.com 4111 1111 1111 111"), chat("1 and that is all. ")]
    )
    assert b"jane@exam" not in out
    assert b"4111" not in out


def test_regression_a_refused_card_split_across_ndjson_lines_is_not_released_in_clear() -> None:
    def line(text: str) -> bytes:
        return json.dumps({"message": {"role": "assistant", "content": text}, "done": False}).encode() + b"\n"

    processor = NdjsonStream(default_pack().scoped(BlockCards()), 1 << 16, TOO_LARGE)
    out = run_until_refused(
        processor, [line("Hello there. "), line("card 4111 1111 1111 111"), line("1 and that is all. ")]
    )
    assert b"4111" not in out


def test_regression_a_repeated_key_in_an_event_is_not_named_in_clear_in_the_error() -> None:
    card = "4111111111111111"
    body = b'data: {"' + card.encode() + b'": 1, "' + card.encode() + b'": 2}\n\n'
    for processor in (
        EventStream(default_pack(), 1 << 16, TOO_LARGE),
        NdjsonStream(default_pack(), 1 << 16, TOO_LARGE),
    ):
        data = body if isinstance(processor, EventStream) else body.removeprefix(b"data: ").rstrip() + b"\n"
        with pytest.raises(UpstreamError) as refused:
            processor.feed(data)
        assert card not in refused.value.message
        assert card not in str(refused.value)


CARD = "4111 1111 1111 1111"


def escaped(text: str) -> str:
    return json.dumps(text).replace("4", "\\u0034").replace("1", "\\u0031")


def test_regression_an_event_that_is_a_json_string_is_scanned_as_its_receiver_decodes_it() -> None:
    sse = EventStream(default_pack(), 1 << 16, TOO_LARGE)
    out = sse.feed(b"data: " + escaped(CARD).encode() + b"\n\n") + sse.finish()
    assert "4111" not in json.loads(out.decode().removeprefix("data: "))
    ndjson = NdjsonStream(default_pack(), 1 << 16, TOO_LARGE)
    out = ndjson.feed(escaped(CARD).encode() + b"\n") + ndjson.finish()
    assert "4111" not in json.loads(out)


@pytest.mark.parametrize(
    "document",
    [
        {"x": {"4111111111111111": 1}},
        {"x": 4111111111111111},
        {"x": [4.111111111111111e15]},
        {"choices": [{"index": 0, "delta": {"content": "hi"}}], "4111111111111111": True},
        {"choices": [{"index": 0, "delta": {"content": "hi"}, "x": 4111111111111111}]},
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a"}, "n": -4111111111111111},
    ],
)
def test_regression_a_card_as_a_key_or_a_long_number_inside_an_event_is_masked(document: object) -> None:
    sse = EventStream(default_pack(), 1 << 16, TOO_LARGE)
    out = sse.feed(b"data: " + json.dumps(document).encode() + b"\n\n") + sse.finish()
    assert "4111" not in json.dumps(json.loads(out.decode().removeprefix("data: ")))
    assert [f.entity for f in sse.findings] == ["CREDIT_CARD"]
    ndjson = NdjsonStream(default_pack(), 1 << 16, TOO_LARGE)
    out = ndjson.feed(json.dumps(document).encode() + b"\n") + ndjson.finish()
    assert "4111" not in json.dumps(json.loads(out))


def test_regression_invisible_characters_alone_are_released_and_cost_linear_time() -> None:
    # Characters the normalised view drops move no view offset: they were held to the end of the stream,
    # and each piece copied everything held so far (quadratic time on an answer of zero-width spaces).
    scanner = default_pack().detector.stream()
    released = ""
    for _ in range(4000):
        out, _found = scanner.feed("\u200b" * 1000)
        released += out
    assert scanner.held == 0
    assert len(released) == 4_000_000
    assert len(scanner._original) < 1000  # what is held, not what was released
    tail = "card 4111\u200b 1111 1111 1111\u200b end"
    out, found = scanner.feed(tail)
    more, rest = scanner.finish()
    assert out + more == tail
    block = default_pack().detector.scan(tail)
    shift = 4_000_000
    assert sorted((f.rule_id, f.start - shift, f.end - shift) for f in found + rest) == sorted(
        (f.rule_id, f.start, f.end) for f in block
    )
