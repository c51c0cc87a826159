"""Notifications: a webhook POST when an approval starts waiting, so approvers learn of it without watching
the page.

The service calls ``Notifier.listener`` inside an approval step, on the request path of the exchange that
asked. So the listener only puts the event on a bounded queue and returns: it never waits, never does I/O
and never raises. A background task sends what is queued, one notification at a time, retrying what may
succeed later (connection errors, timeouts, 429 and 5xx, after ``Retry-After`` when the receiver gives
one) with exponential backoff and jitter, up to ``attempts`` tries. When the queue is full, a notification
is dropped and logged: a slow or broken receiver costs notifications, never requests.

The body names the approval, who asked, where and why, and links the page (``approve_url``). It never
carries the prompt, masked or not, only its length: a chat channel or a webhook receiver is not a place
approvers' decisions need the text to reach, and the page shows it to the approver groups only. Neither
the webhook URL nor the body is logged: a Slack incoming-webhook URL is itself a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp

from extproc.approvals.model import Approval, Event
from extproc.settings import WebhookSettings

log = logging.getLogger("extproc.approvals.notify")

MAX_RETRY_AFTER_SECONDS: Final = 60.0
"""A receiver's ``Retry-After`` is honoured up to this: one receiver asking for an hour would otherwise
hold every notification behind it for that hour."""

USER_AGENT: Final = "extproc-approvals"
FIELD_CHARS: Final = 300
"""Longest value shown in one field of a Slack message (Slack's own limit is 2,000 per field)."""


class Notifier:
    """Sends a webhook for every ``requested`` event given to ``listener``; ``start`` and ``stop`` run the
    sending task on the server's event loop.

    ``backoff_seconds`` is the first retry's delay, doubled per attempt up to ``max_backoff_seconds``, each
    delay drawn between half and all of it (so replicas that failed together do not retry together).
    ``sent``, ``failed`` and ``dropped`` count notifications delivered, given up on and never queued."""

    def __init__(
        self,
        settings: WebhookSettings,
        approve_url: Callable[[str], str],
        *,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._approve_url = approve_url
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._jitter = jitter
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=settings.queue_size)
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def listener(self, event: Event) -> None:
        """Queues a notification for a ``requested`` event; ignores other kinds. Never blocks or raises."""
        try:
            if event.kind != "requested":
                return
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning(
                "approval_notification_dropped",
                extra={
                    "approval_id": event.approval.id,
                    "reason": f"{self._settings.queue_size} notifications are already waiting",
                },
            )
        except Exception:  # a notification is never worth failing an approval step
            log.exception("approval_notification_not_queued")

    def start(self) -> None:
        """Starts sending, on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="approval-notifier")

    async def drain(self, seconds: float) -> bool:
        """Waits up to ``seconds`` for every queued notification to be sent or given up; True if it was."""
        try:
            await asyncio.wait_for(self._queue.join(), seconds)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Gives what is queued one attempt's time to go out, then stops; what is left is logged, not sent."""
        if self._task is None:
            return
        await self.drain(self._settings.timeout_seconds)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if not self._queue.empty():
            log.warning("approval_notifications_unsent", extra={"count": self._queue.qsize()})

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": USER_AGENT}) as session:
            while True:
                event = await self._queue.get()
                try:
                    await self._deliver(session, event)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.failed += 1
                    log.exception("approval_notification_failed", extra={"approval_id": event.approval.id})
                finally:
                    self._queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, event: Event) -> None:
        approval = event.approval
        data = json.dumps(self.body(event)).encode("utf-8")
        attempts = self._settings.attempts
        problem = ""
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            try:
                async with session.post(
                    self._settings.url,
                    data=data,
                    headers={"Content-Type": "application/json"},
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    if 200 <= status < 300:
                        self.sent += 1
                        log.info(
                            "approval_notified",
                            extra={"approval_id": approval.id, "status": status, "attempt": attempt},
                        )
                        return
                    problem = f"HTTP {status}"
                    if status != 429 and status < 500:
                        break  # the receiver refuses this body: the same body again will not help
                    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            if attempt == attempts:
                break
            delay = self._delay(attempt) if retry_after is None else retry_after
            log.info(
                "approval_notification_retry",
                extra={"approval_id": approval.id, "attempt": attempt, "problem": problem, "delay": delay},
            )
            await asyncio.sleep(delay)
        self.failed += 1
        log.warning(
            "approval_notification_failed",
            extra={"approval_id": approval.id, "attempts": attempt, "problem": problem},
        )

    def _delay(self, attempt: int) -> float:
        ceiling = min(self._max_backoff, self._backoff * 2.0 ** (attempt - 1))
        return ceiling / 2 + self._jitter() * ceiling / 2

    # -- bodies ---------------------------------------------------------------------------------------

    def body(self, event: Event) -> dict[str, Any]:
        """The JSON POSTed for ``event``: generic or Slack, as the settings choose."""
        if self._settings.format == "slack":
            return slack_body(event.approval, self._approve_url(event.approval.id))
        return generic_body(event, self._approve_url(event.approval.id))


def generic_body(event: Event, approve_url: str) -> dict[str, Any]:
    """The approval as JSON for any receiver: everything an approver needs to decide whether to look,
    never the prompt (its length only)."""
    request = event.approval.request
    return {
        "event": event.kind,
        "approval_id": request.id,
        "approve_url": approve_url,
        "requester": {
            "subject": request.requester.subject,
            "issuer": request.requester.issuer,
            "groups": list(request.requester.groups),
        },
        "route": request.route,
        "model": request.model,
        "rule_ids": list(request.rule_ids),
        "policy": request.policy_id,
        "approver_groups": list(request.approver_groups),
        "min_approvals": request.min_approvals,
        "require_all_groups": request.require_all_groups,
        "mode": request.mode,
        "created": _iso(request.created),
        "expires": _iso(request.created + request.ttl_seconds),
        "prompt_chars": len(request.prompt),
        "decision_id": request.decision_id,
    }


def slack_body(approval: Approval, approve_url: str) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` for notifications and clients without blocks, and
    blocks with the facts and a button to the page. Values are escaped for Slack's markup (the route and
    the model are the caller's words); a button needs an absolute URL, so without ``approvals.public_url``
    the page's path is shown as text instead."""
    request = approval.request
    who = _slack(request.requester.subject)
    where = f"{_slack(request.model or 'no model')} on {_slack(request.route)}"
    absolute = approve_url.startswith(("https://", "http://"))
    link = f"<{approve_url}|review it>" if absolute else f"review it at {_slack(approve_url)}"
    text = f"Approval needed: {who} asked {where} (rules: {_slack(', '.join(request.rule_ids))}); {link}"
    facts = [
        ("Requester", f"{request.requester.subject} ({', '.join(request.requester.groups) or 'no groups'})"),
        ("Route", request.route),
        ("Model", request.model or "none"),
        ("Rules", ", ".join(request.rule_ids)),
        ("Policy", request.policy_id),
        ("Approver groups", ", ".join(request.approver_groups)),
        ("Approvals needed", str(request.min_approvals)),
        ("Prompt", f"{len(request.prompt)} characters, masked, shown on the page"),
        ("Expires", _iso(request.created + request.ttl_seconds)),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": "Approval needed"}},
        {
            "type": "section",
            "fields": [{"type": "mrkdwn", "text": f"*{name}*\n{_slack(value)}"} for name, value in facts],
        },
    ]
    if absolute:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Review"},
                        "url": approve_url,
                        "style": "primary",
                    }
                ],
            }
        )
    else:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": link}]})
    return {"text": text, "blocks": blocks}


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (delay-seconds or an HTTP date), capped; None when absent or
    unreadable (the backoff applies)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, seconds))


def _slack(value: str) -> str:
    """Text for Slack's markup: its three control characters escaped, and no longer than a field."""
    if len(value) > FIELD_CHARS:
        value = value[: FIELD_CHARS - 1] + "…"
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
