"""Does another ranker do better on the same candidates? Loss, capacity and extra features, side by side.

    .venv/bin/python -m benchmarks.ranker_variants --tag small                              # after make demo
    .venv/bin/python -m benchmarks.ranker_variants --referee random-8-1-1 --tag mlls-random  # ml-latest-small

The served ranker is wide only below `ranking.deep_min_lists` lists (every real data set here): a linear model
of the standardised candidate, item and user features with a CTR and an ESMM CVR head. Until 2026-12-07 it was
trained pointwise only (binary cross-entropy); this asks where its quality stops, and what changed that. One bundle's stage-A lists (the
two-tower refitted on the fit fold with the share and epochs `train` chose, the routes with its EASE lambda,
the same held-out users and labels as `train`) train each variant; the bundle's final models make the evaluated
users' candidates, as in `benchmarks/ablation.py`, and each variant only re-orders them. Every row is training/train.py's own `train_ranker` (its steps, batch, EMA, CTR + ESMM CVR cross-entropy) with one
thing changed from the reference:
- `wide, pointwise`: the wide part alone, cross-entropy only (`ranking.listwise_weight = 0`), the rule before
  2026-12-07 and the reference row;
- `+ listwise loss`: plus a softmax over each list with its clicks as targets (ListNet), weight 1 (now the default,
  `ranking.listwise_weight`);
- `+ deep part`: the ranker's deep part on (embeddings, DIN over the recent actions, the bottom and top MLPs;
  `ranking.deep = "on"`), pointwise;
- `+ list-relative scores`: the four score features also divided by their largest magnitude in the list, as extra
  dense features;
- `+ ALS score`: the user-item dot product of an `implicit` ALS fitted on the same actions as the lists' models
  (64 factors, regularisation .05, alpha 1, 15 iterations), an extra dense feature;
- `served`: `train_ranker` as configured: the deep part as `ranking.deep` decides by the number of lists (on where
  "auto" would compare it with wide alone), the listwise weight of the config;
- `served + trending score`: the served ranker with the trending route's score of each candidate as an extra dense
  feature: log(1 + its positives weighted 0.5 ** (age / `serve.trending_half_life_days`)), the age taken at the train
  window's last action (the fit fold's positives for the training lists, all of train's for the evaluated users).
  Is recent popularity something the ranker lacks? Also paired with `served`.
Before 2026-12-07 (commit 7bbe031's results) the rows came from a copy of the training loop in this file, and an MLP
of the dense features stood where the deep part stands now.
Figures: NDCG@10 and Recall@10 of the evaluated users (mean ± s.e.): synthetic shop, warm test users; ml-latest-small,
the referee's valid and test users, scored by the referee. Writes benchmarks/results/ranker_variants_<tag>.{json,md}.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from runtime.candidates import trending_scores
from shoprec.manifest import verified_path

from training.metrics import mean_se

SCORE_COLUMNS = ("cf_all", "cf_pos", "cf_recent", "two_tower")
REFERENCE = "wide, pointwise"  # the row the others are paired with
SERVED, TRENDING = "served (training/train.py)", "served + trending score"  # the latter also paired with the former


def with_columns(lists: dict, extra: np.ndarray | None = None, relative: bool = False) -> dict:
    """The lists with the variant's dense features appended: each score feature relative to its largest magnitude
    in the list, and an extra [U, N] column."""
    parts = [lists["dense"]]
    if relative:
        from runtime.candidates import DENSE_FEATURES

        ok = lists["rows"] >= 0
        for name in SCORE_COLUMNS:
            v = lists["dense"][..., DENSE_FEATURES.index(name)]
            top = np.abs(np.where(ok, v, 0.0)).max(1, keepdims=True)
            parts.append((v / np.where(top > 0, top, 1.0))[..., None])
    if extra is not None:
        parts.append(extra[..., None])
    return {**lists, "dense": np.concatenate(parts, axis=2).astype(np.float32)}


def als_scores(data, actions, users: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[U, N] dot products of an implicit ALS fitted on `actions`' positives (0 for a user it never saw)."""
    from implicit.cpu.als import AlternatingLeastSquares

    from training import cf as cflib

    pos = actions[actions["kind"] >= 2]
    x, uniq = cflib.interaction_matrix(pos["user_id"].values, pos["item_row"].values, data.n_items)
    model = AlternatingLeastSquares(factors=64, regularization=0.05, alpha=1.0, iterations=15, random_state=0)
    model.fit(x.astype(np.float32).tocsr(), show_progress=False)
    at = np.searchsorted(uniq, users)
    known = (at < len(uniq)) & (uniq[np.minimum(at, len(uniq) - 1)] == users)
    u = np.zeros((len(users), model.factors), np.float32)
    u[known] = model.user_factors[at[known]]
    return np.einsum("uf,unf->un", u, model.item_factors[np.maximum(rows, 0)]).astype(np.float32)


def stage_a_lists(artifacts: Path, cfg, category_smoothing: tuple[float, ...] = (0.0,)):
    """The ranker's training lists as `train` built them: the held-out users, stage A's models, their labels.
    Returns (data, fit, train, tt_a, users, {smoothing: lists}): one set of lists per category route smoothing
    (0: the served route), stage A trained once."""
    from runtime.candidates import CandidateGenerator, popularity_bias
    from training import train as T
    from training.data import FeatureData, context_of

    data = FeatureData(artifacts / "features")
    report = json.loads(verified_path(artifacts / "models", "train_report.json").read_text())
    train = data.actions[data.actions["split"] == 0]
    fit, hold = train[train["fold"] == 0], train[train["fold"] == 1]
    rc, kc = cfg.retrieval, cfg.ranking
    users, truth, first_ts = data.holdout_truth(fit, hold, max(rc.max_valid_users, kc.max_users), rc.seed)
    hour, weekday = context_of(first_ts, rc.context_dropout, np.random.default_rng(kc.seed))
    q = data.queries(users, data.action_log(fit), hour=hour, weekday=weekday)
    tt_a, _ = T.train_two_tower(data, rc, (0,), data.items["item_cont_fit"], "cpu", report["retrieval_stage_a"]["best_epoch"],
                                None, False, "retrieval", float(report["whole_history_share"]["share"]))
    cf_all, cf_pos = T.fit_routes(data, fit, cfg, report["cf"]["ease_lambda"])
    items = T.item_embeddings(tt_a, data.item_cat, data.items["item_cont_fit"], "cpu")
    n = min(len(users), kc.max_users)
    sel = np.arange(n)
    q_sel = T._slice_q(q, sel)
    emb = T.user_embeddings(tt_a, q_sel, "cpu")
    keep = ~(np.random.default_rng(kc.seed + 1).random(n) < kc.valid_share)  # train's own split of the lists
    out = {}
    for alpha in category_smoothing:
        gen = CandidateGenerator(items, None, cf_all, cf_pos, data.items["popular_rows_fit"], cfg.serve.num_candidates,
                                 cfg.serve.recent_window, T._exempt(data, cfg), T.fit_categories(data, alpha),
                                 ann_bias=popularity_bias(data.items["popularity_fit"], report["ann_popularity_prior"]["bias_weight"]))
        lists = T.ranker_lists(data, gen, q_sel, emb, truth[:n])
        out[alpha] = {k: v[keep] for k, v in lists.items()}
    return data, fit, train, tt_a, users[:n][keep], out


def run(artifacts: Path, cfg, evaluators: dict) -> dict:
    """evaluators: {part: ablation.Evaluator}; each variant's lists scored on every part."""
    from training import train as T

    kc = cfg.ranking
    data, fit, train, tt_a, users_a, lists = stage_a_lists(artifacts, cfg)
    lists = lists[0.0]
    parts = {name: ev.prepare(data, cfg, lists_only=True)["lists"] for name, ev in evaluators.items()}
    als_a = als_scores(data, fit, users_a, lists["rows"])
    als_e = {name: als_scores(data, train, evaluators[name].users, ev["rows"]) for name, ev in parts.items()}
    trend_fit, trend_all = (np.log1p(trending_scores(a["item_row"].to_numpy(), a["ts"].to_numpy(), a["kind"].to_numpy(),
                                                     data.n_items, cfg.serve.trending_half_life_days,
                                                     float(train["ts"].max()))).astype(np.float32) for a in (fit, train))
    trend_a = trend_fit[np.maximum(lists["rows"], 0)]
    trend_e = {name: trend_all[np.maximum(ev["rows"], 0)] for name, ev in parts.items()}
    report: dict = {"lists": {"train_users": int(len(users_a)), "candidates": int(lists["rows"].shape[1])}, "variants": {}}

    per_user: dict = {}

    def scored(name: str, tops: dict, seconds: float) -> None:
        report["variants"][name] = {part: evaluators[part](top) for part, top in tops.items()}
        for part in tops:  # paired with the reference row (the wide ranker, pointwise), user by user
            mine = per_user.setdefault(name, {})[part] = report["variants"][name][part].pop("per_user_ndcg@10")
            ref = per_user.get(REFERENCE, {}).get(part)
            if ref is not None and name != REFERENCE:
                report["variants"][name][part]["NDCG@10 - reference"] = mean_se(mine - ref)
        report["variants"][name]["train_seconds"] = round(seconds, 1)
        print(f"ranker_variants: {name}: " + "  ".join(f"{p} NDCG@10 {m['NDCG@10'][0]:.4f}" for p, m in
                                                      report["variants"][name].items() if p != "train_seconds"), flush=True)

    wide = dict(deep=False, listwise_weight=0.0)
    variants = {REFERENCE: wide, "+ listwise loss": {**wide, "listwise_weight": 1.0}, "+ deep part": {**wide, "deep": True},
                "+ list-relative scores": {**wide, "relative": True}, "+ ALS score": {**wide, "als": True},
                SERVED: {"deep": None, "listwise_weight": kc.listwise_weight},
                TRENDING: {"deep": None, "listwise_weight": kc.listwise_weight, "trending": True}}
    for name, v in variants.items():
        t0 = time.time()
        extra_a, extra_e = (als_a, als_e) if v.get("als") else (trend_a, trend_e) if v.get("trending") else (None, {})
        train_lists = with_columns(lists, extra_a, v.get("relative", False))
        model, _ = T.train_ranker(data, dataclasses.replace(kc, listwise_weight=v["listwise_weight"]), train_lists,
                                  {k: x[:0] for k, x in train_lists.items()}, [], data.items["item_cont_fit"], tt_a.item_ids,
                                  "cpu", False, deep=v["deep"])
        seconds = time.time() - t0
        tops = {}
        for p, ev in parts.items():
            ev = with_columns(ev, extra_e.get(p), v.get("relative", False))
            order = np.argsort(-T.ranker_scores(model, data, ev, data.item_cont, kc.cvr_weight, "cpu"), axis=1, kind="stable")
            tops[p] = np.take_along_axis(ev["rows"], order, 1)
        scored(name, tops, seconds)
    report["variants"][SERVED]["deep"] = bool(T.deep_part_on(kc, len(users_a)))
    for p in parts:
        report["variants"][TRENDING][p]["NDCG@10 - served"] = mean_se(per_user[TRENDING][p] - per_user[SERVED][p])
    scored("no ranker (merged candidate order)", {p: ev["rows"] for p, ev in parts.items()}, 0.0)
    return report


def markdown(report: dict, meta: dict) -> str:
    parts = [p for p in next(iter(report["variants"].values())) if p not in ("train_seconds", "deep")]
    lines = [f"# Ranker variants: `{meta['tag']}`", "", f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}).", "",
             f"{report['lists']['train_users']} training lists of {report['lists']['candidates']} candidates. "
             "NDCG@10 and Recall@10, mean ± s.e.; seconds to train.", "",
             f"Paired: each user's NDCG@10 minus the same user's under `{REFERENCE}`, mean ± s.e.", "",
             "| variant | " + " | ".join(f"{p} NDCG@10 | paired | {p} Recall@10" for p in parts) + " | s |",
             "|---|" + "---|---|---|" * len(parts) + "---|"]
    for name, v in report["variants"].items():
        cells = [f"{v[p]['NDCG@10'][0]:.4f} ± {v[p]['NDCG@10'][1]:.4f} | "
                 + ("{:+.4f} ± {:.4f}".format(*v[p]["NDCG@10 - reference"]) if name != REFERENCE else "reference")
                 + f" | {v[p]['Recall@10'][0]:.4f}" for p in parts]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {v['train_seconds']:.0f} |")
    if TRENDING in report["variants"]:
        lines += ["", f"`{TRENDING}` minus `{SERVED}`, paired: " + ", ".join(
            "{} NDCG@10 {:+.4f} ± {:.4f}".format(p, *report["variants"][TRENDING][p]["NDCG@10 - served"]) for p in parts) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from .ablation import bundle, paired_evaluators, parse, save

    args = parse("ranker_variants", __doc__, argv)
    cfg, artifacts = bundle("ranker_variants", args)
    evaluators = paired_evaluators(artifacts, args.referee)
    t0 = time.time()
    report = run(artifacts, cfg, evaluators)
    save("ranker_variants", args, argv, report, time.time() - t0, markdown)
    return report


if __name__ == "__main__":
    main()
