"""Recall routes, their merge and the candidate features the ranker reads: one implementation for
the offline stages (the ranker's training lists, evaluation) and the server, so a candidate gets
the same features in both. NumPy (+ FAISS for the ANN route) only.

Routes, each excluding the user's seen items (`exclude_seen`; items of repeat categories stay):
  cf_all    item-to-item scores of everything the user interacted with (views included)
  cf_pos    the same from the user's positives only (click or stronger)
  ann       two-tower: the user embedding against the item embeddings (FAISS)
  category  the popular items of the user's categories: P(category | user) from their actions,
            recent ones weighing more, times P(item | category), the item's share of its
            category's popularity (items with a category only)
  popular   the most popular items: always available, fills what the others leave
A user without history gets the ANN route (profile and context) and the popular route.

Merge: round robin over the routes' ranked lists (in the order above), first occurrence wins,
until N candidates. Features per candidate (`DENSE_FEATURES`): the three item-to-item scores (all,
positives, the last `recent_window` actions), the two-tower dot product, log(1 + rank) in the
cf_all, cf_pos and ann lists (N when absent), the user's affinity to the candidate's category and
the category route's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoprec import contract

from .faiss_search import search

DENSE_FEATURES = ("cf_all", "cf_pos", "cf_recent", "two_tower", "rank_cf_all", "rank_cf_pos", "rank_ann", "cat_affinity",
                  "cat_score")
ROUTES = contract.ROUTES  # the merge order, and the bit order of the route masks in responses
POSITIVE_KIND = 2


@dataclass(frozen=True)
class ItemNeighbours:
    """Sparse item-to-item weights (CSR, row i: the items that i's interaction votes for)."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    n_items: int

    @classmethod
    def empty(cls, n_items: int) -> "ItemNeighbours":
        return cls(np.zeros(n_items + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), n_items)

    @classmethod
    def from_arrays(cls, arrays: dict) -> "ItemNeighbours":
        indptr = np.asarray(arrays["indptr"], dtype=np.int64)
        indices = np.asarray(arrays["indices"], dtype=np.int64)
        n = len(indptr) - 1
        if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any() or len(arrays["values"]) != len(indices):
            raise ValueError("item neighbours: malformed CSR arrays")
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(f"item neighbours: indices outside 0..{n - 1}")
        return cls(indptr, indices, np.asarray(arrays["values"], dtype=np.float32), n)

    def scores(self, indptr: np.ndarray, rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """[U, n_items] sum of the neighbour rows of each user's items (CSR over users: indptr, rows)."""
        n_users = len(indptr) - 1
        out = np.zeros((n_users, self.n_items), np.float32)
        if not len(rows):
            return out
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        if not total:
            return out
        flat = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(total)
        owner = np.repeat(np.repeat(np.arange(n_users), np.diff(indptr)), lengths)
        vals = self.values[flat] if weights is None else self.values[flat] * np.repeat(weights, lengths)
        flat_target = owner * self.n_items + self.indices[flat]
        out.reshape(-1)[:] = np.bincount(flat_target, weights=vals, minlength=out.size).astype(np.float32)
        return out


@dataclass(frozen=True)
class CategoryPrior:
    """The category route's model: P(item | category), the item's share of its category's popularity
    (popularity + 1, so items nobody acted on yet keep a little), and how a user's category shares decay
    with the age of their actions (`decay` per action, the latest weighing 1)."""

    category: np.ndarray  # [n_items] category code, -1 none
    p_in_category: np.ndarray  # [n_items], 0 for items without a category
    n_categories: int
    decay: float = 0.97

    @classmethod
    def from_popularity(cls, category: np.ndarray, popularity: np.ndarray, decay: float = 0.97) -> "CategoryPrior":
        category = np.asarray(category, dtype=np.int64)
        pop = np.asarray(popularity, dtype=np.float64) + 1.0
        has = category >= 0
        n_cat = int(category.max()) + 1 if has.any() else 0
        total = np.bincount(category[has], weights=pop[has], minlength=n_cat)
        p = np.where(has, pop / np.maximum(total[np.maximum(category, 0)] if n_cat else 1.0, 1e-12), 0.0)
        return cls(category, p.astype(np.float32), n_cat, decay)

    def shares(self, indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[U, C] each user's recency-weighted category shares (rows sum to 1; 0 without categorised actions)."""
        u = len(indptr) - 1
        out = np.zeros((u, max(self.n_categories, 1)), np.float64)
        if not len(rows) or not self.n_categories:
            return out[:, : self.n_categories]
        lengths = np.diff(indptr)
        owner = np.repeat(np.arange(u), lengths)
        age = np.repeat(indptr[1:], lengths) - 1 - np.arange(len(rows))  # 0 for each user's latest action
        cats = self.category[rows]
        ok = cats >= 0
        flat = np.bincount(owner[ok] * self.n_categories + cats[ok], weights=self.decay ** age[ok],
                           minlength=u * self.n_categories)
        out = flat.reshape(u, self.n_categories)
        return out / np.maximum(out.sum(1, keepdims=True), 1e-12)

    def scores(self, shares: np.ndarray) -> np.ndarray:
        """[U, n_items] P(category | user) * P(item | category)."""
        if not self.n_categories:
            return np.zeros((len(shares), len(self.category)), np.float32)
        return (shares[:, np.maximum(self.category, 0)] * self.p_in_category[None, :]).astype(np.float32)


def _topn(scores: np.ndarray, blocked: np.ndarray, n: int) -> np.ndarray:
    """Rows of the n best scores per user (ties: lower row first), -1 where blocked items would be needed."""
    s = np.where(blocked, -np.inf, scores)
    n = min(n, s.shape[1])
    part = np.argpartition(-s, n - 1, axis=1)[:, :n] if n < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(s), 1))
    vals = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    return np.where(np.take_along_axis(vals, order, axis=1) > -np.inf, top, -1)


class CandidateGenerator:
    """Routes + merge + features for a batch of users. Cost per user: O(history x neighbours + items)."""

    def __init__(self, item_embeddings: np.ndarray, index, cf_all: ItemNeighbours, cf_pos: ItemNeighbours,
                 popular_rows: np.ndarray, n_candidates: int, recent_window: int = 5, exempt: np.ndarray | None = None,
                 categories: CategoryPrior | None = None):
        n = len(item_embeddings)
        for name, cf in (("cf_all", cf_all), ("cf_pos", cf_pos)):
            if cf.n_items != n:
                raise ValueError(f"{name} covers {cf.n_items} items, the item embeddings {n}")
        self.emb = np.ascontiguousarray(item_embeddings, dtype=np.float32)
        self.index = index
        self.cf_all, self.cf_pos = cf_all, cf_pos
        self.popular = np.asarray(popular_rows, dtype=np.int64)
        self.n = int(min(n_candidates, n))
        self.recent_window = recent_window
        self.exempt = np.zeros(n, bool) if exempt is None else np.asarray(exempt, dtype=bool)
        self.categories = categories or CategoryPrior.from_popularity(np.full(n, -1), np.zeros(n))  # none: an empty route
        if len(self.categories.category) != n:
            raise ValueError(f"category prior covers {len(self.categories.category)} items, the item embeddings {n}")

    @property
    def n_items(self) -> int:
        return len(self.emb)

    def __call__(self, user_emb: np.ndarray, hist_indptr: np.ndarray, hist_rows: np.ndarray, hist_kinds: np.ndarray,
                 exclude_seen: np.ndarray | bool = True, with_routes: bool = False,
                 unavailable: np.ndarray | None = None) -> tuple:
        """-> candidate rows [U, N] (-1 pads when too few items are left), dense features [U, N, F],
        and each route's ranked list {route: [U, N]} (for evaluation); with_routes: also each candidate's
        route bitmask [U, N] int32 (bit i: in ROUTES[i]'s list), from the same positions the features use.
        unavailable: item rows no route may propose, for every user."""
        u = len(hist_indptr) - 1
        n_items, n = self.n_items, self.n
        exclude = np.broadcast_to(np.asarray(exclude_seen, dtype=bool), (u,))
        owner = np.repeat(np.arange(u), np.diff(hist_indptr))
        blocked = np.zeros((u, n_items), bool)
        drop = exclude[owner] & ~self.exempt[hist_rows]
        blocked[owner[drop], hist_rows[drop]] = True
        if unavailable is not None and len(unavailable):  # out of stock, withdrawn: no route proposes them
            blocked[:, unavailable] = True
        has_history = np.diff(hist_indptr) > 0

        pos = hist_kinds >= POSITIVE_KIND
        pos_indptr = np.r_[0, np.cumsum(np.bincount(owner[pos], minlength=u))].astype(np.int64)
        recent_idx = _last_per_user(hist_indptr, self.recent_window)
        recent_indptr = np.r_[0, np.cumsum(np.minimum(np.diff(hist_indptr), self.recent_window))].astype(np.int64)
        s_all = self.cf_all.scores(hist_indptr, hist_rows)
        s_pos = self.cf_pos.scores(pos_indptr, hist_rows[pos])
        s_recent = self.cf_all.scores(recent_indptr, hist_rows[recent_idx])

        shares = self.categories.shares(hist_indptr, hist_rows)
        s_cat = self.categories.scores(shares)
        lists = {
            "cf_all": np.where(has_history[:, None], _topn(s_all, blocked, n), -1),
            "cf_pos": np.where((np.diff(pos_indptr) > 0)[:, None], _topn(s_pos, blocked, n), -1),
            "ann": self._ann(user_emb, blocked, n),
            "category": _topn(np.where(s_cat > 0, s_cat, -np.inf), blocked, n),
            "popular": self._popular(blocked, n),
        }
        rows = _round_robin([lists[r] for r in ROUTES], n)
        safe = np.maximum(rows, 0)
        dots = np.einsum("ud,und->un", np.asarray(user_emb, dtype=np.float32), self.emb[safe])
        position = {r: _position(rows, lists[r], n) for r in (ROUTES if with_routes else ("cf_all", "cf_pos", "ann"))}
        feats = np.stack([
            np.take_along_axis(s_all, safe, 1), np.take_along_axis(s_pos, safe, 1), np.take_along_axis(s_recent, safe, 1), dots,
            *(np.log1p(position[r]) for r in ("cf_all", "cf_pos", "ann")),  # log(1 + rank), log(1 + n) when absent
            np.take_along_axis(shares, np.maximum(self.categories.category[safe], 0), 1) * (self.categories.category[safe] >= 0)
            if self.categories.n_categories else np.zeros(rows.shape),
            np.take_along_axis(s_cat, safe, 1),
        ], axis=2).astype(np.float32)
        feats[rows < 0] = 0.0
        if not with_routes:
            return rows, feats, lists
        routes = sum(np.where(position[r] < n, np.int32(1 << bit), np.int32(0)) for bit, r in enumerate(ROUTES))
        return rows, feats, lists, np.where(rows >= 0, routes, 0).astype(np.int32)

    def _ann(self, user_emb: np.ndarray, blocked: np.ndarray, n: int) -> np.ndarray:
        extra = int(blocked.sum(1).max()) if len(blocked) else 0
        k = min(self.n_items, n + extra)
        if self.index is None:
            scores = np.asarray(user_emb, dtype=np.float32) @ self.emb.T
            return _topn(scores, blocked, n)
        _, found = search(self.index, user_emb, k, self.emb)
        ok = ~np.take_along_axis(blocked, np.maximum(found, 0), 1) & (found >= 0)
        return _compact(found, ok, n)

    def _popular(self, blocked: np.ndarray, n: int) -> np.ndarray:
        # a user has at most `extra` blocked items, so the n + extra most popular hold their first n unblocked
        extra = int(blocked.sum(1).max()) if len(blocked) else 0
        head = self.popular[: n + extra]
        pop = np.broadcast_to(head, (len(blocked), len(head)))
        return _compact(pop, ~np.take_along_axis(blocked, pop, 1), n)


def _last_per_user(indptr: np.ndarray, window: int) -> np.ndarray:
    """Indices of the last `window` entries of each CSR row (the history is in time order)."""
    lengths = np.diff(indptr)
    take = np.minimum(lengths, window)
    start = indptr[1:] - take
    return np.repeat(start - np.r_[0, np.cumsum(take)[:-1]], take) + np.arange(int(take.sum()))


def _compact(rows: np.ndarray, keep: np.ndarray, n: int) -> np.ndarray:
    """Per user, the kept rows in order, first n, -1 padded."""
    order = np.argsort(~keep, axis=1, kind="stable")
    out = np.take_along_axis(np.where(keep, rows, -1), order, axis=1)[:, :n]
    if out.shape[1] < n:
        out = np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=-1)
    return out


def _round_robin(lists: list[np.ndarray], n: int) -> np.ndarray:
    """Interleave ranked lists rank by rank (route order breaks ties), keep first occurrences, first n."""
    u = lists[0].shape[0]
    inter = np.stack([np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=-1) if x.shape[1] < n else x[:, :n]
                      for x in lists], axis=2).reshape(u, -1)
    user, col = np.nonzero(inter >= 0)  # row-major: user, then interleaved position
    rows = inter[user, col]
    width = int(rows.max()) + 1 if len(rows) else 1
    _, first = np.unique(user * width + rows, return_index=True)
    first = np.sort(first)
    user, rows = user[first], rows[first]
    starts = np.searchsorted(user, np.arange(u))
    rank = np.arange(len(user)) - starts[user]
    out = np.full((u, n), -1, np.int64)
    keep = rank < n
    out[user[keep], rank[keep]] = rows[keep]
    return out


def _position(rows: np.ndarray, ranked: np.ndarray, n: int) -> np.ndarray:
    """Position of each candidate in a route's ranked list (per user), n when absent."""
    u, width = ranked.shape
    span = int(max(rows.max(initial=0), ranked.max(initial=0))) + 2
    keys = (np.arange(u)[:, None] * span + ranked + 1).ravel()  # + 1: pads (-1) never match a row
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    query = (np.arange(u)[:, None] * span + rows + 1).ravel()
    at = np.minimum(np.searchsorted(sorted_keys, query), len(sorted_keys) - 1)
    found = (sorted_keys[at] == query) & (rows.ravel() >= 0)
    return np.where(found, order[at] % width, n).reshape(rows.shape)
