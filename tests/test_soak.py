"""`make soak` runs on a clean clone, and its bar is the one it states: no unexpected outcome, flat memory,
an intact session record."""

from __future__ import annotations

import json
from pathlib import Path

from bench import soak


def test_a_short_soak_sends_every_kind_and_holds_the_bar(tmp_path: Path) -> None:
    status = soak.main(["--minutes", "2", "--window-seconds", "4", "--rate", "9", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "soak-latest.json").read_text())
    assert report["unexpected"] == []
    assert status == 0
    assert [row["window"] for row in report["windows"]] == [1, 2]
    assert set(report["windows"][-1]["per_kind_p50_ms"]) == set(
        soak.KINDS
    )  # every kind was sent and answered
    assert all(row["rss_mib"]["extproc"] > 0 and row["rss_mib"]["envoy"] > 0 for row in report["windows"])
    assert report["record_intact"]
    assert "The bar held." in (tmp_path / "soak-latest.md").read_text()


def _window(kind: str, problem: str | None, extproc_mib: float) -> soak.Window:
    window = soak.Window([soak.Outcome(kind, 0.01, problem)])
    window.rss = {"extproc": int(extproc_mib * 2**20), "envoy": 50 << 20}
    return window


def test_the_bar_fails_on_an_unexpected_answer_on_growing_memory_and_on_requests_not_sent() -> None:
    steady = [_window("chat json", None, 100), _window("chat json", None, 110)]
    assert soak.summary(steady, 10, 60)["held"]
    leaked = [_window("chat json", None, 100), _window("chat json", "planted value in clear", 100)]
    assert not soak.summary(leaked, 10, 60)["held"]
    growing = [_window("chat json", None, 100), _window("chat json", None, 120)]  # > 10% + 8 MiB
    report = soak.summary(growing, 10, 60)
    assert not report["memory_flat"]
    assert "GROWING" in soak.markdown(report)
    overloaded = [_window("chat json", None, 100), _window("chat json", None, 100)]
    overloaded[1].skipped = 3
    assert not soak.summary(overloaded, 10, 60)["held"]


def test_a_planted_value_in_clear_is_a_problem_and_a_masked_one_is_not() -> None:
    assert soak._leaked(f"card {soak.CARD}") is not None
    assert soak._leaked("card 4111111111111111") is not None
    assert soak._leaked("card **** **** **** 1111, mail [REDACTED:EMAIL_ADDRESS]") is None
