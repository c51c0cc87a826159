"""The README names the test that holds each promise (Security model, Failing closed): every test it
names exists, so a renamed or deleted test cannot leave a promise without its evidence."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_readme_names_exists() -> None:
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", (ROOT / "README.md").read_text(encoding="utf-8")))
    defined = {
        name
        for path in (ROOT / "tests").rglob("*.py")
        for name in re.findall(
            r"^\s*(?:async\s+)?def\s+(test_[a-z0-9_]+)", path.read_text(encoding="utf-8"), re.M
        )
    }
    assert len(named) >= 20  # the security model's table alone names more
    assert sorted(named - defined) == []
