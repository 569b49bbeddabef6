"""The comparison server: the same in-process pipeline behind FastAPI + uvicorn.

It speaks the subset of the KServe v2 / Open Inference HTTP protocol that perf_analyzer uses
(model metadata, config, statistics, JSON infer), so ONE load generator drives Triton and this
server with the same requests. It is what many teams would build instead of Triton: one process
per worker, the whole pipeline per request, no cross-request batching.

    SHOPREC_ARTIFACTS=artifacts .venv/bin/python -m uvicorn benchmarks.fastapi_app:app --workers 2

Not a product path: the served product is the Triton ensemble (model_repository/).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from google.protobuf import json_format
from pydantic import BaseModel, ValidationError

from runtime.pipeline import Pipeline
from runtime.steps import RequestError
from serving.repository import ensemble_config
from shoprec import contract

_pipeline: Pipeline | None = None
# how a worker runs the pipeline: "inline" (in the event loop, one request at a time: the faster here, see
# benchmarks/fastapi_modes.py) or "thread" (FastAPI's threadpool, as a sync endpoint would)
INLINE = os.environ.get("SHOPREC_FASTAPI_MODE", "inline") == "inline"
_DTYPES = {"INT64": np.int64, "INT32": np.int32, "BYTES": object, "BOOL": bool, "FP32": np.float32}


def pipeline() -> Pipeline:
    global _pipeline
    if _pipeline is None:
        _pipeline = Pipeline()
    return _pipeline


class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[InferTensor]


def _config() -> dict:
    cfg = ensemble_config()
    cfg.ClearField("platform")
    cfg.ClearField("ensemble_scheduling")
    cfg.backend = "fastapi"
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


def _metadata() -> dict:
    def io(t: contract.Tensor) -> dict:
        return {"name": t.name, "datatype": "BYTES" if t.dtype == "STRING" else t.dtype, "shape": [-1, *t.dims]}

    return {"name": contract.ENSEMBLE, "versions": ["1"], "platform": "fastapi",
            "inputs": [io(t) for t in contract.REQUEST_INPUTS], "outputs": [io(t) for t in contract.RESPONSE_OUTPUTS]}


@contextlib.asynccontextmanager
async def _lifespan(_app):
    pipeline()  # load (and checksum) the bundle before the first request
    yield


app = FastAPI(title="shoprec FastAPI baseline", lifespan=_lifespan)


@app.get("/v2")
def server_metadata() -> dict:
    return {"name": "shoprec-fastapi", "version": "1", "extensions": []}


@app.get("/v2/health/ready")
def ready() -> dict:
    return {}


@app.get(f"/v2/models/{contract.ENSEMBLE}")
def metadata() -> dict:
    return _metadata()


@app.get(f"/v2/models/{contract.ENSEMBLE}/config")
def config() -> dict:
    return _config()


@app.get(f"/v2/models/{contract.ENSEMBLE}/stats")
def stats() -> dict:
    # perf_analyzer asks for server-side statistics; this server keeps none (zeros, honestly)
    zero = {"count": 0, "ns": 0}
    return {"model_stats": [{"name": contract.ENSEMBLE, "version": "1", "last_inference": 0, "inference_count": 0,
                             "execution_count": 0, "inference_stats": {k: zero for k in (
                                 "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                                 "cache_hit", "cache_miss")}, "batch_stats": []}]}


@app.post(f"/v2/models/{contract.ENSEMBLE}/infer")
async def infer(raw: Request) -> dict:
    # parsed from the body whatever its Content-Type (perf_analyzer and tritonclient send none)
    try:
        request = InferRequest.model_validate_json(await raw.body())
    except ValidationError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    if INLINE:  # one request at a time per worker, in the event loop: no threads contending for the GIL
        return _infer(request)
    return await run_in_threadpool(_infer, request)


def _infer(request: InferRequest) -> dict:
    try:
        arrays = {}
        for t in request.inputs:
            if t.datatype not in _DTYPES:
                raise RequestError(f"input {t.name!r}: unsupported datatype {t.datatype}")
            arrays[t.name] = np.asarray(t.data, dtype=_DTYPES[t.datatype]).reshape(t.shape)
        for name in ("user_id", "k"):
            if name not in arrays:
                raise RequestError(f"missing input {name!r}")
        # [B, 1] request inputs as one value per user; context_item_ids stays [B, L]
        out = pipeline().recommend(**{t.name: None if arrays.get(t.name) is None else
                                      arrays[t.name] if t.name in ("context_item_ids", "blend") else arrays[t.name].ravel()
                                      for t in contract.REQUEST_INPUTS}, with_routes=True)
    except (RequestError, ValueError) as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    ids = np.stack([o[0] for o in out])
    scores = np.stack([o[1] for o in out])
    routes = np.stack([o[3] for o in out])
    cold = [[o[2]] for o in out]
    return {"model_name": contract.ENSEMBLE, "id": request.id or "", "outputs": [
        {"name": "item_ids", "datatype": "INT64", "shape": list(ids.shape), "data": ids.ravel().tolist()},
        {"name": "scores", "datatype": "FP32", "shape": list(scores.shape), "data": scores.ravel().tolist()},
        {"name": "cold_start", "datatype": "BOOL", "shape": [len(cold), 1], "data": [c[0] for c in cold]},
        {"name": "item_routes", "datatype": "INT32", "shape": list(routes.shape), "data": routes.ravel().tolist()}]}
