"""Sizes and pace through real Envoy: enormous headers, bodies exactly at and one byte over every size
limit of the settings, a 10 MB single-line JSON answer, a server-sent answer with no line end at all, a
request body trickled a byte at a time and an answer trickled a byte at a time. Each ends in its
documented outcome, and extproc's resident memory stays bounded (read from /proc before and after).

The model is a small HTTP server of the test's own (each answer chosen by the request's ``x-scenario``
header), so that bodies are byte-exact and their pace is the test's."""

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.devenv import REPO_ENVOY_CONFIG, Stack, Upstream
from extproc.mask.headers import MAX_HEADER_CHARS

from .conftest import start_stack

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

KIB, MIB = 1024, 1024 * 1024
REQUEST_LIMIT = 256 * KIB
RESPONSE_LIMIT = 10 * MIB
STREAM_LIMIT = 1 * MIB
EVENT_LIMIT = 64 * KIB
STREAM_SECONDS = 3.0
ENVOY_HEADERS_KIB = 512  # Envoy's own header limit, raised here above extproc's 256 Ki characters
CARD = "4111 1111 1111 1111"
MASKED_CARD = "**** **** **** 1111"  # the shipped pack keeps a card's last four digits

Scenario = Callable[[BaseHTTPRequestHandler], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(function: Scenario) -> Scenario:
        SCENARIOS[name] = function
        return function

    return register


class Model(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bodies: dict[str, bytes] = {}  # noqa: RUF012 - filled by the tests before each request
    received: list[int] = [0]  # noqa: RUF012 - requests that reached the model
    last_body: list[bytes] = [b""]  # noqa: RUF012 - the body of the last of them

    def do_POST(self) -> None:
        Model.received[0] += 1
        length = int(self.headers.get("content-length") or 0)
        Model.last_body[0] = self.rfile.read(length)
        SCENARIOS[self.headers.get("x-scenario") or "echo"](self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def whole(handler: BaseHTTPRequestHandler, body: bytes, content_type: str) -> None:
    handler.send_response(200)
    handler.send_header("content-type", content_type)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def chunked(handler: BaseHTTPRequestHandler, pieces: Iterator[bytes], content_type: str) -> None:
    handler.send_response(200)
    handler.send_header("content-type", content_type)
    handler.send_header("transfer-encoding", "chunked")
    handler.end_headers()
    try:
        for piece in pieces:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # Envoy closed the stream: the answer was cut


@scenario("echo")
def _echo(handler: BaseHTTPRequestHandler) -> None:
    whole(handler, json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode(), "application/json")


@scenario("json")
def _json(handler: BaseHTTPRequestHandler) -> None:
    whole(handler, Model.bodies[handler.headers["x-body"]], "application/json")


@scenario("sse")
def _sse(handler: BaseHTTPRequestHandler) -> None:
    body = Model.bodies[handler.headers["x-body"]]
    chunked(
        handler, iter([body[i : i + 64 * KIB] for i in range(0, len(body), 64 * KIB)]), "text/event-stream"
    )


@scenario("trickle")
def _trickle(handler: BaseHTTPRequestHandler) -> None:
    """An answer of a byte a second: its pace is the model's, the test waits on the answer's end."""
    body = Model.bodies[handler.headers["x-body"]]

    def pieces() -> Iterator[bytes]:
        for index in range(len(body)):
            if index:
                time.sleep(1.0)
            yield body[index : index + 1]

    chunked(handler, pieces(), "text/event-stream")


class Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # Envoy resetting an answer it cut short is part of the tests, not a failure of the model


@pytest.fixture(scope="module")
def model() -> Iterator[ThreadingHTTPServer]:
    server = Server(("127.0.0.1", 0), Model)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="hostile-model", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model: ThreadingHTTPServer) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("hostile-limits")
    config = yaml.safe_load(REPO_ENVOY_CONFIG.read_text(encoding="utf-8"))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    manager["max_request_headers_kb"] = ENVOY_HEADERS_KIB
    envoy_config = folder / "envoy.yaml"
    envoy_config.write_text(yaml.safe_dump(config), encoding="utf-8")
    limits = {
        "MAX_REQUEST_BYTES": REQUEST_LIMIT,
        "MAX_RESPONSE_BYTES": RESPONSE_LIMIT,
        "MAX_STREAM_BYTES": STREAM_LIMIT,
        "MAX_EVENT_BYTES": EVENT_LIMIT,
        "MAX_STREAM_SECONDS": STREAM_SECONDS,
    }
    running = start_stack(
        folder / "stack.log",
        upstream=Upstream("127.0.0.1", model.server_address[1]),
        envoy_config=envoy_config,
        extra_env={f"EXTPROC_LIMITS__{name}": str(value) for name, value in limits.items()},
    )
    yield running
    running.stop()


def rss(stack: Stack) -> int:
    """extproc's resident memory, in bytes."""
    pid = stack.processes["extproc"].popen.pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS")


def post(
    stack: Stack, body: bytes = b"", scenario_name: str = "echo", key: str = "", **headers: str
) -> httpx.Response:
    body = body or chat("hi")
    sent = {"content-type": "application/json", "x-scenario": scenario_name, "x-body": key, **headers}
    return httpx.post(f"{stack.url}/v1/chat/completions", content=body, headers=sent, timeout=60)


def chat(content: str) -> bytes:
    return json.dumps({"model": "demo-small", "messages": [{"role": "user", "content": content}]}).encode()


def sized_chat(size: int, planted: str = CARD) -> bytes:
    """A chat request of exactly ``size`` bytes, its one message padded, ``planted`` at its end."""
    shell = chat(" " + planted)
    body = chat("a" * (size - len(shell)) + " " + planted)
    assert len(body) == size
    return body


def sized_answer(size: int, planted: str = CARD) -> bytes:
    """A chat answer of exactly ``size`` bytes, one line, its one string padded, ``planted`` at its end."""
    shell = json.dumps({"choices": [{"message": {"role": "assistant", "content": " " + planted}}]})
    text = "a" * (size - len(shell)) + " " + planted
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
    assert len(body) == size
    assert b"\n" not in body
    return body


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]
    return code


def events(text: str) -> list[tuple[str | None, str]]:
    found = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        found.append((name, data))
    return found


def chat_event(content: str) -> bytes:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def sized_stream(size: int) -> bytes:
    """Token events of a chat answer, exactly ``size`` bytes in all, each well under the event limit."""
    body = chat_event("card " + CARD) + b"data: [DONE]\n\n"
    filler = chat_event("x" * 1000)
    while len(body) + len(filler) <= size:
        body = filler + body
    rest = size - len(body)
    if rest:
        pad = chat_event("")
        body = chat_event("y" * (rest - len(pad))) + body
    assert len(body) == size
    return body


# -- headers -----------------------------------------------------------------------------------------------


def big_headers(total: int, tail: str = "") -> dict[str, str]:
    """Headers of ``total`` characters of value in pieces of 60 KiB (a model server reads lines up to 64
    KiB), ``tail`` ending the last one."""
    piece = 60 * KIB
    values = ["a" * piece] * (total // piece) + ["a" * (total % piece)]
    values[-1] += tail
    return {f"x-big-{index}": value for index, value in enumerate(values) if value}


def test_headers_over_extprocs_bound_are_its_431_and_over_envoys_limit_envoys_431(stack: Stack) -> None:
    before = Model.received[0]
    under = post(stack, **big_headers(MAX_HEADER_CHARS - 8 * KIB))
    assert under.status_code == 200, under.text
    over = post(stack, **big_headers(MAX_HEADER_CHARS + 1))
    assert over.status_code == 431
    assert error_code(over) == "headers_too_large"
    assert Model.received[0] == before + 1  # only the request under the bound reached the model
    # Over Envoy's own limit: its codec answers 431 and closes the connection, which may reset the
    # upload still under way; either way nothing reaches extproc or the model.
    try:
        beyond_envoy = post(stack, **big_headers(ENVOY_HEADERS_KIB * KIB + 1))
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        pass
    else:
        assert beyond_envoy.status_code == 431
        assert "x-dlp-decision-id" not in beyond_envoy.headers
    assert Model.received[0] == before + 1


# -- bodies at and one byte over each limit ----------------------------------------------------------------


def test_a_request_body_at_the_limit_passes_masked_and_one_byte_over_is_413(stack: Stack) -> None:
    at = post(stack, sized_chat(REQUEST_LIMIT))
    assert at.status_code == 200, at.text
    assert CARD.encode() not in Model.last_body[0]
    assert MASKED_CARD.encode() in Model.last_body[0]
    received = Model.received[0]
    over = post(stack, sized_chat(REQUEST_LIMIT + 1))
    assert over.status_code == 413
    assert error_code(over) == "body_too_large"
    assert Model.received[0] == received  # the model never saw it


def test_a_10_mb_single_line_json_answer_at_the_limit_is_masked_and_one_byte_over_is_502(
    stack: Stack, record_property: Callable[[str, object], None]
) -> None:
    Model.bodies["at"] = sized_answer(RESPONSE_LIMIT)
    Model.bodies["over"] = sized_answer(RESPONSE_LIMIT + 1)
    before = rss(stack)
    started = time.monotonic()
    at = post(stack, scenario_name="json", key="at")
    took = time.monotonic() - started
    assert at.status_code == 200, at.text[:200]
    content = at.json()["choices"][0]["message"]["content"]
    assert content.endswith(" " + MASKED_CARD), content[-80:]
    sent = json.loads(Model.bodies["at"])["choices"][0]["message"]["content"]
    assert content == sent.replace(CARD, MASKED_CARD)  # nothing else changed
    assert CARD not in at.text
    over = post(stack, scenario_name="json", key="over")
    assert over.status_code == 502
    assert error_code(over) == "upstream_too_large"
    after = rss(stack)
    record_property("rss_before_mib", before / MIB)
    record_property("rss_after_mib", after / MIB)
    record_property("seconds_10_mb_answer", took)
    print(f"\nextproc RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB over two 10 MiB answers ({took:.1f} s)")
    # a 10 MiB document is held, parsed and written out once more: never a growth without bound
    assert after - before < 25 * RESPONSE_LIMIT // 2, (before, after)


def test_a_stream_at_the_limit_passes_and_one_byte_over_ends_in_band(stack: Stack) -> None:
    Model.bodies["stream-at"] = sized_stream(STREAM_LIMIT)
    Model.bodies["stream-over"] = sized_stream(STREAM_LIMIT + 1)
    at = post(stack, scenario_name="sse", key="stream-at")
    assert at.status_code == 200
    found = events(at.text)
    assert found[-1] == (None, "[DONE]")
    assert CARD not in at.text
    assert MASKED_CARD in at.text
    over = post(stack, scenario_name="sse", key="stream-over")
    assert over.status_code == 200  # the headers had gone: the error is the stream's last event
    name, data = events(over.text)[-1]
    assert (name, json.loads(data)["error"]) == ("error", "upstream_too_large")
    assert CARD not in over.text


def event_of(size: int) -> bytes:
    """One server-sent event of exactly ``size`` bytes, as the event limit counts them."""
    event = b"data: " + b"z" * (size - len(b"data: \n\n")) + b"\n\n"
    assert len(event) == size
    return event


def test_an_event_at_the_limit_passes_and_one_byte_over_ends_in_band(stack: Stack) -> None:
    Model.bodies["event-at"] = event_of(EVENT_LIMIT) + b"data: [DONE]\n\n"
    Model.bodies["event-over"] = event_of(EVENT_LIMIT + 1) + b"data: [DONE]\n\n"
    at = post(stack, scenario_name="sse", key="event-at")
    assert [name for name, _ in events(at.text)] == [None, None]
    assert events(at.text)[-1] == (None, "[DONE]")
    over = post(stack, scenario_name="sse", key="event-over")
    [(name, data)] = events(over.text)
    assert (name, json.loads(data)["error"]) == ("error", "upstream_too_large")


def test_an_sse_answer_with_no_line_end_at_all_ends_in_band_at_the_event_limit(stack: Stack) -> None:
    Model.bodies["no-newline"] = b"data: " + b"w" * (4 * MIB)
    before = rss(stack)
    response = post(stack, scenario_name="sse", key="no-newline")
    after = rss(stack)
    print(f"\nextproc RSS {before / MIB:.0f} MiB -> {after / MIB:.0f} MiB over a 4 MiB line with no end")
    assert response.status_code == 200
    [(name, data)] = events(response.text)
    assert (name, json.loads(data)["error"]) == ("error", "upstream_too_large")
    assert after - before < 32 * MIB  # held no more than the event limit, not the 4 MiB line


# -- pace --------------------------------------------------------------------------------------------------


def test_a_request_body_trickled_a_byte_at_a_time_is_scanned_whole(stack: Stack) -> None:
    body = chat("slow " + CARD)
    before = rss(stack)
    with socket.create_connection(("127.0.0.1", stack.envoy_port), timeout=30) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one segment per byte
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nx-scenario: echo\r\nconnection: close\r\n\r\n"
        )
        connection.sendall(head.encode())
        for index in range(len(body)):  # the client's pace: a byte every 10 ms
            connection.sendall(body[index : index + 1])
            time.sleep(0.01)
        answer = b""
        while chunk := connection.recv(65536):  # until Envoy closes: the answer is whole
            answer += chunk
    after = rss(stack)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    sent_on = json.loads(Model.last_body[0])["messages"][0]["content"]
    assert sent_on == "slow " + MASKED_CARD  # scanned whole, though it came a byte at a time
    assert after - before < 16 * MIB


def test_an_answer_trickled_a_byte_a_second_is_cut_at_the_stream_deadline_in_band(stack: Stack) -> None:
    Model.bodies["trickle"] = chat_event("card " + CARD) + b"data: [DONE]\n\n"
    before = rss(stack)
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{stack.url}/v1/chat/completions",
        content=chat("hi"),
        headers={"content-type": "application/json", "x-scenario": "trickle", "x-body": "trickle"},
        timeout=30,
    ) as response:
        text = "".join(response.iter_text())  # until the stream ends
    took = time.monotonic() - started
    after = rss(stack)
    assert response.status_code == 200
    name, data = events(text)[-1]
    assert (name, json.loads(data)["error"]) == ("error", "upstream_timeout")
    assert CARD not in text
    assert STREAM_SECONDS <= took < STREAM_SECONDS + 5, took  # the deadline ended it, not the model
    assert after - before < 16 * MIB
    assert os.path.exists(f"/proc/{stack.processes['extproc'].popen.pid}")  # extproc still serves
    assert post(stack).status_code == 200
