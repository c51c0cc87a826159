"""Detection quality of a rule pack on labelled corpora from Presidio, gitleaks and detect-secrets.

    make eval                       # the default pack on ../shared/corpora
    python -m bench.eval --corpora DIR --rules DIR

Per entity: recall (labelled values found), false-positive rate (texts labelled clean in which the
entity was reported) and, where values are labelled, the leak rate after masking (labelled values still
present verbatim in the masked text). The secret scanners' suites are scored per family (gitleaks rule,
detect-secrets plugin), against the targets: recall >= 99%, false positives <= 1%. Last, the project's
own corpus (``bench/corpus.py``: documents generated from a fixed seed, with planted values and decoys)
is scored per entity against the same targets. ``--misses`` lists every miss and false alarm. Results go
to bench/results/eval.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import corpus
from extproc.detect.rules import load_rules
from extproc.mask import Inspector
from extproc.model import Finding

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPORA = ROOT.parent / "shared" / "corpora"
RESULTS = Path(__file__).resolve().parent / "results"
PATTERN_ENTITIES = (
    "CREDIT_CARD",
    "EMAIL_ADDRESS",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_SSN",
    "PHONE_NUMBER",
    "CRYPTO",
)
PRESIDIO_EXTRA = ("ABA_ROUTING_NUMBER", "US_BANK_NUMBER", "US_PASSPORT", "US_DRIVER_LICENSE")
# Secret-scanner families are scored per family: a case is found when a credential rule reports something
# in its text (whatever rule: a value the generic rule masks is masked). The exceptions are families of
# personal data, scored on their entity, and the ones outside the targets.
PII_FAMILIES = {"Public IP (ipv4)": "IP_ADDRESS"}
# Reported, but outside the targets: detect-secrets' keyword plugin, whose positives are mostly
# placeholders (`${VAR}`, `"somePassword"`) that the generic rules skip on purpose; and its public-IP
# plugin, whose clean cases are private and loopback addresses, which the pack reports as IP_ADDRESS like
# Presidio (whose tests count 192.168.0.1 and ::ffff:10.0.0.1 as addresses to find).
UNTARGETED = {"Secret Keyword", "Public IP (ipv4)"}
TARGET_RECALL, TARGET_FP = 0.99, 0.01
SECRET_SUITES = ("gitleaks rule samples", "detect-secrets plugin tests")


@dataclass
class Score:
    positives: int = 0
    found: int = 0
    negatives: int = 0
    false_alarms: int = 0
    values: int = 0
    leaked: int = 0
    contradicted: int = 0  # clean cases whose text the suite labels a secret elsewhere (left out)
    misses: list[str] = field(default_factory=list)

    def row(self, name: str) -> dict[str, Any]:
        return {
            "entity": name,
            "positives": self.positives,
            "recall": self.found / self.positives if self.positives else None,
            "negatives": self.negatives,
            "fp_rate": self.false_alarms / self.negatives if self.negatives else None,
            "leak_rate": self.leaked / self.values if self.values else None,
        }


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _overlaps(finding: Finding, start: int, end: int) -> bool:
    return finding.start < end and start < finding.end


def presidio_cases(inspector: Inspector, path: Path, scores: dict[str, Score]) -> None:
    wanted = set(PATTERN_ENTITIES) | set(PRESIDIO_EXTRA)
    for case in _read(path):
        entity = case["label"]
        fixtures = set(case["source"].get("fixtures", []))
        if entity not in wanted or "spacy_nlp_engine" in fixtures:
            continue  # cases that need an NLP model are out of scope for patterns
        score = scores[entity]
        text = case["text"]
        found = [f for f in inspector.detector.scan(text) if f.entity == entity]
        spans = case["expect"].get("spans") or []
        if case["expect"].get("count", 0) > 0:
            score.positives += 1
            if any(_overlaps(f, s, e) for f in found for s, e in spans) or (found and not spans):
                score.found += 1
            else:
                score.misses.append(text[:80])
            masked, _ = inspector.mask_text(text)
            for start, end in spans:
                score.values += 1
                score.leaked += text[start:end] in masked
        else:
            score.negatives += 1
            score.false_alarms += bool(found)


def presidio_synthetic(inspector: Inspector, path: Path, scores: dict[str, Score]) -> None:
    for case in _read(path):
        text = case["text"]
        findings = inspector.detector.scan(text)
        masked, _ = inspector.mask_text(text)
        labelled = [s for s in case["expect"]["spans"] if s["type"] in PATTERN_ENTITIES]
        for entity in PATTERN_ENTITIES:
            score = scores[entity]
            spans = [s for s in labelled if s["type"] == entity]
            reported = [f for f in findings if f.entity == entity]
            for span in spans:
                score.positives += 1
                score.values += 1
                hit = any(_overlaps(f, span["start"], span["end"]) for f in reported)
                score.found += hit
                if not hit:
                    score.misses.append(span["value"])
                score.leaked += span["value"] in masked
            if not spans:
                score.negatives += 1
                score.false_alarms += bool(reported)


def secret_cases(inspector: Inspector, cases: list[tuple[str, str, bool]], scores: dict[str, Score]) -> None:
    """(family, text, must_report) cases, scored per family (``PII_FAMILIES`` on their entity, the rest on
    any credential finding)."""
    categories = {r.id: r.rule.category for r in inspector.detector.rules}
    # A clean case of one family whose very text the suite labels a secret under another (the same
    # Anthropic key under the api and the admin rule; a GitHub token among GitLab's clean cases) cannot
    # be both: it is left out of the false positives and counted apart.
    secrets = {text for label, text, must in cases if must and label not in PII_FAMILIES}
    for label, text, must in cases:
        if not must and text in secrets and label not in PII_FAMILIES:
            scores[label].contradicted += 1
            continue
        findings = inspector.detector.scan(text)
        entity = PII_FAMILIES.get(label)
        if entity is None:
            reported = any(categories[f.rule_id] == "credential" for f in findings)
        else:
            reported = any(f.entity == entity for f in findings)
        score = scores[label]
        if must:
            score.positives += 1
            score.found += reported
            if not reported:
                score.misses.append(f"{label}: {text[:80]!r}")
        else:
            score.negatives += 1
            score.false_alarms += reported
            if reported:
                hits = ", ".join(sorted({f.rule_id for f in findings}))
                score.misses.append(f"{label} (clean, reported by {hits}): {text[:80]!r}")


def _target(scores: dict[str, Score]) -> tuple[dict[str, Any], list[str]]:
    """The suite's totals over the targeted families, and the line saying whether the targets are met."""
    total = Score()
    for family, score in scores.items():
        if family in UNTARGETED:
            continue
        total.positives += score.positives
        total.found += score.found
        total.negatives += score.negatives
        total.false_alarms += score.false_alarms
        total.contradicted += score.contradicted
    left_out = sorted(UNTARGETED & set(scores))
    row = total.row("**all families" + (f" but {' and '.join(left_out)}" if left_out else "") + "**")
    recall, fp = row["recall"] or 0.0, row["fp_rate"] or 0.0
    verdict = "met" if recall >= TARGET_RECALL and fp <= TARGET_FP else "missed"
    line = (
        f"Target recall >= {TARGET_RECALL:.0%} and FP rate <= {TARGET_FP:.0%}: {_fmt(recall)} "
        f"({total.found}/{total.positives}), {_fmt(fp)} ({total.false_alarms}/{total.negatives}): {verdict}"
    )
    if total.contradicted:
        line += (
            f". Left out of the clean cases: {total.contradicted} whose text the suite labels a secret "
            "under another family"
        )
    return row, [line, ""]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}" if value in (0, 1) else f"{value:.1%}"


def _table(title: str, rows: list[dict[str, Any]], column: str = "entity") -> list[str]:
    lines = [
        f"### {title}",
        "",
        f"| {column} | positives | recall | negatives | FP rate | leak rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['entity']} | {row['positives']} | {_fmt(row['recall'])} | {row['negatives']} "
            f"| {_fmt(row['fp_rate'])} | {_fmt(row['leak_rate'])} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--rules", type=Path, action="append")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--misses", action="store_true", help="list what was missed")
    parser.add_argument("--seed", type=int, default=corpus.SEED, help="the generated corpus's seed")
    parser.add_argument("--documents", type=int, default=corpus.DOCUMENTS, help="the generated corpus's size")
    args = parser.parse_args(argv)
    if not (args.corpora / "README.md").exists():
        print(f"eval: no corpora at {args.corpora} (pass --corpora DIR)", file=sys.stderr)
        return 2
    inspector = Inspector.build(
        load_rules(args.rules or [ROOT / "rules"]), hash_key=b"eval-hash-key-0123456789"
    )
    started = time.perf_counter()
    sections: dict[str, dict[str, Score]] = {}
    sections["Presidio recognizer tests (presidio-analyzer/tests)"] = scores = defaultdict(Score)
    presidio_cases(inspector, args.corpora / "presidio_recognizer_cases.jsonl", scores)
    sections["Presidio research synthetic sentences (1500)"] = scores = defaultdict(Score)
    presidio_synthetic(inspector, args.corpora / "presidio_research_synth_v2.jsonl", scores)
    sections[SECRET_SUITES[0]] = scores = defaultdict(Score)
    gitleaks = [
        (c["label"], c["text"], bool(c["expect"]["gitleaks_finding"]))
        for c in _read(args.corpora / "gitleaks_rule_samples.jsonl")
    ]
    secret_cases(inspector, gitleaks, scores)
    sections[SECRET_SUITES[1]] = scores = defaultdict(Score)
    detect_secrets = [
        (c["label"], c["text"], bool(c["expect"]["flag"]))
        for c in _read(args.corpora / "detect_secrets_plugin_cases.jsonl")
    ]
    secret_cases(inspector, detect_secrets, scores)
    documents = corpus.generate(args.seed, args.documents)
    generated = corpus.evaluate(inspector, documents)
    elapsed = time.perf_counter() - started

    report: dict[str, Any] = {}
    lines = [f"Detection quality of {len(inspector.detector.rules)} rules ({elapsed:.1f} s)", ""]
    for name, section in sections.items():
        rows = [score.row(entity) for entity, score in sorted(section.items(), key=lambda e: e[0].lower())]
        if name in SECRET_SUITES:
            total, target = _target(section)
            report[name] = {"families": rows, "total": total, "target": target[0]}
            lines += [*_table(name, [total, *rows], column="family")[:-1], "", *target]
        else:
            report[name] = rows
            lines += _table(name, rows)
    report["generated corpus"] = {
        "seed": args.seed,
        "documents": len(documents),
        "entities": [score.row(entity) for entity, score in generated.items()],
        "total": corpus.totals(generated).row("all entities"),
    }
    lines += corpus.markdown(generated, documents, args.seed)
    markdown = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "eval.md").write_text(markdown + "\n")
    print(markdown)
    if args.misses:
        for name, scores in sections.items():
            for entity, score in sorted(scores.items()):
                for miss in score.misses:
                    print(f"MISS {name[:20]} {entity}: {miss!r}")
        for entity, generated_score in generated.items():
            for miss in generated_score.misses:
                print(f"MISS generated corpus {entity}: {miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
