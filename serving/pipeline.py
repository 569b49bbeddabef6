"""The whole recommendation pipeline in-process: the reference the served results must equal,
the latency floor for the benchmarks, and the engine behind the FastAPI comparison server."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .steps import Bundle, CandidateFeatures, FeatureTransform, OnnxModel, Retrieval, TopK, bundle_dir, validate_request


class Pipeline:
    def __init__(self, path: str | Path | None = None, threads: int = 1):
        bundle = Bundle(Path(path) if path else bundle_dir())
        self.transform = FeatureTransform(bundle)
        self.user_tower = OnnxModel(bundle, "user_tower", threads=threads)
        self.retrieval = Retrieval(bundle, threads=threads)
        self.candidates = CandidateFeatures(bundle)
        self.ranker = OnnxModel(bundle, "ranker", threads=threads)
        self.topk = TopK(bundle)
        self.item_table = bundle.npz("item_table")

    def recommend(self, user_id, k, hour=None, weekday=None, device=None):
        """Batch of users -> list of (item_ids, scores, cold_start), one per user."""
        user_id = np.asarray(user_id, dtype=np.int64).ravel()
        k = np.broadcast_to(np.asarray(k, dtype=np.int64), user_id.shape)
        hour = None if hour is None else np.broadcast_to(np.asarray(hour, dtype=np.int64), user_id.shape)
        weekday = None if weekday is None else np.broadcast_to(np.asarray(weekday, dtype=np.int64), user_id.shape)
        device = None if device is None else np.broadcast_to(np.asarray(device, dtype=object), user_id.shape)
        validate_request(k, hour, weekday, device)
        ucat, ucont, cold = self.transform(user_id, hour, weekday, device)
        emb = self.user_tower(ucat, ucont)
        rows, _ = self.retrieval(emb, cold)
        icat, icont = self.candidates(rows)
        scores = self.ranker(ucat, ucont, icat, icont)
        return [(*self.topk(rows[i], scores[i], int(k[i])), bool(cold[i])) for i in range(len(user_id))]
