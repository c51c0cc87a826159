"""The rules read a normalised view of every text (extproc/detect/normalize.py): a value written with
other digits, fullwidth forms, invisible characters, other spaces or look-alike letters is found as the
plain value is, and the mask covers the whole original span. Streams find what block mode finds on the
same disguised text, however it is cut. Each case names the evasion it closes."""

from __future__ import annotations

import os
import random
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.engine import Detector
from extproc.detect.normalize import CONFUSABLES, normalize
from extproc.detect.rules import load_rules
from extproc.mask import Inspector

from .rules_fixture import hyperscan_cache
from .test_stream_hold import block, samples, streamed

ROOT = Path(__file__).resolve().parents[1]
PACK = load_rules([ROOT / "rules"])
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def inspector() -> Inspector:
    cache = os.environ.get("EXTPROC_DETECT__CACHE_DIR")
    return Inspector.build(PACK, hash_key=b"k" * 24, cache_dir=Path(cache) if cache else None)


def _digits(text: str, zero: int) -> str:
    """ASCII digits written in the script whose zero is ``zero``."""
    return "".join(chr(zero + ord(c) - 48) if c.isdigit() else c for c in text)


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in text)


EVASIONS = {
    # separators and spacing
    "dots between groups": "4111.1111.1111.1111",
    "slashes between groups": "4111/1111/1111/1111",
    "double spaces": "4111  1111  1111  1111",
    "tabs": "4111\t1111\t1111\t1111",
    "newlines": "4111\n1111\n1111\n1111",
    "no-break spaces": CARD.replace(" ", "\u00a0"),
    "thin spaces": CARD.replace(" ", "\u2009"),
    "ideographic spaces": CARD.replace(" ", "\u3000"),
    "line separators": CARD.replace(" ", "\u2028"),
    "next-line characters": CARD.replace(" ", "\x85"),
    # Unicode digits
    "fullwidth digits": _fullwidth(CARD),
    "Arabic-Indic digits": _digits(CARD, 0x0660),
    "Devanagari digits": _digits(CARD, 0x0966),
    "mathematical bold digits": _digits(CARD, 0x1D7CE),
    # invisible characters inside the value
    "zero-width space": "41\u200b11 1111 1111 1111",
    "zero-width joiner": "4111 11\u200d11 1111 1111",
    "word joiner": "4111 1111 11\u206011 1111",
    "soft hyphen": "4111 1111 1111 11\u00ad11",
    "byte order mark": "4\ufeff111 1111 1111 1111",
    "combining mark": "41\u033611 1111 1111 1111",
    "control character": "4111\x001111\x001111\x001111",
    # glued values
    "letters glued before": "INV4111111111111111",
    "letters glued after": "4111111111111111USD",
}


@pytest.mark.parametrize("disguised", list(EVASIONS.values()), ids=list(EVASIONS))
def test_a_card_written_to_slip_past_is_found_and_masked_whole(inspector: Inspector, disguised: str) -> None:
    text = f"pay with {disguised} today"
    masked, findings = inspector.mask_text(text)
    cards = [f for f in findings if f.entity == "CREDIT_CARD"]
    assert cards, disguised
    start = text.index(disguised) + (3 if disguised.startswith("INV") else 0)
    end = start + len(disguised.removeprefix("INV").removesuffix("USD"))
    assert (cards[0].start, cards[-1].end) == (start, end)  # the whole span, invisible characters too
    assert masked.startswith("pay with ")
    assert masked.endswith(" today")
    digits = [c for c in masked if unicodedata.decimal(c, None) is not None]
    assert len(digits) == 4, masked  # only the last four digits are left


@pytest.mark.parametrize(
    ("text", "value", "entity"),
    [
        ("mail jane＠example.com now", "jane＠example.com", "EMAIL_ADDRESS"),
        ("mail ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ now", "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "EMAIL_ADDRESS"),
        ("mail jane@exämple.com now", "jane@exämple.com", "EMAIL_ADDRESS"),
        ("mail josé.doe@example.com now", "josé.doe@example.com", "EMAIL_ADDRESS"),
        ("mail ja\u200bne@exa\u200dmple.com now", "ja\u200bne@exa\u200dmple.com", "EMAIL_ADDRESS"),
        # Cyrillic А, К, І for the Latin letters of the prefix
        (
            "key \u0410\u041a\u0406\u04104OIGBRJZNX47IW6J here",
            "\u0410\u041a\u0406\u04104OIGBRJZNX47IW6J",
            "AWS_ACCESS_KEY",
        ),
        ("creds=idAKIA4OIGBRJZNX47IW6J", "AKIA4OIGBRJZNX47IW6J", "AWS_ACCESS_KEY"),
        (
            "GH_TOKEN_ghp_9Btr3dQAjQvDjPO9iaZzBjJK5LJbgr7uwliM",
            "ghp_9Btr3dQAjQvDjPO9iaZzBjJK5LJbgr7uwliM",
            "GITHUB_TOKEN",
        ),
        (
            "t=ghp_9Btr3dQAjQ\u200bvDjPO9iaZzBjJK5LJbgr7uwliM",
            "ghp_9Btr3dQAjQ\u200bvDjPO9iaZzBjJK5LJbgr7uwliM",
            "GITHUB_TOKEN",
        ),
        # Greek Ο and Cyrillic х in a Slack token's prefix
        (
            "tok \u0445\u03bfxb-376205896513-9410005535028-uLC2WTQmphcVzoPCGPpcXZLa",
            "\u0445\u03bfxb-376205896513-9410005535028-uLC2WTQmphcVzoPCGPpcXZLa",
            "SLACK_TOKEN",
        ),
        ("SECRETsk_live_dUK1XN24VddgQAyn2IkXkJbu", "sk_live_dUK1XN24VddgQAyn2IkXkJbu", "STRIPE_KEY"),
    ],
)
def test_other_values_written_to_slip_past_are_found_whole(
    inspector: Inspector, text: str, value: str, entity: str
) -> None:
    findings = [f for f in inspector.detector.scan(text) if f.entity == entity]
    assert [text[f.start : f.end] for f in findings] == [value]


def test_the_view_keeps_what_it_does_not_fold() -> None:
    assert normalize("Grüße, 東京, Ελλάδα").text == "Grüße, 東京, Ελλάδα".translate(
        {ord(k): v for k, v in CONFUSABLES.items()}
    )
    plain = "ordinary ASCII text, with tabs\tand\nnewlines"
    view = normalize(plain)
    assert view.text is plain
    assert view.offsets is None


def test_the_hash_token_is_the_same_however_the_value_is_written(inspector: Inspector) -> None:
    from extproc.detect.rules import MaskSpec
    from extproc.model import Finding

    masker = inspector.masker
    spec = MaskSpec(strategy="hash")
    finding = Finding("credit-card", "CREDIT_CARD", 0, 1)
    tokens = {
        masker.replacement(finding, value, spec)
        for value in (CARD, _fullwidth(CARD), "4111 1111 1111 11\u00ad11")
    }
    assert len(tokens) == 1


# -- properties: a disguise never changes what is found -------------------------------------------------

SCRIPTS_ZEROS = [0x0660, 0x06F0, 0x0966, 0x09E6, 0x0E50, 0xFF10, 0x1D7CE]
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\u00ad", "\ufeff", "\u034f", "\u180e"]


def disguise(text: str, seed: int) -> str:
    """``text`` rewritten as a sender hiding it would: digits in other scripts, fullwidth forms and
    invisible characters between characters. Its view is ``text`` itself."""
    rng = random.Random(seed)
    out = []
    for char in text:
        roll = rng.random()
        if char.isascii() and char.isdigit() and roll < 0.4:
            char = chr(rng.choice(SCRIPTS_ZEROS) + ord(char) - 48)
        elif "!" <= char <= "~" and roll < 0.6:
            char = chr(ord(char) + 0xFEE0)
        out.append(char)
        if rng.random() < 0.15:
            out.append(rng.choice(INVISIBLE))
    return "".join(out)


DETECTOR = Detector(PACK, cache_dir=hyperscan_cache())
PLAIN = [t for t in samples(PACK) if normalize(t).text == t]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PLAIN), st.integers(min_value=0, max_value=2**32))
def test_a_disguised_text_is_read_as_the_plain_one(plain: str, seed: int) -> None:
    disguised = disguise(plain, seed)
    assert normalize(disguised).text == plain
    found = [(f.rule_id, normalize(disguised[f.start : f.end]).text) for f in DETECTOR.scan(disguised)]
    assert found == [(f.rule_id, plain[f.start : f.end]) for f in DETECTOR.scan(plain)]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(PLAIN),
    st.integers(min_value=0, max_value=2**32),
    st.lists(st.integers(min_value=1, max_value=12), max_size=40),
)
def test_a_disguised_stream_finds_what_block_mode_finds_and_releases_every_character(
    plain: str, seed: int, sizes: list[int]
) -> None:
    disguised = disguise(plain, seed)
    assert streamed(DETECTOR, disguised, sizes) == (disguised, block(DETECTOR, disguised))


def test_no_character_outside_the_planes_read_would_change() -> None:
    """The tables read planes 0, 1 and 14 only (fast start-up); every other code point maps to itself."""
    from extproc.detect.normalize import _map

    skipped = [c for c in range(0x20000, 0xE0000) if _map(chr(c)) != chr(c)]
    skipped += [c for c in range(0xF0000, 0x110000) if _map(chr(c)) != chr(c)]
    assert skipped == []


def test_tag_characters_are_dropped() -> None:
    """Unicode tag characters (U+E0020-E007F) spell ASCII invisibly: they must not hide a value."""
    tagged = "41" + "".join(chr(0xE0000 + ord(c)) for c in "hidden") + "11 1111 1111 1111"
    assert normalize(tagged).text == "4111 1111 1111 1111"
