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
  Is recent popularity something the ranker lacks? Also paired with `served`;
- `served + segment affinity`: the served ranker with each candidate's category lift in the user's segment as an
  extra dense feature: the users who share every attribute of the user table (categorical values as they are,
  numbers in SEGMENT_BINS quantile bins) form a segment; the feature is log(the category's share of the segment's
  positives, shrunk toward its share of all positives by SEGMENT_PRIOR positives / that share), 0 for a user
  without attributes (the fit fold's positives for the training lists, all of train's for the evaluated users).
  Do users' attributes say something about their tastes that the ranker does not form itself? Also paired with
  `served`; only where the data has a user table (`data/raw/users.parquet` with attribute columns).
- `served + user x candidate crosses`: the served ranker with a bilinear term in its wide part, each standardised
  user feature times each candidate feature (`ranking.user_item_cross`): the wide part's user features add the same
  to every candidate of a list and so cannot change its order; crossed, they can re-weigh the candidate features
  (a heavy user discounting popularity). Also paired with `served`;
`--only NAME ...` trains only those rows (and the reference).
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

from feature_workflows.history import POSITIVE_KIND
from runtime.candidates import trending_scores
from shoprec.manifest import verified_path

from training.metrics import mean_se

SCORE_COLUMNS = ("cf_all", "cf_pos", "cf_recent", "two_tower")
REFERENCE = "wide, pointwise"  # the row the others are paired with
SERVED, TRENDING = "served (training/train.py)", "served + trending score"  # the latter also paired with the former
SEGMENT = "served + segment affinity"  # also paired with SERVED
CROSS = "served + user x candidate crosses"  # also paired with SERVED
SEGMENT_BINS, SEGMENT_PRIOR = 4, 20.0  # numeric user attributes in quartiles; a segment's shares shrunk by 20 positives


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


def segment_affinity(data, actions, users: np.ndarray, rows: np.ndarray, user_table) -> np.ndarray:
    """[U, N]: log lift of each candidate's category in the user's segment (the users sharing all of `user_table`'s
    attributes, numbers in SEGMENT_BINS quantile bins) over its share of all of `actions`' positives; the segment's
    counts shrunk toward the global shares by SEGMENT_PRIOR positives. 0 for a user the table lacks."""
    import pandas as pd

    table = user_table.set_index("user_id")
    parts = []
    for col in table.columns:
        v = table[col]
        if pd.api.types.is_numeric_dtype(v) and v.nunique() > SEGMENT_BINS:
            v = pd.qcut(v, SEGMENT_BINS, labels=False, duplicates="drop")
        parts.append(v.astype(str))
    codes, cells = pd.factorize(pd.concat(parts, axis=1).agg("|".join, axis=1))
    cell_of = pd.Series(codes, index=table.index)
    cat = np.asarray(data.items["category_code"])
    n_cat = int(cat.max()) + 1
    pos = actions[actions["kind"] >= POSITIVE_KIND]
    pos_cell = cell_of.reindex(pos["user_id"].to_numpy()).to_numpy()
    pos_cat = cat[pos["item_row"].to_numpy()]
    ok = ~np.isnan(pos_cell) & (pos_cat >= 0)
    counts = np.zeros((len(cells), n_cat))
    np.add.at(counts, (pos_cell[ok].astype(np.int64), pos_cat[ok]), 1.0)
    overall = (counts.sum(0) + 1.0) / (counts.sum() + n_cat)
    lift = np.log((counts + SEGMENT_PRIOR * overall) / (counts.sum(1, keepdims=True) + SEGMENT_PRIOR) / overall)
    user_cell = cell_of.reindex(users).to_numpy()
    known = ~np.isnan(user_cell)
    c = cat[np.maximum(rows, 0)]
    out = lift[np.where(known, user_cell, 0).astype(np.int64)[:, None], np.maximum(c, 0)]
    return np.where(known[:, None] & (c >= 0) & (rows >= 0), out, 0.0).astype(np.float32)


def user_table(artifacts: Path):
    """The data's user attribute table (data/raw/users.parquet), None without one or without attribute columns."""
    import pandas as pd

    path = artifacts / "data" / "raw" / "users.parquet"
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    return table if len(table.columns) > 1 else None


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


def run(artifacts: Path, cfg, evaluators: dict, only: tuple = ()) -> dict:
    """evaluators: {part: ablation.Evaluator}; each variant's lists scored on every part. only: those variants (and
    the reference) alone."""
    from training import train as T

    kc = cfg.ranking
    data, fit, train, tt_a, users_a, lists = stage_a_lists(artifacts, cfg)
    lists = lists[0.0]
    parts = {name: ev.prepare(data, cfg, lists_only=True)["lists"] for name, ev in evaluators.items()}
    table = user_table(artifacts)

    def trending(actions, rows):
        score = trending_scores(actions["item_row"].to_numpy(), actions["ts"].to_numpy(), actions["kind"].to_numpy(),
                                data.n_items, cfg.serve.trending_half_life_days, float(train["ts"].max()))
        return np.log1p(score).astype(np.float32)[np.maximum(rows, 0)]

    # a variant's extra dense column [U, N]: fn(actions, users, rows), from the fit fold for the training lists and
    # from all of train for the evaluated users' lists; built only for the rows that run
    extras = {"als": lambda a, u, r: als_scores(data, a, u, r), "trending": lambda a, u, r: trending(a, r),
              "segment": lambda a, u, r: segment_affinity(data, a, u, r, table)}
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

    wide = dict(deep=False, listwise_weight=0.0, cross=False)
    served = dict(deep=None, listwise_weight=kc.listwise_weight, cross=kc.user_item_cross)  # as configured
    variants = {REFERENCE: wide, "+ listwise loss": {**wide, "listwise_weight": 1.0}, "+ deep part": {**wide, "deep": True},
                "+ list-relative scores": {**wide, "relative": True}, "+ ALS score": {**wide, "extra": "als"},
                SERVED: served, TRENDING: {**served, "extra": "trending"}, CROSS: {**served, "cross": True}}
    if table is not None:
        variants[SEGMENT] = {**served, "extra": "segment"}
    unknown = sorted(set(only) - set(variants))
    if unknown:
        raise SystemExit(f"ranker_variants: --only {' '.join(unknown)}: no such variant here (known: {', '.join(variants)})")
    if only:
        variants = {k: v for k, v in variants.items() if k == REFERENCE or k in only}
    for name, v in variants.items():
        t0 = time.time()
        extra = extras.get(v.get("extra"))
        extra_a = extra(fit, users_a, lists["rows"]) if extra else None
        extra_e = {p: extra(train, evaluators[p].users, ev["rows"]) for p, ev in parts.items()} if extra else {}
        train_lists = with_columns(lists, extra_a, v.get("relative", False))
        setting = dataclasses.replace(kc, listwise_weight=v["listwise_weight"], user_item_cross=v["cross"])
        model, _ = T.train_ranker(data, setting, train_lists,
                                  {k: x[:0] for k, x in train_lists.items()}, [], data.items["item_cont_fit"], tt_a.item_ids,
                                  "cpu", False, deep=v["deep"])
        seconds = time.time() - t0
        tops = {}
        for p, ev in parts.items():
            ev = with_columns(ev, extra_e.get(p), v.get("relative", False))
            order = np.argsort(-T.ranker_scores(model, data, ev, data.item_cont, kc.cvr_weight, "cpu"), axis=1, kind="stable")
            tops[p] = np.take_along_axis(ev["rows"], order, 1)
        scored(name, tops, seconds)
    if SERVED in report["variants"]:
        report["variants"][SERVED]["deep"] = bool(T.deep_part_on(kc, len(users_a)))
        for name in (TRENDING, SEGMENT, CROSS):
            for p in parts if name in report["variants"] else ():
                report["variants"][name][p]["NDCG@10 - served"] = mean_se(per_user[name][p] - per_user[SERVED][p])
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
    for name in (TRENDING, SEGMENT, CROSS):
        if name in report["variants"] and "NDCG@10 - served" in report["variants"][name][parts[0]]:
            lines += ["", f"`{name}` minus `{SERVED}`, paired: " + ", ".join(
                "{} NDCG@10 {:+.4f} ± {:.4f}".format(p, *report["variants"][name][p]["NDCG@10 - served"]) for p in parts) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from .ablation import bundle, paired_evaluators, parse, save

    args = parse("ranker_variants", __doc__, argv, lambda p: p.add_argument(
        "--only", nargs="+", default=(), metavar="VARIANT", help="train only these rows (and the reference), by name"))
    cfg, artifacts = bundle("ranker_variants", args)
    evaluators = paired_evaluators(artifacts, args.referee)
    t0 = time.time()
    report = run(artifacts, cfg, evaluators, tuple(args.only))
    save("ranker_variants", args, argv, report, time.time() - t0, markdown)
    return report


if __name__ == "__main__":
    main()
