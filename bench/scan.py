"""Scan throughput of the default rule pack, against baselines measured in the same run.

  engine (block)   Hyperscan candidates + Python confirmation, whole message, on its normalised view
  ... view skipped  the same without building the normalised view (what the engine cost before it)
  engine (stream)  the same message fed in 16-character pieces, as a token stream arrives
  engine (subset)  the engine with only the rules for the entities Presidio's recognizers cover
  python re        every rule's Python pattern run with finditer over the message (no validators)
  presidio         Presidio's pattern recognizers for those entities (if installed)

Messages are 2 KiB of chat-like text with a few planted values; the "mixed" ones also hold words of
other scripts, no-break spaces and planted values written with other digits and invisible characters,
so their view differs from the text (the costly case of normalisation). Also measured: an exact-match list of
100,000 values (literal and hashed): compile time and throughput.

With ``--scan-against REV`` (a git revision or a rules folder), the pack as it was there is timed on the
same messages, round for round interleaved with today's, so a change to the pack is read as a ratio.
"""

from __future__ import annotations

import random
import statistics
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from extproc.detect.engine import hash_value
from extproc.detect.rules import RuleSet, load_rules
from extproc.mask import Inspector

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "the",
    "model",
    "should",
    "summarise",
    "quarterly",
    "revenue",
    "for",
    "the",
    "support",
    "team",
    "and",
    "draft",
    "a",
    "reply",
    "to",
    "the",
    "customer",
    "about",
    "their",
    "order",
    "status",
    "please",
    "include",
    "shipping",
    "dates",
    "refund",
    "policy",
    "and",
    "next",
    "steps",
    "for",
    "escalation",
    "meeting",
    "notes",
    "from",
    "tuesday",
    "mention",
    "latency",
    "budgets",
    "deployment",
    "windows",
    "and",
    "the",
    "incident",
    "review",
]
PLANTS = [
    "jane.doe@example.com",
    "4111 1111 1111 1111",
    "GB82 WEST 1234 5698 7654 32",
    "10.20.30.40",
    "+1 (415) 555-0132",
    "536-22-8726",
]
MESSAGE_BYTES = 2048
PRESIDIO_ENTITIES = frozenset({"CREDIT_CARD", "EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "CRYPTO"})


MIXED_WORDS = ["Grüße", "naïve", "café", "東京", "Ελλάδα", "Москва", "\u00a0", "–", "“quoted”"]


def _disguised(value: str, rng: random.Random) -> str:
    """``value`` with fullwidth digits and a zero-width space, as a sender hiding it writes it."""
    value = "".join(chr(ord(c) + 0xFEE0) if c.isdigit() and rng.random() < 0.5 else c for c in value)
    cut = rng.randrange(1, len(value))
    return value[:cut] + "\u200b" + value[cut:]


def messages(count: int, seed: int = 7, mixed: bool = False) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words: list[str] = []
        size = 0
        while size < MESSAGE_BYTES:
            if rng.random() < 0.01:
                word = rng.choice(PLANTS)
                word = _disguised(word, rng) if mixed else word
            elif mixed and rng.random() < 0.2:
                word = rng.choice(MIXED_WORDS)
            else:
                word = rng.choice(WORDS)
            words.append(word)
            size += len(word) + 1
        out.append(" ".join(words)[:MESSAGE_BYTES])
    return out


def _time(function: Callable[[str], object], texts: list[str], rounds: int) -> dict[str, float]:
    for text in texts[:20]:
        function(text)  # warm-up
    latencies = []
    total = 0
    began = time.perf_counter()
    for _ in range(rounds):
        for text in texts:
            started = time.perf_counter()
            function(text)
            latencies.append(time.perf_counter() - started)
            total += len(text)
    elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "mb_per_s": total / elapsed / 1e6,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(0.99 * (len(latencies) - 1))] * 1e6,
    }


def _interleaved(
    functions: dict[str, Callable[[str], object]], texts: list[str], rounds: int
) -> dict[str, dict[str, float]]:
    """``_time`` for several functions, taking turns round by round: a machine that slows down for a while
    slows them all."""
    for function in functions.values():
        for text in texts[:20]:
            function(text)  # warm-up
    latencies: dict[str, list[float]] = {name: [] for name in functions}
    elapsed = dict.fromkeys(functions, 0.0)
    for _ in range(rounds):
        for name, function in functions.items():
            began = time.perf_counter()
            for text in texts:
                started = time.perf_counter()
                function(text)
                latencies[name].append(time.perf_counter() - started)
            elapsed[name] += time.perf_counter() - began
    total = sum(len(text) for text in texts) * rounds
    out = {}
    for name, times in latencies.items():
        times.sort()
        out[name] = {
            "mb_per_s": total / elapsed[name] / 1e6,
            "p50_us": statistics.median(times) * 1e6,
            "p99_us": times[int(0.99 * (len(times) - 1))] * 1e6,
        }
    return out


def _stream(inspector: Inspector) -> Callable[[str], object]:
    def run(text: str) -> None:
        scanner = inspector.detector.stream()
        for start in range(0, len(text), 16):
            scanner.feed(text[start : start + 16])
        scanner.finish()

    return run


def _python_re(inspector: Inspector) -> Callable[[str], object]:
    patterns = [r.regex for r in inspector.detector.rules if r.regex is not None]

    def run(text: str) -> int:
        return sum(1 for pattern in patterns for _ in pattern.finditer(text))

    return run


def _presidio() -> Callable[[str], object] | None:
    try:
        from presidio_analyzer.predefined_recognizers import (  # type: ignore[import-not-found]
            CreditCardRecognizer,
            CryptoRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            UsSsnRecognizer,
        )
    except ImportError:
        return None
    recognizers = [
        CreditCardRecognizer(),
        EmailRecognizer(),
        IbanRecognizer(),
        IpRecognizer(),
        UsSsnRecognizer(),
        CryptoRecognizer(),
    ]

    def run(text: str) -> int:
        return sum(
            len(r.analyze(text, entities=r.supported_entities, nlp_artifacts=None)) for r in recognizers
        )

    return run


def exact_lists(texts: list[str], entries: int = 100_000) -> dict[str, Any]:
    rng = random.Random(11)
    values = sorted(
        {
            "".join(rng.choices(string.ascii_uppercase, k=3)) + f"-{rng.randrange(10**6):06d}"
            for _ in range(entries)
        }
    )
    key = b"bench-edm-key-0123456789"
    planted = [t[:1000] + f" customer {values[i % len(values)]} " + t[1000:] for i, t in enumerate(texts)]
    result: dict[str, Any] = {"entries": len(values)}
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "plain.txt").write_text("\n".join(values))
        (base / "hashed.txt").write_text("\n".join(hash_value(key, v.lower()) for v in values))
        for mode, spec in (
            ("literal", "{file: plain.txt}"),
            ("hashed", "{file: hashed.txt, hashed: true, token: '[A-Z]{3}-[0-9]{6}'}"),
        ):
            (base / "rules.yaml").write_text(
                "rules:\n- id: customers\n  entity: CUSTOMER_ID\n  category: confidential\n  severity: high\n"
                f"  exact: {spec}\n  samples: {{match: ['{values[0]}'], no_match: ['AAA-0000000']}}\n"
            )
            began = time.perf_counter()
            inspector = Inspector.build(load_rules([base / "rules.yaml"]), hash_key=key, edm_key=key)
            compile_s = time.perf_counter() - began
            found = sum(len(inspector.detector.scan(t)) for t in planted[:50])
            result[mode] = {
                "compile_s": compile_s,
                "found_in_50": found,
                **_time(inspector.detector.scan, planted, 1),
            }
    return result


def run(rounds: int = 3, count: int = 300, against: tuple[str, Path] | None = None) -> dict[str, Any]:
    """``against``: a label and a rules folder, timed beside today's pack (``--scan-against``)."""
    texts = messages(count)
    began = time.perf_counter()
    inspector = Inspector.build(load_rules([ROOT / "rules"]), hash_key=b"bench-hash-key-0123456789")
    compile_s = time.perf_counter() - began
    ruleset = load_rules([ROOT / "rules"])
    same = RuleSet(tuple(r for r in ruleset.rules if r.rule.entity in PRESIDIO_ENTITIES), ruleset.sources)
    presidio_like = Inspector.build(same, hash_key=b"bench-hash-key-0123456789")
    mixed = messages(count, mixed=True)
    paths: dict[str, Callable[[str], object] | None] = {
        "engine (block)": inspector.detector.scan,
        "engine (block), view skipped": inspector.detector._scan_view,
        f"engine (block), {len(same.rules)} rules for Presidio's entities": presidio_like.detector.scan,
        "engine (stream, 16-char pieces)": _stream(inspector),
        "python re, same patterns": _python_re(inspector),
        "presidio pattern recognizers": _presidio(),
    }
    results = {name: _time(fn, texts, rounds) for name, fn in paths.items() if fn is not None}
    mixed_paths: dict[str, Callable[[str], object]] = {
        "engine (block), mixed text": inspector.detector.scan,
        "engine (block), mixed text, view skipped": inspector.detector._scan_view,
        "engine (stream, 16-char pieces), mixed text": _stream(inspector),
    }
    results.update({name: _time(fn, mixed, rounds) for name, fn in mixed_paths.items()})
    compared: dict[str, Any] | None = None
    if against is not None:
        label, folder = against
        other = Inspector.build(load_rules([folder]), hash_key=b"bench-hash-key-0123456789")
        compared = {"label": label, "rules": len(other.detector.rules)}
        for kind, corpus in (("messages", texts), ("mixed text", mixed)):
            pair = {"today": inspector.detector.scan, label: other.detector.scan}
            compared[kind] = _interleaved(pair, corpus, max(rounds, 5))
    return {
        "compared": compared,
        "rules": len(inspector.detector.rules),
        "compile_s": compile_s,
        "message_bytes": MESSAGE_BYTES,
        "messages": count * rounds,
        "paths": results,
        "exact_lists": exact_lists(texts),
    }


def markdown(report: dict[str, Any]) -> str:
    paths = report["paths"]
    base = paths["engine (block)"]
    lines = [
        f"Scan throughput: {report['rules']} rules (compiled in {report['compile_s']:.2f} s), "
        f"{report['messages']} messages of {report['message_bytes']} B",
        "",
        "| path | MB/s | p50 µs | p99 µs | p50 time vs engine (block) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, result in paths.items():
        lines.append(
            f"| {name} | {result['mb_per_s']:.1f} | {result['p50_us']:.0f} | {result['p99_us']:.0f} "
            f"| {result['p50_us'] / base['p50_us']:.1f}x |"
        )
    compared = report.get("compared")
    if compared:
        label = compared["label"]
        lines += [
            "",
            f"Today's pack ({report['rules']} rules) against the pack at {label} "
            f"({compared['rules']} rules), block mode, interleaved:",
            "",
            f"| messages | MB/s today | MB/s at {label} | today / {label} |",
            "|---|---:|---:|---:|",
        ]
        for kind in ("messages", "mixed text"):
            today, then = compared[kind]["today"], compared[kind][label]
            lines.append(
                f"| {kind} | {today['mb_per_s']:.1f} | {then['mb_per_s']:.1f} "
                f"| {today['mb_per_s'] / then['mb_per_s']:.2f}x |"
            )
    exact = report["exact_lists"]
    lines += [
        "",
        f"Exact-match list of {exact['entries']} values:",
        "",
        "| mode | compile s | MB/s | p50 µs | p99 µs |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("literal", "hashed"):
        r = exact[mode]
        lines.append(
            f"| {mode} | {r['compile_s']:.2f} | {r['mb_per_s']:.1f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} |"
        )
    return "\n".join(lines) + "\n"
