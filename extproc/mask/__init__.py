"""Masking: findings in, rewritten text out. Pure: no I/O, no protobuf."""

from __future__ import annotations

from extproc.detect import Scanner
from extproc.model import Finding


def redaction(entity: str) -> str:
    """The replacement for one value. It holds no quote, backslash or newline, so it is safe inside a JSON
    string and an SSE data line, and no detector matches it, so masking is idempotent."""
    return f"[REDACTED:{entity}]"


def redact(text: str, findings: list[Finding]) -> str:
    """Replace every finding's span; overlapping findings merge into one replacement (the first entity).

    Characters outside the findings are left exactly as they were."""
    if not findings:
        return text
    ordered = sorted(findings, key=lambda f: (f.start, -f.end))
    parts: list[str] = []
    cursor = 0
    for finding in ordered:
        if finding.end <= cursor:
            continue
        if finding.start >= cursor:
            parts.append(text[cursor : finding.start])
            parts.append(redaction(finding.entity))
        cursor = finding.end
    parts.append(text[cursor:])
    return "".join(parts)


def mask_text(text: str, scanner: Scanner) -> tuple[str, list[Finding]]:
    findings = scanner.scan(text)
    return redact(text, findings), findings
