"""What a stream holds is let go when it ends: by reference counting, not by the cycle collector.

A sidecar keeps one exchange per request in flight, and a streamed answer keeps its scanners for as long
as the model writes. An exchange that is a reference cycle is freed only when the cycle collector runs,
which under load may be long after its stream ended, with its scanners and bodies. These tests turn the
collector off and check, with weak references, that nothing of an exchange outlives its stream, and
that every stream scanner has released its Hyperscan streams once the answer ended or was cut."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

import extproc.server
from extproc.detect.engine import Detector, StreamScanner
from extproc.exchange import Exchange
from extproc.model import Body, BodyMode, Direction, Headers, ProtocolConfig, StreamChunk
from extproc.runtime import Runtime, build_snapshot
from extproc.server import Server
from extproc.settings import load_settings

SETTINGS = load_settings(
    None,
    server={"grpc_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0", "drain_seconds": 0.0},
    identity={"mode": "none"},
)
SNAPSHOT = build_snapshot(SETTINGS)
REQ, RESP = Direction.REQUEST, Direction.RESPONSE
CHAT = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
CARD, MASKED = "4111 1111 1111 1111", "**** **** **** 1111"


def event(content: str) -> bytes:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


# The card is split across token events: found only on the assembled text, held until it is whole.
ANSWER = [event("Noted. "), event("Here it is: "), event("4111 11"), event("11 1111 1"), event("111, done.")]


@pytest.fixture
def no_collector() -> Iterator[None]:
    """Garbage that is not freed by reference counting stays, for the test to see."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture
def scanners(monkeypatch: pytest.MonkeyPatch) -> list[StreamScanner]:
    """Every stream scanner opened while the test runs."""
    opened: list[StreamScanner] = []
    stream = Detector.stream

    def recorded(detector: Detector, label: str | None = None) -> StreamScanner:
        scanner = stream(detector, label)
        opened.append(scanner)
        return scanner

    monkeypatch.setattr(Detector, "stream", recorded)
    return opened


def streamed_exchange() -> Exchange:
    ex = Exchange(SNAPSHOT, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d-1")
    ex.handle(Headers(REQ, ((":path", "/v1/chat/completions"), ("content-type", "application/json")), False))
    ex.handle(Body(REQ, CHAT, True))
    ex.handle(Headers(RESP, ((":status", "200"), ("content-type", "text/event-stream")), False))
    return ex


def released(replies: list[Any]) -> bytes:
    return b"".join(r.data for r in replies if isinstance(r, StreamChunk))


def test_an_answer_streamed_to_its_end_is_freed_without_the_cycle_collector(
    no_collector: None, scanners: list[StreamScanner]
) -> None:
    ex = streamed_exchange()
    out = b"".join(released(ex.handle(Body(RESP, chunk, False))) for chunk in ANSWER)
    out += released(ex.handle(Body(RESP, b"", True)))
    assert MASKED.encode() in out
    assert CARD.encode() not in out
    ex.close()
    ex.outcome()
    assert scanners
    assert not any(s._open for s in scanners)
    gone = weakref.ref(ex)
    held = [weakref.ref(s) for s in scanners]
    del ex, scanners[:]
    assert gone() is None
    assert all(ref() is None for ref in held)


def test_an_answer_cut_mid_stream_releases_its_scanners_and_is_freed_without_the_cycle_collector(
    no_collector: None, scanners: list[StreamScanner]
) -> None:
    ex = streamed_exchange()
    out = b"".join(released(ex.handle(Body(RESP, chunk, False))) for chunk in ANSWER[:3])
    assert b"Noted." in out
    assert b"4111" not in out
    assert scanners
    assert all(s._open for s in scanners)
    ex.close()  # Envoy reset the stream: the server closes the exchange in its finally
    assert not any(s._open for s in scanners)
    gone = weakref.ref(ex)
    held = [weakref.ref(s) for s in scanners]
    del ex, scanners[:]
    assert gone() is None
    assert all(ref() is None for ref in held)


def test_the_request_headers_are_let_go_once_the_answer_starts(no_collector: None) -> None:
    ex = Exchange(SNAPSHOT, ProtocolConfig(BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED), "d-1")
    items = [(":path", "/v1/chat/completions"), ("content-type", "application/json"), ("x-request-id", "r-1")]
    ex.handle(Headers(REQ, tuple(items), False))
    ex.handle(Body(REQ, CHAT, True))
    kept = [obj for obj in gc.get_referents(*gc.get_referents(ex)) if isinstance(obj, Headers)]
    assert kept, "held while an approval could still send the body again"
    ex.handle(Headers(RESP, ((":status", "200"), ("content-type", "text/event-stream")), False))
    kept = [obj for obj in gc.get_referents(*gc.get_referents(ex)) if isinstance(obj, Headers)]
    assert kept == []


def test_a_request_processor_outliving_its_exchange_refuses_instead_of_passing(no_collector: None) -> None:
    ex = Exchange(SNAPSHOT, ProtocolConfig(BodyMode.BUFFERED, BodyMode.NONE), "d-1")
    ex.handle(Headers(REQ, ((":path", "/v1/chat/completions"), ("content-type", "application/json")), False))
    processor = ex._dirs[REQ].processor
    del ex
    processor.feed(CHAT)
    with pytest.raises(Exception, match="exchange of this body has ended"):
        processor.finish()


# -- through the gRPC server ------------------------------------------------------------------------


def _headers(*items: tuple[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items])


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server(SETTINGS, Runtime(SNAPSHOT))
    await srv.start()
    yield srv
    await srv.stop(drain=False)


async def test_a_stream_envoy_resets_mid_answer_leaves_nothing_behind(
    server: Server, monkeypatch: pytest.MonkeyPatch, scanners: list[StreamScanner]
) -> None:
    exchanges: list[weakref.ref[Exchange]] = []

    class Watched(Exchange):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            exchanges.append(weakref.ref(self))

    monkeypatch.setattr(extproc.server, "Exchange", Watched)
    gc.collect()
    gc.disable()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process()
            await call.write(
                pb.ProcessingRequest(
                    request_headers=pb.HttpHeaders(
                        headers=_headers(
                            (":path", "/v1/chat/completions"), ("content-type", "application/json")
                        )
                    ),
                    protocol_config=pb.ProtocolConfiguration(request_body_mode=2, response_body_mode=4),
                )
            )
            assert (await call.read()).HasField("request_headers")
            await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=CHAT, end_of_stream=True)))
            assert (await call.read()).HasField("request_body")
            answer = _headers((":status", "200"), ("content-type", "text/event-stream"))
            await call.write(pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=answer)))
            assert (await call.read()).HasField("response_headers")
            for chunk in ANSWER[:3]:
                await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=chunk)))
            first = await call.read()  # the text before the card; the card begun is held
            assert b"Noted." in first.response_body.response.body_mutation.streamed_response.body
            assert scanners
            assert all(s._open for s in scanners)
            call.cancel()  # as Envoy resets the side stream when the client goes away
        for _ in range(100):  # the server's side of the stream ends on its own loop turns
            if exchanges and exchanges[0]() is None:
                break
            await asyncio.sleep(0.02)
        assert len(exchanges) == 1
        assert exchanges[0]() is None
        assert not any(s._open for s in scanners)
        held = [weakref.ref(s) for s in scanners]
        scanners.clear()
        assert all(ref() is None for ref in held)
    finally:
        gc.enable()
