"""Detection rules: the YAML schema and the loader.

A rule file holds ``rules:``, a list of rules. Every problem found while loading names the file, the
line of the rule and its id; all problems of all files are reported together.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from extproc import yamlfiles
from extproc.detect.validators import VALIDATORS

# Python `re` confirms what Hyperscan finds; both read \d, \w, \s and \b as ASCII.
RE_FLAGS = re.ASCII
_KEBAB = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
_ENTITY = r"^[A-Z][A-Z0-9_]*$"
UNBOUNDED = 1 << 32


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskSpec(_Model):
    """How a finding is rewritten: ``redact`` ([REDACTED:ENTITY]), ``mask`` (keep the last ``keep``
    characters), ``hash`` (keyed HMAC-SHA256 token), ``remove`` (nothing)."""

    strategy: Literal["redact", "mask", "hash", "remove"] = "redact"
    keep: int = Field(4, ge=0, le=16)
    char: str = Field("*", min_length=1, max_length=1)


def _mask_spec(value: object) -> object:
    return {"strategy": value} if isinstance(value, str) else value


class Samples(_Model):
    match: list[str] = Field(min_length=1)
    no_match: list[str] = Field(min_length=1)


class ExactList(_Model):
    """Exact-data match against a file of confidential values (one per line, ``#`` comments).

    ``hashed: false``: the values are compiled into the matcher as literals. ``hashed: true``: the file
    holds HMAC-SHA256 hex digests of the values (``extproc rules hash-list`` makes it), so no plaintext
    sits on disk; candidate tokens (``token``) are hashed with the same key and looked up."""

    file: str
    hashed: bool = False
    case_sensitive: bool = False
    token: str = r"[A-Za-z0-9][A-Za-z0-9_.@:-]{2,63}"  # noqa: S105 - a pattern, not a password


class Rule(_Model):
    id: str = Field(pattern=_KEBAB, max_length=64)
    entity: str = Field(pattern=_ENTITY)
    category: Literal["pii", "credential", "confidential"]
    severity: Literal["low", "medium", "high", "critical"]
    description: str = ""
    pattern: str | None = None
    # A cheaper pattern for Hyperscan alone: every match of `pattern` must end where one of `candidate`
    # ends (e.g. only the domain part of an e-mail address). `rules check` verifies it on the samples.
    candidate: str | None = None
    group: int | str = 0
    case_insensitive: bool = False
    keywords: list[str] = Field(default_factory=list)
    keyword_window: int = Field(64, ge=0, le=256)
    validator: str | None = None
    min_entropy: float | None = Field(None, ge=0, le=8)
    allow: list[str] = Field(default_factory=list)
    # A Python regex searched in the text just before the value (up to NOT_AFTER_CHARS characters, `$`
    # at the value's start): a hit drops the finding. Context no Hyperscan pattern may look back at
    # without lookbehind (a card's digits right after an IBAN's country code and check digits).
    not_after: str | None = None
    max_length: int | None = Field(None, ge=1)
    mask: Annotated[MaskSpec, BeforeValidator(_mask_spec)] = MaskSpec()
    exact: ExactList | None = None
    enabled: bool = True
    samples: Samples

    @model_validator(mode="after")
    def _check(self) -> Rule:
        if (self.pattern is None) == (self.exact is None):
            raise ValueError("a rule has exactly one of `pattern` or `exact`")
        if self.candidate is not None and self.pattern is None:
            raise ValueError("`candidate` goes with `pattern`")
        if self.validator is not None and self.validator not in VALIDATORS:
            known = ", ".join(sorted(VALIDATORS))
            raise ValueError(f"validator {self.validator!r} is unknown (known: {known})")
        return self


@dataclass(frozen=True)
class LoadedRule:
    """A validated rule with where it came from and its compiled Python patterns."""

    rule: Rule
    path: Path
    line: int
    regex: re.Pattern[str] | None
    width: int  # the longest match searched for: the pattern's own bound, else max_length or the cap
    allow: tuple[re.Pattern[str], ...]
    token: re.Pattern[str] | None
    anchor: str = ""  # the literal every match starts with (lower case for case-insensitive rules)
    # The pack-wide allowed values: a finding lying inside one of them in the text is dropped.
    examples: tuple[str, ...] = ()
    not_after: re.Pattern[str] | None = None

    @property
    def id(self) -> str:
        return self.rule.id

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}: rule {self.rule.id!r}"


class Allowed(_Model):
    """A value no rule of the pack reports: a provider's published example or test value (``value``), and
    why it is harmless (``reason``)."""

    value: str = Field(min_length=1, max_length=1024)
    reason: str = Field(min_length=1)


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[LoadedRule, ...]
    sources: tuple[Path, ...]
    allowed: tuple[Allowed, ...] = ()


class RuleError(Exception):
    """One or more rule files are invalid; ``problems`` are ``file:line: rule 'id': message`` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class LineLoader(yaml.SafeLoader):
    """Records the 1-based line of every mapping as ``__line__``."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = super().construct_mapping(node, deep=deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping


def pattern_width(regex: re.Pattern[str]) -> int:
    """The longest text ``regex`` can match, or UNBOUNDED."""
    sre_parse = importlib.import_module("re._parser")  # the parser `re` itself uses
    high = int(sre_parse.parse(regex.pattern, regex.flags).getwidth()[1])
    return UNBOUNDED if high >= int(sre_parse.MAXREPEAT) else high


def pattern_anchor(regex: re.Pattern[str]) -> str:
    """The literal text every match of ``regex`` starts with ("" when there is none): leading assertions
    such as ``\\b`` are skipped, then literal characters are collected."""
    sre_parse = importlib.import_module("re._parser")
    constants = importlib.import_module("re._constants")
    chars: list[str] = []
    for op, argument in sre_parse.parse(regex.pattern, regex.flags):
        if op is constants.AT and not chars:
            continue
        if op is not constants.LITERAL:
            break
        chars.append(chr(argument))
    anchor = "".join(chars)
    return anchor.lower() if regex.flags & re.IGNORECASE else anchor


def rule_files(paths: Iterable[str | Path]) -> list[Path]:
    """The YAML files named, and the ``*.yaml`` files directly inside the folders named."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.y*ml") if p.is_file()))
        else:
            files.append(path)
    return files


DEFAULT_MAX_MATCH_CHARS = 1024
# How far before a value a rule's `not_after` looks (within what a stream keeps behind a value: at least
# the default keyword window).
NOT_AFTER_CHARS = 48


def load_rules(paths: Iterable[str | Path], max_match_chars: int = DEFAULT_MAX_MATCH_CHARS) -> RuleSet:
    """Load and validate every rule in ``paths``. Raises RuleError listing every problem.

    A pattern with no upper length (``+``, ``*``, ``{n,}``) is searched for at most ``max_match_chars``
    characters, or its own ``max_length``: that bounds what a streamed body holds back."""
    files = rule_files(paths)
    problems: list[str] = []
    loaded: list[LoadedRule] = []
    seen: dict[str, str] = {}
    allowed: dict[str, tuple[Allowed, str]] = {}
    if not files:
        raise RuleError(["no rule files found in " + ", ".join(str(p) for p in paths)])
    for path in files:
        rules, values = _load_file(path, max_match_chars, problems)
        for item in rules:
            if item.id in seen:
                problems.append(f"{item.where}: duplicate id, first defined at {seen[item.id]}")
                continue
            seen[item.id] = f"{item.path}:{item.line}"
            loaded.append(item)
        for value, where in values:
            if value.value in allowed:
                problems.append(f"{where}: value allowed twice, first at {allowed[value.value][1]}")
                continue
            allowed[value.value] = (value, where)
    if problems:
        raise RuleError(problems)
    if allowed:
        examples = tuple(allowed)
        loaded = [dataclasses.replace(item, examples=examples) for item in loaded]
    return RuleSet(rules=tuple(loaded), sources=tuple(files), allowed=tuple(a for a, _ in allowed.values()))


def _load_file(
    path: Path, max_match_chars: int, problems: list[str]
) -> tuple[list[LoadedRule], list[tuple[Allowed, str]]]:
    """The rules of a file and the values it allows pack-wide (each with its ``file:line``)."""
    document = read_yaml(path, problems)
    if document is None:
        return [], []
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("rules", []), list)
        or not isinstance(document.get("allow", []), list)
        or not ({"rules", "allow"} & set(document))
    ):
        problems.append(f"{path}:1: a rule file is a mapping with a `rules:` list, an `allow:` list, or both")
        return [], []
    extra = sorted(set(document) - {"rules", "allow", "__line__"}, key=str)  # keys may be numbers too
    if extra:
        problems.append(f"{path}:1: unknown top-level keys: {', '.join(map(str, extra))}")
    result = []
    for entry in document.get("rules", []):
        if not isinstance(entry, dict):
            problems.append(f"{path}: each entry under `rules:` is a mapping")
            continue
        item = _load_rule(path, strip_lines(entry), int(entry.get("__line__", 0)), max_match_chars, problems)
        if item is not None:
            result.append(item)
    values = []
    for entry in document.get("allow", []):
        line = entry.get("__line__", 0) if isinstance(entry, dict) else 0
        where = f"{path}:{line}: allow"
        try:
            values.append((Allowed.model_validate(strip_lines(entry)), where))
        except ValidationError as exc:
            for err in exc.errors():
                location = ".".join(str(p) for p in err["loc"]) or "entry"
                problems.append(f"{where}: {location}: {err['msg']}")
    return result, values


def read_yaml(path: Path, problems: list[str]) -> Any:
    """The YAML document in ``path``, every mapping marked with its ``__line__``; None, with the problem
    (file and line) appended to ``problems``, when it cannot be read or parsed."""
    try:
        return yamlfiles.load(yamlfiles.decode(path.read_bytes()), LineLoader)
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror}")
    except yamlfiles.YamlProblem as exc:
        problems.append(f"{exc.where(path)}: {exc.message}")
    return None


def strip_lines(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_lines(v) for k, v in node.items() if k != "__line__"}
    if isinstance(node, list):
        return [strip_lines(v) for v in node]
    return node


def _load_rule(
    path: Path, data: dict[str, Any], line: int, max_match_chars: int, problems: list[str]
) -> LoadedRule | None:
    where = f"{path}:{line}: rule {str(data.get('id', '?'))!r}"
    try:
        rule = Rule.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            location = ".".join(str(p) for p in err["loc"]) or "rule"
            problems.append(f"{where}: {location}: {err['msg']}")
        return None
    before = len(problems)
    regex = _compile(rule.pattern, rule, "pattern", where, problems) if rule.pattern is not None else None
    if rule.candidate is not None:
        _compile(rule.candidate, rule, "candidate", where, problems)
    not_after = _compile(rule.not_after, rule, "not_after", where, problems) if rule.not_after else None
    allow = tuple(
        p for p in (_compile(a, rule, f"allow[{i}]", where, problems) for i, a in enumerate(rule.allow)) if p
    )
    token = None
    width = 0
    if rule.exact is not None and rule.exact.hashed:
        # A case-insensitive list finds its tokens case-insensitively too.
        caseless = rule.model_copy(update={"case_insensitive": not rule.exact.case_sensitive})
        token = _compile(rule.exact.token, caseless, "exact.token", where, problems)
        if token is not None:
            width = min(pattern_width(token), max_match_chars)
    if regex is not None:
        groups = regex.groupindex if isinstance(rule.group, str) else range(regex.groups + 1)
        if rule.group not in groups:
            problems.append(f"{where}: group {rule.group!r} is not a group of the pattern")
        width = pattern_width(regex)
        if width == UNBOUNDED:
            width = rule.max_length or max_match_chars
        elif rule.max_length is not None:
            width = min(width, rule.max_length)
    if len(problems) > before:
        return None
    anchor = pattern_anchor(regex) if regex is not None else ""
    return LoadedRule(
        rule=rule,
        path=path,
        line=line,
        regex=regex,
        width=width,
        allow=allow,
        token=token,
        anchor=anchor,
        not_after=not_after,
    )


def _compile(pattern: str, rule: Rule, field: str, where: str, problems: list[str]) -> re.Pattern[str] | None:
    flags = RE_FLAGS | (re.IGNORECASE if rule.case_insensitive else 0)
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        problems.append(f"{where}: {field}: invalid regular expression: {exc}")
        return None
