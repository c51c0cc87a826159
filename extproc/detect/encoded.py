"""Base64 runs: credentials hidden by one layer of base64 are decoded and read.

A sender who wants a key past the rules writes it base64-encoded (``QUtJQTRPSUdCUkpaTlg0N0lXNko=``), and
the receiver, a model asked to decode it or a tool, reads it in clear. A run of 20 or more characters of
the base64 alphabet (standard ``+/`` or URL-safe ``-_``, with its ``=`` padding) is decoded; when the
bytes are UTF-8 text, the rules of high and critical credentials read them, and a credential found there
masks the whole run. Only one layer is decoded, and runs longer than ``MAX_RUN`` characters (files,
images) are not decoded at all. Other encodings (hex, double JSON encoding, ROT13, compression inside a
body that does not declare it) are out of scope: each would need its own decoder for every text, and a
sender who controls the receiver can always invent one more.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from typing import Final

MIN_RUN: Final = 20
MAX_RUN: Final = 16384
ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-="
_RUN: Final = re.compile(rf"[A-Za-z0-9+/_-]{{{MIN_RUN},}}={{0,2}}")
RUN_START: Final = rf"[A-Za-z0-9+/_-]{{{MIN_RUN}}}".encode()  # for Hyperscan: is there a run at all
_PRINTABLE_SHARE: Final = 0.9


def runs(text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """The spans of the base64 runs that lie in ``text[start:end]``, whole (a run touching either edge of
    the range is the caller's to judge), no longer than ``MAX_RUN``."""
    for found in _RUN.finditer(text, start, len(text) if end is None else end):
        if found.end() - found.start() <= MAX_RUN:
            yield found.span()


def run_start(text: str, start: int, end: int) -> int:
    """Where the run of base64 characters that ends at ``end`` starts (not before ``start``): ``end`` when
    the character before it is none. Linear, in C."""
    return start + len(text[start:end].rstrip(ALPHABET))


def decoded(run: str) -> str | None:
    """The text ``run`` encodes, or None when it is not base64 of UTF-8 text."""
    body = run.rstrip("=")
    if len(body) % 4 == 1:
        return None
    standard, urlsafe = any(c in "+/" for c in body), any(c in "-_" for c in body)
    if standard and urlsafe:
        return None
    padded = body + "=" * (-len(body) % 4)
    try:
        data = base64.b64decode(padded, altchars=b"-_" if urlsafe else None, validate=True)
        text = data.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    printable = sum(1 for char in text if char.isprintable() or char in "\t\n\r")
    return text if text and printable >= _PRINTABLE_SHARE * len(text) else None
