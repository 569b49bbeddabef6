"""The features stage's output as training needs it (read from disk, checked by manifest).

`FeatureData` holds the item table, the actions, the request-time plan and the user attributes,
streams the two-tower's training rows from parquet, and builds model inputs for any set of users
from any set of actions (`queries`) with the same code the server runs per request
(`runtime.request_transform`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from feature_workflows.history import NEVER, POSITIVE_KIND, ActionLog, context_from_ts
from runtime.request_transform import TransformPlan, UserStore, raw_rows
from shoprec.manifest import verify_manifest

NULL_CODE = 1  # Categorify's null code: the "unknown" context


class FeatureData:
    def __init__(self, features_dir: str | Path):
        self.dir = Path(features_dir)
        verify_manifest(self.dir, ["schema.json", "serving/item_table.npz", "serving/user_store.npz", "train.parquet",
                                   "actions.parquet", "serving/query_plan.json", "serving/query_vocab.npz"])
        self.schema = json.loads((self.dir / "schema.json").read_text())
        with np.load(self.dir / "serving" / "item_table.npz", allow_pickle=False) as npz:
            self.items = {k: npz[k] for k in npz.files}
        self.item_cat = self.items["item_cat"]
        self.item_cont = self.items["item_cont"]
        self.item_codes = self.item_cat[:, 0]
        self.popular_rows = self.items["popular_rows"]
        self.plan = TransformPlan.load(self.dir / "serving" / "query_plan.json", self.dir / "serving" / "query_vocab.npz")
        self.store = UserStore.load(self.dir / "serving" / "user_store.npz")
        self.actions = pd.read_parquet(self.dir / "actions.parquet")
        s = self.schema
        self.user_cat_cols, self.user_cont_cols = s["query_cat"], s["query_cont"]
        self.user_card = [int(s["query_cardinalities"][c]) for c in self.user_cat_cols]
        vocabs = s["query_vocabularies"]
        self.user_tables = [vocabs.index(v) for v in vocabs]
        self.item_card = [int(s["item_cardinalities"][c]) for c in s["item_cat"]]
        ivocabs = s["item_vocabularies"]
        self.item_tables = [ivocabs.index(v) for v in ivocabs]
        self.context_fields = [self.user_cat_cols.index(c) for c in s["context_columns"]]
        self.seq_len = int(s["sequence_length"])
        self.category = self.items["category_code"]
        self.category_names = self.items["category_names"]

    @property
    def n_items(self) -> int:
        return len(self.item_codes)

    def user_fields(self, use_user_id: bool) -> list[int]:
        return [i for i, c in enumerate(self.user_cat_cols) if use_user_id or c != "user_id"]

    def train_batches(self, batch_size: int, folds: tuple[int, ...], shuffle_seed: int | None = None,
                      buffer_rows: int = 262_144, sample_rate: float = 1.0, extra_columns: tuple[str, ...] = ()):
        """Two-tower rows (positive train actions of the given folds) as dicts of arrays, shuffled within
        a bounded buffer so memory stays flat at any size; with sample_rate < 1 a random share of them
        (another one for every seed). `extra_columns`: more of train.parquet's columns (`has_row_columns`)."""
        cols = self.user_cat_cols + self.user_cont_cols + self.seq_columns() + ["item_row", "fold", *extra_columns]
        pf = pq.ParquetFile(self.dir / "train.parquet")
        rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        sampler = rng if rng is not None else np.random.default_rng(0)  # one stream for the whole pass
        pending, n_pending = [], 0

        def flush(parts):
            merged = {c: np.concatenate([p[c] for p in parts]) for c in cols}
            n = len(merged["item_row"])
            order = rng.permutation(n) if rng is not None else np.arange(n)
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                yield {c: v[idx] for c, v in merged.items()}

        for rb in pf.iter_batches(batch_size=65_536, columns=cols):
            part = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in cols}
            keep = np.isin(part["fold"], folds)
            if sample_rate < 1.0:
                keep &= sampler.random(len(keep)) < sample_rate
            pending.append({c: v[keep] for c, v in part.items()})
            n_pending += int(keep.sum())
            if n_pending >= buffer_rows:
                yield from flush(pending)
                pending, n_pending = [], 0
        if n_pending:
            yield from flush(pending)

    def has_row_columns(self, names) -> bool:
        """Whether train.parquet holds these columns (features of an older `shoprec features` may not)."""
        return set(names) <= set(pq.ParquetFile(self.dir / "train.parquet").schema_arrow.names)

    def seq_columns(self) -> list[str]:
        return [f"seq_{i}" for i in range(1, self.seq_len + 1)] + [f"seq_kind_{i}" for i in range(1, self.seq_len + 1)]

    def arrays(self, batch: dict) -> tuple[np.ndarray, ...]:
        """(user_cat, user_cont, seq, seq_kinds) of a batch of training rows."""
        cat = np.stack([batch[c] for c in self.user_cat_cols], 1).astype(np.int64)
        cont = np.stack([batch[c] for c in self.user_cont_cols], 1).astype(np.float32)
        seq = np.stack([batch[f"seq_{i}"] for i in range(1, self.seq_len + 1)], 1).astype(np.int64)
        kinds = np.stack([batch[f"seq_kind_{i}"] for i in range(1, self.seq_len + 1)], 1).astype(np.int64)
        return cat, cont, seq, kinds

    def action_log(self, actions: pd.DataFrame) -> ActionLog:
        """The history machinery of the features stage over `actions` (any subset of them)."""
        rel_price = self.items["rel_price"] if len(self.items["rel_price"]) else None
        category = self.category if (self.category >= 0).any() else None
        return ActionLog(actions, category, rel_price)

    def queries(self, user_ids: np.ndarray, log: ActionLog, at_ts=NEVER, hour=None, weekday=None, device=None) -> dict:
        """Model inputs for each user from the actions in `log` before `at_ts` (the server's view of them)
        and the given context (None: unknown), plus their history as CSR for the recall routes."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        state = log.states(user_ids, at_ts, self.seq_len, int(self.schema["recent_categories"]))
        rows = self.store.lookup(user_ids)
        raw = raw_rows(self.schema["query_spec"], state, self.store.attrs(user_ids, rows), self.category_names,
                       hour, weekday, device)
        cat, cont = self.plan.pack(self.plan.transform(raw))
        seq = np.where(state["seq_rows"] >= 0, self.item_codes[np.maximum(state["seq_rows"], 0)], 0)
        indptr, hist_rows, hist_kinds = log.history_csr(user_ids, at_ts)
        return {"user_cat": cat, "user_cont": cont, "seq": seq.astype(np.int64), "seq_kinds": state["seq_kinds"],
                "hist_indptr": indptr, "hist_rows": hist_rows, "hist_kinds": hist_kinds}

    def holdout_truth(self, fit: pd.DataFrame, holdout: pd.DataFrame, max_users: int, seed: int):
        """Users with a positive in `holdout` on an item they did not act on in `fit`, at most max_users
        (a random subset), their truth {item row: gain} and their context (first holdout action)."""
        pos = holdout[holdout["kind"] >= POSITIVE_KIND]
        seen = pd.MultiIndex.from_arrays([fit["user_id"].values, fit["item_row"].values])
        fresh = ~pd.MultiIndex.from_arrays([pos["user_id"].values, pos["item_row"].values]).isin(seen)
        pos = pos[fresh]
        users = np.unique(pos["user_id"].values)
        if len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        pos = pos[pos["user_id"].isin(users)]
        gain = np.where(pos["kind"].values >= 4, 2.0, 1.0)
        truth: dict[int, dict[int, float]] = {int(u): {} for u in users}
        for u, r, g in zip(pos["user_id"].values, pos["item_row"].values, gain):
            truth[int(u)][int(r)] = max(truth[int(u)].get(int(r), 0.0), float(g))
        first = holdout[holdout["user_id"].isin(users)].sort_values("ts").drop_duplicates("user_id").set_index("user_id")
        ts = first.loc[users, "ts"].values
        return users, [truth[int(u)] for u in users], ts


def context_of(ts: np.ndarray, dropout: float, rng: np.random.Generator) -> tuple:
    """(hour, weekday) from timestamps, each query's context unknown with probability `dropout`."""
    hour, weekday = context_from_ts(ts)
    drop = rng.random(len(ts)) < dropout
    return np.where(drop, np.nan, hour), np.where(drop, np.nan, weekday)
