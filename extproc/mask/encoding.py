"""Content-coding decoders (gzip, deflate, br, zstd) that never let a compression bomb through.

A body that arrives with ``content-encoding`` must be decoded before it can be scanned, and it is sent on as
identity. A few kilobytes of gzip, brotli or zstd can stand for gigabytes of zeros, so every decoder here
is asked for at most ``_CHUNK`` bytes of output at a time, and the running total is checked before the next
piece is asked for: a bomb is stopped having materialised at most ``limit + _CHUNK`` bytes, however much it
would inflate to. The library calls that make this possible:

- gzip, deflate: ``zlib.decompressobj().decompress(data, max_length)``, then ``unconsumed_tail`` (and
  ``decompress(b"", max_length)`` while the output comes back full: zlib may still owe part of a match);
- br: ``brotli.Decompressor.process(data, output_buffer_limit=...)`` (brotli >= 1.2). The limit stops the
  growth of the output buffer, whose first block is 32 KiB, so a small limit yields one block per call.
  ``can_accept_more_data()`` only says whether the decoder still holds unconsumed *input*, not whether it
  owes output, so ``process(b"")`` is called until it returns nothing;
- zstd: ``ZstdDecompressor.decompress(data, max_length)`` of the standard library's ``compression.zstd``
  (Python 3.14, PEP 784) or its ``backports.zstd`` before: the ``zstandard`` package has no streaming call
  that both bounds output and tells whether a frame ended, and truncation must be detected.

Memory held by the decoders themselves is bounded by their formats' windows: 32 KiB for deflate, 16 MiB
for brotli, and 8 MiB for zstd, the most RFC 9659 lets an HTTP sender use (frames that ask for more are
rejected rather than allowed to allocate up to zstd's default 128 MiB).

Pure: no I/O, no protobuf. The errors are ``ValueError`` subclasses that do not know which way the body
goes: the exchange turns them into a client error (request) or an upstream error (response).
"""

from __future__ import annotations

import sys
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Final, Protocol

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

SUPPORTED: Final = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})

MAX_CODINGS: Final = 3
"""Stacked codings accepted at most. Real servers apply one, rarely two; each stage holds a window (up to
16 MiB for brotli), so a header listing a hundred codings must not make us allocate a hundred."""

_CHUNK: Final = 64 * 1024
"""The most output asked of a decoder at once, and the largest slice of input handed to one."""

_BROTLI_OUTPUT_LIMIT: Final = 1
"""brotli stops growing its output buffer once it holds at least this much: 1 means one block per call,
its first block being just under 32 KiB, below ``_CHUNK``."""

_ZSTD_WINDOW_LOG_MAX: Final = 23
"""8 MiB: RFC 9659 forbids HTTP senders larger zstd windows, so a frame that asks for more is not ours to
honour."""


class DecodeError(ValueError):
    """The body is not valid data of its declared coding: corrupt, truncated, or followed by garbage."""


class UnsupportedEncoding(ValueError):
    """A coding this sidecar cannot undo (or too many of them); the body cannot be scanned."""


def parse_content_encoding(value: str | None) -> list[str]:
    """The codings of a ``content-encoding`` value in the order they were applied, lower-cased.

    ``identity`` means no coding and empty list items are allowed by HTTP's list syntax, so both are
    dropped: ``None``, ``""`` and ``"identity"`` all give ``[]``.
    """
    if not value:
        return []
    codings = (item.strip().lower() for item in value.split(","))
    return [coding for coding in codings if coding and coding != "identity"]


class _Stage(ABC):
    """Undoes one coding. ``feed`` yields the output as it is produced, in pieces of at most ``_CHUNK``
    bytes, and only asks the library for the next piece when the caller pulls it: the caller counts and
    stops pulling, which is what bounds memory. All output is yielded by ``feed``; ``finish`` only checks
    that the stream ended."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.started = False

    @abstractmethod
    def feed(self, data: bytes) -> Iterator[bytes]: ...

    @abstractmethod
    def finish(self) -> None: ...

    def _error(self, problem: str) -> DecodeError:
        return DecodeError(f"invalid {self.coding} content-encoding: {problem}")

    def _truncated(self) -> DecodeError:
        return self._error("the stream ends before its end marker (truncated)")


class _Zlib(_Stage):
    """gzip (any number of members, as gzip(1) and browsers accept) or deflate (zlib-wrapped as HTTP says,
    or raw as some servers send, told apart by the two-byte zlib header as browsers do)."""

    def __init__(self, coding: str) -> None:
        super().__init__(coding)
        self._gzip = coding in ("gzip", "x-gzip")
        self._head = b""  # deflate: the first bytes, until there are enough to tell zlib from raw
        self._inflater: zlib._Decompress | None = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self.started = True
        try:
            yield from self._inflate(data)
        except zlib.error as exc:
            raise self._error(str(exc)) from exc

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        if self._inflater is None:
            if self._gzip:
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                self._head += data
                if len(self._head) < 2:
                    return
                data, self._head = self._head, b""
                self._inflater = zlib.decompressobj(zlib.MAX_WBITS if _zlib_header(data) else -zlib.MAX_WBITS)
        inflater = self._inflater
        pending = data
        while True:
            if inflater.eof:  # the member ended; its leftover was taken into ``pending``
                if not pending:
                    return
                if not self._gzip:
                    raise self._error("data after the end of the deflate stream")
                inflater = self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next gzip member
            out = inflater.decompress(pending, _CHUNK)
            # At the end of a stream the leftover is in unused_data; CPython 3.11 leaves a stale copy in
            # unconsumed_tail then, so that one is read only while the stream goes on.
            pending = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
            if out:
                yield out
            if not inflater.eof and not pending and len(out) < _CHUNK:
                return  # all input consumed, and zlib owes nothing: the output did not fill the request

    def finish(self) -> None:
        if self._head or (self._inflater is not None and not self._inflater.eof):
            raise self._truncated()


def _zlib_header(head: bytes) -> bool:
    """RFC 1950: compression method 8 with a window of at most 32 KiB, and a check value that makes the
    first two bytes a multiple of 31. A raw deflate stream starting like this is vanishingly rare."""
    cmf, flg = head[0], head[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0


class _BrotliDecompressor(Protocol):
    """The part of ``brotli.Decompressor`` (brotli >= 1.2) used here; the package ships no types."""

    def process(self, data: bytes, output_buffer_limit: int = ...) -> bytes: ...

    def can_accept_more_data(self) -> bool: ...

    def is_finished(self) -> bool: ...


if not hasattr(brotli.Decompressor, "can_accept_more_data"):  # pragma: no cover - guarded by pyproject
    raise ImportError("brotli >= 1.2 is required: older versions cannot bound decompressed output")


class _Brotli(_Stage):
    """br: one stream; anything after its end is an error (brotli raises it)."""

    def __init__(self, coding: str) -> None:
        super().__init__(coding)
        self._decoder: _BrotliDecompressor = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self.started = True
        decoder = self._decoder
        try:
            if decoder.is_finished():
                raise self._error("data after the end of the brotli stream")
            out = decoder.process(data, output_buffer_limit=_BROTLI_OUTPUT_LIMIT)
            # Output stopped by the limit may leave more owed with all input consumed, which
            # can_accept_more_data() does not tell; an empty answer is the only sure sign of nothing owed.
            while out or not decoder.can_accept_more_data():
                if out:
                    yield out
                out = decoder.process(b"", output_buffer_limit=_BROTLI_OUTPUT_LIMIT)
        except brotli.error as exc:
            raise self._error(str(exc)) from exc

    def finish(self) -> None:
        if self.started and not self._decoder.is_finished():
            raise self._truncated()


class _Zstd(_Stage):
    """zstd: any number of frames, skippable frames included (RFC 8878 allows concatenation)."""

    def __init__(self, coding: str) -> None:
        super().__init__(coding)
        self._decoder = self._frame()

    @staticmethod
    def _frame() -> zstd.ZstdDecompressor:
        return zstd.ZstdDecompressor(
            options={zstd.DecompressionParameter.window_log_max: _ZSTD_WINDOW_LOG_MAX}
        )

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        try:
            yield from self._decompress(data)
        except (zstd.ZstdError, EOFError) as exc:
            raise self._error(str(exc)) from exc

    def _decompress(self, data: bytes) -> Iterator[bytes]:
        pending = data
        while True:
            if self._decoder.eof:
                pending = self._decoder.unused_data + pending
                if not pending:
                    return
                self._decoder = self._frame()
            decoder = self._decoder
            self.started = True
            out = decoder.decompress(pending, _CHUNK)
            pending = b""
            if out:
                yield out
            if not decoder.eof and decoder.needs_input:
                return  # input all consumed (kept by the decoder if incomplete), nothing owed

    def finish(self) -> None:
        if self.started and not self._decoder.eof:
            raise self._truncated()


def _stage(coding: str) -> _Stage:
    if coding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(coding)
    if coding == "br":
        return _Brotli(coding)
    if coding == "zstd":
        return _Zstd(coding)
    raise UnsupportedEncoding(f"unsupported content-encoding {coding!r}")


class Decoder:
    """Undoes ``codings`` (in the order they were applied) incrementally: ``feed`` returns the plain bytes
    decoded so far, ``finish`` checks that every stream ended. With no codings it is the identity, so a
    caller always has one.

    ``too_large`` is raised (the very instance) as soon as the decoded output would exceed ``limit`` bytes.
    Stacked codings also bound what the outer ones produce for the inner ones: compressed data is never
    much larger than what it decodes to, so an intermediate stream over ``2 * limit`` is a bomb too, one
    whose inner layer decodes to little (empty gzip members, say) and would otherwise burn CPU unchecked.

    After any error the decoder is spent and raises the same error again. Raises ``UnsupportedEncoding``
    naming a coding outside ``SUPPORTED``, or when more than ``MAX_CODINGS`` are stacked.
    """

    decoded: int
    """Plain bytes decoded so far, including a last piece that crossed ``limit``."""

    def __init__(self, codings: list[str], limit: int, too_large: Exception) -> None:
        self.codings = parse_content_encoding(",".join(codings))
        if len(self.codings) > MAX_CODINGS:
            raise UnsupportedEncoding(
                f"content-encoding stacks {len(self.codings)} codings; at most {MAX_CODINGS} are decoded"
            )
        self._stages = [_stage(coding) for coding in reversed(self.codings)]
        self._limit = limit
        self._intermediate_limit = 2 * limit + _CHUNK
        self._too_large = too_large
        self._produced = [0] * len(self._stages)
        self.decoded = 0
        self._error: Exception | None = None
        self._finished = False

    def feed(self, data: bytes) -> bytes:
        self._check_usable()
        if not self._stages:  # the identity: count, never copy (every uncompressed body passes here)
            self.decoded += len(data)
            if self.decoded > self._limit:
                self._error = self._too_large
                raise self._too_large
            return data
        parts: list[bytes] = []
        try:
            for start in range(0, len(data), _CHUNK):
                for piece in self._push(0, data[start : start + _CHUNK]):
                    self.decoded += len(piece)
                    if self.decoded > self._limit:
                        raise self._too_large
                    parts.append(piece)
        except Exception as exc:
            self._error = exc
            raise
        return b"".join(parts)

    def finish(self) -> bytes:
        """Checks that no stream was cut short. Every byte was already returned by ``feed``: the decoders
        are drained there, so the result is always empty, returned for the symmetry of body processors."""
        self._check_usable()
        self._finished = True
        try:
            for stage in self._stages:
                stage.finish()
        except Exception as exc:
            self._error = exc
            raise
        return b""

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("the decoder is finished")

    def _push(self, index: int, data: bytes) -> Iterator[bytes]:
        """``data`` through stages ``index`` and after; yields plain output piece by piece, so no stage
        produces its next piece before the previous one has been counted."""
        if index == len(self._stages):
            yield data
            return
        for piece in self._stages[index].feed(data):
            if index + 1 < len(self._stages):
                self._produced[index] += len(piece)
                if self._produced[index] > self._intermediate_limit:
                    raise self._too_large
            yield from self._push(index + 1, piece)


def decoder_for(codings: list[str], limit: int, too_large: Exception) -> Decoder:
    """A ``Decoder`` for ``codings`` as ``parse_content_encoding`` returns them; ``[]`` is the identity."""
    return Decoder(codings, limit, too_large)
