"""The approval page in a real headless Chromium: an approver pastes a token, reads what waits for them
(the caller's prompt shown as text, never run), approves, denies with a reason, and is refused their own
request; all of it lands in the server's ApprovalService."""

import json
from pathlib import Path

import pytest

from tests.approval_server import APPROVERS, approval_server, requested, token
from tests.browser import Page, browser_page

HOSTILE = (
    '<img src=x onerror="window.__pwned = 1">card **** **** **** 1111 '
    "</pre><script>window.__pwned = 2</script>"
)


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dev-identity")


def card(approval_id: str, inside: str = "") -> str:
    """A selector for the approval's card (ids are hex), or for something inside it, as a JS string."""
    return json.dumps(f'article.approval[data-id="{approval_id}"] {inside}'.strip())


async def paste_token(page: Page, value: str) -> None:
    await page.evaluate(
        f"document.getElementById('token').value = {json.dumps(value)};"
        "document.getElementById('use-token').click()"
    )


async def text(page: Page, approval_id: str, inside: str) -> str:
    value: str = await page.evaluate(f"document.querySelector({card(approval_id, inside)}).textContent")
    return value


def page_errors(page: Page) -> list[object]:
    """What the page threw or the browser refused (a CSP violation), apart from the HTTP errors the API
    answers on purpose (Chromium logs every 4xx fetch as a network error)."""
    return [p for p in page.problems() if p.get("source") != "network"]


async def test_an_approver_decides_in_the_page(tmp_path: Path, dev_dir: Path) -> None:
    async with approval_server(dev_dir) as server, browser_page(tmp_path / "profile") as page:
        hostile = await requested(server, prompt=HOSTILE)
        denied = await requested(server, prompt="iban [REDACTED:IBAN_CODE]", model="demo-large")
        own = await requested(server, requester="bob", groups=(APPROVERS,))
        elsewhere = await requested(server, approver_groups=("legal",))
        bob = token(dev_dir, "bob", APPROVERS)
        url = f"http://127.0.0.1:{server.admin_port}/approvals"

        await page.navigate(url)
        await page.wait_for("document.body.dataset.state === 'no-token'")
        await paste_token(page, f"Bearer {bob}")
        await page.wait_for("document.body.dataset.state === 'loaded'")

        shown = await page.evaluate(
            "[...document.querySelectorAll('article.approval')].map(a => a.dataset.id)"
        )
        assert set(shown) == {hostile.id, denied.id, own.id}  # not the one for legal
        assert elsewhere.id not in shown
        assert await text(page, hostile.id, "pre.prompt") == HOSTILE
        assert await page.evaluate("document.querySelectorAll('img, article script').length") == 0
        assert await page.evaluate("window.__pwned") is None
        assert await text(page, hostile.id, ".requester") == "alice"
        assert await text(page, hostile.id, ".groups") == "analysts"
        assert await text(page, hostile.id, ".route") == "/v1/chat/completions"
        assert await text(page, denied.id, ".model") == "demo-large"
        assert await text(page, hostile.id, ".rules") == "credit-card"
        assert await text(page, hostile.id, ".policy") == "payments"
        assert await text(page, hostile.id, ".approver-groups") == APPROVERS
        assert await text(page, hostile.id, ".needed") == "1"
        assert await text(page, own.id, ".requester") == "bob (you)"
        assert "bob" in await page.evaluate("document.getElementById('who').textContent")

        # The token lives in this tab's sessionStorage: no cookie, nothing in the address.
        assert await page.evaluate("sessionStorage.getItem('extproc.approver_token')") == bob
        assert await page.evaluate("document.cookie") == ""
        assert await page.evaluate("document.getElementById('token').value") == ""
        assert bob not in await page.evaluate("location.href")

        await page.evaluate(f"document.querySelector({card(hostile.id, 'button.approve')}).click()")
        await page.wait_for(f"document.querySelector({card(hostile.id)}).dataset.status === 'approved'")
        assert (await server.approvals.get(hostile.id)).status == "approved"
        assert await text(page, hostile.id, ".status") == "approved"

        # Deny asks for a reason first; the reason reaches the service.
        await page.evaluate(f"document.querySelector({card(denied.id, 'button.deny')}).click()")
        assert "reason_required" in await text(page, denied.id, ".result")
        assert (await server.approvals.get(denied.id)).status == "pending"
        await page.evaluate(
            f"document.querySelector({card(denied.id, 'input.reason')}).value = 'no ticket for this';"
            f"document.querySelector({card(denied.id, 'button.deny')}).click()"
        )
        await page.wait_for(f"document.querySelector({card(denied.id)}).dataset.status === 'denied'")
        decided = await server.approvals.get(denied.id)
        assert (decided.status, decided.reason) == ("denied", "no ticket for this")

        await page.evaluate(f"document.querySelector({card(own.id, 'button.approve')}).click()")
        await page.wait_for(f"document.querySelector({card(own.id)}).dataset.error === 'approval_self'")
        assert (await text(page, own.id, ".result")).startswith("approval_self: ")
        assert (await server.approvals.get(own.id)).status == "pending"

        # The approve_url of a ticket opens that one approval; the token is still in the tab.
        await page.navigate(f"{url}/{own.id}")
        await page.wait_for("document.body.dataset.state === 'loaded'")
        shown = await page.evaluate(
            "[...document.querySelectorAll('article.approval')].map(a => a.dataset.id)"
        )
        assert shown == [own.id]

        assert page_errors(page) == []


async def test_the_page_shows_why_a_token_is_refused(tmp_path: Path, dev_dir: Path) -> None:
    async with approval_server(dev_dir) as server, browser_page(tmp_path / "profile") as page:
        approval = await requested(server)
        base = f"http://127.0.0.1:{server.admin_port}"
        await page.navigate(f"{base}/approvals")
        await paste_token(page, "not-a-token")
        await page.wait_for("document.body.dataset.state === 'error'")
        assert (await page.evaluate("document.getElementById('error').textContent")).startswith(
            "jwt_malformed: "
        )

        # Someone outside the approver groups sees nothing to decide, and not the request itself.
        await paste_token(page, token(dev_dir, "carol", "analysts"))
        await page.wait_for("document.body.dataset.state === 'loaded'")
        assert await page.evaluate("document.querySelectorAll('article.approval').length") == 0
        await page.navigate(f"{base}/approvals/{approval.id}")
        await page.wait_for("document.body.dataset.state === 'error'")
        assert (await page.evaluate("document.getElementById('error').textContent")).startswith(
            "approval_not_approver: "
        )
        await page.evaluate("document.getElementById('forget-token').click()")
        await page.wait_for("document.body.dataset.state === 'no-token'")
        assert await page.evaluate("sessionStorage.length") == 0
        assert page_errors(page) == []
