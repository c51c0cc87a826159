"""The approval page's JSON API over real HTTP on the admin port: who may see and decide what, and what a
cross-site page cannot make an approver's browser do."""

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc.server import Server
from tests.approval_server import APPROVERS, approval_server, requested, token


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dev-identity")


@pytest.fixture
async def server(dev_dir: Path) -> AsyncIterator[Server]:
    async with approval_server(dev_dir) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.admin_port}"


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def answer(response: aiohttp.ClientResponse) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = await response.json()
    return response.status, body


async def test_no_token_is_401_with_the_code_and_never_a_list(
    server: Server, http: aiohttp.ClientSession
) -> None:
    await requested(server)
    async with http.get(f"{base(server)}/approvals/api/pending") as response:
        status, body = await answer(response)
        assert status == 401
        assert body["error"] == "jwt_missing"
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    async with http.get(f"{base(server)}/approvals/api/pending", headers=bearer("not.a.jwt")) as response:
        status, body = await answer(response)
        assert (status, body["error"]) == (401, "jwt_malformed")
        assert "approvals" not in body


async def test_an_approver_lists_and_approves(
    server: Server, http: aiohttp.ClientSession, dev_dir: Path
) -> None:
    approval = await requested(server, prompt="card **** **** **** 1111")
    bob = bearer(token(dev_dir, "bob", APPROVERS))
    async with http.get(f"{base(server)}/approvals/api/pending", headers=bob) as response:
        status, body = await answer(response)
    assert status == 200
    assert body["approver"]["subject"] == "bob"
    (shown,) = [a for a in body["approvals"] if a["id"] == approval.id]
    assert shown["prompt"] == "card **** **** **** 1111"
    assert shown["requester"]["subject"] == "alice"
    assert shown["requester"]["groups"] == ["analysts"]
    assert shown["rule_ids"] == ["credit-card"]
    assert shown["policy"] == "payments"
    assert shown["approvals_needed"] == 1
    assert shown["approve_url"].endswith(f"/approvals/{approval.id}")
    assert "body_digest" not in shown

    url = f"{base(server)}/approvals/api/{approval.id}/approve"
    async with http.post(url, json={"reason": "known customer"}, headers=bob) as response:
        status, body = await answer(response)
    assert status == 200
    assert body["approval"]["status"] == "approved"
    assert (await server.approvals.get(approval.id)).status == "approved"


async def test_a_deny_keeps_its_reason(server: Server, http: aiohttp.ClientSession, dev_dir: Path) -> None:
    approval = await requested(server)
    url = f"{base(server)}/approvals/api/{approval.id}/deny"
    headers = bearer(token(dev_dir, "bob", APPROVERS))
    async with http.post(url, json={"reason": "no ticket for this"}, headers=headers) as response:
        status, body = await answer(response)
    assert (status, body["approval"]["status"]) == (200, "denied")
    decided = await server.approvals.get(approval.id)
    assert (decided.status, decided.reason) == ("denied", "no ticket for this")


async def test_a_non_approver_neither_sees_nor_decides(
    server: Server, http: aiohttp.ClientSession, dev_dir: Path
) -> None:
    approval = await requested(server)
    carol = bearer(token(dev_dir, "carol", "analysts"))
    async with http.get(f"{base(server)}/approvals/api/pending", headers=carol) as response:
        status, body = await answer(response)
    assert status == 200
    assert approval.id not in [a["id"] for a in body["approvals"]]
    async with http.get(f"{base(server)}/approvals/api/{approval.id}", headers=carol) as response:
        status, body = await answer(response)
    assert (status, body["error"]) == (403, "approval_not_approver")
    assert "prompt" not in str(body)
    url = f"{base(server)}/approvals/api/{approval.id}/approve"
    async with http.post(url, json={}, headers=carol) as response:
        status, body = await answer(response)
    assert (status, body["error"]) == (403, "approval_not_approver")
    assert (await server.approvals.get(approval.id)).status == "pending"


async def test_nobody_approves_their_own_request(
    server: Server, http: aiohttp.ClientSession, dev_dir: Path
) -> None:
    approval = await requested(server, requester="dave", groups=(APPROVERS,))
    url = f"{base(server)}/approvals/api/{approval.id}/approve"
    async with http.post(url, json={}, headers=bearer(token(dev_dir, "dave", APPROVERS))) as response:
        status, body = await answer(response)
    assert (status, body["error"]) == (403, "approval_self")
    assert (await server.approvals.get(approval.id)).status == "pending"


@pytest.mark.parametrize(
    ("headers", "data", "code", "status"),
    [
        # what an HTML form of another site can post: no JSON content type
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"reason=x", "unsupported_media_type", 415),
        ({"Content-Type": "text/plain"}, b'{"reason": "x"}', "unsupported_media_type", 415),
        # a script of another site: its origin says so
        (
            {"Content-Type": "application/json", "Origin": "https://evil.example"},
            b"{}",
            "approval_cross_site",
            403,
        ),
        ({"Content-Type": "application/json", "Origin": "null"}, b"{}", "approval_cross_site", 403),
        (
            {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
            b"{}",
            "approval_cross_site",
            403,
        ),
    ],
)
async def test_a_cross_site_vote_is_refused(
    server: Server,
    http: aiohttp.ClientSession,
    dev_dir: Path,
    headers: dict[str, str],
    data: bytes,
    code: str,
    status: int,
) -> None:
    approval = await requested(server)
    url = f"{base(server)}/approvals/api/{approval.id}/approve"
    sent = {**headers, **bearer(token(dev_dir, "bob", APPROVERS))}
    async with http.post(url, data=data, headers=sent) as response:
        refused, body = await answer(response)
    assert (refused, body["error"]) == (status, code)
    assert body["message"]
    assert (await server.approvals.get(approval.id)).status == "pending"


async def test_the_page_s_own_origin_is_accepted(
    server: Server, http: aiohttp.ClientSession, dev_dir: Path
) -> None:
    approval = await requested(server)
    url = f"{base(server)}/approvals/api/{approval.id}/approve"
    headers = {
        "Origin": base(server),
        "Sec-Fetch-Site": "same-origin",
        **bearer(token(dev_dir, "bob", APPROVERS)),
    }
    async with http.post(url, json={}, headers=headers) as response:
        status, body = await answer(response)
    assert (status, body["approval"]["status"]) == (200, "approved")


async def test_the_public_url_s_origin_is_accepted_whatever_host_the_proxy_passes(
    dev_dir: Path, http: aiohttp.ClientSession
) -> None:
    async with approval_server(dev_dir, approvals={"public_url": "https://approvals.example/"}) as server:
        approval = await requested(server)
        url = f"{base(server)}/approvals/api/{approval.id}/approve"
        headers = {"Origin": "https://approvals.example", **bearer(token(dev_dir, "bob", APPROVERS))}
        async with http.post(url, json={}, headers=headers) as response:
            status, body = await answer(response)
        assert (status, body["approval"]["status"]) == (200, "approved")
        assert body["approval"]["approve_url"] == f"https://approvals.example/approvals/{approval.id}"


async def test_bad_bodies_and_unknown_ids(server: Server, http: aiohttp.ClientSession, dev_dir: Path) -> None:
    approval = await requested(server)
    bob = bearer(token(dev_dir, "bob", APPROVERS))
    url = f"{base(server)}/approvals/api/{approval.id}/deny"
    for data, code in [
        (b"{not json", "invalid_json"),
        (b'["reason"]', "invalid_body"),
        (b'{"reason": 3}', "invalid_body"),
        (b'{"reason": "' + b"x" * 2000 + b'"}', "invalid_body"),
    ]:
        async with http.post(url, data=data, headers={**bob, "Content-Type": "application/json"}) as response:
            status, body = await answer(response)
            assert (status, body["error"]) == (400, code)
    async with http.get(f"{base(server)}/approvals/api/{'f' * 32}", headers=bob) as response:
        status, body = await answer(response)
    assert (status, body["error"]) == (404, "approval_not_found")
    async with http.post(f"{url}", json={"reason": "late"}, headers=bob) as response:
        assert response.status == 200
    async with http.post(url, json={"reason": "again"}, headers=bob) as response:
        status, body = await answer(response)
    assert (status, body["error"]) == (409, "approval_closed")


async def test_the_page_runs_only_its_own_script(server: Server, http: aiohttp.ClientSession) -> None:
    for path in ("/approvals", f"/approvals/{'a' * 32}"):
        async with http.get(f"{base(server)}{path}") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            policy = response.headers["Content-Security-Policy"]
            page = await response.text()
        nonce = re.search(r"script-src 'nonce-([^']+)'", policy)
        assert nonce is not None
        assert "default-src 'none'" in policy
        assert "frame-ancestors 'none'" in policy
        assert f'<script nonce="{nonce.group(1)}">' in page
        assert not re.search(r"<[a-z][^>]*\son[a-z]+\s*=", page, re.IGNORECASE)  # no inline handlers
        assert "innerHTML" not in page
        assert "<script src" not in page
        assert "http://" not in page
        assert "https://" not in page
        assert response.headers["Cache-Control"] == "no-store"
    async with http.get(f"{base(server)}/approvals") as again:
        assert again.headers["Content-Security-Policy"] != policy  # a fresh nonce per response


async def test_without_jwt_identity_nobody_is_an_approver(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with (
        approval_server(tmp_path, identity={"mode": "none"}) as server,
        http.get(f"{base(server)}/approvals/api/pending", headers=bearer("x.y.z")) as response,
    ):
        status, body = await answer(response)
    assert (status, body["error"]) == (401, "jwt_issuer_unknown")
