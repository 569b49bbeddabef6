"""A validating HTTP front for Triton's HTTP/REST endpoint: the only HTTP port `shoprec serve` opens.

Triton 2.51's HTTP front end can be killed by a ~100-byte request (a declared shape of [2^31, 1] or
[2^63-1, 1], JSON nested 100k deep), answers malformed JSON with 500, and wraps integers past a
tensor's type silently. So tritonserver's own HTTP binds to a private loopback port, and this front
(aiohttp, in the `shoprec serve` process) listens on the public one. Per request it:
- refuses chunked bodies and bodies over `max_body` bytes (400 / 413), before reading them;
- for inference requests (`POST /v2/models/<model>[/versions/<v>]/infer`), parses the JSON (or the
  JSON header of Triton's binary-tensor extension) and checks it: at most `max_depth` levels of
  nesting; `inputs` a list of objects with a name, a known datatype, a shape of non-negative
  integers whose product is at most `max_elements`; JSON data of exactly that many values, numbers
  for numeric types, integers inside the datatype's range; binary data whose declared sizes add up
  to the bytes sent;
- answers every refusal with 400 and `{"error": "<reason naming the input>"}`, and forwards
  everything else, headers included (the admin key), unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re

from .background import BackgroundServer

log = logging.getLogger("shoprec.serve")

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
INT_RANGE = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64, "UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64}
BYTES_PER = {"BOOL": 1, "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8,
             "FP16": 2, "FP32": 4, "FP64": 8, "BF16": 2}
DATATYPES = set(BYTES_PER) | {"BYTES"}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "host", "content-length"}


class Refused(ValueError):
    """The request is refused with 400 (or `status`) and this reason."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


def _depth(x, limit: int, level: int = 1) -> None:
    if level > limit:
        raise Refused(f"JSON nested deeper than {limit} levels")
    if isinstance(x, dict):
        for v in x.values():
            _depth(v, limit, level + 1)
    elif isinstance(x, list):
        for v in x:
            if isinstance(v, (dict, list)):
                _depth(v, limit, level + 1)


def _flatten(data, name: str, out: list, limit: int) -> None:
    for v in data:
        if isinstance(v, list):
            _flatten(v, name, out, limit)
        else:
            out.append(v)
        if len(out) > limit:
            raise Refused(f"input {name!r}: more data than its shape holds")


def check_infer_json(doc, binary_bytes: int | None, max_depth: int, max_elements: int) -> None:
    """Raise Refused when an inference request's JSON (or binary-extension header) is malformed."""
    _depth(doc, max_depth)
    if not isinstance(doc, dict):
        raise Refused("the body must be a JSON object")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Refused("'inputs' must be a non-empty list")
    binary_total = 0
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise Refused(f"inputs[{i}] must be an object with a 'name'")
        name, dtype, shape = t["name"], t.get("datatype"), t.get("shape")
        if dtype not in DATATYPES:
            raise Refused(f"input {name!r}: unknown datatype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise Refused(f"input {name!r}: 'shape' must be a list of integers")
        if any(d < 0 for d in shape):
            raise Refused(f"input {name!r}: negative dimension in shape {shape}")
        if any(d > max_elements for d in shape) or math.prod(shape) > max_elements:
            raise Refused(f"input {name!r}: shape {shape} holds more than {max_elements} elements")
        n = math.prod(shape)
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise Refused(f"input {name!r}: 'parameters' must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise Refused(f"input {name!r}: binary_data_size must be a non-negative integer")
            if dtype in BYTES_PER and size != n * BYTES_PER[dtype]:
                raise Refused(f"input {name!r}: binary_data_size {size} does not match shape {shape} of {dtype}")
            binary_total += size
            continue
        data = t.get("data")
        if not isinstance(data, list):
            raise Refused(f"input {name!r}: 'data' must be a list")
        flat: list = []
        _flatten(data, name, flat, n)
        if len(flat) != n:
            raise Refused(f"input {name!r}: {len(flat)} values for shape {shape}")
        if dtype == "BYTES":
            if not all(isinstance(v, str) for v in flat):
                raise Refused(f"input {name!r}: BYTES data must be strings")
        elif dtype == "BOOL":
            if not all(isinstance(v, bool) for v in flat):
                raise Refused(f"input {name!r}: BOOL data must be true or false")
        elif dtype in INT_RANGE:
            bits, signed = INT_RANGE[dtype], dtype.startswith("INT")
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            for v in flat:
                if not isinstance(v, int) or isinstance(v, bool):
                    raise Refused(f"input {name!r}: {dtype} data must be integers, got {v!r}")
                if not lo <= v <= hi:
                    raise Refused(f"input {name!r}: {v} is outside {dtype} ({lo}..{hi})")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
            raise Refused(f"input {name!r}: {dtype} data must be numbers")
    if binary_bytes is not None and binary_total != binary_bytes:
        raise Refused(f"binary tensor data: {binary_bytes} bytes sent, the header declares {binary_total}")


class HttpFront(BackgroundServer):
    """The front on (address, port), forwarding to Triton's HTTP at `backend` (host:port). Runs its own event
    loop in a daemon thread: start() returns once it listens; stop() closes it."""

    name = "http-front"

    def __init__(self, address: str, port: int, backend: str, max_body: int = 1 << 20, max_depth: int = 32,
                 max_elements: int = 1 << 16, timeout_s: float = 60.0):
        super().__init__()
        self.address, self.port, self.backend = address, port, backend
        self.max_body, self.max_depth, self.max_elements, self.timeout_s = max_body, max_depth, max_elements, timeout_s

    async def _serve(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        # the client's own headers only: an added Accept-Encoding would make Triton compress answers that a client
        # which never asked for it (perf_analyzer's libcurl) cannot read
        self._session = ClientSession(connector=TCPConnector(limit=256), timeout=ClientTimeout(total=self.timeout_s),
                                      auto_decompress=False,
                                      skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"))
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.address, self.port)
        await site.start()
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    async def _handle(self, request):
        from aiohttp import ClientError, web

        try:
            body = await self._read(request)
            if request.method == "POST" and INFER_PATH.match(request.path):
                self._check(request, body)
        except Refused as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            async with self._session.request(request.method, f"http://{self.backend}{request.rel_url}", data=body,
                                             headers=headers) as up:
                payload = await up.read()
                out = {k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS}
                return web.Response(body=payload, status=up.status, headers=out)
        except (ClientError, asyncio.TimeoutError) as exc:
            return web.json_response({"error": f"the server did not answer ({type(exc).__name__})"}, status=503)

    async def _read(self, request) -> bytes:
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise Refused("chunked request bodies are not accepted; send Content-Length")
        length = request.content_length
        if length is not None and length > self.max_body:
            raise Refused(f"request body of {length} bytes is over the {self.max_body} byte limit", 413)
        return await request.read() if request.can_read_body else b""

    def _check(self, request, body: bytes) -> None:
        header_len = request.headers.get("Inference-Header-Content-Length")
        binary = None
        if header_len is not None:
            if not header_len.isdigit() or int(header_len) > len(body):
                raise Refused("Inference-Header-Content-Length is not a length inside the body")
            binary = len(body) - int(header_len)
            body = body[: int(header_len)]
        try:
            doc = json.loads(body)
        except RecursionError:
            raise Refused(f"JSON nested deeper than {self.max_depth} levels") from None
        except ValueError as exc:
            raise Refused(f"the body is not valid JSON ({exc})") from None
        check_infer_json(doc, binary, self.max_depth, self.max_elements)
