"""A size-capping gRPC front: the gRPC port `shoprec serve` opens when `serve.grpc_front` is on.

Triton 2.51 accepts gRPC messages up to 2 GiB and has no option to lower that; one 256 MiB request
took its RSS to 1.7 GB, never given back. gRPC's own limit (`grpc.max_receive_message_length`)
reads a message's declared length from its 5-byte prefix and refuses it before the body is
buffered (tried: a 256 MiB request to a 4 MiB server raised its RSS by 10 MB). So tritonserver's
gRPC binds to a private loopback port, and this front (grpc.aio, in the `shoprec serve` process)
listens on the public one with that limit:
- every method of Triton's `inference.GRPCInferenceService` is forwarded as raw bytes (no parsing),
  with the caller's metadata (the admin key header included) and deadline; `ModelStreamInfer` as
  a stream;
- a request over `max_message_mb` gets RESOURCE_EXHAUSTED ("Received message larger than max");
- Triton's errors come back with their own status code and message;
- TLS (and mutual TLS) is ended here when configured: Triton's private port is plaintext on
  loopback.
"""

from __future__ import annotations

import grpc

from .background import BackgroundServer

STREAMING = {"/inference.GRPCInferenceService/ModelStreamInfer"}


class GrpcFront(BackgroundServer):
    """The front on (address, port), forwarding to Triton's gRPC at `backend` (host:port). Runs its own event loop
    in a daemon thread: start() returns once it listens; stop() closes it."""

    name = "grpc-front"
    forward = None  # the handler class; None: _Forward (below). Tests put a fault-injecting one here

    def __init__(self, address: str, port: int, backend: str, max_message_mb: float = 1.0,
                 tls: tuple[str, str, str] | None = None):
        super().__init__()
        self.address, self.port, self.backend, self.tls = address, port, backend, tls
        self.max_bytes = int(max_message_mb * (1 << 20))

    async def _serve(self) -> None:
        channel = grpc.aio.insecure_channel(self.backend, options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_bytes), ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0)])
        try:
            server.add_generic_rpc_handlers(((self.forward or _Forward)(channel),))
            where = f"{self.address or '0.0.0.0'}:{self.port}"
            if self.tls is not None:
                cert, key, client_ca = self.tls
                with open(cert, "rb") as c, open(key, "rb") as k:
                    pair = (k.read(), c.read())
                root = open(client_ca, "rb").read() if client_ca else None
                bound = server.add_secure_port(where, grpc.ssl_server_credentials([pair], root_certificates=root,
                                                                                  require_client_auth=bool(client_ca)))
            else:
                bound = server.add_insecure_port(where)
            if not bound:
                raise OSError(f"gRPC front: cannot listen on {where}")
            await server.start()
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await server.stop(grace=2)
            await channel.close()


def _metadata(context) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith(":") and k != "user-agent"]


class _Forward(grpc.GenericRpcHandler):
    """Every method, forwarded as bytes; Triton's status, message and trailing metadata come back unchanged."""

    def __init__(self, channel):
        self.channel = channel

    def service(self, details):
        method = details.method
        if method in STREAMING:
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _unary(self, method):
        stub = self.channel.unary_unary(method)

        async def handle(request: bytes, context):
            call = stub(request, metadata=_metadata(context), timeout=context.time_remaining())
            try:
                reply = await call
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata() or ())
            trailing = await call.trailing_metadata()
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            return reply

        return handle

    def _stream(self, method):
        stub = self.channel.stream_stream(method)

        async def handle(requests, context):
            call = stub(requests, metadata=_metadata(context), timeout=context.time_remaining())
            try:
                async for reply in call:
                    yield reply
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata() or ())

        return handle
