"""Masking: findings in, rewritten text out. Pure: no I/O, no protobuf.

Strategies (per rule, ``mask:`` in the rule file):

- ``redact``: ``[REDACTED:ENTITY]``;
- ``mask``: every letter and digit but the last ``keep`` becomes ``char``; separators stay
  (``**** **** **** 1111``);
- ``hash``: ``[ENTITY:<16 hex>]``, a keyed HMAC-SHA256 of the value as the rules read it (normalised):
  the same value always gives the same token, however it is written, so analytics still join, and
  nobody without the key can test a guess;
- ``remove``: nothing.

Replacements hold no quote, backslash or newline, so they are safe inside a JSON string and an SSE data
line. Characters outside findings are never touched. Overlapping findings merge into one span, masked
with the strategy of the first finding (earliest start, then longest).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from extproc.detect.engine import Detector, StreamScanner
from extproc.detect.normalize import normalize
from extproc.detect.rules import MaskSpec, RuleSet
from extproc.model import Finding

REDACT = MaskSpec()


def redaction(entity: str) -> str:
    return f"[REDACTED:{entity}]"


class Verdicts(Protocol):
    """A policy's say on each finding (``extproc.policy.FindingActions``): mask it (with the rule's
    strategy, or another), let it through, or refuse by raising."""

    def verdict(self, finding: Finding) -> Verdict: ...

    def refuses(self, finding: Finding) -> bool:
        """Whether ``verdict(finding)`` would refuse; nothing is recorded."""

    @property
    def may_refuse(self) -> bool:
        """Whether any finding at all could be refused."""


class Verdict(Protocol):
    @property
    def action(self) -> str: ...

    @property
    def strategy(self) -> MaskSpec | None: ...


class Masker:
    def __init__(
        self, specs: Mapping[str, MaskSpec], hash_key: bytes, verdicts: Verdicts | None = None
    ) -> None:
        self._specs = dict(specs)
        self._key = hash_key
        self._verdicts = verdicts

    def with_verdicts(self, verdicts: Verdicts) -> Masker:
        """This masker deciding with ``verdicts`` (one exchange's policy). The strategies are shared, not
        copied: a streamed answer keeps its masker for as long as it streams."""
        masker = copy.copy(self)
        masker._verdicts = verdicts
        return masker

    def replacement(self, finding: Finding, value: str, spec: MaskSpec | None = None) -> str:
        spec = spec or self._specs.get(finding.rule_id, REDACT)
        if spec.strategy == "redact":
            return redaction(finding.entity)
        if spec.strategy == "remove":
            return ""
        if spec.strategy == "hash":
            # of the value as the rules read it: the same value written with other digits, invisible
            # characters or look-alike letters gives the same token
            canonical = normalize(value).text
            digest = hmac.new(self._key, canonical.encode("utf-8", "surrogateescape"), hashlib.sha256)
            return f"[{finding.entity}:{digest.hexdigest()[:16]}]"
        return _keep_last(value, spec.keep, spec.char)

    def decide(self, finding: Finding) -> MaskSpec | None:
        """How ``finding`` is masked: the strategy, or None when the policy lets it through (a verdict that
        refuses raises)."""
        if self._verdicts is None:
            return self._specs.get(finding.rule_id, REDACT)
        verdict = self._verdicts.verdict(finding)
        if verdict.action != "mask":
            return None
        return verdict.strategy or self._specs.get(finding.rule_id, REDACT)

    def refuses(self, finding: Finding) -> bool:
        """Whether ``decide(finding)`` would raise; nothing is recorded."""
        return self._verdicts is not None and self._verdicts.refuses(finding)

    @property
    def may_refuse(self) -> bool:
        return self._verdicts is not None and self._verdicts.may_refuse

    def apply(self, text: str, findings: list[Finding]) -> str:
        """``text`` with ``findings`` masked. With verdicts, only the findings the policy masks are, each
        with the strategy it says; a verdict that refuses raises before anything is returned."""
        if not findings:
            return text
        overrides: dict[Finding, MaskSpec] = {}
        if self._verdicts is not None:
            kept = []
            for finding in findings:
                verdict = self._verdicts.verdict(finding)
                if verdict.action == "mask":
                    kept.append(finding)
                    if verdict.strategy is not None:
                        overrides[finding] = verdict.strategy
            findings = kept
            if not findings:
                return text
        ordered = sorted(findings, key=lambda f: (f.start, -f.end))
        parts: list[str] = []
        cursor = 0
        index = 0
        while index < len(ordered):
            first = ordered[index]
            start, end = max(first.start, cursor), first.end
            index += 1
            while index < len(ordered) and ordered[index].start < end:  # merge overlaps
                end = max(end, ordered[index].end)
                index += 1
            if end <= cursor:
                continue
            parts.append(text[cursor:start])
            parts.append(self.replacement(first, text[start:end], overrides.get(first)))
            cursor = end
        parts.append(text[cursor:])
        return "".join(parts)


def _keep_last(value: str, keep: int, char: str) -> str:
    remaining = keep
    out = []
    for symbol in reversed(value):
        if symbol.isalnum():
            if remaining > 0:
                remaining -= 1
                out.append(symbol)
            else:
                out.append(char)
        else:
            out.append(symbol)
    return "".join(reversed(out))


@dataclass(frozen=True)
class Inspector:
    """The detector and the masker together: what the body processors use."""

    detector: Detector
    masker: Masker

    @classmethod
    def build(
        cls,
        ruleset: RuleSet,
        *,
        hash_key: bytes,
        edm_key: bytes | None = None,
        cache_dir: Path | None = None,
    ) -> Inspector:
        detector = Detector(ruleset, edm_key=edm_key, cache_dir=cache_dir)
        masker = Masker({r.id: r.rule.mask for r in detector.rules}, hash_key)
        return cls(detector, masker)

    def scoped(self, verdicts: Verdicts) -> Inspector:
        """The same detector, masking as ``verdicts`` (one exchange's policy, one direction) says."""
        return Inspector(self.detector, self.masker.with_verdicts(verdicts))

    def mask_text(self, text: str, label: str | None = None) -> tuple[str, list[Finding]]:
        """``text`` masked, and its findings; ``label``: what names it (a JSON key, ``Detector.scan``)."""
        findings = self.detector.scan(text, label=label)
        return self.masker.apply(text, findings), findings

    def stream(self, label: str | None = None) -> StreamMasker:
        return StreamMasker(self.detector.stream(label), self.masker)


class StreamMasker:
    """Masks text that arrives in pieces; returns what may be released, masked. ``findings`` have
    offsets from the start of the stream."""

    def __init__(self, scanner: StreamScanner, masker: Masker) -> None:
        self._scanner = scanner
        self._masker = masker
        self._offset = 0
        self.findings: list[Finding] = []

    @property
    def held(self) -> int:
        return self._scanner.held

    def feed(self, text: str) -> str:
        return self._mask(*self._scanner.feed(text))

    def finish(self) -> str:
        return self._mask(*self._scanner.finish())

    def close(self) -> None:
        self._scanner.close()

    def _mask(self, text: str, findings: list[Finding]) -> str:
        offset = self._offset
        self._offset += len(text)
        self.findings.extend(findings)
        local = [f.at(f.start - offset, f.end - offset) for f in findings]
        return self._masker.apply(text, local)
