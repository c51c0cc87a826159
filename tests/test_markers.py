"""The markers stay honest: every test is exactly one of unit, envoy and process (tests/markers.py), and
the rule reads what a test starts through the helpers it calls."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import soak
from extproc.devenv import Stack

from .conftest import SLOW, start_stack
from .markers import KINDS, starts


def test_every_test_collected_is_exactly_one_of_unit_envoy_and_process(
    request: pytest.FixtureRequest,
) -> None:
    items = request.session.items
    assert items
    wrong = {
        item.nodeid: kinds
        for item in items
        if len(kinds := [kind for kind in KINDS if item.get_closest_marker(kind) is not None]) != 1
    }
    assert wrong == {}, "mark these unit, envoy or process (tests/markers.py says how the rule decides)"


def test_every_name_in_the_slow_list_is_a_test() -> None:
    tests = Path(__file__).parent
    missing = []
    for nodeid in sorted(SLOW):
        path, _, name = nodeid.partition("::")
        source = tests.parent / path
        names = (
            {
                n.name
                for n in ast.walk(ast.parse(source.read_text()))
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            if source.exists()
            else set()
        )
        if name not in names:
            missing.append(nodeid)
    assert missing == []


# What the rule sees: code samples, never run.


def _runs_a_command() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def _via_a_helper() -> None:
    _runs_a_command()


def _starts_a_stack(path: Path) -> None:
    start_stack(path).stop()


def _builds_a_stack_and_starts_it(path: Path) -> None:
    Stack(log_path=path).start()


def _builds_a_stack_only(path: Path) -> Any:
    return Stack(log_path=path).extproc_settings_file()


async def _starts_a_browser() -> None:
    import asyncio

    await asyncio.create_subprocess_exec("true")


def _in_process() -> int:
    return sum(range(3))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (_runs_a_command, {"process"}),
        (_via_a_helper, {"process"}),
        (_starts_a_stack, {"envoy"}),
        (_builds_a_stack_and_starts_it, {"envoy"}),
        (_builds_a_stack_only, set()),
        (_starts_a_browser, {"process"}),
        (_in_process, set()),
        (lambda: _via_a_helper(), {"process"}),
    ],
)
def test_the_rule_follows_the_helpers_a_test_calls(code: Any, expected: set[str]) -> None:
    assert starts(code) == expected


@pytest.mark.unit
def test_a_unit_test_that_starts_a_process_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="a test marked unit started a process"):
        subprocess.run(["true"], check=True)


def _runs_the_soak() -> None:
    soak.main([])


def test_the_rule_follows_a_function_called_through_its_module() -> None:
    assert "envoy" in starts(_runs_the_soak)  # it runs commands too: envoy wins
