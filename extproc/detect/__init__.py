"""Detection: text in, findings out. Pure: no I/O, no protobuf."""

from __future__ import annotations

from typing import Protocol

from extproc.model import Finding


class Scanner(Protocol):
    """Finds sensitive values in decoded text; findings carry character offsets into ``text``."""

    def scan(self, text: str) -> list[Finding]: ...
