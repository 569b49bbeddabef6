"""Point-in-time user state: what a feature store knows about a user at a moment.

The history of a user is their *actions*: interactions (view, click, cart, purchase; impressions
are not actions) deduplicated per (user, item, session), strongest event kept. A state "at t" is
built from the actions strictly before t, so no row sees its own future:

- seq_rows / seq_kinds: the last N actions, most recent first (item rows of the item table and
  event kinds 1 view .. 4 purchase; -1 / 0 pad);
- activity (number of actions), positives (number of click-or-stronger actions);
- the categories of the last M actions and the most frequent category so far (when the items
  have a category);
- price_level: the mean price of the acted-on items relative to their category's mean (when the
  items have a price).

One function computes it for any set of (user, t) queries over any set of actions, so training
rows, the ranker's held-out users and the serving snapshot all come from the same code.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HOUR = 3600
DAY = 86_400
KIND = {"view": 1, "click": 2, "cart": 3, "purchase": 4}
POSITIVE_KIND = 2  # click or stronger
TS_LIMIT = (1 << 34) - 1  # unix seconds up to the year 2514; keeps (user, ts) keys inside int64
NEVER = TS_LIMIT  # "after every action": the state at the end of the data


def context_from_ts(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hour 0-23, weekday 0=Monday) in UTC, from unix seconds."""
    ts = np.asarray(ts, dtype=np.int64)
    return (ts // HOUR) % 24, ((ts // DAY) + 3) % 7  # 1970-01-01 was a Thursday


def recent_category_columns(n: int) -> list[str]:
    return [f"recent_category_{i}" for i in range(1, n + 1)]


def actions_from_events(inter: pd.DataFrame, item_row: pd.Series, cuts: tuple[int, ...] = ()) -> pd.DataFrame:
    """Interactions -> one action per (user, item, session): the strongest event, at its first time.

    `item_row` maps raw item_id -> row of the item table. `cuts`: times no action spans (a global time split's
    cuts): a session's events on each side of a cut make separate actions, so a view before the test window
    and a purchase inside it are a train view and a test purchase, not a train purchase. Returns user_id,
    item_row, ts, session_id, kind (1..4), sorted by (user_id, ts, item_row)."""
    acts = inter[inter["event"].isin(list(KIND))]
    kind = acts["event"].map(KIND).astype(np.int8)
    frame = pd.DataFrame({"user_id": acts["user_id"].values, "item_row": acts["item_id"].map(item_row).values,
                          "session_id": acts["session_id"].values, "ts": acts["ts"].values, "kind": kind.values})
    if frame["item_row"].isna().any():
        raise ValueError("actions reference items missing from the item table")
    frame["item_row"] = frame["item_row"].astype(np.int64)
    keys = ["user_id", "item_row", "session_id"]
    if cuts:
        frame["period"] = np.searchsorted(np.asarray(cuts, np.int64), frame["ts"].values, side="right")
        keys.append("period")
    grouped = frame.groupby(keys, sort=False)
    out = grouped.agg(ts=("ts", "min"), kind=("kind", "max")).reset_index().drop(columns="period", errors="ignore")
    return out.sort_values(["user_id", "ts", "item_row"], kind="stable").reset_index(drop=True)


class ActionLog:
    """Actions sorted by (user, ts) with the per-action running aggregates a state needs."""

    def __init__(self, actions: pd.DataFrame, item_category: np.ndarray | None, item_rel_price: np.ndarray | None):
        a = actions.sort_values(["user_id", "ts", "item_row"], kind="stable")
        self.user = a["user_id"].values.astype(np.int64)
        self.ts = a["ts"].values.astype(np.int64)
        self.row = a["item_row"].values.astype(np.int64)
        self.kind = a["kind"].values.astype(np.int8)
        self.session = a["session_id"].values.astype(np.int64) if "session_id" in a else np.zeros(len(a), np.int64)
        self.users, self.start, dense = np.unique(self.user, return_index=True, return_inverse=True)
        if len(self.ts) and (self.ts.min() < 0 or self.ts.max() > TS_LIMIT):
            raise ValueError(f"action timestamps must be in 0..{TS_LIMIT} unix seconds")
        self._keys = dense.astype(np.int64) * (TS_LIMIT + 1) + self.ts
        self.cum_pos = np.r_[0, np.cumsum(self.kind >= POSITIVE_KIND)]
        self.category = None if item_category is None else item_category[self.row]
        self.cum_price = None
        if item_rel_price is not None:
            self.cum_price = np.r_[0.0, np.cumsum(item_rel_price[self.row])]
        self.leader = self._running_leader() if self.category is not None else None

    def _running_leader(self) -> np.ndarray:
        """Most frequent category among each user's actions up to and including each one (ties go to
        the latest): counts grow by one, so the leader changes exactly when the current action's
        category count reaches the running maximum."""
        frame = pd.DataFrame({"u": self.user, "c": self.category})
        per_cat = frame.groupby(["u", "c"], sort=False).cumcount().values + 1
        running_max = pd.Series(per_cat).groupby(self.user).cummax().values
        leader = pd.Series(np.where(per_cat == running_max, self.category, -1))
        return leader.where(leader >= 0).groupby(self.user).ffill().fillna(-1).values.astype(np.int64)

    def cut(self, user_id: np.ndarray, at_ts) -> tuple[np.ndarray, np.ndarray]:
        """(first index, end index) of each query's history: the user's actions with ts < at_ts.
        One searchsorted over (dense user index, ts) keys: actions are sorted by both."""
        user_id = np.asarray(user_id, dtype=np.int64)
        at_ts = np.clip(np.broadcast_to(np.asarray(at_ts, dtype=np.int64), user_id.shape), 0, TS_LIMIT)
        if not len(self.users):
            zero = np.zeros(len(user_id), np.int64)
            return zero, zero
        pos = np.searchsorted(self.users, user_id)
        pos_c = np.minimum(pos, len(self.users) - 1)
        known = (pos < len(self.users)) & (self.users[pos_c] == user_id)
        first = np.where(known, self.start[pos_c], 0)
        end = np.searchsorted(self._keys, pos_c.astype(np.int64) * (TS_LIMIT + 1) + at_ts)
        return first, np.where(known, np.maximum(end, first), 0)

    def states(self, user_id: np.ndarray, at_ts, n_seq: int, n_categories: int) -> dict[str, np.ndarray]:
        """The state of each (user, at_ts) query: see the module docstring. Unknown users and users
        without earlier actions get an empty state (activity 0, seq padded, nulls elsewhere)."""
        first, end = self.cut(user_id, at_ts)
        n = end - first
        out: dict[str, np.ndarray] = {"activity": n.astype(np.float64),
                                      "positives": (self.cum_pos[end] - self.cum_pos[first]).astype(np.float64)}
        back = end[:, None] - 1 - np.arange(n_seq)[None, :]
        ok = back >= first[:, None]
        safe = np.clip(back, 0, max(len(self.row) - 1, 0))
        out["seq_rows"] = np.where(ok, self.row[safe] if len(self.row) else -1, -1).astype(np.int64)
        out["seq_kinds"] = np.where(ok, self.kind[safe] if len(self.kind) else 0, 0).astype(np.int64)
        if self.category is not None:
            back_c = end[:, None] - 1 - np.arange(n_categories)[None, :]
            ok_c = back_c >= first[:, None]
            safe_c = np.clip(back_c, 0, max(len(self.row) - 1, 0))
            out["recent_categories"] = np.where(ok_c, self.category[safe_c] if len(self.row) else -1, -1).astype(np.int64)
            out["fav_category"] = np.where(n > 0, self.leader[np.maximum(end - 1, 0)] if len(self.row) else -1, -1)
        if self.cum_price is not None:
            total = self.cum_price[end] - self.cum_price[first]
            out["price_level"] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        return out

    def history_index(self, user_id: np.ndarray, at_ts=NEVER) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, action indices) of every action before at_ts, one CSR row per query, in time order."""
        first, end = self.cut(user_id, at_ts)
        lengths = end - first
        indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        return indptr, np.repeat(first - indptr[:-1], lengths) + np.arange(indptr[-1])

    def history_csr(self, user_id: np.ndarray, at_ts=NEVER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, item rows, kinds) of every action before at_ts, one CSR row per query."""
        indptr, idx = self.history_index(user_id, at_ts)
        return indptr, self.row[idx], self.kind[idx]
