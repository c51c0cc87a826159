"""Credentials hidden by one layer of base64 (extproc/detect/encoded.py) are decoded and found; the whole
run is masked. Streams hold a run until it ends and find what block mode finds, however the text is cut.
Each case was a way to deliver a key in clear to a receiver that decodes base64."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect import encoded
from extproc.detect.engine import Detector
from extproc.detect.rules import load_rules
from extproc.mask import Inspector

from .rules_fixture import hyperscan_cache
from .test_stream_hold import block, streamed

ROOT = Path(__file__).resolve().parents[1]
PACK = load_rules([ROOT / "rules"])
AWS = "AKIA4OIGBRJZNX47IW6J"
GITHUB = "ghp_9Btr3dQAjQvDjPO9iaZzBjJK5LJbgr7uwliM"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "Ux6T/xqZHszrSn92qI7VGMixy0dAiLg5p5CUcouCogkJ7chliPG0GhmQOmpDiPjs\n"
    "D6zD2LGhH8IYeoWhg7Px7U2213WK7FPcH9kKkgzZYPRnvllwB+3r+rekIP/TCLM1\n"
    "-----END RSA PRIVATE KEY-----\n"
)


@pytest.fixture(scope="module")
def inspector() -> Inspector:
    cache = os.environ.get("EXTPROC_DETECT__CACHE_DIR")
    return Inspector.build(PACK, hash_key=b"k" * 24, cache_dir=Path(cache) if cache else None)


def b64(text: str, urlsafe: bool = False, padded: bool = True) -> str:
    data = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(text.encode()).decode()
    return data if padded else data.rstrip("=")


@pytest.mark.parametrize(
    ("secret", "entity"),
    [
        (AWS, "AWS_ACCESS_KEY"),
        (f"export GITHUB_TOKEN={GITHUB}", "GITHUB_TOKEN"),
        (f'{{"token": "{GITHUB}"}}', "GITHUB_TOKEN"),
        (PEM, "PRIVATE_KEY"),
    ],
    ids=["aws key alone", "github token in a shell line", "github token in json", "pem private key"],
)
@pytest.mark.parametrize(
    ("urlsafe", "padded"), [(False, True), (True, True), (False, False)], ids=["std", "urlsafe", "unpadded"]
)
def test_a_credential_hidden_as_base64_is_found_and_the_whole_run_masked(
    inspector: Inspector, secret: str, entity: str, urlsafe: bool, padded: bool
) -> None:
    run = b64(secret, urlsafe, padded)
    text = f"please decode {run} and use it"
    masked, findings = inspector.mask_text(text)
    assert {(f.entity, text[f.start : f.end]) for f in findings} == {(entity, run)}
    assert masked == f"please decode [REDACTED:{entity}] and use it"


@pytest.mark.parametrize(
    "text",
    [
        f"prose {b64('the quarterly report is attached, thanks for waiting')} ends",
        f"a card is personal data, not a key: {b64('card 4111 1111 1111 1111')}",
        "a long word: internationalizationization and counterrevolutionaries",
        "an id 3f9c2b7e4d1a6f8e0b5c9d2a7e4f1b3c and a path /usr/local/lib/python3.11/site-packages",
        f"two layers are not decoded: {b64(b64(AWS))}",
    ],
    ids=["prose", "a card (not a credential)", "long words", "hex id and path", "double base64"],
)
def test_runs_that_hide_no_credential_are_left_as_they_are(inspector: Inspector, text: str) -> None:
    assert inspector.mask_text(text) == (text, [])


def test_runs_longer_than_the_limit_are_not_decoded() -> None:
    filler = "x" * (encoded.MAX_RUN * 3 // 4)
    assert list(encoded.runs(b64(filler + AWS))) == []
    assert encoded.decoded(b64(AWS)) == AWS
    assert encoded.decoded(b64(AWS) + "A") is None  # one character too many is no base64
    assert encoded.decoded("QUtJQTRPSUdCUkpaTlg0N0lXNko+/-_") is None  # both alphabets


def test_a_stream_holds_a_run_until_it_ends(inspector: Inspector) -> None:
    run = b64(AWS)
    scanner = inspector.detector.stream()
    early = scanner.feed("decode " + run[:10])[0] + scanner.feed(run[10:])[0]
    assert early.strip() == "decode"  # nothing of the run: it may still grow
    released, findings = scanner.feed(" now")
    assert released.strip() == run
    assert [f.entity for f in findings] == ["AWS_ACCESS_KEY"]


DETECTOR = Detector(PACK, cache_dir=hyperscan_cache())
PIECES = [
    b64(AWS),
    b64(GITHUB, urlsafe=True),
    b64("plain words here and more"),
    " ",
    "\n",
    "=",
    "+",
    "-",
    "x",
    "word",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=10).map("".join),
    st.lists(st.integers(min_value=1, max_value=16), max_size=40),
)
def test_a_stream_finds_what_block_mode_finds_in_base64_however_it_is_cut(
    text: str, sizes: list[int]
) -> None:
    assert streamed(DETECTOR, text, sizes) == (text, block(DETECTOR, text))
