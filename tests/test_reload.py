"""Hot reload: a changed rule, policy or settings file is swapped in while serving; a broken change is
refused with its file and line while the old snapshot keeps masking; a ConfigMap's symlink swap is seen;
settings read at start only are named as needing a restart."""

import asyncio
import json
import os
import shutil
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import aiohttp
import grpc
import pytest
import yaml
from aiohttp.test_utils import make_mocked_request
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from extproc.audit.record import iter_records
from extproc.reload import Reloader
from extproc.runtime import Runtime, build_snapshot, fingerprint, inputs
from extproc.server import Server
from extproc.settings import load_settings

from .redis_fixture import free_port
from .rules_fixture import EDM_KEY_FILE, PLAIN_POLICIES, RULES
from .test_server import request_headers

PROJECT_RULE = """\
rules:
- id: project-codename
  entity: PROJECT
  category: confidential
  severity: high
  pattern: '\\bPRJ-[0-9]{4}\\b'
  samples:
    match: ["see PRJ-1234 now"]
    no_match: ["PRJ-12"]
"""


def layout(tmp_path: Path) -> Path:
    """A settings file naming a rule folder and a policy folder of the test's own."""
    shutil.copytree(RULES, tmp_path / "rules")
    shutil.copytree(PLAIN_POLICIES, tmp_path / "policies")
    settings = {
        "server": {
            "grpc_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "drain_seconds": 0,
            "reload_watch_seconds": 0.1,
        },
        "identity": {"mode": "none"},
        "detect": {"rules": [str(tmp_path / "rules")], "edm_key_file": str(EDM_KEY_FILE)},
        "policy": {"paths": [str(tmp_path / "policies")]},
        "approvals": {"api_address": ""},
        "audit": {"record_path": str(tmp_path / "session.jsonl")},
    }
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    config = layout(tmp_path)
    settings = load_settings(str(config))
    running = Server(
        settings,
        Runtime(build_snapshot(settings, fingerprint(settings, str(config)))),
        load_settings=lambda: load_settings(str(config)),
        config_path=str(config),
    )
    await running.start()
    yield running
    await running.stop(drain=False)


async def masked(server: Server, text: str) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(request_headers(("content-type", "text/plain"), (":path", "/v1/x")))
        await call.read()
        await call.write(
            pb.ProcessingRequest(request_body=pb.HttpBody(body=text.encode(), end_of_stream=True))
        )
        answer: pb.ProcessingResponse = await call.read()
        await call.done_writing()
        mutation = answer.request_body.response.body_mutation
        return mutation.body.decode() if mutation.HasField("body") else text


async def admin(server: Server, method: str, path: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{server.admin_port}{path}") as answer,
    ):
        return answer.status, await answer.json()


async def until(check: object, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the reload did not happen in time")


async def test_a_new_rule_file_is_picked_up_without_a_restart(server: Server, tmp_path: Path) -> None:
    before = server.reloader.status()
    assert await masked(server, "see PRJ-1234 now") == "see PRJ-1234 now"
    (tmp_path / "rules" / "projects.yaml").write_text(PROJECT_RULE, encoding="utf-8")

    async def reloaded() -> bool:
        return server.reloader.status()["version"] != before["version"]

    await until(reloaded)
    assert await masked(server, "see PRJ-1234 now") == "see [REDACTED:PROJECT] now"
    status, shown = await admin(server, "GET", "/snapshot")
    assert status == 200
    assert "project-codename" in shown["rules"]["ids"]  # type: ignore[index]
    assert "PRJ-" not in json.dumps(shown)  # ids and counts, never a pattern
    # Each exchange names the snapshot that decided it.
    await server.stop(drain=False)
    versions = [r["snapshot"] for _, r in iter_records(tmp_path / "session.jsonl") if r["type"] == "exchange"]
    assert versions == [before["version"], shown["version"]]


async def test_a_broken_rule_is_refused_and_the_old_rules_keep_masking(
    server: Server, tmp_path: Path
) -> None:
    version = server.reloader.status()["version"]
    (tmp_path / "rules" / "broken.yaml").write_text(
        PROJECT_RULE.replace("'\\bPRJ", "'(\\bPRJ"), encoding="utf-8"
    )

    async def refused() -> bool:
        return server.reloader.status()["last_error"] is not None

    await until(refused)
    status, shown = await admin(server, "GET", "/snapshot")
    assert shown["version"] == version
    problems = shown["last_error"]["problems"]  # type: ignore[index]
    assert any(
        f"{tmp_path / 'rules' / 'broken.yaml'}:2" in p and "project-codename" in p for p in problems
    ), problems
    assert await masked(server, "mail jane@example.com") == "mail [REDACTED:EMAIL_ADDRESS]"
    status, answer = await admin(server, "POST", "/reload")  # asked again, refused again
    assert (status, answer["result"]) == (422, "refused")
    (tmp_path / "rules" / "broken.yaml").write_text(PROJECT_RULE, encoding="utf-8")

    async def fixed() -> bool:
        return server.reloader.status()["last_error"] is None

    await until(fixed)
    assert await masked(server, "see PRJ-1234") == "see [REDACTED:PROJECT]"


async def test_a_policy_change_applies_to_the_next_exchange(server: Server, tmp_path: Path) -> None:
    assert await masked(server, "mail jane@example.com") == "mail [REDACTED:EMAIL_ADDRESS]"
    policy = tmp_path / "policies" / "default.yaml"
    policy.write_text(
        policy.read_text().replace(
            "    request:\n      default: mask\n", "    request:\n      default: allow\n"
        ),
        encoding="utf-8",
    )
    status, answer = await admin(server, "POST", "/reload")
    assert (status, answer["result"]) == (200, "ok")
    assert await masked(server, "mail jane@example.com") == "mail jane@example.com"


async def test_an_exchange_under_way_finishes_on_the_snapshot_it_started_with(
    server: Server, tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = pb_grpc.ExternalProcessorStub(channel).Process()
        await call.write(request_headers(("content-type", "text/plain"), (":path", "/v1/x")))
        await call.read()  # the exchange has begun on the first snapshot
        (tmp_path / "rules" / "projects.yaml").write_text(PROJECT_RULE, encoding="utf-8")
        status, answer = await admin(server, "POST", "/reload")
        assert (status, answer["result"]) == (200, "ok")
        await call.write(
            pb.ProcessingRequest(request_body=pb.HttpBody(body=b"PRJ-1234 a@b.io", end_of_stream=True))
        )
        body = (await call.read()).request_body.response.body_mutation.body
        assert body == b"PRJ-1234 [REDACTED:EMAIL_ADDRESS]"  # the old rules: no project rule yet
        await call.done_writing()
    assert await masked(server, "PRJ-1234") == "[REDACTED:PROJECT]"


async def test_settings_read_at_start_only_are_named_as_needing_a_restart(
    server: Server, tmp_path: Path
) -> None:
    config = tmp_path / "settings.yaml"
    data = yaml.safe_load(config.read_text())
    data["server"]["grace_seconds"] = 7
    data["limits"] = {"max_request_bytes": 100}
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    status, answer = await admin(server, "POST", "/reload")
    assert (status, answer["result"]) == (200, "ok")
    shown = server.reloader.status()
    assert shown["restart_required"] == ["server"]
    assert server._runtime.snapshot.settings.server.grace_seconds == 20  # the running value stays
    assert server._runtime.snapshot.settings.limits.max_request_bytes == 100  # this one applies


async def test_reload_is_refused_from_another_host(server: Server) -> None:
    request = make_mocked_request(
        "POST", "/reload", transport=mock.Mock(get_extra_info=lambda *_: ("10.0.0.9", 1))
    )
    assert request.remote == "10.0.0.9"
    answer = await server._reload(request)
    assert answer.status == 403


def test_a_configmap_update_changes_the_fingerprint(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as files linked through ``..data`` to a timestamped folder, and
    updates it by pointing ``..data`` at a new folder: the names stay, their content changes."""
    mounted = tmp_path / "rules"
    shutil.copytree(RULES, mounted / "..2026_12_06_1")
    os.symlink("..2026_12_06_1", mounted / "..data")
    names = sorted(p.name for p in RULES.iterdir())
    for name in names:
        os.symlink(f"..data/{name}", mounted / name)
    settings = load_settings(
        None,
        detect={"rules": [str(mounted)], "edm_key_file": str(EDM_KEY_FILE)},
        policy={"paths": [str(PLAIN_POLICIES)]},
    )
    assert [p.name for p in inputs(settings) if p.parent == mounted] == names
    before = fingerprint(settings)
    assert build_snapshot(settings).version == before
    shutil.copytree(RULES, mounted / "..2026_12_06_2")
    (mounted / "..2026_12_06_2" / "basic.yaml").write_text(
        (RULES / "basic.yaml").read_text() + PROJECT_RULE[7:]
    )
    os.symlink("..2026_12_06_2", mounted / "..data_tmp")
    os.replace(mounted / "..data_tmp", mounted / "..data")  # the atomic swap kubelet makes
    assert fingerprint(settings) != before


async def test_a_rule_file_caught_half_written_is_not_loaded(tmp_path: Path) -> None:
    """An editor or ``cp`` writes a file in place: a look between two writes sees a valid but shorter
    file (one rule of two). The watcher loads only content that held still from one look to the next,
    so the half-written file never becomes the active snapshot."""
    config = layout(tmp_path)
    settings = load_settings(str(config))
    runtime = Runtime(build_snapshot(settings, fingerprint(settings, str(config))))
    reloader = Reloader(runtime, lambda: load_settings(str(config)), str(config))
    start = runtime.snapshot.version
    second_rule = PROJECT_RULE.replace("project-codename", "ticket-id").replace("PRJ", "TKT")
    whole = PROJECT_RULE + second_rule[len("rules:\n") :]
    target = tmp_path / "rules" / "projects.yaml"

    with target.open("w", encoding="utf-8") as file:
        file.write(PROJECT_RULE)  # the first write: the first rule only, a valid file on its own
        file.flush()
        await reloader.check()
        assert runtime.snapshot.version == start
        file.write(second_rule[len("rules:\n") :])  # the second write completes it
    await reloader.check()
    assert runtime.snapshot.version == start  # changed since the last look: not yet
    await reloader.check()
    assert runtime.snapshot.version == fingerprint(settings, str(config)) != start
    assert target.read_text() == whole
    ids = {rule.id for rule in runtime.snapshot.inspector.detector.rules}
    assert {"project-codename", "ticket-id"} <= ids
    assert reloader.state.reloads == 1  # the half-written content was never loaded


def test_a_rule_whose_list_is_missing_or_empty_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    """Regression: a literal list that was missing (or empty) crashed the stream model with a regex error
    instead of naming the rule and the file."""
    from extproc.errors import ConfigError

    shutil.copytree(RULES, tmp_path / "rules")
    (tmp_path / "rules" / "projects.txt").unlink()
    settings = load_settings(
        None,
        detect={"rules": [str(tmp_path / "rules")], "edm_key_file": str(EDM_KEY_FILE)},
        policy={"paths": [str(PLAIN_POLICIES)]},
    )
    with pytest.raises(ConfigError, match=r"exact.file projects.txt: cannot read"):
        build_snapshot(settings)
    (tmp_path / "rules" / "projects.txt").write_text("# no values yet\n")
    snapshot = build_snapshot(settings)  # an empty list matches nothing
    assert snapshot.inspector.detector.scan("falcon") == []


async def run_reload(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc", "reload", *args, stdout=PIPE, stderr=PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_reload_command_says_what_happened(server: Server, tmp_path: Path) -> None:
    address = f"127.0.0.1:{server.admin_port}"
    code, out, _ = await run_reload("--admin-address", address)
    assert code == 0
    assert out.startswith("reload: ok, snapshot ")
    (tmp_path / "rules" / "broken.yaml").write_text("rules: [\n", encoding="utf-8")
    code, _, err = await run_reload("--admin-address", address)
    assert code == 1
    assert "reload refused; snapshot" in err
    assert f"{tmp_path / 'rules' / 'broken.yaml'}" in err
    code, _, err = await run_reload("--admin-address", f"127.0.0.1:{free_port()}")
    assert code == 2
    assert "cannot reach" in err


async def test_reloads_are_counted_by_result_in_the_metrics(server: Server, tmp_path: Path) -> None:
    assert (await admin(server, "POST", "/reload"))[0] == 200
    (tmp_path / "rules" / "broken.yaml").write_text("rules: [\n", encoding="utf-8")
    assert (await admin(server, "POST", "/reload"))[0] == 422
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.admin_port}/metrics") as answer,
    ):
        scraped = await answer.text()
    counted = {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "extproc_reloads_total"
    }
    assert counted["ok"] >= 1
    assert counted["refused"] >= 1
