"""The pipeline's steps as plain NumPy / ONNX Runtime / FAISS callables over batches.

Triton's python models (serving/triton_models.py) and the in-process reference
(serving/pipeline.py) run these same objects, so served and in-process results can be compared
id for id. Each step loads only files from the serving bundle, checked against its manifest.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feature_workflows.request_transform import TransformPlan
from shoprec.config import REPO_ROOT
from shoprec.contract import BUNDLE_FILES
from shoprec.faiss_search import search
from shoprec.manifest import verify_manifest

MAX_DEVICE_BYTES = 64


class RequestError(ValueError):
    """A bad request: reported to that request only, never to the batch it shares."""


def bundle_dir() -> Path:
    root = Path(os.environ.get("SHOPREC_ARTIFACTS", REPO_ROOT / "artifacts"))
    return root / "serving"


@dataclass
class Bundle:
    """The serving bundle. Each file is checked against the manifest once, each .npz read once,
    however many steps of one process ask for it."""

    path: Path
    _checked: set = field(default_factory=set, repr=False)
    _arrays: dict = field(default_factory=dict, repr=False)

    def file(self, key: str) -> Path:
        if key not in self._checked:
            verify_manifest(self.path, [BUNDLE_FILES[key]])
            self._checked.add(key)
        return self.path / BUNDLE_FILES[key]

    def npz(self, key: str) -> dict[str, np.ndarray]:
        if key not in self._arrays:
            with np.load(self.file(key), allow_pickle=False) as z:
                self._arrays[key] = {k: z[k] for k in z.files}
        return dict(self._arrays[key])  # callers may pop keys; the arrays themselves are shared

    @functools.cached_property
    def dims(self) -> dict:
        return json.loads(self.file("contract").read_text())


def validate_request(k: np.ndarray, hour: np.ndarray | None, weekday: np.ndarray | None, device) -> None:
    if k.size == 0:
        raise RequestError("empty request: send at least one row")
    if (k < 1).any():
        raise RequestError(f"k must be >= 1, got {int(k.min())}")
    if hour is not None and ((hour < 0) | (hour > 23)).any():
        raise RequestError(f"hour must be in 0..23, got {int(hour[(hour < 0) | (hour > 23)][0])}")
    if weekday is not None and ((weekday < 0) | (weekday > 6)).any():
        raise RequestError(f"weekday must be in 0..6 (0 = Monday), got {int(weekday[(weekday < 0) | (weekday > 6)][0])}")
    if device is not None:
        for d in device:
            if len(d) > MAX_DEVICE_BYTES:
                raise RequestError(f"device must be at most {MAX_DEVICE_BYTES} bytes")


def decode_device(raw) -> np.ndarray:
    try:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.ravel(raw)], dtype=object)
    except UnicodeDecodeError as exc:
        raise RequestError("device must be UTF-8 text") from exc


class FeatureTransform:
    """(user_id, optional hour/weekday/device) -> user_cat [B, Fu], user_cont [B, Cu], cold_start [B].

    Profile and history come from the user store snapshot; absent context defaults to the current
    UTC hour/weekday and a null device (encoded as the workflow's null code)."""

    def __init__(self, bundle: Bundle):
        self.plan = TransformPlan.load(bundle.file("query_plan"), bundle.file("query_vocab"))
        store = bundle.npz("user_store")
        self.store_ids = store.pop("user_id")
        self.store = store
        self.user_id_col = self.plan.cat_names.index("user_id")

    def __call__(self, user_id: np.ndarray, hour=None, weekday=None, device=None):
        n = len(user_id)
        pos = np.searchsorted(self.store_ids, user_id)
        pos_c = np.minimum(pos, len(self.store_ids) - 1)
        known = (pos < len(self.store_ids)) & (self.store_ids[pos_c] == user_id)
        raw: dict[str, np.ndarray] = {"user_id": user_id.astype(np.int64)}
        for col in self.plan.inputs:
            if col in raw or col in ("hour", "weekday", "device"):
                continue
            values = self.store[col][pos_c]
            null = ~known | self.store.get(f"{col}__null", np.zeros(len(self.store_ids), bool))[pos_c]
            if values.dtype.kind == "f":
                raw[col] = np.where(null, np.nan, values)
            else:
                raw[col] = np.where(null, None, values.astype(object))
        now = time.gmtime()
        raw["hour"] = hour.astype(np.int64) if hour is not None else np.full(n, now.tm_hour)
        raw["weekday"] = weekday.astype(np.int64) if weekday is not None else np.full(n, now.tm_wday)
        raw["device"] = device if device is not None else np.full(n, None, dtype=object)
        cat, cont = self.plan.pack(self.plan.transform(raw))
        cold = cat[:, self.user_id_col] <= 2  # null or out-of-vocabulary user id: no personal signal
        return cat, cont, cold


class OnnxModel:
    """An ONNX Runtime session over the bundle's ONNX file; CUDA provider when Triton gave a GPU."""

    def __init__(self, bundle: Bundle, key: str, device: str = "cpu", device_id: int = 0, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = [("CUDAExecutionProvider", {"device_id": device_id})] if device == "cuda" else []
        providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(bundle.file(key)), opts, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.inputs, arrays)))[0]


class Retrieval:
    """user_embedding [B, D], cold_start [B] -> candidate_rows [B, N], retrieval_scores [B, N].

    Cold-start users get the N most popular items (scores: descending popularity rank)."""

    def __init__(self, bundle: Bundle, device: str = "cpu", device_id: int = 0, threads: int = 1):
        import faiss

        # one thread per instance, like the ONNX sessions: parallelism comes from Triton instances
        # (or server workers); FAISS's OpenMP team otherwise spins against them on a few cores
        faiss.omp_set_num_threads(threads)

        self._search = search
        self.embeddings = np.load(bundle.file("item_embeddings"), allow_pickle=False)
        index = faiss.read_index(str(bundle.file("faiss_index")))
        if device == "cuda" and hasattr(faiss, "StandardGpuResources"):
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, device_id, index)  # the GPU Triton assigned
        self.index = index
        dims = bundle.dims
        self.n = int(dims["num_candidates"])
        self.popular = bundle.npz("item_table")["popular_rows"][: self.n]

    def __call__(self, user_embedding: np.ndarray, cold_start: np.ndarray):
        scores, rows = self._search(self.index, user_embedding, self.n, self.embeddings)
        if cold_start.any():
            rows[cold_start] = self.popular
            scores[cold_start] = np.linspace(1.0, 0.0, self.n, dtype=np.float32)
        return rows.astype(np.int64), scores.astype(np.float32)


class CandidateFeatures:
    """candidate_rows [B, N] -> item_cat [B, N, Fi], item_cont [B, N, Ci] from the precomputed table."""

    def __init__(self, bundle: Bundle):
        table = bundle.npz("item_table")
        self.item_cat, self.item_cont = table["item_cat"], table["item_cont"]

    def __call__(self, rows: np.ndarray):
        return self.item_cat[rows], self.item_cont[rows]


class TopK:
    """(candidate_rows, ranking_scores, k) -> raw item_ids [k], scores [k], best first.

    k above min(max_k, N) is clamped to it (documented); k < 1 is rejected upstream."""

    def __init__(self, bundle: Bundle):
        self.item_ids = bundle.npz("item_table")["item_ids"]
        dims = bundle.dims
        self.max_k = int(min(dims["max_k"], dims["num_candidates"]))

    def __call__(self, rows: np.ndarray, scores: np.ndarray, k: int):
        k = int(min(max(k, 1), self.max_k, len(rows)))
        order = np.argsort(-scores, kind="stable")[:k]
        return self.item_ids[rows[order]], scores[order].astype(np.float32)
