"""The approvers' API as `extproc serve` runs it: its own gRPC server on its own port, named in the ready
line, deciding with the server's one approval service, and stopped with the server."""

import asyncio
import logging
import time
from pathlib import Path

import grpc
import pytest

from extproc.approvals.v1 import approvals_pb2 as pb
from extproc.approvals.v1 import rpc
from extproc.identity.dev import dev_identity, mint_dev_token
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server
from extproc.settings import load_settings

from .test_approvals_api import PUBLIC_URL, ask


def settings_for(folder: Path, grace: float = 5.0, **approvals: str):  # type: ignore[no-untyped-def]
    return load_settings(
        None,
        server={
            "grpc_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "drain_seconds": 0,
            "grace_seconds": grace,
        },
        identity=dev_identity(folder),
        approvals={"api_address": "127.0.0.1:0", "public_url": PUBLIC_URL, **approvals},
    )


def mint(folder: Path, subject: str, *groups: str) -> str:
    return mint_dev_token(folder, subject, list(groups), 600)


async def test_the_server_serves_the_api_on_its_own_port_and_says_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "extproc.server")
    settings = settings_for(tmp_path)
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    try:
        [ready] = [r for r in caplog.records if r.getMessage() == "ready"]
        assert ready.__dict__["approvals"] == f"127.0.0.1:{srv.approvals_port}"
        assert srv.approvals_port not in (0, srv.grpc_port)
        # The server's one approval service is what the API decides with.
        approval = await srv.approvals.request(ask())
        token = mint(tmp_path, "bob", "approvers")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.approvals_port}") as channel:
            got = await rpc.ApprovalsStub(channel).Get(
                pb.GetRequest(id=approval.id), metadata=(("authorization", f"Bearer {token}"),)
            )
        assert got.approve_url == f"{PUBLIC_URL}/approvals/{approval.id}"
    finally:
        await srv.stop()


async def test_an_empty_api_address_serves_no_api(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "extproc.server")
    settings = settings_for(tmp_path, api_address="")
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    try:
        assert srv.approvals_port == 0
        [ready] = [r for r in caplog.records if r.getMessage() == "ready"]
        assert "approvals" not in ready.__dict__
    finally:
        await srv.stop()


async def test_without_jwt_identity_the_api_warns_that_it_refuses_everyone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = load_settings(
        None,
        server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0},
        identity={"mode": "none"},
        approvals={"api_address": "127.0.0.1:0"},
    )
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    try:
        assert [r for r in caplog.records if r.getMessage() == "approvals_api_unauthenticated"]
    finally:
        await srv.stop()


async def test_a_stopping_server_ends_watch_streams_instead_of_waiting_its_grace(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, grace=30.0)
    srv = Server(settings, Runtime(build_snapshot(settings)))
    await srv.start()
    token = mint(tmp_path, "bob", "approvers")
    pending = await srv.approvals.request(ask())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.approvals_port}") as channel:
        call = rpc.ApprovalsStub(channel).Watch(
            pb.WatchRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
        # The pending approval listed: the stream is open, and waits for changes.
        assert (await asyncio.wait_for(call.read(), 10)).request.id == pending.id
        started = time.monotonic()
        await srv.stop()
        assert time.monotonic() - started < 10
        assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
