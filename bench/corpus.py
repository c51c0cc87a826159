"""The project's own labelled corpus: documents a security team pastes, generated from a fixed seed.

    python -m bench.corpus [--documents N] [--seed S]    # print the corpus as JSON lines

Every document is one of the shapes in ``SHAPES`` (a console CSV export, an ``.env`` file, a Kubernetes
manifest, an HR table, an e-mail signature...), with planted values whose spans are labelled and decoys
that look like values and are not. Planted values are random, valid by their own checksum or provider
format (``valid`` says so, with python-stdnum for the national identifiers), never a real credential or
person; decoys fail that check (a wrong check digit, a published placeholder or example) or stand where
nothing says what they are (``CONTEXT`` lists the words that would). ``evaluate`` scores a pack on it:
per entity, recall, decoys reported, findings on no labelled span, and the leak rate after masking.
``bench.eval`` runs it as a section of ``make eval``.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import string
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from stdnum import iban as stdnum_iban
from stdnum import luhn as stdnum_luhn
from stdnum import verhoeff as stdnum_verhoeff
from stdnum.au import tfn as stdnum_au_tfn
from stdnum.br import cpf as stdnum_br_cpf
from stdnum.ca import sin as stdnum_ca_sin
from stdnum.de import idnr as stdnum_de_idnr
from stdnum.es import dni as stdnum_es_dni
from stdnum.es import nie as stdnum_es_nie
from stdnum.fr import nir as stdnum_fr_nir
from stdnum.in_ import aadhaar as stdnum_in_aadhaar
from stdnum.in_ import pan as stdnum_in_pan
from stdnum.iso7064 import mod_11_10
from stdnum.it import codicefiscale as stdnum_it_cf
from stdnum.nl import bsn as stdnum_nl_bsn
from stdnum.us import ssn as stdnum_us_ssn

SEED = 20240917
DOCUMENTS = 600
TARGET_RECALL, TARGET_FP = 0.99, 0.01

# --- labelled documents --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    entity: str
    start: int
    end: int
    value: str
    kind: str = ""  # decoys: "checksum" (fails its check), "placeholder", "example", "context"


@dataclass(frozen=True)
class Document:
    shape: str
    text: str
    planted: tuple[Span, ...]
    decoys: tuple[Span, ...]


@dataclass
class _Builder:
    shape: str
    parts: list[str] = field(default_factory=list)
    size: int = 0
    planted: list[Span] = field(default_factory=list)
    decoys: list[Span] = field(default_factory=list)

    def t(self, text: str) -> _Builder:
        self.parts.append(text)
        self.size += len(text)
        return self

    def p(self, entity: str, value: str) -> _Builder:
        self.planted.append(Span(entity, self.size, self.size + len(value), value))
        return self.t(value)

    def d(self, entity: str, value: str, kind: str) -> _Builder:
        self.decoys.append(Span(entity, self.size, self.size + len(value), value, kind))
        return self.t(value)

    def build(self) -> Document:
        return Document(self.shape, "".join(self.parts), tuple(self.planted), tuple(self.decoys))


# --- values ----------------------------------------------------------------------------------------------

UPPER, LOWER, DIGITS = string.ascii_uppercase, string.ascii_lowercase, string.digits
ALNUM = UPPER + LOWER + DIGITS
URLSAFE = ALNUM + "-_"
BASE62 = DIGITS + UPPER + LOWER
HEX = "0123456789abcdef"
CREDENTIALS = (
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "GITHUB_TOKEN",
    "GITLAB_TOKEN",
    "SLACK_TOKEN",
    "STRIPE_KEY",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "GOOGLE_API_KEY",
    "HUGGINGFACE_TOKEN",
    "SENDGRID_API_KEY",
    "NPM_TOKEN",
    "JWT",
    "CONNECTION_STRING",
    "GENERIC_SECRET",
)
# Providers' published examples and test values: shaped like their credentials, granting nothing.
PUBLISHED_EXAMPLES = (
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIy"
    "fQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
)
PLACEHOLDERS = (
    "changeme",
    "${DB_PASSWORD}",
    "<your-key>",
    "****",
    "{{ .Values.password }}",
    "your_api_key_here",
)
_PLACEHOLDER_MARKS = ("example", "changeme", "${", "{{", "<", ">", "***", "xxxx", "your_", "your-")

# A credential's format: prefix, alphabet and length, as its provider issues it.
FORMATS = {
    "AWS_ACCESS_KEY": re.compile(r"AKIA[A-Z2-7]{16}"),
    "AWS_SECRET_KEY": re.compile(r"[A-Za-z0-9/+]{40}"),
    "GITHUB_TOKEN": re.compile(r"ghp_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}"),
    "GITLAB_TOKEN": re.compile(r"glpat-[A-Za-z0-9_-]{20}"),
    "SLACK_TOKEN": re.compile(r"xox[bp]-[0-9]{10,13}-[0-9]{10,13}-[A-Za-z0-9]{24}"),
    "STRIPE_KEY": re.compile(r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{24,99}|whsec_[A-Za-z0-9]{32}"),
    "OPENAI_API_KEY": re.compile(
        r"sk-(?:proj-[A-Za-z0-9_-]{64}|[A-Za-z0-9]{20})T3BlbkFJ[A-Za-z0-9_-]{20,64}"
    ),
    "ANTHROPIC_API_KEY": re.compile(r"sk-ant-api03-[A-Za-z0-9_-]{93}AA"),
    "GOOGLE_API_KEY": re.compile(r"AIza[A-Za-z0-9_-]{35}"),
    "HUGGINGFACE_TOKEN": re.compile(r"hf_[A-Za-z]{34}"),
    "SENDGRID_API_KEY": re.compile(r"SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}"),
    "NPM_TOKEN": re.compile(r"npm_[A-Za-z0-9]{36}"),
}


def _chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _base62_crc32(body: str) -> str:
    number, out = zlib.crc32(body.encode("ascii")), ""
    for _ in range(6):
        number, digit = divmod(number, 62)
        out = BASE62[digit] + out
    return out


def _password(rng: random.Random, symbols: str = "!#%^*_-=+.") -> str:
    while True:
        value = _chars(rng, ALNUM + symbols, rng.randint(14, 22))
        if (
            any(c in UPPER for c in value)
            and any(c in LOWER for c in value)
            and any(c in DIGITS for c in value)
        ):
            return value


def credential(rng: random.Random, entity: str) -> str:
    """A random value in the provider's format (prefix, alphabet, length)."""
    if entity == "AWS_ACCESS_KEY":
        return "AKIA" + _chars(rng, UPPER + "234567", 16)
    if entity == "AWS_SECRET_KEY":
        return _chars(rng, ALNUM + "/+", 40)
    if entity in ("GITHUB_TOKEN", "NPM_TOKEN"):
        if entity == "GITHUB_TOKEN" and rng.random() < 0.3:
            return f"github_pat_{_chars(rng, ALNUM, 22)}_{_chars(rng, ALNUM, 59)}"
        body = _chars(rng, ALNUM, 30)
        return ("ghp_" if entity == "GITHUB_TOKEN" else "npm_") + body + _base62_crc32(body)
    if entity == "GITLAB_TOKEN":
        return "glpat-" + _chars(rng, URLSAFE, 20)
    if entity == "SLACK_TOKEN":
        return f"xoxb-{_chars(rng, DIGITS, 12)}-{_chars(rng, DIGITS, 13)}-{_chars(rng, ALNUM, 24)}"
    if entity == "STRIPE_KEY":
        kind = rng.choice(("sk_live_", "rk_live_", "sk_live_", "whsec_"))
        return kind + _chars(rng, ALNUM, 32 if kind == "whsec_" else rng.choice((24, 99)))
    if entity == "OPENAI_API_KEY":
        if rng.random() < 0.5:
            return f"sk-proj-{_chars(rng, URLSAFE, 64)}T3BlbkFJ{_chars(rng, URLSAFE, 64)}"
        return f"sk-{_chars(rng, ALNUM, 20)}T3BlbkFJ{_chars(rng, ALNUM, 20)}"
    if entity == "ANTHROPIC_API_KEY":
        return f"sk-ant-api03-{_chars(rng, URLSAFE, 93)}AA"
    if entity == "GOOGLE_API_KEY":
        return "AIza" + _chars(rng, URLSAFE, 35)
    if entity == "HUGGINGFACE_TOKEN":
        return "hf_" + _chars(rng, UPPER + LOWER, 34)
    if entity == "SENDGRID_API_KEY":
        return f"SG.{_chars(rng, URLSAFE, 22)}.{_chars(rng, URLSAFE, 43)}"
    if entity == "JWT":
        return jwt(rng)
    raise ValueError(entity)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(rng: random.Random) -> str:
    """A signed-looking token of 350 to 600 characters with seven ordinary claims (random signature)."""
    alg, sig_bytes = rng.choice((("HS256", 32), ("HS512", 64), ("ES256", 64)))
    header = {"alg": alg, "typ": "JWT", "kid": _chars(rng, HEX, 16)}
    while True:
        issued = rng.randint(1_700_000_000, 1_760_000_000)
        claims = {
            "iss": f"https://login.{rng.choice(('corp', 'intra', 'sso'))}.{rng.choice(ALL_DOMAINS)}/",
            "sub": _uuid(rng),
            "aud": rng.choice(("orders-api", "billing", "https://api.internal/")),
            "iat": issued,
            "exp": issued + 3600,
            "jti": _chars(rng, ALNUM, rng.randint(16, 40)),
            "scope": " ".join(rng.sample(SCOPES, rng.randint(2, len(SCOPES)))),
        }
        token = ".".join(
            (
                _b64url(json.dumps(header, separators=(",", ":")).encode()),
                _b64url(json.dumps(claims, separators=(",", ":")).encode()),
                _b64url(rng.randbytes(sig_bytes)),
            )
        )
        if 350 <= len(token) <= 600:
            return token


SCOPES = ("openid", "profile", "orders:read", "orders:write", "billing:read", "admin", "offline_access")


def _luhn_number(rng: random.Random, prefix: str, length: int) -> str:
    body = prefix + _chars(rng, DIGITS, length - len(prefix) - 1)
    return body + stdnum_luhn.calc_check_digit(body)


def _broken(digits: str) -> str:
    """The same digits with the last one changed: a checksum over them fails (for Luhn and mod 11, always)."""
    return digits[:-1] + str((int(digits[-1]) + rng_offset(digits)) % 10)


def rng_offset(digits: str) -> int:
    return 1 + sum(map(int, digits)) % 8  # 1..8: never 0 nor a full turn


def card(rng: random.Random) -> str:
    prefix, length = rng.choice(
        (("4", 16), ("51", 16), ("2221", 16), ("37", 15), ("6011", 16), ("4", 19), ("62", 19))
    )
    return _luhn_number(rng, prefix, length)


def group(value: str, sizes: tuple[int, ...], sep: str) -> str:
    out, i = [], 0
    for size in sizes:
        out.append(value[i : i + size])
        i += size
    if i < len(value):
        out.append(value[i:])
    return sep.join(p for p in out if p)


def card_layout(number: str, sep: str) -> str:
    if len(number) == 15:
        return group(number, (4, 6, 5), sep)
    return group(number, (4, 4, 4, 4), sep)


IBAN_BBAN = {  # country: a random BBAN in its layout
    "DE": lambda rng: _chars(rng, DIGITS, 18),
    "GB": lambda rng: rng.choice(("NWBK", "BARC", "LOYD", "MIDL")) + _chars(rng, DIGITS, 14),
    "NL": lambda rng: rng.choice(("ABNA", "INGB", "RABO")) + _chars(rng, DIGITS, 10),
    "FR": lambda rng: _chars(rng, DIGITS, 23),
    "ES": lambda rng: _chars(rng, DIGITS, 20),
    "IT": lambda rng: rng.choice(UPPER) + _chars(rng, DIGITS, 22),
}


def iban(rng: random.Random, country: str) -> str:
    for _ in range(100_000):
        bban = IBAN_BBAN[country](rng)
        value = country + stdnum_iban.calc_check_digits(country + "00" + bban) + bban
        if stdnum_iban.is_valid(value):
            return value
    raise RuntimeError(country)


def broken_iban(rng: random.Random, country: str) -> str:
    value = iban(rng, country)
    check = (int(value[2:4]) + rng.randint(1, 90)) % 97 + 2
    return (
        value[:2] + f"{check:02d}" + value[4:]
        if f"{check:02d}" != value[2:4]
        else value[:2] + "00" + value[4:]
    )


def iban_with_card(rng: random.Random) -> str:
    """A German IBAN-shaped string whose mod 97 fails and whose first 16 digits after the check pass Luhn."""
    while True:
        value = (
            "DE" + f"{rng.randint(10, 99)}" + _luhn_number(rng, rng.choice("45"), 16) + _chars(rng, DIGITS, 2)
        )
        if not stdnum_iban.is_valid(value):
            return group(value, (4, 4, 4, 4, 4), " ")


def ssn(rng: random.Random) -> str:
    while True:
        value = f"{rng.randint(1, 899):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        if stdnum_us_ssn.is_valid(value):
            return value


def _valid_digits(rng: random.Random, module: Any, length: int, first: str = "123456789") -> str:
    while True:
        value = rng.choice(first) + _chars(rng, DIGITS, length - 1)
        if module.is_valid(value):
            return value


def uk_nino(rng: random.Random) -> str:
    while True:
        prefix = rng.choice("ABCEGHJKLMNOPRSTWXYZ") + rng.choice("ABCEGHJKLMNPRSTWXYZ")
        if prefix not in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ"):
            return prefix + _chars(rng, DIGITS, 6) + rng.choice("ABCD")


def ca_sin(rng: random.Random) -> str:
    return _luhn_number(rng, rng.choice("1234567"), 9)


def de_tax_id(rng: random.Random) -> str:
    while True:
        body = rng.choice("123456789") + _chars(rng, DIGITS, 9)
        value = body + mod_11_10.calc_check_digit(body)
        if stdnum_de_idnr.is_valid(value):
            return value


def fr_nir(rng: random.Random) -> str:
    while True:
        dept = rng.choice([f"{d:02d}" for d in range(1, 96) if d != 20])
        body = (
            f"{rng.choice('12')}{rng.randint(50, 99):02d}{rng.randint(1, 12):02d}{dept}"
            f"{rng.randint(1, 990):03d}{rng.randint(1, 999):03d}"
        )
        value = body + stdnum_fr_nir.calc_check_digits(body)
        if stdnum_fr_nir.is_valid(value):
            return value


def es_dni(rng: random.Random) -> str:
    body = _chars(rng, DIGITS, 8)
    return body + stdnum_es_dni.calc_check_digit(body)


def es_nie(rng: random.Random) -> str:
    body = rng.choice("XYZ") + _chars(rng, DIGITS, 7)
    return body + stdnum_es_nie.calc_check_digit(body)


def it_fiscal_code(rng: random.Random) -> str:
    consonants = "BCDFGHJKLMNPQRSTVZ"
    while True:
        day = rng.randint(1, 28) + rng.choice((0, 40))
        body = (
            _chars(rng, consonants, 6)
            + f"{rng.randint(50, 99):02d}"
            + rng.choice("ABCDEHLMPRST")
            + f"{day:02d}"
            + rng.choice(("H501", "F205", "L219", "A662", "G273", "D612"))
        )
        value = body + stdnum_it_cf.calc_check_digit(body)
        if stdnum_it_cf.is_valid(value):
            return value


def in_aadhaar(rng: random.Random) -> str:
    while True:
        body = rng.choice("23456789") + _chars(rng, DIGITS, 10)
        value = body + stdnum_verhoeff.calc_check_digit(body)
        if stdnum_in_aadhaar.is_valid(value):
            return value


def in_pan(rng: random.Random, surname: str) -> str:
    return (
        _chars(rng, UPPER, 3) + "P" + surname[0].upper() + f"{rng.randint(1, 9999):04d}" + rng.choice(UPPER)
    )


def au_medicare(rng: random.Random) -> str:
    body = rng.choice("23456") + _chars(rng, DIGITS, 7)
    check = sum(int(d) * w for d, w in zip(body, (1, 3, 7, 9, 1, 3, 7, 9), strict=True)) % 10
    return f"{body}{check}{rng.randint(1, 9)}"


def au_medicare_valid(value: str) -> bool:
    digits = re.sub(r"[ -]", "", value)
    if not re.fullmatch(r"[2-6][0-9]{8}[1-9][0-9]?", digits):
        return False
    return sum(int(d) * w for d, w in zip(digits, (1, 3, 7, 9, 1, 3, 7, 9), strict=False)) % 10 == int(
        digits[8]
    )


def uk_nino_valid(value: str) -> bool:
    compact = value.replace(" ", "")
    return re.fullmatch(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][0-9]{6}[A-D]", compact) is not None and compact[
        :2
    ] not in ("BG", "GB", "KN", "NK", "NT", "TN", "ZZ")


# Telephone numbers in the ranges regulators reserve for drama and examples where they exist (Ofcom's
# 020 7946 0xxx and 07700 900xxx, NANP's 555-01xx, ARCEP's 01 99 00 xx xx, ACMA's 0491 570 1xx and
# 02 5550 xxxx); elsewhere random subscriber digits after a real area code.
PHONES: dict[str, tuple[Callable[[random.Random], str], ...]] = {
    "UK": (
        lambda r: f"+44 20 7946 0{_chars(r, DIGITS, 3)}",
        lambda r: f"020 7946 0{_chars(r, DIGITS, 3)}",
        lambda r: f"+44 7700 900{_chars(r, DIGITS, 3)}",
    ),
    "US": (
        lambda r: f"({r.choice(('212', '415', '312', '617'))}) 555-01{_chars(r, DIGITS, 2)}",
        lambda r: f"+1 {r.choice(('206', '303', '512'))} 555 01{_chars(r, DIGITS, 2)}",
    ),
    "CA": (lambda r: f"+1 (416) 555-01{_chars(r, DIGITS, 2)}", lambda r: f"514-555-01{_chars(r, DIGITS, 2)}"),
    "DE": (
        lambda r: f"+49 30 {_chars(r, DIGITS, 8)}",
        lambda r: f"+49 151 {_chars(r, DIGITS, 8)}",
        lambda r: f"0{r.choice(('30', '40', '89'))} {_chars(r, DIGITS, 4)} {_chars(r, DIGITS, 3)}",
        lambda r: f"0171 {_chars(r, DIGITS, 7)}",
    ),
    "FR": (
        lambda r: f"+33 1 99 00 {_chars(r, DIGITS, 2)} {_chars(r, DIGITS, 2)}",
        lambda r: f"01 99 00 {_chars(r, DIGITS, 2)} {_chars(r, DIGITS, 2)}",
        lambda r: f"06 39 98 {_chars(r, DIGITS, 2)} {_chars(r, DIGITS, 2)}",
    ),
    "ES": (lambda r: f"+34 91 {_chars(r, DIGITS, 3)} {_chars(r, DIGITS, 2)} {_chars(r, DIGITS, 2)}",),
    "IT": (lambda r: f"+39 06 {_chars(r, DIGITS, 4)} {_chars(r, DIGITS, 4)}",),
    "NL": (
        lambda r: f"+31 20 {_chars(r, DIGITS, 3)} {_chars(r, DIGITS, 4)}",
        lambda r: f"06-{_chars(r, DIGITS, 8)}",
    ),
    "BR": (lambda r: f"+55 11 9{_chars(r, DIGITS, 4)}-{_chars(r, DIGITS, 4)}",),
    "IN": (lambda r: f"+91 98{_chars(r, DIGITS, 3)} {_chars(r, DIGITS, 5)}",),
    "AU": (lambda r: f"+61 2 5550 {_chars(r, DIGITS, 4)}", lambda r: f"0491 570 1{_chars(r, DIGITS, 2)}"),
}


def phone_valid(value: str) -> bool:
    digits = re.sub(r"[^0-9]", "", value)
    return (
        re.fullmatch(r"[+(0-9][0-9 ()./-]*[0-9]", value) is not None
        and 10 <= len(digits) <= 15
        and (value[0] in "+(0" or len(digits) == 10)
    )


EMAIL = re.compile(r"[a-z0-9._%+-]{1,64}@[a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63})*\.[a-z]{2,24}")
FILE_SUFFIXES = ("png", "jpg", "svg", "gif", "webp")


def email_valid(value: str) -> bool:
    return EMAIL.fullmatch(value) is not None and value.rsplit(".", 1)[1] not in FILE_SUFFIXES


def card_valid(value: str) -> bool:
    digits = re.sub(r"[ .-]", "", value)
    return digits.isdigit() and 13 <= len(digits) <= 19 and stdnum_luhn.is_valid(digits)


def _not_placeholder(value: str) -> bool:
    folded = value.casefold()
    return (
        value not in PUBLISHED_EXAMPLES
        and not any(mark in folded for mark in _PLACEHOLDER_MARKS)
        and len(set(folded)) > 4
    )


def _secret_valid(value: str) -> bool:
    """A password or key chosen for a system: 12+ characters of two kinds or more (upper and lower case
    letters, digits, punctuation), eight of them different, no placeholder."""
    kinds = sum(any(c in alphabet for c in value) for alphabet in (UPPER, LOWER, DIGITS, string.punctuation))
    return (
        12 <= len(value) <= 128
        and kinds >= 2
        and len(set(value)) >= 8
        and " " not in value
        and _not_placeholder(value)
    )


def jwt_valid(value: str) -> bool:
    parts = value.split(".")
    if len(parts) != 3 or not _not_placeholder(value):
        return False
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2])
    except ValueError:
        return False
    return isinstance(header.get("alg"), str) and isinstance(claims, dict) and len(claims) >= 7


def _stdnum(module: Any, separators: str = " -.") -> Callable[[str], bool]:
    return lambda value: bool(module.is_valid(re.sub(f"[{re.escape(separators)}]", "", value)))


VALIDATORS: dict[str, Callable[[str], bool]] = {
    "CREDIT_CARD": card_valid,
    "IBAN_CODE": lambda v: bool(stdnum_iban.is_valid(v)),
    "US_SSN": lambda v: bool(stdnum_us_ssn.is_valid(v)),
    "PHONE_NUMBER": phone_valid,
    "EMAIL_ADDRESS": email_valid,
    "UK_NINO": uk_nino_valid,
    "CA_SIN": _stdnum(stdnum_ca_sin),
    "DE_TAX_ID": _stdnum(stdnum_de_idnr),
    "FR_NIR": _stdnum(stdnum_fr_nir),
    "ES_NIF": _stdnum(stdnum_es_dni),
    "ES_NIE": _stdnum(stdnum_es_nie),
    "IT_FISCAL_CODE": _stdnum(stdnum_it_cf),
    "NL_BSN": _stdnum(stdnum_nl_bsn),
    "BR_CPF": _stdnum(stdnum_br_cpf),
    "IN_AADHAAR": _stdnum(stdnum_in_aadhaar),
    "IN_PAN": lambda v: bool(stdnum_in_pan.is_valid(v)),
    "AU_TFN": _stdnum(stdnum_au_tfn),
    "AU_MEDICARE": au_medicare_valid,
    "JWT": jwt_valid,
    "CONNECTION_STRING": _secret_valid,
    "GENERIC_SECRET": _secret_valid,
    **{
        entity: (lambda v, f=fmt: f.fullmatch(v) is not None and _not_placeholder(v))
        for entity, fmt in FORMATS.items()
    },
}
VALIDATORS["GITHUB_TOKEN"] = lambda v: (
    FORMATS["GITHUB_TOKEN"].fullmatch(v) is not None
    and (v.startswith("github_pat_") or _base62_crc32(v[4:34]) == v[34:])
)
VALIDATORS["NPM_TOKEN"] = lambda v: (
    FORMATS["NPM_TOKEN"].fullmatch(v) is not None and _base62_crc32(v[4:34]) == v[34:]
)


def valid(entity: str, value: str) -> bool:
    """Whether ``value`` is a well-formed ``entity`` by its own check (checksum, structure, format)."""
    return VALIDATORS[entity](value)


# Words that say what a bare number is. A "context" decoy stands in a document holding none of them.
CONTEXT = {
    "US_SSN": ("ssn", "social security", "ss#"),
    "CA_SIN": ("sin", "nas", "social insurance", "assurance sociale"),
    "NL_BSN": ("bsn", "burgerservicenummer", "sofi"),
    "AU_TFN": ("tfn", "tax file"),
    "DE_TAX_ID": ("steuer", "idnr", "identifikationsnummer", "tax"),
    "IN_AADHAAR": ("aadhaar", "uidai"),
    "BR_CPF": ("cpf",),
    "PHONE_NUMBER": ("phone", "tel", "telefon", "mobile", "handy", "fax", "call", "t:", "m:"),
}


def has_context(entity: str, text: str) -> bool:
    folded = text.casefold()
    return any(re.search(rf"(?<![a-z]){re.escape(word)}(?![a-z])", folded) for word in CONTEXT[entity])


# --- people and companies (invented) ------------------------------------------------------------------

DOMAINS = {
    "UK": "harbourline.co.uk",
    "US": "kestrel-analytics.io",
    "CA": "mapleleaf-payroll.ca",
    "DE": "lindqvist-bau.de",
    "FR": "atelier-moreau.fr",
    "ES": "vela-systems.es",
    "IT": "orto-digitale.it",
    "NL": "polderwerk.nl",
    "BR": "cerrado-tech.com.br",
    "IN": "sahyadri-soft.in",
    "AU": "wattle-health.com.au",
}
ALL_DOMAINS = tuple(DOMAINS.values())
NAMES = {
    "UK": (
        ("Oliver", "Amelia", "Harriet", "George", "Priya"),
        ("Whitfield", "Ashworth", "Pennington", "Okafor"),
    ),
    "US": (
        ("Jordan", "Maya", "Ethan", "Rosa", "Daniel"),
        ("Calloway", "Brennan", "Okoro", "Lindgren", "Vasquez"),
    ),
    "CA": (("Étienne", "Chloé", "Liam", "Noor"), ("Tremblay", "Gagnon", "MacLeod", "Bouchard")),
    "DE": (("Lukas", "Anja", "Jürgen", "Mia"), ("Hoffmann", "Schäfer", "Brandt", "Krüger")),
    "FR": (("Camille", "Mathieu", "Léa", "Hugo"), ("Moreau", "Lefèvre", "Girard", "Faure")),
    "ES": (("Lucía", "Javier", "Carmen", "Pablo"), ("Navarro", "Iglesias", "Castro", "Ortega")),
    "IT": (("Giulia", "Marco", "Chiara", "Luca"), ("Bianchi", "Greco", "Marino", "Conti")),
    "NL": (("Sanne", "Daan", "Femke", "Joris"), ("de Vries", "Bakker", "Visser", "Smit")),
    "BR": (("Ana", "Thiago", "Beatriz", "Rafael"), ("Souza", "Oliveira", "Carvalho", "Ribeiro")),
    "IN": (("Ananya", "Rohan", "Kavya", "Arjun"), ("Iyer", "Deshpande", "Nair", "Kulkarni")),
    "AU": (("Charlotte", "Jack", "Matilda", "Hamish"), ("Fitzgerald", "O'Brien", "Nguyen", "Campbell")),
}
DEPARTMENTS = ("Finance", "Engineering", "Sales", "People", "Support", "Legal", "Operations")


def _person(rng: random.Random, country: str) -> tuple[str, str, str]:
    firsts, lasts = NAMES[country]
    first, last = rng.choice(firsts), rng.choice(lasts)
    local = f"{first}.{last}".casefold().replace(" ", "").replace("'", "")
    local = local.translate(str.maketrans("éèüäöçí", "eeuaoci"))
    domain = DOMAINS[country]
    return first, last, f"{local}@{domain}"


def _date(rng: random.Random) -> str:
    return f"20{rng.randint(15, 24)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _uuid(rng: random.Random) -> str:
    h = _chars(rng, HEX, 32)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


def _host(rng: random.Random) -> str:
    return (
        rng.choice(("db", "pg-primary", "orders-db", "mysql-01", "warehouse"))
        + "."
        + rng.choice(("internal", "svc.cluster.local", "prod.example.net", "eu-west-1.rds.amazonaws.com"))
    )


# --- shapes --------------------------------------------------------------------------------------------


def aws_console_csv(rng: random.Random) -> Document:
    b = _Builder("AWS console CSV export")
    if rng.random() < 0.5:
        b.t("Access key ID,Secret access key\n")
        b.p("AWS_ACCESS_KEY", credential(rng, "AWS_ACCESS_KEY")).t(",")
        b.p("AWS_SECRET_KEY", credential(rng, "AWS_SECRET_KEY")).t("\n")
    else:
        user = rng.choice(("ci-deployer", "backup-bot", "j.calloway"))
        account = _chars(rng, DIGITS, 12)
        b.t("User name,Password,Access key ID,Secret access key,Console login link\n" + user + ",")
        b.p("GENERIC_SECRET", _password(rng)).t(",")
        b.p("AWS_ACCESS_KEY", credential(rng, "AWS_ACCESS_KEY")).t(",")
        b.p("AWS_SECRET_KEY", credential(rng, "AWS_SECRET_KEY"))
        b.t(f",https://{account}.signin.aws.amazon.com/console\n")
    return b.build()


def aws_credentials_file(rng: random.Random) -> Document:
    b = _Builder("~/.aws/credentials")
    b.t("[default]\naws_access_key_id = ").p("AWS_ACCESS_KEY", credential(rng, "AWS_ACCESS_KEY"))
    b.t("\naws_secret_access_key = ").p("AWS_SECRET_KEY", credential(rng, "AWS_SECRET_KEY"))
    b.t(f"\nregion = {rng.choice(('eu-west-1', 'us-east-1', 'ap-southeast-2'))}\n\n[docs-example]\n")
    b.t("aws_access_key_id = ").d("AWS_ACCESS_KEY", PUBLISHED_EXAMPLES[0], "example")
    b.t("\naws_secret_access_key = ").d("AWS_SECRET_KEY", PUBLISHED_EXAMPLES[1], "example").t("\n")
    return b.build()


def dotenv(rng: random.Random) -> Document:
    b = _Builder(".env file")
    b.t(f"# {rng.choice(('orders', 'billing', 'search'))}-service, local overrides\nNODE_ENV=production\n")
    b.t(f"PORT={rng.choice((3000, 8080, 8000))}\nLOG_LEVEL=info\nDATABASE_URL=postgres://app:")
    b.p("CONNECTION_STRING", _password(rng)).t(f"@{_host(rng)}:5432/app\n")
    b.t("STRIPE_SECRET_KEY=").p("STRIPE_KEY", credential(rng, "STRIPE_KEY")).t("\n")
    b.t("GITHUB_TOKEN=").p("GITHUB_TOKEN", credential(rng, "GITHUB_TOKEN")).t("\n")
    b.t("OPENAI_API_KEY=").p("OPENAI_API_KEY", credential(rng, "OPENAI_API_KEY")).t("\n")
    b.t("SESSION_SECRET=").p("GENERIC_SECRET", _password(rng)).t("\n")
    b.t("SENDGRID_API_KEY=").p("SENDGRID_API_KEY", credential(rng, "SENDGRID_API_KEY")).t("\n")
    b.t("# placeholders for new developers\nREDIS_PASSWORD=").d(
        "GENERIC_SECRET", rng.choice(PLACEHOLDERS), "placeholder"
    )
    b.t("\nSTRIPE_TEST_KEY=").d("STRIPE_KEY", PUBLISHED_EXAMPLES[2], "example").t("\n")
    return b.build()


def _connection(rng: random.Random, b: _Builder, form: int) -> None:
    """One connection string; the password has ``!``, ``?`` or ``@`` (raw or percent-encoded)."""
    pw = _password(rng, "!?@#")
    user, host, db = rng.choice(("app", "svc_orders", "etl")), _host(rng), rng.choice(("orders", "ledger"))
    url_pw = pw.replace("@", "%40").replace("?", "%3F").replace("#", "%23") if form % 2 == 0 else pw
    if form in (0, 1):
        scheme = rng.choice(("postgresql+psycopg2", "postgresql+asyncpg", "postgresql"))
        b.t(f"{scheme}://{user}:").p("CONNECTION_STRING", url_pw).t(f"@{host}:5432/{db}")
    elif form in (2, 3):
        scheme = rng.choice(("mysql+pymysql", "mysql+mysqldb", "mariadb+mariadbconnector"))
        b.t(f"{scheme}://{user}:").p("CONNECTION_STRING", url_pw).t(f"@{host}:3306/{db}?charset=utf8mb4")
    elif form == 4:
        b.t(f"mssql+pyodbc://{user}:").p("CONNECTION_STRING", url_pw)
        b.t(f"@{host}:1433/{db}?driver=ODBC+Driver+18+for+SQL+Server")
    elif form == 5:
        b.t(f"mongodb+srv://{user}:").p("CONNECTION_STRING", url_pw).t(
            f"@cluster0.{_chars(rng, LOWER, 5)}.mongodb.net/{db}"
        )
    elif form == 6:
        b.t("redis://:").p("CONNECTION_STRING", url_pw).t(f"@{host}:6379/0")
    elif form == 7:
        b.t(f"amqp://{user}:").p("CONNECTION_STRING", url_pw).t(f"@{host}:5672/%2F")
    elif form == 8:
        b.t(f"jdbc:postgresql://{host}:5432/{db}?user={user}&password=").p("CONNECTION_STRING", url_pw)
        b.t("&ssl=true")
    elif form == 9:
        b.t(f"Server=tcp:{host},1433;Database={db};User Id={user};Password=").p("CONNECTION_STRING", pw)
        b.t(";Encrypt=True;")
    elif form == 10:
        b.t(f"host={host} port=5432 dbname={db} user={user} password=").p("CONNECTION_STRING", pw)
        b.t(" sslmode=require")
    else:
        b.t(f"oracle+oracledb://{user}:").p("CONNECTION_STRING", url_pw).t(f"@{host}:1521/?service_name={db}")


CONNECTION_FORMS = 12
CONNECTION_PLACEHOLDERS = (
    ("postgresql://app:", "${DB_PASSWORD}", "@db:5432/app"),
    ("mysql+pymysql://root:", "<password>", "@localhost:3306/test"),
    ("redis://:", "****", "@cache:6379/0"),
    ("mongodb://admin:", "changeme", "@mongo:27017/admin"),
)


def connection_strings(rng: random.Random) -> Document:
    b = _Builder("connection strings (runbook)")
    b.t("Runbook: database connections after the migration\n\n")
    for form in rng.sample(range(CONNECTION_FORMS), 4):
        b.t(f"- {rng.choice(('primary', 'replica', 'reporting', 'worker'))}: ")
        _connection(rng, b, form)
        b.t("\n")
    before, value, after = rng.choice(CONNECTION_PLACEHOLDERS)
    b.t("- template for local development: " + before).d("CONNECTION_STRING", value, "placeholder").t(
        after + "\n"
    )
    return b.build()


def sqlalchemy_settings(rng: random.Random) -> Document:
    b = _Builder("SQLAlchemy settings")
    b.t('import os\n\nfrom sqlalchemy import create_engine\n\nSQLALCHEMY_DATABASE_URI = "')
    _connection(rng, b, rng.choice((0, 1, 2, 3)))
    b.t('"\nSQLALCHEMY_BINDS = {\n    "reports": "')
    _connection(rng, b, rng.choice((4, 5, 11)))
    b.t('",\n}\nengine = create_engine(\n    "')
    _connection(rng, b, rng.choice((0, 1, 2, 3)))
    b.t(f'",\n    pool_size={rng.randint(5, 20)},\n)\n')
    b.t('SECRET_KEY = os.environ.get("SECRET_KEY", ').d("GENERIC_SECRET", '"changeme"', "placeholder").t(
        ")\n"
    )
    return b.build()


def kubernetes_secret(rng: random.Random) -> Document:
    b = _Builder("Kubernetes Secret (data:)")
    name = rng.choice(("orders-db", "billing-credentials", "app-secrets"))
    b.t(f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: prod\ntype: Opaque\ndata:\n")
    for key in rng.sample(("password", "DB_PASSWORD", "api-token", "client-secret", "redis-password"), 2):
        encoded = base64.b64encode(_password(rng).encode()).decode()
        b.t(f"  {key}: ").p("GENERIC_SECRET", encoded).t("\n")
    b.t(f"  username: {base64.b64encode(b'app').decode()}\n")
    return b.build()


def kubernetes_env(rng: random.Random) -> Document:
    b = _Builder("Kubernetes manifest (env entries)")
    app = rng.choice(("orders", "billing", "search"))
    digest = _chars(rng, HEX, 64)
    b.t(
        f"apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {app}\n"
        "spec:\n  replicas: 3\n  template:\n"
    )
    b.t(f"    spec:\n      containers:\n        - name: {app}\n")
    b.t(f"          image: registry.internal/{app}@sha256:{digest}\n          env:\n")
    b.t("            - name: DB_PASSWORD\n              value: ").p("GENERIC_SECRET", _password(rng)).t("\n")
    b.t('            - name: SLACK_BOT_TOKEN\n              value: "').p(
        "SLACK_TOKEN", credential(rng, "SLACK_TOKEN")
    )
    b.t('"\n            - name: HF_TOKEN\n              value: ').p(
        "HUGGINGFACE_TOKEN", credential(rng, "HUGGINGFACE_TOKEN")
    )
    b.t("\n            - name: API_KEY\n              valueFrom:\n                secretKeyRef:\n")
    b.t(f"                  name: {app}-secrets\n                  key: api-key\n")
    b.t("            - name: ADMIN_PASSWORD\n              value: ").d(
        "GENERIC_SECRET", rng.choice(PLACEHOLDERS), "placeholder"
    )
    b.t("\n")
    return b.build()


def json_config(rng: random.Random) -> Document:
    b = _Builder("JSON config")
    b.t('{\n  "service": "' + rng.choice(("checkout", "ledger", "notifier")) + '",\n  "database": {\n')
    b.t(f'    "host": "{_host(rng)}",\n    "port": 5432,\n    "user": "app",\n    "password": "')
    b.p("GENERIC_SECRET", _password(rng)).t('"\n  },\n  "google": {\n    "api_key": "')
    b.p("GOOGLE_API_KEY", credential(rng, "GOOGLE_API_KEY")).t('"\n  },\n  "slack": {\n    "bot_token": "')
    b.p("SLACK_TOKEN", credential(rng, "SLACK_TOKEN")).t('",\n    "channel": "#alerts"\n  },\n  "auth": {\n')
    b.t('    "client_id": "' + _uuid(rng) + '",\n    "client_secret": "')
    b.p("GENERIC_SECRET", _chars(rng, URLSAFE, 40)).t('",\n    "example_token": "')
    b.d("JWT", PUBLISHED_EXAMPLES[3], "example").t('"\n  },\n  "request_id": "' + _uuid(rng) + '"\n}\n')
    return b.build()


def yaml_config(rng: random.Random) -> Document:
    b = _Builder("YAML config")
    b.t("spring:\n  datasource:\n    url: jdbc:postgresql://" + _host(rng) + ":5432/orders\n")
    b.t("    username: orders\n    password: ").p("GENERIC_SECRET", _password(rng)).t("\n")
    b.t("gitlab:\n  url: https://gitlab.internal\n  token: ").p(
        "GITLAB_TOKEN", credential(rng, "GITLAB_TOKEN")
    )
    b.t("\nanthropic:\n  api_key: ").p("ANTHROPIC_API_KEY", credential(rng, "ANTHROPIC_API_KEY"))
    b.t("\njwt:\n  signing_secret: ").p("GENERIC_SECRET", _chars(rng, HEX, 64))
    b.t("\nmail:\n  password: ").d("GENERIC_SECRET", rng.choice(PLACEHOLDERS), "placeholder").t("\n")
    return b.build()


def ini_toml(rng: random.Random) -> Document:
    b = _Builder("INI / TOML")
    if rng.random() < 0.5:
        b.t("; app.ini\n[server]\nhost = 0.0.0.0\nport = 8080\n\n[database]\nuser = app\npassword = ")
        b.p("GENERIC_SECRET", _password(rng)).t("\n\n[npm]\n")
        b.t("//registry.npmjs.org/:_authToken=").p("NPM_TOKEN", credential(rng, "NPM_TOKEN")).t("\n")
        b.t("\n[smtp]\npassword = ").d("GENERIC_SECRET", rng.choice(PLACEHOLDERS), "placeholder").t("\n")
    else:
        b.t('# config.toml\n[server]\nport = 8080\n\n[database]\nuser = "app"\npassword = "')
        b.p("GENERIC_SECRET", _password(rng)).t('"\n\n[openai]\napi_key = "')
        b.p("OPENAI_API_KEY", credential(rng, "OPENAI_API_KEY")).t('"\n\n[stripe]\nsecret_key = "')
        b.p("STRIPE_KEY", credential(rng, "STRIPE_KEY")).t('"\n')
    return b.build()


def xml_config(rng: random.Random) -> Document:
    b = _Builder("XML config")
    b.t('<?xml version="1.0" encoding="utf-8"?>\n<configuration>\n  <appSettings>\n')
    b.t('    <add key="SendGridApiKey" value="').p("SENDGRID_API_KEY", credential(rng, "SENDGRID_API_KEY"))
    b.t('" />\n    <add key="ApiSecret" value="').p("GENERIC_SECRET", _password(rng)).t('" />\n')
    b.t('    <add key="SmtpPassword" value="').d(
        "GENERIC_SECRET", "<your-key>".replace("<", "&lt;").replace(">", "&gt;"), "placeholder"
    )
    b.t('" />\n  </appSettings>\n  <connectionStrings>\n    <add name="Main" connectionString="')
    _connection(rng, b, 9)
    b.t('" />\n  </connectionStrings>\n  <smtp>\n    <password>').p("GENERIC_SECRET", _password(rng))
    b.t("</password>\n  </smtp>\n</configuration>\n")
    return b.build()


def code(rng: random.Random) -> Document:
    language = rng.choice(("Python", "JavaScript", "Go", "Java"))
    b = _Builder(f"code ({language})")
    token, key = credential(rng, "GITHUB_TOKEN"), credential(rng, "STRIPE_KEY")
    secret = _password(rng)
    if language == "Python":
        b.t('import requests\n\nGITHUB_TOKEN = "').p("GITHUB_TOKEN", token).t('"\nstripe.api_key = "')
        b.p("STRIPE_KEY", key).t('"\nclient_secret = "').p("GENERIC_SECRET", secret)
        b.t('"\nTEST_KEY = "').d("STRIPE_KEY", PUBLISHED_EXAMPLES[2], "example").t('"  # Stripe docs\n')
    elif language == "JavaScript":
        b.t("const octokit = new Octokit({ auth: '").p("GITHUB_TOKEN", token).t("' });\n")
        b.t("const stripe = require('stripe')('").p("STRIPE_KEY", key).t("');\n")
        b.t("const apiSecret = '").p("GENERIC_SECRET", secret).t("';\n")
        b.t("const password = process.env.DB_PASSWORD || '").d("GENERIC_SECRET", "changeme", "placeholder").t(
            "';\n"
        )
    elif language == "Go":
        b.t('package main\n\nconst githubToken = "').p("GITHUB_TOKEN", token).t('"\n\nfunc main() {\n')
        b.t('\tstripeKey := "').p("STRIPE_KEY", key).t('"\n\tapiSecret := "').p("GENERIC_SECRET", secret)
        b.t('"\n\tdbPassword := "').d("GENERIC_SECRET", "${DB_PASSWORD}", "placeholder").t('"\n}\n')
    else:
        b.t('public class Config {\n    private static final String GITHUB_TOKEN = "').p(
            "GITHUB_TOKEN", token
        )
        b.t('";\n    private static final String STRIPE_KEY = "').p("STRIPE_KEY", key)
        b.t('";\n    private static final String CLIENT_SECRET = "').p("GENERIC_SECRET", secret)
        b.t('";\n    private static final String API_KEY = "').d(
            "GENERIC_SECRET", "<your-key>", "placeholder"
        ).t('";\n}\n')
    return b.build()


def jwt_request(rng: random.Random) -> Document:
    b = _Builder("HTTP request with a long JWT")
    b.t(f"POST /v1/orders HTTP/1.1\nHost: api.{rng.choice(ALL_DOMAINS)}\nAuthorization: Bearer ")
    b.p("JWT", jwt(rng)).t(f"\nContent-Type: application/json\nX-Request-Id: {_uuid(rng)}\n\n")
    b.t('{"id_token": "').p("JWT", jwt(rng)).t('", "note": "copied from the browser"}\n')
    b.t("\n(the token in the docs looks like ").d("JWT", PUBLISHED_EXAMPLES[3], "example").t(")\n")
    return b.build()


def payment_ticket(rng: random.Random) -> Document:
    b = _Builder("payment support ticket")
    _, last, mail = _person(rng, rng.choice(("US", "UK", "DE")))
    b.t(f"Ticket #{rng.randint(10000, 99999)}: customer {last} (").p("EMAIL_ADDRESS", mail)
    b.t(") says the charge failed.\nCard on file: ")
    b.p("CREDIT_CARD", card_layout(card(rng), rng.choice((" ", "-", ".", "")))).t(
        f", exp {rng.randint(1, 12):02d}/{rng.randint(26, 30)}\n"
    )
    b.t("They first typed ").d(
        "CREDIT_CARD", card_layout(_broken(card(rng)), rng.choice((" ", "-", "."))), "checksum"
    )
    b.t(" (a typo, declined).\nRefund to IBAN ")
    country = rng.choice(tuple(IBAN_BBAN))
    value = iban(rng, country)
    b.p("IBAN_CODE", group(value, (4,) * 8, " ") if rng.random() < 0.6 else value)
    b.t(", not to ").d("IBAN_CODE", group(broken_iban(rng, country), (4,) * 8, " "), "checksum").t(
        " (check digits wrong).\n"
    )
    b.t("Old account on the form: ").d("CREDIT_CARD", iban_with_card(rng), "checksum").t("\n")
    return b.build()


def payment_json(rng: random.Random) -> Document:
    b = _Builder("payment JSON (19-digit pan)")
    pan = _luhn_number(rng, rng.choice(("4", "62", "6011")), 19)
    b.t('{"order": ' + str(rng.randint(100000, 999999)) + ', "payment": {"pan": "').p("CREDIT_CARD", pan)
    b.t(f'", "expiry": "{rng.randint(1, 12):02d}/{rng.randint(26, 30)}", "holder": "')
    b.t(rng.choice(NAMES["US"][1]) + '"}, "previous": {"pan": "').d(
        "CREDIT_CARD", _broken(_luhn_number(rng, "4", 19)), "checksum"
    )
    b.t('"}, "amount": ' + f"{rng.randint(100, 99999) / 100:.2f}" + "}\n")
    return b.build()


SIGNATURE_LABELS = {
    "UK": ("T:", "M:", "Tel:"),
    "US": ("Phone:", "Mobile:", "T:"),
    "CA": ("Tel.:", "Cell:", "Tél. :"),
    "DE": ("Tel.:", "Telefon:", "Handy:", "Mobil:"),
    "FR": ("Tél. :", "Tél :", "Portable :"),
    "ES": ("Tel.:", "Móvil:"),
    "IT": ("Tel.:", "Cell.:"),
    "NL": ("Tel.:", "Mob.:"),
    "BR": ("Tel.:", "Celular:"),
    "IN": ("Mobile:", "Ph:"),
    "AU": ("T:", "M:", "Ph:"),
}


def signature(rng: random.Random) -> Document:
    country = rng.choice(tuple(SIGNATURE_LABELS))
    b = _Builder("e-mail signature")
    first, last, mail = _person(rng, country)
    b.t(f"Thanks, will send the contract on {_date(rng)}.\n\n--\n{first} {last}\n")
    b.t(rng.choice(DEPARTMENTS) + " | " + DOMAINS[country].split(".")[0] + "\n")
    for label in rng.sample(SIGNATURE_LABELS[country], min(2, len(SIGNATURE_LABELS[country]))):
        b.t(label + " ").p("PHONE_NUMBER", rng.choice(PHONES[country])(rng)).t("\n")
    b.t("E-mail: " if rng.random() < 0.5 else "").p("EMAIL_ADDRESS", mail)
    b.t('\n<img src="cid:').d("EMAIL_ADDRESS", "logo@2x.png", "checksum").t('">\n')
    return b.build()


# HR: a CSV whose header names the identifier column, rows far below; or one record with local labels.
HR = {
    # country: (column, label, entity, generator, layout)
    "US": ("ssn", "SSN", "US_SSN", lambda r: ssn(r)),
    "UK": ("nino", "National Insurance number", "UK_NINO", lambda r: group(uk_nino(r), (2, 2, 2, 2), " ")),
    "CA": ("sin", "SIN / NAS", "CA_SIN", lambda r: group(ca_sin(r), (3, 3, 3), r.choice((" ", "-")))),
    "DE": (
        "steuer_id",
        "Steuer-ID",
        "DE_TAX_ID",
        lambda r: group(de_tax_id(r), (2, 3, 3, 3), r.choice((" ", ""))),
    ),
    "FR": (
        "nir",
        "N° de sécurité sociale",
        "FR_NIR",
        lambda r: group(fr_nir(r), (1, 2, 2, 2, 3, 3, 2), r.choice((" ", ""))),
    ),
    "ES": ("dni", "DNI", "ES_NIF", lambda r: es_dni(r)),
    "IT": ("codice_fiscale", "Codice fiscale", "IT_FISCAL_CODE", lambda r: it_fiscal_code(r)),
    "NL": ("bsn", "BSN", "NL_BSN", lambda r: _valid_digits(r, stdnum_nl_bsn, 9)),
    "BR": ("cpf", "CPF", "BR_CPF", lambda r: _cpf_layout(_valid_digits(r, stdnum_br_cpf, 11), r)),
    "IN": ("aadhaar", "Aadhaar", "IN_AADHAAR", lambda r: group(in_aadhaar(r), (4, 4, 4), " ")),
    "AU": ("tfn", "TFN", "AU_TFN", lambda r: group(_valid_digits(r, stdnum_au_tfn, 9), (3, 3, 3), " ")),
}
# A second identifier on the record form, where the country has one.
HR_EXTRA = {
    "ES": ("NIE", "ES_NIE", lambda r, last: es_nie(r)),
    "IN": ("PAN", "IN_PAN", lambda r, last: in_pan(r, last)),
    "AU": ("Medicare", "AU_MEDICARE", lambda r, last: group(au_medicare(r), (4, 5, 1), " ")),
    "DE": ("IBAN", "IBAN_CODE", lambda r, last: group(iban(r, "DE"), (4,) * 6, " ")),
    "FR": ("IBAN", "IBAN_CODE", lambda r, last: group(iban(r, "FR"), (4,) * 7, " ")),
    "NL": ("IBAN", "IBAN_CODE", lambda r, last: iban(r, "NL")),
}
# Checksum decoys: the identifier with its last check digit or letter changed.
BROKEN = {
    "US_SSN": lambda r: f"{r.choice(('000', '666', '900'))}-{r.randint(10, 99)}-{r.randint(1000, 9999)}",
    "UK_NINO": lambda r: "D" + uk_nino(r)[1:],
    "CA_SIN": lambda r: group(_broken(ca_sin(r)), (3, 3, 3), " "),
    "DE_TAX_ID": lambda r: _broken(de_tax_id(r)),
    "FR_NIR": lambda r: _broken(fr_nir(r)),
    "ES_NIF": lambda r: (lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"))(es_dni(r)),
    "IT_FISCAL_CODE": lambda r: (lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"))(it_fiscal_code(r)),
    "NL_BSN": lambda r: _broken(_valid_digits(r, stdnum_nl_bsn, 9)),
    "BR_CPF": lambda r: _cpf_layout(_broken(_valid_digits(r, stdnum_br_cpf, 11)), r),
    "IN_AADHAAR": lambda r: group(_broken(in_aadhaar(r)), (4, 4, 4), " "),
    "AU_TFN": lambda r: group(_broken(_valid_digits(r, stdnum_au_tfn, 9)), (3, 3, 3), " "),
}


def _cpf_layout(digits: str, rng: random.Random) -> str:
    if rng.random() < 0.7:
        return f"{digits[:3]}.{digits[3:6]}.{digits[6:9]}-{digits[9:]}"
    return digits


def hr_table(rng: random.Random, country: str) -> Document:
    column, _, entity, make = HR[country]
    markdown = rng.random() < 0.4
    b = _Builder(f"HR {'Markdown table' if markdown else 'CSV'} ({country}, column {column})")
    bank = country in IBAN_BBAN
    columns = ("employee_id", "name", "department", "start_date", column, *(("iban",) * bank), "phone")
    if markdown:
        b.t("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    else:
        b.t(",".join(columns) + "\n")
    sep = " | " if markdown else ","
    for _ in range(rng.randint(4, 16)):
        first, last, _ = _person(rng, country)
        b.t(("| " if markdown else "") + f"E{rng.randint(1000, 9999)}{sep}{first} {last}{sep}")
        b.t(f"{rng.choice(DEPARTMENTS)}{sep}{_date(rng)}{sep}").p(entity, make(rng)).t(sep)
        if bank:
            value = iban(rng, country)
            b.p("IBAN_CODE", group(value, (4,) * 8, " ") if rng.random() < 0.5 else value).t(sep)
        b.p("PHONE_NUMBER", rng.choice(PHONES[country])(rng))
        b.t(" |\n" if markdown else "\n")
    return b.build()


def hr_record(rng: random.Random, country: str) -> Document:
    _, label, entity, make = HR[country]
    b = _Builder(f"HR record ({country})")
    first, last, mail = _person(rng, country)
    b.t(f"Employee: {first} {last}\nStart date: {_date(rng)}\nDepartment: {rng.choice(DEPARTMENTS)}\n")
    b.t(f"{label}: ").p(entity, make(rng)).t("\n")
    if country in HR_EXTRA:
        extra_label, extra_entity, extra = HR_EXTRA[country]
        b.t(f"{extra_label}: ").p(extra_entity, extra(rng, last)).t("\n")
    b.t("E-mail: ").p("EMAIL_ADDRESS", mail).t("\n")
    b.t(f"Previous {label} on file (rejected by payroll, check digit wrong): ")
    b.d(entity, BROKEN[entity](rng), "checksum").t("\n")
    return b.build()


def context_decoys(rng: random.Random) -> Document:
    """Numbers that pass an identifier's checksum in a log that says nothing of what they are."""
    b = _Builder("shipment log (numbers without context)")
    for entity, make in rng.sample(
        (
            ("US_SSN", lambda r: ssn(r).replace("-", "")),
            ("CA_SIN", ca_sin),
            ("NL_BSN", lambda r: _valid_digits(r, stdnum_nl_bsn, 9)),
            ("AU_TFN", lambda r: _valid_digits(r, stdnum_au_tfn, 9)),
            ("DE_TAX_ID", de_tax_id),
            ("IN_AADHAAR", in_aadhaar),
            ("BR_CPF", lambda r: _valid_digits(r, stdnum_br_cpf, 11)),
            ("PHONE_NUMBER", lambda r: "0" + _chars(r, DIGITS, 9)),
        ),
        4,
    ):
        b.t(f"{_date(rng)} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} ")
        b.t(rng.choice(("shipment", "order", "batch", "parcel")) + " ")
        b.d(entity, make(rng), "context")
        b.t(f" {rng.choice(('dispatched', 'received', 'on hold'))} at depot {rng.randint(1, 40)}\n")
    return b.build()


SHAPES: tuple[Callable[[random.Random], Document], ...] = (
    aws_console_csv,
    aws_credentials_file,
    dotenv,
    connection_strings,
    sqlalchemy_settings,
    kubernetes_secret,
    kubernetes_env,
    json_config,
    yaml_config,
    ini_toml,
    xml_config,
    code,
    jwt_request,
    payment_ticket,
    payment_json,
    signature,
    context_decoys,
    *(partial(hr_table, country=country) for country in HR),
    *(partial(hr_record, country=country) for country in HR),
)


def generate(seed: int = SEED, documents: int = DOCUMENTS) -> list[Document]:
    """``documents`` documents, the shapes in turn; document i depends on the seed and i only."""
    return [SHAPES[i % len(SHAPES)](random.Random(f"{seed}:{i}")) for i in range(documents)]


# --- scoring -------------------------------------------------------------------------------------------


@dataclass
class EntityScore:
    planted: int = 0
    found: int = 0
    leaked: int = 0
    decoys: int = 0
    decoys_reported: int = 0
    stray: int = 0  # findings of this entity on no planted value and no decoy
    misses: list[str] = field(default_factory=list)

    def row(self, entity: str) -> dict[str, Any]:
        return {
            "entity": entity,
            "planted": self.planted,
            "recall": self.found / self.planted if self.planted else None,
            "leak_rate": self.leaked / self.planted if self.planted else None,
            "decoys": self.decoys,
            "decoys_reported": self.decoys_reported,
            "fp_rate": self.decoys_reported / self.decoys if self.decoys else None,
            "stray": self.stray,
        }


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def evaluate(inspector: Any, documents: list[Document]) -> dict[str, EntityScore]:
    """Per entity: a planted value is found when a finding overlaps it (of its entity; for a credential,
    any credential rule's, since that is what gets masked) and leaked when it is still in the masked
    text; a decoy is reported when any finding overlaps it; a finding on no labelled span is stray."""
    categories = {r.id: r.rule.category for r in inspector.detector.rules}
    scores: dict[str, EntityScore] = {}

    def score(entity: str) -> EntityScore:
        return scores.setdefault(entity, EntityScore())

    for doc in documents:
        masked, findings = inspector.mask_text(doc.text)
        for span in doc.planted:
            s = score(span.entity)
            s.planted += 1
            hit = any(
                _overlaps(f.start, f.end, span.start, span.end)
                and (
                    categories.get(f.rule_id) == "credential"
                    if span.entity in CREDENTIALS
                    else f.entity == span.entity
                )
                for f in findings
            )
            s.found += hit
            leaked = span.value in masked
            s.leaked += leaked
            if not hit or leaked:
                reported = sorted(
                    {f.entity for f in findings if _overlaps(f.start, f.end, span.start, span.end)}
                )
                s.misses.append(
                    f"{'missed' if not hit else 'leaked'} in {doc.shape}: {_around(doc.text, span)}"
                    + (f" (reported as {', '.join(reported)})" if reported else "")
                )
        for span in doc.decoys:
            s = score(span.entity)
            s.decoys += 1
            hits = [f for f in findings if _overlaps(f.start, f.end, span.start, span.end)]
            if hits:
                s.decoys_reported += 1
                s.misses.append(
                    f"decoy ({span.kind}) reported by {', '.join(sorted({f.rule_id for f in hits}))} "
                    f"in {doc.shape}: {_around(doc.text, span)}"
                )
        labelled = (*doc.planted, *doc.decoys)
        for f in findings:
            if not any(_overlaps(f.start, f.end, s.start, s.end) for s in labelled):
                score(f.entity).stray += 1
                score(f.entity).misses.append(
                    f"stray {f.rule_id} in {doc.shape}: {doc.text[max(0, f.start - 30) : f.end + 10]!r}"
                )
    return dict(sorted(scores.items()))


def _around(text: str, span: Span) -> str:
    return repr(text[max(0, span.start - 40) : span.end + 10])


def totals(scores: dict[str, EntityScore]) -> EntityScore:
    total = EntityScore()
    for s in scores.values():
        total.planted += s.planted
        total.found += s.found
        total.leaked += s.leaked
        total.decoys += s.decoys
        total.decoys_reported += s.decoys_reported
        total.stray += s.stray
    return total


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}" if value in (0, 1) else f"{value:.1%}"


def markdown(scores: dict[str, EntityScore], documents: list[Document], seed: int) -> list[str]:
    shapes = sorted({d.shape.split(" (")[0] for d in documents})
    total = totals(scores)
    row = total.row("**all entities**")
    verdict = (
        "met" if (row["recall"] or 0) >= TARGET_RECALL and (row["fp_rate"] or 0) <= TARGET_FP else "missed"
    )
    lines = [
        f"### Generated corpus ({len(documents)} documents, seed {seed})",
        "",
        f"{len(shapes)} shapes: {', '.join(shapes)}. Planted values are valid by their own checks; decoys "
        "fail them (a check digit, a published placeholder or example) or stand without the words that "
        "say what they are. Stray: findings on no planted value and no decoy.",
        "",
        "| entity | planted | recall | leak rate | decoys | decoys reported | stray findings |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (row, *(s.row(e) for e, s in scores.items())):
        reported = f"{r['decoys_reported']} ({_fmt(r['fp_rate'])})" if r["decoys"] else ""
        lines.append(
            f"| {r['entity']} | {r['planted']} | {_fmt(r['recall'])} | {_fmt(r['leak_rate'])} "
            f"| {r['decoys']} | {reported} | {r['stray']} |"
        )
    lines += [
        "",
        f"Target recall >= {TARGET_RECALL:.0%} and decoys reported <= {TARGET_FP:.0%}: {_fmt(row['recall'])} "
        f"({total.found}/{total.planted}), {_fmt(row['fp_rate'])} ({total.decoys_reported}/{total.decoys}), "
        f"leak rate {_fmt(row['leak_rate'])} ({total.leaked}), {total.stray} stray findings: {verdict}",
        "",
    ]
    return lines


def _iter_json(documents: list[Document]) -> Iterator[str]:
    for doc in documents:
        yield json.dumps(asdict(doc), ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=DOCUMENTS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for line in _iter_json(generate(args.seed, args.documents)):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
