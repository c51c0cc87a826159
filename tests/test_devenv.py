"""`extproc dev`'s settings: the dev identity is kept unless the settings file chooses a mode itself."""

from pathlib import Path

import pytest
import yaml

from extproc.devenv import Stack
from extproc.identity.dev import DEV_ISSUER
from extproc.settings import load_settings


def _extproc_settings(tmp_path: Path, text: str | None) -> tuple[Stack, dict[str, object]]:
    settings_file = None
    if text is not None:
        settings_file = tmp_path / "settings.yaml"
        settings_file.write_text(text)
    stack = Stack(
        settings_file=None if settings_file is None else str(settings_file),
        dev_identity=tmp_path / "dev",
        workdir=tmp_path / "work",
    )
    stack.workdir.mkdir()
    chosen = stack.extproc_settings_file()
    assert chosen is not None
    loaded = load_settings(chosen)
    return stack, loaded.model_dump()


@pytest.mark.parametrize(
    "text",
    [
        None,
        "limits:\n  max_request_bytes: 4096\n",
        "",
        "identity:\n  leeway_seconds: 5\n",
    ],
    ids=["no-file", "file-without-identity", "empty-file", "identity-without-mode"],
)
def test_dev_keeps_the_dev_identity_when_the_settings_choose_no_mode(
    tmp_path: Path, text: str | None
) -> None:
    stack, settings = _extproc_settings(tmp_path, text)
    identity = settings["identity"]
    assert isinstance(identity, dict)
    assert identity["mode"] == "jwt"
    assert [issuer["issuer"] for issuer in identity["issuers"]] == [DEV_ISSUER]
    assert stack.dev_identity == tmp_path / "dev"  # the curl line gets a dev token
    if text and "leeway_seconds" in text:
        assert identity["leeway_seconds"] == 5  # the file's other identity settings are kept
    if text and "max_request_bytes" in text:
        limits = settings["limits"]
        assert isinstance(limits, dict)
        assert limits["max_request_bytes"] == 4096  # and so is everything else the file says


@pytest.mark.parametrize("mode", ["none", "envoy"])
def test_dev_uses_the_mode_a_settings_file_chooses(tmp_path: Path, mode: str) -> None:
    stack, settings = _extproc_settings(tmp_path, yaml.safe_dump({"identity": {"mode": mode}}))
    identity = settings["identity"]
    assert isinstance(identity, dict)
    assert identity["mode"] == mode
    assert identity["issuers"] == []
    assert stack.dev_identity is None  # no dev token is offered: it would not be checked
