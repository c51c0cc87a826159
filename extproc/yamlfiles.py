"""Reading the YAML of configuration files (settings, rules, policies) with bounds, so that any file ends
in a problem naming its file and line, never in a traceback or a start-up that never ends.

``yaml.safe_load`` alone lets three things through: bytes that are not UTF-8 (``UnicodeDecodeError``),
nesting deep enough to exhaust Python's recursion (``RecursionError``, in the parser or in any walk of the
document afterwards), and aliases that expand a few lines into millions of values or into a cycle (the
"billion laughs": the document is small, every walk of it is not). Here each is a ``YamlProblem``.
"""

from __future__ import annotations

from typing import Any, Final

import yaml

MAX_DEPTH: Final = 64
"""Deepest nesting of mappings and lists; the shipped files nest 8 levels at most."""

MAX_VALUES: Final = 100_000
"""Most values a document may hold once its aliases are expanded; the largest shipped rule file holds
about 2,000."""


class YamlProblem(ValueError):
    """Why a configuration file cannot be read, and on which 1-based line when that is known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line

    def where(self, path: object) -> str:
        """``path:line`` (or ``path`` alone when the line is not known)."""
        return f"{path}:{self.line}" if self.line is not None else str(path)


def decode(data: bytes) -> str:
    """``data`` as UTF-8 text; a YamlProblem at the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlProblem(f"not UTF-8 text (byte {data[exc.start]:#04x})", line) from None


def load(text: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader) -> Any:
    """The YAML document in ``text``, read by ``loader`` (a SafeLoader), within ``MAX_DEPTH`` and
    ``MAX_VALUES``. Raises YamlProblem."""
    try:
        document = yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader or a subclass of it
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise YamlProblem(f"invalid YAML: {problem}", mark.line + 1 if mark is not None else None) from None
    except RecursionError:
        raise YamlProblem(f"invalid YAML: nested deeper than {MAX_DEPTH} levels") from None
    check_size(document)
    return document


def check_size(document: Any) -> None:
    """Raises YamlProblem when ``document`` nests deeper than ``MAX_DEPTH`` or holds more than
    ``MAX_VALUES`` values, counting each use of an alias anew (a cycle never ends, and is refused at the
    depth limit). Iterative, and stops at the first bound passed."""
    values = 0
    stack: list[tuple[Any, int]] = [(document, 0)]
    while stack:
        node, depth = stack.pop()
        values += 1
        if values > MAX_VALUES:
            raise YamlProblem(
                f"the document holds more than {MAX_VALUES} values once its aliases are expanded"
            )
        if isinstance(node, dict | list):
            if depth >= MAX_DEPTH:
                raise YamlProblem(f"nested deeper than {MAX_DEPTH} levels (or an alias holds itself)")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
