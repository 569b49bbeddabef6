"""Real-data quality through the SERVER, scored by the shared referee (public development set).

    .venv/bin/python -m benchmarks.referee_bench                      # both protocols, ~6 min on 2 cores
    .venv/bin/python -m benchmarks.referee_bench --protocols random-8-1-1
    .venv/bin/python -m benchmarks.referee_bench --dataset ml100k --data /data/movielens-100k \
        --protocols temporal random-8-1-1 user-temporal-8-1-1

For each protocol (`random-8-1-1`, `user-temporal-8-1-1`, `temporal`) of `shared/quality/referee.py`:
1. the referee writes its split of the data set (train / valid / test CSVs);
2. the train split becomes a folder in the data set's own MovieLens layout (ml-latest-small:
   ratings.csv + movies.csv; ml100k: u.data + u.item + u.user; ml1m-partial: ratings.dat +
   movies.dat + users.dat, the item and user files copied as they are) and goes through the
   product's own commands: `shoprec data --source movielens-...`, `features --deploy`
   (all of the referee's train trains the models and fills the user store), `train`, `export`;
3. tritonserver serves the bundle; every test user of the referee is asked for a top 100 over gRPC
   (no context, seen items excluded by default) and the lists are written as the referee's CSV;
4. `referee.py score` scores them on test (and on valid, which nothing here was tuned on).

`--layout interactions` hands the product the referee's train split as the generic interactions
file instead (user_id, item_id, timestamp, rating; `shoprec data --source interactions`), with no
item table: no genres, no titles, no year. It shows what the served lists are worth when a shop
has no item attributes. Its results are written with the suffix `_interactions`.

Writes benchmarks/results/referee_<protocol>.json (the referee's own JSON plus timings) and
referee_summary.{json,md} with the ratios to the best baseline. For ml-latest-small on its two
protocols the baselines are the referee's published table (shared/quality/README.md); for any other
data set or protocol they are fitted on the same split by `referee.py baselines --grid wide`
(popularity, ALS, item-kNN, EASE). Other data sets' results get the suffix `_<dataset>`.

The other MovieLens releases may not be redistributed: their split, the product's tables and its
artifacts are written under WORK, by default a folder outside this work tree (the referee refuses to
write their splits inside one). ml-latest-small: GroupLens, research licence (see its README.txt).
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
import tempfile
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import command_line, describe

SHARED = REPO_ROOT.parent / "shared"
PROTOCOLS = ("random-8-1-1", "user-temporal-8-1-1", "temporal")
DEFAULT_PROTOCOLS = PROTOCOLS[:2]  # the global temporal split leaves 7 test users on ml-latest-small
# the referee's data set -> (its folder under REFEREE_DATA, the ratings file it reads there, the product's --source)
DATASETS = {
    "mlls": ("ml-latest-small", "ratings.csv", "movielens-latest-small"),
    "ml100k": ("movielens-100k", "u.data", "movielens-100k"),
    "ml1m-partial": ("movielens-1m-partial", "ratings_users1-2999.dat", "movielens-1m"),
}
BASELINES = ("pop", "als", "itemknn", "ease")
BASELINE_METRICS = ("Recall@10", "NDCG@10", "Recall@50", "Recall@100", "HitRate@10", "Coverage@10")
TARGET = 1.10


def _run(cmd: list[str], env: dict | None = None, quiet: bool = False, peak_rss: dict | None = None,
         key: str = "") -> str:
    """Run `cmd`, return its stdout; a failure raises with the end of its stderr. `peak_rss[key]`: the process's
    peak RSS in GB, from the kernel when it exits (wait4, as /usr/bin/time reads it)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if peak_rss is not None:
        peak_rss[key] = round(usage.ru_maxrss / 2**20, 2)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    if not quiet:
        print(stdout.strip()[-400:], flush=True)
    return stdout


def _ml_layout(dataset: str, split_dir: Path, data_dir: Path, out: Path) -> str:
    """The referee's train split in `dataset`'s own MovieLens layout: the ratings file holds the train
    rows, the item and user files are copied from `data_dir`. Returns the product's --source."""
    from feature_workflows.movielens import FILES

    source = DATASETS[dataset][2]
    ratings_name, *copied = FILES[source]
    out.mkdir(parents=True, exist_ok=True)
    with open(split_dir / "train.csv") as src, open(out / ratings_name, "w", newline="") as dst:
        rows = ((r["user"], r["item"], r["rating"], r["ts"]) for r in csv.DictReader(src))
        if dataset == "mlls":
            writer = csv.writer(dst)
            writer.writerow(["userId", "movieId", "rating", "timestamp"])
            writer.writerows(rows)
        else:
            sep = "\t" if dataset == "ml100k" else "::"
            dst.writelines(sep.join(r) + "\n" for r in rows)
    for name in copied:
        shutil.copy2(data_dir / name, out / name)
    return source


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


def fit_baselines(referee: Path, data: Path, dataset: str, protocol: str, work: Path) -> dict:
    """The referee's tuned baselines on the same split (wide grid, chosen on valid NDCG@10):
    {"systems": {name: {"test": metrics, "stderr": ..., "best_params": ...}}, "split_info": ..., "wall_s": ...}."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"baselines_{protocol}.json"
    env = {**os.environ, "REFEREE_DATA": str(data.parent), "REFEREE_RESULTS": str(work)}
    _run([sys.executable, str(referee), "baselines", "--dataset", dataset, "--protocol", protocol, "--grid", "wide",
          "--only", ",".join(BASELINES), "--out-json", str(out)], env, quiet=True)
    res = json.loads(out.read_text())
    return {"split_info": res["split_info"], "wall_s": res["wall_seconds"],
            "systems": {name: {"test": {m: r["test"][m] for m in BASELINE_METRICS}, "stderr": r["test"]["stderr"],
                               "best_params": r["best_params"]} for name, r in res["results"].items()}}


def build_artifacts(protocol: str, work: Path, cfg_path: str | None, referee: str | None = None, data: str | None = None,
                    timings: dict | None = None, layout: str = "movielens", dataset: str = "mlls",
                    hand_over: tuple[str, Path] | None = None, peak_rss: dict | None = None) -> Path:
    """The referee's split -> the data set's MovieLens layout (or the generic file) -> the product's own
    commands (data, features --deploy, train, export). Returns the artifacts folder. `hand_over`
    (release, folder with its item and user files): give the product the split in that release's layout instead.
    `timings` and `peak_rss` get each stage's wall seconds and peak RSS (GB)."""
    referee = referee or str(SHARED / "quality" / "referee.py")
    data = data or str(SHARED / "data" / DATASETS[dataset][0])
    if work.exists():
        shutil.rmtree(work)
    split_dir, ml_dir, art = work / "split", work / "ml", work / "artifacts"
    py = sys.executable
    env = {**os.environ, "REFEREE_DATA": str(Path(data).parent)}
    _run([py, referee, "split", "--dataset", dataset, "--protocol", protocol, "--out", str(split_dir)]
         + (["--allow-repo-path"] if dataset != "mlls" and _ignored(split_dir) else []), env)
    if layout == "interactions":
        source = ["--source", "interactions", "--interactions", str(_interactions_file(split_dir, work / "generic"))]
    else:
        release, files = hand_over or (dataset, Path(data))
        source = ["--source", _ml_layout(release, split_dir, Path(files), ml_dir), "--movielens-dir", str(ml_dir)]
    shoprec = [py, "-m", "app.cli", "--artifacts", str(art), "--quiet"] + (["--config", cfg_path] if cfg_path else [])
    for stage, extra in (("data", source),
                         ("features", ["--deploy"]), ("train", []), ("export", [])):
        t = time.time()
        _run(shoprec + [stage, *extra], quiet=stage != "train", peak_rss=peak_rss, key=stage)
        if timings is not None:
            timings[stage] = round(time.time() - t, 1)
    return art


def referee_datasets(referee: Path) -> list[str]:
    """The data sets `referee.py split --dataset` accepts, as its --help lists them."""
    text = _run([sys.executable, str(referee), "split", "--help"], quiet=True)
    found = re.search(r"--dataset \{([^}]*)\}", text)
    return found.group(1).split(",") if found else []


def _ignored(path: Path) -> bool:
    """Whether git ignores `path` (so the referee may write another release's split there)."""
    out = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO_ROOT, capture_output=True)
    return out.returncode == 0


def run_protocol(protocol: str, args, cfg_path: str | None) -> dict:
    dataset = getattr(args, "dataset", "mlls")
    work = Path(args.work) / protocol
    split_dir = work / "split"
    referee = [sys.executable, str(args.referee)]
    env = {**os.environ, "REFEREE_DATA": str(Path(args.data).parent)}
    t0 = time.time()
    timings: dict = {}
    peak_rss: dict = {}
    art = build_artifacts(protocol, work, cfg_path, str(args.referee), str(args.data), timings, args.layout, dataset,
                          getattr(args, "hand_over", None), peak_rss)

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
        _run(referee + ["score", "--dataset", dataset, "--protocol", protocol, "--part", part, "--ranked", str(ranked),
                        "--json", str(out_json)], env, quiet=True)
        results[part] = json.loads(out_json.read_text())
    timings["total"] = round(time.time() - t0, 1)
    train_report = json.loads((art / "models" / "train_report.json").read_text())
    return {"dataset": dataset, "protocol": protocol, "layout": args.layout, "referee": results, "timings_s": timings,
            "peak_rss_gb": peak_rss, "served_users": len(lists),
            "train": {"cf": train_report.get("cf"), "ranker_deep": train_report["ranking"].get("deep"),
                      "retrieval_best_epoch": train_report["retrieval_stage_a"]["best_epoch"],
                      "popularity_prior": train_report.get("popularity_prior", {}).get("weight"),
                      "ann_popularity_prior": train_report.get("ann_popularity_prior", {}).get("weight"),
                      "seconds": train_seconds(train_report)}}


def train_seconds(report: dict) -> dict:
    """Where `train`'s time went, from its report: each part's seconds (the two-tower's fits for each whole-history
    share, its final fit, the ranker, the item-to-item fit) and the whole."""
    return {"cf": (report.get("cf") or {}).get("seconds"),
            **{f"two_tower_share_{share}": fit.get("train_seconds")  # the chosen one is stage A's model
               for share, fit in (report.get("whole_history_share") or {}).get("fits", {}).items()},
            "two_tower_final": report.get("retrieval", {}).get("train_seconds"),
            "ranker": report.get("ranking", {}).get("train_seconds"), "total": report.get("seconds")}


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


def metrics_table(baselines: dict, served: dict, stderr: dict, labels: dict | None = None) -> list[str]:
    """The referee-style table: each baseline's test metrics ({name: metrics}; `labels`: what the rows say instead of
    "NAME (referee)"), then the served pipeline with its standard errors."""
    lines = ["| system | Recall@10 | NDCG@10 | Recall@50 | Recall@100 | HitRate@10 |", "|---|---|---|---|---|---|"]
    for name, row in baselines.items():
        lines.append(f"| {(labels or {}).get(name, f'{name} (referee)')} | {row['Recall@10']:.4f} | {row['NDCG@10']:.4f} | "
                     f"{row['Recall@50']:.4f} | {row['Recall@100']:.4f} | {row['HitRate@10']:.4f} |")
    lines.append(f"| **served pipeline** | **{served['Recall@10']:.4f}** ± {stderr.get('Recall@10', 0):.4f} | "
                 f"**{served['NDCG@10']:.4f}** ± {stderr.get('NDCG@10', 0):.4f} | {served['Recall@50']:.4f} | "
                 f"{served['Recall@100']:.4f} | {served['HitRate@10']:.4f} |")
    return lines


def markdown(summary: dict, baselines: dict, meta: dict) -> str:
    folder = DATASETS[meta.get("dataset", "mlls")][0]
    given = ("the generic interactions file (ratings only, no item attributes)" if meta.get("layout") == "interactions"
             else f"the {folder} files")
    lines = [f"# Served recommendations on {folder}, scored by the referee", "", f"The product was given {given}.", "",
             f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}). The lists are what the running "
             "tritonserver returned (top 100, no context, seen items excluded). Baselines: the referee's published "
             "table (wide grid, test), or where it has none, the referee's baselines fitted on the same split "
             "(`referee.py baselines --grid wide`, chosen on valid NDCG@10).", ""]
    for protocol, s in summary.items():
        lines += [f"## {protocol} ({s['users']} test users)", "",
                  *metrics_table(baselines.get(protocol, {}), s["served"], s["stderr"])]
        r = s["ratio_to_best"]
        lines += ["", f"Ratio to the best baseline: Recall@10 {r['Recall@10']:.3f}x, NDCG@10 {r['NDCG@10']:.3f}x "
                  f"(target {TARGET:.2f}x). Valid (not tuned on): Recall@10 {s['valid']['Recall@10']:.4f}, "
                  f"NDCG@10 {s['valid']['NDCG@10']:.4f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mlls", choices=list(DATASETS),
                        help="the referee's data set (default mlls, the public development set)")
    parser.add_argument("--protocols", nargs="+", default=list(DEFAULT_PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--referee", default=str(SHARED / "quality" / "referee.py"))
    parser.add_argument("--data", default=None,
                        help="the data set's folder, named as the referee names it (default ../shared/data/ml-latest-small)")
    parser.add_argument("--work", default=None, help="splits, tables and artifacts (default: artifacts/referee for "
                        "ml-latest-small, a temporary folder outside this work tree for the others)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--config", default=None, help="shoprec config (default: configs/default.toml)")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--layout", default="movielens", choices=["movielens", "interactions"],
                        help="what the product is given: the data set's MovieLens files (default) or the generic "
                             "interactions file without any item attributes (results get the suffix _interactions)")
    args = parser.parse_args(argv)
    folder, ratings, _ = DATASETS[args.dataset]
    args.data = args.data or str(SHARED / "data" / folder)
    if Path(args.data).name != folder:
        raise SystemExit(f"referee_bench: --data {args.data}: the referee reads {args.dataset} from a folder named "
                         f"{folder!r} (it is given that folder's parent)")
    suffix = ("" if args.dataset == "mlls" else f"_{args.dataset}") + ("" if args.layout == "movielens" else f"_{args.layout}")
    args.work = args.work or str(REPO_ROOT / "artifacts" / "referee" if args.dataset == "mlls"
                                 else Path(tempfile.gettempdir()) / "shoprec_referee" / args.dataset)
    if args.layout != "movielens":
        args.work = str(Path(args.work).with_name(Path(args.work).name + f"_{args.layout}"))
    for p in (Path(args.referee), Path(args.data) / ratings):
        if not p.exists():
            raise SystemExit(f"referee_bench: {p} not found (the referee and ml-latest-small live in ../shared; --data names another data set's folder)")
    known = referee_datasets(Path(args.referee))
    if args.dataset not in known:
        raise SystemExit(f"referee_bench: {args.referee} splits only {', '.join(known)}, not {args.dataset} "
                         "(use a referee that lists it)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    published = published_baselines(Path(args.referee).parent / "README.md") if args.dataset == "mlls" else {}
    runs, baselines = {}, {}
    for protocol in args.protocols:
        print(f"== {protocol}", flush=True)
        runs[protocol] = run_protocol(protocol, args, args.config)
        if protocol in published:
            baselines[protocol] = published[protocol]
        else:
            fitted = fit_baselines(Path(args.referee), Path(args.data), args.dataset, protocol,
                                   Path(args.work) / protocol / "baselines")
            runs[protocol]["baselines_fitted"] = fitted
            baselines[protocol] = {name: s["test"] for name, s in fitted["systems"].items()}
        (out / f"referee_{protocol}{suffix}.json").write_text(json.dumps(runs[protocol], indent=1) + "\n")
    meta = {"command": command_line("python -m benchmarks.referee_bench", argv),
            "date": time.strftime("%Y-%m-%d"), "machine": describe(), "dataset": args.dataset, "layout": args.layout}
    summary = summarize(runs, baselines)
    summary_json, summary_md = out / f"referee_summary{suffix}.json", out / f"referee_summary{suffix}.md"
    prev = json.loads(summary_json.read_text()) if summary_json.exists() else {}
    summary = {**{k: v for k, v in prev.get("protocols", {}).items() if k not in summary}, **summary}
    baselines = {**{k: v for k, v in prev.get("baselines", {}).items() if k in summary}, **baselines}
    summary_json.write_text(json.dumps({**meta, "protocols": summary, "baselines": baselines}, indent=1) + "\n")
    summary_md.write_text(markdown(summary, baselines, meta))
    print(markdown(summary, baselines, meta))
    return summary


if __name__ == "__main__":
    main()
