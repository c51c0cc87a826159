"""The default rule pack in rules/: it loads, compiles, and every rule's samples behave.

Each rule carries ``samples.match`` (texts it must report) and ``samples.no_match`` (near misses it must
not report); both are run through the compiled pack, so a sample also fails when another rule's pattern
breaks the database. The pack must stay cheap to stream: bounded widths and (almost) no rule in
Hyperscan's slower PREFILTER mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.detect.engine import Detector
from extproc.detect.rules import LoadedRule, RuleSet, load_rules
from extproc.model import Finding

from .rules_fixture import hyperscan_cache

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"

# Rules Hyperscan may run in PREFILTER mode (their patterns use lookaround, which Hyperscan only
# approximates; Python confirms every candidate anyway). Keep this list short and justified:
PREFILTER_ALLOWED = frozenset(
    {
        # Version strings are the main false alarm for IPv4 ("version 1.2.3.4", "AssemblyVersion("1.0.0.0")",
        # "requests==2.31.0.1", OIDs 1.3.6.1.4.1): telling them apart needs lookbehind on the words before
        # the address and lookahead for a longer dotted chain; consuming that context instead would
        # swallow the boundary of the next address in "10.0.0.1,10.0.0.2".
        "ip-address-v4",
    }
)
MAX_WIDTH = 8192  # the private key blocks: the longest text a streamed body ever holds back
MAX_OTHER_WIDTH = 512  # every other rule
WIDE_ENTITIES = frozenset({"PRIVATE_KEY", "JWT"})  # may be wider, held back only from their literal start
MIN_SAMPLES = 2

PACK: RuleSet = load_rules([RULES])
ENABLED: list[LoadedRule] = [r for r in PACK.rules if r.rule.enabled]


def _cases(kind: str) -> list[Any]:
    cases = []
    for loaded in ENABLED:
        samples = loaded.rule.samples.match if kind == "match" else loaded.rule.samples.no_match
        for index, text in enumerate(samples):
            cases.append(pytest.param(loaded.id, text, id=f"{loaded.id}-{kind}-{index}"))
    return cases


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(PACK, cache_dir=hyperscan_cache())


def _found(detector: Detector, rule_id: str, text: str) -> list[str]:
    return [text[f.start : f.end] for f in detector.scan(text, merged=False) if f.rule_id == rule_id]


@pytest.mark.parametrize(("rule_id", "text"), _cases("match"))
def test_match_sample_is_reported(detector: Detector, rule_id: str, text: str) -> None:
    assert _found(detector, rule_id, text), f"{rule_id} did not report anything in {text!r}"


@pytest.mark.parametrize(("rule_id", "text"), _cases("no_match"))
def test_no_match_sample_is_not_reported(detector: Detector, rule_id: str, text: str) -> None:
    assert _found(detector, rule_id, text) == [], f"{rule_id} reported a near miss in {text!r}"


def test_pack_has_both_files_and_rules_in_each() -> None:
    names = {path.name for path in PACK.sources}
    assert {"pii.yaml", "credentials.yaml"} <= names
    categories = {r.rule.category for r in ENABLED}
    assert {"pii", "credential"} <= categories


@pytest.mark.parametrize("loaded", ENABLED, ids=lambda r: r.id)
def test_rule_is_documented_and_sampled(loaded: LoadedRule) -> None:
    rule = loaded.rule
    assert rule.description.strip(), "every rule says what it matches"
    assert len(rule.samples.match) >= MIN_SAMPLES
    assert len(rule.samples.no_match) >= MIN_SAMPLES
    assert rule.pattern is not None
    assert rule.pattern.isascii(), "a non-ASCII pattern runs on Python alone, skipping Hyperscan"
    assert rule.category != "credential" or rule.severity in {"high", "critical"}


def test_masking_defaults() -> None:
    for loaded in ENABLED:
        expected = "mask" if loaded.rule.entity == "CREDIT_CARD" else "redact"
        assert loaded.rule.mask.strategy == expected, loaded.id
    cards = [r for r in ENABLED if r.rule.entity == "CREDIT_CARD"]
    assert cards
    assert all(r.rule.mask.keep == 4 for r in cards)


def test_only_justified_rules_run_in_prefilter_mode(detector: Detector) -> None:
    assert detector.prefiltered <= PREFILTER_ALLOWED, sorted(detector.prefiltered - PREFILTER_ALLOWED)


def test_widths_are_bounded(detector: Detector) -> None:
    assert detector.width <= MAX_WIDTH
    others = [r for r in ENABLED if r.rule.entity not in WIDE_ENTITIES]
    widest = max(others, key=lambda r: r.width)
    assert widest.width <= MAX_OTHER_WIDTH, f"{widest.id} is {widest.width} characters wide"
    # Only the private key blocks and whole JWTs are wider, and they say how wide with max_length.
    wide = [r for r in ENABLED if r.width > MAX_OTHER_WIDTH]
    assert wide
    assert all(r.rule.max_length is not None and r.rule.max_length <= MAX_WIDTH for r in wide)


def test_wide_rules_start_with_a_literal() -> None:
    """A stream holds back a wide rule's width only from where its literal start appears, so every
    rule wider than MAX_OTHER_WIDTH must begin with one (-----BEGIN, LS0tLS1CRUdJTi...)."""
    for loaded in ENABLED:
        if loaded.width > MAX_OTHER_WIDTH:
            assert len(loaded.anchor) >= 4, loaded.id


@pytest.mark.parametrize(("rule_id", "text"), _cases("match"))
def test_match_sample_is_reported_when_streamed(detector: Detector, rule_id: str, text: str) -> None:
    """Fed in small pieces, as a streamed answer arrives, a sample gives the same findings."""
    stream = detector.stream()
    found: list[Finding] = []
    for start in range(0, len(text), 5):
        found += stream.feed(text[start : start + 5])[1]
    found += stream.finish()[1]
    assert sorted(found, key=lambda f: (f.start, f.end, f.rule_id)) == detector.scan(text)
