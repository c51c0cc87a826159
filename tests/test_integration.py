"""The whole path through real Envoy 1.40, the extproc server and the demo model, on free ports."""

import base64
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from extproc.devenv import Stack
from extproc.identity.dev import mint_dev_token

from .conftest import Demo, chat, start_stack

CARD = "4111 1111 1111 1111"
CARD_MASKED = "**** **** **** 1111"  # the default pack keeps a card's last four digits
EMAIL = "jane.doe@example.com"


def post(stack: Stack, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


def openai_stream(stack: Stack, reply: str) -> openai.Stream[ChatCompletionChunk]:
    """A streamed chat completion through Envoy with the official client; the demo answers ``reply``."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-demo-reply": reply},
    )


def test_the_prompt_is_masked_before_it_reaches_the_model(stack: Stack, demo: Demo, tag: str) -> None:
    answer = post(stack, chat(f"card {CARD}, mail {EMAIL}"), **{"x-test-tag": tag})
    assert answer.status_code == 200
    [seen] = demo.received(tag)
    content = json.loads(seen["body"])["messages"][0]["content"]
    assert content == f"card {CARD_MASKED}, mail [REDACTED:EMAIL_ADDRESS]"
    # The body changed length: Envoy needs the new content-length, or it fails the request.
    assert seen["headers"]["content-length"] == str(len(seen["body"].encode()))
    # A header set by extproc (raw_value) arrives with its value, and the client sees the same id.
    decision = seen["headers"]["x-dlp-decision-id"]
    assert len(decision) == 32
    assert answer.headers["x-dlp-decision-id"] == decision


def test_the_model_answer_is_masked_and_stays_valid_json(stack: Stack, demo: Demo) -> None:
    reply = demo.script(content=f"Your card {CARD} is on file for {EMAIL}.")
    answer = post(stack, chat("what is on file?"), **{"x-demo-reply": reply})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    message = answer.json()["choices"][0]["message"]["content"]
    assert message == f"Your card {CARD_MASKED} is on file for [REDACTED:EMAIL_ADDRESS]."
    assert CARD not in answer.text
    assert EMAIL not in answer.text


def test_a_large_prompt_is_scanned_within_the_message_timeout(stack: Stack, demo: Demo, tag: str) -> None:
    filler = "lorem ipsum dolor sit amet " * 150_000  # about 4 MB of text
    answer = post(stack, chat(filler + EMAIL), **{"x-test-tag": tag})
    assert answer.status_code == 200
    [seen] = demo.received(tag)
    assert seen["body"].endswith('[REDACTED:EMAIL_ADDRESS]"}]}')


def test_the_openai_client_streams_masked_events(stack: Stack, demo: Demo) -> None:
    # Two characters per token event: every value is split across many events.
    reply = demo.script(content=f"Sure: {CARD} and {EMAIL}. Anything else?", chunk_chars=2)
    stream = openai_stream(stack, reply)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == f"Sure: {CARD_MASKED} and [REDACTED:EMAIL_ADDRESS]. Anything else?"


def test_token_events_arrive_while_the_model_is_still_generating(stack: Stack, demo: Demo) -> None:
    # BUFFERED response bodies would hold the whole stream; the configured streaming mode must not.
    words = "the quarterly report shows steady growth in every region we serve " * 18
    reply = demo.script(content=words, chunk_chars=100, delay_ms=300)
    started = time.monotonic()
    arrivals = []
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/chat/completions",
        content=chat("report", stream=True),
        headers={"content-type": "application/json", "x-demo-reply": reply},
        timeout=30,
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    arrivals.append(time.monotonic() - started)
        total = time.monotonic() - started
    assert arrivals, "no token event carried text"
    assert total > 3.3  # twelve pauses of 300 ms
    assert arrivals[0] < total - 1.0


def test_models_listing_without_a_request_body(stack: Stack) -> None:
    answer = httpx.get(f"{stack.url}/v1/models", timeout=10)
    assert answer.status_code == 200
    assert [m["id"] for m in answer.json()["data"]] == ["demo-small", "demo-large"]


def test_an_invalid_json_request_gets_a_json_error_and_never_reaches_the_model(
    stack: Stack, demo: Demo, tag: str
) -> None:
    answer = post(stack, b'{"messages": [', **{"x-test-tag": tag, "x-request-id": "req-42"})
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "invalid_json",
        "message": "request body is not valid JSON",
        "request_id": "req-42",
    }
    assert demo.received(tag) == []


def test_an_answer_that_cannot_be_scanned_is_refused(stack: Stack, demo: Demo) -> None:
    reply = demo.script(raw_b64=base64.b64encode(b"\x89PNG\r\n").decode(), content_type="image/png")
    answer = post(stack, chat("draw"), **{"x-demo-reply": reply})
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_unscannable"
    assert b"PNG" not in answer.content


def test_a_truncated_compressed_answer_is_refused(stack: Stack, demo: Demo) -> None:
    # A gzip header and nothing more: the decoder finds the stream cut short.
    reply = demo.script(
        raw_b64=base64.b64encode(b"\x1f\x8b\x08\x00").decode(), headers={"content-encoding": "gzip"}
    )
    answer = post(stack, chat("hi"), **{"x-demo-reply": reply})
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_unscannable"


def test_a_request_over_envoys_buffer_limit_is_refused_with_413(stack: Stack, demo: Demo, tag: str) -> None:
    answer = post(stack, chat("x" * (17 * 1024 * 1024)), **{"x-test-tag": tag})
    assert answer.status_code == 413
    assert demo.received(tag) == []


def test_a_dead_extproc_server_fails_closed(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "stack.log")
    try:
        demo = Demo(stack.demo_url)
        assert post(stack, chat("warm")).status_code == 200
        stack.processes["extproc"].kill()
        answer = post(stack, chat(f"card {CARD}"), **{"x-test-tag": "after-kill"})
        assert answer.status_code == 503
        assert demo.received("after-kill") == []
    finally:
        stack.stop()


@contextlib.contextmanager
def dev_running(
    tmp_path: Path, *extra: str, printed: list[str] | None = None
) -> Iterator[tuple[str, bytes, str]]:
    """`extproc dev` on free ports, until the curl line it prints: (url, body, authorization header) of
    that line; the lines before it go to ``printed``. Stopped with Ctrl-C (SIGINT) afterwards, which must
    end it cleanly."""
    ports = ["--port", "0", "--envoy-admin-port", "0", "--extproc-port", "0", "--admin-port", "0"]
    ports += ["--approvals-port", "0"]
    dev = ["dev", *ports, "--demo-port", "0", "--dev-dir", str(tmp_path), *extra]
    process = subprocess.Popen(
        [sys.executable, "-m", "extproc", *dev], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert process.stderr is not None
    try:
        lines: list[str] = []
        for line in process.stderr:
            lines.append(line)
            if line.strip().startswith("curl -s "):
                break
        curl = "".join(lines[-1:]) + process.stderr.readline()
        if printed is not None:
            printed.extend(lines)
        url = curl.split()[2]
        data = curl.split("-d '", 1)[1].rsplit("'", 1)[0].encode()
        authorization = curl.split("-H 'authorization: ", 1)[1].split("'", 1)[0]
        yield url, data, authorization
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)
    assert process.returncode == 0
    leftovers = subprocess.run(["pgrep", "-f", f"--parent {process.pid}"], capture_output=True, check=False)
    assert leftovers.stdout == b""


@pytest.mark.envoy  # `extproc dev` as a command, which starts Envoy itself
def test_make_run_prints_a_working_curl_line_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    printed: list[str] = []
    with dev_running(tmp_path, printed=printed) as (url, data, authorization):
        # The approvers' API is where it says, and answers an approver of the dev issuer.
        [approvals] = [line.split() for line in printed if line.strip().startswith("approvals ")]
        token = mint_dev_token(tmp_path, "approver", ["approvers"], 600)
        command = ["approvals", "list", "--address", approvals[2], "--token", token]
        listed = subprocess.run(
            [sys.executable, "-m", "extproc", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        headers = {"content-type": "application/json"}
        assert httpx.post(url, content=data, headers=headers, timeout=30).status_code == 401
        answer = httpx.post(
            url, content=data, headers={**headers, "authorization": authorization}, timeout=30
        )
        assert answer.status_code == 200
        content = answer.json()["choices"][0]["message"]["content"]
        assert CARD_MASKED in content
        assert "[REDACTED:EMAIL_ADDRESS]" in content


@pytest.mark.envoy  # `extproc dev` as a command, which starts Envoy itself
def test_dev_with_a_settings_file_keeps_the_dev_identity(tmp_path: Path) -> None:
    """`extproc dev --config F` used to drop the dev identity: a request without a token got 200."""
    settings = tmp_path / "settings.yaml"
    settings.write_text("limits:\n  max_request_bytes: 4096\n")  # a file that says nothing of identity
    with dev_running(tmp_path, "--config", str(settings)) as (url, data, authorization):
        assert authorization.startswith("Bearer ")  # the curl line carries a dev token
        headers = {"content-type": "application/json"}
        anonymous = httpx.post(url, content=data, headers=headers, timeout=30)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == "jwt_missing"
        token = mint_dev_token(tmp_path, "dev-user", [], 600)
        signed = {**headers, "authorization": f"Bearer {token}"}
        assert httpx.post(url, content=data, headers=signed, timeout=30).status_code == 200
        # The file's own settings still apply.
        large = chat("x" * 5000)
        assert httpx.post(url, content=large, headers=signed, timeout=30).status_code == 413


@pytest.mark.parametrize("path", ["/healthz", "/nothing-here"])
def test_routes_without_a_model_skip_the_processor(stack: Stack, path: str) -> None:
    answer = httpx.get(f"{stack.url}{path}", timeout=10)
    assert answer.status_code == (200 if path == "/healthz" else 404)


def test_a_stream_cut_short_ends_with_an_error_event_the_openai_client_raises(
    stack: Stack, demo: Demo
) -> None:
    # One token event larger than limits.max_event_bytes (1 MiB): headers are gone, so the stream ends
    # with an in-band error event and nothing of the oversized event is released.
    reply = demo.script(content="A" * (1024 * 1024 + 10), chunk_chars=2 * 1024 * 1024)
    stream = openai_stream(stack, reply)
    received: list[str] = []

    def read_all() -> None:
        for chunk in stream:
            received.extend(c.delta.content or "" for c in chunk.choices)

    with pytest.raises(openai.APIError) as raised:
        read_all()
    assert raised.value.body == "upstream_too_large"
    assert "AAAA" not in "".join(received)


def test_the_model_sees_its_own_credential_and_never_the_callers(stack: Stack, demo: Demo, tag: str) -> None:
    answer = post(
        stack, chat("hi"), **{"x-test-tag": tag, "authorization": "Bearer caller-token", "x-api-key": "k"}
    )
    assert answer.status_code == 200
    [seen] = demo.received(tag)
    key = stack.upstream_key_file.read_text(encoding="utf-8").strip()
    assert seen["headers"]["authorization"] == f"Bearer {key}"
    assert "x-api-key" not in seen["headers"]
    # Without extproc in front, the model refuses the caller.
    direct = httpx.post(f"{stack.demo_url}/v1/chat/completions", content=chat("hi"), timeout=10)
    assert direct.status_code == 401
