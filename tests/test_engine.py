"""The detection engine: Hyperscan candidates confirmed by Python, block and stream mode."""

import re
import textwrap
from pathlib import Path

import hyperscan
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.detect.check import check_rules
from extproc.detect.engine import Detector, DetectorError, _need_expression
from extproc.detect.rules import RuleError, load_rules
from extproc.model import Finding

from .rules_fixture import EDM_KEY, RULES, detector


def spans(text: str) -> list[tuple[str, str]]:
    return [(f.rule_id, text[f.start : f.end]) for f in detector().scan(text)]


def test_the_test_pack_passes_its_own_samples() -> None:
    report = check_rules([RULES], edm_key=EDM_KEY)
    assert report.problems == []
    assert report.samples == 30
    # The lookarounds of zip-code are beyond Hyperscan: it runs as a prefilter, confirmed by Python.
    assert report.prefiltered == ["zip-code"]


def test_findings_carry_the_span_of_the_group() -> None:
    text = 'config: password = "Xk9#pQ2!vL" and card 4111 1111 1111 1111.'
    assert spans(text) == [("password-assignment", "Xk9#pQ2!vL"), ("credit-card", "4111 1111 1111 1111")]


def test_validators_entropy_placeholders_and_allow_lists_reject() -> None:
    for text in (
        "card 4111 1111 1111 1112",
        "password=changeme!!",
        "password=aaaaaaaaaa",
        "password: *********",
    ):
        assert spans(text) == [], text


def test_keywords_must_be_near() -> None:
    assert spans("employee E123456") == [("employee-id", "E123456")]
    far = "employee" + " filler" * 10 + " E123456"
    assert spans(far) == []


def test_offsets_are_characters_in_non_ascii_text() -> None:
    text = "Grüße an jane@example.com \u2013 Die Geheimsache 12-ä, Karte 4111111111111111 ☃"
    found = detector().scan(text)
    assert [(f.rule_id, text[f.start : f.end]) for f in found] == [
        ("email-address", "jane@example.com"),
        ("geheim", "Geheimsache 12-ä"),
        ("credit-card", "4111111111111111"),
    ]


def test_exact_lists_match_whole_values_only() -> None:
    assert spans("Night Owl and bluebird-7 ship") == [
        ("project-names", "Night Owl"),
        ("project-names", "bluebird-7"),
    ]
    assert spans("Bluebird-70 and xBluebird-7") == []
    assert spans("customers CU000042, CU777777, CU000043") == [
        ("customer-ids", "CU000042"),
        ("customer-ids", "CU777777"),
    ]


def test_a_hashed_list_needs_its_key() -> None:
    with pytest.raises(DetectorError, match="needs a key"):
        Detector(load_rules([RULES]))


def test_many_matches_in_one_text() -> None:
    text = " ".join(f"user{i}@example.com" for i in range(500))
    assert len(detector().scan(text)) == 500


def stream_scan(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, int, int]]]:
    scanner = detector().stream()
    released, found, position = "", [], 0
    for size in cuts:
        out, hits = scanner.feed(text[position : position + size])
        released += out
        found += hits
        position += size
    out, hits = scanner.feed(text[position:])
    released += out
    found += hits
    out, hits = scanner.finish()
    released += out
    found += hits
    return released, sorted((f.rule_id, f.start, f.end) for f in found)


FRAGMENTS = [
    "jane@example.com",
    "4111 1111 1111 1111",
    "password = Xk9#pQ2!vL",
    "employee E123456",
    "zip 94105",
    "Bluebird-7",
    "CU000042",
    "Geheimsache 12-ä",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\n-----END PRIVATE KEY-----",
    "-----BEGIN PRIVATE KEY-----",
    "-----END PRIVATE KEY-----",
    "MIIEvQIBADANBgkq",
    "--",
    " ",
    ".",
    "\n",
    "x",
    "é",
    "12",
    "@",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.lists(st.integers(min_value=1, max_value=25), max_size=60),
)
def test_stream_mode_finds_what_block_mode_finds_however_the_text_is_cut(text: str, cuts: list[int]) -> None:
    released, found = stream_scan(text, cuts)
    assert released == text
    assert found == sorted((f.rule_id, f.start, f.end) for f in detector().scan(text))


def test_stream_holds_back_only_what_a_match_could_still_cover() -> None:
    scanner = detector().stream()
    hold = detector().hold
    assert hold < 700 < detector().width  # the 2000-character PEM rule is anchored on "-----BEGIN"
    # A run of letters up to encoded.MAX_RUN may still be base64 worth decoding: it is held whole; past
    # that, only what a match in progress could cover.
    assert scanner.feed("a" * 5000)[0] == ""
    out, _ = scanner.feed("a" * 15000)
    # The letters may be the local part of an e-mail address (at most 64 characters), not the fixed hold
    # of the widest rule.
    assert len(out) == 20000 - 64
    assert scanner.held == 64 < hold
    out, found = scanner.feed(" mail jane@exa")
    assert "jane" not in out
    out, found = scanner.feed("mple.com " + "b" * 20000)
    assert [(f.start, f.end) for f in found] == [(20006, 20022)]


def test_a_long_rule_holds_back_from_its_anchor_only() -> None:
    scanner = detector().stream()
    hold = detector().hold
    out, _ = scanner.feed("x" * 1000 + " -----BEGIN PRIVATE KEY-----\n" + "A" * 1500)
    assert out == "x" * 1000 + " "  # the block may still end within the rule's reach: held from its start
    out, found = scanner.feed("\n-----END PRIVATE KEY-----\n" + "y" * 20000)  # no base64 run to hold
    assert [f.rule_id for f in found] == ["pem-block"]
    assert out.startswith("-----BEGIN")
    assert scanner.held == 64 < hold  # the trailing letters may still be an e-mail address's local part


def write(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


RULE = """\
rules:
- id: ok-rule
  entity: THING
  category: pii
  severity: low
  pattern: 'thing[0-9]{3}'
  samples: {match: ['thing123'], no_match: ['thing12']}
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("pattern: 'thing[0-9]{3}'", "pattern: 'thing[0-9'"),
            r"r\.yaml:2: rule 'ok-rule': pattern: invalid regular",
        ),
        (
            ("severity: low", "severity: low\n  validator: nope"),
            r"r\.yaml:2: rule 'ok-rule': .*validator 'nope' is unknown",
        ),
        (
            ("severity: low", "severity: low\n  colour: red"),
            r"r\.yaml:2: rule 'ok-rule': colour: Extra inputs",
        ),
        (("id: ok-rule", "id: Not_Kebab"), r"r\.yaml:2: rule 'Not_Kebab': id: String should match"),
        (
            ("samples: {match: ['thing123'], no_match: ['thing12']}", "samples: {match: ['thing123']}"),
            r"samples\.no_match: Field required",
        ),
        (("severity: low", "severity: low\n  group: 2"), r"group 2 is not a group of the pattern"),
        (("pattern: 'thing[0-9]{3}'", "pattern: '(?:thing)?'"), r"Hyperscan cannot compile it"),
    ],
)
def test_rule_errors_name_file_line_and_rule(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = write(tmp_path, RULE.replace(*change))
    report = check_rules([path])
    assert report.problems, "expected a problem"
    assert any(__import__("re").search(message, p) for p in report.problems), report.problems


def test_samples_that_misbehave_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path, RULE.replace("no_match: ['thing12']", "no_match: ['a thing999 here']"))
    report = check_rules([path])
    assert report.problems == [
        f"{path}:2: rule 'ok-rule': samples.no_match matched 'thing999' in 'a thing999 here'"
    ]
    path = write(tmp_path, RULE.replace("match: ['thing123']", "match: ['thing1']"))
    assert "samples.match not matched: 'thing1'" in check_rules([path]).problems[0]


def test_duplicate_ids_across_files_and_bad_yaml(tmp_path: Path) -> None:
    write(tmp_path, RULE, "a.yaml")
    write(tmp_path, RULE, "b.yaml")
    with pytest.raises(
        RuleError, match=r"b\.yaml:2: rule 'ok-rule': duplicate id, first defined at .*a\.yaml:2"
    ):
        load_rules([tmp_path])
    broken = write(tmp_path, "rules: [\n", "c.yaml")
    with pytest.raises(RuleError, match=r"c\.yaml:2: invalid YAML"):
        load_rules([broken])


def test_unbounded_patterns_get_the_cap(tmp_path: Path) -> None:
    path = write(tmp_path, RULE.replace("thing[0-9]{3}", "thing[0-9]+"))
    [rule] = load_rules([path], max_match_chars=100).rules
    assert rule.width == 100


def test_a_rejected_candidate_does_not_hide_the_value_after_it() -> None:
    assert spans("order 12345 4111 1111 1111 1111") == [("credit-card", "4111 1111 1111 1111")]


def test_adjacent_values_sharing_a_boundary_are_both_found() -> None:
    assert spans("4111 1111 1111 1111 5500 0000 0000 0004") == [
        ("credit-card", "4111 1111 1111 1111"),
        ("credit-card", "5500 0000 0000 0004"),
    ]


def test_the_cap_applies_to_unbounded_patterns_only(tmp_path: Path) -> None:
    path = write(tmp_path, RULE.replace("thing[0-9]{3}", "thing[0-9]{1,3000}"))
    [rule] = load_rules([path], max_match_chars=100).rules
    assert rule.width == 3005


def test_compiled_databases_are_cached_and_reused(tmp_path: Path) -> None:
    from extproc.mask import Inspector

    from .rules_fixture import HASH_KEY

    ruleset = load_rules([RULES])
    first = Inspector.build(ruleset, hash_key=HASH_KEY, edm_key=EDM_KEY, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith("prefilter-") for name in files)
    # block + stream, regex + literal; the keyword rules' needs
    assert sum(name.startswith("db-") for name in files) == 5
    second = Inspector.build(ruleset, hash_key=HASH_KEY, edm_key=EDM_KEY, cache_dir=tmp_path)
    assert second.detector.prefiltered == first.detector.prefiltered == {"zip-code"}
    text = "zip 94105, jane@example.com, Bluebird-7"
    assert second.detector.scan(text) == first.detector.scan(text)
    stream = second.detector.stream()
    found = stream.feed(text)[1] + stream.finish()[1]
    assert found == first.detector.scan(text)
    # A damaged cache file is recompiled, not trusted.
    for path in tmp_path.iterdir():
        path.write_bytes(b"garbage")
    third = Inspector.build(ruleset, hash_key=HASH_KEY, edm_key=EDM_KEY, cache_dir=tmp_path)
    assert third.detector.scan(text) == first.detector.scan(text)


def test_a_candidate_that_loses_matches_is_reported(tmp_path: Path) -> None:
    good = RULE.replace("  pattern: 'thing[0-9]{3}'", "  pattern: 'thing[0-9]{3}'\n  candidate: '[0-9]{3}'")
    assert check_rules([write(tmp_path, good)]).problems == []
    bad = RULE.replace("  pattern: 'thing[0-9]{3}'", "  pattern: 'thing[0-9]{3}'\n  candidate: 'thing1'")
    sample = "thing123" + " " * 80 + "thing456"  # farther apart than one candidate's window reaches
    path = write(tmp_path, bad.replace("match: ['thing123']", f"match: ['{sample}']"))
    assert check_rules([path]).problems == [
        f"{path}:2: rule 'ok-rule': candidate missed 'thing456' in {sample!r}"
    ]


def test_keyword_rules_are_skipped_when_no_keyword_is_anywhere() -> None:
    # The same candidate is confirmed or not depending only on its keyword being present.
    assert spans("code E123456 shipped") == []
    assert spans("code E123456 shipped to the employee") == []  # present, but not before the match
    assert spans("the employee code E123456 shipped") == [("employee-id", "E123456")]


def test_a_listed_value_is_found_in_a_stream_longer_than_what_a_scanner_keeps() -> None:
    """Regression: once a stream dropped its oldest text, the literal matches Hyperscan reported went
    to a list the scanner no longer read, and every listed value after that was let through."""
    det = detector()
    text = "status of Bluebird-7 is green " + "more words here " * (det.lookbehind // 8) + "and Bluebird-7."
    assert len(text) > 2 * det.lookbehind
    found: list[tuple[str, int]] = []
    scanner = det.stream()
    for start in range(0, len(text), 4):
        found += [(f.rule_id, f.start) for f in scanner.feed(text[start : start + 4])[1]]
    found += [(f.rule_id, f.start) for f in scanner.finish()[1]]
    assert found == [(f.rule_id, f.start) for f in det.scan(text)]
    assert [rule for rule, _ in found] == ["project-names", "project-names"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.lists(st.integers(min_value=1, max_value=25), min_size=1, max_size=60),
    st.integers(min_value=0, max_value=60),
    st.integers(min_value=0, max_value=3000),
)
def test_a_forked_scanner_goes_on_as_one_fed_the_same_text_from_the_start(
    text: str, cuts: list[int], fork_at: int, padding: int
) -> None:
    """``fork`` (the answer channel leaving its twin): the copy, fed the rest, releases the same text
    with the same findings as a scanner never forked, whatever it kept when forked (``padding`` makes
    the scanner drop its oldest text first)."""
    text = "filler words " * (padding // 13) + text
    pieces, position = [], 0
    for size in cuts:
        pieces.append(text[position : position + size])
        position += size
    pieces.append(text[position:])
    whole, forked = detector().stream(), detector().stream()
    expected: list[tuple[str, list[tuple[str, int, int]]]] = []
    got: list[tuple[str, list[tuple[str, int, int]]]] = []
    cut = min(fork_at, len(pieces))

    def out(result: tuple[str, list[Finding]]) -> tuple[str, list[tuple[str, int, int]]]:
        return result[0], [(f.rule_id, f.start, f.end) for f in result[1]]

    for piece in pieces[:cut]:
        expected.append(out(whole.feed(piece)))
        got.append(out(forked.feed(piece)))
    twin = forked.fork()
    forked.close()  # the original goes away: the twin owns streams of its own
    for piece in pieces[cut:]:
        expected.append(out(whole.feed(piece)))
        got.append(out(twin.feed(piece)))
    expected.append(out(whole.finish()))
    got.append(out(twin.finish()))
    assert got == expected


# -- the pack-wide allow-list ----------------------------------------------------------------------------

ALLOW = """\
allow:
- value: thing777
  reason: the documentation's example thing
- value: xx-thing555-yy
  reason: an example that holds a thing
"""


def test_an_allowed_value_is_dropped_by_every_rule_of_the_pack(tmp_path: Path) -> None:
    write(tmp_path, RULE, "a.yaml")
    write(tmp_path, RULE.replace("ok-rule", "other-rule").replace("THING", "OTHER"), "b.yaml")
    write(tmp_path, ALLOW, "allow.yaml")
    pack = load_rules([tmp_path])
    assert [a.value for a in pack.allowed] == ["thing777", "xx-thing555-yy"]
    found = Detector(pack, edm_key=EDM_KEY)
    assert found.scan("see thing777 here") == []
    # Inside an allowed value in the text (a rule matching part of a published token): dropped too.
    assert found.scan("token xx-thing555-yy") == []
    text = "thing778 and thing555 alone"
    assert sorted((f.rule_id, text[f.start : f.end]) for f in found.scan(text)) == [
        ("ok-rule", "thing555"),
        ("ok-rule", "thing778"),
        ("other-rule", "thing555"),
        ("other-rule", "thing778"),
    ]
    # A stream drops the allowed value cut across pieces, and reports the value beside it.
    stream = found.stream()
    pieces = [stream.feed("a thing7"), stream.feed("77 and thing778"), stream.finish()]
    released = "".join(text for text, _ in pieces)
    assert released == "a thing777 and thing778"
    assert sorted((f.rule_id, released[f.start : f.end]) for _, fs in pieces for f in fs) == [
        ("ok-rule", "thing778"),
        ("other-rule", "thing778"),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("allow:\n- value: thing777\n", r"allow\.yaml:2: allow: reason: Field required"),
        (
            "allow:\n- value: ''\n  reason: empty\n",
            r"allow\.yaml:2: allow: value: String should have at least",
        ),
        ("allow:\n- value: a\n  reason: r\n  colour: red\n", r"allow\.yaml:2: allow: colour: Extra inputs"),
        (
            ALLOW + "- value: thing777\n  reason: again\n",
            r"allow\.yaml:6: allow: value allowed twice, first at .*:2",
        ),
        (
            "allow: thing777\n",
            r"allow\.yaml:1: a rule file is a mapping with a `rules:` list, an `allow:` list",
        ),
        ("other: []\n", r"allow\.yaml:1: a rule file is a mapping with a `rules:` list, an `allow:` list"),
    ],
)
def test_a_bad_allow_entry_names_its_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    write(tmp_path, RULE, "a.yaml")
    write(tmp_path, body, "allow.yaml")
    with pytest.raises(RuleError, match=message):
        load_rules([tmp_path])


def test_not_after_drops_a_value_the_text_before_it_disowns_in_blocks_and_streams(tmp_path: Path) -> None:
    write(tmp_path, RULE.replace("  samples:", "  not_after: 'REF-?$'\n  samples:"), "a.yaml")
    found = Detector(load_rules([tmp_path]), edm_key=EDM_KEY)
    text = "REF-thing123 and thing456, REFthing789"
    assert [text[f.start : f.end] for f in found.scan(text)] == ["thing456"]
    stream = found.stream()
    pieces = [stream.feed(text[:5]), stream.feed(text[5:]), stream.finish()]
    released = "".join(t for t, _ in pieces)
    assert [released[f.start : f.end] for _, fs in pieces for f in fs] == ["thing456"]


def test_a_bad_not_after_names_its_file_rule_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, RULE.replace("  samples:", "  not_after: 'REF('\n  samples:"))
    with pytest.raises(RuleError, match=r"r\.yaml:2: rule 'ok-rule': not_after: invalid regular expression"):
        load_rules([path])


_JOINS = re.compile(r"[_\-.]+")


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="ab _-.é", max_size=6).filter(lambda need: need.strip(" ") != ""),
    st.text(alphabet="ab _-.éx", max_size=24),
)
def test_a_keyword_need_is_found_where_the_text_or_its_split_reading_holds_it(need: str, text: str) -> None:
    """The one pass over the lowered text that tells which keyword rules may apply must not miss a need
    the text holds as written or with a label's joins read as spaces (``steuer_id`` as ``steuer id``)."""
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    database.compile(expressions=[_need_expression(need)], ids=[0], elements=1, flags=[0])
    seen: list[int] = []

    def on_match(_id: int, _start: int, _end: int, _flags: int, _context: object) -> bool:
        seen.append(_end)
        return False

    database.scan(text.encode("utf-8"), match_event_handler=on_match)
    if need in text or need in _JOINS.sub(" ", text):
        assert seen
