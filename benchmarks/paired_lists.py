"""Paired per-user differences between two served runs on one referee split.

    .venv/bin/python -m benchmarks.paired_lists /tmp/rv_work7/ml1m-files/random-8-1-1 \
        /tmp/rv_work8/whole-stars/random-8-1-1

Each folder is one protocol's work folder of `benchmarks.referee_bench` or `benchmarks.referee_variants`:
its `split/` (the referee's train/test/catalog/eval_users_test.csv) and `lists_test.csv` (what the server
returned). Both must hold the same split. `--part valid` compares the valid users' lists instead
(`lists_valid.csv`, truth from valid.csv): the part to choose a setting on, leaving test untouched. Per user of that part, the list is cut as the referee cuts it (catalog
items only, the user's train positives and repeats dropped, then the top 10; ground truth = that part's positives
in the catalog) and scored by training.metrics (the referee's Recall@10 and NDCG@10). Prints A, B and the mean of A - B with its standard
error over users: a paired difference is far tighter than the two means' own standard errors. `--json`
writes the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from training.metrics import mean_se, per_user_ndcg, per_user_recall

POSITIVE = 4  # the referee's positive: rating >= 4
K = 10


def per_user(run: Path, part: str = "test") -> tuple[list[int], dict[str, np.ndarray]]:
    """(evaluated users of `part`, {"Recall@10": [...], "NDCG@10": [...]}) of one run's served lists."""
    split = run / "split"
    train, held = pd.read_csv(split / "train.csv"), pd.read_csv(split / f"{part}.csv")
    catalog = set(pd.read_csv(split / "catalog.csv")["item"])
    users = pd.read_csv(split / f"eval_users_{part}.csv")["user"].tolist()
    truth = held[(held["rating"] >= POSITIVE) & held["item"].isin(catalog)].groupby("user")["item"].apply(set)
    seen = train[train["rating"] >= POSITIVE].groupby("user")["item"].apply(set)
    lists = pd.read_csv(run / f"lists_{part}.csv").sort_values(["user", "rank"]).groupby("user")["item"].apply(list)
    top = np.full((len(users), K), -1, dtype=np.int64)  # raw item ids, -1 = empty slot
    for row, u in enumerate(users):
        drop, kept = seen.get(u, set()), []
        for item in lists.get(u, []):
            if item in catalog and item not in drop and item not in kept:
                kept.append(item)
            if len(kept) == K:
                break
        top[row, : len(kept)] = kept
    g = [truth[u] for u in users]
    return users, {"Recall@10": per_user_recall(top, g, K), "NDCG@10": per_user_ndcg(top, g, K)}


def compare(a: Path, b: Path, part: str = "test") -> dict:
    users_a, ma = per_user(a, part)
    users_b, mb = per_user(b, part)
    if users_a != users_b:
        raise SystemExit(f"paired_lists: {a} and {b} do not hold the same split (their evaluated {part} users differ)")
    out = {"a": str(a), "b": str(b), "part": part, "users": len(users_a)}
    for metric in ma:
        diff, stderr = mean_se(ma[metric] - mb[metric])
        out[metric] = {"a": float(ma[metric].mean()), "b": float(mb[metric].mean()), "diff": diff, "diff_stderr": stderr}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="one protocol's work folder (split/, lists_test.csv)")
    parser.add_argument("b", type=Path, help="another on the same split")
    parser.add_argument("--part", choices=["test", "valid"], default="test",
                        help="whose lists to compare: the test users' (default) or the valid users' (to choose on)")
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    for run in (args.a, args.b):
        for need in (f"split/{args.part}.csv", f"lists_{args.part}.csv"):
            if not (run / need).exists():
                raise SystemExit(f"paired_lists: {run / need} not found (a referee_bench protocol work folder holds it)")
    out = compare(args.a, args.b, args.part)
    for metric in ("Recall@10", "NDCG@10"):
        r = out[metric]
        print(f"{metric}: A {r['a']:.4f}  B {r['b']:.4f}  A - B {r['diff']:+.4f} ± {r['diff_stderr']:.4f} "
              f"({out['users']} {args.part} users)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
