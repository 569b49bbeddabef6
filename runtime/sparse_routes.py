"""The recall routes' per-user score tables without a [users, catalog] array: for catalogs where one dense row per
user costs more than the routes' own work (runtime/candidates.py switches at `SPARSE_FROM_ITEMS` items).

Each class here answers what its dense counterpart in runtime/candidates.py answers, with the same values and the
same order, ties included (tests/test_models.py runs both on random catalogs and compares every output):
  Blocked        the items no list may hold per user: sorted user * n_items + item keys, plus whole categories
  DenseScores    a [users, items] score table (the dense path's tables, behind the same two calls)
  SparseScores   the nonzero scores of an item-to-item route: sorted keys and float32 values
  CategoryScores the category route: P(category | user) * P(item | category), from each category's items in
                 descending P(item | category)
Two calls: `at(rows)` reads the scores of given rows ([users, k]), and `top(blocked, n, fill)` ranks a user's
unblocked items by score, ties by lower row: the items with a positive score, then (fill) the items scoring 0 in
row order and those scoring below 0; -1 where a user has fewer."""

from __future__ import annotations

import numpy as np

# from this many items on, the candidate generator keeps per-user tables sparse (below it dense rows are cheaper)
SPARSE_FROM_ITEMS = 50_000
_NORMAL = float(np.finfo(np.float32).tiny)  # the smallest normal float32: float32 rounding is relative above it


def _ranges(starts, lengths: np.ndarray) -> np.ndarray:
    """starts[i] .. starts[i] + lengths[i] - 1 for each i, laid end to end (starts 0: each group's ranks)."""
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """np.take_along_axis(a, idx, axis=1) for 2-D arrays, without its per-call overhead (this runs per request)."""
    return a[np.arange(a.shape[0])[:, None], idx]


DENSE_SUM_CELLS = 1 << 22  # the largest [users, n_items] table SparseScores.from_entries sums entries in (32 MB)


def _topn(scores: np.ndarray, blocked: np.ndarray, n: int) -> np.ndarray:
    """Rows of the n best scores per user (ties: lower row first, also among the items tying with the n-th),
    -1 where blocked items would be needed."""
    s = np.where(blocked, -np.inf, scores)
    n = min(n, s.shape[1])
    if n <= 0:
        return np.full((len(s), 0), -1, np.int64)
    part = np.argpartition(-s, n - 1, axis=1)[:, :n] if n < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(s), 1))
    vals = _take(s, part)
    if n < s.shape[1]:
        # argpartition keeps an arbitrary few of the items tying with the n-th best: keep the lowest rows instead
        bound = vals.min(axis=1)
        fix = np.flatnonzero(((s == bound[:, None]).sum(1) > (vals == bound[:, None]).sum(1)) & (bound > -np.inf))
        if len(fix):
            sf, bf = s[fix], bound[fix][:, None]
            above, tie = sf > bf, sf == bf
            need = n - above.sum(1)
            keep = above | (tie & (np.cumsum(tie, axis=1) <= need[:, None]))
            part[fix] = np.nonzero(keep)[1].reshape(len(fix), n)
            vals[fix] = _take(sf, part[fix])
    order = np.lexsort((part, -vals), axis=1)
    top = _take(part, order)
    return np.where(_take(vals, order) > -np.inf, top, -1)


def stable_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys sorted, the stable argsort) of int64 keys >= 0. NumPy sorts values several times faster than it
    argsorts them, so where key * 2^b + position fits 63 bits (b: the bits of a position) one sort of those
    gives both, ties in position order; other keys are argsorted."""
    keys = np.asarray(keys, np.int64)  # the shift below must not wrap a narrower integer
    n = len(keys)
    bits = max(n - 1, 1).bit_length()
    if n and int(keys.min()) >= 0 and int(keys.max()) < 1 << (63 - bits):
        packed = np.sort((keys << bits) | np.arange(n, dtype=np.int64))
        return packed >> bits, packed & ((1 << bits) - 1)
    order = np.argsort(keys, kind="stable")
    return keys[order], order


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal keys starts in a sorted array (bool)."""
    first = np.ones(len(sorted_keys), bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    return first


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.zeros(keys.shape, bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _add_categories(mask: np.ndarray, blocked_categories: np.ndarray, category: np.ndarray) -> None:
    """Block every item of each user's blocked categories in a dense [users, items] mask (items without one never)."""
    for i in np.flatnonzero(blocked_categories.any(1)):
        mask[i] |= blocked_categories[i][np.maximum(category, 0)] & (category >= 0)


class Blocked:
    """Per user, the items no route may propose. Dense ([users, items] masks) or sparse (keys); `most()` bounds
    how many a user has (with_categories=False: without the whole categories a cart request blocks, which the
    FAISS searches do not count)."""

    def __init__(self, n_users: int, n_items: int, mask: np.ndarray | None = None, search_mask: np.ndarray | None = None,
                 keys: np.ndarray | None = None, category: np.ndarray | None = None, blocked_categories: np.ndarray | None = None):
        self.n_users, self.n_items = n_users, n_items
        self.mask, self.search_mask = mask, search_mask
        self.keys = keys  # sorted unique user * n_items + item
        self.category, self.blocked_categories = category, blocked_categories  # [users, categories] bool, or None
        self._counts: dict[bool, np.ndarray] = {}  # counts() per with_categories: several routes ask

    @property
    def sparse(self) -> bool:
        return self.mask is None

    @classmethod
    def build(cls, n_users: int, n_items: int, users: np.ndarray, items: np.ndarray, unavailable: np.ndarray | None,
              sparse: bool, category: np.ndarray, blocked_categories: np.ndarray | None) -> "Blocked":
        """users/items: blocked pairs; unavailable: blocked for everyone ([k]) or per user ([users, k], -1 pads);
        blocked_categories [users, C]: whole categories (items without one never)."""
        if unavailable is not None and np.ndim(unavailable) == 2:  # per user: more pairs
            who, at = np.nonzero(unavailable >= 0)
            users, items = np.concatenate([users, who]), np.concatenate([items, unavailable[who, at]]).astype(np.int64)
            unavailable = None
        if not sparse:
            mask = np.zeros((n_users, n_items), bool)
            mask[users, items] = True
            if unavailable is not None and len(unavailable):
                mask[:, unavailable] = True
            search_mask = mask
            if blocked_categories is not None:
                search_mask = mask.copy()
                _add_categories(mask, blocked_categories, category)
            return cls(n_users, n_items, mask=mask, search_mask=search_mask)
        keys = [np.asarray(users, np.int64) * n_items + items]
        if unavailable is not None and len(unavailable):
            keys.append((np.arange(n_users, dtype=np.int64)[:, None] * n_items + np.asarray(unavailable, np.int64)).ravel())
        return cls(n_users, n_items, keys=np.unique(np.concatenate(keys)), category=category,
                   blocked_categories=blocked_categories)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """[users, k] whether each user's rows (>= 0) are blocked."""
        if not self.sparse:
            return _take(self.mask, rows)
        hit = _contains(self.keys, np.arange(len(rows), dtype=np.int64)[:, None] * self.n_items + rows)
        if self.blocked_categories is not None:
            cats = self.category[rows]
            hit |= _take(self.blocked_categories, np.maximum(cats, 0)) & (cats >= 0)
        return hit

    def counts(self, with_categories: bool = True) -> np.ndarray:
        """Per user, how many items are blocked (with_categories=False: not counting whole blocked categories)."""
        if with_categories not in self._counts:
            self._counts[with_categories] = self._count(with_categories)
        return self._counts[with_categories]

    def _count(self, with_categories: bool) -> np.ndarray:
        if not self.sparse:
            return (self.mask if with_categories else self.search_mask).sum(1)
        owner = self.keys // self.n_items
        out = np.bincount(owner, minlength=self.n_users)
        if with_categories and self.blocked_categories is not None:
            sizes = np.bincount(self.category[self.category >= 0], minlength=self.blocked_categories.shape[1])
            cats = self.category[self.keys % self.n_items]
            inside = self.blocked_categories[owner, np.maximum(cats, 0)] & (cats >= 0)  # counted with their category
            out = out + self.blocked_categories.astype(np.int64) @ sizes - np.bincount(owner[inside], minlength=self.n_users)
        return out

    def most(self, with_categories: bool = True) -> int:
        return int(self.counts(with_categories).max()) if self.n_users else 0

    def subset(self, users: np.ndarray) -> "Blocked":
        """The same for some users (sorted), renumbered 0.. in their order."""
        if not self.sparse:
            return Blocked(len(users), self.n_items, mask=self.mask[users], search_mask=self.search_mask[users])
        owner = self.keys // self.n_items
        keep = np.isin(owner, users)
        keys = np.searchsorted(users, owner[keep]) * self.n_items + self.keys[keep] % self.n_items
        cats = None if self.blocked_categories is None else self.blocked_categories[users]
        return Blocked(len(users), self.n_items, keys=keys, category=self.category, blocked_categories=cats)

    def dense(self) -> np.ndarray:
        if not self.sparse:
            return self.mask
        mask = np.zeros((self.n_users, self.n_items), bool)
        mask.reshape(-1)[self.keys] = True
        if self.blocked_categories is not None:
            _add_categories(mask, self.blocked_categories, self.category)
        return mask


class DenseScores:
    def __init__(self, table: np.ndarray):
        self.table = table

    def at(self, rows: np.ndarray) -> np.ndarray:
        return _take(self.table, rows)

    def top(self, blocked: Blocked, n: int, fill: bool) -> np.ndarray:
        s = self.table if fill else np.where(self.table > 0, self.table, -np.inf)
        return _topn(s, blocked.dense(), n)


class _Placer:
    """Fills [users, n] lists group after group (positives, then zeros, then negatives), each group's entries given
    in user order and rank order."""

    def __init__(self, n_users: int, n: int):
        self.out = np.full((n_users, n), -1, np.int64)
        self.filled = np.zeros(n_users, np.int64)
        self.n = n

    def place(self, users: np.ndarray, items: np.ndarray) -> None:
        if not len(users):
            return
        starts = np.searchsorted(users, np.arange(len(self.filled)))
        rank = np.arange(len(users)) - starts[users] + self.filled[users]
        keep = rank < self.n
        self.out[users[keep], rank[keep]] = items[keep]
        self.filled += np.bincount(users[keep], minlength=len(self.filled))


def _place_ranked(placer: _Placer, users: np.ndarray, items: np.ndarray, values: np.ndarray, select: np.ndarray,
                  by_key: bool = True) -> None:
    """The selected entries, by user, then value descending, then row, the first placer.n of each user. One sort
    of packed (user, value, row) keys where they fit 63 bits; else a top-n per user over one padded row of entries
    each (argpartition, _topn's ties), which needs the entries in (user, item) order: by_key says they are, as
    SparseScores keeps them."""
    idx = np.flatnonzero(select)
    idx = idx[values[idx] > -np.inf]  # -inf is no score (_topn's rule), e.g. float32 sums that overflowed
    if not len(idx):
        return
    u, it, v = users[idx], items[idx], values[idx]
    item_bits = max(int(it.max()), 1).bit_length()
    if int(u.max()) < 1 << (31 - item_bits):
        # one sort of (user, value descending, item) packed in 63 bits: the order _topn gives, ties by row
        key = (u.astype(np.int64) << (32 + item_bits)) | (_descending(v) << item_bits) | it
        ordered = np.sort(key)
        who, row = ordered >> (32 + item_bits), ordered & ((1 << item_bits) - 1)
        counts = np.bincount(who, minlength=len(placer.filled))
        rank = _ranges(0, counts)
        keep = rank < placer.n
        placer.place(who[keep], row[keep])
        return
    if not by_key:
        order = stable_order(u * (int(it.max()) + 1) + it)[1]
        u, it, v = u[order], it[order], v[order]
    n_users = len(placer.filled)
    counts = np.bincount(u, minlength=n_users)
    col = _ranges(0, counts)
    width = int(counts.max())
    table = np.full((n_users, width), -np.inf, np.float32)
    table[u, col] = v
    rows = np.full((n_users, width), -1, np.int64)
    rows[u, col] = it
    top = _topn(table, np.zeros((n_users, width), bool), min(placer.n, width))  # columns: (user, item) order
    who, at = np.nonzero(top >= 0)
    placer.place(who, rows[who, top[who, at]])


def _descending(values: np.ndarray) -> np.ndarray:
    """float32 values (no NaN) -> int64 keys in [0, 2^32) whose ascending order is the values' descending one,
    equal values equal keys (-0.0 as 0.0)."""
    bits = (np.asarray(values, np.float32) + np.float32(0)).view(np.uint32).astype(np.int64)
    ascending = np.where(bits >= 1 << 31, (1 << 32) - 1 - bits, bits | (1 << 31))
    return (1 << 32) - 1 - ascending


def _width(out: np.ndarray, n: int) -> np.ndarray:
    return out if out.shape[1] == n else np.pad(out, ((0, 0), (0, n - out.shape[1])), constant_values=-1)


class SparseScores:
    """Sorted keys (user * n_items + item) and their float32 scores, zeros left out."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, n_users: int, n_items: int):
        self.keys, self.values, self.n_users, self.n_items = keys, values, n_users, n_items

    @classmethod
    def from_entries(cls, targets: np.ndarray, values: np.ndarray, n_users: int, n_items: int) -> "SparseScores":
        """Sum the entries per key in their order (float64, then float32: as the dense bincount does). Entries as
        many as half the [users, n_items] cells (a user of thousands of actions, alone in a request) are summed in
        that table, which costs less than ordering them: the same sums in the same order."""
        if not len(targets):
            return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), n_users, n_items)
        cells = n_users * n_items
        if cells <= DENSE_SUM_CELLS and 2 * len(targets) >= cells:
            sums = np.bincount(targets, weights=values, minlength=cells).astype(np.float32)
            keys = np.flatnonzero(sums)
            return cls(keys.astype(np.int64), sums[keys], n_users, n_items)
        ordered, order = stable_order(np.asarray(targets, np.int64))
        first = _run_starts(ordered)
        keys = ordered[first]
        inverse = np.empty(len(order), np.intp)  # each entry's key, as np.unique's return_inverse
        inverse[order] = np.cumsum(first) - 1
        sums = np.bincount(inverse, weights=values).astype(np.float32)
        nonzero = sums != 0
        return cls(keys[nonzero], sums[nonzero], n_users, n_items)

    def at(self, rows: np.ndarray) -> np.ndarray:
        query = np.arange(len(rows), dtype=np.int64)[:, None] * self.n_items + rows
        if not len(self.keys):
            return np.zeros(rows.shape, np.float32)
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return np.where(self.keys[at] == query, self.values[at], np.float32(0))

    def top(self, blocked: Blocked, n: int, fill: bool) -> np.ndarray:
        placer = _Placer(self.n_users, min(n, self.n_items))
        users, items = self.keys // self.n_items, self.keys % self.n_items
        ok = ~_blocked_pairs(blocked, users, items)
        _place_ranked(placer, users, items, self.values, ok & (self.values > 0))
        if fill:
            self._fill_zeros(placer, blocked)
            _place_ranked(placer, users, items, self.values, ok & (self.values < 0))
        return _width(placer.out, n)

    def _fill_zeros(self, placer: _Placer, blocked: Blocked) -> None:
        """The unblocked items scoring 0 (no entry here), lowest rows first, into what each user's list lacks."""
        need = placer.n - placer.filled
        users = np.flatnonzero(need > 0)
        if not len(users):
            return
        entries = np.bincount(self.keys // self.n_items, minlength=self.n_users)
        # rows 0 .. span-1 hold `need` such items: at most `blocked` + `entries` of them are excluded
        span = np.minimum(need[users] + blocked.counts()[users] + entries[users], self.n_items)
        owner = np.repeat(users, span)
        row = _ranges(0, span)
        keys = owner * self.n_items + row
        free = ~_contains(self.keys, keys) & ~_blocked_pairs(blocked, owner, row)
        owner, row = owner[free], row[free]
        placer.place(owner, row)


def _spans(owners: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, position) of every position starts[i] .. starts[i] + lengths[i] - 1, owner by owner."""
    return np.repeat(owners, lengths), _ranges(starts, lengths)


def _blocked_pairs(blocked: Blocked, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Whether each (user, item) pair is blocked."""
    if not blocked.sparse:
        return blocked.mask[users, items]
    hit = _contains(blocked.keys, users * blocked.n_items + items)
    if blocked.blocked_categories is not None:
        cats = blocked.category[items]
        hit |= blocked.blocked_categories[users, np.maximum(cats, 0)] & (cats >= 0)
    return hit


class CategoryScores:
    """The category route's scores, float32(P(category | user) * P(item | category)), read per candidate and ranked
    from each of the user's categories' items in descending P(item | category) (`by_category`: rows sorted by
    category, P descending, row; `starts`: each category's offset). Equal to ranking the whole catalog: a user's
    first n + (their blocked items) items of a category, plus any tying with the last of them, hold every item
    of that category that can make their top n."""

    def __init__(self, shares: np.ndarray, category: np.ndarray, p_in_category: np.ndarray, by_category: np.ndarray,
                 starts: np.ndarray, keys: np.ndarray):
        self.shares, self.category, self.p = shares, category, p_in_category
        self.by_category, self.starts, self.keys = by_category, starts, keys

    @staticmethod
    def index(category: np.ndarray, p_in_category: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows by category, P descending, row; each category's offset; category + 1 - P of those rows, ascending:
        how many of a category's items have P at least some value is one searchsorted)."""
        has = np.flatnonzero(category >= 0)
        order = has[np.lexsort((has, -p_in_category[has], category[has]))]
        n_cat = int(category.max()) + 1 if len(has) else 0
        starts = np.concatenate(([0], np.cumsum(np.bincount(category[order], minlength=n_cat))))
        return order, starts, category[order] + (1.0 - p_in_category[order].astype(np.float64))

    def at(self, rows: np.ndarray) -> np.ndarray:
        if not self.shares.shape[1]:
            return np.zeros(rows.shape, np.float32)
        return (_take(self.shares, np.maximum(self.category[rows], 0)) * self.p[rows]).astype(np.float32)

    def _score(self, users: np.ndarray, cats: np.ndarray, items: np.ndarray) -> np.ndarray:
        return (self.shares[users, cats] * self.p[items]).astype(np.float32)

    def _blocked_in(self, blocked: Blocked, users: np.ndarray, cats: np.ndarray) -> np.ndarray:
        """How many of each (user, category) pair's items the user has blocked (not counting whole blocked
        categories): the first n + that many of the category hold n the user may get. A user's blocked items in
        other categories do not count, so a long history does not make every category's cut its whole size."""
        if not blocked.sparse:  # masks (not how the sparse routes run): every blocked item of the user, as before
            return blocked.counts()[users]
        n_cat = self.shares.shape[1]
        cat = self.category[blocked.keys % blocked.n_items]
        inside = cat >= 0
        pairs = np.sort((blocked.keys[inside] // blocked.n_items) * n_cat + cat[inside])
        query = users.astype(np.int64) * n_cat + cats
        return np.searchsorted(pairs, query, side="right") - np.searchsorted(pairs, query, side="left")

    def top(self, blocked: Blocked, n: int, fill: bool = False) -> np.ndarray:
        users, cats = np.nonzero(self.shares > 0)
        placer = _Placer(len(self.shares), n)
        if not len(users):
            return placer.out
        size = self.starts[cats + 1] - self.starts[cats]
        want = n + self._blocked_in(blocked, users, cats)
        take = np.minimum(want, size)
        if blocked.blocked_categories is not None:  # a whole category blocked (a cart request's): nothing to take, and
            take[blocked.blocked_categories[users, cats]] = 0  # no bound from it (want counts the items blocked one by one)
        # a category holding `want` items gives the user n unblocked ones scoring at least its want-th item's score;
        # the best such score over the user's categories bounds what the others must supply (all of theirs scoring at
        # least that much; P's threshold taken a little low, so float32 rounding cannot leave one out)
        full = take == want
        if full.any():
            edge = np.where(full, self._score(users, cats, self.by_category[self.starts[cats] + np.maximum(take - 1, 0)]),
                            -np.inf)
            bound = np.full(len(self.shares), -np.inf, np.float32)
            np.maximum.at(bound, users, edge)
            # float32's relative rounding holds for normal numbers only: subnormal bounds are not used
            low = bound[users] >= _NORMAL
            if low.any():
                threshold = bound[users[low]] / self.shares[users[low], cats[low]] * (1 - 1e-6)
                above = np.searchsorted(self.keys, cats[low] + (1.0 - threshold), side="right") - self.starts[cats[low]]
                take[low] = np.minimum(take[low], np.maximum(above, 1))
        pair, pos = _spans(np.arange(len(users)), np.zeros(len(users), np.int64), take)
        parts_pair, parts_pos = [pair], [pos]
        # past each pair's cut, the items that tie with its last one (float32 rounding) could still win on row:
        # scores fall along a category's order, so they follow the cut in one run
        last = self.by_category[self.starts[cats] + np.maximum(take - 1, 0)]
        bound = self._score(users, cats, last)
        active = np.flatnonzero((take > 0) & (take < size))
        # a normal bound: every item tying with it has P at least its threshold (taken a little low), one
        # searchsorted finds where those end, and the exact scores keep the ties among them
        normal = bound[active] >= _NORMAL
        fast, active = active[normal], active[~normal]
        if len(fast):
            threshold = bound[fast] / self.shares[users[fast], cats[fast]] * (1 - 1e-6)
            end = np.searchsorted(self.keys, cats[fast] + (1.0 - threshold), side="right") - self.starts[cats[fast]]
            pair_w, pos_w = _spans(fast, take[fast], np.maximum(np.minimum(end, size[fast]) - take[fast], 0))
            item = self.by_category[self.starts[cats[pair_w]] + pos_w]
            tie = self._score(users[pair_w], cats[pair_w], item) == bound[pair_w]
            parts_pair.append(pair_w[tie])
            parts_pos.append(pos_w[tie])
        # a subnormal bound (float32 rounding not relative there): the exact scores fall along the category's order,
        # so the ties form a run from the cut and a bisection over the positions finds its end; a zero bound ties
        # only with items scoring 0, which no route keeps
        active = active[bound[active] > 0]
        lo, hi = take[active], size[active].copy()
        while len(active) and (lo < hi).any():
            mid = (lo + hi) // 2
            item = self.by_category[self.starts[cats[active]] + np.minimum(mid, size[active] - 1)]
            tie = (self._score(users[active], cats[active], item) == bound[active]) & (lo < hi)
            lo, hi = np.where(tie, mid + 1, lo), np.where(tie | (lo >= hi), hi, mid)
        if len(active):
            pair_w, pos_w = _spans(active, take[active], lo - take[active])
            parts_pair.append(pair_w)
            parts_pos.append(pos_w)
        pair, pos = np.concatenate(parts_pair), np.concatenate(parts_pos)
        u, c = users[pair], cats[pair]
        items = self.by_category[self.starts[c] + pos]
        score = self._score(u, c, items)
        keep = (score > 0) & ~_blocked_pairs(blocked, u, items)
        _place_ranked(placer, u, items, score, keep, by_key=False)
        return placer.out
