"""The floor: an ext_proc server that does nothing, as fast as grpc.aio lets Python do nothing.

The benchmark puts it behind the same Envoy config as extproc, so a path through it pays everything
extproc pays for being an external processor in Python (one gRPC stream per request, a round trip per
phase, every response chunk sent out and echoed back, protobuf parsing and building, the event loop)
and nothing of what extproc does with the messages. extproc's figures divided by the floor's are the
cost of scanning, masking and deciding; the floor's divided by Envoy alone's are the cost of ext_proc
itself, which no work inside extproc can remove.

It answers every phase as ``envoy/envoy.yaml`` asks for, with the body modes Envoy announces in the
first message: headers and trailers CONTINUE unchanged; a BUFFERED body gets an empty BodyResponse
(CONTINUE, no mutation); a FULL_DUPLEX_STREAMED chunk is echoed back unchanged in a
StreamedBodyResponse with its own ``end_of_stream``, which is how a processor lets bytes through in that
mode. It never ends a stream cleanly while Envoy still sends: Envoy reads a clean close as "go on
without the processor" (fail-open), so a message it does not know aborts the stream with INTERNAL, and
the handler returns only once Envoy has closed its side.

    python -m bench.floor --port 0     # prints {"event": "ready", "grpc": "127.0.0.1:PORT"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

# Route limit for buffered request bodies in envoy/envoy.yaml is 16 MiB; leave room for the framing.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
FULL_DUPLEX_STREAMED = 4  # ProcessingMode.BodySendMode


def _echo(chunk: pb.HttpBody) -> pb.BodyResponse:
    """The chunk sent on as it came, with its end_of_stream: in FULL_DUPLEX_STREAMED only what the
    processor sends back reaches the other side."""
    streamed = pb.StreamedBodyResponse(body=chunk.body, end_of_stream=chunk.end_of_stream)
    mutation = pb.BodyMutation(streamed_response=streamed)
    return pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))


class FloorProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    """Answers every message of every phase with the reply that changes nothing."""

    async def Process(
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        request_streamed = response_streamed = False
        async for message in request_iterator:
            if message.HasField("protocol_config"):
                modes = message.protocol_config
                request_streamed = modes.request_body_mode == FULL_DUPLEX_STREAMED
                response_streamed = modes.response_body_mode == FULL_DUPLEX_STREAMED
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse())
            elif kind == "request_body":
                body = _echo(message.request_body) if request_streamed else pb.BodyResponse()
                yield pb.ProcessingResponse(request_body=body)
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif kind == "response_headers":
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif kind == "response_body":
                body = _echo(message.response_body) if response_streamed else pb.BodyResponse()
                yield pb.ProcessingResponse(response_body=body)
            elif kind == "response_trailers":
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
            else:
                # Returning here would be a clean close, which Envoy takes as leave to go on unprocessed.
                await context.abort(grpc.StatusCode.INTERNAL, f"unexpected ext_proc message {kind!r}")


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(FloorProcessor(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(json.dumps({"event": "ready", "grpc": f"{host}:{bound}"}), flush=True)
    await stopping.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind, 0 for any free one (default 0)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port))
    except OSError as error:
        print(f"floor: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
