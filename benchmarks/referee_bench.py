"""Real-data quality through the SERVER, scored by the shared referee (public development set).

    .venv/bin/python -m benchmarks.referee_bench                      # both protocols, ~25 min on 2 cores
    .venv/bin/python -m benchmarks.referee_bench --protocols random-8-1-1

For each protocol (`random-8-1-1`, `user-temporal-8-1-1`) of `shared/quality/referee.py`:
1. the referee writes its split of ml-latest-small (train / valid / test CSVs);
2. the train split becomes a MovieLens-layout folder (ratings.csv + movies.csv) and goes through
   the product's own commands: `shoprec data --source movielens-latest-small`, `features --deploy`
   (all of the referee's train trains the models and fills the user store), `train`, `export`;
3. tritonserver serves the bundle; every test user of the referee is asked for a top 100 over gRPC
   (no context, seen items excluded by default) and the lists are written as the referee's CSV;
4. `referee.py score` scores them on test (and on valid, which nothing here was tuned on).

`--layout interactions` hands the product the referee's train split as the generic interactions
file instead (user_id, item_id, timestamp, rating; `shoprec data --source interactions`), with no
item table: no genres, no titles, no year. It shows what the served lists are worth when a shop
has no item attributes. Its results are written with the suffix `_interactions`.

Writes benchmarks/results/referee_<protocol>.json (the referee's own JSON plus timings) and
referee_summary.{json,md} with the ratios to the referee's published baselines (read from
shared/quality/README.md). ml-latest-small: GroupLens, research licence (see its README.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import describe

SHARED = REPO_ROOT.parent / "shared"
PROTOCOLS = ("random-8-1-1", "user-temporal-8-1-1")
TARGET = 1.10


def _run(cmd: list[str], env: dict | None = None, quiet: bool = False) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    if not quiet:
        print(out.stdout.strip()[-400:], flush=True)
    return out.stdout


def _ml_layout(split_dir: Path, data_dir: Path, out: Path) -> None:
    """The referee's train split as an ml-latest-small folder (ratings.csv, movies.csv)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(split_dir / "train.csv") as src, open(out / "ratings.csv", "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.writer(dst)
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        for row in reader:
            writer.writerow([row["user"], row["item"], row["rating"], row["ts"]])
    shutil.copy2(data_dir / "movies.csv", out / "movies.csv")


def _interactions_file(split_dir: Path, out: Path) -> Path:
    """The referee's train split as the generic interactions format, ratings only (no item table)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "interactions.csv"
    with open(split_dir / "train.csv") as src, open(path, "w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["user_id", "item_id", "timestamp", "rating"])
        for row in csv.DictReader(src):
            writer.writerow([row["user"], row["item"], row["ts"], row["rating"]])
    return path


def _users(path: Path) -> list[int]:
    with open(path) as fh:
        return [int(r["user"]) for r in csv.DictReader(fh)]


async def _ask(url: str, users: list[int], k: int, concurrency: int = 16) -> dict[int, np.ndarray]:
    from client import AsyncRecommenderClient

    out: dict[int, np.ndarray] = {}
    sem = asyncio.Semaphore(concurrency)
    async with AsyncRecommenderClient(url) as c:
        async def one(u):
            async with sem:
                out[u] = (await c.recommend(u, k=k)).item_ids
        await asyncio.gather(*(one(u) for u in users))
    return out


def _write_lists(path: Path, lists: dict[int, np.ndarray]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "rank"])
        for u, items in sorted(lists.items()):
            for rank, item in enumerate(items, 1):
                w.writerow([u, int(item), rank])


def published_baselines(readme: Path) -> dict:
    """{protocol: {system: {metric: value}}} from the referee README's baseline table."""
    table: dict = {}
    header = None
    for line in readme.read_text().splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] == "protocol":
            header = cells
            continue
        if header and len(cells) == len(header) and cells[0] in PROTOCOLS:
            row = {h: float(v) if re.fullmatch(r"[.\d]+", v) else v for h, v in zip(header, cells)}
            table.setdefault(cells[0], {})[re.sub(r"\s*\(.*\)", "", cells[1])] = row
    return table


def build_artifacts(protocol: str, work: Path, cfg_path: str | None, referee: str | None = None, data: str | None = None,
                    timings: dict | None = None, layout: str = "movielens") -> Path:
    """The referee's split -> ml-latest-small layout -> the product's own commands (data, features
    --deploy, train, export). Returns the artifacts folder."""
    referee = referee or str(SHARED / "quality" / "referee.py")
    data = data or str(SHARED / "data" / "ml-latest-small")
    if work.exists():
        shutil.rmtree(work)
    split_dir, ml_dir, art = work / "split", work / "ml", work / "artifacts"
    py = sys.executable
    env = {**os.environ, "REFEREE_DATA": str(Path(data).parent)}
    _run([py, referee, "split", "--dataset", "mlls", "--protocol", protocol, "--out", str(split_dir)], env)
    if layout == "interactions":
        source = ["--source", "interactions", "--interactions", str(_interactions_file(split_dir, work / "generic"))]
    else:
        _ml_layout(split_dir, Path(data), ml_dir)
        source = ["--source", "movielens-latest-small", "--movielens-dir", str(ml_dir)]
    shoprec = [py, "-m", "app.cli", "--artifacts", str(art), "--quiet"] + (["--config", cfg_path] if cfg_path else [])
    for stage, extra in (("data", source),
                         ("features", ["--deploy"]), ("train", []), ("export", [])):
        t = time.time()
        _run(shoprec + [stage, *extra], quiet=stage != "train")
        if timings is not None:
            timings[stage] = round(time.time() - t, 1)
    return art


def run_protocol(protocol: str, args, cfg_path: str | None) -> dict:
    work = Path(args.work) / protocol
    split_dir = work / "split"
    referee = [sys.executable, str(args.referee)]
    env = {**os.environ, "REFEREE_DATA": str(Path(args.data).parent)}
    t0 = time.time()
    timings: dict = {}
    art = build_artifacts(protocol, work, cfg_path, str(args.referee), str(args.data), timings, args.layout)

    from serving.launcher import TritonServer

    cfg = load_config(cfg_path)
    users = _users(split_dir / "eval_users_test.csv")
    valid_users = _users(split_dir / "eval_users_valid.csv")
    t = time.time()
    with TritonServer.from_config(cfg.serve, art, ephemeral_ports=True, config_path=cfg_path) as server:
        lists = asyncio.run(_ask(server.grpc_url, sorted(set(users) | set(valid_users)), args.k))
    timings["serve_and_ask"] = round(time.time() - t, 1)
    results = {}
    for part, part_users in (("test", users), ("valid", valid_users)):
        ranked = work / f"lists_{part}.csv"
        _write_lists(ranked, {u: lists[u] for u in part_users})
        out_json = work / f"referee_{part}.json"
        _run(referee + ["score", "--dataset", "mlls", "--protocol", protocol, "--part", part, "--ranked", str(ranked),
                        "--json", str(out_json)], env, quiet=True)
        results[part] = json.loads(out_json.read_text())
    timings["total"] = round(time.time() - t0, 1)
    train_report = json.loads((art / "models" / "train_report.json").read_text())
    return {"protocol": protocol, "layout": args.layout, "referee": results, "timings_s": timings, "served_users": len(lists),
            "train": {"cf": train_report.get("cf"), "ranker_deep": train_report["ranking"].get("deep"),
                      "retrieval_best_epoch": train_report["retrieval_stage_a"]["best_epoch"],
                      "popularity_prior": train_report.get("popularity_prior", {}).get("weight")}}


def summarize(runs: dict, baselines: dict) -> dict:
    out = {}
    for protocol, run in runs.items():
        m = run["referee"]["test"]["metrics"]
        base = baselines.get(protocol, {})
        best = {metric: max((row[metric] for row in base.values() if isinstance(row.get(metric), float)), default=None)
                for metric in ("Recall@10", "NDCG@10")}
        out[protocol] = {
            "served": {k: m[k] for k in ("Recall@10", "Recall@50", "Recall@100", "NDCG@10", "HitRate@10", "Coverage@10")},
            "stderr": m.get("stderr", {}), "users": m.get("n_users"),
            "best_baseline": best,
            "ratio_to_best": {k: (m[k] / v if v else None) for k, v in best.items()},
            "target": TARGET,
            "valid": {k: run["referee"]["valid"]["metrics"][k] for k in ("Recall@10", "NDCG@10")},
        }
    return out


def markdown(summary: dict, baselines: dict, meta: dict) -> str:
    given = ("the generic interactions file (ratings only, no item attributes)" if meta.get("layout") == "interactions"
             else "the ml-latest-small files")
    lines = ["# Served recommendations on ml-latest-small, scored by the referee", "", f"The product was given {given}.", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}). The lists are what the running "
             "tritonserver returned (top 100, no context, seen items excluded). Baselines: the referee's published "
             "table (wide grid, test).", ""]
    for protocol, s in summary.items():
        se = s["stderr"]
        lines += [f"## {protocol} ({s['users']} test users)", "",
                  "| system | Recall@10 | NDCG@10 | Recall@50 | Recall@100 | HitRate@10 |", "|---|---|---|---|---|---|"]
        for name, row in baselines.get(protocol, {}).items():
            lines.append(f"| {name} (referee) | {row['Recall@10']:.4f} | {row['NDCG@10']:.4f} | {row['Recall@50']:.4f} | "
                         f"{row['Recall@100']:.4f} | {row['HitRate@10']:.4f} |")
        v = s["served"]
        lines.append(f"| **served pipeline** | **{v['Recall@10']:.4f}** ± {se.get('Recall@10', 0):.4f} | "
                     f"**{v['NDCG@10']:.4f}** ± {se.get('NDCG@10', 0):.4f} | {v['Recall@50']:.4f} | {v['Recall@100']:.4f} | "
                     f"{v['HitRate@10']:.4f} |")
        r = s["ratio_to_best"]
        lines += ["", f"Ratio to the best baseline: Recall@10 {r['Recall@10']:.3f}x, NDCG@10 {r['NDCG@10']:.3f}x "
                  f"(target {TARGET:.2f}x). Valid (not tuned on): Recall@10 {s['valid']['Recall@10']:.4f}, "
                  f"NDCG@10 {s['valid']['NDCG@10']:.4f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--referee", default=str(SHARED / "quality" / "referee.py"))
    parser.add_argument("--data", default=str(SHARED / "data" / "ml-latest-small"), help="the ml-latest-small folder")
    parser.add_argument("--work", default=str(REPO_ROOT / "artifacts" / "referee"))
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--config", default=None, help="shoprec config (default: configs/default.toml)")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--layout", default="movielens", choices=["movielens", "interactions"],
                        help="what the product is given: the ml-latest-small files (default) or the generic interactions "
                             "file without any item attributes (results get the suffix _interactions)")
    args = parser.parse_args(argv)
    suffix = "" if args.layout == "movielens" else f"_{args.layout}"
    if suffix:
        args.work = str(Path(args.work).with_name(Path(args.work).name + suffix))
    for p in (Path(args.referee), Path(args.data) / "ratings.csv"):
        if not p.exists():
            raise SystemExit(f"referee_bench: {p} not found (the referee and ml-latest-small live in ../shared)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for protocol in args.protocols:
        print(f"== {protocol}", flush=True)
        runs[protocol] = run_protocol(protocol, args, args.config)
        (out / f"referee_{protocol}{suffix}.json").write_text(json.dumps(runs[protocol], indent=1) + "\n")
    baselines = published_baselines(Path(args.referee).parent / "README.md")
    meta = {"command": " ".join(["python -m benchmarks.referee_bench", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d"), "machine": describe()}
    summary = summarize(runs, baselines)
    meta["layout"] = args.layout
    summary_json, summary_md = out / f"referee_summary{suffix}.json", out / f"referee_summary{suffix}.md"
    prev = json.loads(summary_json.read_text())["protocols"] if summary_json.exists() else {}
    summary = {**{k: v for k, v in prev.items() if k not in summary}, **summary}
    summary_json.write_text(json.dumps({**meta, "protocols": summary, "baselines": baselines}, indent=1) + "\n")
    summary_md.write_text(markdown(summary, baselines, meta))
    print(markdown(summary, baselines, meta))
    return summary


if __name__ == "__main__":
    main()
