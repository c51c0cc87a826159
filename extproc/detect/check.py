"""``extproc rules check``: load, compile and run every rule's samples."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from extproc.detect.engine import Detector, DetectorError
from extproc.detect.rules import DEFAULT_MAX_MATCH_CHARS, RuleError, RuleSet, load_rules


@dataclass
class CheckReport:
    rules: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    prefiltered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_rules(
    paths: Iterable[str | Path],
    *,
    edm_key: bytes | None = None,
    max_match_chars: int = DEFAULT_MAX_MATCH_CHARS,
    cache_dir: Path | None = None,
) -> CheckReport:
    """Every problem of the rule files: schema, patterns, compilation, and samples that do not behave."""
    report = CheckReport()
    try:
        ruleset = load_rules(paths, max_match_chars)
    except RuleError as exc:
        report.problems.extend(exc.problems)
        return report
    try:
        detector = Detector(ruleset, edm_key=edm_key, cache_dir=cache_dir)
    except DetectorError as exc:
        report.problems.extend(exc.problems)
        return report
    report.rules = len(ruleset.rules)
    report.prefiltered = sorted(detector.prefiltered)
    _check_samples(ruleset, detector, report)
    return report


def _check_samples(ruleset: RuleSet, detector: Detector, report: CheckReport) -> None:
    for loaded in ruleset.rules:
        if not loaded.rule.enabled:
            continue
        for sample in loaded.rule.samples.match:
            report.samples += 1
            found = [f for f in detector.scan(sample, merged=False) if f.rule_id == loaded.id]
            if not found:
                report.problems.append(f"{loaded.where}: samples.match not matched: {sample!r}")
            elif loaded.regex is not None:
                lost = set(detector.reference(sample, loaded.id)) - set(found)
                if lost:
                    value = sample[min(f.start for f in lost) : max(f.end for f in lost)]
                    what = "candidate" if loaded.rule.candidate else "Hyperscan"
                    report.problems.append(f"{loaded.where}: {what} missed {value!r} in {sample!r}")
        for sample in loaded.rule.samples.no_match:
            report.samples += 1
            hits = [
                sample[f.start : f.end] for f in detector.scan(sample, merged=False) if f.rule_id == loaded.id
            ]
            if hits:
                report.problems.append(f"{loaded.where}: samples.no_match matched {hits[0]!r} in {sample!r}")
