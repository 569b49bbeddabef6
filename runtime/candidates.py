"""Recall routes, their fusion and the candidate features the ranker reads: one implementation for
the offline stages (the ranker's training lists, evaluation) and the server, so a candidate gets
the same features in both. NumPy (+ FAISS for the ANN routes) only.

Routes, each excluding the user's seen items (`exclude_seen`; items of repeat categories stay), the
request's context items and the unavailable ones:
  cf_all       item-to-item scores of everything the user interacted with (views included)
  cf_pos       the same from the user's positives only (click or stronger)
  ann          two-tower: the user embedding against the item embeddings (FAISS), plus the item's
               popularity bias when train chose one (`popularity_bias`)
  category     the popular items of the user's categories: P(category | user) from their actions,
               recent ones weighing more, times P(item | category), the item's share of its
               category's popularity (items with a category only)
  popular      the most popular items: always available, fills what the others leave
  trending     recency-weighted popularity (`trending_order`): positives weighted by their age at export
  similar      item-to-item (cf_all) neighbours of the request's context items (the viewed item)
  similar_ann  the items nearest the context items in the two-tower space (new items too)
  copurchase   items bought together with or after the context items (`copurchase_neighbours`)
A user without history gets the ANN, popular and trending routes; the context routes need context items.

Fusion: weighted round robin. Route r's item at rank p gets the key (p + 1) / w_r; candidates are taken
in key order (ties: rank, then the route order of contract.ROUTES), first occurrence wins, until N.
Equal weights interleave the lists rank by rank; weight 0 turns a route off. The scene (and an
experiment arm) sets the weights per request (runtime/strategy.py); the ranker's training lists use
`TRAINING_WEIGHTS`. A route that fails returns nothing and is reported (`failed`); the others fill in.

Per-user tables (the item-to-item scores, the category route, the blocked items) are [users, items] arrays
below `sparse_routes.SPARSE_FROM_ITEMS` items and sparse from there on, with the same lists and features
(runtime/sparse_routes.py): a dense row per user costs O(catalog), which at 10^5-10^6 items outweighs the routes'
own work. Every top-n breaks ties by the lower row, the n-th best's ties included.

Features per candidate (`DENSE_FEATURES`): the three item-to-item scores (all, positives, the last
`recent_window` actions), the two-tower dot product, log(1 + rank) in the cf_all, cf_pos and ann lists
(N when absent), the user's affinity to the candidate's category and the category route's score.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np

from shoprec import contract

from .faiss_search import augment, search
from .sparse_routes import (SPARSE_FROM_ITEMS, Blocked, CategoryScores, DenseScores, SparseScores, _ranges, _run_starts, _take,
                            _topn, stable_order)

DENSE_FEATURES = ("cf_all", "cf_pos", "cf_recent", "two_tower", "rank_cf_all", "rank_cf_pos", "rank_ann", "cat_affinity",
                  "cat_score")
ROUTES = contract.ROUTES  # the fusion tie order, and the bit order of the route masks in responses
POSITIVE_KIND = 2
PURCHASE_KIND = 4
# the routes the ranker's training lists fuse (equal weights): the served home scene adds trending
TRAINING_WEIGHTS = np.array([1.0 if r in ("cf_all", "cf_pos", "ann", "category", "popular") else 0.0 for r in ROUTES])


LONG_ROWS = 64  # neighbours per history item from which ItemNeighbours copies whole rows (see _entries)


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
        if n < 0 or indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any() or len(arrays["values"]) != len(indices):
            raise ValueError("item neighbours: malformed CSR arrays")
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(f"item neighbours: indices outside 0..{n - 1}")
        values = np.asarray(arrays["values"], dtype=np.float32)
        if not np.isfinite(values).all():  # the routes rank by these: a NaN has no place in an order
            raise ValueError(f"item neighbours: {int((~np.isfinite(values)).sum())} weights are NaN or infinite")
        return cls(indptr, indices, values, n)

    def scores(self, indptr: np.ndarray, rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """[U, n_items] sum of the neighbour rows of each user's items (CSR over users: indptr, rows)."""
        n_users = len(indptr) - 1
        out = np.zeros((n_users, self.n_items), np.float32)
        targets, vals = self._entries(indptr, rows, weights)
        if len(targets):
            out.reshape(-1)[:] = np.bincount(targets, weights=vals, minlength=out.size).astype(np.float32)
        return out

    def sparse_scores(self, indptr: np.ndarray, rows: np.ndarray) -> SparseScores:
        """scores() without the [U, n_items] table: its nonzero entries, the same float32 values."""
        return SparseScores.from_entries(*self._entries(indptr, rows), len(indptr) - 1, self.n_items)

    def _entries(self, indptr: np.ndarray, rows: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each neighbour weight the users' items vote with: its position in the flattened [U, n_items] table (the
        owner's row start plus the item) and its value, in CSR order."""
        n_users = len(indptr) - 1
        starts, ends = self.indptr[rows], self.indptr[rows + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        if not total:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if total >= LONG_ROWS * len(rows):
            # long neighbour rows (a catalog of thousands, hundreds of neighbours each, a user of thousands of
            # actions): one copy of each row's slice costs less than [total] index arrays and two gathers
            bounds = list(zip(starts.tolist(), ends.tolist()))
            cols = np.concatenate([self.indices[a:b] for a, b in bounds])
            vals = np.concatenate([self.values[a:b] for a, b in bounds])
        else:
            flat = _ranges(starts, lengths)
            cols, vals = self.indices[flat], self.values[flat]
        if weights is not None:
            vals = vals * np.repeat(weights, lengths)
        if n_users == 1:
            return cols, vals
        return cols + np.repeat(np.repeat(np.arange(n_users) * self.n_items, np.diff(indptr)), lengths), vals


@dataclass(frozen=True)
class CategoryPrior:
    """The category route's model: P(item | category), the item's share of its category's popularity
    (popularity + 1, so items nobody acted on yet keep a little), and how a user's category shares decay
    with the age of their actions (`decay` per action, the latest weighing 1).

    `smoothing` (alpha) shrinks a user's shares toward the catalog's: (W * shares + alpha * global) / (W + alpha),
    W the user's decayed action count, `global_share` each category's share of all popularity. A user with a few
    actions in one category then gets that category first and the rest in popularity order, where the raw shares
    gave nothing outside the categories seen. 0: the raw shares."""

    category: np.ndarray  # [n_items] category code, -1 none
    p_in_category: np.ndarray  # [n_items], 0 for items without a category
    n_categories: int
    decay: float = 0.97
    smoothing: float = 0.0
    global_share: np.ndarray | None = None  # [n_categories], sums to 1

    @classmethod
    def from_popularity(cls, category: np.ndarray, popularity: np.ndarray, decay: float = 0.97,
                        smoothing: float = 0.0) -> "CategoryPrior":
        category = np.asarray(category, dtype=np.int64)
        pop = np.asarray(popularity, dtype=np.float64) + 1.0
        has = category >= 0
        n_cat = int(category.max()) + 1 if has.any() else 0
        total = np.bincount(category[has], weights=pop[has], minlength=n_cat)
        p = np.where(has, pop / np.maximum(total[np.maximum(category, 0)] if n_cat else 1.0, 1e-12), 0.0)
        if not np.isfinite(smoothing) or smoothing < 0:
            raise ValueError(f"category smoothing must be a finite number >= 0; got {smoothing}")
        return cls(category, p.astype(np.float32), n_cat, decay, float(smoothing), total / max(total.sum(), 1e-12))

    def shares(self, indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[U, C] each user's recency-weighted category shares (rows sum to 1; 0 without categorised actions),
        shrunk toward `global_share` by `smoothing`."""
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
        weight = out.sum(1, keepdims=True)
        if self.smoothing > 0:  # users without categorised actions keep no shares: the route stays empty for them
            return np.where(weight > 0, (out + self.smoothing * self.global_share[None, :]) / (weight + self.smoothing), 0.0)
        return out / np.maximum(weight, 1e-12)

    def scores(self, shares: np.ndarray) -> np.ndarray:
        """[U, n_items] P(category | user) * P(item | category)."""
        if not self.n_categories:
            return np.zeros((len(shares), len(self.category)), np.float32)
        return (shares[:, np.maximum(self.category, 0)] * self.p_in_category[None, :]).astype(np.float32)


def csr_offsets(cumsum: np.ndarray) -> np.ndarray:
    """[0, *cumsum]: CSR offsets (np.r_[0, ...] without its per-call overhead)."""
    return np.concatenate((np.zeros(1, dtype=cumsum.dtype), cumsum))


def popularity_bias(popularity: np.ndarray, weight: float) -> np.ndarray | None:
    """What the ann route adds to the inner product, per item row: weight * log of the item's popularity as a share
    of the most popular item's (counts smoothed by one, so <= 0). The two-tower learns with logQ correction, which
    takes popularity out of its scores; `train` chooses how much to put back (retrieval.popularity_prior, on its
    holdout) and export builds the index over [embedding, bias]. None for weight 0: the inner product alone."""
    if not weight:
        return None
    pop = np.asarray(popularity, dtype=np.float64)
    return (float(weight) * np.log((pop + 1.0) / (pop.max(initial=0.0) + 1.0))).astype(np.float32)


class CandidateGenerator:
    """Routes + fusion + features for a batch of users. Cost per user: O(history x neighbours + items)."""

    def __init__(self, item_embeddings: np.ndarray, index, cf_all: ItemNeighbours, cf_pos: ItemNeighbours,
                 popular_rows: np.ndarray, n_candidates: int, recent_window: int = 5, exempt: np.ndarray | None = None,
                 categories: CategoryPrior | None = None, trending_rows: np.ndarray | None = None,
                 copurchase: ItemNeighbours | None = None, sparse: bool | None = None, ann_bias: np.ndarray | None = None):
        n = len(item_embeddings)
        copurchase = copurchase or ItemNeighbours.empty(n)
        for name, cf in (("cf_all", cf_all), ("cf_pos", cf_pos), ("copurchase", copurchase)):
            if cf.n_items != n:
                raise ValueError(f"{name} covers {cf.n_items} items, the item embeddings {n}")
        self.emb = np.ascontiguousarray(item_embeddings, dtype=np.float32)
        self.index = index
        # the ann route's per-item popularity bias; an index then holds [embedding, bias] (export builds it so)
        self.ann_bias = None if ann_bias is None else np.asarray(ann_bias, dtype=np.float32)
        if self.ann_bias is not None and self.ann_bias.shape != (n,):
            raise ValueError(f"ann_bias has shape {self.ann_bias.shape}, the item embeddings {n} rows")
        if index is not None and index.d != self.emb.shape[1] + (self.ann_bias is not None):
            raise ValueError(f"the FAISS index has {index.d} dimensions; the {self.emb.shape[1]}-d item embeddings "
                             f"{'with' if self.ann_bias is not None else 'without'} a popularity bias need "
                             f"{self.emb.shape[1] + (self.ann_bias is not None)}")
        self.cf_all, self.cf_pos, self.copurchase = cf_all, cf_pos, copurchase
        # every action a positive (a shop logging clicks and up): the two routes are one model, and a user whose
        # actions are all positive gets cf_all's scores for cf_pos without computing them twice
        self._one_cf = cf_pos is cf_all or all(np.array_equal(getattr(cf_all, a), getattr(cf_pos, a))
                                               for a in ("indptr", "indices", "values"))
        self.popular = np.asarray(popular_rows, dtype=np.int64)
        self.trending = np.zeros(0, np.int64) if trending_rows is None else np.asarray(trending_rows, dtype=np.int64)
        self.n = int(min(n_candidates, n))
        self.recent_window = recent_window
        self.exempt = np.zeros(n, bool) if exempt is None else np.asarray(exempt, dtype=bool)
        self.categories = categories or CategoryPrior.from_popularity(np.full(n, -1), np.zeros(n))  # none: an empty route
        if len(self.categories.category) != n:
            raise ValueError(f"category prior covers {len(self.categories.category)} items, the item embeddings {n}")
        # per-user score tables and blocked items: dense [users, items] rows for small catalogs, sparse from
        # SPARSE_FROM_ITEMS items on (the same lists and features either way: runtime/sparse_routes.py)
        self.sparse = n >= SPARSE_FROM_ITEMS if sparse is None else bool(sparse)
        self._by_category = CategoryScores.index(self.categories.category, self.categories.p_in_category) if self.sparse else None

    @property
    def n_items(self) -> int:
        return len(self.emb)

    def __call__(self, user_emb: np.ndarray, hist_indptr: np.ndarray, hist_rows: np.ndarray, hist_kinds: np.ndarray,
                 exclude_seen: np.ndarray | bool = True, with_routes: bool = False,
                 unavailable: np.ndarray | None = None, weights: np.ndarray | None = None,
                 context: tuple[np.ndarray, np.ndarray] | None = None,
                 exclude_context_categories: np.ndarray | bool = False, failed: dict | None = None) -> tuple:
        """-> candidate rows [U, N] (-1 pads when too few items are left), dense features [U, N, F],
        and each route's ranked list {route: [U, N]} (for evaluation); with_routes: also each candidate's
        route bitmask [U, N] int32 (bit i: in ROUTES[i]'s list), from the same positions the features use.
        unavailable: item rows no route may propose, for every user ([k]) or per user ([U, k], -1 pads). weights: fusion weight of each route,
        [len(ROUTES)] or per user [U, len(ROUTES)] (default TRAINING_WEIGHTS). context: the request's context
        items (CSR indptr, rows): never proposed, read by the context routes; exclude_context_categories:
        per user, no item of a context item's category either. failed: where the routes that fail write their
        errors ({route: error}; the caller's own, so that threads sharing a generator keep theirs apart)."""
        u = len(hist_indptr) - 1
        n_items, n = self.n_items, self.n
        weights = np.broadcast_to(TRAINING_WEIGHTS if weights is None else np.asarray(weights, np.float64), (u, len(ROUTES)))
        exclude = np.broadcast_to(np.asarray(exclude_seen, dtype=bool), (u,))
        owner = np.repeat(np.arange(u), np.diff(hist_indptr))
        drop = exclude[owner] & ~self.exempt[hist_rows]
        ctx_indptr, ctx_rows = context if context is not None else (np.zeros(u + 1, np.int64), np.zeros(0, np.int64))
        ctx_owner = np.repeat(np.arange(u), np.diff(ctx_indptr))
        drop_cats = np.broadcast_to(np.asarray(exclude_context_categories, dtype=bool), (u,))
        blocked_categories = None  # [U, C]: a cart's categories (the FAISS searches do not count them: k would be huge)
        if drop_cats.any() and self.categories.n_categories and len(ctx_rows):
            cats = self.categories.category[ctx_rows]
            pick = drop_cats[ctx_owner] & (cats >= 0)
            if pick.any():
                blocked_categories = np.zeros((u, self.categories.n_categories), bool)
                blocked_categories[ctx_owner[pick], cats[pick]] = True
        # the user's seen items (repeat categories exempt), out of stock or withdrawn ones, the viewed item, the cart
        blocked = Blocked.build(u, n_items, np.concatenate([owner[drop], ctx_owner]),
                                np.concatenate([hist_rows[drop], ctx_rows]).astype(np.int64),
                                unavailable, self.sparse, self.categories.category, blocked_categories)
        has_history = np.diff(hist_indptr) > 0
        has_context = np.diff(ctx_indptr) > 0

        pos = hist_kinds >= POSITIVE_KIND
        pos_indptr = csr_offsets(np.cumsum(np.bincount(owner[pos], minlength=u))).astype(np.int64)
        recent_idx = _last_per_user(hist_indptr, self.recent_window)
        recent_indptr = csr_offsets(np.cumsum(np.minimum(np.diff(hist_indptr), self.recent_window))).astype(np.int64)
        s_all = self._scores(self.cf_all, hist_indptr, hist_rows)
        s_pos = s_all if self._one_cf and pos.all() else self._scores(self.cf_pos, pos_indptr, hist_rows[pos])
        s_recent = self._scores(self.cf_all, recent_indptr, hist_rows[recent_idx])

        shares = self.categories.shares(hist_indptr, hist_rows)
        s_cat = CategoryScores(shares, self.categories.category, self.categories.p_in_category, *self._by_category) \
            if self.sparse else DenseScores(self.categories.scores(shares))
        failed = {} if failed is None else failed
        none = np.full((u, n), -1, np.int64)
        weighted = (weights > 0).any(0)
        wanted = {r: bool(weighted[i]) for i, r in enumerate(ROUTES)}

        def route(name, fn, needed=True):
            if not needed:
                return none
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - a failing route degrades to the others
                failed[name] = f"{type(exc).__name__}: {exc}"
                return none

        cf_all_list = np.where(has_history[:, None], s_all.top(blocked, n, fill=True), -1)
        lists = {
            "cf_all": cf_all_list,
            "cf_pos": cf_all_list if s_pos is s_all else
            np.where((np.diff(pos_indptr) > 0)[:, None], s_pos.top(blocked, n, fill=True), -1),
            "ann": route("ann", lambda: self._ann(user_emb, blocked, n)),
            "category": s_cat.top(blocked, n, fill=False),
            "popular": self._ranked(self.popular, blocked, n),
            "trending": route("trending", lambda: self._ranked(self.trending, blocked, n), wanted["trending"]),
            "similar": route("similar", lambda: np.where(has_context[:, None], self._scores(
                self.cf_all, ctx_indptr, ctx_rows).top(blocked, n, fill=False), -1),
                wanted["similar"] and has_context.any()),
            "similar_ann": route("similar_ann", lambda: self._similar_ann(ctx_indptr, ctx_rows, blocked, n),
                                 wanted["similar_ann"] and has_context.any()),
            "copurchase": route("copurchase", lambda: np.where(has_context[:, None], self._scores(
                self.copurchase, ctx_indptr, ctx_rows).top(blocked, n, fill=False), -1),
                wanted["copurchase"] and has_context.any()),
        }
        live = [i for i, r in enumerate(ROUTES) if weighted[i] and (lists[r] >= 0).any()]  # others add nothing
        live = live or [ROUTES.index("popular")]
        rows, reached_at = _fuse([lists[ROUTES[i]] for i in live], weights[:, live], n, with_cutoff=True)
        safe = np.maximum(rows, 0)
        dots = np.einsum("ud,und->un", np.asarray(user_emb, dtype=np.float32), self.emb[safe])
        # ranks in the lists the features read, and (for attribution) in the lists the fusion took from
        credited = [ROUTES[i] for i in live] if with_routes else []
        position = {r: _position(rows, lists[r], n) for r in dict.fromkeys(("cf_all", "cf_pos", "ann", *credited))}
        feats = np.stack([
            s_all.at(safe), s_pos.at(safe), s_recent.at(safe), dots,
            *(np.log1p(position[r]) for r in ("cf_all", "cf_pos", "ann")),  # log(1 + rank), log(1 + n) when absent
            _take(shares, np.maximum(self.categories.category[safe], 0)) * (self.categories.category[safe] >= 0)
            if self.categories.n_categories else np.zeros(rows.shape),
            s_cat.at(safe),
        ], axis=2).astype(np.float32)
        feats[rows < 0] = 0.0
        if not with_routes:
            return rows, feats, lists
        routes = np.zeros(rows.shape, np.int32)
        for j, bit in enumerate(live):  # a route proposed a candidate if the fusion reached it in the route's list
            p = position[ROUTES[bit]]
            hit = (p < n) & _take(reached_at[:, :, j], np.minimum(p, n - 1))
            routes |= np.where(hit, np.int32(1 << bit), np.int32(0))
        return rows, feats, lists, np.where(rows >= 0, routes, 0).astype(np.int32)

    def _scores(self, neighbours: ItemNeighbours, indptr: np.ndarray, rows: np.ndarray):
        return neighbours.sparse_scores(indptr, rows) if self.sparse else DenseScores(neighbours.scores(indptr, rows))

    def _ann(self, user_emb: np.ndarray, blocked: Blocked, n: int, count_categories: bool = False,
             biased: bool = True) -> np.ndarray:
        """The n best unblocked items by inner product (plus the popularity bias, if any and `biased`); each user's
        search asks for n + a margin for their blocked items (not counting a cart's whole categories unless
        count_categories: those only shorten the list). The margin is the user's own (`ann_margin`), never the
        batch's: an approximate index searches wider for a larger k, so a user's list must not depend on who
        else is in the batch. Users with one margin share a search."""
        bias = self.ann_bias if biased else None
        if self.index is None:
            scores = np.asarray(user_emb, dtype=np.float32) @ self.emb.T
            return _topn(scores if bias is None else scores + bias, blocked.dense(), n)
        if self.ann_bias is not None:  # the index holds [embedding, bias]: the query's last column switches it
            user_emb = augment(user_emb, 1.0 if biased else 0.0)
        ks = np.minimum(self.n_items, n + ann_margin(blocked.counts(with_categories=count_categories)))
        groups = np.unique(ks).tolist()
        if not groups:  # no user (a batch without context items, for the similar_ann route)
            return np.full((0, n), -1, np.int64)
        if len(groups) == 1:  # the common case: one search
            found = search(self.index, user_emb, groups[0], self.emb, self.ann_bias)[1]
        else:
            found = np.full((len(ks), int(ks.max())), -1, np.int64)
            for k in groups:
                who = np.flatnonzero(ks == k)
                rows = search(self.index, user_emb[who], k, self.emb, self.ann_bias)[1]
                found[who, : rows.shape[1]] = rows
        ok = ~blocked.take(np.maximum(found, 0)) & (found >= 0)
        return _compact(found, ok, n)

    def _similar_ann(self, ctx_indptr: np.ndarray, ctx_rows: np.ndarray, blocked: Blocked, n: int) -> np.ndarray:
        """The items nearest the mean of each user's (unit-length) context item embeddings."""
        out = np.full((blocked.n_users, n), -1, np.int64)
        users = np.flatnonzero(np.diff(ctx_indptr) > 0)
        emb = self.emb[ctx_rows] / np.maximum(np.linalg.norm(self.emb[ctx_rows], axis=1, keepdims=True), 1e-12)
        sums = np.add.reduceat(emb, ctx_indptr[users], axis=0) if len(users) else np.zeros((0, self.emb.shape[1]))
        query = (sums / np.diff(ctx_indptr)[users, None]).astype(np.float32)
        out[users] = self._ann(query, blocked.subset(users), n, count_categories=True, biased=False)
        return out

    def _ranked(self, ranked: np.ndarray, blocked: Blocked, n: int) -> np.ndarray:
        """The first n unblocked rows of a global order (popular, trending) per user."""
        # a user has at most `extra` blocked items, so the n + extra first rows hold their first n unblocked
        extra = blocked.most()
        head = ranked[: n + extra]
        if not len(head):
            return np.full((blocked.n_users, n), -1, np.int64)
        rows = np.broadcast_to(head, (blocked.n_users, len(head)))
        return _compact(rows, ~blocked.take(rows), n)


ANN_MARGIN_MIN = 64  # the ann search's margin for blocked items, at least (most users share one search)


def ann_margin(blocked_counts: np.ndarray) -> np.ndarray:
    """Per user, how many results beyond n the ann search asks for: their blocked items, rounded up to a power of two
    (at least ANN_MARGIN_MIN), so that a batch's users fall into a few searches and each user's k is their own."""
    c = np.maximum(np.asarray(blocked_counts, np.int64), 1)
    return np.maximum(ANN_MARGIN_MIN, 1 << np.ceil(np.log2(c)).astype(np.int64))


def trending_scores(item_row: np.ndarray, ts: np.ndarray, kind: np.ndarray, n_items: int, half_life_days: float,
                    t_end: float | None = None) -> np.ndarray:
    """[n_items] recency-weighted popularity: each positive weighs 0.5 ** (age / half-life), its age taken at `t_end`
    (default: the latest positive)."""
    pos = np.asarray(kind) >= POSITIVE_KIND
    if not pos.any():
        return np.zeros(n_items)
    ts = np.asarray(ts, dtype=np.float64)[pos]
    age_days = ((ts.max() if t_end is None else t_end) - ts) / 86400.0
    return np.bincount(np.asarray(item_row)[pos], weights=0.5 ** (age_days / max(half_life_days, 1e-6)), minlength=n_items)


def trending_order(item_row: np.ndarray, ts: np.ndarray, kind: np.ndarray, n_items: int, half_life_days: float) -> np.ndarray:
    """Item rows by `trending_scores`, their ages taken at the latest positive; items without a positive are left out."""
    score = trending_scores(item_row, ts, kind, n_items, half_life_days)
    order = np.lexsort((np.arange(n_items), -score))
    return order[score[order] > 0].astype(np.int64)


def copurchase_neighbours(user: np.ndarray, session: np.ndarray, ts: np.ndarray, item_row: np.ndarray, kind: np.ndarray,
                          n_items: int, window: int = 5, top: int = 100) -> dict[str, np.ndarray]:
    """Co-purchase weights as CSR arrays (ItemNeighbours.from_arrays): a purchase of a votes for the user's next
    `window` purchases b (a -> b: bought after), and a purchase in the same session votes both ways (bought
    together). Counts are cosine-normalised, count / sqrt(purchases of a * purchases of b); the strongest
    `top` per item are kept."""
    buy = np.asarray(kind) >= PURCHASE_KIND
    u, s, t, it = (np.asarray(x)[buy] for x in (user, session, ts, item_row))
    order = np.lexsort((t, u))
    u, s, it = u[order], s[order], it[order]
    src, dst = [], []
    for lag in range(1, window + 1):
        same_user = u[:-lag] == u[lag:]
        a, b = it[:-lag][same_user], it[lag:][same_user]
        keep = a != b
        src.append(a[keep])
        dst.append(b[keep])
        together = (s[:-lag] == s[lag:])[same_user][keep]
        src.append(b[keep][together])
        dst.append(a[keep][together])
    src = np.concatenate(src) if src else np.zeros(0, np.int64)
    dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    if not len(src):
        return {"indptr": np.zeros(n_items + 1, np.int64), "indices": np.zeros(0, np.int64), "values": np.zeros(0, np.float32)}
    pair, count = np.unique(src.astype(np.int64) * n_items + dst, return_counts=True)
    a, b = pair // n_items, pair % n_items
    bought = np.bincount(it, minlength=n_items).astype(np.float64)
    value = count / np.sqrt(np.maximum(bought[a] * bought[b], 1.0))
    order = np.lexsort((b, -value, a))  # per item a: strongest first
    a, b, value = a[order], b[order], value[order]
    starts = np.searchsorted(a, np.arange(n_items))
    rank = np.arange(len(a)) - starts[a]
    keep = rank < top
    a, b, value = a[keep], b[keep], value[keep]
    indptr = csr_offsets(np.cumsum(np.bincount(a, minlength=n_items))).astype(np.int64)
    return {"indptr": indptr, "indices": b.astype(np.int64), "values": value.astype(np.float32)}


def _last_per_user(indptr: np.ndarray, window: int) -> np.ndarray:
    """Indices of the last `window` entries of each CSR row (the history is in time order)."""
    lengths = np.diff(indptr)
    take = np.minimum(lengths, window)
    start = indptr[1:] - take
    return _ranges(start, take)


def _compact(rows: np.ndarray, keep: np.ndarray, n: int) -> np.ndarray:
    """Per user, the kept rows in order, first n, -1 padded."""
    order = np.argsort(~keep, axis=1, kind="stable")
    out = _take(np.where(keep, rows, -1), order)[:, :n]
    if out.shape[1] < n:
        out = np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=-1)
    return out


def _fuse(lists: list[np.ndarray], weights: np.ndarray, n: int, with_cutoff: bool = False):
    """Weighted round robin over ranked lists [U, n] (in ROUTES order) with weights [U, R]: the item at rank p
    of route r gets the key (p + 1) / w_r (ties: rank, then route order); first occurrences in key order,
    first n. with_cutoff: also reached [U, n, R], the list entries the fusion got to before it stopped."""
    u = lists[0].shape[0]
    stacked = np.stack([np.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=-1) if x.shape[1] < n else x[:, :n]
                        for x in lists], axis=2)  # [U, n, R]: rank-major, route-minor
    with np.errstate(divide="ignore"):
        keys = (np.arange(1, n + 1)[None, :, None] / weights[:, None, :]).astype(np.float64)
    order, where = _fusion_order(weights, n)
    keys = np.where((stacked >= 0) & (weights[:, None, :] > 0), keys, np.inf).reshape(u, -1)
    inter = _take(stacked.reshape(u, -1), order)
    inter = np.where(_take(keys, order) < np.inf, inter, -1)
    user, col = np.nonzero(inter >= 0)  # row-major: user, then fused position
    rows = inter[user, col]
    width = int(rows.max()) + 1 if len(rows) else 1
    ordered, order = stable_order(user * width + rows)
    first = np.sort(order[_run_starts(ordered)])  # each (user, row)'s first place in the fused order
    user, rows = user[first], rows[first]
    starts = np.searchsorted(user, np.arange(u))
    rank = np.arange(len(user)) - starts[user]
    out = np.full((u, n), -1, np.int64)
    keep = rank < n
    out[user[keep], rank[keep]] = rows[keep]
    if not with_cutoff:
        return out
    # reached[u, p, j]: the fusion got to rank p of route j before it stopped (the lists ran out, or the n-th
    # candidate was taken): a route "proposed" an item only there, so a fallback is credited only where it filled
    stop = np.full(u, keys.shape[1] - 1)
    last = keep & (rank == n - 1)
    stop[user[last]] = col[first][last]
    reached = (where <= stop[:, None]) & (keys < np.inf)  # where: each entry's place in the order
    return out, reached.reshape(u, n, -1)


@functools.lru_cache(maxsize=256)
def _fusion_permutation(weights: tuple[float, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The order of the [n, R] list entries by fusion key, (rank + 1) / weight, ties in position order (rank, then
    route); routes of weight 0 last. It depends on the weights only: an entry a list leaves empty keeps its place
    here, and the fusion skips it, so the entries it takes come in the order a sort of the data's keys gives."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):
        keys = np.where(w[None, :] > 0, np.arange(1, n + 1)[:, None] / w[None, :], np.inf).reshape(-1)
    order = np.argsort(keys, kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    order.flags.writeable = where.flags.writeable = False
    return order, where


def _fusion_order(weights: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """[U, n * R] each user's _fusion_permutation and its inverse (each entry's place in the order); the users of a
    batch mostly share their scene's weights."""
    shape = (len(weights), n * weights.shape[1])
    if len(weights) and (weights == weights[0]).all():
        return tuple(np.broadcast_to(x, shape) for x in _fusion_permutation(tuple(weights[0].tolist()), n))
    pairs = [_fusion_permutation(tuple(w.tolist()), n) for w in weights]
    return np.stack([p[0] for p in pairs]).reshape(shape), np.stack([p[1] for p in pairs]).reshape(shape)


def _position(rows: np.ndarray, ranked: np.ndarray, n: int) -> np.ndarray:
    """Position of each candidate in a route's ranked list (per user; the lists hold each row once), n when absent."""
    if not (ranked >= 0).any():  # an empty route (off, or nothing to start from)
        return np.full(rows.shape, n, dtype=np.int64)
    u, width = ranked.shape
    span = int(max(rows.max(initial=0), ranked.max(initial=0))) + 2
    pad = span - 1  # the column the pads (-1) write to and read from, cleared in between
    put, get = np.where(ranked >= 0, ranked, pad), np.where(rows >= 0, rows, pad)
    if u * span <= 1 << 16:  # a small dense [U, rows] table (<= 512 kB): one scatter and one gather
        table = np.full((u, span), n, dtype=np.int64)
        table[np.arange(u)[:, None], put] = np.arange(width)
        table[:, pad] = n
        return _take(table, get)
    # a catalog-wide table per user costs more than the lookups: one user at a time over a row of zeros kept per
    # thread (rank + 1 written, 0 = absent), zeroed again after each user
    row = _zeroed_row(span)
    found = np.empty(rows.shape, np.int32)
    ranks = np.arange(1, width + 1, dtype=np.int32)
    try:
        for i in range(u):
            row[put[i]] = ranks
            row[pad] = 0
            found[i] = row[get[i]]
            row[put[i]] = 0
    except BaseException:
        _SCRATCH.row = None  # a row an interrupted loop may have left written is never used again
        raise
    return np.where(found > 0, found.astype(np.int64) - 1, n)


_SCRATCH = threading.local()  # per thread (the FastAPI baseline runs a step in several threads at once)


def _zeroed_row(size: int) -> np.ndarray:
    """This thread's int32 row of at least `size` zeros; the caller leaves it zeroed."""
    row = getattr(_SCRATCH, "row", None)
    if row is None or len(row) < size:
        row = _SCRATCH.row = np.zeros(size, np.int32)
    return row
