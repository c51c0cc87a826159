"""A failed test's report shows the tail of its Stack's logs (tests/stack_logs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .stack_logs import render, tail_by_component


def test_the_tail_is_grouped_by_component_envoy_first(tmp_path: Path) -> None:
    log = tmp_path / "stack.log"
    lines = [f"[demo] demo {n}\n" for n in range(3)]
    lines += [f"[extproc] extproc {n}\n" for n in range(60)]
    lines += [
        "[envoy] envoy starts\n",
        "  a continuation\n",
        "[extproc] Traceback (most recent call last):\n",
    ]
    log.write_text("".join(lines))
    tails = tail_by_component(log, lines=5)
    assert list(tails) == ["envoy", "extproc", "demo"]
    assert tails["envoy"] == ["envoy starts", "  a continuation"]
    assert tails["extproc"] == [
        *(f"extproc {n}" for n in range(56, 60)),
        "Traceback (most recent call last):",
    ]
    assert tails["demo"] == ["demo 0", "demo 1", "demo 2"]
    assert render(log, lines=1).splitlines() == [
        f"--- envoy (last 1 lines of {log}) ---",
        "  a continuation",
        f"--- extproc (last 1 lines of {log}) ---",
        "Traceback (most recent call last):",
        f"--- demo (last 1 lines of {log}) ---",
        "demo 2",
    ]


def test_a_log_that_is_not_there_gives_nothing(tmp_path: Path) -> None:
    assert tail_by_component(tmp_path / "missing.log") == {}
    assert render(tmp_path / "missing.log") == ""


def test_a_long_log_is_read_from_its_end_only(tmp_path: Path) -> None:
    log = tmp_path / "stack.log"
    log.write_text("".join(f"[extproc] line {n} {'x' * 80}\n" for n in range(20000)))
    assert tail_by_component(log, lines=2)["extproc"] == [f"line {n} {'x' * 80}" for n in (19998, 19999)]


INNER = """
from pathlib import Path

import pytest

from extproc.devenv import Stack


@pytest.fixture
def stack(tmp_path):
    running = Stack(log_path=tmp_path / "stack.log")  # never started: its log is what counts here
    running._sink.write("[envoy] listener llm_ingress ready\\n[extproc] a clue from extproc\\n")
    running._sink.flush()
    yield running
    running.stop()


def test_fails(stack):
    assert False, "the test's own message"


def test_passes(stack):
    pass


def test_fails_without_a_stack():
    assert False
"""


def test_a_failed_test_that_used_a_stack_reports_the_tail_of_its_logs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    args = [
        "-p",
        "tests.stack_logs",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    ]
    result = pytester.runpytest_inprocess(*args)
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert out.count("Stack logs (stack.log)") == 1  # test_fails alone: not the passing one, nor the other
    assert "--- envoy (last 1 lines of" in out
    assert "listener llm_ingress ready" in out
    assert "a clue from extproc" in out
