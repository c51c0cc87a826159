"""The snapshot an exchange runs against: settings plus everything compiled from them.

A snapshot is immutable; a reload builds a new one and swaps it in, and each exchange keeps the snapshot
it started with."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.detect import Scanner
from extproc.detect.interim import InterimScanner
from extproc.settings import Settings


@dataclass(frozen=True, slots=True)
class Snapshot:
    settings: Settings
    scanner: Scanner


def build_snapshot(settings: Settings) -> Snapshot:
    return Snapshot(settings=settings, scanner=InterimScanner())


class Runtime:
    """Holds the current snapshot; ``swap`` replaces it atomically for new exchanges."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def swap(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
