"""Top-N metrics, per user (so every mean comes with its standard error). Binary relevance, the
referee's definitions (shared/quality/referee.py): Recall@K = hits@K / |G| (RecBole), NDCG@K with
IDCG over min(K, |G|) hits, HitRate@K = share of users with a hit.

`top` is [U, K] item rows (-1 = empty slot); `truth` a list of sets (or dicts keyed by item row).
"""

from __future__ import annotations

import numpy as np

DISCOUNT = 1.0 / np.log2(np.arange(2, 1002))


def _hits(top: np.ndarray, truth, k: int) -> np.ndarray:
    out = np.zeros((len(top), min(k, top.shape[1])), bool)
    for i, (t, g) in enumerate(zip(top, truth)):
        if g:
            out[i] = np.isin(t[:k], np.fromiter(g, dtype=np.int64, count=len(g)))
    return out


def per_user_recall(top: np.ndarray, truth, k: int) -> np.ndarray:
    return _hits(top, truth, k).sum(1) / np.maximum([len(g) for g in truth], 1)


def per_user_ndcg(top: np.ndarray, truth, k: int) -> np.ndarray:
    hits = _hits(top, truth, k)
    dcg = (hits * DISCOUNT[: hits.shape[1]]).sum(1)
    idcg = np.array([DISCOUNT[: min(k, len(g))].sum() for g in truth])
    return np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 0.0)


def per_user_hit(top: np.ndarray, truth, k: int) -> np.ndarray:
    return _hits(top, truth, k).any(1).astype(np.float64)


def recall_at(top: np.ndarray, truth, k: int) -> float:
    return float(per_user_recall(top, truth, k).mean()) if len(truth) else 0.0


def ndcg_at(top: np.ndarray, truth, k: int = 10) -> float:
    return float(per_user_ndcg(top, truth, k).mean()) if len(truth) else 0.0


def mean_se(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


MARGIN_SE = 2.0  # a choice other than the default must win by this many paired standard errors


def beats(base: np.ndarray, other: np.ndarray) -> bool:
    """Whether `other` beats `base` (per-user scores of the same users) by more than MARGIN_SE standard errors of
    the paired difference: the test a holdout choice of `train` (EASE lambda, the ranker's popularity prior and its
    deep part) must pass to leave its default."""
    diff = np.asarray(other, float) - np.asarray(base, float)
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
    return bool(diff.mean() > MARGIN_SE * se)


def coverage(top: np.ndarray, n_items: int, k: int = 10) -> float:
    t = top[:, :k]
    return float(len(np.unique(t[t >= 0])) / max(n_items, 1))


def per_user_diversity(top: np.ndarray, category: np.ndarray, k: int = 10) -> np.ndarray:
    """Intra-list category diversity: share of item pairs in the top k from different categories."""
    out = np.zeros(len(top))
    for i, t in enumerate(top[:, :k]):
        c = category[t[t >= 0]]
        n = len(c)
        if n > 1:
            same = sum(int(m) * (int(m) - 1) for m in np.unique(c, return_counts=True)[1])
            out[i] = 1.0 - same / (n * (n - 1))
    return out


def per_user_novelty(top: np.ndarray, popularity: np.ndarray, n_users: int, k: int = 10) -> np.ndarray:
    """Mean self-information -log2 p(item) of the top k, p = share of users with a positive on it."""
    p = np.clip(popularity / max(n_users, 1), 1.0 / max(n_users, 1), 1.0)
    info = -np.log2(p)
    out = np.zeros(len(top))
    for i, t in enumerate(top[:, :k]):
        t = t[t >= 0]
        out[i] = info[t].mean() if len(t) else 0.0
    return out


def rows_per_batch(n_items: int) -> int:
    """Users scored against the whole catalog at a time: 1,024, fewer where that would pass 2^27 scores."""
    return max(1, min(1024, 2**27 // max(n_items, 1)))
