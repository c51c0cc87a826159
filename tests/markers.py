"""What a test starts, decided from its code: the ``unit``, ``envoy`` and ``process`` markers.

A test is marked by what it (or a fixture it uses, or a helper either calls) starts:

- ``envoy``: an ``extproc.devenv.Stack`` is started (Envoy, extproc and the demo model as processes):
  ``start_stack``, ``devenv.running``, or a Stack class whose ``start`` is called.
- ``process``: another process, and no Stack: ``subprocess`` (the CLI as a command, ``envoy --mode
  validate``, kubectl), ``asyncio.create_subprocess_*`` (Chromium), ``RedisServer`` (redis-server).
- ``unit``: neither: the test runs in the pytest process alone. An in-process gRPC server, the OTLP
  receiver (a thread) and sockets on loopback count as in process.

The code is read, not run: the names a function's code refers to, resolved in its module, followed into
every function and class defined under ``tests`` (helpers, fixtures' helpers) and ``bench`` (run in
process by some tests). A mark written on the test
wins over the rule (for what a name cannot show, as a fixture asked for by ``request.getfixturevalue``),
and ``unit`` tests are also watched while they run (``conftest.no_process_in_unit_tests``): a unit test
that starts a process fails, so the rule cannot silently drift.
"""

from __future__ import annotations

import inspect
import subprocess
import types
from collections.abc import Iterator
from typing import Any, Final

import pytest

from extproc import devenv

KINDS: Final = ("unit", "envoy", "process")
_SUBPROCESS_CALLS: Final = frozenset({"create_subprocess_exec", "create_subprocess_shell"})


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """A function's code and the code nested in it (inner functions, lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _functions_of(obj: Any) -> Iterator[Any]:
    """The Python functions behind a function, a method, a fixture or a class (its methods, and those of
    the bases it has under ``tests`` or ``bench``)."""
    if isinstance(obj, type):
        for klass in obj.__mro__:
            if klass.__module__.split(".")[0] not in _FOLLOWED:
                continue
            for member in vars(klass).values():
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    yield member
        return
    obj = inspect.unwrap(getattr(obj, "__func__", obj))
    if inspect.isfunction(obj):
        yield obj


_FOLLOWED: Final = frozenset({"tests", "bench"})  # the suite, and the benchmarks some tests run in process


def _ours(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in _FOLLOWED and (inspect.isfunction(obj) or isinstance(obj, type))


def starts(*roots: Any) -> set[str]:
    """What the code of ``roots`` starts, followed through what it calls under ``tests`` and ``bench``: a
    subset of {"envoy", "process"}."""
    found: set[str] = set()
    seen: set[int] = set()
    todo = [function for root in roots for function in _functions_of(root)]
    while todo:
        function = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        names: set[str] = set()
        for code in _codes(function.__code__):
            names.update(code.co_names)
        globals_ = function.__globals__
        stack_classes = False
        for name in names:
            if name in _SUBPROCESS_CALLS:
                found.add("process")
            value = globals_.get(name)
            if value is None:
                continue
            if value is subprocess or value is subprocess.Popen or value is subprocess.run:
                found.add("process")
            elif value is devenv.running or getattr(value, "__name__", None) == "start_stack":
                found.add("envoy")
            elif isinstance(value, type) and issubclass(value, devenv.Stack):
                stack_classes = True
            if _ours(value) and not (isinstance(value, type) and issubclass(value, devenv.Stack)):
                todo.extend(_functions_of(value))
            elif isinstance(value, types.ModuleType):  # ``soak.main(...)``, ``devenv.Stack(...)``
                if value is devenv and ("running" in names or ("Stack" in names and "start" in names)):
                    found.add("envoy")
                elif value.__name__.split(".")[0] in _FOLLOWED:
                    for attribute in names:
                        member = getattr(value, attribute, None)
                        if _ours(member):
                            todo.extend(_functions_of(member))
        if stack_classes and "start" in names:
            found.add("envoy")
    return found


def kind_of(item: pytest.Item) -> str:
    """``envoy``, ``process`` or ``unit`` for one collected test, by the rule above."""
    roots: list[Any] = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        for name in info.names_closure:
            for definition in info.name2fixturedefs.get(name, ()):
                # Fixtures of the suite only (pytest's and plugins' start nothing), and not the guard
                # that watches unit tests for processes.
                if name != "no_process_in_unit_tests" and _ours(inspect.unwrap(definition.func)):
                    roots.append(definition.func)
    found = starts(*(root for root in roots if root is not None))
    if "envoy" in found:
        return "envoy"
    if "process" in found:
        return "process"
    return "unit"


def explicit_kinds(item: pytest.Item) -> set[str]:
    return {kind for kind in KINDS if item.get_closest_marker(kind) is not None}


def mark(items: list[pytest.Item]) -> None:
    """Adds the kind the rule decides to every test that has none written on it."""
    for item in items:
        if not explicit_kinds(item):
            item.add_marker(kind_of(item))
