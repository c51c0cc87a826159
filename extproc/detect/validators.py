"""Checksum and structure validators that confirm (or reject) a candidate a pattern matched.

Every validator takes the matched text and answers ``True`` when it is plausibly the real thing.
They are pure (no I/O) and total: malformed input of any kind yields ``False``, never an exception.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import math
import re
import string
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType, ModuleType
from typing import Final

# python-stdnum (LGPL-2.1-or-later, used unmodified): the check digits and structure of national numbers.
# It ships no types; each module's is_valid(str) -> bool is the only call made, through _stdnum_valid.
from stdnum import imei as stdnum_imei
from stdnum.au import tfn as stdnum_au_tfn
from stdnum.br import cnpj as stdnum_br_cnpj
from stdnum.br import cpf as stdnum_br_cpf
from stdnum.ca import sin as stdnum_ca_sin
from stdnum.de import idnr as stdnum_de_idnr
from stdnum.es import dni as stdnum_es_dni
from stdnum.es import nie as stdnum_es_nie
from stdnum.eu import vat as stdnum_eu_vat
from stdnum.fr import nir as stdnum_fr_nir
from stdnum.gb import nhs as stdnum_gb_nhs
from stdnum.in_ import aadhaar as stdnum_in_aadhaar
from stdnum.in_ import pan as stdnum_in_pan
from stdnum.it import codicefiscale as stdnum_it_codicefiscale
from stdnum.jp import in_ as stdnum_jp_in
from stdnum.nl import bsn as stdnum_nl_bsn
from stdnum.pl import pesel as stdnum_pl_pesel
from stdnum.se import personnummer as stdnum_se_personnummer

Validator = Callable[[str], bool]

_DIGITS: Final = frozenset(string.digits)
_UPPER_ALNUM: Final = frozenset(string.ascii_uppercase + string.digits)
_CARD_SEPARATORS: Final = re.compile(r"[\s./-]")


def _ascii_digits(value: str) -> bool:
    """True for a non-empty string of ASCII digits only (``str.isdigit`` also accepts e.g. '٣' and '²')."""
    return bool(value) and all(char in _DIGITS for char in value)


# --- payment cards -------------------------------------------------------------------------------------


def luhn(value: str) -> bool:
    """Payment card number: 12 to 19 digits (the separators card rules allow between groups ignored:
    white space, dots, slashes, dashes) passing the Luhn checksum."""
    digits = _CARD_SEPARATORS.sub("", value)
    if not 12 <= len(digits) <= 19 or not _ascii_digits(digits):
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


_CARD_GROUPS: Final = re.compile(r"[\s./-]+")


def card_number(value: str) -> bool:
    """A payment card number as the card rules read one: ``luhn``, and when it is written in groups, not in
    groups of four closed by a shorter one (``4435 9852 7498 27``, 4-4-4-1 to 4-4-4-3 and 4-4-4-4-1 to
    4-4-4-4-2). That is how the tail of an IBAN is printed (``DE54 0743 4435 9852 7498 27``), checksum
    right or wrong, and how no card is: cards are printed 4-4-4-4, 4-6-5, 4-6-4 or, with 19 digits,
    4-4-4-4-3."""
    if not luhn(value):
        return False
    sizes = [len(group) for group in _CARD_GROUPS.split(value) if group]
    *head, last = sizes
    shorter = 4 if len(head) == 3 else 3  # 4-4-4-4-3 is a 19-digit card's layout
    return not (len(head) in (3, 4) and all(size == 4 for size in head) and last < shorter)


# --- IBAN ----------------------------------------------------------------------------------------------

# IBAN length per country code, from the SWIFT IBAN Registry (ISO 13616), all 89 countries as of the
# 2024 releases. Dependent territories (e.g. Aland, the French overseas departments, Jersey) issue IBANs
# under their parent's code (FI, FR, GB, ...), so they need no entry of their own.
IBAN_LENGTHS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "AD": 24,  # Andorra
        "AE": 23,  # United Arab Emirates
        "AL": 28,  # Albania
        "AT": 20,  # Austria
        "AZ": 28,  # Azerbaijan
        "BA": 20,  # Bosnia and Herzegovina
        "BE": 16,  # Belgium
        "BG": 22,  # Bulgaria
        "BH": 22,  # Bahrain
        "BI": 27,  # Burundi
        "BR": 29,  # Brazil
        "BY": 28,  # Belarus
        "CH": 21,  # Switzerland
        "CR": 22,  # Costa Rica
        "CY": 28,  # Cyprus
        "CZ": 24,  # Czechia
        "DE": 22,  # Germany
        "DJ": 27,  # Djibouti
        "DK": 18,  # Denmark
        "DO": 28,  # Dominican Republic
        "EE": 20,  # Estonia
        "EG": 29,  # Egypt
        "ES": 24,  # Spain
        "FI": 18,  # Finland (and Aland Islands)
        "FK": 18,  # Falkland Islands
        "FO": 18,  # Faroe Islands
        "FR": 27,  # France (and overseas departments and territories)
        "GB": 22,  # United Kingdom (and Guernsey, Isle of Man, Jersey)
        "GE": 22,  # Georgia
        "GI": 23,  # Gibraltar
        "GL": 18,  # Greenland
        "GR": 27,  # Greece
        "GT": 28,  # Guatemala
        "HN": 28,  # Honduras
        "HR": 21,  # Croatia
        "HU": 28,  # Hungary
        "IE": 22,  # Ireland
        "IL": 23,  # Israel
        "IQ": 23,  # Iraq
        "IS": 26,  # Iceland
        "IT": 27,  # Italy
        "JO": 30,  # Jordan
        "KW": 30,  # Kuwait
        "KZ": 20,  # Kazakhstan
        "LB": 28,  # Lebanon
        "LC": 32,  # Saint Lucia
        "LI": 21,  # Liechtenstein
        "LT": 20,  # Lithuania
        "LU": 20,  # Luxembourg
        "LV": 21,  # Latvia
        "LY": 25,  # Libya
        "MC": 27,  # Monaco
        "MD": 24,  # Moldova
        "ME": 22,  # Montenegro
        "MK": 19,  # North Macedonia
        "MN": 20,  # Mongolia
        "MR": 27,  # Mauritania
        "MT": 31,  # Malta
        "MU": 30,  # Mauritius
        "NI": 28,  # Nicaragua
        "NL": 18,  # Netherlands
        "NO": 15,  # Norway
        "OM": 23,  # Oman
        "PK": 24,  # Pakistan
        "PL": 28,  # Poland
        "PS": 29,  # Palestine
        "PT": 25,  # Portugal
        "QA": 29,  # Qatar
        "RO": 24,  # Romania
        "RS": 22,  # Serbia
        "RU": 33,  # Russia
        "SA": 24,  # Saudi Arabia
        "SC": 31,  # Seychelles
        "SD": 18,  # Sudan
        "SE": 24,  # Sweden
        "SI": 19,  # Slovenia
        "SK": 24,  # Slovakia
        "SM": 27,  # San Marino
        "SO": 23,  # Somalia
        "ST": 25,  # Sao Tome and Principe
        "SV": 28,  # El Salvador
        "TL": 23,  # Timor-Leste
        "TN": 24,  # Tunisia
        "TR": 26,  # Turkey
        "UA": 29,  # Ukraine
        "VA": 22,  # Vatican City
        "VG": 24,  # British Virgin Islands
        "XK": 20,  # Kosovo
        "YE": 30,  # Yemen
    }
)


def iban_mod97(value: str) -> bool:
    """IBAN: known country, that country's length, two check digits, alphanumeric BBAN, ISO 7064 mod 97-10.

    Spaces and dashes are ignored and case is folded. Check digits 00, 01 and 99 are rejected although
    they can satisfy the remainder test: ISO 13616 only ever issues 02 to 98.
    """
    if not value.isascii():
        return False  # upper() would turn some non-ASCII letters (dotless i) into ASCII
    iban = value.replace(" ", "").replace("-", "").upper()
    country, check, bban = iban[:2], iban[2:4], iban[4:]
    if IBAN_LENGTHS.get(country) != len(iban):
        return False
    if not _ascii_digits(check) or not 2 <= int(check) <= 98:
        return False
    if not all(char in _UPPER_ALNUM for char in bban):
        return False
    # Move the first four characters to the end and read letters as 10..35.
    numeric = "".join(str(int(char, 36)) for char in bban + country + check)
    return int(numeric) % 97 == 1


# --- US identifiers ------------------------------------------------------------------------------------

# Area, group, serial; the separator (dash, space or none) must be the same in both places.
_SSN: Final = re.compile(r"([0-9]{3})([-. ]?)([0-9]{2})\2([0-9]{4})")

# Numbers the SSA voided after they appeared in advertising or were printed on sample cards.
_SSN_INVALID: Final = frozenset({"078051120", "219099999", "123456789"} | {f"98765432{d}" for d in range(10)})


def ssn_rules(value: str) -> bool:
    """US SSN as ``AAA-GG-SSSS``, ``AAA GG SSSS``, ``AAA.GG.SSSS`` or ``AAAGGSSSS`` (one separator
    throughout) that the SSA could have issued."""
    match = _SSN.fullmatch(value)
    if match is None:
        return False
    area, _, group, serial = match.groups()
    digits = area + group + serial
    if area in {"000", "666"} or area.startswith("9") or group == "00" or serial == "0000":
        return False
    return len(set(digits)) > 1 and digits not in _SSN_INVALID


def _aba_prefix_valid(prefix: int) -> bool:
    # 00-12 banks, 21-32 thrift institutions, 61-72 electronic transactions, 80 traveller's cheques.
    return 0 <= prefix <= 12 or 21 <= prefix <= 32 or 61 <= prefix <= 72 or prefix == 80


def aba_checksum(value: str) -> bool:
    """US ABA routing transit number: 9 digits (dashes ignored), a Fed prefix and the 3-7-1 checksum."""
    digits = value.replace("-", "")
    if len(digits) != 9 or not _ascii_digits(digits) or digits == "000000000":
        return False
    if not _aba_prefix_valid(int(digits[:2])):
        return False
    total = sum(weight * (ord(char) - 48) for weight, char in zip((3, 7, 1) * 3, digits, strict=True))
    return total % 10 == 0


# --- cryptocurrency addresses --------------------------------------------------------------------------

_BASE58_ALPHABET: Final = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_INDEX: Final[Mapping[str, int]] = MappingProxyType({c: i for i, c in enumerate(_BASE58_ALPHABET)})
# Longer than any base58check object in use (extended keys are 111 characters); bounds the big-int work.
_BASE58_MAX_CHARS: Final = 200


def _base58_decode(text: str) -> bytes | None:
    number = 0
    for char in text:
        digit = _BASE58_INDEX.get(char)
        if digit is None:
            return None
        number = number * 58 + digit
    leading_zeros = len(text) - len(text.lstrip("1"))
    return b"\x00" * leading_zeros + number.to_bytes((number.bit_length() + 7) // 8, "big")


def base58check(value: str) -> bool:
    """Base58check (Bitcoin alphabet): the last 4 decoded bytes are the double-SHA-256 prefix of the rest."""
    if not value or len(value) > _BASE58_MAX_CHARS:
        return False
    decoded = _base58_decode(value)
    if decoded is None or len(decoded) < 5:
        return False
    body, checksum = decoded[:-4], decoded[-4:]
    return hashlib.sha256(hashlib.sha256(body).digest()).digest()[:4] == checksum


_BECH32_CHARSET: Final = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_INDEX: Final[Mapping[str, int]] = MappingProxyType({c: i for i, c in enumerate(_BECH32_CHARSET)})
_BECH32_GENERATOR: Final = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_BECH32_CONST: Final = 1  # BIP-173
_BECH32M_CONST: Final = 0x2BC830A3  # BIP-350
_SEGWIT_HRPS: Final = frozenset({"bc", "tb"})


def _bech32_polymod(values: list[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for bit, generator in enumerate(_BECH32_GENERATOR):
            if (top >> bit) & 1:
                checksum ^= generator
    return checksum


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(char) >> 5 for char in hrp] + [0] + [ord(char) & 31 for char in hrp]


def _regroup_5_to_8(data: list[int]) -> bytes | None:
    """Witness program bytes from 5-bit groups; None if the padding is longer than 4 bits or not zero."""
    accumulator = bits = 0
    out = bytearray()
    for value in data:
        accumulator = ((accumulator << 5) | value) & 0xFFF
        bits += 5
        if bits >= 8:
            bits -= 8
            out.append((accumulator >> bits) & 0xFF)
    if bits >= 5 or (accumulator << (8 - bits)) & 0xFF:
        return None
    return bytes(out)


def bech32(value: str) -> bool:
    """Segwit address (hrp ``bc`` or ``tb``): bech32 (BIP-173) for v0, bech32m (BIP-350) for v1 to v16."""
    if len(value) > 90 or any(not 33 <= ord(char) <= 126 for char in value):
        return False
    if value.lower() != value and value.upper() != value:
        return False  # mixed case
    text = value.lower()
    separator = text.rfind("1")
    # At least one hrp character, and a 6-character checksum after the separator.
    if separator < 1 or separator + 7 > len(text):
        return False
    hrp = text[:separator]
    if hrp not in _SEGWIT_HRPS:
        return False
    data: list[int] = []
    for char in text[separator + 1 :]:
        digit = _BECH32_INDEX.get(char)
        if digit is None:
            return False
        data.append(digit)
    constant = _bech32_polymod(_hrp_expand(hrp) + data)
    if constant not in (_BECH32_CONST, _BECH32M_CONST):
        return False
    payload = data[:-6]
    if not payload:
        return False
    version = payload[0]
    program = _regroup_5_to_8(payload[1:])
    if version > 16 or program is None or not 2 <= len(program) <= 40:
        return False
    if version == 0:
        return constant == _BECH32_CONST and len(program) in (20, 32)
    return constant == _BECH32M_CONST


def crypto_address(value: str) -> bool:
    """A Bitcoin-style address: base58check (P2PKH, P2SH, ...) or a bech32/bech32m segwit address."""
    return base58check(value) or bech32(value)


# --- tokens --------------------------------------------------------------------------------------------

_BASE64URL_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]*={0,2}")
# C0 and C1 control characters other than the white space JSON allows between tokens.
_CONTROL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _base64url_decode(segment: str) -> bytes | None:
    if _BASE64URL_SEGMENT.fullmatch(segment) is None:
        return None
    unpadded = segment.rstrip("=")
    try:
        return base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except ValueError:  # binascii.Error, e.g. a length one more than a multiple of 4
        return None


def _json_object(segment: str) -> dict[str, object] | None:
    raw = _base64url_decode(segment)
    if not raw:
        return None
    try:
        decoded: object = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # covers JSONDecodeError and UnicodeDecodeError
        return None
    return decoded if isinstance(decoded, dict) else None


def jwt_structure(value: str) -> bool:
    """JWS compact serialisation: base64url JSON header (with a string ``alg``), JSON payload, signature.

    The signature may be empty only for ``alg: none`` (any case).
    """
    parts = value.split(".")
    if len(parts) != 3:
        return False
    header_segment, payload_segment, signature_segment = parts
    header = _json_object(header_segment)
    if header is None or _json_object(payload_segment) is None:
        return False
    alg = header.get("alg")
    if not isinstance(alg, str):
        return False
    signature = _base64url_decode(signature_segment)
    if signature is None:
        return False
    return bool(signature) or alg.lower() == "none"


def _header(segment: str) -> bool:
    """A JOSE header: a JSON object with a string ``alg``; or one with a damaged character (a token pasted
    with a typo is still a token), which still reads as an object's braces around an ``"alg":`` member."""
    header = _json_object(segment)
    if header is not None:
        return isinstance(header.get("alg"), str)
    raw = _base64url_decode(segment)
    return raw is not None and raw.startswith(b'{"') and raw.rstrip().endswith(b'"}') and b'"alg":' in raw


def jwt_header(value: str) -> bool:
    """The start of a JWS compact serialisation, as far as a bounded pattern reads a long token: a base64url
    JSON header with a string ``alg`` (``_header``), a dot, and the beginning of the payload.

    The payload may be cut anywhere, so only what it shows is checked: the bytes it holds decode to UTF-8
    text (a character cut at the end is fine) that opens a JSON object and holds no control characters
    but white space. Anything after a second dot (the signature) is ignored.
    """
    parts = value.split(".")
    if len(parts) < 2 or not _header(parts[0]):
        return False
    payload = parts[1]
    if _BASE64URL_SEGMENT.fullmatch(payload) is None:
        return False
    # A cut one character into a 4-character group leaves no whole byte: drop that character.
    raw = _base64url_decode(payload[:-1] if len(payload.rstrip("=")) % 4 == 1 else payload)
    if not raw:
        return False
    for cut in range(4):  # at most 3 bytes of a character the cut split
        try:
            text = raw[: len(raw) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return text.lstrip().startswith("{") and _CONTROL.search(text) is None
    return False


_BASE62: Final = string.digits + string.ascii_uppercase + string.ascii_lowercase
_BASE62_TOKEN: Final = re.compile(r"[a-z]{3}_([0-9A-Za-z]{30})([0-9A-Za-z]{6})")


def base62_crc32(value: str) -> bool:
    """GitHub's token format, which npm's tokens share: a three-letter prefix and an underscore (``ghp_``,
    ``gho_``, ``npm_``, ...), 30 random base62 characters, then the CRC32 of those 30 characters in 6
    base62 characters (0-9, A-Z, a-z, most significant first, zero-padded)."""
    match = _BASE62_TOKEN.fullmatch(value)
    if match is None:
        return False
    body, checksum = match.groups()
    number = 0
    for char in checksum:
        number = number * 62 + _BASE62.index(char)
    return number == zlib.crc32(body.encode("ascii"))


# --- network -------------------------------------------------------------------------------------------


def ip_address(value: str) -> bool:
    """An IPv4 or IPv6 address as ``ipaddress.ip_address`` reads it (no prefix length, brackets or spaces).

    IPv4 octets with leading zeros (``01.2.3.4``: octal to some parsers, decimal to others) are rejected,
    including inside IPv6 (``::ffff:01.2.3.4``); ``ipaddress`` has refused them since Python 3.9.5.
    """
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# --- generic secrets -----------------------------------------------------------------------------------

_PLACEHOLDER_MARKERS: Final = (
    "example",
    "xxxx",
    "your_",
    "your-",
    "changeme",
    "dummy",
    "sample",
    "<",
    ">",
    "${",
    "{{",
)


def not_placeholder(value: str) -> bool:
    """False for values that look like documentation placeholders rather than real secrets.

    Placeholders contain a marker such as ``example``, ``xxxx``, ``your_``, ``changeme``, ``<...>``,
    ``${...}`` or ``{{...}}`` (any case), or repeat one character (``aaaaaaaa``, ``********``). An empty
    value is not a secret either.
    """
    if not value:
        return False
    folded = value.casefold()
    if any(marker in folded for marker in _PLACEHOLDER_MARKERS):
        return False
    return len(set(folded)) > 1


# --- national identifiers ------------------------------------------------------------------------------
#
# Each validator strips the separators its rule allows, checks the shape (ASCII only: stdnum's own checks
# would accept what its compact() turns into digits), then asks python-stdnum where it has the number.
# stdnum's is_valid() catches its own ValidationError; any other exception (a bug, an unexpected input)
# is caught here too, since a validator must never raise.


def _stdnum_valid(module: ModuleType, number: str) -> bool:
    try:
        return bool(module.is_valid(number))
    except Exception:  # a validator is total: whatever the library raises means "not valid"
        return False


def _strip(value: str, separators: str) -> str:
    return "".join(char for char in value if char not in separators)


def _digits_of(value: str, separators: str, *lengths: int) -> str | None:
    """The value's ASCII digits with ``separators`` removed, if there are ``lengths`` of them and they are
    not one digit repeated (111 111 111 passes several of these checksums and is never issued)."""
    digits = _strip(value, separators)
    if len(digits) not in lengths or not _ascii_digits(digits) or len(set(digits)) == 1:
        return None
    return digits


# UK National Insurance number: two prefix letters, six digits, a suffix A-D; no check digit. HMRC never
# uses D, F, I, Q, U or V in the prefix, nor O as its second letter, nor the prefixes below.
_UK_NINO: Final = re.compile(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][0-9]{6}[A-D]")
_UK_NINO_UNUSED_PREFIXES: Final = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})


def uk_nino(value: str) -> bool:
    """UK National Insurance number (``QQ 12 34 56 C``, spaces optional): the allocation rules of its
    prefix letters and suffix (there is no checksum)."""
    number = _strip(value, " ").upper()
    return (
        number.isascii()
        and _UK_NINO.fullmatch(number) is not None
        and number[:2] not in _UK_NINO_UNUSED_PREFIXES
    )


def uk_nhs(value: str) -> bool:
    """NHS number (England, Wales, Isle of Man): 10 digits (spaces or dashes ignored), mod 11 check digit."""
    digits = _digits_of(value, " -", 10)
    return digits is not None and _stdnum_valid(stdnum_gb_nhs, digits)


def ca_sin(value: str) -> bool:
    """Canadian Social Insurance Number: 9 digits (spaces or dashes ignored), not starting with 0 or 8
    (business numbers), Luhn check digit."""
    digits = _digits_of(value, " -", 9)
    return digits is not None and _stdnum_valid(stdnum_ca_sin, digits)


def in_aadhaar(value: str) -> bool:
    """Indian Aadhaar number: 12 digits (spaces or dashes ignored), first digit 2-9, not a palindrome,
    Verhoeff check digit."""
    digits = _digits_of(value, " -", 12)
    return digits is not None and _stdnum_valid(stdnum_in_aadhaar, digits)


_IN_PAN: Final = re.compile(r"[A-Z]{5}[0-9]{4}[A-Z]")


def in_pan(value: str) -> bool:
    """Indian Permanent Account Number: five letters, four digits and a letter, upper case; the fourth
    letter a known holder type (P for a person, C company, ...), the digits not 0000; no check digit."""
    return value.isascii() and _IN_PAN.fullmatch(value) is not None and _stdnum_valid(stdnum_in_pan, value)


def au_tfn(value: str) -> bool:
    """Australian Tax File Number: 8 or 9 digits (spaces or dashes ignored), weighted mod 11 checksum."""
    digits = _digits_of(value, " -", 8, 9)
    return digits is not None and _stdnum_valid(stdnum_au_tfn, digits)


_AU_MEDICARE_WEIGHTS: Final = (1, 3, 7, 9, 1, 3, 7, 9)


def au_medicare(value: str) -> bool:
    """Australian Medicare card number: 10 digits (or 11 with the individual reference number; spaces or
    dashes ignored), first digit 2-6, ninth digit the 1-3-7-9 weighted sum of the first eight mod 10,
    tenth digit (the card's issue number) not 0. python-stdnum has no Medicare module."""
    digits = _digits_of(value, " -", 10, 11)
    if digits is None or digits[0] not in "23456" or digits[9] == "0":
        return False
    total = sum(weight * (ord(char) - 48) for weight, char in zip(_AU_MEDICARE_WEIGHTS, digits, strict=False))
    return total % 10 == ord(digits[8]) - 48 and (len(digits) == 10 or digits[10] != "0")


def de_tax_id(value: str) -> bool:
    """German tax identification number (Steuer-ID, IdNr): 11 digits (spaces ignored), not starting with
    0, exactly one digit of the first ten repeated (twice or three times), ISO 7064 mod 11,10 check digit."""
    digits = _digits_of(value, " ", 11)
    return digits is not None and _stdnum_valid(stdnum_de_idnr, digits)


_FR_NIR: Final = re.compile(r"[1-478][0-9]{4}(?:[0-9]{2}|2A|2B)[0-9]{8}")


def fr_nir(value: str) -> bool:
    """French social security number (NIR, numéro de sécurité sociale): 15 characters (spaces or dots
    ignored), sex digit 1-4, 7 or 8, Corsican departments 2A/2B, mod 97 key."""
    number = _strip(value, " .").upper()
    return number.isascii() and _FR_NIR.fullmatch(number) is not None and _stdnum_valid(stdnum_fr_nir, number)


_ES_DNI: Final = re.compile(r"[0-9]{8}[A-Z]")
_ES_NIE: Final = re.compile(r"[XYZ][0-9]{7}[A-Z]")


def es_dni(value: str) -> bool:
    """Spanish DNI (the NIF of Spanish nationals): 8 digits and a check letter (mod 23; a space or dash
    before the letter ignored)."""
    number = _strip(value, " -").upper()
    return number.isascii() and _ES_DNI.fullmatch(number) is not None and _stdnum_valid(stdnum_es_dni, number)


def es_nie(value: str) -> bool:
    """Spanish NIE (foreigners' identity number): X, Y or Z, 7 digits and a check letter (mod 23; spaces or
    dashes ignored)."""
    number = _strip(value, " -").upper()
    return number.isascii() and _ES_NIE.fullmatch(number) is not None and _stdnum_valid(stdnum_es_nie, number)


def it_fiscal_code(value: str) -> bool:
    """Italian codice fiscale of a person: 16 characters (surname and name letters, birth date and place,
    with the digit substitutions of omocodia), a valid birth date and the check letter. The 11-digit
    codes of companies, which stdnum also accepts, are not a person's."""
    number = _strip(value, " ").upper()
    return number.isascii() and len(number) == 16 and _stdnum_valid(stdnum_it_codicefiscale, number)


def nl_bsn(value: str) -> bool:
    """Dutch citizen service number (BSN): 9 digits (spaces, dots or dashes ignored; stdnum would pad a
    shorter number with zeros, this does not), the eleven test."""
    digits = _digits_of(value, " .-", 9)
    return digits is not None and _stdnum_valid(stdnum_nl_bsn, digits)


def br_cpf(value: str) -> bool:
    """Brazilian CPF: 11 digits (dots, dashes and spaces ignored), two mod 11 check digits; one digit
    repeated (111.111.111-11, valid by the checksum) is rejected."""
    digits = _digits_of(value, " .-", 11)
    return digits is not None and _stdnum_valid(stdnum_br_cpf, digits)


_BR_CNPJ: Final = re.compile(r"[0-9A-Z]{12}[0-9]{2}")


def br_cnpj(value: str) -> bool:
    """Brazilian CNPJ (company registry number): 14 characters (dots, slash, dash ignored; the first 12 may
    be letters from 2026 on), two mod 11 check digits; one character repeated is rejected."""
    number = _strip(value, " ./-").upper()
    if not number.isascii() or _BR_CNPJ.fullmatch(number) is None or len(set(number)) == 1:
        return False
    return _stdnum_valid(stdnum_br_cnpj, number)


def pl_pesel(value: str) -> bool:
    """Polish PESEL: 11 digits, a valid birth date (the century in the month) and the 1-3-7-9 check digit."""
    digits = _digits_of(value, " ", 11)
    return digits is not None and _stdnum_valid(stdnum_pl_pesel, digits)


_SE_PERSONNUMMER: Final = re.compile(r"(?:[0-9]{2})?[0-9]{6}[-+]?[0-9]{4}")


def se_personnummer(value: str) -> bool:
    """Swedish personnummer: ``YYMMDD-NNNN`` (``+`` from the year a person turns 100), ``YYYYMMDD-NNNN``
    or either without the separator; a valid birth date and the Luhn check digit. Coordination numbers
    (day + 60) are not personnummer and are rejected."""
    number = _strip(value, " ")
    if not number.isascii() or _SE_PERSONNUMMER.fullmatch(number) is None:
        return False
    return _stdnum_valid(stdnum_se_personnummer, number)


_SG_NRIC: Final = re.compile(r"([STFGM])([0-9]{7})([A-Z])")
_SG_NRIC_WEIGHTS: Final = (2, 7, 6, 5, 4, 3, 2)
# (offset added to the weighted sum, check letters indexed by the sum mod 11) per first letter: S and T
# for citizens and permanent residents (T from 2000), F and G for foreigners (G from 2000).
_SG_NRIC_TABLES: Final[Mapping[str, tuple[int, str]]] = MappingProxyType(
    {"S": (0, "JZIHGFEDCBA"), "T": (4, "JZIHGFEDCBA"), "F": (0, "XWUTRQPNMLK"), "G": (4, "XWUTRQPNMLK")}
)
# M (foreigners, from 2022): offset 3, and the letter "KLJNPQRTUWX"[10 - sum mod 11].
_SG_NRIC_M_LETTERS: Final = "KLJNPQRTUWX"


def sg_nric_fin(value: str) -> bool:
    """Singapore NRIC or FIN: S, T, F, G or M, seven digits and the check letter of the ICA's weighted
    mod 11 scheme (weights 2-7-6-5-4-3-2, offset and letter table by series). python-stdnum has no
    NRIC module."""
    match = _SG_NRIC.fullmatch(value.upper()) if value.isascii() else None
    if match is None:
        return False
    series, digits, letter = match.groups()
    total = sum(weight * (ord(char) - 48) for weight, char in zip(_SG_NRIC_WEIGHTS, digits, strict=True))
    if series == "M":
        return letter == _SG_NRIC_M_LETTERS[10 - (total + 3) % 11]
    offset, letters = _SG_NRIC_TABLES[series]
    return letter == letters[(total + offset) % 11]


def jp_my_number(value: str) -> bool:
    """Japanese Individual Number (My Number, 個人番号): 12 digits (spaces or dashes ignored), mod 11 check
    digit."""
    digits = _digits_of(value, " -", 12)
    return digits is not None and _stdnum_valid(stdnum_jp_in, digits)


def imei(value: str) -> bool:
    """IMEI of a mobile device: 15 digits (spaces, dashes or slashes ignored) with the Luhn check digit.
    The 14-digit form without a check digit and the 16-digit IMEISV have nothing to check: rejected."""
    digits = _digits_of(value, " -/", 15)
    return digits is not None and _stdnum_valid(stdnum_imei, digits)


# EU VAT identification numbers: the member states' prefixes (EL for Greece, XI for Northern Ireland).
_EU_VAT_PREFIXES: Final = frozenset(
    {"AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "EL", "ES", "FI", "FR", "HR", "HU"}
    | {"IE", "IT", "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK", "XI"}
)


def eu_vat(value: str) -> bool:
    """VAT identification number of an EU member state or Northern Ireland: the country prefix and that
    country's number with its check digits (``stdnum.eu.vat``, which delegates to each country's module;
    no VIES lookup). Spaces are ignored."""
    number = _strip(value, " ").upper()
    if not number.isascii() or number[:2] not in _EU_VAT_PREFIXES or not number[2:].isalnum():
        return False
    return _stdnum_valid(stdnum_eu_vat, number)


# Machine-readable zone of a passport (ICAO 9303 TD3): two lines of 44 characters. Line 2 carries four
# check digits and a composite one, each the 7-3-1 weighted sum mod 10 of its field (digits as
# themselves, A-Z as 10-35, the filler < as 0).
_MRZ_TD3_LINE2: Final = re.compile(
    r"[A-Z0-9<]{9}[0-9]"  # document number, check digit
    r"[A-Z<]{3}"  # nationality
    r"[0-9]{7}"  # birth date YYMMDD, check digit
    r"[MFX<]"  # sex
    r"[0-9]{7}"  # expiry date YYMMDD, check digit
    r"[A-Z0-9<]{14}[0-9<]"  # personal number, check digit (< when there is none)
    r"[0-9]"  # composite check digit
)
_MRZ_WEIGHTS: Final = (7, 3, 1)


def _mrz_check(field: str) -> str:
    total = 0
    for index, char in enumerate(field):
        value = 0 if char == "<" else int(char, 36)
        total += value * _MRZ_WEIGHTS[index % 3]
    return str(total % 10)


def mrz_td3(value: str) -> bool:
    """A passport's machine-readable zone, line 2 alone or both lines (the name line first, white space
    between): line 2's check digits of the document number, birth date, expiry date and personal number,
    and the composite check digit over them (python-stdnum has no MRZ module)."""
    line = value.split()[-1] if value.strip() else ""
    if not line.isascii() or _MRZ_TD3_LINE2.fullmatch(line) is None:
        return False
    number, birth, expiry, personal = line[0:10], line[13:20], line[21:28], line[28:43]
    for field in (number, birth, expiry):
        if _mrz_check(field[:-1]) != field[-1]:
            return False
    if personal[-1] == "<":
        if personal[:-1].strip("<"):
            return False  # a personal number needs its check digit
    elif _mrz_check(personal[:-1]) != personal[-1]:
        return False
    return _mrz_check(number + birth + expiry + personal) == line[43]


# --- entropy and the registry --------------------------------------------------------------------------


def shannon_entropy(value: str) -> float:
    """Shannon entropy of the character distribution, in bits per character (0.0 for the empty string)."""
    if not value:
        return 0.0
    length = len(value)
    entropy = -sum(count / length * math.log2(count / length) for count in Counter(value).values())
    return entropy + 0.0  # turn -0.0 (one distinct character) into 0.0


VALIDATORS: Final[Mapping[str, Validator]] = MappingProxyType(
    {
        "luhn": luhn,
        "card_number": card_number,
        "iban_mod97": iban_mod97,
        "ssn_rules": ssn_rules,
        "aba_checksum": aba_checksum,
        "base58check": base58check,
        "bech32": bech32,
        "crypto_address": crypto_address,
        "jwt_structure": jwt_structure,
        "jwt_header": jwt_header,
        "base62_crc32": base62_crc32,
        "ip_address": ip_address,
        "not_placeholder": not_placeholder,
        "uk_nino": uk_nino,
        "uk_nhs": uk_nhs,
        "ca_sin": ca_sin,
        "in_aadhaar": in_aadhaar,
        "in_pan": in_pan,
        "au_tfn": au_tfn,
        "au_medicare": au_medicare,
        "de_tax_id": de_tax_id,
        "fr_nir": fr_nir,
        "es_dni": es_dni,
        "es_nie": es_nie,
        "it_fiscal_code": it_fiscal_code,
        "nl_bsn": nl_bsn,
        "br_cpf": br_cpf,
        "br_cnpj": br_cnpj,
        "pl_pesel": pl_pesel,
        "se_personnummer": se_personnummer,
        "sg_nric_fin": sg_nric_fin,
        "jp_my_number": jp_my_number,
        "imei": imei,
        "eu_vat": eu_vat,
        "mrz_td3": mrz_td3,
    }
)


def validate(name: str, value: str) -> bool:
    """Run the validator registered as ``name`` on ``value``; ``KeyError`` names an unknown validator."""
    try:
        validator = VALIDATORS[name]
    except KeyError:
        known = ", ".join(sorted(VALIDATORS))
        raise KeyError(f"unknown validator {name!r} (known validators: {known})") from None
    return validator(value)
