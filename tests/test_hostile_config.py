"""Hostile configuration files: rule files, policy files and settings written from random YAML, random
text, and mutations of the shipped ones (a key deleted, a type changed, a value made huge). Each loader
either loads the file or raises its own error (``RuleError``, ``PolicyError``, ``ConfigError``) whose
every problem names the file, and the line where the problem sits in a rule or a policy; never a
traceback of another type, never a load that does not end."""

import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.detect.rules import RuleError, load_rules
from extproc.errors import ConfigError
from extproc.policy import PolicyError, load_policies
from extproc.settings import load_settings
from extproc.yamlfiles import MAX_DEPTH, MAX_VALUES

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {
    "rules": REPO / "rules" / "pii.yaml",
    "policy": REPO / "rules" / "policies" / "default.yaml",
    "settings": REPO / "deploy" / "kubernetes" / "overlays" / "production" / "settings.yaml",
}
SECONDS = 10.0


def shipped(kind: str) -> str:
    """A shipped file's text; the settings with their placeholders filled in, as a deployment does."""
    return SHIPPED[kind].read_text(encoding="utf-8").replace("CHANGE-ME", "idp")


LOADERS: dict[str, Callable[[Path], object]] = {
    "rules": lambda path: load_rules([path]),
    "policy": lambda path: load_policies([path]),
    "settings": lambda path: load_settings(path),
}
ERRORS = (RuleError, PolicyError, ConfigError)


def problems_of(error: Exception) -> list[str]:
    if isinstance(error, RuleError | PolicyError):
        return error.problems
    return str(error).split("; ")


def outcome(kind: str, path: Path) -> Exception | None:
    """Loads ``path`` with the ``kind`` loader within the time bound: None when it loads, else its error,
    which must be the loader's own and name the file in every problem."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"loading still running after {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    start = time.monotonic()
    error: Exception | None = None
    try:
        LOADERS[kind](path)
    except ERRORS as caught:
        error = caught
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < SECONDS
    if error is not None:
        for problem in problems_of(error):
            named = problem.startswith(str(path)) or problem.startswith("settings") or "$EXTPROC_" in problem
            assert named, f"{problem!r} does not name {path}"
            if re.search(r": (rule|policy) '", problem):
                assert re.match(rf"{re.escape(str(path))}:\d+: ", problem), f"{problem!r} has no line"
    return error


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-config")


def write(folder: Path, name: str, data: str | bytes) -> Path:
    path = folder / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


# -- random YAML and random text ----------------------------------------------------------------------

KEYS = st.one_of(
    st.sampled_from(
        ["rules", "allow", "policies", "base", "id", "pattern", "entity", "samples", "limits", "server"]
    ),
    st.text(max_size=8),
    st.integers(),
    st.booleans(),
)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(LOADERS)), document=VALUES)
def test_any_yaml_document_loads_or_is_refused_naming_the_file(
    folder: Path, kind: str, document: Any
) -> None:
    path = write(folder, f"random-{kind}.yaml", yaml.safe_dump(document, allow_unicode=True))
    outcome(kind, path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(sorted(LOADERS)),
    data=st.one_of(
        st.binary(max_size=200), st.text(alphabet="ab:- []{}&*!|>'\"#\n\t%@`\x00\x85", max_size=120)
    ),
)
def test_any_text_loads_or_is_refused_naming_the_file(folder: Path, kind: str, data: str | bytes) -> None:
    path = write(folder, f"text-{kind}.yaml", data)
    outcome(kind, path)


# -- mutations of the shipped files ---------------------------------------------------------------------


def places(node: Any, trail: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value under ``node`` (keys and list indexes)."""
    yield trail
    if isinstance(node, dict):
        for key, value in node.items():
            yield from places(value, (*trail, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from places(value, (*trail, index))


HUGE = {
    "long string": "x" * 200_000,
    "huge integer": 10**40,
    # Long enough to be no list a file holds, short enough that each load stays well inside the bound:
    # PyYAML's pure-Python scanner reads 20,000 items in a second, and far slower under load.
    "long list": list(range(2_000)),
    "negative": -1,
    "float": 1e308,
}
OTHER_TYPES: list[Any] = [None, True, 0, "text", [], {}, ["a"], {"a": 1}, 2.5]


def mutate(document: Any, trail: tuple[Any, ...], operation: str, value: Any) -> Any:
    if not trail:
        return value
    parent = document
    for step in trail[:-1]:
        parent = parent[step]
    last = trail[-1]
    if operation == "delete":
        del parent[last]
    else:
        parent[last] = value
    return document


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(sorted(SHIPPED)),
    choice=st.data(),
    operation=st.sampled_from(["delete", "retype", "huge"]),
)
def test_a_shipped_file_with_one_value_deleted_retyped_or_made_huge_is_refused_or_loads(
    folder: Path, kind: str, choice: st.DataObject, operation: str
) -> None:
    document = yaml.safe_load(shipped(kind))
    trail = choice.draw(st.sampled_from(list(places(document))[1:]), label="where")
    value = choice.draw(
        st.sampled_from(OTHER_TYPES if operation == "retype" else list(HUGE.values())), label="value"
    )
    mutated = mutate(document, trail, operation, value)
    path = write(folder, f"mutated-{kind}.yaml", yaml.safe_dump(mutated, allow_unicode=True, width=1 << 20))
    outcome(kind, path)


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_the_shipped_files_load(folder: Path, kind: str) -> None:
    # the control: the mutations start from files that load
    assert outcome(kind, write(folder, f"shipped-{kind}.yaml", shipped(kind))) is None


# -- regressions ------------------------------------------------------------------------------------------

LAUGHS = "\n".join(
    [f"l0: &l0 [{', '.join(['lol'] * 10)}]"]
    + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 9)]
)  # 10**9 values once expanded, in 10 lines


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize(
    ("name", "data", "message", "line"),
    [
        ("not-utf8", b"rules:\n  - id: \xff\xfe\n", "not UTF-8 text", 2),
        ("deep", "rules: " + "[" * 5000 + "]" * 5000 + "\n", f"nested deeper than {MAX_DEPTH} levels", None),
        ("deep-within-the-parser", "a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than", None),
        ("alias-holding-itself", "rules:\n  - &r {id: a, again: *r}\n", "an alias holds itself", None),
        ("laughs", LAUGHS + "\nrules:\n  - {id: x, laugh: *l8}\n", f"more than {MAX_VALUES} values", None),
        ("number-keys", "rules: []\npolicies: []\n1: x\na: y\n", "", None),
    ],
)
def test_regression_hostile_yaml_is_a_problem_naming_the_file_not_a_traceback(
    folder: Path, kind: str, name: str, data: str | bytes, message: str, line: int | None
) -> None:
    # Each of these escaped the loaders as UnicodeDecodeError, RecursionError or TypeError (keys of
    # mixed types sorted together), or, for the aliases, made loading take minutes and gigabytes.
    path = write(folder, f"{name}-{kind}.yaml", data)
    error = outcome(kind, path)
    assert error is not None
    text = "\n".join(problems_of(error))
    assert message in text
    if line is not None:
        assert f"{path}:{line}: " in text


@pytest.mark.parametrize("data", ["", "# nothing yet\n", "base: {}\n"])
def test_regression_policy_files_with_no_policy_are_a_problem_not_an_index_error(
    folder: Path, data: str
) -> None:
    # An empty policy file (or one with a base only) raised IndexError: no policy, so no default one.
    error = outcome("policy", write(folder, "no-policy.yaml", data))
    assert isinstance(error, PolicyError)
    assert "exactly one policy must be the default" in str(error)
