"""The lock (uv.lock) and the files the installs read (requirements/*.txt) say what pyproject.toml says:
a dependency added to, removed from or changed in one and not the others fails here, before an install
on another machine quietly differs. `make lock` rewrites all of them together."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
LOCKED = {canonicalize_name(p["name"]): p for p in LOCK["package"]}
PROJECT = LOCKED["extproc"]
# Environments the markers are compared in: the tested Python, and ones the markers tell apart.
ENVIRONMENTS = [{"python_version": v, "python_full_version": f"{v}.0"} for v in ("3.11", "3.13", "3.14")]
# The exported files: which extras and groups each holds.
EXPORTS = {
    "runtime.txt": ((), ()),
    "dev.txt": (("dev",), ()),
    "bench.txt": (("dev", "bench"), ()),
    "tools.txt": (None, ("tools",)),  # the group alone, without the project's dependencies
}

Key = tuple[str, str, tuple[str, ...], str | None, tuple[bool, ...]]


def _key(name: str, specifier: str, extras: list[str], extra: str | None, marker: str | None) -> Key:
    """A requirement as both files can be compared: canonical name, sorted specifiers, extras, the extra
    that asks for it, and the marker's value in each environment of ENVIRONMENTS."""
    clauses = [] if marker is None else [m.strip() for m in re.split(r"\band\b", marker)]
    extra_clauses = [c for c in clauses if c.replace(" ", "").startswith("extra==")]
    if extra_clauses:
        extra = extra_clauses[0].split("==")[1].strip().strip("'\"")
    rest = " and ".join(c for c in clauses if c not in extra_clauses)
    values = tuple(Marker(rest).evaluate({**env, "extra": ""}) for env in ENVIRONMENTS) if rest else ()
    specs = ",".join(sorted(str(s) for s in SpecifierSet(specifier)))
    return canonicalize_name(name), specs, tuple(sorted(extras)), extra, values


def _from_pyproject() -> set[Key]:
    keys = set()
    sections: list[tuple[str | None, list[str]]] = [(None, PYPROJECT["project"]["dependencies"])]
    sections += list(PYPROJECT["project"]["optional-dependencies"].items())
    for extra, requirements in sections:
        for line in requirements:
            req = Requirement(line)
            marker = str(req.marker) if req.marker else None
            keys.add(_key(req.name, str(req.specifier), sorted(req.extras), extra, marker))
    return keys


def _from_lock(entries: list[dict[str, Any]]) -> set[Key]:
    return {
        _key(e["name"], e.get("specifier", ""), e.get("extras", []), None, e.get("marker")) for e in entries
    }


def test_the_lock_records_every_dependency_pyproject_declares_and_no_other() -> None:
    declared, locked = _from_pyproject(), _from_lock(PROJECT["metadata"]["requires-dist"])
    assert declared - locked == set(), "in pyproject.toml, not in uv.lock: run `make lock LOCK_ARGS=`"
    assert locked - declared == set(), "in uv.lock, not in pyproject.toml: run `make lock LOCK_ARGS=`"
    assert sorted(PROJECT["metadata"]["provides-extras"]) == sorted(
        PYPROJECT["project"]["optional-dependencies"]
    )


def test_the_lock_records_the_dependency_groups_and_python_versions() -> None:
    for group, requirements in PYPROJECT["dependency-groups"].items():
        declared = {_key(r.name, str(r.specifier), [], None, None) for r in map(Requirement, requirements)}
        assert _from_lock(PROJECT["metadata"]["requires-dev"][group]) == declared, group
    assert SpecifierSet(LOCK["requires-python"]) == SpecifierSet("==3.11.*")
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]) == SpecifierSet(">=3.11,<3.12")


def test_every_locked_version_is_one_pyproject_allows() -> None:
    for entry in PROJECT["metadata"]["requires-dist"] + [
        e for group in PROJECT["metadata"]["requires-dev"].values() for e in group
    ]:
        locked = LOCKED[canonicalize_name(entry["name"])]
        assert Version(locked["version"]) in SpecifierSet(entry.get("specifier", "")), entry


def _exported(path: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, hashes) of an exported requirement file."""
    entries: dict[str, tuple[str, set[str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith((" ", "#")) or not line:
            found = re.search(r"--hash=(sha256:[0-9a-f]{64})", line)
            if found and current:
                entries[current][1].add(found.group(1))
            continue
        spec = line.split(";")[0].rstrip(" \\")
        name, _, version = spec.partition("==")
        assert version, f"{path.name}: {line!r} is not pinned"
        current = canonicalize_name(name)
        entries[current] = (version, set())
    return entries


def _closure(extras: tuple[str, ...] | None, groups: tuple[str, ...]) -> set[str]:
    """The packages an install of the project with ``extras`` (None: the groups alone) needs on 3.11."""
    env = {**ENVIRONMENTS[0], "sys_platform": "linux", "platform_machine": "x86_64"}
    todo: list[dict[str, Any]] = []
    if extras is not None:
        todo += [e for e in PROJECT["dependencies"]]
        todo += [e for extra in extras for e in PROJECT.get("optional-dependencies", {}).get(extra, [])]
    todo += [e for group in groups for e in PROJECT["dev-dependencies"][group]]
    seen: set[str] = set()
    while todo:
        entry = todo.pop()
        if "marker" in entry and not Marker(entry["marker"]).evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(entry["name"])
        package = LOCKED[name]
        wanted = [
            e for extra in entry.get("extra", []) for e in package.get("optional-dependencies", {})[extra]
        ]
        if name not in seen:
            seen.add(name)
            wanted += package.get("dependencies", [])
        todo += wanted
    return seen


@pytest.mark.parametrize("export", sorted(EXPORTS))
def test_each_exported_file_is_the_lock_for_its_extras(export: str) -> None:
    extras, groups = EXPORTS[export]
    entries = _exported(ROOT / "requirements" / export)
    assert set(entries) >= _closure(extras, groups), f"requirements/{export} lacks packages: `make lock`"
    for name, (version, hashes) in entries.items():
        locked = LOCKED[name]
        assert version == locked["version"], f"requirements/{export}: {name} {version} != uv.lock"
        files = locked.get("wheels", []) + ([locked["sdist"]] if "sdist" in locked else [])
        assert hashes, f"requirements/{export}: {name} has no hashes"
        assert hashes == {f["hash"] for f in files}, f"requirements/{export}: {name} hashes != uv.lock"


def test_an_install_says_what_is_coming_and_shows_pip_progress_on_a_terminal() -> None:
    """Regression: `make run` installed for half a minute with no output. The locked tools are already in
    this environment, so pip only confirms them: the lines it prints are what a terminal shows."""
    lock = "requirements/tools.txt"
    packages = sum(1 for line in (ROOT / lock).read_text().splitlines() if re.match(r"[A-Za-z0-9]", line))
    command = f"PYTHON={sys.executable} sh requirements/install.sh {lock}"
    in_log = subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, text=True, check=True)
    assert in_log.stdout.splitlines() == [
        f"install.sh: {packages} locked packages from {lock} into {sys.prefix}"
    ]
    script = shutil.which("script")  # util-linux: gives the install a terminal
    assert script is not None
    on_terminal = subprocess.run(
        [script, "-qec", command, "/dev/null"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert f"install.sh: {packages} locked packages" in on_terminal.stdout
    assert on_terminal.stdout.count("Requirement already satisfied") == packages
