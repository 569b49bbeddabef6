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
