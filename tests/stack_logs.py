"""The tail of a Stack's logs in the report of a test that failed with it (a pytest plugin).

A test that fails against a running Envoy, extproc and demo model most often fails for a reason one of
them logged: a refused config, an exception in extproc, the demo model's traceback. Their output goes to
one log file per Stack (``Stack.log_path``, each line prefixed with ``[envoy]``, ``[extproc]`` or
``[demo]``); the report of a failed test gets the last lines of each component, from every Stack the
test used: a fixture's value (or a tuple of them), or one started while the test ran.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any, Final

import pytest

from extproc.devenv import Stack

TAIL_LINES: Final = 40  # per component
_READ_BYTES: Final = 512 * 1024  # from the end of the file: enough for TAIL_LINES of each, and bounded
_PREFIX: Final = re.compile(r"^\[([\w.-]+)\] ")
_ORDER: Final = ("envoy", "extproc", "demo")

_started: list[Stack] = []  # every Stack started in this test session, in order
_started_key = pytest.StashKey[int]()  # how many were started when a test's setup began


def tail_by_component(path: Path, lines: int = TAIL_LINES) -> dict[str, list[str]]:
    """The last ``lines`` lines of each component in a Stack's log file, component by component (Envoy,
    extproc, the demo model, then any other in the order first seen); lines without a component prefix
    belong to the component of the line before. Empty when the file cannot be read."""
    try:
        with path.open("rb") as log:
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - _READ_BYTES))
            data = log.read()
    except OSError:
        return {}
    text = data.decode("utf-8", "replace").splitlines()
    if len(data) == _READ_BYTES and text:
        text = text[1:]  # the first line read may be cut
    found: dict[str, list[str]] = {}
    current = "?"
    for line in text:
        match = _PREFIX.match(line)
        if match is not None:
            current = match.group(1)
            line = line[match.end() :]
        found.setdefault(current, []).append(line)
    ordered = sorted(found, key=lambda name: _ORDER.index(name) if name in _ORDER else len(_ORDER))
    return {name: found[name][-lines:] for name in ordered}


def render(path: Path, lines: int = TAIL_LINES) -> str:
    """The report section's text: each component's tail under a heading."""
    parts = []
    for name, tail in tail_by_component(path, lines).items():
        parts.append(f"--- {name} (last {len(tail)} lines of {path}) ---")
        parts.extend(tail)
    return "\n".join(parts)


def _stacks_in(values: Iterable[Any]) -> Iterable[Stack]:
    for value in values:
        if isinstance(value, Stack):
            yield value
        elif isinstance(value, tuple | list):
            yield from (one for one in value if isinstance(one, Stack))


def stacks_of(item: pytest.Item) -> list[Stack]:
    """The Stacks a test used: its fixtures' values, and those started since its setup began."""
    funcargs = getattr(item, "funcargs", {}) or {}
    since = item.stash.get(_started_key, len(_started))
    found: dict[int, Stack] = {}
    for stack in [*_stacks_in(funcargs.values()), *_started[since:]]:
        found.setdefault(id(stack), stack)
    return list(found.values())


def pytest_configure(config: pytest.Config) -> None:
    patch = pytest.MonkeyPatch()
    original = Stack.start

    @functools.wraps(original)
    def start(self: Stack, *args: Any, **kwargs: Any) -> Stack:
        _started.append(self)  # noted first: a Stack whose start fails has the most to tell
        return original(self, *args, **kwargs)

    if not getattr(original, "_noted", False):
        start._noted = True  # type: ignore[attr-defined]
        patch.setattr(Stack, "start", start)
    config.stash[_patch_key] = patch


_patch_key = pytest.StashKey[pytest.MonkeyPatch]()


def pytest_unconfigure(config: pytest.Config) -> None:
    with contextlib.suppress(KeyError):
        config.stash[_patch_key].undo()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_started_key] = len(_started)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        seen: set[Path] = set()
        for stack in stacks_of(item):
            path = stack.log_path
            if path is None or path in seen:
                continue  # without a log file its output went to stderr, which the report shows already
            seen.add(path)
            text = render(path)
            if text:
                report.sections.append((f"Stack logs ({path.name})", text))
    return report
