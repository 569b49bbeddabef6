"""Which holdout should the ranker learn on when users have few visits? The same shop, thinned to a few
visits per user, built twice: with `features.holdout_unit = "session"` (the default: whole visits, with its
fallbacks for users it would leave with no fit visit) and with `"action"` (single actions).

    .venv/bin/python -m benchmarks.holdout_units --artifacts artifacts --visits 2 --tag small-2-visits   # ~3 min (medium: ~33 min)

Each user keeps `--visits` of their sessions, drawn at random over the whole timeline (impressions go with their
session), so most users have one or two visits before the test period: the sparse regime of the large shop and
of session-keyed shop logs. Then `features`, `train`, `export` and `evaluate` run as the README says, once per
unit, on the same thinned data. Reported per unit: how the train actions split into the fit and holdout folds,
how many train users keep no fit action, the ranker's choices, and the test figures `evaluate` gives (warm
users, NDCG@10 and Recall@10 ± s.e.). Writes benchmarks/results/holdout_units_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from shoprec.config import DEFAULT_CONFIG, REPO_ROOT
from shoprec.manifest import verify_manifest

from .machine import command_line, commit, describe, write_report

SYSTEMS = ("popularity", "two_tower", "merged_order", "served_pipeline")


def thin(raw: Path, out: Path, visits: int, seed: int) -> dict:
    """A copy of the raw folder `raw` in `out` whose users keep `visits` random sessions each (0: all)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(raw, out, ignore=shutil.ignore_patterns("interactions"))
    events = pd.read_parquet(raw / "interactions")
    if visits:
        sessions = events[["user_id", "session_id"]].drop_duplicates()
        sessions = sessions.assign(draw=np.random.default_rng(seed).random(len(sessions)))
        sessions["rank"] = sessions.groupby("user_id")["draw"].rank(method="first")
        kept = sessions.loc[sessions["rank"] <= visits, ["user_id", "session_id"]]
        events = events.merge(kept, on=["user_id", "session_id"])
    (out / "interactions").mkdir()
    events.to_parquet(out / "interactions" / "part-00000.parquet", index=False)
    per_user = events.groupby("user_id")["session_id"].nunique()
    return {"events": len(events), "users": int(len(per_user)), "visits_per_user": round(float(per_user.mean()), 2)}


def config_for(unit: str, path: Path) -> Path:
    text = DEFAULT_CONFIG.read_text()
    new, n = re.subn(r'(?m)^holdout_unit = ".*"$', f'holdout_unit = "{unit}"', text)
    if n != 1:
        raise SystemExit(f"holdout_units: {DEFAULT_CONFIG}: expected one `holdout_unit = ...` line, found {n}")
    path.write_text(new)
    return path


def folds(features: Path) -> dict:
    verify_manifest(features, ["actions.parquet"])
    acts = pd.read_parquet(features / "actions.parquet", columns=["user_id", "split", "fold"])
    train = acts[acts["split"] == 0]
    no_fit = train.groupby("user_id")["fold"].min() == 1
    return {"train_actions": int(len(train)), "holdout_share": round(float((train["fold"] == 1).mean()), 4),
            "train_users": int(len(no_fit)), "users_without_fit_action": int(no_fit.sum())}


def build(unit: str, raw: Path, work: Path) -> dict:
    art = work / unit
    if art.exists():
        shutil.rmtree(art)
    (art / "data").mkdir(parents=True)
    shutil.copytree(raw, art / "data" / "raw")
    cfg = config_for(unit, work / f"config_{unit}.toml")
    shoprec = [sys.executable, "-m", "app.cli", "--artifacts", str(art), "--quiet", "--config", str(cfg)]
    seconds = {}
    for stage, extra in (("features", []), ("train", []), ("export", []),
                         ("evaluate", ["--tag", unit, "--results", str(work / "results"), "--overwrite"])):
        t = time.time()
        done = subprocess.run(shoprec + [stage, *extra], cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"holdout_units: `{stage}` with holdout_unit = {unit!r} failed:\n{done.stderr[-2000:]}")
        seconds[stage] = round(time.time() - t, 1)
    quality = json.loads((work / "results" / f"quality_{unit}.json").read_text())
    train_report = json.loads((art / "models" / "train_report.json").read_text())
    warm = {name: {m: quality["results"][name]["warm"][m] for m in ("ndcg@10", "recall@10")} for name in SYSTEMS}
    ranking = train_report["ranking"]
    return {"folds": folds(art / "features"), "warm_users": int(quality["users"]["warm"]), "warm": warm,
            "ranker": {"deep": ranking["deep"], "holdout_lists": ranking["lists"]["users"],
                       "holdout_ndcg@10": round(ranking["valid_ndcg@10"], 4),
                       "holdout_ndcg@10_merged_order": round(ranking["valid_ndcg@10_merged_order"], 4),
                       "candidate_recall": round(ranking["candidate_recall"], 4),
                       "popularity_prior": train_report["popularity_prior"]["weight"]},
            "seconds": seconds}


def markdown(report: dict) -> list[str]:
    md = [f"# The ranker's holdout unit on a thinned shop: `{report['tag']}`", "",
          f"Command: `{report['command']}` ({report['date']}, {report['machine']}, commit {report['commit']}). "
          f"Data: {report['data']['events']:,} events of {report['data']['users']:,} users, "
          f"{report['data']['visits_per_user']} visits a user. Test: the {next(iter(report['units'].values()))['warm_users']:,} "
          "warm users of the `time` split, mean ± s.e. "
          "(the two runs are separate trainings on the same data: their difference holds run-to-run variation too).",
          "", "| unit | holdout share of train actions | train users with no fit action | ranker holdout NDCG@10 "
          "(merged order) | prior w | " + " | ".join(f"{s} NDCG@10" for s in SYSTEMS) + " | served Recall@10 |",
          "|---" * (6 + len(SYSTEMS)) + "|"]
    for unit, r in report["units"].items():
        f, k = r["folds"], r["ranker"]
        cells = [unit, f"{f['holdout_share']:.3f}", f"{f['users_without_fit_action']} of {f['train_users']}",
                 f"{k['holdout_ndcg@10']:.4f} ({k['holdout_ndcg@10_merged_order']:.4f})", f"{k['popularity_prior']:g}"]
        cells += [f"{r['warm'][s]['ndcg@10']['mean']:.4f} ± {r['warm'][s]['ndcg@10']['se']:.4f}" for s in SYSTEMS]
        served = r["warm"]["served_pipeline"]["recall@10"]
        cells.append(f"{served['mean']:.4f} ± {served['se']:.4f}")
        md.append("| " + " | ".join(cells) + " |")
    return md


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default="artifacts", help="a built shop; its data/raw folder is thinned")
    parser.add_argument("--visits", type=int, default=2, help="sessions kept per user, drawn at random (0: all)")
    parser.add_argument("--units", nargs="+", default=["session", "action"], choices=["session", "action"])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--work", default=None, help="scratch folder (default: ARTIFACTS/holdout_units)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", required=True)
    args = parser.parse_args(argv)
    raw = Path(args.artifacts) / "data" / "raw"
    if not (raw / "interactions").exists():
        raise SystemExit(f"holdout_units: {raw / 'interactions'}: no raw interactions here; build the shop first "
                         "(`make demo`, or `shoprec --artifacts A data`)")
    work = Path(args.work or Path(args.artifacts) / "holdout_units")
    work.mkdir(parents=True, exist_ok=True)
    data = thin(raw, work / "raw", args.visits, args.seed)
    report = {"tag": args.tag, "command": command_line("python -m benchmarks.holdout_units", argv),
              "date": time.strftime("%Y-%m-%d"), "machine": describe(), "commit": commit(),
              "visits": args.visits, "seed": args.seed, "data": data, "units": {}}
    for unit in args.units:
        print(f"holdout_units: building with holdout_unit = {unit!r}", flush=True)
        report["units"][unit] = build(unit, work / "raw", work)
    md = markdown(report)
    write_report(args.out, "holdout_units", args.tag, report, md)
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
