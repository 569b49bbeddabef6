"""FAISS item index: exact inner product for small catalogs, IVF or HNSW for large ones.

Embeddings are L2-normalised, so inner product = cosine. The kind follows the catalog size
(`index.kind = "auto"`: flat up to `index.exact_max_items`, IVF above). An approximate index's
search breadth (IVF `nprobe`, HNSW `efSearch`) is the smallest that reaches `index.target_recall`
recall@k against exact search, unless the config fixes it; both are stored in the index file, so the
server searches exactly as measured. `export` tunes it on the queries the server sends (the store users'
embeddings, training.export.index_queries) at the depth the ann route asks for (serve.num_candidates). Built on GPU when FAISS-GPU and a
GPU are present (shoprec.device decides); always saved as a CPU index (the server moves it to the
device Triton assigns).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from runtime.faiss_search import exact_top, recall_vs_exact
from shoprec.config import IndexConfig
from shoprec.device import faiss_gpu_available

log = logging.getLogger("shoprec.index")

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024, 2048)


def choose_kind(n_items: int, cfg: IndexConfig) -> str:
    if cfg.kind != "auto":
        if cfg.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index kind must be auto, flat, ivf or hnsw; got {cfg.kind!r}")
        return cfg.kind
    return "flat" if n_items <= cfg.exact_max_items else "ivf"


def nlist_for(n: int, cfg: IndexConfig) -> int:
    return int(cfg.ivf_nlist) if cfg.ivf_nlist > 0 else int(max(16, min(4 * np.sqrt(n), n // 39)))


def build_index(emb: np.ndarray, cfg: IndexConfig, kind: str | None = None):
    """(index, kind) with the search breadth the config gives, or a provisional one until `tune_index`."""
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    kind = kind or choose_kind(n, cfg)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = cfg.hnsw_ef_search or 128
    else:
        nlist = nlist_for(n, cfg)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = emb if n <= 256 * nlist else emb[np.random.default_rng(0).choice(n, 256 * nlist, replace=False)]
        if faiss_gpu_available():
            gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            gpu.train(train)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            index.train(train)
        index.nprobe = cfg.ivf_nprobe or 32
    index.add(emb)
    return index, kind


def held_out_queries(emb: np.ndarray, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Queries that are not catalog items: each the normalised mean of two random items' embeddings (a user
    who liked both), so that the nearest neighbour is not the query itself."""
    rng = np.random.default_rng(seed)
    q = emb[rng.integers(0, len(emb), n)] + emb[rng.integers(0, len(emb), n)]
    return (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def tune_index(index, kind: str, emb: np.ndarray, cfg: IndexConfig, k: int = 100, queries: np.ndarray | None = None) -> dict:
    """Set the smallest search breadth whose recall@k against exact search reaches cfg.target_recall (or the one the
    config fixes); the report: kind, breadth, recall, and each breadth tried."""
    k = int(min(k, len(emb)))
    queries = held_out_queries(emb) if queries is None else queries
    report = {"kind": kind, "items": int(len(emb)), "target_recall": cfg.target_recall, "queries": int(len(queries))}
    if kind == "flat":
        return {**report, f"recall@{k}_vs_exact": 1.0}
    if kind == "ivf":
        name, fixed, grid = "nprobe", cfg.ivf_nprobe, [p for p in NPROBES if p <= index.nlist] or [index.nlist]
        report["nlist"] = int(index.nlist)

        def set_breadth(v):
            index.nprobe = v
    else:
        name, fixed, grid = "efSearch", cfg.hnsw_ef_search, [e for e in EF_SEARCHES if e >= k] or [EF_SEARCHES[-1]]

        def set_breadth(v):
            index.hnsw.efSearch = v
    exact = exact_top(emb, queries, k)  # once; each breadth is scored against it
    tried = []
    for v in [fixed] if fixed > 0 else grid:
        set_breadth(v)
        t0 = time.perf_counter()
        recall = recall_vs_exact(index, emb, queries, k, exact, filled=False)
        tried.append({name: v, "recall": round(recall, 4), "seconds": round(time.perf_counter() - t0, 3)})
        if recall >= cfg.target_recall:
            break
    chosen = tried[-1]
    set_breadth(chosen[name])
    if chosen["recall"] < cfg.target_recall:
        log.warning("index %s: recall@%d %.3f at %s=%d is below the target %.2f", kind, k, chosen["recall"], name,
                    chosen[name], cfg.target_recall)
    log.info("index: %s over %d items, %s=%d, recall@%d %.3f", kind, len(emb), name, chosen[name], k, chosen["recall"])
    return {**report, name: chosen[name], f"recall@{k}_vs_exact": chosen["recall"], "tried": tried,
            "reached_target": chosen["recall"] >= cfg.target_recall}
