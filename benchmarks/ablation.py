"""What each part of the model adds: one training run, then parts switched off one at a time.

    .venv/bin/python -m benchmarks.ablation --artifacts artifacts --tag small           # the synthetic shop
    .venv/bin/python -m benchmarks.ablation --referee random-8-1-1 --tag mlls-random    # ml-latest-small

It needs a trained artifacts folder (`shoprec all`, or `--referee PROTOCOL`, which builds one from the
referee's split of ml-latest-small exactly as benchmarks/referee_bench.py does, without a server).

Parts measured (same split, same user state, seen items excluded unless said otherwise):
- the ranker: the full list vs the merged candidate order (no ranker), and rankers retrained on the
  same held-out lists with a feature group removed (the item-to-item scores, the two-tower scores)
  or with the deep part (embeddings, DIN, interactions) forced on or off;
- the recall routes alone (cf_all, cf_pos, ann, popular), and the ann route without its popularity bias
  where `train` chose one, or with b = 1 where it did not;
- the two-tower alone, retrained on the fit fold without a part (the action sequence, logQ
  correction, the mixed negatives, the whole-history rows) or with the user-id embedding: holdout
  Recall@50;
- the seen-item filter: the full pipeline with it off.
Writes benchmarks/results/ablation_<tag>.{json,md}. Figures are means over users with standard errors.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from runtime.candidates import DENSE_FEATURES, CandidateGenerator, CategoryPrior, popularity_bias
from shoprec.config import REPO_ROOT, load_config
from shoprec.manifest import verified_path, verify_manifest

from .machine import describe


def _groups(n_user_cont: int, n_item_cont: int) -> dict[str, list[int]]:
    off = n_user_cont + n_item_cont
    idx = {f: off + i for i, f in enumerate(DENSE_FEATURES)}
    return {"item-to-item scores": [idx[f] for f in ("cf_all", "cf_pos", "cf_recent", "rank_cf_all", "rank_cf_pos")],
            "two-tower scores": [idx[f] for f in ("two_tower", "rank_ann")]}


def _mask_features(lists: dict, cols: list[int], n_user_cont: int, n_item_cont: int) -> dict:
    """A copy of the lists whose dense features in `cols` are constant (no information)."""
    out = dict(lists)
    dense = lists["dense"].copy()
    for c in cols:
        dense[..., c - n_user_cont - n_item_cont] = 0.0
    out["dense"] = dense
    return out


def run(artifacts: Path, cfg, evaluate_lists, progress: bool = False) -> dict:
    """evaluate_lists(data, top [U, N] item rows, users) -> {metric: (mean, se)} for the evaluated users."""
    from training import train as T
    from training.data import FeatureData, context_of

    data = FeatureData(artifacts / "features")
    acts = data.actions
    train = acts[acts["split"] == 0]
    fit, hold = train[train["fold"] == 0], train[train["fold"] == 1]
    rc, kc = cfg.retrieval, cfg.ranking
    users, truth, first_ts = data.holdout_truth(fit, hold, max(rc.max_valid_users, kc.max_users), rc.seed)
    hour, weekday = context_of(first_ts, rc.context_dropout, np.random.default_rng(kc.seed))
    q = data.queries(users, data.action_log(fit), hour=hour, weekday=weekday)
    valid = {"q": {k: v for k, v in q.items() if not k.startswith("hist")}, "truth": [set(t) for t in truth],
             "seen": T.seen_mask(q, data.n_items)}
    report: dict = {"two_tower_holdout_recall@50": {}, "ranker": {}, "routes": {}}

    # the two-tower without one part at a time (stage A: fit fold, holdout Recall@50)
    # "as configured": the whole-history share `train` chose for these models; the variant flips it
    grid = T.whole_history_shares(rc)
    trained = json.loads(verified_path(artifacts / "models", "train_report.json").read_text())
    chosen = trained.get("whole_history_share", {})
    share = report["whole_history_share_chosen"] = float(chosen.get("share", grid[0]))
    flip = 0.0 if share > 0 else max(grid)
    variants = {"as configured": {}, "+ user-id embedding": {"use_user_id": True}, "- logQ correction": {"logq_correction": False},
                "- mixed negatives": {"mixed_negatives": 0},
                f"{'-' if share > 0 else '+'} whole-history rows (share {share:g} -> {flip:g})": {"whole_history_share": (flip,)}}
    variants = {name: {"whole_history_share": (share,), **change} for name, change in variants.items()}
    tt_a = None
    for name, change in variants.items():
        t0 = time.time()
        model, rep = T.train_two_tower(data, cfg.replace("retrieval", **change).retrieval, (0,), data.items["item_cont_fit"],
                                       "cpu", rc.epochs, valid, progress, "retrieval")
        report["two_tower_holdout_recall@50"][name] = rep["best_holdout_recall@50"]
        if name == "as configured":
            tt_a = model
        print(f"ablation: two-tower {name}: {rep['best_holdout_recall@50']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    no_seq = dict(valid, q={**valid["q"], "seq": np.zeros_like(valid["q"]["seq"]), "seq_kinds": np.zeros_like(valid["q"]["seq_kinds"])})
    report["two_tower_holdout_recall@50"]["- action sequence (at serving time)"] = T.retrieval_recall(
        tt_a, data, data.items["item_cont_fit"], no_seq, "cpu")
    report["two_tower_holdout_recall@50"]["popularity"] = T.recall_at(
        T._popular_unseen(data.items["popular_rows_fit"], valid["seen"], 50), valid["truth"], 50)

    # rankers on stage A's lists: all features, a group removed, deep on/off
    lam, _ = T.choose_cf_lambda(data, fit, users, truth, cfg)
    cf_all_a, cf_pos_a = T.fit_routes(data, fit, cfg, lam)
    gen_a = CandidateGenerator(T.item_embeddings(tt_a, data.item_cat, data.items["item_cont_fit"], "cpu"), None, cf_all_a,
                               cf_pos_a, data.items["popular_rows_fit"], cfg.serve.num_candidates, cfg.serve.recent_window,
                               categories=T.fit_categories(data),
                               ann_bias=popularity_bias(data.items["popularity_fit"], T.ann_bias_weight(artifacts / "models")))
    n = min(len(users), kc.max_users)
    sel = np.arange(n)
    lists = T.ranker_lists(data, gen_a, T._slice_q(q, sel), T.user_embeddings(tt_a, T._slice_q(q, sel), "cpu"), truth[:n])
    is_valid = np.random.default_rng(kc.seed + 1).random(n) < kc.valid_share
    tr = np.flatnonzero(~is_valid)
    sub = {k: v[tr] for k, v in lists.items()}
    empty = {k: v[:0] for k, v in lists.items()}
    nu, ni = len(data.user_cont_cols), data.item_cont.shape[1]
    rankers = {}
    # "full": the deep part as `train` chose it for these models (fit_ranker); the variant flips it
    deep_on = bool(trained.get("ranking", {}).get("deep", T.deep_part_on(kc, len(tr))))
    setting = "on" if deep_on else "off"
    flipped = ("deep part off (auto: on)", "off") if deep_on else ("deep part on (auto: off)", "on")
    for name, (cols, deep) in {"full": ([], setting), flipped[0]: ([], flipped[1]),
                               **{f"- {g}": (c, setting) for g, c in _groups(nu, ni).items()}}.items():
        t0 = time.time()
        model, rep = T.train_ranker(data, cfg.replace("ranking", deep=deep).ranking, _mask_features(sub, cols, nu, ni), empty, [],
                                    data.items["item_cont_fit"], tt_a.item_ids, "cpu", progress)
        rankers[name] = (model, cols)
        print(f"ablation: ranker {name} trained ({time.time() - t0:.0f}s)", flush=True)

    # the final models (stage B, in the bundle) rank the evaluated users' candidates
    ev = evaluate_lists.prepare(data, cfg)
    for name, (model, cols) in rankers.items():
        scores = T.ranker_scores(model, data, _mask_features(ev["lists"], cols, nu, ni), data.item_cont, kc.cvr_weight, "cpu")
        order = np.argsort(-scores, axis=1, kind="stable")
        report["ranker"][name] = evaluate_lists(np.take_along_axis(ev["lists"]["rows"], order, 1))
    report["ranker"]["no ranker (merged candidate order)"] = evaluate_lists(ev["lists"]["rows"])
    for route, top in ev["routes"].items():
        if (top >= 0).any():
            report["routes"][route] = evaluate_lists(top)
        else:  # routes that need request context (similar, copurchase) or serve-time files (trending)
            report.setdefault("routes_without_candidates", []).append(route)
    report["ranker"]["full, seen items not filtered"] = evaluate_lists(ev["unfiltered"])
    return report


class Evaluator:
    """Scores item-row lists for a fixed set of users against a fixed truth (callable), after `prepare`
    built the bundle's candidate lists for them."""

    def __init__(self, users: np.ndarray, score_fn):
        self.users, self.score_fn = users, score_fn

    def prepare(self, data, cfg, lists_only: bool = False, chunk: int = 2048, category_smoothing: float = 0.0) -> dict:
        """The bundle's candidate lists for the users ({"lists"}), with each route's list and the lists without the
        seen-item filter unless lists_only. Users go through the routes `chunk` at a time: a small catalog's routes
        hold a dense row per user. category_smoothing: the category route's (`CategoryPrior.smoothing`)."""
        from training import train as T

        bundle = self.bundle
        verify_manifest(bundle.parent / "models")  # the checkpoints below are loaded from these bytes only
        tt = T.load_two_tower(bundle.parent / "models", data, cfg.retrieval)
        kw = dict(item_embeddings=T.item_embeddings(tt, data.item_cat, data.item_cont, "cpu"), index=None,
                  cf_all=T.load_neighbours(bundle.parent / "models" / "cf_all.npz"),
                  cf_pos=T.load_neighbours(bundle.parent / "models" / "cf_pos.npz"), popular_rows=data.popular_rows,
                  n_candidates=cfg.serve.num_candidates, recent_window=cfg.serve.recent_window,
                  categories=CategoryPrior.from_popularity(data.items["category_code"], data.items["popularity"],
                                                          smoothing=category_smoothing))
        gen = CandidateGenerator(**kw, ann_bias=popularity_bias(data.items["popularity"], T.ann_bias_weight(bundle.parent / "models")))
        q = data.queries(self.users, data.action_log(data.actions[data.actions["split"] == 0]))
        emb = T.user_embeddings(tt, q, "cpu")

        def chunked(generator, **kw):
            out = []
            for s in range(0, len(emb), chunk):
                lo, hi = q["hist_indptr"][s], q["hist_indptr"][min(s + chunk, len(emb))]
                out.append(generator(emb[s : s + chunk], q["hist_indptr"][s : s + chunk + 1] - lo, q["hist_rows"][lo:hi],
                                     q["hist_kinds"][lo:hi], **kw))
            routes = {r: np.concatenate([o[2][r] for o in out]) for r in out[0][2]} if out else {}
            return (np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out]), routes)

        rows, dense, routes = chunked(gen)
        lists = {"rows": rows, "dense": dense, **{k: q[k] for k in ("user_cat", "user_cont", "seq", "seq_kinds")}}
        if lists_only:
            return {"lists": lists}
        # what the ann route's popularity bias adds: the same route without it, or with b = 1 where train chose none
        other = ("ann without its popularity bias", None) if gen.ann_bias is not None else (
            "ann with a popularity bias (b = 1)", popularity_bias(data.items["popularity"], cfg.retrieval.temperature))
        routes[other[0]] = chunked(CandidateGenerator(**kw, ann_bias=other[1]))[2]["ann"]
        loose, dense_l, _ = chunked(gen, exclude_seen=False)
        ranker = T.load_ranker(bundle.parent / "models", data, cfg.ranking)
        sc = T.ranker_scores(ranker, data, {**lists, "rows": loose, "dense": dense_l}, data.item_cont, cfg.ranking.cvr_weight, "cpu")
        unfiltered = np.take_along_axis(loose, np.argsort(-sc, axis=1, kind="stable"), 1)
        return {"lists": lists, "routes": routes, "unfiltered": unfiltered}

    def __call__(self, top: np.ndarray) -> dict:
        return self.score_fn(top)


def markdown(report: dict, meta: dict) -> str:
    lines = [f"# Ablation: `{meta['tag']}`", "", f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}).", ""]
    lines += ["## Ranking and recall (evaluated users, mean ± s.e.)", "", "| variant | Recall@10 | NDCG@10 | Recall@100 |",
              "|---|---|---|---|"]
    for section in ("ranker", "routes"):
        for name, m in report[section].items():
            label = name if section == "ranker" else f"route {name} alone"
            lines.append(f"| {label} | {m['Recall@10'][0]:.4f} ± {m['Recall@10'][1]:.4f} | {m['NDCG@10'][0]:.4f} ± "
                         f"{m['NDCG@10'][1]:.4f} | {m['Recall@100'][0]:.4f} |")
    if report.get("routes_without_candidates"):
        lines += ["", (f"Not listed: {', '.join(report['routes_without_candidates'])}. These routes propose nothing "
                       "here: they need a request's context items, or files that only export writes (trending), "
                       "and the ablation's users come without either.")]
    lines += ["", "## Two-tower alone (holdout of the training data, Recall@50)", "", "| variant | Recall@50 |", "|---|---|"]
    for name, v in report["two_tower_holdout_recall@50"].items():
        lines.append(f"| {name} | {v:.4f} |")
    return "\n".join(lines) + "\n"


def _metrics_from(per_user: dict) -> dict:
    from training.metrics import mean_se

    return {k: mean_se(v) for k, v in per_user.items()}


def shop_evaluator(artifacts: Path, per_user: bool = False):
    """The synthetic shop (or any features with a test split): test positives on unseen items. per_user: the scores
    also hold each user's NDCG@10 ("per_user_ndcg@10"), for paired comparisons."""
    from training import metrics as M
    from training.data import FeatureData
    from training.evaluate import split_truth

    data = FeatureData(artifacts / "features")
    train = data.actions[data.actions["split"] == 0]
    users, truth = split_truth(data, 2, train)
    warm = np.isin(users, train["user_id"].unique())
    users, truth = users[warm], [t for t, w in zip(truth, warm) if w]

    def score(top):
        ndcg = M.per_user_ndcg(top, truth, 10)
        out = _metrics_from({"Recall@10": M.per_user_recall(top, truth, 10), "NDCG@10": ndcg,
                             "Recall@100": M.per_user_recall(top, truth, 100)})
        return {**out, "per_user_ndcg@10": ndcg} if per_user else out

    ev = Evaluator(users, score)
    ev.bundle = artifacts / "serving"
    return ev


def referee_evaluator(artifacts: Path, protocol: str, part: str = "test", per_user: bool = False):
    """ml-latest-small under the referee's protocol: its `part` users (test or valid), its scoring. per_user: the
    scores also hold each user's NDCG@10 ("per_user_ndcg@10", the referee's filter and discount), for paired
    comparisons."""
    sys.path.insert(0, str(REPO_ROOT.parent / "shared" / "quality"))
    import referee

    from training.data import FeatureData

    split = referee.get_split("mlls", protocol)
    users = split.users[split.eval_rows[part]]
    ids = FeatureData(artifacts / "features").items["item_ids"]

    def score(top):
        m = referee.evaluate_ranked(users, [[int(ids[r]) for r in t if r >= 0] for t in top], split, part)
        se = m["stderr"]
        out = {k: (m[k], se.get(k)) for k in ("Recall@10", "NDCG@10", "Recall@100")}
        if per_user:
            out["per_user_ndcg@10"] = _referee_ndcgs(referee, split, part, users, top, ids)
        return out

    ev = Evaluator(users, score)
    ev.bundle = artifacts / "serving"
    return ev


def _referee_ndcgs(referee, split, part: str, users: np.ndarray, top: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each user's NDCG@10 as the referee computes it: items outside the catalog, train positives and repeats
    dropped from the list first (`referee.evaluate_ranked`'s cut), then training.metrics' NDCG@10 (the referee's)."""
    from training.metrics import per_user_ndcg

    cut = np.full((len(users), 10), -1, dtype=np.int64)  # catalog columns, -1 = empty slot
    truth = []
    for i, (u, rows) in enumerate(zip(users, top)):
        r = split.user_index[int(u)]
        liked = set(split.X.indices[split.X.indptr[r] : split.X.indptr[r + 1]].tolist())
        kept: list[int] = []
        for row in rows[rows >= 0]:
            c = split.item_index.get(int(ids[row]))
            if c is not None and c not in liked and c not in kept:
                kept.append(c)
                if len(kept) == 10:
                    break
        cut[i, : len(kept)] = kept
        truth.append(set(np.asarray(split.gt[part][int(r)]).tolist()))
    return per_user_ndcg(cut, truth, 10)


def paired_evaluators(artifacts: Path, referee: str | None) -> dict:
    """{part: Evaluator} keeping each user's NDCG@10, for paired rows: the referee's valid and test users, or the
    synthetic shop's warm test users."""
    if referee:
        return {part: referee_evaluator(artifacts, referee, part, per_user=True) for part in ("valid", "test")}
    return {"test": shop_evaluator(artifacts, per_user=True)}


def parse(name: str, doc: str, argv, extra=None) -> argparse.Namespace:
    """The command line `ablation`, `ranker_variants` and `category_smoothing` share; extra(parser) adds a script's own."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"),
                        help="a trained bundle (the synthetic shop); with --referee, where its bundle is built")
    parser.add_argument("--referee", choices=["random-8-1-1", "user-temporal-8-1-1"],
                        help="build a bundle from the referee's split of ml-latest-small and score with the referee")
    parser.add_argument("--config", default=None)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def bundle(name: str, args: argparse.Namespace):
    """(config, artifacts): the bundle at --artifacts, or one built from the referee's split under it."""
    cfg = load_config(args.config).replace("features", split="none") if args.referee else load_config(args.config)
    if not args.referee:
        return cfg, Path(args.artifacts)
    from .referee_bench import build_artifacts

    return cfg, build_artifacts(args.referee, Path(args.artifacts) / name / args.referee, args.config)


def save(name: str, args: argparse.Namespace, argv, report: dict, seconds: float, to_markdown) -> None:
    """benchmarks/results/<name>_<tag>.{json,md}, with the command, date, machine and seconds; prints the markdown."""
    meta = {"tag": args.tag, "command": shlex.join(["python", "-m", f"benchmarks.{name}", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d"), "machine": describe(), "seconds": round(seconds, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_{args.tag}.json").write_text(json.dumps({**meta, **report}, indent=1, default=float) + "\n")
    (out / f"{name}_{args.tag}.md").write_text(to_markdown(report, meta))
    print(to_markdown(report, meta))


def main(argv=None) -> dict:
    args = parse("ablation", __doc__, argv)
    torch.manual_seed(0)
    cfg, artifacts = bundle("ablation", args)
    evaluator = referee_evaluator(artifacts, args.referee) if args.referee else shop_evaluator(artifacts)
    t0 = time.time()
    report = run(artifacts, cfg, evaluator)
    save("ablation", args, argv, report, time.time() - t0, markdown)
    return report


if __name__ == "__main__":
    main()
