"""envoy.py: the only translation between ext_proc protobufs and the exchange's plain types."""

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc import envoy
from extproc.model import (
    Body,
    BodyMode,
    ContinueHeaders,
    Direction,
    HeaderChanges,
    Headers,
    Reject,
    ReplaceBody,
    StreamChunk,
)


def test_header_values_are_sent_in_raw_value_only() -> None:
    # Envoy 1.40 turns a mutation that sets only `value` into an empty header.
    message = envoy.encode(
        ContinueHeaders(Direction.REQUEST, HeaderChanges(set=(("x-a", "1"),), remove=("authorization",)))
    )
    [option] = message.request_headers.response.header_mutation.set_headers
    assert option.header.key == "x-a"
    assert option.header.raw_value == b"1"
    assert option.header.value == ""
    assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert list(message.request_headers.response.header_mutation.remove_headers) == ["authorization"]


def test_decode_headers_reads_raw_value_and_leaves_attributes_unread() -> None:
    """Nothing decides on Envoy's attributes: neither asked for (envoy.yaml) nor decoded, per headers
    message (MessageToDict was the costliest step of decoding one)."""
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[
                    base_pb2.HeaderValue(key="Content-Type", raw_value=b"application/json"),
                    base_pb2.HeaderValue(key="x-old", value="legacy"),
                ]
            ),
            end_of_stream=False,
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=2, response_body_mode=4),
    )
    message.attributes["envoy.filters.http.ext_proc"].update({"request.id": "abc"})
    event = envoy.decode(message)
    assert isinstance(event, Headers)
    assert event.items == (("content-type", "application/json"), ("x-old", "legacy"))
    assert not hasattr(event, "attributes")
    config = envoy.protocol_config(message)
    assert config is not None
    assert (config.request_body_mode, config.response_body_mode) == (
        BodyMode.BUFFERED,
        BodyMode.FULL_DUPLEX_STREAMED,
    )


def test_decode_body() -> None:
    event = envoy.decode(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"abc", end_of_stream=True)))
    assert event == Body(Direction.RESPONSE, b"abc", True)


def test_stream_chunk_uses_streamed_response() -> None:
    message = envoy.encode(StreamChunk(Direction.RESPONSE, b"data", True))
    streamed = message.response_body.response.body_mutation.streamed_response
    assert (streamed.body, streamed.end_of_stream) == (b"data", True)


def test_replace_body_with_content_length() -> None:
    message = envoy.encode(
        ReplaceBody(Direction.REQUEST, b"new", HeaderChanges(set=(("content-length", "3"),)))
    )
    common = message.request_body.response
    assert common.body_mutation.body == b"new"
    assert common.header_mutation.set_headers[0].header.raw_value == b"3"
    unchanged = envoy.encode(ReplaceBody(Direction.REQUEST, None))
    assert not unchanged.request_body.response.HasField("body_mutation")


def test_reject_is_an_immediate_json_response() -> None:
    message = envoy.encode(
        Reject(403, b'{"error":"x"}', (("content-type", "application/json"),), "extproc_x")
    )
    immediate = message.immediate_response
    assert immediate.status.code == 403
    assert immediate.body == b'{"error":"x"}'
    assert immediate.headers.set_headers[0].header.raw_value == b"application/json"
    assert immediate.details == "extproc_x"
