"""Does the period `train` chooses the popularity prior on agree with the test period? Popularity's order
beside the served order's prior curve, on the valid split's users `train` chose it on.

    .venv/bin/python -m benchmarks.prior_periods --artifacts /work/large --tag large   # ~1 min at 1M items

`train` picks the served score's popularity exponent w on the features' valid split: the weeks right after
the train window, each user's state their train actions (training.train.valid_split_queries). It keeps the
curve in models/train_report.json. This adds what the curve leaves out: popularity's own NDCG@10 on the same
users (their first 10 unseen items of the train popularity order), so one can see whether the served order
beat popularity there. `evaluate`'s test period is the 10 % after the valid one, with the same train state:
a list that beats popularity on valid and loses to it on test lost to the distance, not to the choice.

With --served, the served pipeline (the bundle's steps in-process, as `evaluate` runs them: the server's item
index, its candidate features, its ranker) is scored on the same users at every w of the curve. `train` builds
its lists with exact search and its in-memory models, so the two curves agree when the server serves what
`train` measured; on the large shop they did not, and the difference was the item index (docs/performance.md, Building
the large shop). --bundle scores another exported version (default: the served one, ARTIFACTS/serving).
Writes benchmarks/results/prior_periods_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config
from shoprec.manifest import verified_path
from training import train as T
from training.data import FeatureData
from training.metrics import mean_se, per_user_ndcg

from .machine import publish


def measure(artifacts: Path, config: Path | None = None, served: Path | None = None) -> dict:
    cfg = load_config(config)
    report = json.loads(verified_path(artifacts / "models", "train_report.json").read_text())
    curve = report["popularity_prior"].get("valid_split_ndcg@10")
    if curve is None:
        raise SystemExit(f"{artifacts}/models/train_report.json: the prior was not chosen on a valid split "
                         f"({report['popularity_prior']['chosen_on']}); nothing to compare")
    data = FeatureData(artifacts / "features")
    train = data.actions[data.actions["split"] == 0]
    users, truth = T.valid_split_users(data, train, cfg)
    if len(truth) != curve["users"]:
        raise SystemExit(f"{artifacts}: {len(truth)} valid-split users here, {curve['users']} in train_report.json; "
                         "pass the --config train ran with")
    q = data.queries(users, data.action_log(train))
    truth = [set(t) for t in truth]
    top = T._popular_unseen(data.popular_rows, T.seen_mask(q, data.n_items), 10)
    mean, se = mean_se(per_user_ndcg(top, truth, 10))
    weights = [w for w in curve if w != "users"]
    out = {"users": len(truth), "chosen_weight": report["popularity_prior"]["weight"],
           "valid_split_ndcg@10": {"popularity": {"mean": round(mean, 5), "se": round(se, 5)},
                                   **{f"train's lists, w = {w}": curve[w] for w in weights}}}
    if served is not None:
        version, rows = served_curve(served, users, truth, [float(w) for w in weights], cfg)
        out["bundle"] = version
        out["valid_split_ndcg@10"].update({f"served, w = {w}": v for w, v in zip(weights, rows)})
    return out


def served_curve(bundle: Path, users, truth: list[set], weights: list[float], cfg) -> tuple[dict, list[dict]]:
    """The bundle's pipeline in-process on `users` (`evaluate.served_lists`' steps): each w's NDCG@10 when the
    ranker's scores are multiplied by the popularity factor of w, and the bundle's version and index."""
    from runtime.pipeline import Pipeline
    from runtime.steps import best_first, popularity_factor
    from shoprec.manifest import read_manifest
    from training.evaluate import TOPN, served_batches

    pipe = Pipeline(bundle, cfg=cfg.serve)  # checks each bundle file against the manifest as it loads it
    popularity = pipe.item_table["popularity"]
    kept = [(c, t["ranking_scores"]) for c, _, t in served_batches(pipe, users, TOPN)]  # not each batch's tensors
    cand, sc = np.concatenate([c for c, _ in kept]), np.concatenate([s for _, s in kept])
    out = []
    for w in weights:
        f = popularity_factor(popularity, w)[np.maximum(cand, 0)]
        top = np.take_along_axis(cand, best_first(cand, np.where(cand >= 0, sc * f, sc), 10), 1)
        mean, se = mean_se(per_user_ndcg(top, truth, 10))
        out.append({"mean": round(mean, 5), "se": round(se, 5)})
    index = read_manifest(bundle).get("report", {}).get("index", {})  # export's report: metadata, not an artifact
    return {"version": pipe.bundle.version, "index": {k: index.get(k) for k in ("kind", "nprobe", "queries_from")}}, out


def markdown(r: dict) -> list[str]:
    pop = r["valid_split_ndcg@10"]["popularity"]["mean"]
    lines = [f"# The popularity prior's period: `{r['tag']}`", "",
             f"{r['users']} valid-split users (`train`'s choice of w: {r['chosen_weight']}). NDCG@10 ± s.e. "
             f"Command: `{r['command']}`; commit {r['commit']}."
             + (f" Served: bundle version {r['bundle']['version']}, index {r['bundle']['index']}." if "bundle" in r else ""),
             "",
             "| on the valid split | ndcg@10 | × popularity |", "|---|---|---|"]
    for name, v in r["valid_split_ndcg@10"].items():
        lines.append(f"| {name} | {v['mean']:.4f} ± {v['se']:.4f} | {v['mean'] / pop:.2f} |" if pop else
                     f"| {name} | {v['mean']:.4f} ± {v['se']:.4f} | – |")
    return lines + ["", f"Machine: {r['machine']}."]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts", help="a trained shop (features + models)")
    ap.add_argument("--config", type=Path, default=None, help="the config `train` ran with (default: the default config)")
    ap.add_argument("--served", action="store_true", help="also score the served pipeline on the same users at each w")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="with --served: the bundle version to score (default: ARTIFACTS/serving, the served one)")
    ap.add_argument("--tag", required=True, help="writes RESULTS/prior_periods_<tag>.{json,md}")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.bundle is not None and not args.served:
        ap.error("--bundle needs --served")
    r = measure(args.artifacts, args.config, (args.bundle or args.artifacts / "serving") if args.served else None)
    publish(args.results, "prior_periods", args.tag, r, markdown, argv)


if __name__ == "__main__":
    main()
