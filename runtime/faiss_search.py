"""FAISS search that serving and offline evaluation share (NumPy + FAISS only, no training stack)."""

from __future__ import annotations

import numpy as np


def search(index, queries: np.ndarray, k: int, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows) that never contain FAISS's -1 padding: k is capped at the catalog size,
    and a query an approximate index could not fill (too few items in its probed lists) is answered
    by exact search over `embeddings` instead."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    scores, rows = index.search(queries, k)
    for q in np.where((rows < 0).any(1))[0]:
        s = embeddings @ queries[q]
        top = np.argsort(-s, kind="stable")[:k]
        rows[q], scores[q] = top, s[top]
    return scores, rows


def recall_vs_exact(index, emb: np.ndarray, queries: np.ndarray, k: int) -> float:
    exact = np.argsort(-(queries @ emb.T), axis=1, kind="stable")[:, :k]
    _, approx = search(index, queries, k, emb)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
