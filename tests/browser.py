"""A real headless Chromium, driven over the Chrome DevTools Protocol with aiohttp's websocket client.

Enough to load a page, run script in it and read its DOM: what a person's browser does with the page,
CSP and all, without a browser-automation dependency. Chromium comes from Debian's package (``make
browser``, run by ``make test``)."""

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

COMMAND_SECONDS = 15.0
"""Longest a DevTools command may take: far more than any takes, short of a hung browser."""


class BrowserError(Exception):
    """Chromium did not start, a DevTools command failed, or the page threw."""


class Page:
    """One tab, over its DevTools websocket."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            future = self._waiting.pop(data.get("id", 0), None)
            if future is not None:
                if not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its ``result``, or BrowserError with the protocol's error."""
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        await self._socket.send_json({"id": number, "method": method, "params": params})
        answer = await asyncio.wait_for(future, COMMAND_SECONDS)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the page (promises awaited), or BrowserError if it throws."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression!r} threw: {details.get('exception', details)}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 10.0) -> Any:
        """Polls ``expression`` until it is truthy; its value. The page's script runs on its own time
        (fetches, rendering), so a test waits for what a person would wait to see."""
        deadline = time.monotonic() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"still falsy after {within} s: {expression}")
            await asyncio.sleep(0.05)

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        await self.wait_for(f"document.readyState === 'complete' && location.href === {json.dumps(url)}")

    async def screenshot(self) -> bytes:
        """The tab as a PNG: what a person would see."""
        result = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])

    def problems(self) -> list[dict[str, Any]]:
        """Uncaught exceptions and console errors (a CSP refusal included) the page reported so far."""
        found = []
        for event in self.events:
            method = event.get("method")
            if method == "Runtime.exceptionThrown":
                found.append(event["params"])
            elif method == "Log.entryAdded" and event["params"]["entry"].get("level") == "error":
                found.append(event["params"]["entry"])
            elif method == "Runtime.consoleAPICalled" and event["params"].get("type") == "error":
                found.append(event["params"])
        return found

    async def close(self) -> None:
        await self._socket.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def chromium() -> str:
    """The Chromium binary; ``make browser`` installs Debian's when it is missing."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise BrowserError("chromium is not installed: run `make browser` (apt-get install chromium)")


@contextlib.asynccontextmanager
async def browser_page(profile: Path, start_seconds: float = 30.0) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile in ``profile`` and its one tab; stopped on exit, with
    every process it started."""
    args = [
        chromium(),
        "--headless=new",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--metrics-recording-only",
        "--password-store=basic",
        "--use-mock-keychain",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run its sandbox as root
    args.append("about:blank")
    log = (profile.parent / f"{profile.name}.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        *args, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
    )
    try:
        port = await _devtools_port(profile, process, start_seconds)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            target = next(t for t in targets if t.get("type") == "page")
            socket = await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
            page = Page(socket)
            try:
                for domain in ("Page", "Runtime", "Log"):
                    await page.send(f"{domain}.enable")
                yield page
            finally:
                await page.close()
    finally:
        await _stop(process)
        log.close()


async def _devtools_port(profile: Path, process: asyncio.subprocess.Process, within: float) -> int:
    """Chromium writes the port it chose, and its browser target, to DevToolsActivePort once it listens."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise BrowserError(f"chromium exited with {process.returncode} before listening")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        await asyncio.sleep(0.05)
    raise BrowserError(f"chromium wrote no DevToolsActivePort within {within} s")


async def _stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to Chromium's process group (the browser and its renderers), then SIGKILL if it lingers."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    # Renderers and helpers that outlived the browser process share its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
