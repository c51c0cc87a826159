"""The command line as a security team uses it: rules check, scan, hash-list."""

import json
import subprocess
import sys
from pathlib import Path

from .rules_fixture import EDM_KEY_FILE, RULES

ROOT = Path(__file__).resolve().parent.parent


def extproc(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_rules_check_passes_on_the_default_pack() -> None:
    result = extproc("rules", "check", str(ROOT / "rules"))
    assert result.returncode == 0, result.stderr
    assert "samples OK" in result.stdout


def test_rules_check_fails_and_names_file_line_and_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n- id: broken\n  entity: X\n  category: pii\n  severity: low\n  pattern: 'a['\n"
        "  samples: {match: [a], no_match: [b]}\n"
    )
    result = extproc("rules", "check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:2: rule 'broken': pattern: invalid regular expression" in result.stderr


def test_scan_json_lines() -> None:
    text = "write to jane@example.com\nor call about card 4111 1111 1111 1111"
    result = extproc("scan", "--json", "--values", stdin=text)
    assert result.returncode == 1  # something was found
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    email = next(line for line in lines if line["entity"] == "EMAIL_ADDRESS")
    card = next(line for line in lines if line["entity"] == "CREDIT_CARD")
    assert text[email["start"] : email["end"]] == email["value"] == "jane@example.com"
    assert text[card["start"] : card["end"]] == "4111 1111 1111 1111"
    assert {"rule", "entity", "category", "severity", "start", "end"} <= set(email)
    assert email["category"] == "pii"


def test_scan_finds_nothing_in_clean_text() -> None:
    result = extproc("scan", stdin="nothing to see here")
    assert (result.returncode, result.stdout) == (0, "")


def test_scan_mask_with_a_rule_folder_and_an_exact_list(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "EXTPROC_DETECT__EDM_KEY_FILE": str(EDM_KEY_FILE)}
    result = extproc("scan", "--rules", str(RULES), "--mask", stdin="Bluebird-7 for CU000042", env=env)
    assert result.returncode == 0
    assert result.stdout == "[REDACTED:PROJECT_NAME] for [REDACTED:CUSTOMER_ID]"


def test_hash_list_feeds_a_hashed_rule(tmp_path: Path) -> None:
    import os

    key = tmp_path / "edm.key"
    key.write_text("another-edm-key-0123456789")
    result = extproc("rules", "hash-list", "--key-file", str(key), stdin="# ids\nZZ123456\n\nQQ654321\n")
    assert result.returncode == 0
    assert len(result.stdout.split()) == 2
    (tmp_path / "ids.sha256").write_text(result.stdout)
    (tmp_path / "r.yaml").write_text(
        "rules:\n- id: ids\n  entity: CUSTOMER_ID\n  category: confidential\n  severity: high\n"
        "  exact: {file: ids.sha256, hashed: true, token: '[A-Z]{2}[0-9]{6}'}\n"
        "  samples: {match: ['id ZZ123456'], no_match: ['id ZZ123457']}\n"
    )
    env = {**os.environ, "EXTPROC_DETECT__EDM_KEY_FILE": str(key)}
    assert extproc("rules", "check", str(tmp_path / "r.yaml"), env=env).returncode == 0
    masked = extproc(
        "scan", "--rules", str(tmp_path / "r.yaml"), "--mask", stdin="qq654321 ZZ123456", env=env
    )
    assert masked.stdout == "[REDACTED:CUSTOMER_ID] [REDACTED:CUSTOMER_ID]"
