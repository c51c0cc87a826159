"""Content-coding decoders: exact round trips in any chunking, stacked codings, and compression bombs
stopped after at most ``limit`` + one piece of output, with memory to match."""

import gzip
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from functools import cache

import brotli
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.mask.encoding import (
    MAX_CODINGS,
    SUPPORTED,
    DecodeError,
    Decoder,
    UnsupportedEncoding,
    decoder_for,
    parse_content_encoding,
)

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

KIB = 1024
MIB = 1024 * KIB
PIECE = 64 * KIB  # the most output a decoder is asked for at once (encoding._CHUNK)
ZEROS = bytes(MIB)
BOMB_BLOCKS = 1024  # 1 GiB of zeros
LIMIT = MIB


class TooLarge(Exception):
    pass


TOO_LARGE = TooLarge("decoded body too large")


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# label -> (content-coding, encoder); "deflate-raw" is deflate as some servers send it, without zlib's wrapper
ENCODERS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "gzip": ("gzip", lambda data: gzip.compress(data, mtime=0)),
    "x-gzip": ("x-gzip", lambda data: gzip.compress(data, mtime=0)),
    "deflate": ("deflate", zlib.compress),
    "deflate-raw": ("deflate", raw_deflate),
    "br": ("br", lambda data: brotli.compress(data, quality=5)),
    "zstd": ("zstd", zstd.compress),
}
LABELS = sorted(ENCODERS)
TEXT = b"".join(b"line %d: the quick brown fox jumps over the lazy dog\n" % i for i in range(4000))


def encode(label: str, data: bytes) -> bytes:
    return ENCODERS[label][1](data)


def run(codings: list[str], body: bytes, cuts: list[int] | None = None, limit: int = 64 * MIB) -> bytes:
    """Feeds ``body`` cut into pieces of the given sizes (the rest at once), then finishes."""
    decoder = decoder_for(codings, limit, TOO_LARGE)
    out, position = [], 0
    for size in cuts or []:
        out.append(decoder.feed(body[position : position + size]))
        position += size
    out.append(decoder.feed(body[position:]))
    out.append(decoder.finish())
    return b"".join(out)


def one_byte_at_a_time(codings: list[str], body: bytes) -> bytes:
    return run(codings, body, [1] * len(body))


# --- parse_content_encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "codings"),
    [
        (None, []),
        ("", []),
        ("identity", []),
        ("gzip", ["gzip"]),
        ("GZip", ["gzip"]),
        ("deflate, br", ["deflate", "br"]),
        (" br ,, identity , zstd ", ["br", "zstd"]),
        ("x-gzip", ["x-gzip"]),
        ("gzip, gzip", ["gzip", "gzip"]),
        ("compress", ["compress"]),  # parsing does not judge; decoder_for does
    ],
)
def test_parse_content_encoding(value: str | None, codings: list[str]) -> None:
    assert parse_content_encoding(value) == codings


def test_supported_codings() -> None:
    assert frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"}) == SUPPORTED


# --- round trips ----------------------------------------------------------------------------------------

bodies = st.one_of(
    st.binary(max_size=2000),  # incompressible
    st.text(alphabet='ab \n{}"é', max_size=3000).map(lambda text: text.encode()),  # compressible
)


@settings(max_examples=150, deadline=None)
@given(label=st.sampled_from(LABELS), data=bodies, chunking=st.data())
def test_round_trip_in_any_chunking(label: str, data: bytes, chunking: st.DataObject) -> None:
    body = encode(label, data)
    cuts = chunking.draw(st.lists(st.integers(1, max(1, len(body))), max_size=12))
    assert run([ENCODERS[label][0]], body, cuts) == data


@pytest.mark.parametrize("label", LABELS)
def test_round_trip_one_byte_at_a_time(label: str) -> None:
    # ~230 KB of output: several pieces per decoder, each asked for while the input is one byte long
    body = encode(label, TEXT)
    assert one_byte_at_a_time([ENCODERS[label][0]], body) == TEXT


@pytest.mark.parametrize("label", LABELS)
def test_highly_compressed_input_in_one_feed(label: str) -> None:
    # one small input yielding many pieces: the drain loops must collect every byte the decoder owes
    data = b"\0" * (3 * MIB + 17) + TEXT
    assert run([ENCODERS[label][0]], encode(label, data)) == data


# What the libraries themselves make of a prefix of a stream when nothing bounds their output.
UNBOUNDED: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda body: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body),
    "x-gzip": lambda body: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body),
    "deflate": lambda body: zlib.decompressobj(zlib.MAX_WBITS).decompress(body),
    "deflate-raw": lambda body: zlib.decompressobj(-zlib.MAX_WBITS).decompress(body),
    "br": lambda body: brotli.Decompressor().process(body),
    "zstd": lambda body: zstd.ZstdDecompressor().decompress(body),
}


@pytest.mark.parametrize("label", LABELS)
def test_feed_holds_back_nothing_the_input_decodes_to(label: str) -> None:
    # Output is asked for a piece at a time; when a piece comes back full with the input all consumed, the
    # decoder may still owe bytes (zlib: the rest of a match), which must come out now, not with the next
    # chunk. Every prefix of bodies decoding to just over one piece hits that for zlib.
    for size in range(PIECE + 1, PIECE + 5):
        body = encode(label, bytes(size))
        for cut in range(1, len(body)):
            decoder = decoder_for([ENCODERS[label][0]], 64 * MIB, TOO_LARGE)
            assert decoder.feed(body[:cut]) == UNBOUNDED[label](body[:cut]), (size, cut)


def test_empty_body_decodes_to_nothing() -> None:
    for coding in SUPPORTED:
        assert run([coding], b"") == b""


def test_identity_passes_bytes_through_and_still_enforces_the_limit() -> None:
    assert run([], TEXT, [1, 2, 3, 70_000]) == TEXT
    decoder = decoder_for([], 10, TOO_LARGE)
    assert decoder.feed(b"0123456789") == b"0123456789"
    with pytest.raises(TooLarge):
        decoder.feed(b"x")


# --- stacked codings ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    stack=st.lists(st.sampled_from(LABELS), min_size=2, max_size=MAX_CODINGS),
    data=bodies,
    chunking=st.data(),
)
def test_stacked_codings_are_undone_last_applied_first(
    stack: list[str], data: bytes, chunking: st.DataObject
) -> None:
    body = data
    for label in stack:  # the header lists codings in the order they were applied
        body = encode(label, body)
    header = ", ".join(ENCODERS[label][0] for label in stack)
    cuts = chunking.draw(st.lists(st.integers(1, max(1, len(body))), max_size=8))
    assert run(parse_content_encoding(header), body, cuts) == data


def test_gzip_then_br_means_br_is_the_outer_layer() -> None:
    body = brotli.compress(gzip.compress(TEXT))
    assert run(parse_content_encoding("gzip, br"), body) == TEXT
    assert one_byte_at_a_time(["gzip", "br"], body) == TEXT
    with pytest.raises(DecodeError, match="gzip"):  # the outer layer read as gzip
        run(parse_content_encoding("br, gzip"), body)


# --- several gzip members, several zstd frames, two kinds of deflate -------------------------------------


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.binary(max_size=300), min_size=2, max_size=5), chunking=st.data())
def test_gzip_members_are_all_decoded(parts: list[bytes], chunking: st.DataObject) -> None:
    body = b"".join(gzip.compress(part, mtime=0) for part in parts)
    cuts = chunking.draw(st.lists(st.integers(1, len(body)), max_size=10))
    assert run(["gzip"], body, cuts) == b"".join(parts)


def test_gzip_members_one_byte_at_a_time() -> None:
    body = gzip.compress(TEXT) + gzip.compress(b"") + gzip.compress(b"tail")
    assert one_byte_at_a_time(["gzip"], body) == TEXT + b"tail"


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.binary(max_size=300), min_size=2, max_size=5), chunking=st.data())
def test_zstd_frames_are_all_decoded(parts: list[bytes], chunking: st.DataObject) -> None:
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"pad"
    body = skippable.join(zstd.compress(part) for part in parts)
    cuts = chunking.draw(st.lists(st.integers(1, len(body)), max_size=10))
    assert run(["zstd"], body, cuts) == b"".join(parts)


def test_deflate_accepts_zlib_wrapped_and_raw_streams() -> None:
    wrapped, raw = zlib.compress(TEXT), raw_deflate(TEXT)
    assert wrapped[:2] != raw[:2]
    for body in (wrapped, raw):
        assert run(["deflate"], body) == TEXT
        assert one_byte_at_a_time(["deflate"], body) == TEXT  # the header is judged once two bytes are in


def test_zstd_frame_asking_for_a_window_over_8_mib_is_refused() -> None:
    compressor = zstd.ZstdCompressor(options={zstd.CompressionParameter.window_log: 24})
    body = compressor.compress(TEXT) + compressor.flush()
    with pytest.raises(DecodeError, match=r"zstd.*memory"):
        run(["zstd"], body)


# --- compression bombs ----------------------------------------------------------------------------------


def _flushed_deflate_bomb(wbits: int) -> bytes:
    """1 GiB of zeros as a deflate stream (gzip, zlib or raw, by ``wbits``), without its trailer, which a
    decoder that stops in time never reaches. A full flush resets the compressor, so every further 1 MiB
    block compresses to the same bytes; the check below proves it rather than compressing 1 GiB (7 s)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = compressor.compress(ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH)
    block, again = (compressor.compress(ZEROS) + compressor.flush(zlib.Z_FULL_FLUSH) for _ in range(2))
    assert block == again
    return head + block * (BOMB_BLOCKS - 1)


def _streamed_bomb(
    compress: Callable[[bytes], bytes],
    end: Callable[[], bytes],
    block: bytes = ZEROS,
    count: int = BOMB_BLOCKS,
) -> bytes:
    """1 GiB of zeros (by default) through a streaming compressor, 1 MiB at a time: a complete, valid
    stream, built without ever holding what it decodes to."""
    return b"".join(compress(block) for _ in range(count)) + end()


def _brotli_bomb() -> bytes:
    compressor = brotli.Compressor(quality=1)
    return _streamed_bomb(compressor.process, compressor.finish)


def _zstd_bomb() -> bytes:
    compressor = zstd.ZstdCompressor(level=1)
    return _streamed_bomb(compressor.compress, compressor.flush)


BOMBS: dict[str, Callable[[], bytes]] = {
    "gzip": lambda: _flushed_deflate_bomb(16 + zlib.MAX_WBITS),
    "gzip-members": lambda: gzip.compress(ZEROS) * BOMB_BLOCKS,
    "deflate": lambda: _flushed_deflate_bomb(zlib.MAX_WBITS),
    "deflate-raw": lambda: _flushed_deflate_bomb(-zlib.MAX_WBITS),
    "br": _brotli_bomb,
    "zstd": _zstd_bomb,
    "zstd-frames": lambda: zstd.compress(ZEROS) * BOMB_BLOCKS,
}
BOMB_CODING = {"gzip-members": "gzip", "deflate-raw": "deflate", "zstd-frames": "zstd"}


@cache
def bomb(label: str) -> bytes:
    return BOMBS[label]()


@pytest.mark.parametrize("label", sorted(BOMBS))
def test_bombs_are_what_they_claim(label: str) -> None:
    # Decoded with no limit, a bomb's start is valid data of its coding, nothing but zeros, and far more
    # than the limit comes out of its first few kilobytes.
    body = bomb(label)
    decoder = decoder_for([BOMB_CODING.get(label, label)], 1 << 40, TOO_LARGE)
    decoded = zeros = fed = 0
    while decoded <= 8 * LIMIT:
        out = decoder.feed(body[fed : fed + KIB])
        fed += KIB
        decoded, zeros = decoded + len(out), zeros + out.count(0)
    assert zeros == decoded
    assert fed <= 16 * KIB
    assert len(body) > 16 * KIB


@pytest.mark.parametrize("label", sorted(BOMBS))
def test_a_1_gib_bomb_in_one_feed_stops_at_the_limit_with_bounded_memory(label: str) -> None:
    body = bomb(label)
    decoder = decoder_for([BOMB_CODING.get(label, label)], LIMIT, TOO_LARGE)
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge) as raised:
            decoder.feed(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert raised.value is TOO_LARGE
    assert LIMIT < decoder.decoded <= LIMIT + PIECE
    # the output kept until the limit, one piece, one 64 KiB input slice, zlib's window: nowhere near 1 GiB
    assert peak < LIMIT + 512 * KIB, f"{label}: peak {peak} bytes traced"


@pytest.mark.parametrize("label", sorted(BOMBS))
def test_a_bomb_in_envoy_sized_chunks_is_stopped_early(label: str) -> None:
    body = bomb(label)
    decoder = decoder_for([BOMB_CODING.get(label, label)], LIMIT, TOO_LARGE)
    fed = 0
    with pytest.raises(TooLarge):  # noqa: PT012 - the loop is what is under test
        for fed in range(0, len(body), 16 * KIB):
            decoder.feed(body[fed : fed + 16 * KIB])
    assert fed < 64 * KIB  # stopped within the first few chunks of a body of up to a megabyte
    with pytest.raises(TooLarge):  # spent: the same error again, no more decoding
        decoder.feed(b"")


def test_stacked_bomb_stops_at_the_limit() -> None:
    body = brotli.compress(bomb("gzip-members"), quality=1)
    decoder = decoder_for(["gzip", "br"], LIMIT, TOO_LARGE)
    with pytest.raises(TooLarge):
        decoder.feed(body)
    assert LIMIT < decoder.decoded <= LIMIT + PIECE


def test_outer_layer_inflating_to_empty_gzip_members_is_stopped_too() -> None:
    # 16 MiB of empty gzip members under br: no plain output at all, and work without end (as many
    # members as an attacker likes) were the outer layer's output not capped too
    members = gzip.compress(b"", mtime=0) * (MIB // 20)
    compressor = brotli.Compressor(quality=1)
    body = _streamed_bomb(compressor.process, compressor.finish, members, 16)
    decoder = decoder_for(["gzip", "br"], LIMIT, TOO_LARGE)
    with pytest.raises(TooLarge):
        decoder.feed(body)
    assert decoder.decoded == 0


# --- truncated, corrupt and unsupported input -----------------------------------------------------------


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("keep", [1, 0.5, -1])
def test_truncated_stream_is_detected_at_finish(label: str, keep: float) -> None:
    body = encode(label, TEXT)
    cut = body[: int(len(body) * keep)] if isinstance(keep, float) else body[:keep]
    decoder = decoder_for([ENCODERS[label][0]], 64 * MIB, TOO_LARGE)
    decoder.feed(cut)
    with pytest.raises(DecodeError, match=rf"{ENCODERS[label][0]}.*truncated"):
        decoder.finish()


def test_truncated_second_gzip_member_is_detected() -> None:
    body = gzip.compress(b"first") + gzip.compress(b"second")[:-3]
    with pytest.raises(DecodeError, match=r"gzip.*truncated"):
        run(["gzip"], body)


GARBAGE = b"this is plain text, not compressed data at all; " * 3


@pytest.mark.parametrize("coding", sorted(SUPPORTED))
def test_garbage_is_a_decode_error_naming_the_coding(coding: str) -> None:
    with pytest.raises(DecodeError, match=coding):
        run([coding], GARBAGE)


@pytest.mark.parametrize("label", LABELS)
def test_garbage_after_the_end_of_the_stream_is_a_decode_error(label: str) -> None:
    with pytest.raises(DecodeError, match=ENCODERS[label][0]):
        run([ENCODERS[label][0]], encode(label, TEXT) + b"\x00" + GARBAGE)


@pytest.mark.parametrize("label", ["gzip", "deflate", "br", "zstd"])
def test_corrupted_byte_is_a_decode_error(label: str) -> None:
    body = bytearray(encode(label, TEXT))
    body[len(body) // 2] ^= 0xFF
    with pytest.raises(DecodeError, match=label):
        run([label], bytes(body))


def test_a_spent_decoder_raises_its_error_again() -> None:
    decoder = decoder_for(["gzip"], 64 * MIB, TOO_LARGE)
    with pytest.raises(DecodeError) as first:
        decoder.feed(GARBAGE)
    with pytest.raises(DecodeError) as again:
        decoder.feed(gzip.compress(b"valid now"))
    assert again.value is first.value
    finished = Decoder([], 10, TOO_LARGE)
    finished.finish()
    with pytest.raises(RuntimeError):
        finished.feed(b"late")


@pytest.mark.parametrize("codings", [["compress"], ["gzip", "exi"], ["pack200-gzip"]])
def test_unsupported_coding_is_named(codings: list[str]) -> None:
    with pytest.raises(UnsupportedEncoding, match=repr(codings[-1])):
        decoder_for(codings, LIMIT, TOO_LARGE)
    with pytest.raises(UnsupportedEncoding, match=repr(codings[-1])):
        Decoder(codings, LIMIT, TOO_LARGE)


def test_too_many_stacked_codings_are_unsupported() -> None:
    decoder_for(["gzip"] * MAX_CODINGS, LIMIT, TOO_LARGE)
    with pytest.raises(UnsupportedEncoding, match="at most"):
        decoder_for(["gzip"] * (MAX_CODINGS + 1), LIMIT, TOO_LARGE)
