"""The pipeline's steps as plain NumPy / ONNX Runtime / FAISS callables over batches.

Triton's python models (serving/triton_models.py) and the in-process reference
(serving/pipeline.py) run these same objects, so served and in-process results can be compared
id for id. Each step loads only files from the serving bundle, checked against its manifest.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from feature_workflows.request_transform import TransformPlan, UserStore, raw_rows
from shoprec.candidates import CandidateGenerator, ItemNeighbours
from shoprec.config import REPO_ROOT, ServeConfig, load_config
from shoprec.contract import BUNDLE_FILES
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


def serve_config() -> ServeConfig:
    """Serve-time settings, read when a step starts (the launcher passes the config file it was given)."""
    return load_config(os.environ.get("SHOPREC_CONFIG") or None).serve


def max_k(bundle: Bundle, cfg: ServeConfig) -> int:
    """The largest k a request may ask: the candidates ranked per request (never more than the catalog)."""
    return int(min(cfg.num_candidates, bundle.dims["n_items"]))


def validate_request(k: np.ndarray, hour: np.ndarray | None, weekday: np.ndarray | None, device, k_max: int) -> None:
    if k.size == 0:
        raise RequestError("empty request: send at least one row")
    if (k < 1).any():
        raise RequestError(f"k must be >= 1, got {int(k.min())}")
    if (k > k_max).any():
        raise RequestError(f"k must be <= {k_max} (the candidates ranked per request, serve.num_candidates), "
                           f"got {int(k.max())}")
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
    """(user_id, optional hour/weekday/device) -> user_cat [B, Fu], user_cont [B, Cu], seq_items [B, L],
    seq_kinds [B, L], user_row [B] (the user store row, -1 unknown), cold_start [B].

    Profile and history come from the user store snapshot. Absent context is null: the "unknown"
    the training rows carry when their context is dropped out, never the server's clock. A user is
    cold when the store holds no action of theirs, whatever their id."""

    def __init__(self, bundle: Bundle):
        self.plan = TransformPlan.load(bundle.file("query_plan"), bundle.file("query_vocab"))
        self.store = UserStore(bundle.npz("user_store"))
        table = bundle.npz("item_table")
        self.item_codes = table["item_cat"][:, 0]
        self.category_names = table["category_names"]
        self.spec = bundle.dims["query_spec"]
        self.seq_len = int(bundle.dims["seq_len"])

    def __call__(self, user_id: np.ndarray, hour=None, weekday=None, device=None):
        user_id = np.asarray(user_id, dtype=np.int64)
        rows = self.store.lookup(user_id)
        state = self.store.state(rows, self.seq_len)
        raw = raw_rows(self.spec, state, self.store.attrs(user_id, rows), self.category_names, hour, weekday, device)
        cat, cont = self.plan.pack(self.plan.transform(raw))
        seq_rows = state["seq_rows"]
        seq = np.where(seq_rows >= 0, self.item_codes[np.maximum(seq_rows, 0)], 0).astype(np.int64)
        cold = state["activity"] <= 0
        return cat, cont, seq, state["seq_kinds"].astype(np.int64), rows, cold


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
    """user_embedding [B, D], user_row [B], exclude_seen [B] -> candidate_rows [B, N] (-1 pads when the
    catalog minus the user's seen items has fewer than N), candidate_dense [B, N, F].

    The recall routes of `shoprec.candidates` over the user's actions in the store."""

    def __init__(self, bundle: Bundle, cfg: ServeConfig, device: str = "cpu", device_id: int = 0, threads: int = 1):
        import faiss

        # one thread per instance, like the ONNX sessions: parallelism comes from Triton instances
        # (or server workers); FAISS's OpenMP team otherwise spins against them on a few cores
        faiss.omp_set_num_threads(threads)
        embeddings = np.load(bundle.file("item_embeddings"), allow_pickle=False)
        index = faiss.read_index(str(bundle.file("faiss_index")))
        if device == "cuda":
            if not hasattr(faiss, "StandardGpuResources"):
                raise RuntimeError("retrieval: Triton gave this instance a GPU but FAISS has no GPU support; "
                                   "install faiss-gpu or serve the cpu profile")
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, device_id, index)  # the GPU Triton assigned
        table = bundle.npz("item_table")
        names = [str(n) for n in table["category_names"]]
        unknown = sorted(set(cfg.repeat_categories) - set(names))
        if unknown:
            raise ValueError(f"serve.repeat_categories names categories the catalog does not have: {unknown}")
        exempt = np.isin(table["category_code"], [names.index(c) for c in cfg.repeat_categories])
        self.generator = CandidateGenerator(
            embeddings, index, ItemNeighbours.from_arrays(bundle.npz("cf_all")), ItemNeighbours.from_arrays(bundle.npz("cf_pos")),
            table["popular_rows"], max_k(bundle, cfg), cfg.recent_window, exempt)
        self.store = UserStore(bundle.npz("user_store"))
        self.default_exclude = cfg.exclude_seen

    @property
    def n(self) -> int:
        return self.generator.n

    def __call__(self, user_embedding: np.ndarray, user_row: np.ndarray, exclude_seen: np.ndarray | None = None):
        user_row = np.asarray(user_row, dtype=np.int64).ravel()
        parts = [self.store.history(int(r)) for r in user_row]
        indptr = np.r_[0, np.cumsum([len(p[0]) for p in parts])].astype(np.int64)
        rows = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        kinds = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int8)
        exclude = self.default_exclude if exclude_seen is None else np.asarray(exclude_seen, dtype=bool).ravel()
        cand, dense, _ = self.generator(user_embedding, indptr, rows.astype(np.int64), kinds, exclude)
        return cand, dense


class CandidateFeatures:
    """candidate_rows [B, N] -> item_cat [B, N, Fi], item_cont [B, N, Ci] from the precomputed table
    (padding rows, -1, get row 0's features; the ranker's score for them is never served)."""

    def __init__(self, bundle: Bundle):
        table = bundle.npz("item_table")
        self.item_cat, self.item_cont = table["item_cat"], table["item_cont"]

    def __call__(self, rows: np.ndarray):
        n = len(self.item_cat)
        if (rows >= n).any():
            raise ValueError(f"candidate row {int(rows.max())} outside the item table ({n} items)")
        safe = np.maximum(rows, 0)
        return self.item_cat[safe], self.item_cont[safe]


class TopK:
    """(candidate_rows [N], ranking_scores [N], k) -> raw item_ids, scores (best first, padding dropped).

    k is validated upstream (1 <= k <= max_k); a user whose unseen candidates are fewer than k gets
    all of them."""

    def __init__(self, bundle: Bundle):
        self.item_ids = bundle.npz("item_table")["item_ids"]

    def __call__(self, rows: np.ndarray, scores: np.ndarray, k: int):
        valid = rows >= 0
        order = np.argsort(-np.where(valid, scores, -np.inf), kind="stable")[: int(k)]
        order = order[valid[order]]
        return self.item_ids[rows[order]], scores[order].astype(np.float32)
