"""Python client for the `recommender` ensemble, over Triton gRPC (default) or HTTP, sync or async.

    from client import RecommenderClient
    with RecommenderClient("127.0.0.1:8001") as c:
        rec = c.recommend(1000001, k=10, hour=20, client_device="mobile")
        rec.item_ids, rec.scores, rec.cold_start, rec.degraded, rec.version
        similar = c.recommend(1000001, k=10, scene="item_detail", context_item_ids=[5000017])
        similar.routes, similar.experiment
        c.recommend(key_id("c0ffee-42"))    # a shop whose ids are text (`shoprec data --string-ids`)

gRPC is the protocol to expose beyond the host. `shoprec serve` puts a validating front on HTTP
(Triton 2.51's own HTTP/JSON front end can be killed by a malformed request declaring a huge
shape); the container keeps HTTP on loopback (see README).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tritonclient.utils import InferenceServerException

from shoprec.contract import ENSEMBLE, ROUTES
from shoprec.ids import key_id  # noqa: F401 - text user ids (data loaded with --string-ids): c.recommend(key_id("u-17"))

REQUIRED_OUTPUTS = ("item_ids", "scores", "cold_start")


class IncompleteResponse(InferenceServerException):
    """A successful answer that lacks outputs every answer of the ensemble carries. Recommendations are read-only, so
    the clients ask once more before raising it (`retry_incomplete`); `client.incomplete` counts such answers.
    Seen once, in a fresh-clone CI run: a gRPC answer without outputs from tritonserver 2.51 under a concurrency-8
    soak (benchmarks/reliability.py); none in the 600 s soak of benchmarks/results/reliability.md."""


@dataclass(frozen=True)
class Recommendation:
    user_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    cold_start: bool
    routes: list[list[str]] | None = None  # per item, the recall routes that proposed it (servers that say so)
    degraded: bool = False  # the online store failed: the list comes from the export's snapshot of the user
    experiment: dict[str, str] | None = None  # experiment layer -> the user's arm (servers that say so)
    version: int | None = None  # the bundle version that served the list (`shoprec deploy`; servers that say so)


def _module(protocol: str, aio: bool = False):
    if protocol == "grpc":
        import tritonclient.grpc as m
        import tritonclient.grpc.aio as a
    elif protocol == "http":
        import tritonclient.http as m
        import tritonclient.http.aio as a
    else:
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    return a if aio else m


def _wire_int(name: str, value, dtype: str, np_dtype) -> None:
    """ValueError unless `value` is an integer that fits the wire type: numpy would wrap one outside it
    (k = 2^32 + 5 sent as 5)."""
    bounds = np.iinfo(np_dtype)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not bounds.min <= value <= bounds.max:
        raise ValueError(f"{name} must be an integer in the {dtype} range [{bounds.min}, {bounds.max}], got {value!r}")


def build_inputs(mod, user_id: int, k: int, hour=None, weekday=None, client_device=None, exclude_seen=None,
                 diversity=None, scene=None, context_item_ids=None, force_arms=None, blend=None) -> list:
    def tensor(name, value, dtype, np_dtype):
        if np.dtype(np_dtype).kind == "i":
            _wire_int(name, value, dtype, np_dtype)
        t = mod.InferInput(name, [1, 1], dtype)
        t.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
        return t

    inputs = [tensor("user_id", user_id, "INT64", np.int64), tensor("k", k, "INT32", np.int32)]
    if hour is not None:
        inputs.append(tensor("hour", hour, "INT32", np.int32))
    if weekday is not None:
        inputs.append(tensor("weekday", weekday, "INT32", np.int32))
    if client_device is not None:
        inputs.append(tensor("client_device", client_device.encode(), "BYTES", np.object_))
    if exclude_seen is not None:
        inputs.append(tensor("exclude_seen", bool(exclude_seen), "BOOL", np.bool_))
    if diversity is not None:
        inputs.append(tensor("diversity", float(diversity), "FP32", np.float32))
    if scene is not None:
        inputs.append(tensor("scene", scene.encode(), "BYTES", np.object_))
    if context_item_ids is not None and len(context_item_ids):
        for x in context_item_ids:
            _wire_int("context_item_ids", x, "INT64", np.int64)
        ids = np.asarray(context_item_ids, dtype=np.int64).reshape(1, -1)
        t = mod.InferInput("context_item_ids", list(ids.shape), "INT64")
        t.set_data_from_numpy(ids)
        inputs.append(t)
    if force_arms:
        text = ",".join(f"{k}={v}" for k, v in force_arms.items()) if isinstance(force_arms, dict) else str(force_arms)
        inputs.append(tensor("force_arms", text.encode(), "BYTES", np.object_))
    if blend is not None:
        w = np.asarray(blend, dtype=np.float32).reshape(1, 3)
        t = mod.InferInput("blend", [1, 3], "FP32")
        t.set_data_from_numpy(w)
        inputs.append(t)
    return inputs


def _output_names(result) -> list[str]:
    response = result.get_response()
    outputs = response.get("outputs", []) if isinstance(response, dict) else response.outputs  # HTTP: JSON; gRPC: proto
    return [o["name"] if isinstance(o, dict) else o.name for o in outputs]


def _parse(user_id, result) -> Recommendation:
    missing = [name for name in REQUIRED_OUTPUTS if result.as_numpy(name) is None]
    if missing:
        raise IncompleteResponse(f"the server answered user {user_id} without {', '.join(missing)} "
                                 f"(outputs in the answer: {', '.join(_output_names(result)) or 'none'})")
    masks = result.as_numpy("item_routes")
    routes = None if masks is None else [[r for bit, r in enumerate(ROUTES) if int(m) & (1 << bit)] for m in masks[0]]
    degraded = result.as_numpy("degraded")
    exp = result.as_numpy("experiment")
    experiment = None
    if exp is not None:
        text = exp.ravel()[0]
        text = text.decode() if isinstance(text, bytes) else str(text)
        experiment = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    version = result.as_numpy("served_version")
    return Recommendation(user_id, result.as_numpy("item_ids")[0], result.as_numpy("scores")[0],
                          bool(result.as_numpy("cold_start")[0, 0]), routes, degraded is not None and bool(degraded[0, 0]),
                          experiment, None if version is None else int(version.ravel()[0]))


def _retries(n: int) -> int:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"retry_incomplete must be an integer >= 0, got {n!r}")
    return n


def _tls_args(protocol: str, tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> dict:
    """gRPC over TLS: the CA that signed the server's certificate (tls_ca), and for mutual TLS this client's
    certificate and key."""
    if not (tls_ca or tls_cert or tls_key):
        return {}
    if protocol != "grpc":
        raise ValueError("TLS is supported for gRPC (the protocol to expose); HTTP stays on loopback")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs its key (tls_cert and tls_key)")
    return {"ssl": True, "root_certificates": tls_ca, "certificate_chain": tls_cert, "private_key": tls_key}


class RecommenderClient:
    """Synchronous client. `url` is host:port (8001 for gRPC, 8000 for HTTP by default). For a server with
    gRPC TLS, pass tls_ca (PEM of the CA that signed its certificate; tls_cert/tls_key for mutual TLS)."""

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", model: str = ENSEMBLE,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 retry_incomplete: int = 1):
        self._mod = _module(protocol)
        self._client = self._mod.InferenceServerClient(url, **_tls_args(protocol, tls_ca, tls_cert, tls_key))
        self.model = model
        self.retry_incomplete = _retries(retry_incomplete)  # asks again after an answer without outputs (IncompleteResponse)
        self.incomplete = 0  # such answers so far, retried or raised

    def ready(self) -> bool:
        return self._client.is_server_ready() and self._client.is_model_ready(self.model)

    def recommend(self, user_id: int, k: int = 10, hour=None, weekday=None, client_device=None, exclude_seen=None,
                  diversity=None, scene=None, context_item_ids=None, force_arms=None, blend=None) -> Recommendation:
        """Top-k for one user. Context (hour, weekday, client_device: mobile, web...) is optional: absent means unknown.
        exclude_seen=False keeps items the user already interacted with (default: the server's setting).
        scene: home (default), item_detail, cart or a configured one; context_item_ids: the viewed item or the
        cart's items (raw ids); force_arms: {layer: arm} (QA) instead of the user's hashed arms; blend: the final
        score's weights (pCTR, pCTR*pCVR, pCTR*pCVR*item value) instead of the scene's."""
        inputs = build_inputs(self._mod, user_id, k, hour, weekday, client_device, exclude_seen, diversity, scene,
                              context_item_ids, force_arms, blend)
        for attempt in range(self.retry_incomplete + 1):
            try:
                return _parse(user_id, self._client.infer(self.model, inputs))
            except IncompleteResponse:
                self.incomplete += 1
                if attempt == self.retry_incomplete:
                    raise

    def close(self):
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRecommenderClient:
    """asyncio client: `await c.recommend(...)`; many in flight at once share one connection."""

    def __init__(self, url: str = "127.0.0.1:8001", protocol: str = "grpc", model: str = ENSEMBLE,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 retry_incomplete: int = 1):
        self._mod = _module(protocol, aio=True)
        self._client = self._mod.InferenceServerClient(url, **_tls_args(protocol, tls_ca, tls_cert, tls_key))
        self.model = model
        self.retry_incomplete = _retries(retry_incomplete)
        self.incomplete = 0

    async def recommend(self, user_id: int, k: int = 10, hour=None, weekday=None, client_device=None,
                        exclude_seen=None, diversity=None, scene=None, context_item_ids=None, force_arms=None,
                        blend=None) -> Recommendation:
        inputs = build_inputs(self._mod, user_id, k, hour, weekday, client_device, exclude_seen, diversity, scene,
                              context_item_ids, force_arms, blend)
        for attempt in range(self.retry_incomplete + 1):
            try:
                return _parse(user_id, await self._client.infer(self.model, inputs))
            except IncompleteResponse:
                self.incomplete += 1
                if attempt == self.retry_incomplete:
                    raise

    async def close(self):
        await self._client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
