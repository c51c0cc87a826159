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

A policy file may also hold the ``base``: the guardrails every policy inherits (blocked prompts, floors
for actions, limits) unless it says otherwise in so many words (``inherit: {blocked_prompts: false}``).
Inherited blocked prompts are added to the policy's own; a base action is a floor (a finding it selects
is handled at least that strictly, whatever the policy's own entries say); a base limit is a ceiling
(the policy's own may be lower, never higher). A policy's *effective* policy is what it wrote plus what
it inherits; that is what decides, in shadow mode too, and what ``extproc policy show`` prints.

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
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extproc.detect.rules import MaskSpec, read_yaml, rule_files, strip_lines
from extproc.errors import ExtProcError
from extproc.media import MediaKind
from extproc.model import Finding

Action = Literal["mask", "allow", "block", "approve"]
SEVERITIES = ("low", "medium", "high", "critical")
STRICTNESS: tuple[Action, ...] = ("allow", "mask", "approve", "block")  # the last is the strictest
REFUSING: frozenset[Action] = frozenset({"approve", "block"})


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


class ApprovalSpec(_Model):
    """Who approves a request an ``approve`` action holds, and how it waits. ``hold``: the request waits
    up to ``hold_seconds`` and goes on to the model once approved; ``ticket``: it is refused at once with
    an approval id the caller retries with (header ``x-approval-id``) once approved."""

    approver_groups: list[str] = Field(min_length=1)
    mode: Literal["hold", "ticket"] = "ticket"
    hold_seconds: float = Field(120.0, gt=0, le=570)  # within envoy.yaml's max_message_timeout (600 s)
    min_approvals: int = Field(1, ge=1, le=10)
    require_all_groups: bool = False  # at least one approver of every listed group
    exempt_groups: list[str] = Field(default_factory=list)  # callers who never need approval
    ttl_seconds: float = Field(3600.0, gt=0, le=7 * 86400)  # to decide a request, and to use a grant


class ActionEntry(_Model):
    when: Selector = Selector()
    do: Action
    strategy: MaskSpec | None = None
    approval: ApprovalSpec | None = None  # for do: approve; else the policy's `approval`

    @model_validator(mode="after")
    def _approval_for_approve(self) -> ActionEntry:
        if self.approval is not None and self.do != "approve":
            raise ValueError("`approval` goes with `do: approve`")
        return self

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


class Inherit(_Model):
    """What a policy keeps of the base: every part, unless it sets that part to false."""

    blocked_prompts: bool = True
    request: bool = True
    response: bool = True
    limits: bool = True


class BaseDirection(_Model):
    """The base's floors for one direction: a finding an entry selects is handled at least as strictly
    as the entry says. Allow would never be stricter than anything, so a floor is mask or stricter."""

    actions: list[ActionEntry] = Field(default_factory=list)

    @field_validator("actions")
    @classmethod
    def _no_allow(cls, value: list[ActionEntry]) -> list[ActionEntry]:
        if any(entry.do == "allow" for entry in value):
            raise ValueError("a base action is a floor; `allow` is never stricter than anything, drop it")
        return value


class Base(_Model):
    """The guardrails every policy inherits unless its ``inherit`` says otherwise."""

    description: str = ""
    request: BaseDirection = BaseDirection()
    response: BaseDirection = BaseDirection()
    blocked_prompts: list[BlockedPrompt] = Field(default_factory=list)
    limits: PolicyLimits = PolicyLimits()

    def kept(self, inherit: Inherit) -> Base:
        """The parts of the base a policy with ``inherit`` keeps."""
        return Base(
            description=self.description,
            request=self.request if inherit.request else BaseDirection(),
            response=self.response if inherit.response else BaseDirection(),
            blocked_prompts=self.blocked_prompts if inherit.blocked_prompts else [],
            limits=self.limits if inherit.limits else PolicyLimits(),
        )


def lowest_limits(own: PolicyLimits, base: PolicyLimits) -> PolicyLimits:
    """The limits of a policy under ``base``: each the lower of the two where both set one, and
    ``refuse`` over ``cap`` when either says so."""
    merged: dict[str, Any] = {}
    for name in PolicyLimits.model_fields:
        if name == "max_tokens_over":
            continue
        values = [v for v in (getattr(own, name), getattr(base, name)) if v is not None]
        merged[name] = min(values) if values else None
    refuse = "refuse" in (own.max_tokens_over, base.max_tokens_over)
    merged["max_tokens_over"] = "refuse" if refuse else "cap"
    return PolicyLimits(**merged)


class Match(_Model):
    groups: list[str] = Field(default_factory=list)
    routes: list[str] = Field(default_factory=list)  # path globs: /v1/chat/*
    models: list[str] = Field(default_factory=list)  # model globs: gpt-4*


class Unmasked(_Model):
    """Who may ask (header ``x-dlp-unmasked: true``) for answers with nothing masked."""

    groups: list[str] = Field(default_factory=list)


class Policy(_Model):
    """One policy. ``media``: the kinds of media (``extproc.media``) its requests may carry to the model
    unscanned, or ask the answer in; none by default."""

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
    media: list[MediaKind] = Field(default_factory=list)
    inherit: Inherit = Inherit()
    approval: ApprovalSpec | None = None  # for every `approve` of this policy without its own

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
    """A policy as written (``policy``) with the parts of the base it inherits (``base``): together its
    effective policy."""

    policy: Policy
    where: str
    order: int
    base: Base = field(default_factory=Base)

    @property
    def id(self) -> str:
        return self.policy.id

    @cached_property
    def blocked(self) -> tuple[tuple[str, re.Pattern[str]], ...]:
        """The blocked prompts, inherited ones first, compiled."""
        prompts = (*self.base.blocked_prompts, *self.policy.blocked_prompts)
        return tuple((b.id, re.compile(b.pattern)) for b in prompts)

    @cached_property
    def limits(self) -> PolicyLimits:
        """The effective limits: the policy's own, each lowered to the base's where that is lower."""
        return lowest_limits(self.policy.limits, self.base.limits)

    def direction(self, name: Literal["request", "response"]) -> DirectionPolicy:
        """The policy's own actions for one direction."""
        return self.policy.request if name == "request" else self.policy.response

    def floor(self, name: Literal["request", "response"]) -> tuple[ActionEntry, ...]:
        """The inherited floors for one direction."""
        return tuple((self.base.request if name == "request" else self.base.response).actions)


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
    base: Base = field(default_factory=Base)
    warnings: tuple[str, ...] = ()  # valid but suspicious: logged at start-up

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
    """Every policy in ``paths`` (files, or folders of ``*.yaml``), each with the parts of the base it
    inherits. Raises PolicyError listing every problem with its file, line and policy id. With ``known``,
    a selector naming a rule id or an entity the rule pack does not have is a problem too: a typo there
    would make an action never apply. What is suspicious but valid is in ``PolicySet.warnings``."""
    problems: list[str] = []
    warnings: list[str] = []
    written: list[tuple[Policy, str]] = []
    bases: list[tuple[Base, str]] = []
    seen: dict[str, str] = {}
    files = rule_files(paths)
    if not files:
        problems.append(f"no policy files in {', '.join(str(p) for p in paths)}")
    for path in files:
        policies, found = _load_file(path, problems, known)
        if found is not None:
            bases.append(found)
        for policy, where in policies:
            if policy.id in seen:
                problems.append(f"{where}: duplicate policy id, first defined at {seen[policy.id]}")
                continue
            seen[policy.id] = where.rsplit(":", 1)[0]
            written.append((policy, where))
            warnings.extend(_model_warnings(policy, where))
    if len(bases) > 1:
        problems.append(f"{bases[1][1]}: a second base; the first is at {bases[0][1]} (there is one base)")
    base = bases[0][0] if bases else Base()
    loaded = [
        LoadedPolicy(policy, where, order, base.kept(policy.inherit))
        for order, (policy, where) in enumerate(written)
    ]
    for item in loaded:
        warnings.extend(_approval_warnings(item))
    defaults = [p for p in loaded if p.policy.default]
    if len(defaults) != 1 and (loaded or not problems):  # files with no policy at all have no default
        named = ", ".join(p.where for p in defaults) or "none"
        where = ", ".join(str(f) for f in files)
        problems.append(f"{where}: exactly one policy must be the default (default: true); found {named}")
    if problems:
        raise PolicyError(problems)
    ordered = sorted((p for p in loaded if not p.policy.default), key=lambda p: (-p.policy.priority, p.order))
    return PolicySet(defaults[0], tuple(ordered), base, tuple(warnings))


FILE_KEYS = frozenset({"policies", "base"})


def _load_file(
    path: Path, problems: list[str], known: KnownNames | None = None
) -> tuple[list[tuple[Policy, str]], tuple[Base, str] | None]:
    """The policies of one file with their ``file:line: policy 'id'``, and its base if it has one."""
    document = read_yaml(path, problems)
    if document is None:
        return [], None
    if not isinstance(document, dict) or not (
        isinstance(document.get("policies"), list) or isinstance(document.get("base"), dict)
    ):
        problems.append(f"{path}: a policy file is a mapping with a `policies` list, a `base`, or both")
        return [], None
    # A misspelt `base:` would drop every guardrail without a word: unknown keys are refused.
    for key in sorted(set(document) - FILE_KEYS - {"__line__"}, key=str):  # keys may be numbers too
        close = difflib.get_close_matches(str(key), sorted(FILE_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{path}: unknown key {key!r}{hint}; a policy file holds `policies` and `base`")
    base: tuple[Base, str] | None = None
    raw_base = document.get("base")
    if raw_base is not None:
        where = f"{path}:{raw_base.get('__line__', 0) if isinstance(raw_base, dict) else 0}: base"
        parsed = _validate(Base, raw_base, where, problems)
        if isinstance(parsed, Base):
            if known is not None:
                problems.extend(_unknown_names(path, raw_base, parsed, "base", known))
            base = (parsed, where)
    items: list[tuple[Policy, str]] = []
    for entry in document.get("policies") or []:
        if not isinstance(entry, dict):
            problems.append(f"{path}: every entry of `policies` is a mapping")
            continue
        where = f"{path}:{entry.get('__line__', 0)}: policy {str(entry.get('id', '?'))!r}"
        policy = _validate(Policy, entry, where, problems)
        if not isinstance(policy, Policy):
            continue
        if known is not None:
            problems.extend(_unknown_names(path, entry, policy, f"policy {policy.id!r}", known))
        items.append((policy, where))
    return items, base


def _validate(
    model: type[Policy] | type[Base], raw: Any, where: str, problems: list[str]
) -> Policy | Base | None:
    try:
        return model.model_validate(strip_lines(raw))
    except ValidationError as exc:
        for error in exc.errors():
            location = ".".join(str(p) for p in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{where}: {location + ': ' if location else ''}{message}")
        return None


def _unknown_names(
    path: Path, entry: dict[str, Any], parsed: Policy | Base, label: str, known: KnownNames
) -> list[str]:
    """A problem, at the line of its ``when``, for every rule id or entity a selector names that the rule
    pack does not have, with the closest known name when there is one."""
    problems = []
    for direction in ("request", "response"):
        raw = entry.get(direction)
        raw_actions = raw.get("actions") if isinstance(raw, dict) else None
        if not isinstance(raw_actions, list):
            continue
        actions = getattr(parsed, direction).actions
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
                        f"{path}:{line}: {label}: {selector}: {name!r} is not {kind} of the rule pack{hint}"
                    )
    return problems


def _model_warnings(policy: Policy, where: str) -> list[str]:
    """Model globs that can match nothing: an empty allow-list refuses every model, and a ``match.models``
    glob the policy's own ``models`` can never allow makes the policy refuse every request it matches."""
    warnings = []
    if not policy.models:
        warnings.append(f"{where}: models: the list is empty, every model is refused")
    for glob in [*policy.models, *(policy.match.models if policy.match else [])]:
        if not glob.strip() or glob != glob.strip():
            warnings.append(f"{where}: model glob {glob!r} has blanks a model name never has")
    if policy.match is not None and policy.models:
        for glob in policy.match.models:
            if not _may_overlap(glob, policy.models):
                warnings.append(
                    f"{where}: match.models: {glob!r} selects only models this policy's models "
                    f"({', '.join(policy.models)}) refuse"
                )
    return warnings


def _approval_warnings(loaded: LoadedPolicy) -> list[str]:
    """An ``approve`` in a request without an ``approval`` saying who approves: nobody can, and every
    request it selects is refused with ``approval_required``."""
    own = loaded.direction("request")
    entries = [*own.actions, *loaded.floor("request")]
    unanswered = [e for e in entries if e.do == "approve" and e.approval is None]
    if (own.default == "approve" or unanswered) and loaded.policy.approval is None:
        return [
            f"{loaded.where}: request: `approve` without an `approval` (approver_groups): nobody can "
            "approve, so the requests it selects are refused with approval_required"
        ]
    return []


def _may_overlap(glob: str, allowed: Sequence[str]) -> bool:
    """Whether some model name could match ``glob`` and one of ``allowed``. Exact for literal names
    on either side; two wildcard globs are assumed to overlap."""
    for other in allowed:
        if not _is_glob(glob):
            if fnmatch.fnmatchcase(glob, other):
                return True
        elif not _is_glob(other):
            if fnmatch.fnmatchcase(other, glob):
                return True
        else:
            return True
    return False


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


# -- what applies ------------------------------------------------------------------------------------


def describe(policies: PolicySet, facts: Facts) -> dict[str, Any]:
    """The effective policy for ``facts`` as a reviewer reads it: which policy acts, what it inherits
    from the base and from where, its actions with the inherited floors, blocked prompts and limits each
    with its origin, the policies in shadow mode beside it, and the policies the facts left undecided (a
    route or model condition when no route or model was given)."""
    acting = policies.select(facts)
    shown: dict[str, Any] = {
        "caller": {
            "groups": sorted(facts.groups),
            "route": facts.route or None,
            "model": facts.model,
        },
        **_effective(acting, facts.model),
    }
    shown["shadows"] = [_effective(s) for s in policies.shadows(facts)]
    open_conditions = []
    for loaded in policies.ordered:
        match = loaded.policy.match
        assert match is not None
        if match.groups and not facts.groups & set(match.groups):
            continue
        if (match.routes and not facts.route) or (match.models and facts.model is None):
            open_conditions.append(loaded.id)
    if open_conditions:
        shown["undecided"] = {
            "note": "these match the groups; whether they apply depends on the route or model, not given",
            "policies": open_conditions,
        }
    return shown


def _effective(loaded: LoadedPolicy, model: str | None = None) -> dict[str, Any]:
    policy = loaded.policy
    inherited = [name for name, kept in policy.inherit.model_dump().items() if kept]
    dropped = [name for name, kept in policy.inherit.model_dump().items() if not kept]

    def direction(name: Literal["request", "response"]) -> dict[str, Any]:
        own = loaded.direction(name)
        shown: dict[str, Any] = {
            "actions": [_entry(e) for e in own.actions],
            "default": own.default,
        }
        floors = loaded.floor(name)
        if floors:
            shown["floors_from_base"] = [_entry(e) for e in floors]
        return shown

    limits: dict[str, Any] = {}
    for name in PolicyLimits.model_fields:
        value = getattr(loaded.limits, name)
        if value is None or (name == "max_tokens_over" and loaded.limits.max_tokens is None):
            continue
        limits[name] = {
            "value": value,
            "from": policy.id if getattr(policy.limits, name) == value else "base",
        }
    return {
        "policy": loaded.id,
        "defined_at": loaded.where.rsplit(": policy", 1)[0],
        "enforce": policy.enforce,
        "inherits_from_base": inherited,
        "does_not_inherit": dropped,
        "models": list(policy.models),
        **({"model_allowed": glob_match(model, policy.models)} if model is not None else {}),
        "unmasked_groups": list(policy.unmasked.groups),
        "request": direction("request"),
        "response": direction("response"),
        "blocked_prompts": [
            {"id": b.id, "pattern": b.pattern, "from": "base"} for b in loaded.base.blocked_prompts
        ]
        + [{"id": b.id, "pattern": b.pattern, "from": policy.id} for b in policy.blocked_prompts],
        "limits": limits,
        **({"approval": policy.approval.model_dump()} if policy.approval is not None else {}),
    }


def _entry(entry: ActionEntry) -> dict[str, Any]:
    shown: dict[str, Any] = {"when": entry.when.model_dump(exclude_defaults=True), "do": entry.do}
    if entry.strategy is not None:
        shown["strategy"] = entry.strategy.model_dump(exclude_defaults=True)
    if entry.approval is not None:
        shown["approval"] = entry.approval.model_dump()
    return shown


# -- decisions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What happens to one finding."""

    action: Action
    strategy: MaskSpec | None = None  # for mask: overrides the rule's own
    approval: ApprovalSpec | None = None  # for approve: who approves, and how the request waits


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
    approve still hold. In shadow mode every finding is allowed and the decision only recorded.

    Approve: a caller of the approval's ``exempt_groups`` is let through; with ``approved`` (a person
    approved this very request) the value passes unmasked; with ``hold`` (the exchange can wait for a
    decision) the value is masked for now and listed in ``awaiting``, and the exchange asks for approval
    once the body is read; otherwise (no ``approval`` says who approves, or nothing can wait: a
    response) the request is refused with ``approval_required``."""

    def __init__(
        self,
        policy: LoadedPolicy,
        direction: Literal["request", "response"],
        rule_info: dict[str, tuple[str, str]],
        *,
        unmasked: bool = False,
        shadows: Sequence[FindingActions] = (),
        hold: bool = False,
        approved: bool = False,
        groups: frozenset[str] = frozenset(),
    ) -> None:
        self._direction = policy.direction(direction)
        self._floor = policy.floor(direction)
        self._approval = policy.policy.approval
        self.hold = hold
        self.approved = approved
        self._groups = groups
        self.awaiting: list[tuple[Finding, ApprovalSpec]] = []  # held for approval, in order
        self.approved_through = False  # an approve let a value through (approved, or an exempt caller)
        # A verdict depends on the rules and the entity only, never the span: a body with a thousand
        # e-mail addresses asks once.
        self._known: dict[tuple[tuple[str, ...], str], Verdict] = {}
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
        if verdict.action == "approve":
            held = self._approval_verdict(verdict)
            if held is not None:
                if held.action == "mask":
                    assert verdict.approval is not None
                    self.awaiting.append((finding, verdict.approval))
                else:
                    self.approved_through = True
                return held
        if verdict.action in ("block", "approve"):
            code = "policy_blocked" if verdict.action == "block" else "approval_required"
            raise PolicyDenied(
                f"policy {self.decisions.policy_id!r} refuses {finding.entity} (rule {finding.rule_id})",
                code=code,
            )
        return verdict

    def _approval_verdict(self, verdict: Verdict) -> Verdict | None:
        """What an approve verdict comes to here: allow (exempt caller, or approved), mask (held for an
        approval), or None (refused: nobody can approve, or nothing can wait)."""
        spec = verdict.approval
        if spec is None:
            return None
        if self._groups & set(spec.exempt_groups) or self.approved:
            return Verdict("allow")
        return Verdict("mask") if self.hold else None

    def decide(self, finding: Finding) -> Verdict:
        """The policy's verdict on ``finding``, recorded; nothing is enforced here. A value several rules
        found (``finding.also_matched``) gets the strictest verdict any of them is given (block, then
        approve, then mask, then allow): a policy that blocks ``credit-card-keyword`` blocks a card that
        ``credit-card`` reports. Among equals, the reporting rule's verdict (its strategy) comes first."""
        verdict = self._strictest(finding)
        self.decisions.made.append((finding.rule_id, verdict.action))
        return verdict

    def refuses(self, finding: Finding) -> bool:
        """Whether ``verdict(finding)`` would refuse (block, or an approve nobody can wait for, enforced);
        nothing is recorded."""
        verdict = self._strictest(finding)
        if not self.decisions.enforce or verdict.action not in REFUSING:
            return False
        return verdict.action == "block" or self._approval_verdict(verdict) is None

    @cached_property
    def may_refuse(self) -> bool:
        """Whether any finding could be refused: some entry, floor or default blocks or approves."""
        actions = [self._direction.default, *(e.do for e in (*self._direction.actions, *self._floor))]
        return self.decisions.enforce and any(action in REFUSING for action in actions)

    def _strictest(self, finding: Finding) -> Verdict:
        key = (tuple(finding.rule_ids), finding.entity)
        known = self._known.get(key)
        if known is not None:
            return known
        verdict = max(
            (self._rule_verdict(finding, rule_id) for rule_id in finding.rule_ids),
            key=lambda v: STRICTNESS.index(v.action),
        )
        verdict = Verdict("allow") if verdict.action == "mask" and self.unmasked else verdict
        self._known[key] = verdict
        return verdict

    def _rule_verdict(self, finding: Finding, rule_id: str) -> Verdict:
        """The verdict the first matching ``actions`` entry (or the default) gives ``rule_id``'s finding,
        raised to the first inherited floor that selects it when that is stricter."""
        category, severity = self._info.get(rule_id, ("pii", "medium"))
        one = Finding(rule_id, finding.entity, finding.start, finding.end)
        own = next(
            (
                self._entry_verdict(e)
                for e in self._direction.actions
                if e.when.selects(one, category, severity)
            ),
            self._entry_verdict(None),
        )
        floor = next((e for e in self._floor if e.when.selects(one, category, severity)), None)
        if floor is not None and STRICTNESS.index(floor.do) > STRICTNESS.index(own.action):
            return self._entry_verdict(floor)
        return own

    def _entry_verdict(self, entry: ActionEntry | None) -> Verdict:
        """The verdict of an ``actions`` entry, or of the direction's ``default`` (None)."""
        action = entry.do if entry is not None else self._direction.default
        strategy = entry.strategy if entry is not None else None
        approval = None
        if action == "approve":
            approval = (entry.approval if entry is not None else None) or self._approval
        return Verdict(action, strategy, approval)


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
