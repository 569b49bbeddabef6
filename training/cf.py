"""Item-to-item collaborative filtering for the cf_all / cf_pos recall routes (and the evaluation's
EASE / item-kNN baselines): fitted here, exported as sparse neighbour arrays, scored by
`runtime.candidates.ItemNeighbours` offline and in the server alike.

EASE (Steck, WWW 2019): B = I - P / diag(P), P = (X'X + lambda I)^-1, diag(B) = 0. Exact and strong,
but dense items x items, so it is fitted over at most `ease_max_items` items: every active item of a
smaller catalog, the most interacted-with ones of a bigger one (the others get no item-to-item weights:
the other routes reach them). On the synthetic medium shop (100k items) EASE over its 12,000 most active
items scored the cf_all route alone NDCG@10 .0478 against cosine item-kNN's .0280 over every item
(`shoprec evaluate`, benchmarks/results/ease_head/). `method = "knn"` fits cosine item-kNN over every item.
Either way each item keeps its `neighbours` largest |weights|: EASE's
negative weights matter (keeping only the positive ones cost about 4 % NDCG@10 on ml-latest-small).
The exported route holds at most `max_entries` weights, so big catalogs keep fewer neighbours per item.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from runtime.candidates import ItemNeighbours
from shoprec.config import CFConfig
from shoprec.errors import UserError

from .metrics import beats, rows_per_batch

log = logging.getLogger("shoprec.cf")


class CFError(UserError, RuntimeError):
    """The item-to-item route cannot be fitted as configured."""

def interaction_matrix(users: np.ndarray, rows: np.ndarray, n_items: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Binary users x items matrix (users: raw ids, rows: item rows) and its sorted user ids."""
    uniq, uidx = np.unique(users, return_inverse=True)
    m = sp.csr_matrix((np.ones(len(uidx), np.float32), (uidx, rows)), shape=(len(uniq), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m, uniq


def active_items(x: sp.csr_matrix) -> np.ndarray:
    """The columns (item rows) of `x` with at least one interaction."""
    return np.flatnonzero(x.getnnz(axis=0))


def ease_items(x: sp.csr_matrix, max_items: int) -> np.ndarray:
    """The items (columns, sorted) EASE is fitted over: the active ones, or the `max_items` with the most
    interactions when more are active (ties: the lower row). An item nobody interacted with has a zero row and
    column in X'X, so its block of the inverse is 1/lambda alone and all its weights are 0: leaving it out
    changes nothing (a catalog full of never-bought items costs what its active part costs)."""
    counts = np.asarray(x.getnnz(axis=0)).ravel()
    active = np.flatnonzero(counts)
    if len(active) <= max_items:
        return active
    return np.sort(np.argsort(-counts, kind="stable")[:max_items])


def ease_block(x: sp.csr_matrix, lam: float, items: np.ndarray) -> np.ndarray:
    """EASE's weights among `items` (dense, len(items) x len(items), float32)."""
    import scipy.linalg

    xa = x[:, items] if len(items) < x.shape[1] else x
    g = (xa.T @ xa).toarray().astype(np.float32)
    g[np.diag_indices_from(g)] += lam
    # float32 LAPACK inverse: 5x faster than numpy's float64 one at 9k items, same top lists
    p = scipy.linalg.inv(g, overwrite_a=True, check_finite=False)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32, copy=False)


class EaseScorer:
    """EASE over `ease_items`: scores of users' rows of X for every item, -inf for the items it does not cover
    (they rank after every covered one; evaluation's top_n_unseen never returns them)."""

    def __init__(self, x: sp.csr_matrix, lam: float, max_items: int):
        self.items = ease_items(x, max_items)
        self.b = ease_block(x, lam, self.items)
        self.n_items = x.shape[1]

    def __call__(self, rows_x: sp.csr_matrix) -> np.ndarray:
        out = np.full((rows_x.shape[0], self.n_items), -np.inf, np.float32)
        out[:, self.items] = np.asarray(rows_x[:, self.items] @ self.b)
        return out


def knn_weights(x: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Cosine item-item similarity, the top k per item (implicit's sparse, multi-threaded kNN)."""
    from implicit.nearest_neighbours import CosineRecommender

    model = CosineRecommender(K=k)
    model.fit(x.tocsr().astype(np.float32), show_progress=False)
    sim = model.similarity.tocsr().astype(np.float32)
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    return sim


def _top_abs_dense(w: np.ndarray, k: int) -> sp.csr_matrix:
    k = min(k, w.shape[1])
    idx = np.argpartition(-np.abs(w), k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(w, idx, axis=1)
    keep = vals != 0
    rows = np.repeat(np.arange(w.shape[0]), keep.sum(1))
    return sp.csr_matrix((vals[keep], (rows, idx[keep])), shape=w.shape)


def to_neighbours(w: sp.csr_matrix) -> ItemNeighbours:
    w = w.tocsr()
    w.sort_indices()
    return ItemNeighbours(w.indptr.astype(np.int64), w.indices.astype(np.int64), w.data.astype(np.float32), w.shape[0])


def choose_method(cfg: CFConfig) -> str:
    """The method (auto: EASE, over at most ease_max_items items, `ease_items`)."""
    if cfg.method not in ("auto", "ease", "knn", "none"):
        raise ValueError(f"cf.method must be auto, ease, knn or none; got {cfg.method!r}")
    return "ease" if cfg.method == "auto" else cfg.method


def neighbours_per_item(n_items: int, cfg: CFConfig) -> int:
    """cfg.neighbours, fewer for big catalogs: the exported route holds at most cfg.max_entries weights."""
    return int(max(10, min(cfg.neighbours, cfg.max_entries // max(n_items, 1))))


def fit_neighbours(x: sp.csr_matrix, cfg: CFConfig, lam: float | None = None) -> ItemNeighbours:
    """Sparse item-to-item weights from a users x items matrix (EASE with `lam`, or kNN)."""
    method = choose_method(cfg)
    if method == "none" or x.nnz == 0:
        return ItemNeighbours.empty(x.shape[1])
    if method == "ease":
        items = ease_items(x, cfg.ease_max_items)
        block = _top_abs_dense(ease_block(x, lam if lam is not None else cfg.ease_lambdas[0], items),
                               neighbours_per_item(len(items), cfg)).tocoo()
        return to_neighbours(sp.csr_matrix((block.data, (items[block.row], items[block.col])), shape=(x.shape[1],) * 2))
    return to_neighbours(knn_weights(x, neighbours_per_item(x.shape[1], cfg)))


def choose_lambda(x: sp.csr_matrix, eval_x: sp.csr_matrix, truth: list[np.ndarray], seen: sp.csr_matrix,
                  cfg: CFConfig) -> tuple[float | None, dict]:
    """The EASE lambda: the first of `cfg.ease_lambdas`, unless another scores a better holdout NDCG@10 by more
    than two paired standard errors (`metrics.beats`, the rule of `train`'s other choices). None for kNN.

    The plain best was a coin flip between neighbours of the grid: on ml-latest-small with whole stars, 100
    beat 300 by .0002 on the holdout, and the served test NDCG@10 fell by .010 (3.5 paired standard errors).

    x: the fit matrix; eval_x: the rows (users) whose holdout items `truth` are scored; seen: their
    items to exclude."""
    method = choose_method(cfg)
    if method != "ease" or len(cfg.ease_lambdas) == 1:
        return (cfg.ease_lambdas[0] if method == "ease" else None), {}
    if not len(truth):  # np.mean of nothing: NaN by lambda, and a message about EASE rather than the data
        raise CFError(f"no holdout user has a positive in the fit fold ({x.nnz} positives in it), so nothing can be "
                      "learned or checked: too few clicks, carts or purchases; need more positive events")
    per_user = {}
    step = rows_per_batch(x.shape[1])  # holdout users scored at a time: bounded memory at any catalog size
    for lam in cfg.ease_lambdas:
        score = EaseScorer(x, lam, cfg.ease_max_items)
        ndcg = []
        for a in range(0, eval_x.shape[0], step):
            s = score(eval_x[a : a + step])
            r, c = seen[a : a + step].nonzero()
            s[r, c] = -np.inf
            top = np.argsort(-s, axis=1, kind="stable")[:, :10]
            ndcg += [_ndcg(t, g) for t, g in zip(top, truth[a : a + step])]
        per_user[lam] = np.array(ndcg)
    scores = {lam: float(v.mean()) for lam, v in per_user.items()}
    if not all(np.isfinite(v) for v in scores.values()):  # NaN never compares greater: max() would pick at random
        raise CFError(f"EASE: holdout NDCG@10 by lambda is {scores}; the holdout has no scorable user or the weights are "
                      "not finite")
    base = cfg.ease_lambdas[0]
    best = max(scores, key=lambda k: scores[k])  # a tie: the earlier in the config
    chosen = best if beats(per_user[base], per_user[best]) else base
    log.info("EASE lambda %s (holdout NDCG@10 by lambda: %s)", chosen, scores)
    return chosen, {str(k): round(v, 4) for k, v in scores.items()}


def _ndcg(top: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    hits = np.isin(top[:k], truth)
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = disc[: min(k, len(truth))].sum()
    return float((hits * disc[: len(hits)]).sum() / ideal) if ideal else 0.0
