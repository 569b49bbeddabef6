"""Request-time transform cost: NVTabular Workflow.transform vs the exported NumPy plan, same rows.

    .venv/bin/python -m benchmarks.transform_bench [--artifacts artifacts]

Writes benchmarks/results/transform_latency.json (median of repeated calls, batch 1 and 256).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from shoprec.config import REPO_ROOT
from shoprec.manifest import verify_manifest

from .machine import describe


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main(argv=None) -> dict:
    warnings.filterwarnings("ignore")
    import nvtabular as nvt

    from feature_workflows import nvt_compat
    from feature_workflows.workflows import query_input_columns
    from runtime.request_transform import TransformPlan, UserStore, raw_rows

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "transform_latency.json"))
    args = p.parse_args(argv)
    feat = Path(args.artifacts) / "features"
    verify_manifest(feat)  # Workflow.load unpickles: only bytes the features stage wrote
    schema = json.loads((feat / "schema.json").read_text())
    wf = nvt.Workflow.load(str(feat / "workflows" / "query"))
    plan = TransformPlan.load(feat / "serving" / "query_plan.json", feat / "serving" / "query_vocab.npz")
    store = UserStore.load(feat / "serving" / "user_store.npz")
    with np.load(feat / "serving" / "item_table.npz", allow_pickle=False) as z:
        names = z["category_names"]
    results = {}
    for batch in (1, 256):
        users = store.user_id[np.arange(batch) % len(store.user_id)]
        rows = store.lookup(users)
        raw = raw_rows(schema["query_spec"], store.state(rows, schema["sequence_length"]), store.attrs(users, rows), names,
                       np.full(batch, 20.0), np.full(batch, 4.0), np.full(batch, "mobile", dtype=object))
        frame = pd.DataFrame({c: raw[c] for c in query_input_columns(schema["query_spec"])})
        nvt_ms = _median_ms(lambda: nvt_compat.transform(wf, frame), 30)
        plan_ms = _median_ms(lambda: plan.pack(plan.transform(raw)), 300)
        results[f"batch_{batch}"] = {"workflow_transform_ms": round(nvt_ms, 3), "numpy_plan_ms": round(plan_ms, 4),
                                     "speedup": round(nvt_ms / plan_ms, 1)}
    report = {"command": "python -m benchmarks.transform_bench", "machine": f"{describe()}, no GPU",
              "python": platform.python_version(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
