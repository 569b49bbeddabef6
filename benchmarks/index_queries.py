"""Which queries the item index is tuned on: the store users' embeddings against held-out item-mean queries.

    .venv/bin/python -m benchmarks.index_queries --artifacts /work/large --tag large   # ~3 min at 1M items

An approximate index (IVF) is only as good as its breadth on the queries it is sent. This takes a trained
shop's served bundle (its IVF index, item embeddings and user store), asks the served steps (runtime/pipeline,
up to the user tower) for the embeddings of 1,000 store users with a history, other users than the ones
export tuned on (another seed), and builds 1,000 held-out queries as export did until 2026-12-06: each the
normalised mean of two random items' embeddings (training.index.held_out_queries). For each query set, depth
k (100 and the served candidate count) and nprobe, with one search thread as a serving step runs it:
- recall@k against exact search, slots the index leaves empty counting as misses;
- the share of queries the index cannot fill at that depth (runtime.faiss_search.search then answers them by
  exact search over the whole catalog, which is slow at 1M items);
- the search's ms per query, batch 16, fill included (the machine's load moves this; the recall does not).
The index's own nprobe (export's choice) is marked. Writes benchmarks/results/index_queries_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import publish

NPROBES = (4, 8, 16, 32, 64, 128, 256)


def user_queries(pipe, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, served user embeddings) of n random store users with a history."""
    store = pipe.steps["feature_transform"].store
    known = store.user_id[np.diff(store.arrays["hist_indptr"]) > 0]
    users = np.sort(np.random.default_rng(seed).choice(known, min(n, len(known)), replace=False))
    out = [pipe.run(pipe.request(users[s : s + 256], 10, exclude_seen=True), stop="retrieval")["user_embedding"]
           for s in range(0, len(users), 256)]
    return users, np.concatenate(out).astype(np.float32)


def measure(artifacts: Path, n_users: int = 1000, seed: int = 1, nprobes: tuple[int, ...] = NPROBES, config=None) -> dict:
    import faiss

    from runtime.faiss_search import augment, exact_top, recall_vs_exact, search
    from runtime.pipeline import Pipeline
    from shoprec import contract
    from shoprec.manifest import read_manifest
    from training.index import held_out_queries

    cfg = load_config(config)
    bundle = artifacts / "serving"
    pipe = Pipeline(bundle, cfg=cfg.serve)  # checks each bundle file against the manifest as it loads it
    gen = pipe.steps["retrieval"].generator  # the served index, item embeddings and ann bias, as loaded
    index = faiss.downcast_index(gen.index)
    if not hasattr(index, "nprobe"):
        raise SystemExit(f"{bundle}: the item index is {type(index).__name__}, not IVF; nothing to tune")
    emb, bias = gen.emb, gen.ann_bias
    users, user_emb = user_queries(pipe, n_users, seed)
    sets = {"store users": user_emb, "held-out item means": held_out_queries(emb, n_users, seed=seed)}
    vectors = emb if bias is None else augment(emb, bias)  # the index holds [embedding, bias], a query [u, 1]
    if bias is not None:
        sets = {name: augment(q, 1.0) for name, q in sets.items()}
    depths = sorted({100, contract.num_candidates(cfg.serve.num_candidates, len(emb))})
    chosen = int(index.nprobe)
    grid = sorted({p for p in nprobes if p <= index.nlist} | {chosen})
    faiss.omp_set_num_threads(1)  # a serving step searches with one thread
    rows = []
    for name, q in sets.items():
        q = np.ascontiguousarray(q, dtype=np.float32)
        for k in depths:
            exact = exact_top(vectors, q, k)
            for p in grid:
                index.nprobe = p
                recall = recall_vs_exact(index, vectors, q, k, exact, filled=False)
                unfilled = float((index.search(q, k)[1] < 0).any(1).mean())
                t0 = time.perf_counter()
                for s in range(0, len(q), 16):
                    search(index, q[s : s + 16], k, emb, bias)
                ms = (time.perf_counter() - t0) * 1000 / len(q)
                rows.append({"queries": name, "k": k, "nprobe": p, "recall": round(recall, 4),
                             "unfilled_share": round(unfilled, 4), "ms_per_query": round(ms, 3)})
    index.nprobe = chosen
    return {"items": int(len(emb)), "nlist": int(index.nlist), "chosen_nprobe": chosen, "users": int(len(users)),
            "export_report": read_manifest(bundle).get("report", {}).get("index"), "rows": rows}


def markdown(r: dict) -> list[str]:
    lines = [f"# The item index on the queries it is sent: `{r['tag']}`", "",
             f"{r['items']:,} items, IVF with {r['nlist']:,} lists; export chose nprobe {r['chosen_nprobe']} (marked *). "
             f"{r['users']} queries per set, recall against exact search, one search thread. Command: `{r['command']}`; "
             f"commit {r['commit']}.", "",
             "| queries | k | nprobe | recall@k | share not filled (exact fallback) | ms per query (batch 16) |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        mark = "*" if row["nprobe"] == r["chosen_nprobe"] else ""
        lines.append(f"| {row['queries']} | {row['k']} | {row['nprobe']}{mark} | {row['recall']:.3f} | "
                     f"{row['unfilled_share']:.3f} | {row['ms_per_query']:.2f} |")
    return lines + ["", f"Machine: {r['machine']}."]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts", help="a shop with an exported bundle")
    ap.add_argument("--config", type=Path, default=None, help="the config export ran with (default: the default config)")
    ap.add_argument("--users", type=int, default=1000, help="queries per set (default 1000)")
    ap.add_argument("--nprobe", type=int, nargs="+", default=list(NPROBES), help="the breadths to measure")
    ap.add_argument("--tag", required=True, help="writes RESULTS/index_queries_<tag>.{json,md}")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    r = measure(args.artifacts, args.users, nprobes=tuple(args.nprobe), config=args.config)
    publish(args.results, "index_queries", args.tag, r, markdown, argv)


if __name__ == "__main__":
    main()
