"""A real extproc server for the approval page's tests: free ports, identity jwt trusting the dev key, and
approvals created through the server's own ApprovalService."""

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from extproc.approvals.model import Approval, ApprovalRequest, Person
from extproc.identity.dev import DEV_ISSUER, dev_identity, mint_dev_token
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server
from extproc.settings import load_settings

APPROVERS = "fraud-approvers"


@contextlib.asynccontextmanager
async def approval_server(dev_dir: Path, **sections: Any) -> AsyncIterator[Server]:
    sections = {"identity": dev_identity(dev_dir), **sections}
    settings = load_settings(
        None,
        server={
            "grpc_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "drain_seconds": 0,
            "grace_seconds": 1,
        },
        **sections,
    )
    server = Server(settings, Runtime(build_snapshot(settings)))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(drain=False)


def token(dev_dir: Path, subject: str, *groups: str) -> str:
    return mint_dev_token(dev_dir, subject, list(groups), 600)


async def requested(
    server: Server,
    prompt: str = "my card is **** **** **** 1111",
    requester: str = "alice",
    groups: tuple[str, ...] = ("analysts",),
    **fields: Any,
) -> Approval:
    """A pending approval asked by ``requester`` (a dev-issuer subject), decided by ``APPROVERS``."""
    values: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "created": time.time(),
        "requester": Person(requester, DEV_ISSUER, groups),
        "route": "/v1/chat/completions",
        "model": "demo-small",
        "prompt": prompt,
        "rule_ids": ("credit-card",),
        "body_digest": "0" * 64,
        "policy_id": "payments",
        "approver_groups": (APPROVERS,),
        **fields,
    }
    return await server.approvals.request(ApprovalRequest(**values))
