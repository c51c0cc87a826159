"""The model server's credential: read from a file or the environment, rotated without a restart."""

import logging
import os
from pathlib import Path

import pytest

from extproc.credential import Credential, CredentialUnavailable
from extproc.errors import ConfigError
from extproc.settings import UpstreamSettings


def test_a_file_credential_is_sent_as_a_bearer_token_and_callers_headers_are_stripped(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-upstream-1\n", encoding="utf-8")
    credential = Credential(UpstreamSettings(credential_file=str(key)))
    assert credential.header() == ("authorization", "Bearer sk-upstream-1")
    assert credential.strip == ("x-api-key", "api-key")


def test_a_rotated_file_takes_effect_on_the_next_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "key"
    key.write_text("first", encoding="utf-8")
    credential = Credential(UpstreamSettings(credential_file=str(key), header="X-Api-Key", scheme=""))
    assert credential.header() == ("x-api-key", "first")
    key.write_text("second-key", encoding="utf-8")
    os.utime(key, ns=(1, 10**18))  # a new mtime however coarse the file system clock is
    with caplog.at_level(logging.INFO, logger="extproc.credential"):
        assert credential.header() == ("x-api-key", "second-key")
    assert [r.message for r in caplog.records] == ["upstream_credential_rotated"]
    assert "second-key" not in caplog.text


def test_an_unreadable_file_keeps_the_last_good_credential(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("good", encoding="utf-8")
    credential = Credential(UpstreamSettings(credential_file=str(key)))
    key.unlink()
    assert credential.header() == ("authorization", "Bearer good")


def test_a_missing_or_empty_credential_is_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="cannot read the upstream credential"):
        Credential(UpstreamSettings(credential_file=str(tmp_path / "absent")))
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        Credential(UpstreamSettings(credential_file=str(tmp_path / "empty")))
    monkeypatch.delenv("MODEL_KEY", raising=False)
    with pytest.raises(ConfigError, match="MODEL_KEY"):
        Credential(UpstreamSettings(credential_env="MODEL_KEY"))


def test_an_environment_credential_and_no_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_KEY", "from-env")
    assert Credential(UpstreamSettings(credential_env="MODEL_KEY")).header()[1] == "Bearer from-env"
    unset = Credential(UpstreamSettings())
    assert not unset.configured
    with pytest.raises(CredentialUnavailable):
        unset.header()


def test_file_and_environment_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        UpstreamSettings(credential_file="/k", credential_env="K")
