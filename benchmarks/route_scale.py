"""What the recall routes cost per user against catalog size, with dense per-user tables and with sparse ones
(runtime/sparse_routes.py; the server switches at SPARSE_FROM_ITEMS items).

    .venv/bin/python -m benchmarks.route_scale                    # 2k, 20k, 100k, 1M items (~8 min on 2 cores)
    .venv/bin/python -m benchmarks.route_scale --sizes 100000 --never-bought 0.9 --tag never_bought

SYNTHETIC catalogs, the generator the retrieval step runs (runtime/candidates.py), one thread:
  - item-to-item neighbours as training/cf.py keeps them: min(cf.neighbours, cf.max_entries / items) per item
    (500 at 2k, 200 at 100k, 20 at 1M), random targets and weights;
  - 60 categories, Pareto popularity (shape 1.1) for the popular, trending and category routes; with
    `--never-bought S`, a random share S of the items has popularity 0 (a shop's tail nobody acted on yet:
    every such item of a category ties in the category route);
  - users with 30 actions each, drawn by popularity;
  - the item index: IVF with 4 * sqrt(items) lists and nprobe 8, cheap on purpose so that the routes' own work
    shows (benchmarks/index_scale.py measures the search itself at each size).
Both modes must give the same candidates, features and lists (checked on every size measured in both).
Writes benchmarks/results/route_scale[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import command_line, commit, describe

SIZES = (2_000, 20_000, 100_000, 1_000_000)
DENSE_MAX = 1_000_000  # dense tables are measured up to this many items


def catalog(n_items: int, seed: int = 0, never_bought: float = 0.0):
    import faiss

    from runtime.candidates import CategoryPrior, ItemNeighbours

    cfg = load_config().cf
    rng = np.random.default_rng(seed)
    per = int(max(10, min(cfg.neighbours, cfg.max_entries // n_items)))
    emb = rng.standard_normal((n_items, 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    nlist = int(4 * np.sqrt(n_items))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(64), 64, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(emb[rng.choice(n_items, min(n_items, 50 * nlist), replace=False)])
    index.add(emb)
    index.nprobe = 8
    indices = np.sort(rng.integers(0, n_items, (n_items, per)), axis=1).ravel()
    neighbours = ItemNeighbours.from_arrays({"indptr": np.arange(n_items + 1, dtype=np.int64) * per, "indices": indices,
                                             "values": rng.random(n_items * per).astype(np.float32)})
    popularity = rng.pareto(1.1, n_items)
    if never_bought:
        popularity[np.random.default_rng(seed + 1).random(n_items) < never_bought] = 0.0
    prior = CategoryPrior.from_popularity(rng.integers(0, 60, n_items), popularity)
    popular = np.argsort(-popularity, kind="stable")
    return dict(item_embeddings=emb, index=index, cf_all=neighbours, cf_pos=neighbours, popular_rows=popular,
                n_candidates=300, recent_window=5, categories=prior, trending_rows=popular[:2000]), per, popularity


def requests(popularity: np.ndarray, users: int, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    p = popularity / popularity.sum()
    out = []
    for _ in range(users // batch):
        rows = np.concatenate([rng.choice(len(p), 30, replace=False, p=p) for _ in range(batch)])
        out.append((rng.standard_normal((batch, 64)).astype(np.float32), np.arange(batch + 1) * 30, rows,
                    rng.integers(1, 5, len(rows)).astype(np.int8)))
    return out


def run(sizes=SIZES, users: int = 96, rounds: int = 3, never_bought: float = 0.0) -> dict:
    from runtime.candidates import CandidateGenerator

    rows = []
    for n_items in sizes:
        kwargs, per, popularity = catalog(n_items, never_bought=never_bought)
        outputs = {}
        for sparse in (False, True):
            if not sparse and n_items > DENSE_MAX:
                continue
            gen = CandidateGenerator(**kwargs, sparse=sparse)
            for batch in (1, 16):
                feeds = requests(popularity, users, batch)
                outputs[(sparse, batch)] = [gen(*f, with_routes=True) for f in feeds[:3]]
                best = float("inf")
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for f in feeds:
                        gen(*f, with_routes=True)
                    best = min(best, (time.perf_counter() - t0) / (len(feeds) * batch))
                rows.append({"items": n_items, "neighbours_per_item": per, "tables": "sparse" if sparse else "dense",
                             "batch": batch, "ms_per_user": round(best * 1e3, 3)})
                print(json.dumps(rows[-1]), flush=True)
        for batch in (1, 16):  # the two modes agree
            if (False, batch) in outputs:
                for a, b in zip(outputs[(False, batch)], outputs[(True, batch)]):
                    for x, y in zip(a[:2] + a[3:], b[:2] + b[3:]):
                        np.testing.assert_array_equal(x, y)
                    for route in a[2]:
                        np.testing.assert_array_equal(a[2][route], b[2][route])
    return {"rows": rows, "users": users, "rounds": rounds, "actions_per_user": 30, "never_bought": never_bought}


def markdown(report: dict) -> str:
    lines = ["# Recall routes per user against catalog size: dense vs sparse per-user tables", "",
             f"Command: `{report['command']}`. Machine: {report['machine']}. SYNTHETIC catalogs (see the script); "
             f"{report['users']} users of {report['actions_per_user']} actions, the best of {report['rounds']} rounds; "
             + (f"{report['never_bought']:.0%} of the items never bought (popularity 0); " if report.get("never_bought") else "") +
             "IVF nprobe 8 as the item index; one thread. Both modes gave the same candidates, features and lists "
             "wherever both ran.", "",
             "| items | neighbours per item | users per batch | dense ms per user | sparse ms per user |", "|---|---|---|---|---|"]
    by = {(r["items"], r["batch"], r["tables"]): r for r in report["rows"]}
    for (items, batch) in sorted({(r["items"], r["batch"]) for r in report["rows"]}):
        d, s = by.get((items, batch, "dense")), by.get((items, batch, "sparse"))
        per = (d or s)["neighbours_per_item"]
        lines.append(f"| {items:,} | {per} | {batch} | {d['ms_per_user'] if d else '—'} | {s['ms_per_user'] if s else '—'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--users", type=int, default=96)
    ap.add_argument("--never-bought", type=float, default=0.0,
                    help="share of the catalog with popularity 0 (ties in the category route); default 0")
    ap.add_argument("--tag", default="", help="results go to route_scale_TAG.{json,md}")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if not 0.0 <= args.never_bought < 1.0:
        ap.error(f"--never-bought must be in [0, 1), got {args.never_bought}")
    report = run(tuple(args.sizes), args.users, never_bought=args.never_bought)
    report.update(machine=describe(), command=command_line("python -m benchmarks.route_scale", argv), commit=commit())
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"route_scale_{args.tag}" if args.tag else "route_scale"
    (args.results / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.results / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
