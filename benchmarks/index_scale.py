"""Retrieval cost against catalog size: exact, IVF and HNSW FAISS indexes over 2k, 100k and 1M items.

    .venv/bin/python -m benchmarks.index_scale            # ~10 min on 2 cores

For each catalog size and index kind, the index is built as `shoprec export` builds it
(training/index.py), its search breadth tuned to `index.target_recall` recall@100 against exact
search on held-out item means (a synthetic catalog has no users; export tunes on the store users'
queries, which need a wider search: benchmarks/index_queries.py), then measured with one FAISS thread, as a serving step runs it:
build seconds (tuning included), index bytes, recall@100 against exact search on 1,000 other
held-out queries, and search latency at batch 1 (200 single queries) and batch 16 (50 batches).

The catalogs are SYNTHETIC unit vectors of the served dimension (64): items drawn around
n/100 cluster centres, so that the neighbourhood structure resembles a trained embedding
(categories and brands; each item at cosine ~0.7 from its centre); a row for the small shop's real item embeddings (2,000 items, needs
`make demo`) shows how they compare. Writes benchmarks/results/index_scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, IndexConfig, load_config
from shoprec.manifest import verified_path

from .machine import describe

SIZES = (2_000, 100_000, 1_000_000)
KINDS = ("flat", "ivf", "hnsw")


def synthetic_catalog(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 100, 1), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):  # in chunks: bounded temporaries at 1M items
        hi = min(lo + 100_000, n)
        emb[lo:hi] = centres[rng.integers(0, len(centres), hi - lo)] + 0.12 * rng.normal(size=(hi - lo, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


def measure(emb: np.ndarray, kind: str, cfg: IndexConfig) -> dict:
    import faiss

    from runtime.faiss_search import recall_vs_exact
    from training.index import build_index, held_out_queries, tune_index

    faiss.omp_set_num_threads(2)  # the build may use the machine, as export does
    t0 = time.perf_counter()
    index, _ = build_index(emb, cfg, kind)
    tuned = tune_index(index, kind, emb, cfg)  # on queries of seed 0
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)  # a serving step searches with one thread (OMP_NUM_THREADS=1)
    queries = held_out_queries(emb, 1000, seed=1)
    recall = recall_vs_exact(index, emb, queries, 100, filled=False)
    k = min(100, len(emb))
    single = []
    for q in queries[:200]:
        t = time.perf_counter()
        index.search(q[None, :], k)
        single.append((time.perf_counter() - t) * 1e3)
    batch = []
    for b in range(50):
        q = queries[200 + 16 * b: 216 + 16 * b]
        t = time.perf_counter()
        index.search(q, k)
        batch.append((time.perf_counter() - t) * 1e3)
    breadth = {key: tuned[key] for key in ("nprobe", "nlist", "efSearch") if key in tuned}
    return {"items": int(len(emb)), "kind": kind, **breadth, "build_s": round(build_s, 2),
            "index_mb": round(len(faiss.serialize_index(index)) / 2**20, 1), "recall@100": round(recall, 4),
            "batch1_ms": {"p50": round(float(np.median(single)), 3), "p99": round(float(np.percentile(single, 99)), 3)},
            "batch16_ms": {"p50": round(float(np.median(batch)), 3), "per_query": round(float(np.median(batch)) / 16, 3)}}


def run(sizes=SIZES, kinds=KINDS, real: Path | None = None) -> dict:
    cfg = load_config().index
    rows = []
    catalogs = [("synthetic", n, None) for n in sizes]
    if real is not None and real.is_file():
        catalogs.insert(0, ("small shop (trained)", None, real))
    for name, n, path in catalogs:
        emb = (np.load(verified_path(path.parent, path.name), allow_pickle=False).astype(np.float32) if path is not None
               else synthetic_catalog(n))
        for kind in kinds:
            row = {"catalog": name, **measure(emb, kind, cfg)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del emb
    return {"rows": rows, "target_recall": cfg.target_recall, "exact_max_items": cfg.exact_max_items}


def markdown(r: dict) -> str:
    lines = ["# Retrieval cost against catalog size", "",
             (f"Command: `{r['command']}`. Machine: {r['machine']}. Search with one thread; breadth tuned to recall@100 "
              f"≥ {r['target_recall']} on held-out queries (training/index.py), recall measured on others. `auto` "
              f"serves flat up to {r['exact_max_items']:,} items, IVF above."), "",
             "| catalog | items | index | breadth | build s | MB | recall@100 | batch 1 p50 ms | batch 1 p99 ms | batch 16 ms (per query) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        breadth = (f"nprobe {x['nprobe']} of {x['nlist']}" if "nprobe" in x else f"efSearch {x['efSearch']}" if "efSearch" in x
                   else "exact")
        lines.append(f"| {x['catalog']} | {x['items']:,} | {x['kind']} | {breadth} | {x['build_s']} | {x['index_mb']} | "
                     f"{x['recall@100']} | {x['batch1_ms']['p50']} | {x['batch1_ms']['p99']} | {x['batch16_ms']['p50']} "
                     f"({x['batch16_ms']['per_query']}) |")
    lines += ["", "![retrieval cost against catalog size](index_scale.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, color in zip(KINDS, ("tab:blue", "tab:orange", "tab:green")):
        xs = [x for x in r["rows"] if x["kind"] == kind and x["catalog"] == "synthetic"]
        if not xs:
            continue
        n = [x["items"] for x in xs]
        a.plot(n, [x["batch1_ms"]["p50"] for x in xs], "o-", color=color, label=f"{kind}, batch 1")
        a.plot(n, [x["batch16_ms"]["per_query"] for x in xs], "x--", color=color, label=f"{kind}, batch 16 per query")
        b.plot(n, [x["recall@100"] for x in xs], "o-", color=color, label=kind)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("catalog items (synthetic, 64-d)")
    a.set_yscale("log")
    a.set_ylabel("search ms (p50, one thread)")
    a.legend(fontsize=7)
    b.set_ylabel("recall@100 vs exact")
    b.axhline(r["target_recall"], color="grey", ls=":")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = ap.parse_args(argv)
    r = run(tuple(args.sizes), real=args.artifacts / "serving" / "item_embeddings.npy")
    r.update(machine=describe(), command="python -m benchmarks.index_scale"
             + ("" if tuple(args.sizes) == SIZES else " --sizes " + " ".join(map(str, args.sizes))))
    args.results.mkdir(parents=True, exist_ok=True)
    plot(r, args.results / "index_scale.png")
    (args.results / "index_scale.json").write_text(json.dumps(r, indent=1) + "\n")
    (args.results / "index_scale.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
