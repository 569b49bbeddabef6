"""Request-time feature transform: executes an exported workflow plan with NumPy only.

This is what the Triton `feature_transform` step runs. It imports neither NVTabular nor pandas
and loads no pickles (vocabularies come from an .npz opened with allow_pickle=False), so the
serving environment is free of the 2023 Merlin pins. Its outputs equal `Workflow.transform` on
the same rows (tests/test_request_transform.py checks that over many rows, unknown and null
values included).
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

    def _categorify(self, values: np.ndarray, null: np.ndarray, op: dict) -> np.ndarray:
        vocab, codes = self._vocab[op["vocab"]]
        if vocab.dtype.kind in "US":
            probe = np.where(null, "", values).astype(str) if values.dtype.kind == "O" else values.astype(str)
        else:
            probe = np.where(null, 0, values).astype(vocab.dtype) if values.dtype.kind == "O" else values.astype(vocab.dtype)
        idx = np.searchsorted(vocab, probe)
        idx_c = np.minimum(idx, len(vocab) - 1)
        found = (idx < len(vocab)) & (vocab[idx_c] == probe)
        out = np.where(found, codes[idx_c], op["oov_code"])
        return np.where(null, op["null_code"], out).astype(np.int64)

    def transform(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """raw: source column -> 1-D array (NaN or None marks a null). Returns output columns."""
        missing = [c for c in self.inputs if c not in raw]
        if missing:
            raise KeyError(f"request is missing input column(s) {missing}")
        out = {}
        for col in self.columns:
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

    def pack(self, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(categorical int64 [B, F_cat], continuous float32 [B, F_cont]) in the plan's column order."""
        n = len(next(iter(columns.values())))
        cat = np.stack([columns[c] for c in self.cat_names], axis=1) if self.cat_names else np.zeros((n, 0), np.int64)
        cont = np.stack([columns[c] for c in self.cont_names], axis=1) if self.cont_names else np.zeros((n, 0), np.float32)
        return cat.astype(np.int64, copy=False), cont.astype(np.float32, copy=False)
