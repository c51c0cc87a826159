"""Strict decoding of the pieces of a compact JWS: base64url without padding, JSON objects.

python-jose's ``base64url_decode`` pads and calls ``base64.urlsafe_b64decode``, which skips characters
outside the alphabet, so ``eyJ...!!`` decodes as if the ``!`` were not there. A token is parsed here
instead, refusing anything but the canonical encoding: one token string means one token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, TypeGuard

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_VALUE = {char: index for index, char in enumerate(_ALPHABET)}
# The last character of an unpadded segment of length 4n+2 (4n+3) carries 4 (2) bits that encode
# nothing; canonical base64 leaves them zero.
_UNUSED_BITS = {2: 0x0F, 3: 0x03}


class EncodingError(ValueError):
    """A segment is not canonical base64url, or not a JSON object. Its message quotes none of the input."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded base64url, refusing other characters, padding and non-canonical trailing bits."""
    remainder = len(segment) % 4
    if remainder == 1 or not _B64URL.fullmatch(segment):
        raise EncodingError("not base64url")
    if remainder and _VALUE[segment[-1]] & _UNUSED_BITS[remainder]:
        raise EncodingError("not canonical base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-remainder % 4))
    except (binascii.Error, ValueError) as exc:
        raise EncodingError("not base64url") from exc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # Two parsers may keep different copies of a duplicated member (RFC 7515 section 4: reject)
            raise EncodingError("duplicate member in a JSON object")
        result[key] = value
    return result


def _no_constant(name: str) -> float:
    raise EncodingError("NaN or Infinity in JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def json_object(data: bytes) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes: no duplicate members, no NaN/Infinity, nothing but an object."""
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise EncodingError("not a JSON object") from exc
    if not isinstance(value, dict):
        raise EncodingError("not a JSON object")
    return value


def is_number(value: object) -> TypeGuard[int | float]:
    """A JSON NumericDate: int or float, finite, and not a bool (``True`` is an int in Python). An
    integer too large for a float (JSON allows ``1`` followed by 400 zeros) is no date either: it could
    not be compared with the clock."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
