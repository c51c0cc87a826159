"""The detection engine: Hyperscan finds candidates, Python ``re`` confirms them.

Every enabled rule is compiled into one Hyperscan database per mode (block for whole bodies, stream for
bodies that arrive in pieces), without start-of-match tracking: it costs throughput and database size
and rejects many real-world patterns. Hyperscan reports where a candidate match ends; the rule's
Python pattern then runs on a window around that end, bounded by the longest match the rule can
produce, to get the exact span; validators, entropy, keywords and allow-lists decide the rest.

Hyperscan scans ``text.encode("ascii", "replace")``: one byte per character, so its offsets are character
offsets. Patterns read ``\\d \\w \\s \\b`` as ASCII in both engines, and every non-ASCII character is a
``?`` to Hyperscan, which any pattern able to match that character also matches: Hyperscan's candidates
are a superset of Python's matches. A pattern with a non-ASCII character runs on Python alone.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import hashlib
import hmac
import importlib.metadata
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hyperscan

from extproc.detect import encoded
from extproc.detect.context import ROW_CHARS, Keywords, Tables, TableState, label_forms
from extproc.detect.normalize import OffsetMap, normalize
from extproc.detect.normalize import prepare as prepare_normalize
from extproc.detect.rules import NOT_AFTER_CHARS, LoadedRule, RuleSet, pattern_width
from extproc.detect.tail import TailBuilder, TailModel
from extproc.detect.validators import VALIDATORS, shannon_entropy
from extproc.model import Finding

log = logging.getLogger("extproc.detect")
HYPERSCAN_VERSION = importlib.metadata.version("hyperscan")

CONTEXT = 32  # characters around a window, for \b, lookbehind and lookahead at its edges
# A rule wider than this whose matches all start with a literal (a PEM block's "-----BEGIN") is held back
# in streams only from where that literal (or its beginning, at the very end) appears.
LONG_RULE = 512
MIN_ANCHOR = 4
MatchHandler = Callable[[int, int, int, int, object], bool | None]
# The masker's own replacements ([REDACTED:ENTITY], [ENTITY:<16 hex>]) are not data: a finding inside one
# is dropped, so masking twice changes nothing.
MASK_TOKEN = re.compile(r"\[(?:REDACTED:[A-Z][A-Z0-9_]{0,63}|[A-Z][A-Z0-9_]{0,63}:[0-9a-f]{16})\]")


_SEVERITY = {"low": 0, "medium": 1, "high": 2, "critical": 3}
# In a Hyperscan expression: an anchor at an end of the whole buffer, or an inline group that turns
# MULTILINE off. Found conservatively: an escaped backslash before it counts as no escape.
_BUFFER_ANCHOR = re.compile(r"\\[AzZ]|\(\?[a-zA-Z]*-[a-zA-Z]*m")
# What ``clean`` puts between strings: a line break, for which `^` `$` (MULTILINE) and `\b` read as at
# the start or end of a text, and which no value spans in a string read alone.
_BATCH_SEPARATOR = "\n"
_LABELS_KEPT = 4096  # labels whose forms are remembered (JSON keys repeat in every event of a stream)


class DetectorError(Exception):
    """The rules cannot be compiled; ``problems`` name the file, the line and the rule."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class _Literal:
    rule: int
    length: int


def _ascii(text: str) -> bytes:
    return text.encode("ascii", "replace")


def hash_value(key: bytes, value: str) -> str:
    """The keyed digest stored in hashed exact-match lists."""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def read_list(path: Path) -> list[tuple[int, str]]:
    """Values of an exact-match list: one per line, blank lines and ``#`` comments skipped."""
    values = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        value = line.strip()
        if value and not value.startswith("#"):
            values.append((number, value))
    return values


class _Context:
    """Where keyword rules look beyond their window, in one confirmation of ``text`` (context.py): the
    forms of a label naming it, and the headers of the tables its values sit in, read on demand."""

    __slots__ = ("_base", "_known", "_label", "_state", "_tables", "_text")

    def __init__(
        self,
        text: str,
        base: int,
        state: TableState | None,
        label: tuple[str, ...],
        known: dict[tuple[int, int], list[tuple[str, ...]]] | None = None,
    ) -> None:
        self._text, self._base, self._state, self._label, self._known = text, base, state, label, known
        self._tables: Tables | None = None

    def extra(self) -> str:
        """The label and the header rows ``state`` knows (not in ``text``), lower case: a keyword rule
        with none of its keywords in these or in ``text`` finds nothing."""
        if not self._label and self._state is None:
            return ""
        headers = self._state.headers().lower() if self._state is not None else ""
        return "\n" + "\n".join(self._label) + "\n" + headers

    def names(self, keywords: Keywords, start: int, end: int) -> bool:
        """Whether the label, or the header of the column ``text[start:end]`` sits in, holds a keyword."""
        if self._label and keywords.in_label(self._label):
            return True
        if self._tables is None:
            self._tables = Tables(self._text, self._base, self._state, self._known)
        return any(keywords.in_label(forms) for forms in self._tables.labels(start, end))


@dataclass
class _Hits:
    """Candidates from one Hyperscan pass: regex match ends per rule, literal matches as spans."""

    ends: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    literals: list[tuple[int, int, int]] = field(default_factory=list)

    def shift(self, offset: int) -> _Hits:
        shifted = _Hits()
        for rule, ends in self.ends.items():
            shifted.ends[rule] = [e - offset for e in ends if e - offset > 0]
        shifted.literals = [(r, s - offset, e - offset) for r, s, e in self.literals if s - offset >= 0]
        return shifted


class Detector:
    """Compiled rules. ``scan`` for whole texts; ``stream()`` for text that arrives in pieces."""

    def __init__(
        self, ruleset: RuleSet, *, edm_key: bytes | None = None, cache_dir: Path | None = None
    ) -> None:
        self.rules: tuple[LoadedRule, ...] = tuple(r for r in ruleset.rules if r.rule.enabled)
        prepare_normalize()  # the normalisation tables, built at start-up rather than on a first request
        self._cache = _Cache(cache_dir) if cache_dir is not None else None
        self._keywords = {r.id: Keywords(r.rule.keywords) for r in self.rules if r.rule.keywords}
        # What a keyword rule's keywords need (some rules name a dozen, in several languages): a text with
        # none of them gets no finding of the rule. All of them are one Hyperscan database, read over the
        # UTF-8 bytes of the lowered text: one pass tells every keyword rule at once (a Python alternation
        # per rule took a search of the whole text each). See ``_need_expression``.
        needs: dict[str, set[int]] = defaultdict(set)
        unfiltered: set[int] = set()  # a keyword of spaces alone needs nothing: found in any text
        for index, loaded in enumerate(self.rules):
            if loaded.rule.keywords:
                for need in self._keywords[loaded.id].prefilter:
                    (needs[need] if need else unfiltered).add(index)
        self._needs = [frozenset(rules) for rules in needs.values()]
        self._unfiltered = frozenset(unfiltered)
        self._labels: dict[str, tuple[str, ...]] = {}  # label -> its forms, when a keyword can be in them
        problems: list[str] = []
        self._python_only: list[int] = []
        self._hashed: dict[int, frozenset[str]] = {}
        self._listed: dict[int, list[str]] = {}  # the values of literal exact-match lists, per rule
        self._edm_key = edm_key
        expressions: list[bytes] = []
        ids: list[int] = []
        flags: list[int] = []
        literal_expressions: list[bytes] = []
        literal_flags: list[int] = []
        self._literals: list[_Literal] = []
        widest = 0
        for index, loaded in enumerate(self.rules):
            rule = loaded.rule
            if rule.pattern is not None:
                widest = max(widest, loaded.width)
                expression = rule.candidate or rule.pattern
                if not expression.isascii():
                    self._python_only.append(index)
                    continue
                expressions.append(expression.encode("ascii"))
                ids.append(index)
                flags.append(hyperscan.HS_FLAG_CASELESS if rule.case_insensitive else 0)
            elif rule.exact is not None:
                widest = max(
                    widest, self._load_exact(index, loaded, literal_expressions, literal_flags, problems)
                )
        self.width = widest
        self._severity = {r.id: _SEVERITY[r.rule.severity] for r in self.rules}
        # Which of several rules finding one value reports it (merge): the most specific first.
        self._rank = {
            r.id: (-_SEVERITY[r.rule.severity], bool(r.rule.keywords), index)
            for index, r in enumerate(self.rules)
        }
        self._run_db = _compile(
            hyperscan.HS_MODE_BLOCK, [encoded.RUN_START], [0], [hyperscan.HS_FLAG_SINGLEMATCH]
        )
        # For ``clean``: every run, not just the first (SINGLEMATCH would report one for all the strings).
        self._runs_db = _compile(hyperscan.HS_MODE_BLOCK, [encoded.RUN_START], [0], [0])
        # The rules that read the text of base64 runs (encoded.py): high and critical credentials.
        self._decoded_ids = frozenset(
            r.id
            for r in self.rules
            if r.rule.category == "credential" and r.rule.severity in ("high", "critical")
        )
        # What a stream holds back: only what a match still in progress could cover (see tail.py).
        self.tail = self._tail_model()
        # The fixed hold streams used before the tail model, kept for comparisons (StreamScanner's
        # `_fixed_hold`): `hold` characters for the ordinary rules, long anchored rules only from their
        # anchor. Anchors are cut to CONTEXT characters: a partial anchor at the very end of a stream then
        # always lies within the ordinary hold, so only whole anchors need looking for.
        self.anchored: tuple[tuple[re.Pattern[str], int], ...] = tuple(
            (
                re.compile(re.escape(r.anchor[:CONTEXT]), re.IGNORECASE if r.rule.case_insensitive else 0),
                r.width,
            )
            for r in self.rules
            if r.width > LONG_RULE and len(r.anchor) >= MIN_ANCHOR
        )
        anchored_ids = {r.id for r in self.rules if r.width > LONG_RULE and len(r.anchor) >= MIN_ANCHOR}
        self.hold = max((r.width for r in self.rules if r.id not in anchored_ids), default=0) + CONTEXT
        # Context a rule may look at before a match: its keywords, plus the window around it.
        self.lookbehind = max((r.rule.keyword_window for r in self.rules), default=0) + widest + CONTEXT
        self._prefilter: set[int] = set()
        block = None
        # The block database reads `^` and `$` at every line as well (MULTILINE): it only proposes
        # candidates, which the rules' own patterns confirm as written, and so one pass over many strings
        # joined with newlines finds every candidate each string has alone (``clean``).
        block_flags = [flag | hyperscan.HS_FLAG_MULTILINE for flag in flags]
        if expressions:
            block = self._compile_block(expressions, ids, block_flags, problems)
        if problems:
            raise DetectorError(problems)
        self._block = block
        flags = [f | (b & hyperscan.HS_FLAG_PREFILTER) for f, b in zip(flags, block_flags, strict=True)]
        self._stream_db = self._database(hyperscan.HS_MODE_STREAM, expressions, ids, flags)
        # Anchors at the ends of the whole text (\A \z \Z), or a group turning MULTILINE off, would
        # not see a string's ends inside the joined text: with one such rule, ``clean`` clears nothing.
        self._batchable = not self._python_only and not any(
            _BUFFER_ANCHOR.search(expression.decode("ascii")) for expression in expressions
        )
        literal_ids = list(range(len(literal_expressions)))
        self._literal_block = self._database(
            hyperscan.HS_MODE_BLOCK, literal_expressions, literal_ids, literal_flags, literal=True
        )
        self._literal_stream = self._database(
            hyperscan.HS_MODE_STREAM, literal_expressions, literal_ids, literal_flags, literal=True
        )
        self._keyword_db = self._database(
            hyperscan.HS_MODE_BLOCK,
            [_need_expression(need) for need in needs],
            list(range(len(needs))),
            [hyperscan.HS_FLAG_SINGLEMATCH] * len(needs),
        )

    # -- compilation ----------------------------------------------------------------------------------

    def _load_exact(
        self,
        index: int,
        loaded: LoadedRule,
        expressions: list[bytes],
        flags: list[int],
        problems: list[str],
    ) -> int:
        exact = loaded.rule.exact
        assert exact is not None
        path = (loaded.path.parent / exact.file).resolve()
        try:
            values = read_list(path)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{loaded.where}: exact.file {exact.file}: cannot read: {exc}")
            return 0
        if exact.hashed:
            if self._edm_key is None:
                problems.append(f"{loaded.where}: a hashed list needs a key: set detect.edm_key_file")
                return 0
            digests = set()
            for number, value in values:
                digest = value.lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    problems.append(f"{path}:{number}: not an HMAC-SHA256 hex digest (rule {loaded.id!r})")
                digests.add(digest)
            self._hashed[index] = frozenset(digests)
            return loaded.width
        longest = 0
        flag = 0 if exact.case_sensitive else hyperscan.HS_FLAG_CASELESS
        listed = self._listed.setdefault(index, [])
        for number, value in values:
            if not value.isascii():
                problems.append(
                    f"{path}:{number}: literal lists take ASCII values; "
                    f"use `hashed: true` (rule {loaded.id!r})"
                )
                continue
            listed.append(value)
            expressions.append(value.encode("ascii"))
            flags.append(flag)
            self._literals.append(_Literal(index, len(value)))
            longest = max(longest, len(value))
        return longest

    def _tail_model(self) -> TailModel:
        """Model, for every rule, the text a match still in progress could cover. A rule the analysis cannot
        model, or one Python alone runs, keeps the fixed hold: its width and the context (from its anchor, for
        a long rule starting with a literal)."""
        builder = TailBuilder(CONTEXT)
        self._tail_groups: list[int | None] = [None] * len(self.rules)  # per rule, its prefix group
        self._reach = [r.width + CONTEXT for r in self.rules]  # how far back a match may still change
        # A finding inside one of the masker's own replacements is dropped: one being written out may
        # still swallow a finding before the end.
        if builder.add_pattern("mask-token", MASK_TOKEN) is None:
            builder.add_fixed("mask-token", pattern_width(MASK_TOKEN) + CONTEXT)
        python_only = set(self._python_only)
        for index, loaded in enumerate(self.rules):
            exact = loaded.rule.exact
            if exact is not None and not exact.hashed:
                builder.add_list(loaded.id, self._listed.get(index, []), exact.case_sensitive)
                continue
            regex = loaded.regex if loaded.regex is not None else loaded.token
            if regex is None:
                continue
            group = builder.add_pattern(loaded.id, regex) if index not in python_only else None
            if group is not None:
                if loaded.rule.exact is None:
                    self._tail_groups[index] = group
                continue
            if loaded.width > LONG_RULE and len(loaded.anchor) >= MIN_ANCHOR:
                caseless = bool(regex.flags & re.IGNORECASE)
                builder.add_anchor(loaded.id, loaded.anchor[:CONTEXT], loaded.width, caseless)
            else:
                builder.add_fixed(loaded.id, loaded.width + CONTEXT)
        return builder.build()

    def _compile_block(
        self, expressions: list[bytes], ids: list[int], flags: list[int], problems: list[str]
    ) -> hyperscan.Database | None:
        """Compile all at once; when that fails, find the patterns Hyperscan cannot take as they are and
        compile those in PREFILTER mode (a superset of their matches, confirmed by Python anyway)."""
        decisions_key = _key("prefilter", expressions, flags)
        known = self._cache.get_json(decisions_key) if self._cache is not None else None
        if isinstance(known, list):  # which patterns need PREFILTER, as found by an earlier compile
            for position in known:
                flags[position] |= hyperscan.HS_FLAG_PREFILTER
                self._prefilter.add(ids[position])
            return self._database(hyperscan.HS_MODE_BLOCK, expressions, ids, flags)
        try:
            database = self._database(hyperscan.HS_MODE_BLOCK, expressions, ids, flags)
        except hyperscan.error:
            pass
        else:
            if self._cache is not None:
                self._cache.put_json(decisions_key, [])
            return database
        prefiltered = self._prefilter
        original = list(flags)
        for position, (expression, rule_index) in enumerate(zip(expressions, ids, strict=True)):
            try:
                _compile(hyperscan.HS_MODE_BLOCK, [expression], [0], [flags[position]])
                continue
            except hyperscan.error:
                pass
            try:
                with_prefilter = flags[position] | hyperscan.HS_FLAG_PREFILTER
                _compile(hyperscan.HS_MODE_BLOCK, [expression], [0], [with_prefilter])
            except hyperscan.error as exc:
                problems.append(
                    f"{self.rules[rule_index].where}: pattern: Hyperscan cannot compile it: {exc}"
                )
                continue
            flags[position] = with_prefilter
            prefiltered.add(rule_index)
        if problems:
            return None
        if self._cache is not None:
            self._cache.put_json(decisions_key, [i for i, f in enumerate(flags) if f != original[i]])
        return self._database(hyperscan.HS_MODE_BLOCK, expressions, ids, flags)

    def _database(
        self, mode: int, expressions: list[bytes], ids: list[int], flags: list[int], literal: bool = False
    ) -> hyperscan.Database | None:
        if not expressions:
            return None
        key = _key(f"db-{mode}-{literal}", expressions, flags, ids)
        if self._cache is not None:
            cached = self._cache.get_database(key, mode)
            if cached is not None:
                return cached
        database = _compile(mode, expressions, ids, flags, literal)
        if self._cache is not None:
            self._cache.put_database(key, database)
        return database

    @property
    def prefiltered(self) -> frozenset[str]:
        """Ids of the rules Hyperscan runs in PREFILTER mode."""
        return frozenset(self.rules[i].id for i in self._prefilter)

    # -- scanning -------------------------------------------------------------------------------------

    def _handlers(self, hits: _Hits, offset: int = 0) -> tuple[MatchHandler, MatchHandler]:
        """Match handlers that add to ``hits``; ``offset``: where the scanned data starts in the stream
        (a stream replayed from the middle, ``StreamScanner.fork``)."""
        ends = hits.ends
        literals = self._literals
        found = hits.literals
        if offset:

            def on_regex_at(rule: int, _start: int, end: int, _flags: int, _context: object) -> bool:
                ends[rule].append(end + offset)
                return False

            def on_literal_at(literal: int, _start: int, end: int, _flags: int, _context: object) -> bool:
                entry = literals[literal]
                found.append((entry.rule, end + offset - entry.length, end + offset))
                return False

            return on_regex_at, on_literal_at

        def on_regex(rule: int, _start: int, end: int, _flags: int, _context: object) -> bool:
            ends[rule].append(end)
            return False

        def on_literal(literal: int, _start: int, end: int, _flags: int, _context: object) -> bool:
            entry = literals[literal]
            found.append((entry.rule, end - entry.length, end))
            return False

        return on_regex, on_literal

    def label(self, name: str) -> tuple[str, ...]:
        """How ``name`` (a JSON key) reads as the label of a value (context.py), or nothing when no keyword
        rule's keyword can be found in it: most keys (``content``, ``role``) are no context."""
        forms = self._labels.get(name)
        if forms is None:
            forms = label_forms(name)
            if not any(keywords.in_label(forms) for keywords in self._keywords.values()):
                forms = ()
            if len(self._labels) < _LABELS_KEPT:
                self._labels[name] = forms
        return forms

    def scan(self, text: str, *, merged: bool = True, label: str | None = None) -> list[Finding]:
        """Every value found in ``text``, sorted by position; offsets are character offsets in ``text``. The
        rules read its normalised view (normalize.py); each finding covers the original characters its view
        span comes from. One value found by several rules is one finding (``merge``); ``merged=False``
        gives each rule's own findings (what a rule's samples are checked against). ``label``: what the
        caller knows names the text (the key of a JSON string), context for keyword rules (context.py)."""
        view = normalize(text)
        findings = self._scan_view(view.text, label=self.label(label) if label else ())
        if view.offsets is not None and findings:
            mapped = {f.at(*view.span(f.start, f.end)) for f in findings}
            findings = sorted(mapped, key=lambda f: (f.start, f.end, f.rule_id))
        return self.merge(findings) if merged else findings

    def merge(self, findings: list[Finding]) -> list[Finding]:
        """One finding per value: findings of one entity whose spans overlap (directly or through others)
        become one, over the span they cover together, reported as the most specific of their rules: the
        higher severity, then a rule without keywords over one that needs them (keyword rules are the wide
        nets, ``credit-card-keyword`` takes any Luhn-valid 12-19 digits), then the longer span, then the
        earlier rule in file order. The other rules are named in ``also_matched``, in that order too.
        Findings of different entities are kept apart (the masker still masks their union once). Sorted
        by position, like ``scan``."""
        if len(findings) < 2:
            return findings
        rank, unknown = self._rank, (0, True, len(self._rank))

        def specific(f: Finding) -> tuple[int, bool, int, int]:
            severity, keywords, order = rank.get(f.rule_id, unknown)
            return severity, keywords, f.start - f.end, order

        clusters: list[tuple[list[Finding], int]] = []  # overlapping findings of one entity, where they end
        for finding in sorted(findings, key=lambda f: (f.entity, f.start, f.end)):
            if clusters and clusters[-1][0][0].entity == finding.entity and finding.start < clusters[-1][1]:
                cluster, end = clusters[-1]
                cluster.append(finding)
                clusters[-1] = (cluster, max(end, finding.end))
            else:
                clusters.append(([finding], finding.end))
        merged = []
        for cluster, end in clusters:
            if len(cluster) == 1:
                merged.append(cluster[0])
                continue
            ordered = sorted(cluster, key=specific)
            winner = ordered[0]
            others = dict.fromkeys(r for f in ordered for r in f.rule_ids)
            del others[winner.rule_id]
            start = min(f.start for f in cluster)
            merged.append(Finding(winner.rule_id, winner.entity, start, end, tuple(others)))
        return sorted(merged, key=lambda f: (f.start, f.end, f.rule_id))

    def clean(self, texts: Sequence[str]) -> list[bool]:
        """Which of ``texts`` ``scan`` would find nothing in, for all of them in one Hyperscan pass: their
        normalised views joined by newlines. A string is clean when no candidate (regex, listed value)
        ends inside it and its base64 runs, if any, decode to no credential; every candidate a string
        has alone is a candidate of the joined text (MULTILINE anchors and ``\\b`` read the newline as
        the string's edge), so ``True`` is never wrong; a candidate across the newline only costs the
        string a full scan. Rules Hyperscan does not run (Python-only, hashed lists) or that anchor at
        the buffer's ends make every string unclean. Meant for short strings: every position of a
        base64 run is a call into Python here, where a scan alone stops at the first."""
        if not texts:
            return []
        if not self._batchable or self._hashed:
            return [False] * len(texts)
        views = [normalize(text).text for text in texts]
        starts: list[int] = []
        offset = 0
        for view in views:
            starts.append(offset)
            offset += len(view) + len(_BATCH_SEPARATOR)
        data = _ascii(_BATCH_SEPARATOR.join(views))
        ends: list[int] = []
        runs: list[int] = []

        def on_match(_id: int, _start: int, end: int, _flags: int, _context: object) -> bool:
            ends.append(end)
            return False

        def on_run(_id: int, _start: int, end: int, _flags: int, _context: object) -> bool:
            runs.append(end)
            return False

        for database in (self._block, self._literal_block):
            if database is not None:
                database.scan(data, match_event_handler=on_match)
        result = [True] * len(texts)
        for end in ends:
            result[bisect.bisect_right(starts, end - 1) - 1] = False
        if self._decoded_ids:
            self._runs_db.scan(data, match_event_handler=on_run)
            # A base64 run and no other candidate: what a scan would find is what its runs decode to
            # (a UUID, a URL path: runs that hold no credential are the common case).
            with_runs = {bisect.bisect_right(starts, end - 1) - 1 for end in runs}
            for index in with_runs:
                if result[index] and self.encoded(views[index], 0, len(views[index])):
                    result[index] = False
        return result

    def _scan_view(self, text: str, decode: bool = True, label: tuple[str, ...] = ()) -> list[Finding]:
        findings = self._scan_plain(text, label)
        if decode:
            encoded_findings = self.encoded(text, 0, len(text))
            if encoded_findings:
                findings = sorted({*findings, *encoded_findings}, key=lambda f: (f.start, f.end, f.rule_id))
        return findings

    def encoded(self, text: str, start: int, end: int, continued: bool = False) -> list[Finding]:
        """A finding per base64 run in ``text[start:end]`` whose decoded text holds a high or critical
        credential, spanning the whole run (encoded.py). ``continued``: a run starting at ``start``
        began before it, in text already released, and is too long to decode."""
        if not self._decoded_ids or not self._any_run(text, start, end):
            return []
        found = []
        for low, high in encoded.runs(text, start, end):
            if continued and low == start:
                continue
            plain = encoded.decoded(text[low:high])
            if plain is None:
                continue
            inside = [f for f in self._scan_plain(normalize(plain).text) if f.rule_id in self._decoded_ids]
            if inside:  # the run is reported as the most severe credential it holds, the first of those
                first = min(inside, key=lambda f: (-self._severity[f.rule_id], f.start))
                found.append(Finding(first.rule_id, first.entity, low, high))
        return found

    def _any_run(self, text: str, start: int, end: int) -> bool:
        """Whether ``text[start:end]`` holds 20 base64 characters in a row: Hyperscan answers at GB/s, so
        texts without one (most) skip the Python search for runs."""
        seen: list[bool] = []

        def on_run(_id: int, _start: int, _end: int, _flags: int, _context: object) -> bool:
            seen.append(True)
            return True  # one is enough: stop scanning

        with contextlib.suppress(hyperscan.ScanTerminated):
            self._run_db.scan(_ascii(text[start:end]), match_event_handler=on_run)
        return bool(seen)

    def _scan_plain(self, text: str, label: tuple[str, ...] = ()) -> list[Finding]:
        hits = _Hits()
        on_regex, on_literal = self._handlers(hits)
        data = _ascii(text)
        if self._block is not None:
            self._block.scan(data, match_event_handler=on_regex)
        if self._literal_block is not None:
            self._literal_block.scan(data, match_event_handler=on_literal)
        return self.confirm(text, hits, label=label)

    def confirm(
        self,
        text: str,
        hits: _Hits,
        memo: dict[tuple[int, int, int], set[Finding]] | None = None,
        base: int = 0,
        since: int = 0,
        settled: Callable[[int], int] | None = None,
        *,
        state: TableState | None = None,
        label: tuple[str, ...] = (),
        columns: dict[tuple[int, int], list[tuple[str, ...]]] | None = None,
    ) -> list[Finding]:
        """Turn candidates into findings with exact spans.

        For streams, where ``text`` starts at stream offset ``base``: ``memo`` keeps the findings of each
        settled window, one no match of which can still change (it starts before ``settled(rule)``, the
        earliest place a match of the rule may still be in progress; without it, before the rule's width and
        the context from the end). The same window over the same text gives the same findings, so a held
        buffer is not confirmed again and again as it grows. ``since`` is where the text not released yet
        starts: a window whose matches all end before it only holds findings already released, and is
        skipped (windows are confirmed whole or not at all, never cut).

        Keyword rules also read, where their window has no keyword, ``label`` (forms of what names the
        whole text) and the header of the table column a value sits in; ``state``: what the rows before
        ``text`` (a stream's buffer, starting at a line) left for that (context.py); ``columns``: the
        headers over values found so far, kept by a stream across confirmations."""
        found: set[Finding] = set()
        size = len(text)
        keyed: set[int] | None = None  # the keyword rules whose keywords the text may hold
        context = _Context(text, base, state, label, columns)
        for index, ends in hits.ends.items():
            loaded = self.rules[index]
            if loaded.rule.keywords:
                # A keyword must appear near a match (or in a label or header, which the text or ``state``
                # holds), so none anywhere means no finding: skip the windows.
                if keyed is None:
                    keyed = self._keyed(text.lower() + context.extra())
                if index not in keyed:
                    continue
            final = 0
            if memo is not None:
                final = settled(index) if settled is not None else size - loaded.width - CONTEXT
            for low, high in _windows(ends, loaded.width, size, since):
                if high + loaded.width <= since:  # every match starts before `high`: all already released
                    continue
                if memo is None or high > final:
                    self._confirm_regex(loaded, text, low, high, found, context)
                    continue
                key = (index, low + base, high + base)
                known = memo.get(key)
                if known is None:
                    known = set()
                    self._confirm_regex(loaded, text, low, high, known, context)
                    memo[key] = {Finding(f.rule_id, f.entity, f.start + base, f.end + base) for f in known}
                    found |= known
                else:
                    found |= {Finding(f.rule_id, f.entity, f.start - base, f.end - base) for f in known}
        for index in self._python_only:
            self._confirm_regex(self.rules[index], text, 0, size, found, context)
        for index, start, end in hits.literals:
            before = text[start - 1] if start > 0 else " "
            after = text[end] if end < size else " "
            if not (before.isalnum() or after.isalnum()):
                self._accept(self.rules[index], text, start, end, start, found, context)
        for index, digests in self._hashed.items():
            self._confirm_hashed(index, digests, text, found, context)
        if found and "[" in text:
            tokens = [m.span() for m in MASK_TOKEN.finditer(text)]
            found = {f for f in found if not any(s <= f.start and f.end <= e for s, e in tokens)}
        return sorted(found, key=lambda f: (f.start, f.end, f.rule_id))

    def _keyed(self, lowered: str) -> set[int]:
        """The keyword rules some of whose keywords' needs (``Keywords.prefilter``) ``lowered`` may hold,
        as written or with a label's words split (``_need_expression``)."""
        keyed = set(self._unfiltered)
        if self._keyword_db is None:
            return keyed
        needs = self._needs

        def on_need(need: int, _start: int, _end: int, _flags: int, _context: object) -> bool:
            keyed.update(needs[need])
            return False

        self._keyword_db.scan(lowered.encode("utf-8", "surrogatepass"), match_event_handler=on_need)
        return keyed

    def reference(self, text: str, rule_id: str) -> list[Finding]:
        """What one regex rule finds in ``text`` by Python alone, over the whole text: the standard
        Hyperscan's candidates (and a rule's ``candidate`` pattern) must not lose anything against."""
        found: set[Finding] = set()
        view = normalize(text)
        for loaded in self.rules:
            if loaded.id == rule_id and loaded.regex is not None:
                self._confirm_regex(loaded, view.text, 0, len(view.text), found)
        mapped = {Finding(f.rule_id, f.entity, *view.span(f.start, f.end)) for f in found}
        return sorted(mapped, key=lambda f: (f.start, f.end))

    def _confirm_regex(
        self,
        loaded: LoadedRule,
        text: str,
        low: int,
        high: int,
        found: set[Finding],
        context: _Context | None = None,
    ) -> None:
        regex = loaded.regex
        assert regex is not None
        group = loaded.rule.group
        # What a start gives must not depend on where its window happens to end: a stream's last windows may
        # still merge with windows that are not there yet, and in a window cut at `high` a match can end there
        # on `$` or `\b` that the whole text does not have. A match that reads near `high` is looked for again
        # with the text as far as one starting before `high` could read (its width and the context). Earlier
        # starts cannot gain a match that way: it would be a match of the whole text, whose end Hyperscan
        # reports, and its window would have widened this one.
        stop = min(len(text), high + loaded.width + CONTEXT)
        position = low
        while position < high:
            match = regex.search(text, position, high)
            if match is not None and match.end() + CONTEXT > high and high < stop:
                match = regex.search(text, position, stop)
                if match is not None and match.start() >= high:
                    return
            if match is None:
                return
            start, end = match.span(group)
            if start < end and self._accept(loaded, text, start, end, match.start(), found, context):
                # Resume after the value, not the whole match: a boundary character the pattern consumed
                # after one value may be the boundary before the next ("card1 card2").
                position = max(end, match.start() + 1)
            else:
                # A rejected candidate must not swallow the text where a real value starts
                # ("order 12345 4111 1111 1111 1111": the first candidate fails Luhn, the card follows).
                position = match.start() + 1

    def _confirm_hashed(
        self, index: int, digests: frozenset[str], text: str, found: set[Finding], context: _Context
    ) -> None:
        loaded = self.rules[index]
        assert loaded.token is not None
        assert loaded.rule.exact is not None
        assert self._edm_key is not None
        case_sensitive = loaded.rule.exact.case_sensitive
        for match in loaded.token.finditer(text):
            value = match.group()
            if hash_value(self._edm_key, value if case_sensitive else value.lower()) in digests:
                self._accept(loaded, text, match.start(), match.end(), match.start(), found, context)

    def _accept(
        self,
        loaded: LoadedRule,
        text: str,
        start: int,
        end: int,
        match_start: int,
        found: set[Finding],
        context: _Context | None = None,
    ) -> bool:
        rule = loaded.rule
        value = text[start:end]
        keywords = self._keywords.get(rule.id) if rule.keywords else None
        near = keywords is None or keywords.in_window(text, max(0, match_start - rule.keyword_window), end)
        if not near and context is None:
            return False
        if rule.validator is not None and not VALIDATORS[rule.validator](value):
            return False
        # A label naming the text, or the header of the value's table column: after the validator, the
        # strongest test of the bare numbers keyword rules find, before the rest.
        if not near and (keywords is None or context is None or not context.names(keywords, start, end)):
            return False
        if rule.min_entropy is not None and shannon_entropy(value) < rule.min_entropy:
            return False
        if any(allowed.search(value) for allowed in loaded.allow):
            return False
        if loaded.not_after is not None and loaded.not_after.search(
            text, max(0, start - NOT_AFTER_CHARS), start
        ):
            return False
        if loaded.examples and _inside_example(text, start, end, loaded.examples):
            return False
        found.add(Finding(rule.id, rule.entity, start, end))
        return True

    def stream(self, label: str | None = None) -> StreamScanner:
        """A scanner for text arriving in pieces; ``label`` as for ``scan``."""
        return StreamScanner(self, label=label)


def _need_expression(need: str) -> bytes:
    """A Hyperscan expression for the UTF-8 bytes of ``need`` (lower case), found wherever the lowered text
    holds it, also as a header or key reads with its words split (``steuer_id`` as ``steuer id``, a run of
    ``_ - .`` read as one space): each space of ``need`` also matches such a run. That reads a little more
    than the split form holds (``a_ b`` for ``a b``): only a keyword rule's windows are then read for
    nothing; no text holding the need is missed."""
    parts = []
    for char in need:
        if char == " ":
            parts.append(b"[\\x20\\x2d\\x2e\\x5f]+")
        else:
            parts.append(b"".join(b"\\x%02x" % byte for byte in char.encode("utf-8")))
    return b"".join(parts)


def _inside_example(text: str, start: int, end: int, examples: tuple[str, ...]) -> bool:
    """Whether ``text[start:end]`` lies inside an occurrence of one of the pack's allowed values (a rule
    that matches only part of a published example token reports that part)."""
    value = text[start:end]
    for example in examples:
        size = len(example)
        if value in example and text.find(example, max(0, end - size), start + size) != -1:
            return True
    return False


def _compile(
    mode: int, expressions: list[bytes], ids: list[int], flags: list[int], literal: bool = False
) -> hyperscan.Database:
    database = hyperscan.Database(mode=mode)
    database.compile(
        expressions=expressions, ids=ids, elements=len(expressions), flags=flags, literal=literal
    )
    return database


def _key(kind: str, expressions: list[bytes], flags: list[int], ids: list[int] | None = None) -> str:
    digest = hashlib.sha256(f"{kind}|hyperscan {HYPERSCAN_VERSION}|".encode())
    for expression in expressions:
        digest.update(len(expression).to_bytes(4, "big") + expression)
    digest.update(json.dumps([flags, ids]).encode())
    return f"{kind}-{digest.hexdigest()}"


class _Cache:
    """Compiled databases on disk, keyed by everything that shaped them (Hyperscan's version, mode,
    expressions, ids, flags). The folder must be private to the sidecar: whoever can write to it can
    change what is detected. A cache that cannot be read or written is skipped with a warning."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def _read(self, name: str) -> bytes | None:
        try:
            return (self._folder / name).read_bytes()
        except OSError:
            return None

    def _write(self, name: str, data: bytes) -> None:
        try:
            self._folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self._folder / f".{name}.{os.getpid()}"
            temporary.write_bytes(data)
            temporary.replace(self._folder / name)  # atomic: readers see a whole file or none
        except OSError as exc:
            log.warning("hyperscan_cache_unwritable", extra={"folder": str(self._folder), "reason": str(exc)})

    def get_database(self, key: str, mode: int) -> hyperscan.Database | None:
        data = self._read(key)
        if data is None:
            return None
        try:
            database = hyperscan.loadb(data, mode)
            database.scratch = hyperscan.Scratch(database)  # a loaded database comes without one
            return database
        except Exception:  # any damage (the binding raises several unrelated types): compile afresh
            log.warning("hyperscan_cache_unreadable", extra={"file": key})
            return None

    def put_database(self, key: str, database: hyperscan.Database) -> None:
        self._write(key, hyperscan.dumpb(database))

    def get_json(self, key: str) -> object:
        data = self._read(key)
        try:
            return json.loads(data) if data is not None else None
        except ValueError:
            return None

    def put_json(self, key: str, value: object) -> None:
        self._write(key, json.dumps(value).encode())


def _windows(ends: Iterable[int], width: int, size: int, since: int = 0) -> list[tuple[int, int]]:
    """Merged [low, high) windows that hold every match ending at one of ``ends``, with context; from
    ``since`` on: only the windows some match of which may end after it (each one whole)."""
    ordered = sorted(ends)
    first = bisect.bisect_right(ordered, since - width - CONTEXT)
    # Back to the first end of the window the first of those belongs to.
    while 0 < first < len(ordered) and ordered[first] - width - CONTEXT <= ordered[first - 1] + CONTEXT:
        first -= 1
    merged: list[tuple[int, int]] = []
    for end in ordered[first:]:
        low, high = max(0, end - width - CONTEXT), min(size, end + CONTEXT)
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


class StreamScanner:
    """Scans text that arrives in pieces; reports the same findings as ``Detector.scan`` on the whole.

    ``feed`` returns the text that can be released now and the findings inside it. It holds back from the
    earliest place where a match of some rule may still be in progress: where the text up to the end is
    a prefix of what the rule's pattern can consume (``Detector.tail``, see tail.py), so ordinary prose goes
    out within a word and a card number being typed is held from its first digit. That place moves back to
    the start of any finding that crosses it. Offsets are from the start of the stream.

    ``_fixed_hold`` (for comparisons only) holds back the last ``Detector.hold`` characters instead, as
    streams did before the tail model."""

    def __init__(self, detector: Detector, *, label: str | None = None, _fixed_hold: bool = False) -> None:
        self._detector = detector
        self._label = detector.label(label) if label else ()
        # The buffer starts at a line (or inside one too long for a table row): what the lines dropped
        # before it leave for table context (context.py).
        self._table = TableState()
        self._columns: dict[tuple[int, int], list[tuple[str, ...]]] = {}  # Tables.labels, by value
        self._tables = bool(detector._keywords)
        self._hold = detector.hold
        self._fixed_hold = _fixed_hold
        self._tail = detector.tail.state()
        self._keep = detector.lookbehind
        # The rules read the normalised view (normalize.py): _buffer, _base, _released and every offset
        # of hits, memo and tail state are view offsets. The text released is the original's, from
        # _original (starting at original offset _obase); _offsets maps view offsets to original ones.
        self._buffer = ""
        self._base = 0  # stream offset of _buffer[0]
        self._released = 0
        self._original = ""
        self._obase = 0
        self._oreleased = 0
        self._received = 0  # original characters received
        self._offsets = OffsetMap()
        self._run_from = 0  # where the run of base64 characters at the end of the view starts
        self._hits = _Hits()
        # What block-mode scans of the text not released found (``_rescanned``), stream offsets, and where
        # the text they read ended.
        self._block_hits = _Hits()
        self._scanned = 0
        self._memo: dict[tuple[int, int, int], set[Finding]] = {}
        # The binding does not keep the handlers alive: the scanner must, for as long as its streams live.
        self._handlers = detector._handlers(self._hits)
        self._streams = [
            database.stream(match_event_handler=handler)
            for database, handler in zip(
                (detector._stream_db, detector._literal_stream), self._handlers, strict=True
            )
            if database is not None
        ]
        for stream in self._streams:
            stream.__enter__()
        self._open = True

    @property
    def held(self) -> int:
        """Characters received but not yet released."""
        return self._received - self._oreleased

    def fork(self) -> StreamScanner:
        """A second scanner in this one's state, as if it had been fed the same text: from now on the two
        are fed apart. Hyperscan streams cannot be copied, so the twin's are new ones replaying the text
        this scanner keeps (``lookbehind`` before what it has not released: no match still in progress
        starts earlier); the matches the replay reports are this scanner's own, known already, and
        dropped."""
        if not self._open:
            raise RuntimeError("the stream is finished")
        twin = StreamScanner.__new__(StreamScanner)
        twin.__dict__.update(self.__dict__)
        twin._tail = copy.deepcopy(self._tail)
        twin._offsets = copy.deepcopy(self._offsets)
        twin._hits = _Hits()
        twin._memo = {key: set(found) for key, found in self._memo.items()}
        twin._columns = dict(self._columns)  # the texts part: so may their tables
        twin._handlers = self._detector._handlers(twin._hits, self._base)
        detector = self._detector
        databases = (detector._stream_db, detector._literal_stream)
        twin._streams = [
            database.stream(match_event_handler=handler)
            for database, handler in zip(databases, twin._handlers, strict=True)
            if database is not None
        ]
        data = _ascii(self._buffer)
        for stream in twin._streams:
            stream.__enter__()
            stream.scan(data)
        twin._hits.ends.clear()
        twin._hits.literals.clear()
        for rule, ends in self._hits.ends.items():
            twin._hits.ends[rule].extend(ends)
        twin._hits.literals.extend(self._hits.literals)
        twin._block_hits = _Hits()
        for rule, ends in self._block_hits.ends.items():
            twin._block_hits.ends[rule].extend(ends)
        twin._block_hits.literals.extend(self._block_hits.literals)
        return twin

    def feed(self, text: str) -> tuple[str, list[Finding]]:
        if not self._open:
            raise RuntimeError("the stream is finished")
        if text:
            view = normalize(text)
            length = self._base + len(self._buffer)
            if view.offsets is None:
                self._offsets.add(length, self._received)
            else:
                for start, origin in zip(view.offsets.views, view.offsets.origins, strict=True):
                    self._offsets.add(length + start, self._received + origin)
            self._original += text
            self._received += len(text)
            stripped = len(view.text.rstrip(encoded.ALPHABET))
            if stripped:  # the piece has a character outside the base64 alphabet: a run starts after it
                self._run_from = length + stripped
            self._buffer += view.text
            data = _ascii(view.text)
            for stream in self._streams:
                stream.scan(data)
        return self._release(final=False)

    def finish(self) -> tuple[str, list[Finding]]:
        self.close()
        return self._release(final=True)

    def close(self) -> None:
        """Free the Hyperscan streams (closing reports matches anchored at the end of the data)."""
        if self._open:
            self._open = False
            for stream in self._streams:
                stream.__exit__(None, None, None)

    def __del__(self) -> None:
        self.close()

    def _release(self, final: bool) -> tuple[str, list[Finding]]:
        end = self._base + len(self._buffer)
        if final:
            limit = end
        elif self._fixed_hold:
            limit = min(end - self._hold, self._anchored_limit(end))
        else:
            limit = self._detector.tail.limit(self._buffer, self._base, self._tail)
        decoding = bool(self._detector._decoded_ids)  # base64 runs are decoded: hold them whole
        growing = self._released <= self._run_from < end and end - self._run_from <= encoded.MAX_RUN
        if decoding and growing and not final:
            limit = min(limit, self._run_from)  # a run that may still grow
        if limit <= self._released:
            # Characters the view dropped (zero-width, controls) before the first held view character go
            # out now: they move no view offset, and held they would pile up to the end of the stream.
            original_limit = self._received if final else self._offsets.origin(self._released)
            if original_limit <= self._oreleased:
                return "", []
            out = self._original[self._oreleased - self._obase : original_limit - self._obase]
            self._oreleased = original_limit
            self._trim()
            return out, []
        detector, base = self._detector, self._base
        settled = None
        if not self._fixed_hold:
            groups, tail, state, reach = detector._tail_groups, detector.tail, self._tail, detector._reach

            def settled(index: int) -> int:
                group = groups[index]
                return (end - reach[index] if group is None else tail.settled(state, group)) - base

        findings = detector.confirm(
            self._buffer,
            self._rescanned(self._hits.shift(base)),
            self._memo,
            base,
            self._released - base,
            settled,
            state=self._table,
            label=self._label,
            columns=self._columns,
        )
        spans = [(f.start + self._base, f.end + self._base, f) for f in findings]
        crossing = True
        while crossing:  # a finding, or a base64 run, across the limit is held back whole
            crossing = False
            for start, stop, _ in spans:
                if start < limit < stop:
                    limit, crossing = start, True
            if decoding and limit < end and self._buffer[limit - base] in encoded.ALPHABET:
                run = encoded.run_start(self._buffer, self._released - base, limit - base) + base
                rest = self._buffer[limit - base :]
                run_end = limit + len(rest) - len(rest.lstrip(encoded.ALPHABET))
                length = run_end - run
                if run < limit and encoded.MIN_RUN <= length <= encoded.MAX_RUN and not self._continues(run):
                    limit, crossing = run, True
        if limit <= self._released:
            return "", []
        low = self._released - base
        if decoding:
            continued = self._continues(self._released)
            hidden = detector.encoded(self._buffer, low, limit - base, continued)
            spans += [(f.start + base, f.end + base, f) for f in hidden]
        # Findings of one value overlap, so they are released together (a finding across the limit holds
        # back every one overlapping it) and merge as they do in block mode.
        released = detector.merge(
            [
                f.at(self._offsets.origin(start), self._offsets.origin(stop - 1) + 1)
                for start, stop, f in spans
                if self._released <= start and stop <= limit
            ]
        )
        original_limit = self._offsets.origin(limit)
        out = self._original[self._oreleased - self._obase : original_limit - self._obase]
        self._released, self._oreleased = limit, original_limit
        self._trim()
        return out, released

    def _drop_lines(self, keep_from: int) -> int:
        """Where the buffer may start so that it starts at a line, moving the table state over the lines
        dropped: the start of the line ``keep_from`` is in, unless that line is longer than a table row
        (then ``keep_from``, and the state marks its first line partial)."""
        index = keep_from - self._base
        row = self._buffer.rfind("\n", 0, index) + 1
        state = self._table
        if row:
            state = state.advance(self._buffer, 0, row, self._base)
        if index - row <= ROW_CHARS and not (row == 0 and state.partial):
            self._table = state
            return self._base + row
        self._table = state.dropped()
        return keep_from

    def _continues(self, offset: int) -> bool:
        """Whether the base64 characters at view offset ``offset`` go on from text before it."""
        index = offset - self._base
        return 0 < index <= len(self._buffer) and self._buffer[index - 1] in encoded.ALPHABET

    def _anchored_limit(self, end: int) -> int:
        """The first place a long anchored rule's match could still be in progress: where its anchor
        appears within the rule's reach from the end."""
        limit = end
        for anchor, width in self._detector.anchored:
            start = max(self._released, end - width - CONTEXT) - self._base
            found = anchor.search(self._buffer, start)
            if found is not None:
                limit = min(limit, self._base + found.start())
        return limit

    def _rescanned(self, hits: _Hits) -> _Hits:
        """``hits`` (offsets in the buffer) with those of block-mode scans of the text not released yet.

        Hyperscan's stream mode is not split-invariant for every pattern: a match whose anchor falls on a
        write boundary can be lost (the bare pattern, fed in pieces, misses what one block finds), and a
        candidate the stream never reports is a value never confirmed. The hold model keeps every match
        from where it starts, so each match still to come starts in the text not released yet: scanning
        that text in block mode, with the context a boundary needs before it, finds every candidate the
        stream may have lost. The candidates are only where Python looks; a doubled one costs nothing.

        The scans are kept, so each reads only what arrived since the last one, from as far back as a
        match ending in it can start (the widest rule and the context): a match ending earlier was inside
        a scan already, and its end read there as here (block mode reads no further than the character
        after a match), except at that scan's very end, which is read again. So a held value of many
        kilobytes, fed in small pieces, costs a scan of its length once, not once per piece."""
        detector = self._detector
        base = self._base
        end = base + len(self._buffer)
        low = max(self._released - CONTEXT, self._scanned - detector.width - CONTEXT, base)
        block = self._block_hits
        if low < end:
            scanned = _Hits()
            on_regex, on_literal = detector._handlers(scanned, low)
            data = _ascii(self._buffer[low - base :])
            if detector._block is not None:
                detector._block.scan(data, match_event_handler=on_regex)
            if detector._literal_block is not None:
                detector._literal_block.scan(data, match_event_handler=on_literal)
            since = self._scanned  # what ends before it was found by the scans before
            for rule, ends in scanned.ends.items():
                block.ends[rule].extend(e for e in ends if e >= since)
            block.literals.extend(h for h in scanned.literals if h[2] >= since)
            self._scanned = end
        for rule, ends in block.ends.items():
            if ends:
                known = hits.ends[rule]
                hits.ends[rule] = sorted(set(known).union(e - base for e in ends))
        if block.literals:
            shifted = {(rule, start - base, stop - base) for rule, start, stop in block.literals}
            hits.literals = sorted(shifted.union(hits.literals))
        return hits

    def _trim(self) -> None:
        # Of the original, only what is not released yet is ever read again.
        self._original = self._original[self._oreleased - self._obase :]
        self._obase = self._oreleased
        keep_from = max(self._base, self._released - self._keep)
        if keep_from > self._base and self._tables:
            keep_from = self._drop_lines(keep_from)
        if keep_from > self._base:
            self._offsets.drop_before(keep_from)
            self._buffer = self._buffer[keep_from - self._base :]
            self._base = keep_from
            for rule in list(self._hits.ends):
                self._hits.ends[rule] = [e for e in self._hits.ends[rule] if e > keep_from]
            # In place: the Hyperscan handlers hold this list, not the attribute.
            self._hits.literals[:] = [h for h in self._hits.literals if h[1] >= keep_from]
            block = self._block_hits
            for rule in list(block.ends):
                block.ends[rule] = [e for e in block.ends[rule] if e > keep_from]
            block.literals[:] = [h for h in block.literals if h[1] >= keep_from]
            self._memo = {k: v for k, v in self._memo.items() if k[1] >= keep_from}
            if self._columns:
                self._columns = {k: v for k, v in self._columns.items() if k[0] >= keep_from}
