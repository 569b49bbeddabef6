"""Does the period `train` chooses the popularity prior on agree with the test period? Popularity's order
beside the served order's prior curve, on the valid split's users `train` chose it on.

    .venv/bin/python -m benchmarks.prior_periods --artifacts /work/large --tag large   # ~1 min at 1M items

`train` picks the served score's popularity exponent w on the features' valid split: the weeks right after
the train window, each user's state their train actions (training.train.valid_split_queries). It keeps the
curve in models/train_report.json. This adds what the curve leaves out: popularity's own NDCG@10 on the same
users (their first 10 unseen items of the train popularity order), so one can see whether the served order
beat popularity there. `evaluate`'s test period is the 10 % after the valid one, with the same train state:
a list that beats popularity on valid and loses to it on test lost to the distance, not to the choice.
Writes benchmarks/results/prior_periods_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config
from shoprec.manifest import verified_path
from training import train as T
from training.data import FeatureData
from training.metrics import mean_se, per_user_ndcg

from .machine import command_line, commit, describe, write_report


def measure(artifacts: Path, config: Path | None = None) -> dict:
    cfg = load_config(config)
    report = json.loads(verified_path(artifacts / "models", "train_report.json").read_text())
    curve = report["popularity_prior"].get("valid_split_ndcg@10")
    if curve is None:
        raise SystemExit(f"{artifacts}/models/train_report.json: the prior was not chosen on a valid split "
                         f"({report['popularity_prior']['chosen_on']}); nothing to compare")
    data = FeatureData(artifacts / "features")
    train = data.actions[data.actions["split"] == 0]
    q, truth = T.valid_split_queries(data, train, cfg)
    if len(truth) != curve["users"]:
        raise SystemExit(f"{artifacts}: {len(truth)} valid-split users here, {curve['users']} in train_report.json; "
                         "pass the --config train ran with")
    top = T._popular_unseen(data.popular_rows, T.seen_mask(q, data.n_items), 10)
    mean, se = mean_se(per_user_ndcg(top, [set(t) for t in truth], 10))
    served = {w: v for w, v in curve.items() if w != "users"}
    return {"users": len(truth), "chosen_weight": report["popularity_prior"]["weight"],
            "valid_split_ndcg@10": {"popularity": {"mean": round(mean, 5), "se": round(se, 5)},
                                    **{f"served w = {w}": v for w, v in served.items()}}}


def markdown(r: dict) -> list[str]:
    pop = r["valid_split_ndcg@10"]["popularity"]["mean"]
    lines = [f"# The popularity prior's period: `{r['tag']}`", "",
             f"{r['users']} valid-split users (`train`'s choice of w: {r['chosen_weight']}). NDCG@10 ± s.e. "
             f"Command: `{r['command']}`; commit {r['commit']}.", "",
             "| on the valid split | ndcg@10 | × popularity |", "|---|---|---|"]
    for name, v in r["valid_split_ndcg@10"].items():
        lines.append(f"| {name} | {v['mean']:.4f} ± {v['se']:.4f} | {v['mean'] / pop:.2f} |" if pop else
                     f"| {name} | {v['mean']:.4f} ± {v['se']:.4f} | – |")
    return lines + ["", f"Machine: {r['machine']}."]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts", help="a trained shop (features + models)")
    ap.add_argument("--config", type=Path, default=None, help="the config `train` ran with (default: the default config)")
    ap.add_argument("--tag", required=True, help="writes RESULTS/prior_periods_<tag>.{json,md}")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    r = measure(args.artifacts, args.config)
    r.update(tag=args.tag, machine=describe(), commit=commit(),
             command=command_line("python -m benchmarks.prior_periods", argv))
    md = markdown(r)
    write_report(args.results, "prior_periods", args.tag, r, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
