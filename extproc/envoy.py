"""The only module that reads or builds ext_proc protobuf messages.

Incoming ``ProcessingRequest`` messages become the plain events of ``extproc.model``; the exchange's
plain replies become ``ProcessingResponse`` messages. Header values always travel in ``raw_value``: Envoy
1.40 turns a mutation that sets only ``value`` into an empty header.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2, json_format, struct_pb2, wrappers_pb2

from extproc.errors import ProtocolError
from extproc.model import (
    Body,
    BodyMode,
    ContinueHeaders,
    ContinueTrailers,
    Direction,
    Event,
    ExtendTimeout,
    HeaderChanges,
    Headers,
    ProtocolConfig,
    Reject,
    ReplaceBody,
    Reply,
    StreamChunk,
    Trailers,
)

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse

_BODY_MODES = {
    0: BodyMode.NONE,
    1: BodyMode.STREAMED,
    2: BodyMode.BUFFERED,
    3: BodyMode.BUFFERED_PARTIAL,
    4: BodyMode.FULL_DUPLEX_STREAMED,
    5: BodyMode.GRPC,
}
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def protocol_config(message: pb.ProcessingRequest) -> ProtocolConfig | None:
    """The body modes Envoy announces; present only in the first message of a stream."""
    if not message.HasField("protocol_config"):
        return None
    cfg = message.protocol_config
    try:
        return ProtocolConfig(
            request_body_mode=_BODY_MODES[cfg.request_body_mode],
            response_body_mode=_BODY_MODES[cfg.response_body_mode],
        )
    except KeyError as exc:
        raise ProtocolError(f"unknown body mode {exc.args[0]} in protocol_config") from exc


def decode(message: pb.ProcessingRequest) -> Event:
    """Turn one ProcessingRequest into an event. Unknown or empty messages raise ProtocolError."""
    kind = message.WhichOneof("request")
    if kind == "request_headers" or kind == "response_headers":
        direction = Direction.REQUEST if kind == "request_headers" else Direction.RESPONSE
        http_headers = getattr(message, kind)
        items = tuple(
            (h.key.lower(), h.raw_value.decode("utf-8", "surrogateescape") if h.raw_value else h.value)
            for h in http_headers.headers.headers
        )
        return Headers(
            direction=direction,
            items=items,
            end_of_stream=http_headers.end_of_stream,
            metadata=_metadata(message),
        )
    if kind == "request_body" or kind == "response_body":
        direction = Direction.REQUEST if kind == "request_body" else Direction.RESPONSE
        http_body = getattr(message, kind)
        return Body(direction=direction, data=http_body.body, end_of_stream=http_body.end_of_stream)
    if kind == "request_trailers":
        return Trailers(direction=Direction.REQUEST)
    if kind == "response_trailers":
        return Trailers(direction=Direction.RESPONSE)
    raise ProtocolError(f"processing request without a known phase ({kind!r})")


def _metadata(message: pb.ProcessingRequest) -> dict[str, object]:
    if not message.HasField("metadata_context"):
        return {}
    return {
        namespace: json_format.MessageToDict(value)
        for namespace, value in message.metadata_context.filter_metadata.items()
    }


def _mutation(changes: HeaderChanges) -> pb.HeaderMutation:
    """Sets first (each replacing every value of its header), then appends, in order: Envoy applies
    ``set_headers`` in order, so a repeated header is rewritten as its first value set and the rest
    appended. An append says so with the deprecated ``append: true``: Envoy 1.40's ext_proc reads
    ``append_action``'s default (APPEND_IF_EXISTS_OR_ADD, 0) as "not set", and an unset one overwrites.
    Values go back as the bytes they came as (``surrogateescape`` undoes the decoding)."""
    options = [
        base_pb2.HeaderValueOption(header=_header(key, value), append_action=_OVERWRITE)
        for key, value in changes.set
    ]
    options += [
        base_pb2.HeaderValueOption(header=_header(key, value), append=wrappers_pb2.BoolValue(value=True))
        for key, value in changes.append
    ]
    return pb.HeaderMutation(set_headers=options, remove_headers=list(changes.remove))


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, raw_value=value.encode("utf-8", "surrogateescape"))


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def encode(reply: Reply) -> pb.ProcessingResponse:
    """Turn one exchange reply into the ProcessingResponse Envoy expects for the current phase."""
    if isinstance(reply, ContinueHeaders):
        common = pb.CommonResponse(header_mutation=_mutation(reply.changes))
        headers_response = pb.HeadersResponse(response=common)
        metadata = _struct(reply.metadata) if reply.metadata else None
        if reply.direction is Direction.REQUEST:
            return pb.ProcessingResponse(request_headers=headers_response, dynamic_metadata=metadata)
        return pb.ProcessingResponse(response_headers=headers_response, dynamic_metadata=metadata)
    if isinstance(reply, ReplaceBody):
        common = pb.CommonResponse(header_mutation=_mutation(reply.changes))
        if reply.data is not None:
            common.body_mutation.body = reply.data
        return _body_response(reply.direction, common)
    if isinstance(reply, StreamChunk):
        common = pb.CommonResponse(
            body_mutation=pb.BodyMutation(
                streamed_response=pb.StreamedBodyResponse(body=reply.data, end_of_stream=reply.end_of_stream)
            )
        )
        return _body_response(reply.direction, common)
    if isinstance(reply, ContinueTrailers):
        if reply.direction is Direction.REQUEST:
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
    if isinstance(reply, Reject):
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=reply.status),
                headers=_mutation(HeaderChanges(set=reply.headers)),
                body=reply.body,
                details=reply.details,
            )
        )
    if isinstance(reply, ExtendTimeout):
        # Envoy reads this field first and ignores every other field of the message.
        timeout = duration_pb2.Duration()
        timeout.FromMilliseconds(max(1, round(reply.seconds * 1000)))
        return pb.ProcessingResponse(override_message_timeout=timeout)
    raise TypeError(f"not a reply: {reply!r}")


def _body_response(direction: Direction, common: pb.CommonResponse) -> pb.ProcessingResponse:
    if direction is Direction.REQUEST:
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
    return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))


def add_servicer(servicer: object, server: object) -> None:
    """Register an ExternalProcessor servicer (an object with an async ``Process``) on a grpc.aio server."""
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
