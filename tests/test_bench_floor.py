"""The benchmark's floor server is a faithful do-nothing processor: what it lets through arrives as the
model sent it, every message Envoy sends it is answered, and it never closes a stream cleanly (Envoy
would then forward the rest unprocessed, and the floor path would measure less than ext_proc costs)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.stacks import FloorStack
from extproc.devenv import Stack, Upstream

CARD, EMAIL = "4111 1111 1111 1111", "jane.doe@example.com"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, FloorStack]]:
    """Envoy alone in front of the demo model (no key: no processor would set it), and Envoy with the
    same config's ext_proc filter pointed at the floor, in front of the same model."""
    log = tmp_path_factory.mktemp("floor") / "stack.log"
    bare = Stack(log_path=log, with_extproc=False, demo_key=False, envoy_concurrency=1).start()
    try:
        upstream = Upstream("127.0.0.1", bare.demo_port)
        floor = FloorStack(log_path=log, upstream=upstream, envoy_concurrency=1).start()
    except BaseException:
        bare.stop()
        raise
    yield bare, floor
    floor.stop()
    bare.stop()


def _ext_proc_stats(stack: Stack) -> dict[str, int]:
    url = stack.envoy_admin_url + "/stats?filter=ext_proc.dlp"
    with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 (loopback admin)
        lines = answer.read().decode().splitlines()
    pairs = (line.partition(": ") for line in lines)
    return {name.rpartition(".")[2]: int(value) for name, _, value in pairs}


def test_a_chat_answer_comes_through_the_floor_unchanged(paths: tuple[Stack, FloorStack]) -> None:
    bare, floor = paths
    prompt = f"my card is {CARD}, mail me at {EMAIL}"
    body = {"model": "demo-small", "messages": [{"role": "user", "content": prompt}]}
    before = _ext_proc_stats(floor)
    answer = httpx.post(floor.url + "/v1/chat/completions", json=body, timeout=10)
    alone = httpx.post(bare.url + "/v1/chat/completions", json=body, timeout=10)
    assert answer.status_code == alone.status_code == 200
    content = answer.json()["choices"][0]["message"]["content"]
    assert content == alone.json()["choices"][0]["message"]["content"] == f"You said: {prompt}"
    after = _ext_proc_stats(floor)
    assert after["streams_started"] == before["streams_started"] + 1
    # Request headers and body, response headers and body (at least one chunk): each one answered.
    assert after["stream_msgs_sent"] - before["stream_msgs_sent"] >= 4
    assert after["stream_msgs_received"] - before["stream_msgs_received"] == (
        after["stream_msgs_sent"] - before["stream_msgs_sent"]
    )
    assert after["server_half_closed"] == after["streams_failed"] == after["spurious_msgs_received"] == 0


def test_a_streamed_answer_comes_through_the_floor_unchanged(paths: tuple[Stack, FloorStack]) -> None:
    bare, floor = paths
    content = f"The card {CARD} is on file; write to {EMAIL} for a copy of the statement."
    script = {"id": "floor-stream", "content": content, "chunk_chars": 3, "delay_ms": 1}
    httpx.post(bare.demo_url + "/_demo/replies", json=script, timeout=5).raise_for_status()
    body = {"model": "demo-small", "messages": [{"role": "user", "content": "go"}], "stream": True}
    headers = {"x-demo-reply": "floor-stream"}
    before = _ext_proc_stats(floor)
    with httpx.stream(
        "POST", floor.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
    ) as answer:
        assert answer.status_code == 200
        events = [line.removeprefix("data: ") for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == content
    after = _ext_proc_stats(floor)
    # Every streamed chunk went to the floor and came back: one message each way per chunk.
    chunks = after["stream_msgs_sent"] - before["stream_msgs_sent"]
    assert chunks > len(content) // 3
    assert after["stream_msgs_received"] - before["stream_msgs_received"] == chunks
    assert after["server_half_closed"] == after["streams_failed"] == after["spurious_msgs_received"] == 0


def test_without_the_floor_the_floor_path_fails_closed(tmp_path: Path) -> None:
    """The floor path really runs the ext_proc filter, fail closed: no processor, no answer."""
    bare = Stack(log_path=tmp_path / "stack.log", with_extproc=False, demo_key=False, envoy_concurrency=1)
    bare.start()
    try:
        upstream = Upstream("127.0.0.1", bare.demo_port)
        floor = FloorStack(log_path=tmp_path / "stack.log", upstream=upstream, envoy_concurrency=1).start()
        try:
            floor.processes["extproc"].stop()
            body = {"model": "demo-small", "messages": [{"role": "user", "content": "hello"}]}
            answer = httpx.post(floor.url + "/v1/chat/completions", json=body, timeout=10)
            assert answer.status_code == 503
        finally:
            floor.stop()
    finally:
        bare.stop()
