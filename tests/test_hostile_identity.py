"""Hostile tokens: random strings, tokens built from random headers and claims, and mutations of a valid
token (its bytes, its base64, its header members, duplicated claims, huge and deeply nested parts, text
that is not UTF-8). Every one ends in an ``AuthError`` with one of the documented 401 codes: never an
exception of another type, never a principal. Only the untouched valid token (the control) verifies."""

import asyncio
import base64
import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.errors import HTTP_STATUS
from extproc.identity import AuthError, Verifier, bearer_token, mint_token, principal_from_metadata
from extproc.identity.encoding import b64url_encode
from extproc.identity.keys import public_jwk
from extproc.identity.tokens import generate_key
from extproc.settings import IdentitySettings

pytestmark = pytest.mark.unit

ISSUER = "https://idp.example.com"
AUDIENCE = "llm-gateway"
NOW = 1_700_000_000.0
AUTH_CODES = frozenset(code for code in HTTP_STATUS if code.startswith("jwt_"))
SECONDS = 5.0
KEY = generate_key("RS256")
ALLOWED = ["RS256", "ES256"]


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Verifier]:
    """A verifier of one issuer with one RS256 key, no token cache (every token is parsed), started on a
    loop of its own that stays idle: a made-up kid may ask for a refresh, which never runs here."""
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public_jwk(KEY, "RS256", "k1")]}), encoding="utf-8")
    settings = identity(jwks)
    loop = asyncio.new_event_loop()
    verifier = Verifier(settings, clock=lambda: NOW)
    loop.run_until_complete(verifier.start())
    yield verifier
    loop.run_until_complete(verifier.close())
    loop.close()


def identity(jwks: Path) -> IdentitySettings:
    return IdentitySettings.model_validate(
        {
            "mode": "jwt",
            "cache_entries": 0,
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "jwks_file": str(jwks),
                    "algorithms": ALLOWED,
                    "groups_claim": "groups",
                    "claims": ["email", "nested.deep"],
                }
            ],
        }
    )


def claims(**overrides: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "sub": "alice", "aud": AUDIENCE, "iat": NOW - 10, "exp": NOW + 300}
    return {**base, **overrides}


def sign(body: dict[str, Any], **headers: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    pem = KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return mint_token(body, pem, "RS256", "k1", headers=headers)


VALID = sign(claims(groups=["analysts"]))


T = TypeVar("T")


def attempt(call: Callable[[], T]) -> tuple[T | None, AuthError | None]:
    """What ``call`` returned, or the AuthError it raised; any other exception fails the test."""
    try:
        return call(), None
    except AuthError as error:
        return None, error


def refused(verifier: Verifier, token: str) -> str:
    """The code ``token`` is refused with, within the time bound; fails on a principal or another error."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"verify still running after {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    start = time.monotonic()
    try:
        principal, error = attempt(lambda: verifier.verify(token, now=NOW))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < SECONDS
    assert principal is None, f"accepted as {principal!r}"
    assert error is not None
    assert error.code in AUTH_CODES
    assert error.http_status == 401
    assert token not in error.message or len(token) < 4  # the message never quotes the token
    return error.code


def test_the_control_token_verifies(verifier: Verifier) -> None:
    principal = verifier.verify(VALID, now=NOW)
    assert (principal.subject, principal.groups) == ("alice", frozenset({"analysts"}))


# -- random strings ------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ", max_size=400
        ),
        st.lists(st.text(alphabet="eyJhbGciOi0123456789-_AZaz", max_size=60), min_size=1, max_size=6).map(
            ".".join
        ),
    )
)
def test_random_strings_are_refused_with_a_401_code(verifier: Verifier, token: str) -> None:
    refused(verifier, token)


# -- tokens built from random headers and claims --------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
ALGS = st.sampled_from(
    [
        "RS256",
        "ES256",
        "none",
        "None",
        "NONE",
        "nOnE",
        "HS256",
        "HS512",
        "rs256",
        "RS256 ",
        " RS256",
        "RS256\x00",
        "RS512",
        "PS256",
        "EdDSA",
        "",
    ]
) | JSON_VALUES.filter(lambda value: not isinstance(value, str))
HEADER_EXTRAS = st.dictionaries(
    st.sampled_from(["kid", "crit", "jku", "x5u", "x5c", "jwk", "typ", "cty", "zip", "b64", "enc"]),
    JSON_VALUES | st.just("https://attacker.example/jwks.json"),
    max_size=4,
)
CLAIM_OVERRIDES = st.dictionaries(
    st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "groups", "email", "nested"]),
    JSON_VALUES | st.sampled_from([ISSUER, AUDIENCE, NOW + 100, NOW - 1000, 10**400, -(10**400)]),
    max_size=4,
)


def encode_json(value: Any) -> str:
    return b64url_encode(json.dumps(value).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    alg=ALGS,
    extras=HEADER_EXTRAS,
    overrides=CLAIM_OVERRIDES,
    signature=st.binary(max_size=300),
    header_is_object=st.booleans(),
)
def test_tokens_of_random_headers_and_claims_never_verify_without_the_signature(
    verifier: Verifier,
    alg: Any,
    extras: dict[str, Any],
    overrides: dict[str, Any],
    signature: bytes,
    header_is_object: bool,
) -> None:
    header: Any = {"alg": alg, **extras} if header_is_object else [alg]
    token = ".".join([encode_json(header), encode_json(claims(**overrides)), b64url_encode(signature)])
    refused(verifier, token)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extras=HEADER_EXTRAS, overrides=CLAIM_OVERRIDES)
def test_tokens_signed_by_the_right_key_with_hostile_members_verify_only_when_every_claim_is_sound(
    verifier: Verifier, extras: dict[str, Any], overrides: dict[str, Any]
) -> None:
    """Signed for real: whatever else the header holds (``jku``, ``x5u``, ``crit``, a kid of any type)
    and whatever shape the claims take, the outcome is a principal of sound claims or a 401."""
    extras.pop("kid", None)
    body = claims(**overrides)
    token = sign(body, **extras)
    principal, error = attempt(lambda: verifier.verify(token, now=NOW))
    if principal is None:
        assert error is not None
        assert error.code in AUTH_CODES
        return
    # accepted: then it was sound, and the key headers were ignored, never fetched
    assert "crit" not in extras
    assert body["iss"] == ISSUER
    assert body["sub"] == principal.subject
    assert isinstance(body["exp"], int | float)
    assert body["exp"] + verifier.settings.leeway_seconds > NOW


# -- mutations of the valid token -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(VALID) - 1),
    operation=st.sampled_from(["replace", "insert", "delete", "swap"]),
    char=st.sampled_from([*"AZaz09-_.=+/ \x00é", "%2E", "\u2024"]),
)
def test_every_one_character_mutation_of_a_valid_token_is_refused(
    verifier: Verifier, position: int, operation: str, char: str
) -> None:
    if operation == "replace":
        token = VALID[:position] + char + VALID[position + 1 :]
    elif operation == "insert":
        token = VALID[:position] + char + VALID[position:]
    elif operation == "delete":
        token = VALID[:position] + VALID[position + 1 :]
    else:
        other = (position * 7919) % len(VALID)
        chars = list(VALID)
        chars[position], chars[other] = chars[other], chars[position]
        token = "".join(chars)
    if token == VALID:
        return  # a mutation that changed nothing
    refused(verifier, token)


def segments(token: str) -> list[str]:
    return token.split(".")


def with_part(index: int, raw: bytes, token: str = VALID) -> str:
    parts = segments(token)
    parts[index] = b64url_encode(raw)
    return ".".join(parts)


HEADER = json.loads(base64.urlsafe_b64decode(segments(VALID)[0] + "=="))
PAYLOAD_TEXT = base64.urlsafe_b64decode(segments(VALID)[1] + "==").decode()


@pytest.mark.parametrize(
    ("token", "code", "reason"),
    [
        (
            with_part(1, PAYLOAD_TEXT[:-1].encode() + b',"sub":"admin"}'),
            "jwt_malformed",
            "a duplicate claim: parsers keep different copies",
        ),
        (
            with_part(0, json.dumps(HEADER)[:-1].encode() + b',"alg":"none"}'),
            "jwt_malformed",
            "a duplicate alg",
        ),
        (with_part(1, b"\xff\xfe" + PAYLOAD_TEXT.encode()), "jwt_malformed", "a payload that is not UTF-8"),
        (with_part(0, b"\xc3\x28"), "jwt_malformed", "a header that is not UTF-8"),
        (with_part(1, b"[" * 2800 + b"]" * 2800), "jwt_malformed", "nesting far past the recursion limit"),
        (
            with_part(1, b'{"":' * 1150 + b"1" + b"}" * 1150),
            "jwt_malformed",
            "nested objects past the recursion limit",
        ),
        (
            with_part(1, b'{"exp": 1' + b"0" * 5000 + b"}"),
            "jwt_malformed",
            "an integer past int's digit limit",
        ),
        (
            with_part(0, json.dumps({**HEADER, "pad": "x" * 9000}).encode()),
            "jwt_too_large",
            "a huge header",
        ),
        (VALID.replace(".", "..", 1), "jwt_malformed", "an empty segment"),
        (VALID + ".", "jwt_malformed", "a fourth segment"),
        (VALID + "....", "jwt_malformed", "five segments: JWE"),
        (VALID.rsplit(".", 1)[0] + ".", "jwt_malformed", "no signature"),
        (segments(VALID)[0] + "==." + ".".join(segments(VALID)[1:]), "jwt_malformed", "padding"),
        (
            base64.b64encode(json.dumps(HEADER).encode()).decode().rstrip("=")
            + "+/."
            + ".".join(segments(VALID)[1:]),
            "jwt_malformed",
            "standard base64 characters",
        ),
        (" " + VALID, "jwt_malformed", "a leading space"),
        (VALID + "\n", "jwt_malformed", "a trailing line feed"),
        (VALID.replace("e", "\u0435", 1), "jwt_malformed", "a Cyrillic look-alike: not ASCII"),
        (VALID + "\udcff", "jwt_malformed", "a lone surrogate (bytes that were not UTF-8)"),
    ],
)
def test_named_hostile_tokens_are_refused_with_their_code(
    verifier: Verifier, token: str, code: str, reason: str
) -> None:
    assert code == "jwt_too_large" or len(token) <= verifier.settings.max_token_bytes, "parsed, not sized"
    assert refused(verifier, token) == code, reason


@pytest.mark.parametrize("field", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_regression_a_signed_time_claim_too_large_for_a_float_is_a_401_not_a_crash(
    verifier: Verifier, field: str, value: int
) -> None:
    # exp, nbf or iat as an integer of 400 digits (valid JSON, signed by the issuer's own key) raised
    # OverflowError out of the verifier when compared with the clock.
    token = sign(claims(**{field: value}))
    assert refused(verifier, token) == "jwt_claim_invalid"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extras=HEADER_EXTRAS.filter(lambda extras: "crit" in extras))
@example(extras={"crit": ["exp"]})
@example(extras={"crit": []})
def test_crit_is_refused_even_on_a_token_signed_by_the_right_key(
    verifier: Verifier, extras: dict[str, Any]
) -> None:
    extras.pop("kid", None)
    assert refused(verifier, sign(claims(), **extras)) == "jwt_malformed"


# -- the Authorization header and Envoy's payload --------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=80), st.text(max_size=20).map(lambda t: "Bearer " + t)))
def test_any_authorization_header_gives_one_token_or_a_401(value: str | None) -> None:
    token, error = attempt(lambda: bearer_token(value))
    if token is None:
        assert error is not None
        assert error.code in ("jwt_missing", "jwt_malformed")
        return
    assert value is not None
    assert token == value.split()[1]
    assert value.split()[0].lower() == "bearer"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    metadata=st.dictionaries(
        st.sampled_from(["envoy.filters.http.jwt_authn", "other"]),
        st.dictionaries(st.sampled_from(["jwt_payload", "x"]), JSON_VALUES | CLAIM_OVERRIDES, max_size=2)
        | JSON_VALUES,
        max_size=2,
    )
)
def test_any_envoy_metadata_gives_a_sound_principal_or_a_401(metadata: dict[str, Any]) -> None:
    settings_ = IdentitySettings.model_validate({"mode": "envoy"})
    principal, error = attempt(lambda: principal_from_metadata(metadata, settings_))
    if principal is None:
        assert error is not None
        assert error.code in AUTH_CODES
        return
    payload = metadata["envoy.filters.http.jwt_authn"]["jwt_payload"]
    assert principal.subject == payload["sub"]
    assert principal.subject
    assert isinstance(payload["iss"], str)
