"""Approval notifications against a real local webhook receiver: what the bodies say (never the prompt),
what is retried and how long after, and that a slow receiver never slows the approval step."""

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc.approvals.model import Approval, ApprovalRequest, Event, Person
from extproc.approvals.notify import MAX_RETRY_AFTER_SECONDS, Notifier, retry_after_seconds
from extproc.settings import WebhookSettings
from tests.approval_server import approval_server, requested

PROMPT = "wire 12,000 to [REDACTED:IBAN_CODE] before friday, my password is hunter2"


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """A webhook receiver that answers each POST with the next scripted (status, headers), then 200s;
    ``hang`` makes it hold every request until the test ends."""

    url: str = ""
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    hang: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Received(time.monotonic(), dict(request.headers), await request.read()))
        if self.hang:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), 30)
        status, headers = self.script.pop(0) if self.script else (200, {})
        return web.Response(status=status, headers=headers, text="ok")

    async def count(self, expected: int, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while len(self.received) < expected:
            assert time.monotonic() < deadline, f"{len(self.received)} of {expected} requests arrived"
            await asyncio.sleep(0.01)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield found
    found.released.set()
    await runner.cleanup()


def approval(prompt: str = PROMPT, **fields: Any) -> Approval:
    values: dict[str, Any] = {
        "id": "a" * 32,
        "created": 1_800_000_000.0,
        "requester": Person("alice", "https://idp.example", ("analysts", "emea")),
        "route": "/v1/chat/completions",
        "model": "demo-small",
        "prompt": prompt,
        "rule_ids": ("iban", "password-keyword"),
        "body_digest": "0" * 64,
        "policy_id": "payments",
        "approver_groups": ("fraud-approvers",),
        "min_approvals": 2,
        "decision_id": "d" * 32,
        **fields,
    }
    return Approval(ApprovalRequest(**values))


def event(kind: Any = "requested", **fields: Any) -> Event:
    made = approval(**fields)
    return Event(kind, made, made.request.requester, 1_800_000_000.0)


def page(approval_id: str) -> str:
    return f"https://approvals.example/approvals/{approval_id}"


@contextlib.asynccontextmanager
async def notifier(url: str, **settings: Any) -> AsyncIterator[Notifier]:
    running = Notifier(
        WebhookSettings(url=url, **settings), page, backoff_seconds=0.01, max_backoff_seconds=0.05
    )
    running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_the_generic_body_names_the_approval_and_never_the_prompt(receiver: Receiver) -> None:
    async with notifier(receiver.url) as sender:
        sender.listener(event("voted"))  # only an approval that starts waiting is announced
        sender.listener(event())
        assert await sender.drain(10)
    assert len(receiver.received) == 1
    (got,) = receiver.received
    assert got.headers["Content-Type"] == "application/json"
    assert b"hunter2" not in got.body
    assert b"IBAN_CODE" not in got.body
    assert got.json == {
        "event": "requested",
        "approval_id": "a" * 32,
        "approve_url": page("a" * 32),
        "requester": {"subject": "alice", "issuer": "https://idp.example", "groups": ["analysts", "emea"]},
        "route": "/v1/chat/completions",
        "model": "demo-small",
        "rule_ids": ["iban", "password-keyword"],
        "policy": "payments",
        "approver_groups": ["fraud-approvers"],
        "min_approvals": 2,
        "require_all_groups": False,
        "mode": "ticket",
        "created": "2027-01-15T08:00:00Z",
        "expires": "2027-01-15T09:00:00Z",
        "prompt_chars": len(PROMPT),
        "decision_id": "d" * 32,
    }
    assert (sender.sent, sender.failed, sender.dropped) == (1, 0, 0)


async def test_the_slack_body_links_the_page_and_escapes_the_caller_s_words(receiver: Receiver) -> None:
    async with notifier(receiver.url, format="slack") as sender:
        sender.listener(event(route="/v1/<!channel>&x", model="<https://evil.example|click>"))
        assert await sender.drain(10)
    body = receiver.received[0].json
    assert set(body) == {"text", "blocks"}
    assert body["text"].startswith("Approval needed: alice asked ")
    assert f"<{page('a' * 32)}|review it>" in body["text"]
    assert "&lt;!channel&gt;&amp;x" in body["text"]
    assert "<!channel>" not in json.dumps(body)
    assert "<https://evil.example" not in json.dumps(body)
    assert "hunter2" not in json.dumps(body)
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "actions"]
    fields = [f["text"] for f in body["blocks"][1]["fields"]]
    assert all(f["type"] == "mrkdwn" for f in body["blocks"][1]["fields"])
    assert "*Requester*\nalice (analysts, emea)" in fields
    assert "*Rules*\niban, password-keyword" in fields
    assert f"*Prompt*\n{len(PROMPT)} characters, masked, shown on the page" in fields
    (button,) = body["blocks"][2]["elements"]
    assert (button["type"], button["url"]) == ("button", page("a" * 32))


async def test_retried_after_two_503s(receiver: Receiver) -> None:
    receiver.script = [(503, {}), (503, {})]
    async with notifier(receiver.url, attempts=5) as sender:
        sender.listener(event())
        assert await sender.drain(10)
        assert (sender.sent, sender.failed) == (1, 0)
    assert len(receiver.received) == 3
    assert receiver.received[0].body == receiver.received[2].body


async def test_retry_after_is_honoured(receiver: Receiver) -> None:
    receiver.script = [(429, {"Retry-After": "1"})]
    async with notifier(receiver.url) as sender:
        sender.listener(event())
        assert await sender.drain(10)
        assert sender.sent == 1
    first, second = receiver.received
    assert second.at - first.at >= 0.95  # the backoff alone would have waited 10 ms


async def test_gives_up_after_the_attempts_and_goes_on_with_the_next(receiver: Receiver) -> None:
    receiver.script = [(500, {})] * 3
    async with notifier(receiver.url, attempts=3) as sender:
        sender.listener(event())
        sender.listener(event(id="b" * 32))
        assert await sender.drain(10)
        assert (sender.sent, sender.failed) == (1, 1)
    assert [r.json["approval_id"] for r in receiver.received] == ["a" * 32] * 3 + ["b" * 32]


async def test_a_4xx_other_than_429_is_not_retried(receiver: Receiver) -> None:
    receiver.script = [(400, {})]
    async with notifier(receiver.url, attempts=5) as sender:
        sender.listener(event())
        assert await sender.drain(10)
        assert (sender.sent, sender.failed) == (0, 1)
    assert len(receiver.received) == 1


async def test_connection_errors_are_retried() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with notifier(f"http://127.0.0.1:{port}/hook", attempts=3) as sender:
        started = time.monotonic()
        sender.listener(event())
        assert await sender.drain(10)
        assert (sender.sent, sender.failed) == (0, 1)
        assert time.monotonic() - started < 5


async def test_a_hung_receiver_never_delays_the_approval_step(receiver: Receiver) -> None:
    receiver.hang = True
    async with notifier(receiver.url, timeout_seconds=0.3, attempts=2, queue_size=2) as sender:
        sender.listener(event())
        await receiver.count(1)  # the sender now waits on the receiver
        waiting = [event(id=f"{number:032x}") for number in range(50)]
        started = time.perf_counter()
        for each in waiting:
            sender.listener(each)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.1, f"50 listener calls took {elapsed:.3f} s"
        # Two wait in the queue; the other 48 were dropped (and logged).
        assert sender.dropped == 48
        assert await sender.drain(10)
        assert (sender.sent, sender.failed) == (0, 3)  # each timed out twice
    assert len(receiver.received) == 6


async def test_a_hung_receiver_does_not_hold_the_stop_past_one_attempt(receiver: Receiver) -> None:
    receiver.hang = True
    sender = Notifier(WebhookSettings(url=receiver.url, timeout_seconds=0.5, attempts=20), page)
    sender.start()
    sender.listener(event())
    await receiver.count(1)
    started = time.monotonic()
    await sender.stop()
    assert time.monotonic() - started < 2


def test_retry_after_values() -> None:
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("-5") == 0.0
    assert retry_after_seconds("86400") == MAX_RETRY_AFTER_SECONDS
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    later = retry_after_seconds(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30)))
    assert later is not None
    assert 25 <= later <= 31


async def test_the_server_announces_what_its_approval_service_is_asked(
    receiver: Receiver, tmp_path: Path
) -> None:
    approvals = {"public_url": "https://approvals.example/", "webhook": {"url": receiver.url}}
    async with approval_server(tmp_path, approvals=approvals) as server:
        asked = await requested(server, prompt=PROMPT)
        await receiver.count(1)
    (got,) = receiver.received
    assert got.json["approval_id"] == asked.id
    assert got.json["approve_url"] == f"https://approvals.example/approvals/{asked.id}"
    assert b"hunter2" not in got.body


async def test_the_client_is_closed_with_the_notifier(receiver: Receiver) -> None:
    # The notifier's HTTP client lives in its task: a stop leaves no session or connection open
    # (pytest turns an unclosed-session warning into a failure).
    async with notifier(receiver.url) as sender:
        sender.listener(event())
        assert await sender.drain(10)
    async with aiohttp.ClientSession() as session, session.post(receiver.url, data=b"{}") as response:
        assert response.status == 200
