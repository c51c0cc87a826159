"""Hot reload through real Envoy under steady load: a rule change and a policy change take effect while
requests keep flowing, with not one failed request; a broken change is refused while the old rules keep
masking."""

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from extproc.devenv import Stack
from extproc.settings import REPO_RULES

from .conftest import start_stack
from .test_reload import PROJECT_RULE

PROMPT = "ticket PRJ-1234 from jane@example.com"
ALLOW_EMAIL = """\
  - id: allow-email
    priority: 1
    match: { routes: ["/v1/*"] }
    request:
      actions:
        - when: { entities: [EMAIL_ADDRESS] }
          do: allow
    response:
      actions:
        - when: { entities: [EMAIL_ADDRESS] }
          do: allow
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reload")
    shutil.copytree(REPO_RULES, path / "rules", ignore=shutil.ignore_patterns("policies"))
    shutil.copytree(REPO_RULES / "policies", path / "policies")
    return path


@pytest.fixture(scope="module")
def reloading(folder: Path) -> Iterator[Stack]:
    env = {
        "EXTPROC_DETECT__RULES": json.dumps([str(folder / "rules")]),
        "EXTPROC_POLICY__PATHS": json.dumps([str(folder / "policies")]),
        "EXTPROC_SERVER__RELOAD_WATCH_SECONDS": "0.5",
    }
    running = start_stack(folder / "stack.log", extra_env=env)
    yield running
    running.stop()


def snapshot(stack: Stack) -> dict[str, object]:
    answer = httpx.get(f"http://127.0.0.1:{stack.admin_port}/snapshot", timeout=10)
    answer.raise_for_status()
    shown: dict[str, object] = answer.json()
    return shown


def replace_file(path: Path, text: str) -> None:
    """Writes ``path`` whole at once (a new file renamed over it), as an editor or kubelet does: the
    sidecar's watcher never reads it half written."""
    staged = path.parent.parent / f".{path.name}.staged"  # beside the watched folder, not in it
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


RELOAD_WITHIN = 120  # seconds from a change to its reload, compile included, under the test's load


class Sent(NamedTuple):
    """One request of the load: when it was sent and when its answer came (seconds from the start)."""

    at: float
    status: int
    text: str
    done: float


async def load(stack: Stack, seconds: float, changes: list[tuple[float, object]]) -> list[Sent]:
    """Requests from 24 concurrent clients for at least ``seconds``; each change is made at its offset,
    but not before the reload of the one before it has happened (a fresh clone compiles the changed pack
    without a cache, and under load that takes longer than on an idle machine), and the load goes on 5 s
    past the last reload (300 s at most: the shipped pack, 200-odd rules, takes seconds to compile on an
    idle machine and several times that under this load on two shared cores). Returns what each request
    got."""
    results: list[Sent] = []
    started = time.monotonic()
    ends = [started + seconds]
    body = {"model": "demo-small", "messages": [{"role": "user", "content": PROMPT}]}
    limits = httpx.Limits(max_connections=24, max_keepalive_connections=24)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < ends[0]:
            now = time.monotonic() - started
            try:
                answer = await http.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
                text = (
                    answer.json()["choices"][0]["message"]["content"]
                    if answer.status_code == 200
                    else answer.text
                )
                results.append(Sent(now, answer.status_code, text, time.monotonic() - started))
            except httpx.HTTPError as exc:
                results.append(Sent(now, 0, repr(exc), time.monotonic() - started))

    async def changer() -> None:
        for offset, change in changes:
            await asyncio.sleep(max(0.0, offset - (time.monotonic() - started)))
            # The load runs until every change has been made and seen, however long a reload took.
            ends[0] = max(ends[0], time.monotonic() + RELOAD_WITHIN)
            before = await asyncio.to_thread(snapshot, stack)
            await asyncio.to_thread(change)  # type: ignore[arg-type]
            deadline = time.monotonic() + RELOAD_WITHIN
            while time.monotonic() < deadline:
                now = await asyncio.to_thread(snapshot, stack)
                if now["reloads"] != before["reloads"] or now["refused"] != before["refused"]:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # answers under the new snapshot only, before the next change
        ends[0] = max(started + seconds, min(time.monotonic() + 5, started + 300))

    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(24)), changer())
    return results


def test_rule_and_policy_changes_under_load_fail_no_request(reloading: Stack, folder: Path) -> None:
    first = snapshot(reloading)["version"]
    marks: dict[str, float] = {}

    def add_rule() -> None:
        marks["rule"] = time.monotonic()
        replace_file(folder / "rules" / "projects.yaml", PROJECT_RULE)

    def change_policy() -> None:
        marks["policy"] = time.monotonic()
        policies = folder / "policies" / "default.yaml"
        replace_file(policies, policies.read_text() + ALLOW_EMAIL)

    started = time.monotonic()
    results = asyncio.run(load(reloading, 30, [(8, add_rule), (18, change_policy)]))
    statuses = Counter(r.status for r in results)
    assert statuses == {200: len(results)}, statuses.most_common(5)
    rate = len(results) / (results[-1].at - results[0].at)
    rule_at, policy_at = marks["rule"] - started, marks["policy"] - started
    # Before each change the old behaviour; within a few seconds after it, the new one, for good.
    before = [r.text for r in results if r.at < rule_at]
    assert before
    assert all("PRJ-1234" in text and "jane@example.com" not in text for text in before)
    masked_project = [r for r in results if "PRJ-1234" not in r.text]
    assert masked_project
    assert (
        min(r.at for r in masked_project) - rule_at < RELOAD_WITHIN
    )  # compiled while serving (no cache on a fresh clone)
    # A request sent after an answer showed the new rule reached extproc after the swap, whatever the
    # load did to the order in which requests sent earlier were served: it must get the new rule.
    swapped = min(r.done for r in masked_project)
    after_rule = [r.text for r in results if swapped < r.at < policy_at]
    assert after_rule
    stale = [
        (round(r.at - rule_at, 2), r.text)
        for r in results
        if swapped < r.at < policy_at and "[REDACTED:PROJECT]" not in r.text
    ]
    assert not stale, (
        round(swapped - rule_at, 2),
        round(policy_at - rule_at, 2),
        len(stale),
        stale[:3],
    )
    email_allowed = [r for r in results if "jane@example.com" in r.text]
    assert email_allowed
    assert min(r.at for r in email_allowed) - policy_at < RELOAD_WITHIN
    allowed = min(r.done for r in email_allowed)
    assert all("jane@example.com" in r.text for r in results if r.at > allowed)
    shown = snapshot(reloading)
    assert shown["version"] != first
    assert shown["reloads"] == 2  # type: ignore[comparison-overlap]
    assert rate > 50, f"{rate:.0f} requests a second: too few to call it load"


def test_a_broken_change_is_refused_while_the_old_rules_keep_masking(reloading: Stack, folder: Path) -> None:
    before = snapshot(reloading)

    def break_rules() -> None:
        (folder / "rules" / "broken.yaml").write_text(
            PROJECT_RULE.replace("id: project-codename", "id: broken\n  pattern2: x"), encoding="utf-8"
        )

    results = asyncio.run(load(reloading, 6, [(1, break_rules)]))
    assert Counter(r.status for r in results) == {200: len(results)}
    assert len({r.text for r in results}) == 1  # masked the same way throughout
    assert "PRJ-1234" not in results[-1].text or "jane@example.com" not in results[-1].text
    shown = snapshot(reloading)
    assert shown["version"] == before["version"]
    problems = shown["last_error"]["problems"]  # type: ignore[index]
    assert any("broken.yaml" in p for p in problems), problems
    (folder / "rules" / "broken.yaml").unlink()
