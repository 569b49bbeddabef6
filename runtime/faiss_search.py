"""FAISS search that serving and offline evaluation share (NumPy + FAISS only, no training stack)."""

from __future__ import annotations

import numpy as np

from .sparse_routes import _topn

FILL_BATCH = 16  # exact-search fills per matrix product: 16 x 1M items is 64 MB of scores


def search(index, queries: np.ndarray, k: int, embeddings: np.ndarray,
           bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows) that never contain FAISS's -1 padding: k is capped at the catalog size,
    and a query an approximate index could not fill (too few items in its probed lists) is answered
    by exact search over `embeddings` instead. bias: the index holds [embedding, bias] per item and
    each query ends in the bias's coefficient (`augment`); the exact search then scores the same."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, index.ntotal))
    scores, rows = index.search(queries, k)
    d = embeddings.shape[1]
    short = np.flatnonzero((rows < 0).any(1))
    for lo in range(0, len(short), FILL_BATCH):  # a few [queries, catalog] score rows at a time
        q = short[lo : lo + FILL_BATCH]
        s = queries[q, :d] @ embeddings.T
        if bias is not None:
            s = s + bias[None, :] * queries[q, d][:, None]
        top = _topn(s, False, k)  # a partial sort: O(catalog) a query, ties by the lower row
        rows[q], scores[q] = top, np.take_along_axis(s, top, 1)
    return scores, rows


def augment(vectors: np.ndarray, column: np.ndarray | float) -> np.ndarray:
    """[vectors, column] as float32: item embeddings with their bias, or queries with the bias's coefficient
    (1: the bias counts, 0: pure inner product), for an index built over biased items."""
    vectors = np.asarray(vectors, dtype=np.float32)
    col = np.broadcast_to(np.asarray(column, dtype=np.float32), (len(vectors),))
    return np.ascontiguousarray(np.concatenate([vectors, col[:, None]], axis=1))


def exact_top(emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows [Q, k] of the exact top-k by inner product (FAISS flat: no Q x items matrix in memory)."""
    import faiss

    flat = faiss.IndexFlatIP(emb.shape[1])
    flat.add(np.ascontiguousarray(emb, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), int(min(k, len(emb))))[1]


def recall_vs_exact(index, emb: np.ndarray, queries: np.ndarray, k: int, exact: np.ndarray | None = None,
                    filled: bool = True) -> float:
    """recall@k of `index` against exact search (`exact`: those rows, when already computed). filled: as served,
    `search` filling what the index cannot from exact search; False: the index alone, a slot it leaves empty
    (-1) counts as a miss, so that the fill never flatters a search breadth too small to fill the lists."""
    exact = exact_top(emb, queries, k) if exact is None else exact
    k = exact.shape[1]
    if filled:
        rows = search(index, queries, k, emb)[1]
    else:
        rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(e.tolist())) / k for a, e in zip(rows, exact)]))
