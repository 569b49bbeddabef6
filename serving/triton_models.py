"""Triton python-backend models: one generic adapter from Triton requests to serving/steps.py.

Each step's inputs and outputs come from its declaration in shoprec/contract.py; `STEP_RUNNERS`
says what computes it. `execute` validates requests one by one (a bad one gets its own error
response), runs the good ones as one batch, and splits the results back. An unexpected failure in
the batched compute fails only the requests of that batch, with the error message; the server
stays up. The device comes from Triton (`model_instance_kind`), never from code.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from shoprec.contract import STEP_BY_NAME
from shoprec.device import triton_device

from .steps import (Bundle, CandidateFeatures, FeatureTransform, OnnxModel, RequestError, Retrieval, TopK, bundle_dir,
                    decode_device, max_k, serve_config, validate_request)


def _transform(bundle, cfg, device, device_id):
    step = FeatureTransform(bundle)
    k_max = max_k(bundle, cfg)

    def check(a):
        n = len(a["user_id"])
        if n == 0:
            raise RequestError("empty request: send at least one row")
        if a["k"].shape != a["user_id"].shape:
            raise RequestError(f"k must have the same shape as user_id, got {list(a['k'].shape)} vs {list(a['user_id'].shape)}")
        if a.get("device") is not None:
            a["device"] = decode_device(a["device"])
        for name in ("hour", "weekday", "device"):
            if a.get(name) is not None and len(np.ravel(a[name])) != n:
                raise RequestError(f"{name} must have one value per user_id row")
        validate_request(a["k"].ravel(), _flat(a.get("hour")), _flat(a.get("weekday")), a.get("device"), k_max)
        return a

    def run(a):
        cat, cont, seq, kinds, rows, cold = step(a["user_id"].ravel(), _flat(a.get("hour")), _flat(a.get("weekday")),
                                                 a.get("device"))
        return cat, cont, seq, kinds, rows[:, None], cold[:, None]

    return check, run


def _user_tower(bundle, cfg, device, device_id):
    model = OnnxModel(bundle, "user_tower", device, device_id)
    return None, lambda a: (model(a["user_cat"], a["user_cont"], a["seq_items"], a["seq_kinds"]),)


def _retrieval(bundle, cfg, device, device_id):
    step = Retrieval(bundle, cfg, device, device_id)
    return None, lambda a: step(a["user_embedding"], a["user_row"].ravel(), _flat(a.get("exclude_seen")))


def _candidate_features(bundle, cfg, device, device_id):
    step = CandidateFeatures(bundle)
    return None, lambda a: step(a["candidate_rows"])


def _ranker(bundle, cfg, device, device_id):
    model = OnnxModel(bundle, "ranker", device, device_id)
    names = [t.name for t in STEP_BY_NAME["ranker"].inputs]
    return None, lambda a: (model(*[a[n] for n in names]),)


STEP_RUNNERS = {"feature_transform": _transform, "user_tower": _user_tower, "retrieval": _retrieval,
                "candidate_features": _candidate_features, "ranker": _ranker}


def _flat(x):
    return None if x is None else np.ravel(x)


def _input(request, name, required=True):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise RequestError(f"missing input {name!r}")
        return None
    return t.as_numpy()


class StepModel:
    """One ensemble step: the model's name (its folder) picks the step's declaration and runner."""

    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.step = STEP_BY_NAME[self.config["name"]]
        device, device_id = triton_device(args)
        self.check, self.run = STEP_RUNNERS[self.step.name](Bundle(bundle_dir()), serve_config(), device, device_id)
        self.optional = [t.name for t in self.step.inputs if t.optional]

    def parse(self, request) -> dict:
        arrays = {t.name: _input(request, t.name, not t.optional) for t in self.step.inputs}
        return self.check(arrays) if self.check else arrays

    def execute(self, requests):
        # optional inputs are present in every request of a batch or in none: group requests by which they carry
        keys = [tuple(pb_utils.get_input_tensor_by_name(r, n) is not None for n in self.optional) for r in requests]
        responses = [None] * len(requests)
        for key in set(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            for i, resp in zip(idx, self._execute([requests[i] for i in idx])):
                responses[i] = resp
        return responses

    def _execute(self, requests):
        responses = [None] * len(requests)
        parsed, good = [], []
        for i, request in enumerate(requests):
            try:
                parsed.append(self.parse(request))
                good.append(i)
            except RequestError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if not good:
            return responses
        counts = [len(p[self.step.inputs[0].name]) for p in parsed]
        batch = {name: None if parsed[0][name] is None else np.concatenate([p[name] for p in parsed]) for name in parsed[0]}
        try:
            outputs, error = self.run(batch), None
        except RequestError as exc:
            outputs, error = None, str(exc)
        except Exception as exc:  # noqa: BLE001 - reported per request; the model keeps serving
            outputs, error = None, f"{self.step.name} failed: {type(exc).__name__}: {exc}"
        offsets = np.cumsum([0, *counts])
        for j, i in enumerate(good):
            if outputs is None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
                continue
            tensors = [pb_utils.Tensor(t.name, np.ascontiguousarray(out[offsets[j] : offsets[j + 1]]))
                       for t, out in zip(self.step.outputs, outputs)]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses


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
                width = max(len(t[0]) for t in top)
                ids = np.stack([np.pad(t[0], (0, width - len(t[0])), constant_values=-1) for t in top]).astype(np.int64)
                sc = np.stack([np.pad(t[1], (0, width - len(t[1])), constant_values=-np.inf) for t in top]).astype(np.float32)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("item_ids", ids),
                                                                            pb_utils.Tensor("scores", sc)]))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
