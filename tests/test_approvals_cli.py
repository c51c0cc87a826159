"""`extproc approvals ...` against the real Server (identity mode jwt with the dev key, the approvers'
API on a free port), the command in a subprocess as an approver runs it."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from extproc.approvals.model import Person
from extproc.identity.dev import DEV_ISSUER
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server

from .test_approvals_api import PUBLIC_URL, ask
from .test_approvals_api_server import mint, settings_for


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    settings = settings_for(tmp_path)
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    yield srv
    await srv.stop()


async def approvals(
    server: Server, token: str | None, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`extproc approvals ARGS --address (the server's)` as its own process; the server keeps serving."""
    argv = [sys.executable, "-m", "extproc", "approvals", *args]
    if not any(a.startswith("--address") or a == "--config" for a in args):
        argv += ["--address", f"127.0.0.1:{server.approvals_port}"]
    if token is not None:
        argv += ["--token", token]
    # The tests' own defaults (conftest: the API on port 0) would beat a settings file the test gives.
    unset = {"EXTPROC_APPROVER_TOKEN", "EXTPROC_APPROVALS__API_ADDRESS"}
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
        check=False,
    )


async def test_list_show_approve_and_deny_from_the_command_line(server: Server, tmp_path: Path) -> None:
    bob, carol = mint(tmp_path, "bob", "approvers"), mint(tmp_path, "carol", "approvers")
    first = await server.approvals.request(ask())
    second = await server.approvals.request(ask(requester="bob", groups=("approvers",), model=None))

    listed = await approvals(server, bob, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [first.id, second.id]
    assert "pending" in lines[0]
    assert "(you may decide)" in lines[0]
    assert "(you may decide)" not in lines[1]  # bob's own request

    as_json = await approvals(server, bob, "list", "--json")
    assert as_json.returncode == 0, as_json.stderr
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [o["request"]["id"] for o in objects] == [first.id, second.id]
    assert objects[0]["status"] == "STATUS_PENDING"
    assert objects[0]["decidable"] is True
    assert objects[0]["request"]["prompt"] == "refund card **** **** **** 1111"

    shown = await approvals(server, bob, "show", first.id)
    assert shown.returncode == 0, shown.stderr
    assert "refund card **** **** **** 1111" in shown.stdout
    assert f"{PUBLIC_URL}/approvals/{first.id}" in shown.stdout
    assert "you may decide: yes" in shown.stdout

    own = await approvals(server, bob, "approve", second.id)
    assert own.returncode == 1  # refused by the rules, and the code says which
    assert "approval_self: nobody approves their own request" in own.stderr

    approved = await approvals(server, bob, "approve", first.id, "--reason", "known customer")
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip() == f"{first.id}: approved, 1 of 1 approvals"
    assert (await server.approvals.get(first.id)).status == "approved"

    denied = await approvals(server, carol, "deny", second.id, "--reason", "not this one", "--json")
    assert denied.returncode == 0, denied.stderr
    assert json.loads(denied.stdout)["status"] == "STATUS_DENIED"
    assert (await server.approvals.get(second.id)).reason == "not this one"

    again = await approvals(server, carol, "approve", second.id)
    assert again.returncode == 1
    assert "approval_closed: " in again.stderr

    missing = await approvals(server, carol, "show", "no-such-id")
    assert missing.returncode == 1
    assert "approval_not_found: " in missing.stderr

    outsider = await approvals(server, mint(tmp_path, "mallory", "engineering"), "show", first.id)
    assert outsider.returncode == 1
    assert "approval_not_approver: " in outsider.stderr


async def test_the_command_reads_the_address_from_the_settings_and_the_token_from_the_environment(
    server: Server, tmp_path: Path
) -> None:
    approval = await server.approvals.request(ask())
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"approvals:\n  api_address: 127.0.0.1:{server.approvals_port}\n")
    env = {"EXTPROC_APPROVER_TOKEN": mint(tmp_path, "bob", "approvers")}
    listed = await approvals(server, None, "list", "--config", str(settings), env=env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[0] == approval.id


async def test_usage_token_and_connection_problems_exit_2(server: Server, tmp_path: Path) -> None:
    no_token = await approvals(server, None, "list")
    assert no_token.returncode == 2
    assert "no approver token" in no_token.stderr

    bad_token = await approvals(server, "not-a-token", "list")
    assert bad_token.returncode == 2
    assert "jwt_malformed: " in bad_token.stderr

    no_reason = await approvals(server, mint(tmp_path, "bob", "approvers"), "deny", "some-id")
    assert no_reason.returncode == 2  # --reason is required
    assert "--reason" in no_reason.stderr

    with socket.socket() as unused:  # a port nothing listens on: bound, never listening
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        nobody = await approvals(server, mint(tmp_path, "bob", "approvers"), "list", "--address", address)
    assert nobody.returncode == 2
    assert "UNAVAILABLE" in nobody.stderr
    assert address in nobody.stderr

    disabled = tmp_path / "disabled.yaml"
    disabled.write_text("approvals:\n  api_address: ''\n")
    off = await approvals(server, "t", "list", "--config", str(disabled))
    assert off.returncode == 2
    assert "approvals.api_address is empty" in off.stderr


async def test_watch_prints_the_pending_approvals_then_new_ones_until_ctrl_c(
    server: Server, tmp_path: Path
) -> None:
    before = await server.approvals.request(ask())
    token = mint(tmp_path, "bob", "approvers")
    address = f"127.0.0.1:{server.approvals_port}"
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "extproc", "approvals", "watch", "--address", address, "--token", token],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None

    async def line() -> str:
        return (await asyncio.wait_for(process.stdout.readline(), 30)).decode()  # type: ignore[union-attr]

    try:
        assert (await line()).split()[0] == before.id
        created = await server.approvals.request(ask())
        assert (await line()).split()[:2] == [created.id, "pending"]
        await server.approvals.decide(created.id, Person("carol", DEV_ISSUER, ("approvers",)), True)
        assert (await line()).split()[:2] == [created.id, "approved"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err
