"""FAISS item index: exact inner product for small catalogs, IVF or HNSW for large ones.

Embeddings are L2-normalised, so inner product = cosine. Built on GPU when FAISS-GPU and a GPU
are present (shoprec.device decides); always saved as a CPU index (the server moves it to the
device Triton assigns).
"""

from __future__ import annotations

import numpy as np

from shoprec.config import IndexConfig
from shoprec.device import faiss_gpu_available

EXACT_MAX_ITEMS = 100_000


def choose_kind(n_items: int, cfg: IndexConfig) -> str:
    if cfg.kind != "auto":
        if cfg.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index kind must be auto, flat, ivf or hnsw; got {cfg.kind!r}")
        return cfg.kind
    return "flat" if n_items <= EXACT_MAX_ITEMS else "ivf"


def build_index(emb: np.ndarray, cfg: IndexConfig):
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    kind = choose_kind(n, cfg)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = cfg.hnsw_ef_search
    else:
        nlist = int(max(16, min(4 * np.sqrt(n), n // 39)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = emb if n <= 256 * nlist else emb[np.random.default_rng(0).choice(n, 256 * nlist, replace=False)]
        if faiss_gpu_available():
            gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            gpu.train(train)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            index.train(train)
        index.nprobe = cfg.ivf_nprobe
    index.add(emb)
    return index, kind


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
