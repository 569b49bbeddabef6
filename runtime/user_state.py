"""One user's history state from their actions, NumPy only: what the online store derives when events
arrive, equal to what `feature_workflows.history.ActionLog.states` computes offline for the same
actions (tests/test_online_store.py replays events and compares them row by row).

An action is one (item, session) pair: its first time and strongest kind (1 view .. 4 purchase),
the offline dedup (`actions_from_events`). Actions are ordered by (time, item row). The state:
activity, positives (click or stronger), the last `n_seq` item rows and kinds, most recent first,
the categories of the last `n_cat` actions, the running favourite category (the most frequent one;
ties go to the category that reached the count last, as offline), the mean relative price, and
every action (rows, kinds) for the seen-item filter and the item-to-item routes.

`pack` / `unpack` turn a state into the bytes the store keeps under one key, so a request reads
a user with one GET. Format 2 also carries the user's attribute and history columns as the query
plan encodes them (`enc_cat`, `enc_cont`; runtime/request_transform.StateEncoder), computed when the
events arrive, so a request does not encode them; format 1 (without them) is still read.
"""

from __future__ import annotations

import numpy as np

POSITIVE_KIND = 2
FORMAT = 2  # the first int64 of a packed state: a store written by another format is not read (1 still is)


def user_state(rows: np.ndarray, kinds: np.ndarray, ts: np.ndarray, category: np.ndarray | None,
               rel_price: np.ndarray | None, n_seq: int, n_cat: int) -> dict[str, np.ndarray]:
    """The state after every given action (any order; sorted here by time, then item row)."""
    rows, kinds, ts = (np.asarray(x, dtype=np.int64) for x in (rows, kinds, ts))
    order = np.lexsort((rows, ts))
    rows, kinds = rows[order], kinds[order]
    n = len(rows)
    back = rows[::-1]
    out: dict[str, np.ndarray] = {
        "activity": np.float64(n), "positives": np.float64((kinds >= POSITIVE_KIND).sum()),
        "seq_rows": _head(back, n_seq, -1), "seq_kinds": _head(kinds[::-1], n_seq, 0),
        "hist_rows": rows, "hist_kinds": kinds.astype(np.int8),
    }
    if category is not None:
        cats = category[rows]
        out["recent_categories"] = _head(cats[::-1], n_cat, -1)
        out["fav_category"] = np.int64(_running_leader(cats))
    if rel_price is not None:
        out["price_level"] = np.float64(rel_price[rows].mean()) if n else np.float64(np.nan)
    return out


def _head(values: np.ndarray, n: int, fill: int) -> np.ndarray:
    """The first n values, padded with `fill` (np.pad costs ten times more on these short arrays)."""
    out = np.full(n, fill, np.int64)
    m = min(n, len(values))
    out[:m] = values[:m]
    return out


def _running_leader(cats: np.ndarray) -> int:
    """The favourite category after the actions in order: the leader changes when an action's category
    count reaches the running maximum (counted over every action, uncategorised ones too; those never
    lead). -1 when no categorised action led."""
    counts: dict[int, int] = {}
    best, leader = 0, -1
    for c in cats.tolist():
        counts[c] = counts.get(c, 0) + 1
        if counts[c] >= best:
            best = counts[c]
            if c >= 0:
                leader = c
    return leader


def pack(state: dict[str, np.ndarray], encoded: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """The state as bytes: int64 header (format, n_seq, n_cat, history length, has categories, has prices, encoded
    categorical and continuous widths), float64 (activity, positives, price_level), int64 (fav_category,
    recent_categories, seq_rows, seq_kinds, hist_rows), int8 hist_kinds, then the encoded user columns
    (int64 enc_cat, float32 enc_cont; none when `encoded` is None)."""
    has_cat, has_price = "recent_categories" in state, "price_level" in state
    recent = state["recent_categories"] if has_cat else np.zeros(0, np.int64)
    enc_cat, enc_cont = (np.zeros(0, np.int64), np.zeros(0, np.float32)) if encoded is None else encoded
    header = np.array([FORMAT, len(state["seq_rows"]), len(recent), len(state["hist_rows"]), has_cat, has_price,
                       len(enc_cat), len(enc_cont)], np.int64)
    floats = np.array([state["activity"], state["positives"], state.get("price_level", np.nan)], np.float64)
    ints = np.concatenate([[state.get("fav_category", -1)], recent, state["seq_rows"], state["seq_kinds"],
                           state["hist_rows"]]).astype(np.int64)
    return (header.tobytes() + floats.tobytes() + ints.tobytes() + np.asarray(state["hist_kinds"], np.int8).tobytes()
            + np.asarray(enc_cat, np.int64).tobytes() + np.asarray(enc_cont, np.float32).tobytes())


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    """`pack`'s inverse (formats 1 and 2); ValueError on bytes of another format or a truncated value."""
    if len(blob) < 72:
        raise ValueError("online state: truncated value")
    fmt = int(np.frombuffer(blob, np.int64, 1)[0])
    width = 8 if fmt == 2 else 6
    if fmt not in (1, 2) or len(blob) < 8 * width + 24:
        raise ValueError(f"online state: format {fmt} of {len(blob)} bytes is not format 1 or {FORMAT}")
    head = np.frombuffer(blob, np.int64, width).tolist()
    _, n_seq, n_cat, n_hist, has_cat, has_price = head[:6]
    n_enc_cat, n_enc_cont = head[6:] if fmt == 2 else (0, 0)
    n_ints = 1 + n_cat + 2 * n_seq + n_hist
    start = 8 * width
    if len(blob) != start + 24 + 8 * n_ints + n_hist + 8 * n_enc_cat + 4 * n_enc_cont:
        raise ValueError(f"online state: format {fmt} of {len(blob)} bytes does not hold the sizes its header names")
    floats = np.frombuffer(blob, np.float64, 3, offset=start)
    ints = np.frombuffer(blob, np.int64, n_ints, offset=start + 24)
    out: dict[str, np.ndarray] = {"activity": floats[0], "positives": floats[1]}
    if has_price:
        out["price_level"] = floats[2]
    at = 1
    if has_cat:
        out["fav_category"] = ints[0]
        out["recent_categories"] = ints[at : at + n_cat]
    at += n_cat
    out["seq_rows"], out["seq_kinds"] = ints[at : at + n_seq], ints[at + n_seq : at + 2 * n_seq]
    out["hist_rows"] = ints[at + 2 * n_seq :]
    end = start + 24 + 8 * n_ints
    out["hist_kinds"] = np.frombuffer(blob, np.int8, n_hist, offset=end)
    if fmt == 2 and n_enc_cat + n_enc_cont:
        out["enc_cat"] = np.frombuffer(blob, np.int64, n_enc_cat, offset=end + n_hist)
        out["enc_cont"] = np.frombuffer(blob, np.float32, n_enc_cont, offset=end + n_hist + 8 * n_enc_cat)
    return out
