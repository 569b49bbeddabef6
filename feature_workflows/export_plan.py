"""Turn a fitted NVTabular workflow into a plan the server can execute with NumPy alone.

The plan is *derived* from the saved workflow, never written by hand: we walk the workflow's
graph, and for each output column record its source column and the fitted statistics of each
op on the way (Categorify vocabularies read from the op's own parquet files, Normalize
means/stds, FillMissing/FillMedian values, Bucketize boundaries, Clip bounds). Ops we do not
know how to execute raise `UnsupportedOp` at export time, not at serving time.

Output: plan.json (structure, scalars) + vocab.npz (vocabulary arrays, no pickles).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

# NVTabular 23.08 Categorify reserves 0 (padding), 1 (null) and 2 (out-of-vocabulary);
# the parity test (tests/test_request_transform.py) fails if this ever changes.
NULL_CODE = 1
OOV_CODE = 2
_METADATA_OPS = {"AddTags", "AddMetadata", "AddProperties", "TagAsUserID", "TagAsItemID", "TagAsUserFeatures", "TagAsItemFeatures"}


class UnsupportedOp(ValueError):
    pass


def _vocab(op, col: str) -> tuple[str, np.ndarray, np.ndarray]:
    storage = op.storage_name.get(col, col)
    table = pd.read_parquet(op.categories[storage])
    values = table[storage]
    keep = values.notna().values
    codes = table.index.values[keep].astype(np.int64)
    values = values.values[keep]
    if values.dtype == object:
        values = values.astype(str)
    order = np.argsort(values, kind="stable")
    return storage, values[order], codes[order]


def _op_spec(op, col: str, vocabs: dict) -> dict | None:
    name = type(op).__name__
    if name in _METADATA_OPS:
        return None
    if name == "Categorify":
        storage, values, codes = _vocab(op, col)
        vocabs[storage] = (values, codes)
        return {"type": "categorify", "vocab": storage, "null_code": NULL_CODE, "oov_code": OOV_CODE,
                "cardinality": int(codes.max()) + 1 if len(codes) else OOV_CODE + 1}
    if name == "Normalize":
        return {"type": "normalize", "mean": float(op.means[col]), "std": float(op.stds[col])}
    if name == "LogOp":
        return {"type": "log1p"}
    if name == "FillMissing":
        return {"type": "fill", "value": float(op.fill_val)}
    if name == "FillMedian":
        return {"type": "fill", "value": float(op.medians[col])}
    if name == "Bucketize":
        return {"type": "bucketize", "boundaries": [float(b) for b in op.boundaries(col)]}
    if name == "Clip":
        return {"type": "clip", "min": op.min_value, "max": op.max_value}
    raise UnsupportedOp(f"op {name} on column {col!r} has no NumPy execution in runtime.request_transform")


def _chains(node, vocabs: dict) -> dict[str, tuple[str, list]]:
    op_name = type(node.op).__name__ if node.op is not None else None
    if op_name == "SelectionOp":
        return {c: (c, []) for c in node.output_columns.names}
    merged: dict[str, tuple[str, list]] = {}
    for parent in node.parents_with_dependencies:
        merged.update(_chains(parent, vocabs))
    if op_name in (None, "ConcatColumns", "SubsetColumns"):
        return {c: merged[c] for c in node.output_columns.names}
    out = {}
    for col in node.output_columns.names:
        if col not in merged:
            raise UnsupportedOp(f"op {op_name} creates column {col!r}; only name-preserving ops can be exported")
        source, ops = merged[col]
        spec = _op_spec(node.op, col, vocabs)
        out[col] = (source, ops + ([spec] if spec else []))
    return out


def build_plan(workflow, skip_tags: tuple[str, ...] = ("target",)) -> tuple[dict, dict[str, np.ndarray]]:
    """(plan, arrays) for every output column of a fitted workflow except TARGET-tagged ones."""
    vocabs: dict = {}
    chains = _chains(workflow.output_node, vocabs)
    columns, cat, cont, inputs = [], [], [], {}
    input_schema = workflow.input_schema
    for col in workflow.output_schema:
        tags = sorted(t.value for t in col.tags)
        if any(t in skip_tags for t in tags):
            continue
        source, ops = chains[col.name]
        is_cat = "categorical" in tags or any(o["type"] in ("categorify", "bucketize") for o in ops)
        cardinality = None
        if ops and ops[-1]["type"] == "categorify":
            cardinality = ops[-1]["cardinality"]
        elif any(o["type"] == "bucketize" for o in ops):
            cardinality = len(next(o for o in ops if o["type"] == "bucketize")["boundaries"]) + 1
        dtype = "int64" if is_cat else "float32"
        columns.append({"name": col.name, "source": source, "ops": ops, "dtype": dtype, "tags": tags,
                        "cardinality": cardinality})
        (cat if is_cat else cont).append(col.name)
        src_dtype = input_schema[source].dtype.name if source in input_schema.column_names else "unknown"
        inputs[source] = src_dtype
    arrays = {}
    for storage, (values, codes) in vocabs.items():
        arrays[f"{storage}__values"] = values
        arrays[f"{storage}__codes"] = codes
    plan = {"format": "shoprec-transform-plan/1", "inputs": inputs, "columns": columns, "cat": cat, "cont": cont}
    return plan, arrays


def save_plan(workflow, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    plan, arrays = build_plan(workflow)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / f"{name}_plan.json"
    arrays_path = out_dir / f"{name}_vocab.npz"
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    np.savez(arrays_path, **arrays)
    return plan_path, arrays_path
