"""The approval page on the admin port: one self-contained HTML page and the small JSON API it calls.

Approvers authenticate every API call with their own bearer token (``Authorization: Bearer``), verified
like a caller's (``service.approver_from``). The page keeps the token in ``sessionStorage`` only: never a
cookie, so the browser never attaches it on its own and a cross-site page cannot make an approver's
browser vote; never the URL, so it does not reach logs, history or a ``Referer``. The POSTs still refuse
what a cross-site form could send (anything but ``application/json``, or an ``Origin`` other than this
host), as a second lock.

Everything shown comes from the API as JSON and is put into the page with ``textContent``: the prompt,
the route and the model are the caller's words, and the page must show them, never run them. The
Content-Security-Policy backs this up: no script or style but the page's own (a fresh nonce per
response), no images, no frames, no fetch but to this origin.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from extproc.approvals.model import Approval, Person
from extproc.approvals.service import ApprovalService, approver_from
from extproc.errors import HTTP_STATUS, AuthError, ExtProcError
from extproc.identity.jwt import Verifier

log = logging.getLogger("extproc.approvals.page")

MAX_REASON_CHARS: Final = 1000
"""A reason is a sentence for the record, not a document."""

MAX_BODY_BYTES: Final = 16384
"""A vote's body is ``{"reason": ...}``; anything much larger is not one."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_approval_routes(
    app: web.Application, service: ApprovalService, verifier: Callable[[], Verifier | None]
) -> None:
    """Adds the page (``GET /approvals``, ``GET /approvals/{id}``, the address ``approve_url`` gives)
    and its API (``/approvals/api/...``) to ``app``. ``verifier`` is called on every request, so the
    page always checks tokens against the verifier the server runs now."""
    api = _Api(service, verifier)
    # The API first: /approvals/{id} matches one path segment only, so neither shadows the other.
    app.router.add_get("/approvals/api/pending", api.handler(api.pending))
    app.router.add_get("/approvals/api/{id}", api.handler(api.one))
    app.router.add_post("/approvals/api/{id}/approve", api.handler(api.approve))
    app.router.add_post("/approvals/api/{id}/deny", api.handler(api.deny))
    app.router.add_get("/approvals", _page)
    app.router.add_get("/approvals/{id}", _page)


# -- the API --------------------------------------------------------------------------------------------


class _Refused(ExtProcError):
    """A request to the API that is refused before it reaches the service."""

    code = "approval_cross_site"


Step = Callable[[web.Request, Person], Awaitable[dict[str, Any]]]


class _Api:
    def __init__(self, service: ApprovalService, verifier: Callable[[], Verifier | None]) -> None:
        self._service = service
        self._verifier = verifier
        # The page is reached through approvals.public_url: a proxy in front may pass another Host on.
        public = urlsplit(service.public_url).netloc.lower()
        self._origins = frozenset({public} if public else ())

    def handler(self, step: Step) -> Handler:
        """Authenticates the approver, runs ``step`` and answers JSON; every refusal is
        ``{"error": code, "message": ...}`` with the status ``HTTP_STATUS`` gives that code."""

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                if request.method == "POST":
                    _same_site_json(request, self._origins)
                approver = approver_from(self._verifier(), request.headers.get("Authorization"))
                return _json(await step(request, approver))
            except AuthError as error:
                # Never the token, as everywhere: the code and the message only.
                answer = _error(error.code, error.message)
                answer.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
                return answer
            except ExtProcError as error:
                return _error(error.code, error.message)
            except Exception:
                log.exception("approval_page_failed", extra={"path": request.path})
                return _error("internal_error", "the approval could not be read or decided")

        return handle

    async def pending(self, _request: web.Request, approver: Person) -> dict[str, Any]:
        mine = [a for a in await self._service.pending() if _decides(approver, a)]
        return {"approver": _person(approver), "approvals": [self._view(a, approver) for a in mine]}

    async def one(self, request: web.Request, approver: Person) -> dict[str, Any]:
        approval = await self._service.get(request.match_info["id"])
        _may_see(approver, approval)
        return {"approver": _person(approver), "approval": self._view(approval, approver)}

    async def approve(self, request: web.Request, approver: Person) -> dict[str, Any]:
        return await self._vote(request, approver, approve=True)

    async def deny(self, request: web.Request, approver: Person) -> dict[str, Any]:
        return await self._vote(request, approver, approve=False)

    async def _vote(self, request: web.Request, approver: Person, *, approve: bool) -> dict[str, Any]:
        reason = await _reason(request)
        # The service applies the rules (not one's own request, approver groups only, one vote each).
        decided = await self._service.decide(request.match_info["id"], approver, approve, reason)
        return {"approver": _person(approver), "approval": self._view(decided, approver)}

    def _view(self, approval: Approval, approver: Person) -> dict[str, Any]:
        return _view(approval, self._service.approve_url(approval.id), approver)


def _same_site_json(request: web.Request, public: frozenset[str]) -> None:
    """Refuses a POST a page of another site could make the browser send.

    A cross-site form or a "simple" fetch can only send form or text content types, and a browser names
    the page's origin in ``Origin``; a script of this page sends JSON from this very host (``Host``, or
    the host of ``approvals.public_url``, in ``public``)."""
    if request.content_type != "application/json":
        raise _Refused(
            "send the vote as JSON (Content-Type: application/json)", code="unsupported_media_type"
        )
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin)
        host = parts.netloc.lower()
        if parts.scheme not in ("http", "https") or (host != request.host.lower() and host not in public):
            raise _Refused("a vote must come from the approval page itself", code="approval_cross_site")
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise _Refused("a vote must come from the approval page itself", code="approval_cross_site")


async def _reason(request: web.Request) -> str:
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise _Refused(f"a vote's body is at most {MAX_BODY_BYTES} bytes", code="body_too_large")
    if not raw.strip():
        return ""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Refused(f"the body is not JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise _Refused('the body is a JSON object: {"reason": "..."}', code="invalid_body")
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise _Refused(f"reason is a string of at most {MAX_REASON_CHARS} characters", code="invalid_body")
    return reason.strip()


def _decides(approver: Person, approval: Approval) -> bool:
    return bool(set(approver.groups) & set(approval.request.approver_groups))


def _may_see(approver: Person, approval: Approval) -> None:
    """Only the approver groups see a request: its masked prompt is still the caller's business."""
    if not _decides(approver, approval):
        groups = ", ".join(approval.request.approver_groups)
        raise _Refused(f"only members of {groups} see this request", code="approval_not_approver")


def _person(person: Person) -> dict[str, Any]:
    return {"subject": person.subject, "issuer": person.issuer, "groups": list(person.groups)}


def _view(approval: Approval, approve_url: str, approver: Person) -> dict[str, Any]:
    """What the page shows of an approval: never the body digest, which only binds the grant."""
    request = approval.request
    approving = [v for v in approval.votes if v.approve]
    voters = {(v.approver.subject, v.approver.issuer) for v in approving}
    covered = {g for v in approving for g in v.approver.groups}
    missing = [g for g in request.approver_groups if g not in covered] if request.require_all_groups else []
    return {
        "id": approval.id,
        "status": approval.status,
        "created": request.created,
        "expires": request.created + request.ttl_seconds,
        "requester": _person(request.requester),
        "route": request.route,
        "model": request.model,
        "prompt": request.prompt,
        "rule_ids": list(request.rule_ids),
        "policy": request.policy_id,
        "approver_groups": list(request.approver_groups),
        "min_approvals": request.min_approvals,
        "approvals_needed": max(0, request.min_approvals - len(voters)),
        "groups_needed": missing,
        "mode": request.mode,
        "votes": [
            {"approver": v.approver.subject, "approve": v.approve, "at": v.at, "reason": v.reason}
            for v in approval.votes
        ],
        "reason": approval.reason,
        "own_request": approver.same(request.requester),
        "approve_url": approve_url,
    }


_API_HEADERS: Final = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers=_API_HEADERS)


def _error(code: str, message: str) -> web.Response:
    return _json({"error": code, "message": message}, HTTP_STATUS[code])


# -- the page -------------------------------------------------------------------------------------------


def content_security_policy(nonce: str) -> str:
    """Only this response's own script and style run; nothing is loaded from anywhere, fetches go to
    this origin only, and no other site may frame the page (clickjacking a vote)."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


async def _page(_request: web.Request) -> web.Response:
    nonce = base64.b64encode(secrets.token_bytes(18)).decode("ascii")
    return web.Response(
        text=PAGE.replace("__NONCE__", nonce),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": content_security_policy(nonce),
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
        },
    )


PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Pending approvals</title>
<style nonce="__NONCE__">
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem;
         color: #1d1d1f; background: #f6f6f8; }
  h1 { font-size: 1.4rem; margin: .2rem 0 1rem; }
  section, article { background: #fff; border: 1px solid #d8d8de; border-radius: 6px;
                     padding: .8rem 1rem; margin-bottom: 1rem; }
  label { font-weight: 600; display: block; margin-bottom: .3rem; }
  input[type=password], input[type=text] { width: 100%; box-sizing: border-box; padding: .4rem;
                     font: inherit; border: 1px solid #b8b8c0; border-radius: 4px; }
  button { font: inherit; padding: .35rem .9rem; margin: .5rem .5rem 0 0; border-radius: 4px;
           border: 1px solid #888; background: #fff; cursor: pointer; }
  button.approve { background: #1f7a3a; border-color: #1f7a3a; color: #fff; }
  button.deny { background: #b3261e; border-color: #b3261e; color: #fff; }
  button:disabled { opacity: .5; cursor: default; }
  dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: .4rem 0; }
  dt { color: #555; }
  dd { margin: 0; overflow-wrap: anywhere; }
  pre.prompt { white-space: pre-wrap; overflow-wrap: anywhere; background: #f1f1f4; padding: .6rem;
               border-radius: 4px; max-height: 20rem; overflow: auto; margin: .3rem 0; }
  .error { color: #b3261e; font-weight: 600; }
  .result { font-weight: 600; margin-top: .4rem; }
  .muted { color: #666; }
  .hidden { display: none; }
  code { font-family: ui-monospace, monospace; }
</style>
</head>
<body>
<h1>Pending approvals</h1>
<section id="auth">
  <label for="token">Your token (a JWT of your identity provider)</label>
  <input id="token" type="password" autocomplete="off" spellcheck="false"
         placeholder="Paste it once: it is kept in this tab only">
  <button id="use-token" type="button">Use token</button>
  <button id="forget-token" type="button">Forget token</button>
  <button id="refresh" type="button">Refresh</button>
  <p id="who" class="muted"></p>
</section>
<p id="error" class="error" role="alert"></p>
<p id="scope" class="muted"></p>
<div id="approvals"></div>
<script nonce="__NONCE__">
"use strict";
(function () {
  const KEY = "extproc.approver_token";
  const byId = (id) => document.getElementById(id);
  const match = /^\\/approvals\\/([^\\/]+)\\/?$/.exec(location.pathname);
  const only = match ? decodeURIComponent(match[1]) : null;

  function token() { return sessionStorage.getItem(KEY) || ""; }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function showError(code, message) {
    const box = byId("error");
    box.textContent = code ? code + ": " + (message || "") : "";
  }

  async function call(method, path, body) {
    const headers = { "Authorization": "Bearer " + token() };
    const init = { method: method, headers: headers, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let answer;
    try {
      answer = await fetch(path, init);
    } catch (err) {
      throw { error: "network_error", message: String(err) };
    }
    let data = null;
    try { data = await answer.json(); } catch (err) { data = null; }
    if (!answer.ok) {
      throw data && data.error ? data : { error: "http_" + answer.status, message: answer.statusText };
    }
    return data;
  }

  function when(seconds) {
    return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\\.\\d+Z$/, " UTC");
  }

  function field(list, name, value) {
    list.appendChild(element("dt", name));
    const dd = element("dd", value);
    list.appendChild(dd);
    return dd;
  }

  function render(approval) {
    const card = element("article", undefined, "approval");
    card.dataset.id = approval.id;
    const title = element("h2", "Request " + approval.id);
    card.appendChild(title);
    const facts = element("dl");
    const requester = approval.requester;
    field(facts, "Asked by", requester.subject + (approval.own_request ? " (you)" : ""))
      .className = "requester";
    field(facts, "Groups", requester.groups.join(", ") || "none").className = "groups";
    field(facts, "When", when(approval.created)).className = "created";
    field(facts, "Expires", when(approval.expires)).className = "expires";
    field(facts, "Route", approval.route).className = "route";
    field(facts, "Model", approval.model === null ? "none" : approval.model).className = "model";
    field(facts, "Rules", approval.rule_ids.join(", ")).className = "rules";
    field(facts, "Policy", approval.policy).className = "policy";
    field(facts, "Approver groups", approval.approver_groups.join(", ")).className = "approver-groups";
    field(facts, "Status", approval.status).className = "status";
    let needed = String(approval.approvals_needed);
    if (approval.groups_needed.length) {
      needed += " (and one of each: " + approval.groups_needed.join(", ") + ")";
    }
    field(facts, "Approvals still needed", needed).className = "needed";
    for (const vote of approval.votes) {
      field(facts, vote.approve ? "Approved by" : "Denied by",
            vote.approver + (vote.reason ? ": " + vote.reason : ""));
    }
    card.appendChild(facts);
    card.appendChild(element("label", "Prompt (masked)"));
    card.appendChild(element("pre", approval.prompt, "prompt"));
    const result = element("p", undefined, "result");
    if (approval.status === "pending") {
      const reasonId = "reason-" + approval.id;
      const label = element("label", "Reason (required to deny)");
      label.htmlFor = reasonId;
      card.appendChild(label);
      const reason = element("input", undefined, "reason");
      reason.type = "text";
      reason.id = reasonId;
      reason.maxLength = 1000;
      card.appendChild(reason);
      const approve = element("button", "Approve", "approve");
      const deny = element("button", "Deny", "deny");
      approve.type = deny.type = "button";
      approve.addEventListener("click", () => decide(card, approval.id, "approve", reason.value));
      deny.addEventListener("click", () => {
        if (!reason.value.trim()) {
          result.textContent = "reason_required: say why you deny it";
          result.classList.add("error");
          reason.focus();
          return;
        }
        decide(card, approval.id, "deny", reason.value);
      });
      card.appendChild(approve);
      card.appendChild(deny);
    }
    card.appendChild(result);
    return card;
  }

  async function decide(card, id, verb, reason) {
    const result = card.querySelector(".result");
    const buttons = card.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    result.classList.remove("error");
    result.textContent = "Sending...";
    try {
      const data = await call("POST", "/approvals/api/" + encodeURIComponent(id) + "/" + verb,
                              { reason: reason });
      const approval = data.approval;
      card.querySelector(".status").textContent = approval.status;
      card.querySelector(".needed").textContent = String(approval.approvals_needed);
      result.textContent = verb === "approve" ? "Approved: status " + approval.status
                                              : "Denied: status " + approval.status;
      card.dataset.status = approval.status;
      showError();
    } catch (err) {
      result.textContent = err.error + ": " + (err.message || "");
      result.classList.add("error");
      card.dataset.error = err.error;
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  async function load() {
    const list = byId("approvals");
    if (!token()) {
      list.replaceChildren();
      byId("who").textContent = "No token yet: paste yours above.";
      document.body.dataset.state = "no-token";
      return;
    }
    document.body.dataset.state = "loading";
    try {
      let approvals;
      let data;
      if (only) {
        data = await call("GET", "/approvals/api/" + encodeURIComponent(only));
        approvals = [data.approval];
        byId("scope").textContent = "One request: ";
        const all = element("a", "every pending request");
        all.href = "/approvals";
        byId("scope").appendChild(all);
      } else {
        data = await call("GET", "/approvals/api/pending");
        approvals = data.approvals;
        byId("scope").textContent = approvals.length ? approvals.length + " pending for your groups"
                                                     : "Nothing is waiting for your groups.";
      }
      byId("who").textContent = "Signed in as " + data.approver.subject + " (" +
        (data.approver.groups.join(", ") || "no groups") + ")";
      list.replaceChildren(...approvals.map(render));
      showError();
      document.body.dataset.state = "loaded";
    } catch (err) {
      list.replaceChildren();
      showError(err.error, err.message);
      document.body.dataset.state = "error";
    }
  }

  byId("use-token").addEventListener("click", () => {
    const value = byId("token").value.trim().replace(/^Bearer\\s+/i, "");
    byId("token").value = "";
    if (value) sessionStorage.setItem(KEY, value);
    load();
  });
  byId("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showError();
    byId("scope").textContent = "";
    load();
  });
  byId("refresh").addEventListener("click", load);
  load();
})();
</script>
</body>
</html>
"""
