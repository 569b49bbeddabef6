"""Does the served quality hold on data shaped unlike the development set? Variants of ml-latest-small,
each scored by the shared referee against its own tuned baselines.

    .venv/bin/python -m benchmarks.referee_variants                     # 2 variants x 2 protocols, ~10 min on 2 cores
    .venv/bin/python -m benchmarks.referee_variants --variants half-users --protocols random-8-1-1

The product is judged on public data sets it never sees here. Its defaults were checked on
ml-latest-small; these variants change what a default could have been fitted to:
- `whole-stars-dense`: only films rated by at least 10 users, every half-star rating rounded up
  to a whole star. The 1-5 star scale and the smaller, denser catalog of MovieLens 100K and 1M;
  3.5 becomes 4, so the positives change too.
- `half-users`: a random half of the users (seed 2026) with all their ratings: less data for every
  item and every model.

Each variant is written as an ml-latest-small folder (ratings.csv, the original movies.csv), and
then, per protocol, exactly as `benchmarks.referee_bench` does it: the referee splits it, the
product's own commands train on the train split and export, tritonserver serves, the server's top
100 per test user are scored by `referee.py score`. The referee's baselines (popularity, ALS,
item-kNN, EASE; wide grid, chosen on valid NDCG@10) are fitted on the same split by
`referee.py baselines`, so the ratio is to the best baseline of that variant.

Writes benchmarks/results/referee_variants[_TAG].{json,md}. Nothing here tunes the product: the config is
the default one, as in referee_bench, unless --config names another (to measure a non-default setting).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from shoprec.config import REPO_ROOT

from . import referee_bench
from .machine import command_line, commit, describe, write_report

VARIANTS = {
    "whole-stars-dense": "films rated by >= 10 users; half stars rounded up to whole stars",
    "half-users": "a random half of the users (seed 2026), all their ratings",
}
SEED = 2026


def make_variant(name: str, data: Path, out: Path) -> Path:
    """`name`'s ratings.csv (and the original movies.csv) in OUT/NAME/ml-latest-small; returns that folder."""
    ratings = pd.read_csv(data / "ratings.csv")
    if name == "whole-stars-dense":
        raters = ratings["movieId"].map(ratings["movieId"].value_counts())
        ratings = ratings[raters >= 10].copy()
        ratings["rating"] = np.ceil(ratings["rating"])
    elif name == "half-users":
        users = np.sort(ratings["userId"].unique())
        keep = np.random.default_rng(SEED).choice(users, size=len(users) // 2, replace=False)
        ratings = ratings[ratings["userId"].isin(keep)]
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    folder = out / name / "ml-latest-small"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ratings.to_csv(folder / "ratings.csv", index=False)
    shutil.copy2(data / "movies.csv", folder / "movies.csv")
    return folder


def summarize(protocol: str, baselines: dict, served_run: dict) -> dict:
    """referee_bench's summary of one protocol against the variant's fitted baselines, plus which baseline was best."""
    systems = {name: s["test"] for name, s in baselines["systems"].items()}
    row = referee_bench.summarize({protocol: served_run}, {protocol: systems})[protocol]
    row["best_baseline_system"] = {m: max(systems, key=lambda n: systems[n][m]) for m in row["best_baseline"]}
    return {**row, "train": served_run["train"], "timings_s": served_run["timings_s"]}


def markdown(report: dict) -> list[str]:
    lines = ["# Served quality on variants of ml-latest-small, scored by the referee", "",
             f"Command: `{report['command']}` ({report['date']}, {report['machine']}, commit {report['commit']}). "
             "Each variant is split by the referee; the product trains on the train split with "
             f"{'the config ' + report['config'] if report.get('config') else 'the default config'} "
             "and the running tritonserver's top 100 per test user are scored; the baselines are the referee's, "
             "fitted on the same split (wide grid, chosen on valid NDCG@10). Mean ± standard error over test users.", ""]
    for variant, per_protocol in report["variants"].items():
        lines += [f"## {variant}: {VARIANTS[variant]}", ""]
        for protocol, r in per_protocol.items():
            info = r["split_info"]
            lines += [f"### {protocol} ({r['users']} test users; {info['n_interactions']} ratings, "
                      f"{info['n_users']} users, catalog {info['catalog_size']})", "",
                      *referee_bench.metrics_table(
                          {name: b["test"] for name, b in r["baselines"].items()}, r["served"], r["stderr"],
                          {name: f"{name} (referee, {json.dumps(b['best_params'])})" for name, b in r["baselines"].items()})]
            ratio = r["ratio_to_best"]
            lines += ["", f"Ratio to the best baseline: Recall@10 {ratio['Recall@10']:.3f}x "
                      f"({r['best_baseline_system']['Recall@10']}), NDCG@10 {ratio['NDCG@10']:.3f}x "
                      f"({r['best_baseline_system']['NDCG@10']}). Train: {json.dumps(r['train'])}.", ""]
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--protocols", nargs="+", default=list(referee_bench.DEFAULT_PROTOCOLS), choices=referee_bench.PROTOCOLS)
    parser.add_argument("--referee", default=str(referee_bench.SHARED / "quality" / "referee.py"))
    parser.add_argument("--data", default=str(referee_bench.SHARED / "data" / "ml-latest-small"),
                        help="the ml-latest-small folder the variants are made from")
    parser.add_argument("--work", default=str(REPO_ROOT / "artifacts" / "referee_variants"))
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--config", default=None, help="shoprec config (default: configs/default.toml)")
    parser.add_argument("--tag", default="", help="write referee_variants_TAG.* (e.g. for another --config)")
    args = parser.parse_args(argv)
    referee, data, work = Path(args.referee), Path(args.data), Path(args.work)
    for p in (referee, data / "ratings.csv", data / "movies.csv"):
        if not p.exists():
            raise SystemExit(f"referee_variants: {p} not found (the referee and ml-latest-small live in ../shared)")
    t0 = time.time()
    report = {"command": command_line("python -m benchmarks.referee_variants", argv), "date": time.strftime("%Y-%m-%d"),
              "machine": describe(), "commit": commit(), "config": args.config, "variants": {}}
    for variant in args.variants:
        folder = make_variant(variant, data, work / "data")
        for protocol in args.protocols:
            print(f"== {variant} / {protocol}", flush=True)
            run_dir = work / variant
            base = referee_bench.fit_baselines(referee, folder, "mlls", protocol, run_dir / "baselines")
            served = referee_bench.run_protocol(protocol, argparse.Namespace(
                dataset="mlls", work=str(run_dir), referee=str(referee), data=str(folder), k=100, layout="movielens"),
                args.config)
            row = summarize(protocol, base, served)
            row.update(split_info=base["split_info"], baselines=base["systems"], baselines_wall_s=base["wall_s"])
            report["variants"].setdefault(variant, {})[protocol] = row
            print(f"   served NDCG@10 {row['served']['NDCG@10']:.4f}, best baseline {row['best_baseline']['NDCG@10']:.4f} "
                  f"({row['ratio_to_best']['NDCG@10']:.3f}x)", flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    write_report(args.out, "referee_variants", args.tag, report, markdown(report))
    print("\n".join(markdown(report)))
    return report


if __name__ == "__main__":
    main()
