"""Streaming access to the features stage's output (read from disk, checked by manifest)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from shoprec.manifest import verify_manifest


class FeatureData:
    """Transformed splits streamed in batches, plus the in-memory item table (one row per item)."""

    def __init__(self, features_dir: str | Path):
        self.dir = Path(features_dir)
        verify_manifest(self.dir, ["schema.json", "serving/item_table.npz", "train.parquet", "valid.parquet", "test.parquet"])
        self.schema = json.loads((self.dir / "schema.json").read_text())
        with np.load(self.dir / "serving" / "item_table.npz", allow_pickle=False) as npz:
            self.item_cat = npz["item_cat"]
            self.item_cont = npz["item_cont"]
            self.item_ids = npz["item_ids"]
            self.popular_rows = npz["popular_rows"]
        self.user_cat_cols = self.schema["query_cat"]
        self.user_cont_cols = self.schema["query_cont"]
        self.user_card = [int(self.schema["query_cardinalities"][c]) for c in self.user_cat_cols]
        vocabs = self.schema.get("query_vocabularies", self.user_cat_cols)
        self.user_tables = [vocabs.index(v) for v in vocabs]  # fields sharing a vocabulary share a table
        self.item_card = [int(self.schema["item_cardinalities"][c]) for c in self.schema["item_cat"]]

    def user_fields(self, ignore: tuple[str, ...] | list[str]) -> list[int]:
        """Indices of the user categorical columns not matched by any of the `ignore` patterns."""
        for pattern in ignore:
            if not fnmatch.filter(self.user_cat_cols, pattern):
                raise ValueError(f"ignored user feature {pattern!r} matches none of {self.user_cat_cols}")
        return [i for i, c in enumerate(self.user_cat_cols) if not any(fnmatch.fnmatch(c, p) for p in ignore)]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def batches(self, split: str, batch_size: int, columns: list[str] | None = None, where=None,
                shuffle_seed: int | None = None, buffer_rows: int = 262_144):
        """Yield dicts of arrays. Shuffles within a bounded buffer, so memory stays flat at any size."""
        cols = columns or (self.user_cat_cols + self.user_cont_cols + ["item_row", "click", "purchase", "user_id_raw"])
        pf = pq.ParquetFile(self.dir / f"{split}.parquet")
        rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        pending: list[dict] = []
        pending_rows = 0

        def flush(parts):
            merged = {c: np.concatenate([p[c] for p in parts]) for c in cols}
            n = len(merged[cols[0]])
            order = rng.permutation(n) if rng is not None else np.arange(n)
            for s in range(0, n, batch_size):
                idx = order[s : s + batch_size]
                yield {c: v[idx] for c, v in merged.items()}

        read_cols = cols + [c for c in ("click", "purchase") if c not in cols]  # `where` filters on labels
        for rb in pf.iter_batches(batch_size=min(65_536, buffer_rows), columns=read_cols):
            part = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in read_cols}
            mask = where(part) if where is not None else slice(None)
            part = {c: part[c][mask] for c in cols}
            pending.append(part)
            pending_rows += len(part[cols[0]])
            if pending_rows >= buffer_rows:
                yield from flush(pending)
                pending, pending_rows = [], 0
        if pending_rows:
            yield from flush(pending)

    def user_arrays(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        cat = np.stack([batch[c] for c in self.user_cat_cols], 1).astype(np.int64)
        cont = np.stack([batch[c] for c in self.user_cont_cols], 1).astype(np.float32)
        return cat, cont

    def read(self, split: str, columns: list[str], where=None) -> dict:
        parts = list(self.batches(split, 1 << 30, columns, where=where))
        return {c: np.concatenate([p[c] for p in parts]) for c in columns} if parts else {c: np.array([]) for c in columns}
