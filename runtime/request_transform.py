"""Request-time feature transform: the user store and an exported workflow plan, NumPy only.

This is what the Triton `feature_transform` step runs, and what the offline stages use to build
the same rows (the ranker's queries, the evaluation's users). It imports neither NVTabular nor
pandas and loads no pickles (arrays come from .npz files opened with allow_pickle=False), so the
serving environment is free of the 2023 Merlin pins. `TransformPlan.transform` equals
`Workflow.transform` on the same rows (tests/test_features.py checks that over many rows,
unknown and null values included).

The user store holds, per user, the raw attributes and the history state of
`feature_workflows.history` (summaries, the last N actions, every action for the seen-item filter
and the item-to-item recall route). `raw_rows` turns states into the query workflow's raw input
columns; a missing context is null, the same "unknown" the training rows hold when context is
dropped out, never the server's clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _null_mask(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and v != v) for v in values], dtype=bool)
    return np.zeros(values.shape, dtype=bool)


class TransformPlan:
    """A fitted workflow's statistics, executable on dicts of NumPy columns."""

    def __init__(self, plan: dict, arrays: dict[str, np.ndarray]):
        if plan.get("format") != "shoprec-transform-plan/1":
            raise ValueError(f"unknown plan format {plan.get('format')!r}")
        self.plan = plan
        self.columns = plan["columns"]
        self.cat_names: list[str] = plan["cat"]
        self.cont_names: list[str] = plan["cont"]
        self.inputs: dict[str, str] = plan["inputs"]
        self._vocab = {}
        self._tables: dict[str, dict] = {}
        for col in self.columns:
            for op in col["ops"]:
                if op["type"] == "categorify" and op["vocab"] not in self._vocab:
                    self._vocab[op["vocab"]] = (arrays[f"{op['vocab']}__values"], arrays[f"{op['vocab']}__codes"])
        self.cardinalities = {c["name"]: c["cardinality"] for c in self.columns if c["cardinality"]}

    @classmethod
    def load(cls, plan_path: str | Path, arrays_path: str | Path) -> "TransformPlan":
        plan = json.loads(Path(plan_path).read_text())
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(plan, arrays)

    SMALL_BATCH = 16  # up to this many values, a string column is looked up in a dict (no NumPy call overhead)

    def _categorify(self, values: np.ndarray, null: np.ndarray, op: dict) -> np.ndarray:
        vocab, codes = self._vocab[op["vocab"]]
        if vocab.dtype.kind in "US" and values.dtype.kind in "OU" and len(values) <= self.SMALL_BATCH:
            table = self._tables.get(op["vocab"])
            if table is None:  # the first occurrence wins, as searchsorted finds it
                table = self._tables[op["vocab"]] = dict(zip(reversed(vocab.tolist()), reversed(codes.tolist())))
            oov, null_code = op["oov_code"], op["null_code"]
            return np.array([null_code if n else table.get(str(v), oov) for v, n in zip(values.tolist(), null.tolist())],
                            dtype=np.int64)
        if vocab.dtype.kind in "US":
            probe = np.where(null, "", values).astype(str) if values.dtype.kind == "O" else values.astype(str)
        else:
            probe = np.where(null, 0, values).astype(vocab.dtype) if values.dtype.kind == "O" else values.astype(vocab.dtype)
        idx = np.searchsorted(vocab, probe)
        idx_c = np.minimum(idx, len(vocab) - 1)
        found = (idx < len(vocab)) & (vocab[idx_c] == probe)
        out = np.where(found, codes[idx_c], op["oov_code"])
        return np.where(null, op["null_code"], out).astype(np.int64)

    def transform(self, raw: dict[str, np.ndarray], only: set[str] | None = None) -> dict[str, np.ndarray]:
        """raw: source column -> 1-D array (NaN or None marks a null). Returns output columns (those named in
        `only`, else all)."""
        columns = self.columns if only is None else [c for c in self.columns if c["name"] in only]
        missing = sorted({c["source"] for c in columns} - set(raw))
        if missing:
            raise KeyError(f"request is missing input column(s) {missing}")
        out = {}
        for col in columns:
            values = np.asarray(raw[col["source"]])
            null = _null_mask(values)
            for op in col["ops"]:
                kind = op["type"]
                if kind == "categorify":
                    values = self._categorify(values, null, op)
                    null = np.zeros(values.shape, dtype=bool)
                    continue
                x = values.astype(np.float64) if values.dtype.kind != "O" else np.where(null, np.nan, values).astype(np.float64)
                if kind == "fill":
                    x = np.where(np.isnan(x), op["value"], x)
                    null = np.zeros(x.shape, dtype=bool)
                elif kind == "log1p":
                    x = np.log(x.astype(np.float32) + 1)
                elif kind == "normalize":
                    x = (x - op["mean"]) / op["std"] if op["std"] > 0 else x - op["mean"]
                elif kind == "clip":
                    x = np.clip(x, op["min"], op["max"])
                elif kind == "bucketize":
                    x = np.digitize(x, np.asarray(op["boundaries"]), right=False)
                else:
                    raise ValueError(f"plan op {kind!r} is not executable")
                values = x
            out[col["name"]] = values.astype(col["dtype"])
        return out

    def pack(self, columns: dict[str, np.ndarray], cat_names: list[str] | None = None,
             cont_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(categorical int64 [B, F_cat], continuous float32 [B, F_cont]) in the plan's column order (or the
        order of the names given)."""
        cat_names = self.cat_names if cat_names is None else cat_names
        cont_names = self.cont_names if cont_names is None else cont_names
        n = len(next(iter(columns.values())))
        cat = np.stack([columns[c] for c in cat_names], axis=1) if cat_names else np.zeros((n, 0), np.int64)
        cont = np.stack([columns[c] for c in cont_names], axis=1) if cont_names else np.zeros((n, 0), np.float32)
        return cat.astype(np.int64, copy=False), cont.astype(np.float32, copy=False)


class UserColumns:
    """The plan's output columns split into the user's (attributes and history state: encoded once per
    snapshot user, `encode_users`) and the request context's (hour, weekday, device: encoded per request),
    with where each sits in the packed matrices."""

    def __init__(self, plan: TransformPlan, spec: dict):
        context = set(spec["context"])
        self.plan, self.spec = plan, spec
        self.cat = [c for c in plan.cat_names if c not in context]
        self.cont = [c for c in plan.cont_names if c not in context]
        self.ctx_cat = [c for c in plan.cat_names if c in context]
        self.ctx_cont = [c for c in plan.cont_names if c in context]
        self.user = set(self.cat + self.cont)
        self.context = set(self.ctx_cat + self.ctx_cont)
        pos = lambda names, of: np.array([names.index(c) for c in of], np.int64)  # noqa: E731
        self._pos = (pos(plan.cat_names, self.cat), pos(plan.cat_names, self.ctx_cat),
                     pos(plan.cont_names, self.cont), pos(plan.cont_names, self.ctx_cont))

    def encode(self, state: dict[str, np.ndarray], attrs: dict[str, np.ndarray],
               category_names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The user columns of B users' states and attributes (as `raw_rows` takes them), packed:
        (int64 [B, len(cat)], float32 [B, len(cont)])."""
        raw = raw_rows(self.spec, state, attrs, category_names)
        return self.plan.pack(self.plan.transform(raw, only=self.user), self.cat, self.cont)

    def assemble(self, user_cat: np.ndarray, user_cont: np.ndarray, context_raw: dict[str, np.ndarray]):
        """The plan's packed (cat, cont) from encoded user columns and the raw context columns."""
        ctx_cat, ctx_cont = self.plan.pack(self.plan.transform(context_raw, only=self.context), self.ctx_cat, self.ctx_cont)
        n = len(user_cat)
        cat_u, cat_c, cont_u, cont_c = self._pos
        cat = np.empty((n, len(self.plan.cat_names)), np.int64)
        cat[:, cat_u], cat[:, cat_c] = user_cat, ctx_cat
        cont = np.empty((n, len(self.plan.cont_names)), np.float32)
        cont[:, cont_u], cont[:, cont_c] = user_cont, ctx_cont
        return cat, cont


class StateEncoder:
    """The user columns of one user's live state, encoded when their events arrive (the online store keeps them
    beside the state, runtime/user_state.pack): what the feature step computes from that state and the
    snapshot's attributes, without the context."""

    def __init__(self, plan: TransformPlan, spec: dict, store: "UserStore", category_names: np.ndarray):
        self.columns, self.store, self.category_names = UserColumns(plan, spec), store, category_names

    def __call__(self, user_ids: list[int], states: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """(int64 [n, len(cat)], float32 [n, len(cont)]) of n users' states (`runtime.user_state.user_state`),
        encoded in one batch."""
        uid = np.asarray(user_ids, np.int64)
        keys = [k for k in states[0] if k not in ("hist_rows", "hist_kinds")]
        batch = {k: np.stack([np.asarray(s[k]) for s in states]) for k in keys}
        return self.columns.encode(batch, self.store.attrs(uid, self.store.lookup(uid)), self.category_names)


def encode_users(plan: TransformPlan, spec: dict, store: "UserStore", category_names: np.ndarray, n_seq: int,
                 chunk: int = 100_000) -> dict[str, np.ndarray]:
    """The user columns of every snapshot user, encoded once by `export` (the bundle's user_store.npz: `enc__cat` /
    `enc__cont`): what the feature step would compute per request from the same state and attributes, without
    the context."""
    cols = UserColumns(plan, spec)
    n = len(store.user_id)
    cat = np.zeros((n, len(cols.cat)), np.int64)
    cont = np.zeros((n, len(cols.cont)), np.float32)
    for lo in range(0, n, chunk):
        rows = np.arange(lo, min(lo + chunk, n))
        cat[rows], cont[rows] = cols.encode(store.state(rows, n_seq), store.attrs(store.user_id[rows], rows), category_names)
    small = cat.size == 0 or (cat.min() >= np.iinfo(np.int32).min and cat.max() <= np.iinfo(np.int32).max)
    return {"enc__cat": cat.astype(np.int32) if small else cat, "enc__cont": cont,
            "enc__cat_columns": np.array(cols.cat, dtype=str), "enc__cont_columns": np.array(cols.cont, dtype=str)}


def raw_rows(spec: dict, state: dict[str, np.ndarray], attrs: dict[str, np.ndarray], category_names: np.ndarray,
             hour=None, weekday=None, device=None) -> dict[str, np.ndarray]:
    """The query workflow's raw input columns for n queries.

    spec: `workflows.query_spec` (saved in the features schema); state: `ActionLog.states` or the
    store's rows; attrs: user_id and raw attribute columns (object arrays, None = null; floats, NaN
    = null); category_names: category code -> name; context arrays or None (null)."""
    n = len(attrs["user_id"])
    raw: dict[str, np.ndarray] = {"user_id": np.asarray(attrs["user_id"], dtype=np.int64)}
    for col in spec["user_cat"] + spec["user_num"]:
        raw[col] = attrs[col.removeprefix("user_")]
    raw.update(history_raw(spec, state, category_names))
    raw.update(context_raw(n, hour, weekday, device))
    return raw


def history_raw(spec: dict, state: dict[str, np.ndarray], category_names: np.ndarray) -> dict[str, np.ndarray]:
    """The query workflow's raw history columns (recent categories, favourite category, activity, ...) of n
    states, as `raw_rows` (category codes -1: null)."""
    names = np.asarray(category_names, dtype=object)

    def cat_name(codes):
        codes = np.asarray(codes, dtype=np.int64)
        if (codes >= len(names)).any():  # the store and the item table come from one export: never a neighbour's name
            raise ValueError(f"user store: category code {int(codes.max())} outside the item table's {len(names)} "
                             "categories; the bundle mixes exports (re-run `shoprec export`)")
        return np.where(codes >= 0, names[np.maximum(codes, 0)] if len(names) else None, None)

    raw: dict[str, np.ndarray] = {}
    for i, col in enumerate(c for c in spec["history_cat"] if c.startswith("recent_category_")):
        raw[col] = cat_name(state["recent_categories"][:, i])
    if "fav_category" in spec["history_cat"]:
        raw["fav_category"] = cat_name(state["fav_category"])
    for col in spec["history_num"]:
        raw[col] = np.asarray(state[col], dtype=np.float64)
    return raw


def context_raw(n: int, hour=None, weekday=None, device=None) -> dict[str, np.ndarray]:
    """The query workflow's raw context columns for n queries (None: null, the "unknown" of training)."""
    return {"hour": np.full(n, np.nan) if hour is None else np.asarray(hour, dtype=np.float64),
            "weekday": np.full(n, np.nan) if weekday is None else np.asarray(weekday, dtype=np.float64),
            "device": np.full(n, None, dtype=object) if device is None else np.asarray(device, dtype=object)}


def find_rows(keys: np.ndarray, values, order: np.ndarray | None = None) -> np.ndarray:
    """Row of each value in `keys` (-1 where absent). `keys` sorted, or `order` = its argsort."""
    values = np.asarray(values, dtype=np.int64)
    if not len(keys):
        return np.full(len(values), -1, np.int64)
    at = np.searchsorted(keys, values, sorter=order)
    at_c = np.minimum(at, len(keys) - 1)
    rows = at_c if order is None else order[at_c]
    return np.where((at < len(keys)) & (keys[rows] == values), rows, -1).astype(np.int64)


class UserStore:
    """The serving snapshot of every known user (user_store.npz), looked up by raw user id.

    Arrays: user_id (sorted), attr__<col> (+ attr__<col>__null), the state columns, seq_rows /
    seq_kinds [U, N], the action history as CSR (hist_indptr, hist_rows, hist_kinds), and the user columns
    encoded once (`encode_users`: enc__cat, enc__cont and their column names; absent in older stores)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.user_id = arrays["user_id"]
        self.arrays = arrays
        self.attr_names = [k[len("attr__"):] for k in arrays if k.startswith("attr__") and not k.endswith("__null")]

    @classmethod
    def load(cls, path: str | Path) -> "UserStore":
        with np.load(path, allow_pickle=False) as npz:
            return cls({k: npz[k] for k in npz.files})

    def encoded(self, cols: UserColumns) -> bool:
        """Whether the store holds the user columns encoded once, for exactly these columns."""
        a = self.arrays
        return ("enc__cat" in a and a["enc__cat_columns"].tolist() == cols.cat
                and a["enc__cont_columns"].tolist() == cols.cont and len(a["enc__cat"]) == len(self.user_id))

    def lookup(self, user_id: np.ndarray) -> np.ndarray:
        """Store row of each user id, -1 when the store does not know the user."""
        return find_rows(self.user_id, user_id)

    def attrs(self, user_id: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
        known = rows >= 0
        safe = np.maximum(rows, 0)
        out = {"user_id": np.asarray(user_id, dtype=np.int64)}
        for col in self.attr_names:
            values = self.arrays[f"attr__{col}"][safe] if len(self.user_id) else np.zeros(len(rows))
            null = ~known | (self.arrays[f"attr__{col}__null"][safe] if len(self.user_id) else True)
            out[col] = np.where(null, np.nan, values) if values.dtype.kind == "f" else np.where(null, None, values.astype(object))
        return out

    def state(self, rows: np.ndarray, n_seq: int) -> dict[str, np.ndarray]:
        """History state of each store row (-1: the empty state of an unknown user)."""
        known = rows >= 0
        safe = np.maximum(rows, 0)
        a = self.arrays
        has = len(self.user_id) > 0
        out = {}
        for col in ("activity", "positives", "price_level"):
            if col in a:
                out[col] = np.where(known, a[col][safe], 0.0 if col != "price_level" else np.nan) if has else np.zeros(len(rows))
        for col, pad in (("recent_categories", -1), ("seq_rows", -1), ("seq_kinds", 0)):
            if col in a:
                width = a[col].shape[1] if col != "recent_categories" else a[col].shape[1]
                out[col] = np.where(known[:, None], a[col][safe], pad) if has else np.full((len(rows), width), pad)
        if "fav_category" in a:
            out["fav_category"] = np.where(known, a["fav_category"][safe], -1) if has else np.full(len(rows), -1)
        out["seq_rows"], out["seq_kinds"] = out["seq_rows"][:, :n_seq], out["seq_kinds"][:, :n_seq]
        return out

    def history(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, kinds) of every action of one store row (empty for -1)."""
        if row < 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int8)
        a = self.arrays
        lo, hi = a["hist_indptr"][row], a["hist_indptr"][row + 1]
        return a["hist_rows"][lo:hi], a["hist_kinds"][lo:hi]
