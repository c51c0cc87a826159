"""The ``Approvals`` service over gRPC: the client stub and the server registration, derived from the
service descriptor of ``approvals_pb2`` (what ``approvals.proto`` compiles to).

grpcio-tools would also write a ``_pb2_grpc`` module: untyped, and with an abstract servicer whose every
method raises. Reading the methods from the descriptor instead gives the same wire names and message
types, typed, and a method added to the .proto is served (or refused at registration, when the servicer
lacks it) without another generated file to keep in step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from extproc.approvals.v1 import approvals_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Approvals"]


@dataclass(frozen=True)
class Method:
    name: str
    path: str  # /extproc.approvals.v1.Approvals/Name, as on the wire
    request: type[Message]
    response: type[Message]
    streams: bool  # the server answers with a stream


def methods() -> list[Method]:
    """Every method of the service, as the .proto declares it."""
    found = []
    for method in SERVICE.methods:
        if method.client_streaming:
            raise TypeError(f"{method.full_name}: client streaming is not served here")
        found.append(
            Method(
                method.name,
                f"/{SERVICE.full_name}/{method.name}",
                getattr(pb, method.input_type.name),
                getattr(pb, method.output_type.name),
                method.server_streaming,
            )
        )
    return found


class ApprovalsStub:
    """Calls the service over ``channel`` (synchronous or ``grpc.aio``): ``stub.ListPending(request,
    metadata=..., timeout=...)``, one callable per method of the .proto."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        for method in methods():
            make = channel.unary_stream if method.streams else channel.unary_unary
            call = make(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
            setattr(self, method.name, call)

    def __getattr__(self, name: str) -> Callable[..., Any]:  # for the type checker: set in __init__
        raise AttributeError(f"{SERVICE.full_name} has no method {name!r}")


def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
    """Serves every method of the .proto with the servicer's method of the same name (an ``async def``,
    an async generator for a streamed answer). Raises TypeError when one is missing: a method declared
    and not served would only fail when first called."""
    handlers = {}
    for method in methods():
        behaviour = getattr(servicer, method.name, None)
        if behaviour is None:
            raise TypeError(f"{type(servicer).__name__} does not serve {method.path}")
        make = grpc.unary_stream_rpc_method_handler if method.streams else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            behaviour,
            request_deserializer=method.request.FromString,
            response_serializer=method.response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
