"""The whole recommendation pipeline in-process: the reference the served results must equal, the
latency floor for the benchmarks, the engine behind the FastAPI comparison server, and what
`shoprec evaluate` scores as "the full served pipeline"."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .steps import (Bundle, CandidateFeatures, FeatureTransform, OnnxModel, Retrieval, TopK, bundle_dir, max_k, serve_config,
                    validate_request)


class Pipeline:
    def __init__(self, path: str | Path | None = None, threads: int = 1, cfg=None):
        self.bundle = bundle = Bundle(Path(path) if path else bundle_dir())
        self.cfg = cfg or serve_config()
        self.transform = FeatureTransform(bundle)
        self.user_tower = OnnxModel(bundle, "user_tower", threads=threads)
        self.retrieval = Retrieval(bundle, self.cfg, threads=threads)
        self.candidates = CandidateFeatures(bundle)
        self.ranker = OnnxModel(bundle, "ranker", threads=threads)
        self.topk = TopK(bundle)
        self.item_table = bundle.npz("item_table")
        self.max_k = max_k(bundle, self.cfg)

    def rank(self, user_id, hour=None, weekday=None, device=None, exclude_seen=None):
        """Every step but top-k for a batch of users: (candidate rows [B, N], scores [B, N], cold [B])."""
        ucat, ucont, seq, kinds, rows, cold = self.transform(user_id, hour, weekday, device)
        emb = self.user_tower(ucat, ucont, seq, kinds)
        cand, dense = self.retrieval(emb, rows, exclude_seen)
        icat, icont = self.candidates(cand)
        return cand, self.ranker(ucat, ucont, seq, kinds, icat, icont, dense), cold

    def recommend(self, user_id, k, hour=None, weekday=None, device=None, exclude_seen=None):
        """Batch of users -> list of (item_ids, scores, cold_start), one per user."""
        user_id = np.asarray(user_id, dtype=np.int64).ravel()
        k = np.broadcast_to(np.asarray(k, dtype=np.int64), user_id.shape)
        hour = None if hour is None else np.broadcast_to(np.asarray(hour, dtype=np.int64), user_id.shape)
        weekday = None if weekday is None else np.broadcast_to(np.asarray(weekday, dtype=np.int64), user_id.shape)
        device = None if device is None else np.broadcast_to(np.asarray(device, dtype=object), user_id.shape)
        if exclude_seen is not None:
            exclude_seen = np.broadcast_to(np.asarray(exclude_seen, dtype=bool), user_id.shape)
        validate_request(k, hour, weekday, device, self.max_k)
        cand, scores, cold = self.rank(user_id, hour, weekday, device, exclude_seen)
        return [(*self.topk(cand[i], scores[i], int(k[i])), bool(cold[i])) for i in range(len(user_id))]
