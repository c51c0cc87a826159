"""The scan benchmark's comparison with another revision's pack reads the pack that revision holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import _rules_at
from bench.scan import _interleaved, markdown

ROOT = Path(__file__).resolve().parent.parent


def test_a_revision_is_written_out_and_a_folder_is_taken_as_it_is(tmp_path: Path) -> None:
    label, folder = _rules_at("HEAD", tmp_path)
    assert label == "HEAD"
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "rules").glob("*.yaml")
    )
    assert _rules_at(str(ROOT / "rules"), tmp_path) == (str(ROOT / "rules"), ROOT / "rules")


def test_an_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no-such-revision"):
        _rules_at("no-such-revision", tmp_path)


def test_interleaved_timing_reports_each_function_and_the_ratio_is_printed() -> None:
    calls: list[str] = []
    timed = _interleaved({"a": lambda t: calls.append("a"), "b": lambda t: calls.append("b")}, ["xx"] * 3, 2)
    assert calls[6:] == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3  # after the warm-up, round by round
    assert set(timed) == {"a", "b"}
    result = {"mb_per_s": 2.0, "p50_us": 1.0, "p99_us": 1.0}
    report = {
        "rules": 3,
        "compile_s": 0.1,
        "messages": 1,
        "message_bytes": 2048,
        "paths": {"engine (block)": result},
        "compared": {
            "label": "v1",
            "rules": 2,
            "messages": {"today": result, "v1": {**result, "mb_per_s": 4.0}},
            "mixed text": {"today": result, "v1": result},
        },
        "exact_lists": {
            "entries": 1,
            "literal": {**result, "compile_s": 0.1},
            "hashed": {**result, "compile_s": 0.1},
        },
    }
    assert "| messages | 2.0 | 4.0 | 0.50x |" in markdown(report)
