import base64
import json
import math
import string
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.validators import (
    IBAN_LENGTHS,
    VALIDATORS,
    aba_checksum,
    base58check,
    base62_crc32,
    bech32,
    card_number,
    crypto_address,
    iban_mod97,
    ip_address,
    jwt_header,
    jwt_structure,
    luhn,
    not_placeholder,
    shannon_entropy,
    ssn_rules,
    validate,
)


def cases(valid: list[str], invalid: list[str]) -> list[tuple[str, bool]]:
    return [(value, True) for value in valid] + [(value, False) for value in invalid]


def ids(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- luhn ----------------------------------------------------------------------------------------------

LUHN_CASES = cases(
    valid=[
        "4111111111111111",  # Visa test card
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111 1111-1111 1111",
        "4111.1111.1111.1111",  # the separators card rules allow between groups are ignored
        "4111/1111/1111/1111",
        "4111\t1111  1111\n1111",
        "5555555555554444",  # Mastercard test card
        "378282246310005",  # Amex test card (15 digits)
        "6011111111111117",  # Discover test card
        "30569309025904",  # Diners test card (14 digits)
        "411111111117",  # 12 digits, the shortest accepted
        "4111111111111111110",  # 19 digits, the longest accepted
    ],
    invalid=[
        "4111111111111112",  # checksum off by one
        "4012-8888-8888-1882",
        "79927398713",  # passes Luhn but only 11 digits
        "41111111111111111115",  # passes Luhn but 20 digits
        "4111_1111_1111_1111",  # underscores are not a separator the rules allow
        "411111111111111a",
        "\uff14111111111111111",  # fullwidth digit
        "\u0664111111111111111",  # Arabic-Indic digit
        "",
        "-- --",
    ],
)


@pytest.mark.parametrize(("value", "expected"), LUHN_CASES, ids=ids)
def test_luhn(value: str, expected: bool) -> None:
    assert luhn(value) is expected


CARD_NUMBER_CASES = cases(
    valid=[
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111.1111.1111.1111",
        "3782-822463-10005",  # Amex, 4-6-5
        "3056 930902 5904",  # Diners, 4-6-4
        "6011 6230 3783 9170 495",  # 19 digits, 4-4-4-4-3
        "6011623037839170495",
        "4111\t1111  1111\n1111",
    ],
    invalid=[
        "4111 1111 1111 1112",  # fails Luhn
        "4435 9852 7498 27",  # the tail of DE54 0743 4435 9852 7498 27 (Luhn-valid, 4-4-4-2)
        "4245 5270 5147 2021 45",  # the tail of a valid German IBAN (4-4-4-4-2)
        "3826 1073 9980 92",
        "",
        "-- --",
    ],
)


@pytest.mark.parametrize(("value", "expected"), CARD_NUMBER_CASES, ids=ids)
def test_card_number(value: str, expected: bool) -> None:
    assert card_number(value) is expected


@pytest.mark.parametrize("value", [v for v, ok in LUHN_CASES if not ok])
def test_card_number_never_accepts_what_luhn_rejects(value: str) -> None:
    assert not card_number(value)


# --- iban_mod97 ----------------------------------------------------------------------------------------

IBAN_CASES = cases(
    valid=[
        "GB82 WEST 1234 5698 7654 32",
        "GB82WEST12345698765432",
        "gb82 west 1234 5698 7654 32",  # case is folded
        "DE89 3704 0044 0532 0130 00",
        "DE89-3704-0044-0532-0130-00",
        "NO9386011117947",  # shortest (15)
        "LC55HEMM000100010012001200023015",  # Saint Lucia (32)
        "RU0204452560040702810412345678901",  # longest (33)
        "MT84MALT011000012345MTLCAST001S",  # letters in the BBAN
        "BI4210000100010000332045181",
        "SC18SSCB11010000000000001497USD",
        "BE68539007547034",
        "NL91ABNA0417164300",
        "GB02WEST00000000000029",  # check digits 02, the smallest issued
        "GB98WEST00000000000047",  # check digits 98, the largest issued
    ],
    invalid=[
        "GB82 WEST 1234 5698 7654 33",  # wrong check digits
        "GB28 WEST 1234 5698 7654 32",  # transposed check digits
        "DE89 3704 0044 0532 0130 01",
        "GB82WEST1234569876543",  # one short for GB
        "GB82WEST123456987654321",  # one long for GB
        "DE89370400440532013000GB82",  # right checksum shape, wrong length
        "XX82WEST12345698765432",  # not a country in the registry
        "US64SVBKUS6S3300958879",  # the US has no IBAN
        "GBAAWEST12345698765432",  # check digits not digits
        "GB99WEST00000000000029",  # satisfies mod 97 (99 = 02 + 97) but 99 is never issued
        "GB01WEST00000000000047",  # satisfies mod 97 (01 = 98 - 97) but 01 is never issued
        "GB82WEST1234569876543!",
        "GB82_WEST_1234_5698_7654_32",
        "\u0131E29A\u0131BK93115212345678",  # dotless i upper-cases to I; IE29AIBK93115212345678 is valid
        "",
        "GB",
        "GB82",
    ],
)


@pytest.mark.parametrize(("value", "expected"), IBAN_CASES, ids=ids)
def test_iban_mod97(value: str, expected: bool) -> None:
    assert iban_mod97(value) is expected


def test_iban_length_table_covers_the_registry() -> None:
    assert len(IBAN_LENGTHS) == 89
    assert all(len(code) == 2 and code.isupper() and code.isalpha() for code in IBAN_LENGTHS)
    assert min(IBAN_LENGTHS.values()) == 15  # Norway
    assert max(IBAN_LENGTHS.values()) == 33  # Russia
    spot_checks = {"DE": 22, "GB": 22, "FR": 27, "NO": 15, "MT": 31, "LC": 32, "RU": 33, "BI": 27, "EG": 29}
    assert {code: IBAN_LENGTHS[code] for code in spot_checks} == spot_checks


# --- ssn_rules -----------------------------------------------------------------------------------------

SSN_CASES = cases(
    valid=[
        "536-22-8726",
        "536.22.8726",  # dotted, as some forms print it
        "536 22 8726",
        "536228726",
        "078-05-1121",  # one off the Woolworth number
        "001-01-0001",
        "665-99-9999",
        "667-01-0001",
        "899-99-9999",
    ],
    invalid=[
        "536-22 8726",  # mixed separators
        "536 22-8726",
        "536-228726",
        "53622-8726",
        "536.22-8726",  # one separator throughout
        "536/22/8726",
        "000-12-3456",  # area 000
        "666-12-3456",  # area 666
        "900-12-3456",  # area 900-999
        "999-12-3456",
        "536-00-8726",  # group 00
        "536-22-0000",  # serial 0000
        "111-11-1111",  # one digit repeated
        "888888888",
        "078-05-1120",  # Woolworth wallet card
        "078 05 1120",
        "219-09-9999",  # SSA advertising
        "123-45-6789",
        "987-65-4320",
        "987-65-4329",
        "53622872",
        "5362287260",
        "536-22-872a",
        " 536-22-8726",
        "536-22-8726\n",
        "\uff15\uff13\uff16-22-8726",  # fullwidth digits
        "",
    ],
)


@pytest.mark.parametrize(("value", "expected"), SSN_CASES, ids=ids)
def test_ssn_rules(value: str, expected: bool) -> None:
    assert ssn_rules(value) is expected


# --- aba_checksum --------------------------------------------------------------------------------------

ABA_CASES = cases(
    valid=[
        "121000358",
        "011000015",
        "021000021",
        "322271627",
        "3222-7162-7",  # dashes removed
        "0711-0130-7",
        "091000019",
        "026009593",
    ],
    invalid=[
        "121000359",  # checksum
        "011000016",
        "000000000",  # checksum holds, but all zero
        "130000006",  # checksum holds, prefix 13 unassigned
        "200000004",  # prefix 20
        "420000004",  # prefix 42
        "810000009",  # prefix 81
        "421042111",
        "1234-0000-0",
        "12100035",
        "1210003580",
        "12100035a",
        "121 000 358",  # only dashes are removed
        "\uff11\uff12\uff11000358",
        "",
        "---------",
    ],
)


@pytest.mark.parametrize(("value", "expected"), ABA_CASES, ids=ids)
def test_aba_checksum(value: str, expected: bool) -> None:
    assert aba_checksum(value) is expected


# --- base58check, bech32, crypto_address ---------------------------------------------------------------

GENESIS = "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa"

BASE58_CASES = cases(
    valid=[
        GENESIS,  # P2PKH, the genesis block's coinbase
        "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy",  # P2SH
        "16Yeky6GMjeNkAiNcBY7ZhrLoMSgg1BoyZ",
        "mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn",  # testnet P2PKH
        "2N2JD6wb56AfK4tfmM6PwdVmoYk2dCKf4Br",  # testnet P2SH
    ],
    invalid=[
        GENESIS[:-1] + "b",  # checksum
        GENESIS[:-1],
        GENESIS + "2",
        "16Yeky6GMjeNkAiNcBY7ZhrLoMSgg1BoyZ2",
        GENESIS.replace("z", "0", 1),  # 0, O, I and l are not in the alphabet
        GENESIS.replace("z", "O", 1),
        GENESIS.replace("z", "I", 1),
        GENESIS.replace("z", "l", 1),
        " " + GENESIS,
        "1111",  # decodes to 4 bytes: no room for a payload
        "3QJmnh",  # 5df6e0e2, the checksum of an empty payload: consistent, but too short to be anything
        "1",
        "",
        "1" * 500,  # longer than any real base58check string
        "8f953371d3e85eddb89b05ed6b9e680791055315c73e1025ab5dba7bb2aee189",
    ],
)


@pytest.mark.parametrize(("value", "expected"), BASE58_CASES, ids=ids)
def test_base58check(value: str, expected: bool) -> None:
    assert base58check(value) is expected


BECH32_CASES = cases(
    valid=[
        # BIP-173 (bech32, witness v0)
        "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4",
        "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
        "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
        "tb1qqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesrxh6hy",
        "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
        # BIP-350 (bech32m, witness v1+)
        "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7kt5nd6y",
        "BC1SW50QGDZ25J",
        "bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs",
        "tb1pqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesf3hn0c",
        "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
    ],
    invalid=[
        # BIP-350 invalid addresses (each has a valid checksum for its own reason to fail, except as noted)
        "tc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq5zuyut",  # hrp
        "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd",  # v1 with bech32
        "tb1z0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqglt7rf",  # v2 with bech32
        "BC1S0XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ54WELL",  # v16 with bech32
        "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kemeawh",  # v0 with bech32m
        "tb1q0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq24jc47",  # v0 with bech32m
        "bc1p38j9r5y49hruaue7wxjce0updqjuyyx0kh56v8s25huc6995vvpql3jow4",  # 'o' not in the charset
        "BC130XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ7ZWS8R",  # witness version 17
        "bc1pw5dgrnzv",  # 1-byte program
        "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v8n0nx0muaewav253zgeav",  # 41-byte program
        "BC1QR508D6QEJXTDG4Y5R3ZARVARYV98GJ9P",  # v0 program of 16 bytes
        "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq47Zagq",  # mixed case
        "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v07qwwzcrf",  # padding over 4 bits
        "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vpggkg4j",  # non-zero padding
        "bc1gmk9yu",  # empty data
        # BIP-173 invalid strings
        "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T5",  # checksum
        "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5",
        "Bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",  # mixed case
        "bc1zw508d6qejxtdg4y5r3zarvaryvqyzf3du",  # v2 address with a bech32 checksum
        "bc1rw5uspcuh",  # 2-byte v16 program with a bech32 checksum
        "A12UEL5L",  # valid bech32 string, but not a segwit hrp
        "an83characterlonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1tt5tgs",
        "pzry9x0s0muk",  # no separator
        "1pzry9x0s0muk",  # empty hrp
        "bc1" + "q" * 88,  # over 90 characters
        "bc1\x7fqw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
        "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4\u00e9",
        "bc1",
        "",
    ],
)


@pytest.mark.parametrize(("value", "expected"), BECH32_CASES, ids=ids)
def test_bech32(value: str, expected: bool) -> None:
    assert bech32(value) is expected


@pytest.mark.parametrize(("value", "expected"), BASE58_CASES + BECH32_CASES, ids=ids)
def test_crypto_address_is_either_encoding(value: str, expected: bool) -> None:
    assert crypto_address(value) is expected


# --- jwt_structure -------------------------------------------------------------------------------------


def b64url(raw: bytes, padded: bool = False) -> str:
    encoded = base64.urlsafe_b64encode(raw).decode("ascii")
    return encoded if padded else encoded.rstrip("=")


def segment(obj: object, padded: bool = False) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode(), padded)


def token(header: object, payload: object, signature: bytes = b"\x49\xf9\x4a\xc7\x04\x49\x48\xc7") -> str:
    return f"{segment(header)}.{segment(payload)}.{b64url(signature)}"


HS256 = {"alg": "HS256", "typ": "JWT"}
CLAIMS = {"sub": "1234567890", "name": "John Doe", "iat": 1516239022}  # jwt.io's example claims

JWT_CASES = cases(
    valid=[
        token(HS256, CLAIMS),
        token({"alg": "RS256", "kid": "k1"}, {}),
        token(HS256, CLAIMS, bytes(range(256))),  # signature with '-' and '_'
        token({"alg": "none"}, CLAIMS, b""),  # unsecured JWT: empty signature allowed
        token({"alg": "NONE"}, CLAIMS, b""),
        token({"alg": "None"}, CLAIMS, b"x"),  # a signature with alg none is odd but well formed
        f"{segment(HS256, padded=True)}.{segment(CLAIMS, padded=True)}.{b64url(b'sig', padded=True)}",
        token({"alg": "HS256", "n\u00e9": "\u00fc"}, {"x": [1, {"y": None}]}),
    ],
    invalid=[
        token(HS256, CLAIMS, b""),  # signed alg, no signature
        token({"alg": "none "}, CLAIMS, b""),
        token({"typ": "JWT"}, CLAIMS),  # no alg
        token({"alg": 256}, CLAIMS),  # alg not a string
        token({"alg": None}, CLAIMS),
        token(["alg", "HS256"], CLAIMS),  # header not an object
        token(HS256, ["sub"]),  # payload not an object
        token(HS256, "claims"),
        token(HS256, 42),
        f"{segment(HS256)}.{segment(CLAIMS)}",  # two segments
        f"{token(HS256, CLAIMS)}.extra",  # four segments
        f".{segment(CLAIMS)}.{b64url(b'sig')}",  # empty header
        f"{segment(HS256)}..{b64url(b'sig')}",  # empty payload
        f"{b64url(b'not json')}.{segment(CLAIMS)}.{b64url(b'sig')}",
        f"{b64url(b'{')}.{segment(CLAIMS)}.{b64url(b'sig')}",
        f"{b64url(bytes([0xFF, 0xFE]))}.{segment(CLAIMS)}.{b64url(b'sig')}",  # not UTF-8
        f"{b64url(b'[' * 100_000)}.{segment(CLAIMS)}.{b64url(b'sig')}",  # nesting deep enough to recurse
        token(HS256, CLAIMS).replace("-", "+").replace("_", "/") + "+/",  # standard, not url-safe, alphabet
        f"{segment(HS256)}.{segment(CLAIMS)}.abcde",  # 5 characters: not a base64 length
        f"{segment(HS256)}.{segment(CLAIMS)}.a=b",
        f"{segment(HS256)}.{segment(CLAIMS)}.YQ===",
        f"{segment(HS256)} .{segment(CLAIMS)}.{b64url(b'sig')}",
        "..",
        "",
        "a.b.c",
    ],
)


@pytest.mark.parametrize(("value", "expected"), JWT_CASES, ids=ids)
def test_jwt_structure(value: str, expected: bool) -> None:
    assert jwt_structure(value) is expected


def test_jwt_like_the_jwt_io_example() -> None:
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    payload = b64url(b'{"sub":"1234567890","name":"John Doe","iat":1516239022}')
    assert header == "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    signature = b64url(bytes.fromhex("49f94ac7044948c78a285d904f87f0a4c7897f7e8f3a4eb2255fda750b2cc397"))
    assert jwt_structure(f"{header}.{payload}.{signature}")
    assert not jwt_structure(f"{header}.{payload}.")


# --- jwt_header ----------------------------------------------------------------------------------------

CRLF_HEADER = b64url(b'{"typ":"JWT",\r\n"alg":"HS256"}')
DAMAGED_HEADER = b64url(b'{"alg":\'\x9ez","typ":"JWT"}')
LONG_CLAIMS = {"sub": "svc-ingest", "aud": "api", "roles": ["admin", "ops"], "note": "caf\u00e9 \u00fc" * 20}

JWT_HEADER_CASES = cases(
    valid=[
        f"{segment(HS256)}.{segment(CLAIMS)}",  # header and whole payload, no signature
        token(HS256, CLAIMS),  # the signature is ignored
        f"{segment({'alg': 'RS256', 'kid': 'k1'})}.{segment(LONG_CLAIMS)[:200]}",  # payload cut off
        f"{segment({'alg': 'RS256'})}.{segment(LONG_CLAIMS)[:61]}",  # cut inside a 4-character group
        *(f"{segment(HS256)}.{segment(LONG_CLAIMS)[:n]}" for n in range(40, 60)),  # cut in an accented letter
        f"{CRLF_HEADER}.{segment(CLAIMS)}",  # a header written with a line break
        f"{segment(HS256, padded=True)}.{segment(CLAIMS, padded=True)}",
        # a damaged character in the header: still an object's braces around an "alg" member
        f"{DAMAGED_HEADER}.{segment(CLAIMS)}",
    ],
    invalid=[
        segment(HS256),  # no payload
        f"{segment(HS256)}.",
        f"{segment(HS256)}.e",  # one character: not a byte
        f"{segment(HS256)[:-1]}.{segment(CLAIMS)}",  # header cut: not JSON
        f"{segment(HS256)[:8]}asdf{segment(HS256)[8:]}.{segment(CLAIMS)}",  # characters put into the header
        f"{segment({'typ': 'JWT'})}.{segment(CLAIMS)}",  # no alg
        f"{segment({'alg': 5})}.{segment(CLAIMS)}",
        f"{segment(HS256)}.{b64url(b'not json at all, not an object')}",
        f"{segment(HS256)}.{b64url(b'{' + bytes([0, 1, 2]) + b'binary payload')}",  # control characters
        f"{segment(HS256)}.{b64url(b'{' + bytes([0xFF, 0xFE, 0xFD, 0xFC]) + b'not utf-8 at all')}",
        f"{segment(HS256)}.{segment(CLAIMS).replace('-', '+')}+/",  # standard, not url-safe, alphabet
        f"{segment(HS256)} .{segment(CLAIMS)}",
        ".",
        "",
    ],
)


@pytest.mark.parametrize(("value", "expected"), JWT_HEADER_CASES, ids=ids)
def test_jwt_header(value: str, expected: bool) -> None:
    assert jwt_header(value) is expected


def test_jwt_header_accepts_every_whole_token_jwt_structure_accepts() -> None:
    for value, expected in JWT_CASES:
        if expected:
            assert jwt_header(value), value


# --- base62_crc32 --------------------------------------------------------------------------------------

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def base62_token(prefix: str, body: str) -> str:
    number, digits = zlib.crc32(body.encode()), ""
    for _ in range(6):
        number, digit = divmod(number, 62)
        digits = BASE62[digit] + digits
    return f"{prefix}_{body}{digits}"


BODY = "SNNX81GgOBu1XLTWrADOR24oMx1QVk"  # 30 characters
GOOD = base62_token("ghp", BODY)
CHANGED = BODY[:3] + ("x" if BODY[3] != "x" else "y") + BODY[4:]
# A body whose checksum is small enough to need a leading zero.
PADDED_BODY = next(
    body for body in (f"{BODY[:24]}{n:06d}" for n in range(1000)) if zlib.crc32(body.encode()) < 62**5
)

BASE62_CASES = cases(
    valid=[
        base62_token("ghp", BODY),
        base62_token("npm", BODY),
        base62_token("ghs", "0" * 30),
        base62_token("gho", PADDED_BODY),
    ],
    invalid=[
        GOOD[:-1] + ("x" if GOOD[-1] != "x" else "y"),  # checksum changed
        f"ghp_{CHANGED}{base62_token('ghp', BODY)[-6:]}",  # body changed, checksum kept
        base62_token("ghp", BODY).swapcase().replace("GHP", "ghp"),  # case matters in base62
        base62_token("ghp", BODY)[:-1],  # 35 characters
        base62_token("ghp", BODY) + "a",  # 37
        base62_token("ghp", BODY).replace("_", "-"),
        base62_token("GHP", BODY),
        base62_token("github_pat", BODY),
        "npm_" + "x" * 36,
        "npm_" + "\u0661" * 36,
        "",
    ],
)


@pytest.mark.parametrize(("value", "expected"), BASE62_CASES, ids=ids)
def test_base62_crc32(value: str, expected: bool) -> None:
    assert base62_crc32(value) is expected


def test_base62_crc32_padding_case_has_a_leading_zero() -> None:
    assert base62_token("gho", PADDED_BODY)[-6] == "0"


# --- ip_address ----------------------------------------------------------------------------------------

IP_CASES = cases(
    valid=[
        "192.168.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "10.0.0.10",
        "100.64.0.0",
        "::",
        "::1",
        "2001:db8::8a2e:370:7334",
        "2345:0425:2CA1:0000:0000:0567:5673:23b5",  # leading zeros are fine in IPv6 groups
        "684D:1111:222:3333:4444:5555:6:77",
        "::ffff:192.0.2.1",
        "64:ff9b::198.51.100.1",
        "fe80::1%eth0",
    ],
    invalid=[
        "01.2.3.4",  # leading zero: octal to some parsers
        "1.2.3.04",
        "192.168.001.1",
        "00.0.0.0",
        "::ffff:01.2.3.4",
        "256.1.1.1",
        "192.168.1",
        "1.2.3.4.5",
        "192.168.1.0/24",  # a network, not an address
        "2001:db8::/32",
        "2001::db8::1",
        "12345:db8::1",
        "gggg:hhhh::1234",
        "684D:1111:222:3333:4444:5555:77",
        " 192.168.0.1",
        "192.168.0.1 ",
        "[2001:db8::1]",
        "\u0661.2.3.4",  # Arabic-Indic digit
        "localhost",
        "aa:bb:cc:dd:ee:ff",
        "12:34:56",
        "",
    ],
)


@pytest.mark.parametrize(("value", "expected"), IP_CASES, ids=ids)
def test_ip_address(value: str, expected: bool) -> None:
    assert ip_address(value) is expected


# --- not_placeholder -----------------------------------------------------------------------------------

PLACEHOLDER_CASES = cases(
    valid=[
        "s3cr3tV4lu3",
        "a8f5f167f44f4964e6c998dee827110c",
        "Tr0ub4dor&3",
        "xxx-real-xxx",  # three x are allowed
        "ab",
    ],
    invalid=[
        "example",
        "my-EXAMPLE-key",
        "xxxxxxxx",
        "sk_live_XXXX1234",
        "your_api_key_here",
        "YOUR-TOKEN",
        "changeme",
        "ChangeMe123",
        "dummy-password",
        "Sample_Secret",
        "<token>",
        "a>b",
        "${SECRET_KEY}",
        "{{ secret }}",
        "aaaaaaaa",
        "********",
        "0",
        "",
    ],
)


@pytest.mark.parametrize(("value", "expected"), PLACEHOLDER_CASES, ids=ids)
def test_not_placeholder(value: str, expected: bool) -> None:
    assert not_placeholder(value) is expected


# --- shannon_entropy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        ("", 0.0),
        ("a", 0.0),
        ("aaaa", 0.0),
        ("ab", 1.0),
        ("aabb", 1.0),
        ("abcd", 2.0),
        ("aab", 0.9182958340544896),
        (string.hexdigits[:16], 4.0),
        ("0123456789abcdefghijklmnopqrstuv" * 3, 5.0),
        ("\u00e9\u00e8", 1.0),
    ],
    ids=ids,
)
def test_shannon_entropy(value: str, bits: float) -> None:
    assert shannon_entropy(value) == pytest.approx(bits, abs=1e-12)


def test_shannon_entropy_is_never_negative_zero() -> None:
    assert math.copysign(1.0, shannon_entropy("zzzz")) == 1.0


def test_shannon_entropy_ignores_order_and_bounds() -> None:
    assert shannon_entropy("abcabc") == shannon_entropy("cbaacb")
    value = "Kd8#pQ2!vX9zLm4$"
    assert 0.0 <= shannon_entropy(value) <= math.log2(len(set(value)))


# --- registry ------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(VALIDATORS) == {
        "luhn",
        "card_number",
        "iban_mod97",
        "ssn_rules",
        "aba_checksum",
        "base58check",
        "bech32",
        "crypto_address",
        "jwt_structure",
        "jwt_header",
        "base62_crc32",
        "ip_address",
        "not_placeholder",
        # national identifiers (tests/test_validators_national.py)
        "uk_nino",
        "uk_nhs",
        "ca_sin",
        "in_aadhaar",
        "in_pan",
        "au_tfn",
        "au_medicare",
        "de_tax_id",
        "fr_nir",
        "es_dni",
        "es_nie",
        "it_fiscal_code",
        "nl_bsn",
        "br_cpf",
        "br_cnpj",
        "pl_pesel",
        "se_personnummer",
        "sg_nric_fin",
        "jp_my_number",
        "imei",
        "eu_vat",
        "mrz_td3",
    }


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        VALIDATORS["luhn"] = bech32  # type: ignore[index]


def test_validate_dispatches() -> None:
    assert validate("luhn", "4111111111111111")
    assert not validate("luhn", "4111111111111112")
    assert validate("bech32", "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4")


def test_validate_unknown_name_raises_key_error_naming_it() -> None:
    with pytest.raises(KeyError, match=r"unknown validator 'no_such_check'.*luhn"):
        validate("no_such_check", "anything")


# --- totality ------------------------------------------------------------------------------------------

NASTY = [
    "",
    " ",
    "\x00",
    "\ud800",  # lone surrogate
    "\U0010ffff",
    "...",
    "1" * 10_000,
    "9" * 10_000,
    "a." * 5_000,
    "=" * 64,
    "bc1" + "1" * 100,
    "%",
    "::%",
    "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669",
]


@pytest.mark.parametrize("name", sorted(VALIDATORS))
@pytest.mark.parametrize("value", NASTY, ids=ids)
def test_validators_never_raise_on_nasty_input(name: str, value: str) -> None:
    assert isinstance(VALIDATORS[name](value), bool)


@settings(max_examples=300, deadline=None)
@given(value=st.text() | st.text(alphabet=string.printable) | st.text(alphabet="0123456789 -.:"))
def test_validators_are_total(value: str) -> None:
    for validator in VALIDATORS.values():
        assert isinstance(validator(value), bool)
    assert shannon_entropy(value) >= 0.0
