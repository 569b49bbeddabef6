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

import asyncio
import logging
import threading

import grpc

log = logging.getLogger("shoprec.serve")

STREAMING = {"/inference.GRPCInferenceService/ModelStreamInfer"}


class GrpcFront:
    """The front on (address, port), forwarding to Triton's gRPC at `backend` (host:port). Runs its own event loop
    in a daemon thread: start() returns once it listens; stop() closes it."""

    def __init__(self, address: str, port: int, backend: str, max_message_mb: float = 1.0,
                 tls: tuple[str, str, str] | None = None):
        self.address, self.port, self.backend, self.tls = address, port, backend, tls
        self.max_bytes = int(max_message_mb * (1 << 20))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> GrpcFront:
        self._thread = threading.Thread(target=self._run, name="grpc-front", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self.backend, options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.max_bytes), ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_Forward(self._channel),))
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
        try:
            await self._stop_event.wait()
        finally:
            await server.stop(grace=2)
            await self._channel.close()


def _metadata(context) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith(":") and k != "user-agent"]


class _Forward(grpc.GenericRpcHandler):
    """Every method, forwarded as bytes."""

    def __init__(self, channel):
        self.channel = channel

    def service(self, details):
        method = details.method
        if method in STREAMING:
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _unary(self, method):
        call = self.channel.unary_unary(method)

        async def handle(request: bytes, context):
            try:
                return await call(request, metadata=_metadata(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return handle

    def _stream(self, method):
        call = self.channel.stream_stream(method)

        async def handle(requests, context):
            try:
                async for reply in call(requests, metadata=_metadata(context), timeout=context.time_remaining()):
                    yield reply
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return handle
