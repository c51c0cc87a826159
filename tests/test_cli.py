"""The command line as a security team uses it: rules check, scan, hash-list."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert result.returncode == 1  # regression: --mask exited 0 although it masked, against the README
    assert result.stdout == "[REDACTED:PROJECT_NAME] for [REDACTED:CUSTOMER_ID]"


def test_scan_mask_of_clean_text_exits_0() -> None:
    result = extproc("scan", "--mask", stdin="nothing to see here")
    assert (result.returncode, result.stdout) == (0, "nothing to see here")


def test_scan_keeps_the_compiled_pack_in_the_users_cache_folder(tmp_path: Path) -> None:
    """Regression: every `scan` compiled the pack again (5 to 7 s for one line). Without detect.cache_dir
    the compiled databases go to ~/.cache/extproc/hyperscan, keyed by the pack and Hyperscan's version."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("EXTPROC_DETECT__CACHE_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)
    first = extproc("scan", stdin="card 4111 1111 1111 1111", env=env)
    cached = sorted(p.name for p in (tmp_path / ".cache" / "extproc" / "hyperscan").iterdir())
    assert any(name.startswith("db-") for name in cached)
    again = extproc("scan", stdin="card 4111 1111 1111 1111", env=env)
    assert (again.returncode, again.stdout) == (first.returncode, first.stdout) == (1, first.stdout)
    assert sorted(p.name for p in (tmp_path / ".cache" / "extproc" / "hyperscan").iterdir()) == cached


def test_the_cache_folder_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extproc.identity.dev import default_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "extproc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the spec: a relative path is invalid
    assert default_dir() == tmp_path / "home" / ".cache" / "extproc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_dir() == tmp_path / "home" / ".cache" / "extproc"


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


def test_token_mints_a_dev_token_the_dev_identity_accepts(tmp_path: Path) -> None:
    import asyncio

    from extproc.identity import Verifier
    from extproc.identity.dev import DEV_ISSUER, dev_identity
    from extproc.settings import IdentitySettings

    done = extproc("token", "--dev-dir", str(tmp_path), "--groups", "engineering, pilot", "--subject", "bob")
    assert done.returncode == 0, done.stderr
    verifier = Verifier(IdentitySettings.model_validate(dev_identity(tmp_path)))

    async def verify() -> None:
        await verifier.start()
        try:
            principal = verifier.verify(done.stdout.strip())
        finally:
            await verifier.close()
        assert (principal.subject, principal.issuer) == ("bob", DEV_ISSUER)
        assert principal.groups == {"engineering", "pilot"}

    asyncio.run(verify())
    assert (tmp_path / "dev-key.pem").stat().st_mode & 0o077 == 0  # the private key is the owner's only


def test_token_refuses_settings_that_trust_a_real_issuer(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}', encoding="utf-8")
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        "identity:\n  mode: jwt\n  issuers:\n    - issuer: https://login.example.com\n"
        f"      audiences: [llm]\n      jwks_file: {jwks}\n      algorithms: [RS256]\n",
        encoding="utf-8",
    )
    done = extproc("token", "--dev-dir", str(tmp_path), "--config", str(settings))
    assert done.returncode == 2
    assert "refused" in done.stderr
    assert "https://login.example.com" in done.stderr
    assert done.stdout == ""


def _a_record(tmp_path: Path, keys: dict[str, Path]) -> Path:
    from extproc.audit.keys import load_signing_key
    from extproc.audit.writer import RecordWriter

    path = tmp_path / "session.jsonl"
    writer = RecordWriter(path=path, signing_key=load_signing_key(keys["signing_key"]), checkpoint_every=2)
    writer.start()
    for n in range(5):
        writer.submit({"type": "exchange", "id": f"d-{n}", "decision": "masked"})
        writer.flush()  # one batch per record: a checkpoint after every second one
    writer.close()
    return path


def test_audit_keygen_verify_and_show(tmp_path: Path) -> None:
    made = extproc("audit", "keygen", str(tmp_path / "keys"))
    assert made.returncode == 0, made.stderr
    assert "sealing_key_file" in made.stderr
    keys = {name: tmp_path / "keys" / name.replace("_", ".") for name in ("signing_key", "signing_pub")}
    path = _a_record(tmp_path, keys)
    signed = extproc("audit", "verify", str(path), "--public-key", str(keys["signing_pub"]))
    assert signed.returncode == 0, signed.stderr
    assert "hash chain intact; signed through seq" in signed.stdout
    unsigned = extproc("audit", "verify", str(path))
    assert unsigned.returncode == 0
    assert "signatures NOT checked" in unsigned.stdout
    shown = extproc("audit", "show", "d-3", "--file", str(path))
    assert json.loads(shown.stdout)["id"] == "d-3"
    assert extproc("audit", "show", "d-99", "--file", str(path)).returncode == 1


def test_audit_verify_anchors_catch_a_truncation(tmp_path: Path) -> None:
    extproc("audit", "keygen", str(tmp_path / "keys"))
    keys = {name: tmp_path / "keys" / name.replace("_", ".") for name in ("signing_key", "signing_pub")}
    path = _a_record(tmp_path, keys)
    lines = path.read_text().splitlines()
    last = json.loads(lines[-1])  # the final checkpoint, logged as audit_checkpoint when it was written
    anchor = f"{last['seq']}:{last['hash']}"
    checkpoints = [n for n, line in enumerate(lines) if json.loads(line)["type"] == "checkpoint"]
    assert len(checkpoints) >= 2
    path.write_text("\n".join(lines[: checkpoints[-2] + 1]) + "\n")  # cut back to an earlier checkpoint
    plain = extproc("audit", "verify", str(path), "--public-key", str(keys["signing_pub"]))
    assert plain.returncode == 0  # the file alone cannot show it
    anchored = extproc(
        "audit", "verify", str(path), "--public-key", str(keys["signing_pub"]), "--anchor", anchor
    )
    assert anchored.returncode == 1
    assert "truncated" in anchored.stderr


def test_audit_commands_give_clear_errors(tmp_path: Path) -> None:
    missing = extproc("audit", "verify", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2
    assert "nope.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad_anchor = extproc("audit", "verify", str(tmp_path), "--anchor", "x")
    assert bad_anchor.returncode == 2
    assert "SEQ:HASH" in bad_anchor.stderr
    wrong_key = tmp_path / "not-a-key.pem"
    wrong_key.write_text("hello")
    replay = extproc("audit", "replay", str(tmp_path / "nope.jsonl"), "--key", str(wrong_key), "--rules", "x")
    assert replay.returncode == 2
    assert "not-a-key.pem" in replay.stderr
    assert "Traceback" not in replay.stderr
