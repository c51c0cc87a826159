"""A small built-in scanner (email addresses and Luhn-valid card numbers) that carries the request path
until the rule-driven Hyperscan engine replaces it."""

from __future__ import annotations

import re

from extproc.model import Finding

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}")
# 13 to 19 digits, optionally grouped by single spaces or dashes, not glued to other digits.
_CARD = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


class InterimScanner:
    """Email addresses (``EMAIL_ADDRESS``) and payment card numbers that pass Luhn (``CREDIT_CARD``)."""

    def scan(self, text: str) -> list[Finding]:
        findings = [
            Finding("email-address", "EMAIL_ADDRESS", m.start(), m.end()) for m in _EMAIL.finditer(text)
        ]
        for match in _CARD.finditer(text):
            digits = re.sub(r"[ -]", "", match.group())
            if 13 <= len(digits) <= 19 and luhn_valid(digits):
                findings.append(Finding("credit-card", "CREDIT_CARD", match.start(), match.end()))
        findings.sort(key=lambda f: (f.start, f.end))
        return findings
