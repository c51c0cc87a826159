"""Policies: who may use which model, what happens to each finding, and the limits of a request.

A policy file (``rules/policies/*.yaml``) holds a list of policies. One of them is the ``default``; the
others have a ``match`` (groups, routes, models; each an any-of list, an absent one matching anything).
For an exchange the policies with a match are tried by ``priority`` (highest first), then in file
order; the first whose every condition holds is the exchange's policy, and the default otherwise.

A policy says, per direction, what happens to findings: the first ``actions`` entry whose ``when``
selects a finding (by rule id, entity, category or minimum severity) decides its action, and
``default`` decides for the rest. A value several rules found (``Finding.also_matched``) is decided for
each of its rules and gets the strictest of those actions. Actions:

- ``mask``: the value is masked, with the rule's own strategy or the entry's ``strategy``;
- ``allow``: the value passes unchanged (it is still recorded);
- ``block``: the request is refused (403 ``policy_blocked``); in an answer already streaming, the
  stream ends with an in-band error;
- ``approve``: the request needs a human approval; until the approval service decides it, it is
  refused like ``block`` with the code ``approval_required``.

With ``enforce: false`` (shadow mode) a policy decides and records everything and acts on nothing: it is
asked beside the policy that acts (the first enforced one that matches, or the default), whose
protection stays in place, so a stricter policy can be rolled out by watching what it would do.

Everything here is pure: a decision is a function of the principal,
the request facts and the findings, and carries the policy id and the ids of the rules behind it.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extproc.detect.rules import MaskSpec, read_yaml, rule_files, strip_lines
from extproc.errors import ExtProcError
from extproc.model import Finding

Action = Literal["mask", "allow", "block", "approve"]
SEVERITIES = ("low", "medium", "high", "critical")
STRICTNESS: tuple[Action, ...] = ("allow", "mask", "approve", "block")  # the last is the strictest


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Selector(_Model):
    """Which findings an action applies to: any listed rule id, entity or category, at or above a
    severity. An empty selector selects every finding."""

    rules: list[str] = Field(default_factory=list)
    entities: list[str] = Field(default_factory=list)
    categories: list[Literal["pii", "credential", "confidential"]] = Field(default_factory=list)
    min_severity: Literal["low", "medium", "high", "critical"] | None = None

    def selects(self, finding: Finding, category: str, severity: str) -> bool:
        named = bool(self.rules or self.entities or self.categories)
        if named and not (
            finding.rule_id in self.rules or finding.entity in self.entities or category in self.categories
        ):
            return False
        return self.min_severity is None or SEVERITIES.index(severity) >= SEVERITIES.index(self.min_severity)


class ActionEntry(_Model):
    when: Selector = Selector()
    do: Action
    strategy: MaskSpec | None = None

    @field_validator("strategy", mode="before")
    @classmethod
    def _short_strategy(cls, value: object) -> object:
        return {"strategy": value} if isinstance(value, str) else value


class DirectionPolicy(_Model):
    default: Action = "mask"
    actions: list[ActionEntry] = Field(default_factory=list)


class BlockedPrompt(_Model):
    id: str
    pattern: str
    description: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from exc
        return value


class PolicyLimits(_Model):
    max_request_bytes: int | None = Field(None, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_tokens_over: Literal["cap", "refuse"] = "cap"
    # The answer: each lowers the setting of the same name (limits.*) for this policy's callers.
    max_response_bytes: int | None = Field(None, ge=1)
    max_stream_bytes: int | None = Field(None, ge=1)
    max_stream_seconds: float | None = Field(None, gt=0)


class Match(_Model):
    groups: list[str] = Field(default_factory=list)
    routes: list[str] = Field(default_factory=list)  # path globs: /v1/chat/*
    models: list[str] = Field(default_factory=list)  # model globs: gpt-4*


class Unmasked(_Model):
    """Who may ask (header ``x-dlp-unmasked: true``) for answers with nothing masked."""

    groups: list[str] = Field(default_factory=list)


class Policy(_Model):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)
    description: str = ""
    default: bool = False
    priority: int = 0
    enforce: bool = True
    match: Match | None = None
    models: list[str] = Field(default_factory=lambda: ["*"])
    request: DirectionPolicy = DirectionPolicy()
    response: DirectionPolicy = DirectionPolicy()
    blocked_prompts: list[BlockedPrompt] = Field(default_factory=list)
    limits: PolicyLimits = PolicyLimits()
    unmasked: Unmasked = Unmasked()

    @model_validator(mode="after")
    def _default_or_match(self) -> Policy:
        if self.default and self.match is not None:
            raise ValueError("the default policy applies when no other matches: it has no `match`")
        if not self.default and self.match is None:
            raise ValueError("a policy that is not the default needs a `match`")
        return self


class PolicyError(Exception):
    """One or more policy files are invalid; ``problems`` are ``file:line: policy 'id': message`` lines."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    where: str
    order: int
    blocked: tuple[tuple[str, re.Pattern[str]], ...] = ()

    @property
    def id(self) -> str:
        return self.policy.id


@dataclass(frozen=True)
class Facts:
    """What is known of a request when its policy is chosen."""

    groups: frozenset[str] = frozenset()
    route: str = ""
    model: str | None = None


def glob_match(value: str | None, patterns: Iterable[str]) -> bool:
    return value is not None and any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class PolicySet:
    default: LoadedPolicy
    ordered: tuple[LoadedPolicy, ...]  # the policies with a match, in the order they are tried

    def select(self, facts: Facts) -> LoadedPolicy:
        """The policy that acts: the first enforced one that matches, or the default."""
        return next((p for p in self._matching(facts) if p.policy.enforce), self.default)

    def shadows(self, facts: Facts) -> list[LoadedPolicy]:
        """The policies in shadow mode that match: they decide and record beside the one that acts."""
        return [p for p in self._matching(facts) if not p.policy.enforce]

    def _matching(self, facts: Facts) -> Iterator[LoadedPolicy]:
        for loaded in self.ordered:
            match = loaded.policy.match
            assert match is not None
            if match.groups and not facts.groups & set(match.groups):
                continue
            if match.routes and not glob_match(facts.route, match.routes):
                continue
            if match.models and not glob_match(facts.model, match.models):
                continue
            yield loaded

    def get(self, policy_id: str) -> LoadedPolicy | None:
        return next((p for p in (self.default, *self.ordered) if p.id == policy_id), None)


@dataclass(frozen=True)
class KnownNames:
    """The rule ids and entities of the loaded rule pack: what a policy's selectors may name."""

    rules: frozenset[str]
    entities: frozenset[str]


def load_policies(paths: Iterable[str | Path], known: KnownNames | None = None) -> PolicySet:
    """Every policy in ``paths`` (files, or folders of ``*.yaml``). Raises PolicyError listing every
    problem with its file, line and policy id. With ``known``, a selector naming a rule id or an entity
    the rule pack does not have is a problem too: a typo there would make an action never apply."""
    problems: list[str] = []
    loaded: list[LoadedPolicy] = []
    seen: dict[str, str] = {}
    files = rule_files(paths)
    if not files:
        problems.append(f"no policy files in {', '.join(str(p) for p in paths)}")
    for path in files:
        for item in _load_file(path, problems, known):
            if item.id in seen:
                problems.append(f"{item.where}: duplicate policy id, first defined at {seen[item.id]}")
                continue
            seen[item.id] = item.where.rsplit(":", 1)[0]
            loaded.append(LoadedPolicy(item.policy, item.where, len(loaded), item.blocked))
    defaults = [p for p in loaded if p.policy.default]
    if loaded and len(defaults) != 1:
        found = ", ".join(p.where for p in defaults) or "none"
        where = ", ".join(str(f) for f in files)
        problems.append(f"{where}: exactly one policy must be the default (default: true); found {found}")
    if problems:
        raise PolicyError(problems)
    ordered = sorted((p for p in loaded if not p.policy.default), key=lambda p: (-p.policy.priority, p.order))
    return PolicySet(defaults[0], tuple(ordered))


def _load_file(path: Path, problems: list[str], known: KnownNames | None = None) -> list[LoadedPolicy]:
    document = read_yaml(path, problems)
    if document is None:
        return []
    if not isinstance(document, dict) or not isinstance(document.get("policies"), list):
        problems.append(f"{path}: a policy file is a mapping with a `policies` list")
        return []
    items: list[LoadedPolicy] = []
    for entry in document["policies"]:
        if not isinstance(entry, dict):
            problems.append(f"{path}: every entry of `policies` is a mapping")
            continue
        where = f"{path}:{entry.get('__line__', 0)}: policy {str(entry.get('id', '?'))!r}"
        try:
            policy = Policy.model_validate(strip_lines(entry))
        except ValidationError as exc:
            for error in exc.errors():
                location = ".".join(str(p) for p in error["loc"])
                message = str(error["msg"]).removeprefix("Value error, ")
                problems.append(f"{where}: {location + ': ' if location else ''}{message}")
            continue
        if known is not None:
            problems.extend(_unknown_names(path, entry, policy, known))
        blocked = tuple((b.id, re.compile(b.pattern)) for b in policy.blocked_prompts)
        items.append(LoadedPolicy(policy, where, 0, blocked))
    return items


def _unknown_names(path: Path, entry: dict[str, Any], policy: Policy, known: KnownNames) -> list[str]:
    """A problem, at the line of its ``when``, for every rule id or entity a selector names that the rule
    pack does not have, with the closest known name when there is one."""
    problems = []
    for direction in ("request", "response"):
        raw = entry.get(direction)
        raw_actions = raw.get("actions") if isinstance(raw, dict) else None
        if not isinstance(raw_actions, list):
            continue
        actions = getattr(policy, direction).actions
        for index, (raw_action, action) in enumerate(zip(raw_actions, actions, strict=False)):
            when = raw_action.get("when") if isinstance(raw_action, dict) else None
            line = when.get("__line__") if isinstance(when, dict) else None
            line = line or (raw_action.get("__line__") if isinstance(raw_action, dict) else 0)
            for field_name, names, valid in (
                ("rules", action.when.rules, known.rules),
                ("entities", action.when.entities, known.entities),
            ):
                for name in names:
                    if name in valid:
                        continue
                    close = difflib.get_close_matches(name, sorted(valid), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    kind = "a rule id" if field_name == "rules" else "an entity"
                    selector = f"{direction}.actions[{index}].when.{field_name}"
                    problems.append(
                        f"{path}:{line}: policy {policy.id!r}: {selector}: "
                        f"{name!r} is not {kind} of the rule pack{hint}"
                    )
    return problems


# -- decisions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What happens to one finding."""

    action: Action
    strategy: MaskSpec | None = None  # for mask: overrides the rule's own


@dataclass
class Decisions:
    """The decisions of one exchange in one direction: what a policy decided for each finding, and
    whether it acted on it (shadow mode records without acting)."""

    policy_id: str
    enforce: bool
    made: list[tuple[str, Action]] = field(default_factory=list)  # (rule id, action) in order

    @property
    def rule_ids(self) -> list[str]:
        return list(dict.fromkeys(rule for rule, _ in self.made))


class PolicyDenied(ExtProcError):
    """The policy refuses the request (or a streamed answer already under way)."""

    code = "policy_blocked"


class FindingActions:
    """A policy's actions for one direction, as the masker asks for them, finding by finding.

    ``unmasked`` (an allowed request for an unmasked answer) turns every mask into allow; block and
    approve still hold. In shadow mode every finding is allowed and the decision only recorded."""

    def __init__(
        self,
        policy: LoadedPolicy,
        direction: DirectionPolicy,
        rule_info: dict[str, tuple[str, str]],
        *,
        unmasked: bool = False,
        shadows: Sequence[FindingActions] = (),
    ) -> None:
        self._direction = direction
        self._info = rule_info  # rule id -> (category, severity)
        self.unmasked = unmasked
        self.shadows = tuple(shadows)  # policies in shadow mode: asked too, only recorded
        self.decisions = Decisions(policy.id, policy.policy.enforce)

    def verdict(self, finding: Finding) -> Verdict:
        for shadow in self.shadows:
            shadow.decide(finding)
        verdict = self.decide(finding)
        if not self.decisions.enforce:
            return Verdict("allow")
        if verdict.action in ("block", "approve"):
            code = "policy_blocked" if verdict.action == "block" else "approval_required"
            raise PolicyDenied(
                f"policy {self.decisions.policy_id!r} refuses {finding.entity} (rule {finding.rule_id})",
                code=code,
            )
        return verdict

    def decide(self, finding: Finding) -> Verdict:
        """The policy's verdict on ``finding``, recorded; nothing is enforced here. A value several rules
        found (``finding.also_matched``) gets the strictest verdict any of them is given (block, then
        approve, then mask, then allow): a policy that blocks ``credit-card-keyword`` blocks a card that
        ``credit-card`` reports. Among equals, the reporting rule's verdict (its strategy) comes first."""
        verdict = max(
            (self._rule_verdict(finding, rule_id) for rule_id in finding.rule_ids),
            key=lambda v: STRICTNESS.index(v.action),
        )
        if verdict.action == "mask" and self.unmasked:
            verdict = Verdict("allow")
        self.decisions.made.append((finding.rule_id, verdict.action))
        return verdict

    def _rule_verdict(self, finding: Finding, rule_id: str) -> Verdict:
        """The verdict the first matching ``actions`` entry (or the default) gives ``rule_id``'s finding."""
        category, severity = self._info.get(rule_id, ("pii", "medium"))
        one = Finding(rule_id, finding.entity, finding.start, finding.end)
        for entry in self._direction.actions:
            if entry.when.selects(one, category, severity):
                return Verdict(entry.do, entry.strategy)
        return Verdict(self._direction.default)


def estimate_tokens(texts: Iterable[str]) -> int:
    """Tokens of a prompt, estimated as one per four characters (the usual rule for English with
    BPE tokenizers; it errs high for code and low for CJK). A limit, not a bill."""
    return sum(len(text) for text in texts) // 4 + 1


def prompt_texts(document: Any) -> list[str]:
    """Every string value of a request document: what a prompt limit and blocked patterns look at."""
    found: list[str] = []
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found
