from pathlib import Path

import pytest

from extproc.errors import ConfigError
from extproc.settings import approver_token, load_settings


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTPROC_CONFIG", raising=False)
    settings = load_settings()
    assert settings.server.grpc_address == "127.0.0.1:50051"
    assert settings.limits.max_request_bytes == 16 * 1024 * 1024


def test_file_then_environment_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(
        "server:\n  grpc_address: 0.0.0.0:6000\n  drain_seconds: 7\nlog:\n  format: text\n", encoding="utf-8"
    )
    monkeypatch.setenv("EXTPROC_SERVER__DRAIN_SECONDS", "1.5")
    settings = load_settings(path, server={"grpc_address": "127.0.0.1:0"})
    assert settings.server.grpc_address == "127.0.0.1:0"  # the override wins
    assert settings.server.drain_seconds == 1.5  # the environment beats the file
    assert settings.log.format == "text"  # the file beats the default


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("limits:\n  max_request_bytes: 2048\n", encoding="utf-8")
    monkeypatch.setenv("EXTPROC_CONFIG", str(path))
    assert load_settings().limits.max_request_bytes == 2048


def test_unknown_key_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  grpc_adress: 127.0.0.1:1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: server\.grpc_adress"):
        load_settings(path)


def test_a_bad_environment_override_is_blamed_on_its_variable_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: an invalid EXTPROC_LIMITS__MAX_REQUEST_BYTES was reported as an error of the file."""
    path = tmp_path / "ok.yaml"
    path.write_text("limits:\n  max_request_bytes: 2048\n", encoding="utf-8")
    monkeypatch.setenv("EXTPROC_LIMITS__MAX_REQUEST_BYTES", "lots")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert str(raised.value).startswith("$EXTPROC_LIMITS__MAX_REQUEST_BYTES: limits.max_request_bytes:")
    assert "ok.yaml" not in str(raised.value)


def test_invalid_value_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  grpc_address: nowhere\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_settings(path)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("server: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml")


def test_the_approvers_api_address_defaults_next_to_the_grpc_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTPROC_CONFIG", raising=False)
    monkeypatch.delenv("EXTPROC_APPROVALS__API_ADDRESS", raising=False)  # conftest: port 0 for the tests
    assert load_settings().approvals.api_address == "127.0.0.1:50052"
    assert load_settings(approvals={"api_address": ""}).approvals.api_address == ""  # not served
    with pytest.raises(ConfigError, match=r"approvals\.api_address: .*expected HOST:PORT"):
        load_settings(approvals={"api_address": "50052"})


def test_the_approver_token_in_the_environment_is_no_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """$EXTPROC_APPROVER_TOKEN is the person's credential for `extproc approvals`: it must not be read as
    a settings section (every EXTPROC_* variable is one), which unknown keys would refuse."""
    monkeypatch.setenv("EXTPROC_APPROVER_TOKEN", "eyJ.token.here")
    load_settings()
    assert approver_token() == "eyJ.token.here"
    monkeypatch.setenv("EXTPROC_APPROVER_TOKEN", "")
    assert approver_token() is None


def test_lists_and_mappings_come_from_the_environment_in_flow_style(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTPROC_POLICY__PATHS", '["/etc/extproc/policies", "/etc/extproc/more.yaml"]')
    monkeypatch.setenv("EXTPROC_UPSTREAM__STRIP_HEADERS", "[authorization, x-api-key]")
    settings = load_settings(None)
    assert settings.policy.paths == ["/etc/extproc/policies", "/etc/extproc/more.yaml"]
    assert settings.upstream.strip_headers == ["authorization", "x-api-key"]
    monkeypatch.setenv("EXTPROC_POLICY__PATHS", "[unclosed")
    with pytest.raises(ConfigError, match=r"\$EXTPROC_POLICY__PATHS: not a YAML"):
        load_settings(None)
