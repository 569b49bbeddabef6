"""Triton python-backend models: thin adapters from Triton requests to serving/steps.py.

Each `execute` validates requests one by one (a bad one gets its own error response), runs the
good ones as one batch, and splits the results back. An unexpected failure in the batched
compute fails only the requests of that batch, with the error message; the server stays up.
The device comes from Triton (`model_instance_kind`), never from code.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from shoprec.device import triton_device

from .steps import (Bundle, CandidateFeatures, FeatureTransform, OnnxModel, RequestError, Retrieval, TopK, bundle_dir,
                    decode_device, validate_request)


def _input(request, name, required=True):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise RequestError(f"missing input {name!r}")
        return None
    return t.as_numpy()


class _Step:
    outputs: tuple[str, ...] = ()

    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.device, self.device_id = triton_device(args)
        self.bundle = Bundle(bundle_dir())
        self.setup()

    def setup(self):
        raise NotImplementedError

    def parse(self, request) -> dict:
        raise NotImplementedError

    def run(self, batch: dict) -> tuple:
        raise NotImplementedError

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed, good = [], []
        for i, request in enumerate(requests):
            try:
                parsed.append(self.parse(request))
                good.append(i)
            except RequestError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if good:
            counts = [len(next(iter(p.values()))) for p in parsed]
            batch = {name: _concat([p[name] for p in parsed]) for name in parsed[0]}
            try:
                outputs = self.run(batch)
            except RequestError as exc:
                outputs, error = None, str(exc)
            except Exception as exc:  # noqa: BLE001 - reported per request; the model keeps serving
                outputs, error = None, f"{type(self).__name__} failed: {type(exc).__name__}: {exc}"
            offsets = np.cumsum([0, *counts])
            for j, i in enumerate(good):
                if outputs is None:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
                    continue
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[offsets[j] : offsets[j + 1]]))
                           for name, out in zip(self.outputs, outputs)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses


def _concat(parts):
    # optional inputs are either present in every request of a batch or in none (_grouped_execute)
    return None if parts[0] is None else np.concatenate(parts)


class FeatureTransformModel(_Step):
    outputs = ("user_cat", "user_cont", "cold_start")

    def setup(self):
        self.step = FeatureTransform(self.bundle)

    def parse(self, request):
        user_id = _input(request, "user_id")
        k = _input(request, "k")
        if user_id.shape[0] == 0:
            raise RequestError("empty request: send at least one row")
        if k.shape != user_id.shape:
            raise RequestError(f"k must have the same shape as user_id, got {list(k.shape)} vs {list(user_id.shape)}")
        hour, weekday = _input(request, "hour", False), _input(request, "weekday", False)
        device = _input(request, "device", False)
        device = decode_device(device) if device is not None else None
        for name, value in (("hour", hour), ("weekday", weekday), ("device", device)):
            if value is not None and len(np.ravel(value)) != len(user_id):
                raise RequestError(f"{name} must have one value per user_id row")
        validate_request(k.ravel(), None if hour is None else hour.ravel(), None if weekday is None else weekday.ravel(), device)
        return {"user_id": user_id.ravel(), "hour": None if hour is None else hour.ravel(),
                "weekday": None if weekday is None else weekday.ravel(), "device": device}

    def execute(self, requests):
        # context is optional per request; group requests by which context they carry so every
        # batch sent to the transform is homogeneous
        return _grouped_execute(self, requests)

    def run(self, batch):
        cat, cont, cold = self.step(batch["user_id"], batch["hour"], batch["weekday"], batch["device"])
        return cat, cont, cold[:, None]


def _grouped_execute(model, requests):
    keys = []
    for r in requests:
        keys.append(tuple(pb_utils.get_input_tensor_by_name(r, n) is not None for n in ("hour", "weekday", "device")))
    responses = [None] * len(requests)
    for key in set(keys):
        idx = [i for i, k in enumerate(keys) if k == key]
        for i, resp in zip(idx, _Step.execute(model, [requests[i] for i in idx])):
            responses[i] = resp
    return responses


class UserTowerModel(_Step):
    outputs = ("user_embedding",)

    def setup(self):
        self.model = OnnxModel(self.bundle, "user_tower", self.device, self.device_id)

    def parse(self, request):
        return {"user_cat": _input(request, "user_cat"), "user_cont": _input(request, "user_cont")}

    def run(self, batch):
        return (self.model(batch["user_cat"], batch["user_cont"]),)


class RetrievalModel(_Step):
    outputs = ("candidate_rows",)

    def setup(self):
        self.step = Retrieval(self.bundle, self.device, self.device_id)

    def parse(self, request):
        return {"user_embedding": _input(request, "user_embedding"), "cold_start": _input(request, "cold_start")}

    def run(self, batch):
        return self.step(batch["user_embedding"], batch["cold_start"].ravel())[:1]


class CandidateFeaturesModel(_Step):
    outputs = ("item_cat", "item_cont")

    def setup(self):
        self.step = CandidateFeatures(self.bundle)

    def parse(self, request):
        return {"candidate_rows": _input(request, "candidate_rows")}

    def run(self, batch):
        return self.step(batch["candidate_rows"])


class RankerModel(_Step):
    outputs = ("ranking_scores",)

    def setup(self):
        self.model = OnnxModel(self.bundle, "ranker", self.device, self.device_id)

    def parse(self, request):
        return {n: _input(request, n) for n in ("user_cat", "user_cont", "item_cat", "item_cont")}

    def run(self, batch):
        return (self.model(batch["user_cat"], batch["user_cont"], batch["item_cat"], batch["item_cont"]),)


class TopKModel:
    """Per request: k differs between requests, so the output length does too (no batching of outputs)."""

    def initialize(self, args):
        self.step = TopK(Bundle(bundle_dir()))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                rows, scores = _input(request, "candidate_rows"), _input(request, "ranking_scores")
                k = _input(request, "k").ravel()
                if (k != k[0]).any():
                    raise RequestError("k must be the same for every row of one request")
                top = [self.step(rows[i], scores[i], int(k[0])) for i in range(len(rows))]
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("item_ids", np.stack([t[0] for t in top]).astype(np.int64)),
                    pb_utils.Tensor("scores", np.stack([t[1] for t in top]).astype(np.float32))]))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
