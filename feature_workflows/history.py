"""Point-in-time user history: what a feature store would know about a user at a moment.

For every click, the user's state *after* it (last N clicked items, the categories of the last M
clicks, most-clicked category so far, number of clicks so far, mean relative price of the clicks).
A row at time t sees the state after the user's last click strictly before t, so no row sees its
own future.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

HOUR = 3600
DAY = 86_400


def context_from_ts(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hour 0-23, weekday 0=Monday) in UTC, from unix seconds."""
    ts = np.asarray(ts, dtype=np.int64)
    return (ts // HOUR) % 24, ((ts // DAY) + 3) % 7  # 1970-01-01 was a Thursday


def recent_item_columns(n: int) -> list[str]:
    return [f"recent_item_{i}" for i in range(1, n + 1)]


def recent_category_columns(n: int) -> list[str]:
    return [f"recent_category_{i}" for i in range(1, n + 1)]


def click_states(clicks: pd.DataFrame, n_recent: int, n_recent_categories: int) -> pd.DataFrame:
    """clicks: user_id, item_id, ts, category, rel_price (log price minus its category's mean log
    price). Returns the state after each click, sorted by ts."""
    c = clicks.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    g = c.groupby("user_id", sort=False)
    out = pd.DataFrame({"user_id": c["user_id"].values, "ts": c["ts"].values})
    for i, col in enumerate(recent_item_columns(n_recent)):
        out[col] = (c["item_id"] if i == 0 else g["item_id"].shift(i)).astype("float64").values
    # the categories of the last clicks: a profile of the user's mix of interests, not only its mode
    for i, col in enumerate(recent_category_columns(n_recent_categories)):
        out[col] = (c["category"] if i == 0 else g["category"].shift(i)).values
    out["activity"] = (g.cumcount() + 1).astype("float64").values
    # budget or premium taste: mean relative price of the clicks so far
    out["price_level"] = (g["rel_price"].cumsum() / out["activity"].values).astype("float64").values
    # most-clicked category so far: counts only grow by one, so the leader changes exactly when
    # the current click's category count reaches the running maximum (ties go to the latest)
    per_cat = c.groupby(["user_id", "category"], sort=False).cumcount() + 1
    running_max = per_cat.groupby(c["user_id"]).cummax()
    leader = c["category"].where(per_cat.values == running_max.values)
    out["fav_category"] = leader.groupby(c["user_id"]).ffill().values
    return out.sort_values("ts", kind="stable").reset_index(drop=True)


def attach_history(rows: pd.DataFrame, states: pd.DataFrame) -> pd.DataFrame:
    """Join each row (user_id, ts) to the user's state strictly before ts."""
    order = np.argsort(rows["ts"].values, kind="stable")
    left = rows.iloc[order]
    merged = pd.merge_asof(left, states, on="ts", by="user_id", allow_exact_matches=False, direction="backward")
    merged.index = rows.index[order]
    return merged.sort_index()


def snapshot(states: pd.DataFrame, at_ts: int) -> pd.DataFrame:
    """Each user's latest state strictly before `at_ts` (what serving knows at that moment)."""
    before = states[states["ts"] < at_ts]
    return before.groupby("user_id", sort=False).tail(1).drop(columns="ts").reset_index(drop=True)
