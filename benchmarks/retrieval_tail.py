"""How retrieval's cost spreads over users: the retrieval step alone, one user per request, for every sampled
warm user, with the percentiles a tail-latency target reads (p50, p90, p99, max) and how the cost grows
with the user's history (item-to-item scores sum every action's neighbour row).

    .venv/bin/python -m benchmarks.retrieval_tail                       # on ARTIFACTS (`make demo` built them)
    .venv/bin/python -m benchmarks.retrieval_tail --artifacts W/random-8-1-1/artifacts --tag mlls
        # W: `python -m benchmarks.referee_bench --work W` (the product trained on ml-latest-small)

The in-process pipeline (online store off) runs every step before retrieval once per user; retrieval is
then timed `--repeats` times on each user's own inputs and the fastest is kept (a user's cost without
the machine's noise). `--power-users 1000 3000` also times 20 of those users with their history replaced
by that many random catalog items (positives and others mixed): the heavy users a real shop has and a
synthetic one may not; and once more with the same items ordered by category, a taste that moved from
category to category, so that the first categories were last touched thousands of actions ago (their
decayed shares, and the category route's cut scores, subnormal or zero). Run the same command on another commit's checkout to compare code. Writes
benchmarks/results/retrieval_tail[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import publish
from .serving_bench import warm_users

PERCENTILES = (50, 90, 99, 100)


def _fastest_ms(impl, x: dict, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        impl.run(x)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run(artifacts: Path, users: int = 600, repeats: int = 2, seed: int = 2, power_users: tuple[int, ...] = ()) -> dict:
    from runtime.pipeline import Pipeline

    cfg = load_config().replace("serve", online_store="none").serve
    pipe = Pipeline(artifacts / "serving", cfg=cfg)
    pool = warm_users(artifacts)
    ids = np.random.default_rng(seed).choice(pool, min(users, len(pool)), replace=False)
    impl = pipe.steps["retrieval"]
    step = next(s for s in pipe.graph if s.name == "retrieval")
    inputs = []
    for u in ids:
        tensors = pipe.run(pipe.request([int(u)], 10), stop="retrieval")
        inputs.append(impl.check({t.name: tensors.get(step.graph_name(t.name)) for t in step.inputs}))
    for x in inputs[:20]:  # warm
        impl.run(x)
    ms = np.array([_fastest_ms(impl, x, repeats) for x in inputs])
    power = []
    rng = np.random.default_rng(seed)
    n_items = impl.generator.n_items
    category = impl.generator.categories.category
    for size in power_users:
        times, drift = [], []
        for x in inputs[:20]:
            rows = rng.choice(n_items, min(size, n_items), replace=False)[None, :].astype(np.int64)
            kinds = rng.integers(1, 5, rows.shape).astype(np.asarray(x["history_kinds"]).dtype)
            times.append(_fastest_ms(impl, impl.check({**x, "history_rows": rows, "history_kinds": kinds}), repeats))
            by_cat = np.argsort(category[rows[0]], kind="stable")[None, :]
            drift.append(_fastest_ms(impl, impl.check({**x, "history_rows": np.take_along_axis(rows, by_cat, 1),
                                                        "history_kinds": np.take_along_axis(kinds, by_cat, 1)}), repeats))
        power.append({"history": int(min(size, n_items)), "users": len(times), "median_ms": round(float(np.median(times)), 3),
                      "max_ms": round(float(np.max(times)), 3), "by_category_median_ms": round(float(np.median(drift)), 3),
                      "by_category_max_ms": round(float(np.max(drift)), 3)})
    history = np.array([int((np.asarray(x["history_rows"]) >= 0).sum()) for x in inputs])
    slowest = np.argsort(-ms)[:5]
    edges = [0, 50, 200, 500, 1000, int(history.max()) + 1]
    by_history = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (history >= lo) & (history < hi)
        if inside.any():
            by_history.append({"history": f"{lo}-{hi - 1}", "users": int(inside.sum()),
                               "median_ms": round(float(np.median(ms[inside])), 3)})
    return {"artifacts": str(artifacts), "users": len(ids), "repeats": repeats,
            "items": int(impl.generator.n_items), "sparse_tables": bool(impl.generator.sparse),
            "ms": {f"p{p}": round(float(np.percentile(ms, p)), 3) for p in PERCENTILES},
            "mean_ms": round(float(ms.mean()), 3),
            "history": {f"p{p}": int(np.percentile(history, p)) for p in PERCENTILES},
            "corr_ms_history": round(float(np.corrcoef(ms, history)[0, 1]), 3) if history.std() else None,
            "by_history": by_history,
            "slowest": [{"user_id": int(ids[i]), "ms": round(float(ms[i]), 3), "history": int(history[i])} for i in slowest],
            "power_users": power}


def markdown(r: dict) -> list[str]:
    md = [f"# Retrieval per user — `{r['command']}`", "",
          f"Machine: {r['machine']}. Commit {r['commit']}. {r['users']} warm users of {r['artifacts']} "
          f"({r['items']:,} items, {'sparse' if r['sparse_tables'] else 'dense'} per-user tables), one user per "
          f"request, the fastest of {r['repeats']} runs each.", "",
          "| | p50 | p90 | p99 | max | mean |", "|---|---|---|---|---|---|",
          "| retrieval ms | " + " | ".join(str(r["ms"][f"p{p}"]) for p in PERCENTILES) + f" | {r['mean_ms']} |",
          "| history (actions) | " + " | ".join(str(r["history"][f"p{p}"]) for p in PERCENTILES) + " | |", "",
          f"Correlation of a user's time with their history: {r['corr_ms_history']}.", "",
          "| history | users | median ms |", "|---|---|---|"]
    md += [f"| {b['history']} | {b['users']} | {b['median_ms']} |" for b in r["by_history"]]
    md += ["", "Slowest users: " + ", ".join(f"{s['user_id']} ({s['ms']} ms, {s['history']} actions)" for s in r["slowest"]) + "."]
    if r.get("power_users"):
        md += ["", "The same users with a history of random catalog items, in random order and ordered by category (a "
               "taste that moved category by category):", "",
               "| history (actions) | users | median ms | max ms | by category: median ms | max ms |",
               "|---|---|---|---|---|---|"]
        md += [f"| {p['history']} | {p['users']} | {p['median_ms']} | {p['max_ms']} | {p.get('by_category_median_ms', '–')} | "
               f"{p.get('by_category_max_ms', '–')} |" for p in r["power_users"]]
    return md


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--users", type=int, default=600, help="warm users sampled (all of them when fewer)")
    p.add_argument("--repeats", type=int, default=2, help="runs per user; the fastest counts")
    p.add_argument("--power-users", type=int, nargs="*", default=[],
                   help="also: 20 users with a history of this many random items, per size, in random order and "
                        "ordered by category")
    args = p.parse_args(argv)
    if args.users < 2 or args.repeats < 1 or any(n < 1 for n in args.power_users):
        p.error("--users must be >= 2, --repeats >= 1 and --power-users sizes >= 1")
    report = run(Path(args.artifacts).resolve(), args.users, args.repeats, power_users=tuple(args.power_users))
    publish(args.out, "retrieval_tail", args.tag, report, markdown, argv)
    return report


if __name__ == "__main__":
    main()
