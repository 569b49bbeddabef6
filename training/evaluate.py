"""`shoprec evaluate`: every system on the same split, the same user state, seen items excluded for all.

Protocol: the features stage's test split. A user's state is their train actions (the valid split
is for choosing the baselines' hyper-parameters only, and is not part of anyone's state). Truth:
the user's test positives on items they had not acted on in train. Every system ranks the whole
catalog minus the user's train actions. Warm users have at least one train action, cold users none.

Systems: popularity, ALS (implicit), item-kNN (implicit, cosine), EASE, the two-tower alone (the ANN
route of the bundle), the full served pipeline (runtime.pipeline: the server's steps in-process;
tests/test_serving_integration.py checks the server returns the same lists), and as diagnostics the
merged candidate order before ranking and each recall route alone. The baselines' hyper-parameters
are chosen on valid NDCG@10 from small grids, the same budget for each.

Figures, each with its standard error over users, for warm and cold users separately:
Recall@10/50/100, NDCG@10, HitRate@10, intra-list category diversity@10 and novelty@10; coverage@10
of the catalog. Written to RESULTS/quality_<tag>.{json,md,png}; an existing report is never
overwritten unless asked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from feature_workflows.history import POSITIVE_KIND
from shoprec.config import Config
from shoprec.contract import ROUTES
from shoprec.errors import UserError

from . import cf as cflib
from . import metrics as M
from .metrics import rows_per_batch
from .data import FeatureData

log = logging.getLogger("shoprec.evaluate")
K_RECALL = (10, 50, 100)
TOPN = 100


class EvaluationError(UserError, RuntimeError):
    pass


def split_truth(data: FeatureData, part: int, train) -> tuple[np.ndarray, list[set]]:
    acts = data.actions
    pos = acts[(acts["split"] == part) & (acts["kind"] >= POSITIVE_KIND)]
    seen = set(zip(train["user_id"].values.tolist(), train["item_row"].values.tolist()))
    truth: dict[int, set] = {}
    for u, r in zip(pos["user_id"].values.tolist(), pos["item_row"].values.tolist()):
        if (u, r) not in seen:
            truth.setdefault(u, set()).add(r)
    users = np.array(sorted(truth), dtype=np.int64)
    return users, [truth[int(u)] for u in users]


def test_users(data: FeatureData, max_users: int = 20_000) -> tuple:
    """(train actions, test users, their truth): the users `evaluate` scores, at most max_users of
    them (a fixed random subset), so that other reports can sit beside its figures."""
    acts = data.actions
    train = acts[acts["split"] == 0]
    users, truth = split_truth(data, 2, train)
    if not len(users):
        raise EvaluationError("no test user has a positive on an item they had not acted on in train")
    users, truth = sample_users(users, truth, max_users, seed=0)
    return train, users, truth


def sample_users(users: np.ndarray, truth: list, max_users: int, seed: int) -> tuple[np.ndarray, list]:
    """At most max_users of them, a fixed random subset (in user order)."""
    if len(users) <= max_users:
        return users, truth
    keep = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
    return users[keep], [truth[i] for i in keep]


def _seen(users: np.ndarray, train, n_items: int) -> sp.csr_matrix:
    idx = {int(u): i for i, u in enumerate(users)}
    rows = train["user_id"].map(idx)
    keep = rows.notna().values
    m = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (rows[keep].astype(int).values, train["item_row"].values[keep])),
                      shape=(len(users), n_items))
    m.sum_duplicates()
    return m


def top_n_unseen(scores: np.ndarray, seen: sp.csr_matrix, n: int = TOPN) -> np.ndarray:
    """Per row the n best unseen columns, ties in column order (what a stable full sort gives), -1 where
    fewer are left. Only the entries above each row's n-th best value are sorted; the ties with it are taken in
    column order without sorting (a user without history scores every item alike: a 1M-item row of ties)."""
    scores = np.asarray(scores)
    s = np.array(scores, dtype=np.result_type(scores.dtype, np.float32))  # a copy; converting a broadcast array is slow
    r, c = seen.nonzero()
    s[r, c] = -np.inf
    n = min(n, s.shape[1])
    out = np.full((len(s), n), -1, np.int64)
    if n == 0:
        return out
    kth = torch.topk(torch.from_numpy(s), n, dim=1).values[:, -1:].numpy()  # the n-th best value (numpy's partition: 17x slower)
    rows, cols = np.nonzero(s > kth)  # fewer than n a row
    vals = s[rows, cols]
    order = np.lexsort((cols, -vals, rows))  # by row, then best first, then column
    rows, cols = rows[order], cols[order]
    n_above = np.bincount(rows, minlength=len(s))
    out[rows, np.arange(len(rows)) - np.r_[0, np.cumsum(n_above)[:-1]][rows]] = cols
    ties = s == kth
    for i in range(len(s)):  # then the ties with the n-th best, in column order; -inf ties are seen items: -1
        if kth[i, 0] > -np.inf:
            take = np.flatnonzero(ties[i])[: n - n_above[i]]
            out[i, n_above[i] : n_above[i] + len(take)] = take
    return out


# item-kNN's K is capped so that K x items stays under this: implicit's CosineRecommender allocates its K
# neighbour slots for every item while fitting, and K = 400 over the large shop's 1M items took evaluate to
# 17.9 GB (benchmarks/results/build_cost_large.json); there the grid is K = 50
KNN_MAX_SLOTS = 100_000_000


class Baselines:
    """Popularity, ALS, item-kNN and EASE fitted on the train positives (users x items)."""

    def __init__(self, data: FeatureData, train, cfg: Config):
        self.data, self.cfg = data, cfg
        pos = train[train["kind"] >= POSITIVE_KIND]
        self.x, self.users = cflib.interaction_matrix(pos["user_id"].values, pos["item_row"].values, data.n_items)
        self.pop = np.asarray(self.x.sum(0)).ravel()

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = np.searchsorted(self.users, users)
        ok = (at < len(self.users)) & (self.users[np.minimum(at, len(self.users) - 1)] == users)
        return np.minimum(at, len(self.users) - 1), ok

    def scorer(self, name: str, params: dict):
        x = self.x
        if name == "popularity":
            return lambda rows: np.broadcast_to(self.pop, (len(rows), len(self.pop)))
        if name == "als":
            from implicit.cpu.als import AlternatingLeastSquares
            from threadpoolctl import threadpool_limits

            with threadpool_limits(1, "blas"):  # implicit runs its own threads: BLAS's pool would oversubscribe the cores
                m = AlternatingLeastSquares(random_state=self.cfg.retrieval.seed, **params)
                m.fit(x, show_progress=False)
            return lambda rows: m.user_factors[rows] @ m.item_factors.T
        if name == "item_knn":
            from implicit.nearest_neighbours import CosineRecommender

            m = CosineRecommender(**params)
            m.fit(x, show_progress=False)
            sim = m.similarity.tocsr()
            return lambda rows: (x[rows] @ sim).toarray()
        if name == "ease":  # over at most cf.ease_max_items items, the most active (training.cf.ease_items)
            score = cflib.EaseScorer(x, params["lam"], self.cfg.cf.ease_max_items)
            return lambda rows: score(x[rows])
        raise ValueError(name)

    GRIDS = {
        "popularity": [{}],
        "als": [{"factors": f, "regularization": r, "alpha": a, "iterations": 15}
                for f in (64, 128) for r in (0.01, 0.1, 1.0) for a in (1.0, 10.0)],
        "item_knn": [{"K": k} for k in (50, 200, 400)],
        "ease": [{"lam": lam} for lam in (100.0, 300.0, 1000.0)],
    }

    def run(self, name: str, users, seen, valid: tuple | None) -> tuple[np.ndarray, dict]:
        """Top-N for `users` with the grid point best on valid NDCG@10 (the first one without valid)."""
        grid = self.GRIDS[name]
        if name == "item_knn":  # implicit holds K neighbour slots per item while fitting
            grid = [p for p in grid if p["K"] * self.data.n_items <= KNN_MAX_SLOTS] or [
                {"K": max(10, KNN_MAX_SLOTS // self.data.n_items)}]
        best, chosen = -1.0, grid[0]
        step = rows_per_batch(self.data.n_items)  # users scored at a time: bounded memory at any catalog size
        if valid is not None and len(grid) > 1:
            v_users, v_truth, v_seen = valid
            rows, ok = self.rows(v_users)
            for params in grid:
                fn = self.scorer(name, params)
                top = np.concatenate([top_n_unseen(np.where(ok[s : s + step, None], fn(rows[s : s + step]), 0.0), v_seen[s : s + step])
                                      for s in range(0, len(v_users), step)])
                score = M.ndcg_at(top, v_truth, 10)
                if score > best:
                    best, chosen = score, params
        fn = self.scorer(name, chosen)
        rows, ok = self.rows(users)
        out = []
        for s in range(0, len(users), step):
            sl = slice(s, s + step)
            sc = np.where(ok[sl, None], fn(rows[sl]), self.pop[None, :])  # no train positive: popularity
            out.append(top_n_unseen(sc, seen[sl]))
        return np.concatenate(out), {"params": chosen, "valid_ndcg@10": best if best >= 0 else None}


def figures(top: np.ndarray, truth: list[set], data: FeatureData, pop: np.ndarray, n_users: int) -> dict:
    out = {}
    for k in K_RECALL:
        out[f"recall@{k}"] = M.mean_se(M.per_user_recall(top, truth, k))
    out["ndcg@10"] = M.mean_se(M.per_user_ndcg(top, truth, 10))
    out["hitrate@10"] = M.mean_se(M.per_user_hit(top, truth, 10))
    has_category = bool((data.category >= 0).any())  # without one, "diversity" would read as 0, not as unknown
    out["diversity@10"] = M.mean_se(M.per_user_diversity(top, data.category, 10)) if has_category else (None, None)
    out["novelty@10"] = M.mean_se(M.per_user_novelty(top, pop, n_users, 10))
    out["coverage@10"] = (M.coverage(top, data.n_items, 10), None)
    return {k: {"mean": v[0], "se": v[1]} for k, v in out.items()}


def served_batches(pipe, users: np.ndarray, n: int, batch: int = 128):
    """`users` through the server's steps in-process (runtime.pipeline.Pipeline), `batch` at a time, up to the
    ranker: per batch (candidate rows [B, N], each route's list, the tensors with `ranking_scores`)."""
    for s in range(0, len(users), batch):
        t = pipe.run(pipe.request(users[s : s + batch], n, exclude_seen=True), stop="retrieval")
        cand, dense, lists, _ = pipe.steps["retrieval"].candidates(t)  # the route lists too, computed once
        yield cand, lists, pipe.run({**t, "candidate_rows": cand, "candidate_dense": dense}, start="candidate_features",
                                    stop="topk")


def served_lists(bundle_dir: Path, users: np.ndarray, cfg: Config, batch: int = 128) -> tuple[np.ndarray, dict, np.ndarray]:
    """The full pipeline's top-N (the server's steps, in-process), the merged candidate order, the ranker's
    order without the popularity prior (when the bundle has one), each route's list, and the cold flags."""
    from runtime.pipeline import Pipeline
    from runtime.steps import best_first

    pipe = Pipeline(bundle_dir, cfg=cfg.serve)
    n = min(TOPN, pipe.max_k)
    st = pipe.steps["retrieval"].strategy  # the routes of the default scene (the context routes need context items)
    used = {r for r, w in zip(ROUTES, st.resolve(st.default_scene, 0).weights) if w > 0}
    topk = pipe.steps["topk"]
    full, merged, routes, cold, plain = [], [], {}, [], []
    for cand, lists, t in served_batches(pipe, users, n, batch):
        order = best_first(cand, topk.with_prior(cand, t["ranking_scores"]), n)  # top-k's order, on store rows
        full.append(np.take_along_axis(cand, order, 1))
        plain.append(np.take_along_axis(cand, best_first(cand, t["ranking_scores"], n), 1))
        merged.append(cand[:, :n])
        for r, lst in lists.items():
            if r in used:
                routes.setdefault(r, []).append(lst[:, :n])
        cold.append(t["cold_start"].ravel())
    diagnostics = {"ranker_without_prior": np.concatenate(plain)} if topk.prior is not None else {}
    return np.concatenate(full), {"merged_order": np.concatenate(merged), **diagnostics,
                                  **{f"route_{r}": np.concatenate(v) for r, v in routes.items()}}, np.concatenate(cold)


def evaluate(features_dir: str | Path, bundle_dir: str | Path, results_dir: str | Path, cfg: Config, tag: str,
             overwrite: bool = False, max_users: int = 20_000, max_valid_users: int = 5_000, progress: bool = True) -> dict:
    t0 = time.time()
    out = Path(results_dir)
    target = out / f"quality_{tag}.json"
    if target.exists() and not overwrite:
        raise EvaluationError(f"{target} exists; pass --tag NAME for a new report or --overwrite to replace it")
    data = FeatureData(features_dir)
    if data.schema["split"] == "none":
        raise EvaluationError("the features were built for deployment (split = none): nothing is held out to evaluate on; "
                              "run `shoprec features --split time` (or user-time, random) first")
    train, users, truth = test_users(data, max_users)
    v_users, v_truth = split_truth(data, 1, train)
    # the baselines' grid is chosen on a sample: every grid point scores them all
    v_users, v_truth = sample_users(v_users, v_truth, max_valid_users, seed=1)
    valid = (v_users, v_truth, _seen(v_users, train, data.n_items)) if len(v_users) else None
    seen = _seen(users, train, data.n_items)
    warm = np.isin(users, train["user_id"].unique())
    base = Baselines(data, train, cfg)
    n_train_users = int(train["user_id"].nunique())

    systems, params = {}, {}
    for name in ("popularity", "als", "item_knn", "ease"):
        try:
            systems[name], params[name] = base.run(name, users, seen, valid)
        except EvaluationError as exc:
            params[name] = {"skipped": str(exc)}
        if progress:
            print(f"evaluate: {name} ({time.time() - t0:.0f}s)", flush=True)
    full, extra, cold = served_lists(Path(bundle_dir), users, cfg)
    systems["two_tower"] = extra.pop("route_ann")
    systems["served_pipeline"] = full
    silent = [k for k, v in extra.items() if not (v >= 0).any()]  # e.g. the category route without item categories
    for k, v in extra.items():
        if k not in silent:
            systems[k] = v
    if progress:
        print(f"evaluate: served pipeline ({time.time() - t0:.0f}s)", flush=True)
    if (cold != ~warm).any():
        log.warning("%d users: the store's cold flag differs from 'no train action'", int((cold != ~warm).sum()))

    tuned = any(v.get("valid_ndcg@10") is not None for v in params.values() if "params" in v)
    results = {}
    for name, top in systems.items():
        results[name] = {group: figures(top[mask], [t for t, m in zip(truth, mask) if m], data, base.pop, n_train_users)
                         for group, mask in (("warm", warm), ("cold", ~warm)) if mask.any()}
    report = {
        "dataset": tag, "source": data.schema.get("source"), "split": data.schema["split"],
        "users": {"warm": int(warm.sum()), "cold": int((~warm).sum())}, "items": int(data.n_items),
        "protocol": "test positives on items the user had not acted on in train; state = train actions; every system "
                    "ranks the catalog minus the user's train actions; " + (
                        "baselines tuned on valid NDCG@10" if tuned else
                        "baselines at the first point of their grid (the split left no valid users to tune on)"),
        "baselines_tuned": tuned,
        "baseline_params": params, "results": results, "routes_without_items": silent,
        "train_report": _train_summary(Path(features_dir).parent / "models"),
        "machine": _machine(), "command": f"shoprec evaluate --tag {tag}", "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=1) + "\n")
    (out / f"quality_{tag}.md").write_text(markdown(report))
    _plot(report, out / f"quality_{tag}.png")
    return report


def _train_summary(models_dir: Path) -> dict:
    try:
        r = json.loads((models_dir / "train_report.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"cf": r.get("cf"), "retrieval_best_epoch": r.get("retrieval_stage_a", {}).get("best_epoch"),
            "holdout_recall@50": r.get("retrieval_stage_a", {}).get("best_holdout_recall@50"),
            "holdout_popularity_recall@50": r.get("retrieval_stage_a", {}).get("holdout_popularity_recall@50"),
            "ranker": {k: r.get("ranking", {}).get(k) for k in ("deep", "steps", "valid_ndcg@10", "valid_ndcg@10_merged_order",
                                                                "candidate_recall")},
            "popularity_prior": {k: r.get("popularity_prior", {}).get(k) for k in ("weight", "chosen_on")},
            "ann_popularity_prior": {k: r.get("ann_popularity_prior", {}).get(k) for k in ("weight", "chosen_on")},
            "whole_history_share": {k: (r.get("whole_history_share") or {}).get(k) for k in ("share", "chosen_on")}}


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


ORDER = ("popularity", "als", "item_knn", "ease", "two_tower", "served_pipeline")


def markdown(r: dict) -> str:
    cols = ["recall@10", "recall@50", "recall@100", "ndcg@10", "hitrate@10", "coverage@10", "diversity@10", "novelty@10"]
    lines = [f"# Offline quality: `{r['dataset']}`", "",
             f"Split `{r['split']}`; {r['users']['warm']} warm and {r['users']['cold']} cold test users, {r['items']} items. "
             f"{r['protocol']}. Mean ± standard error over users. Command: `{r['command']}`.", ""]
    for group in ("warm", "cold"):
        names = [n for n in list(ORDER) + [n for n in r["results"] if n not in ORDER] if group in r["results"].get(n, {})]
        if not names:
            continue
        lines += [f"## {group} users", "", "| system | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for n in names:
            f = r["results"][n][group]
            cells = ["n/a" if f[c]["mean"] is None else f"{f[c]['mean']:.4f}" + (f" ± {f[c]['se']:.4f}" if f[c]["se"] is not None
                                                                               else "") for c in cols]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    skipped = {k: v["skipped"] for k, v in r["baseline_params"].items() if "skipped" in v}
    chosen = {k: v["params"] for k, v in r["baseline_params"].items() if "params" in v}
    how = "chosen on valid" if r.get("baselines_tuned", True) else "the first of each grid: no valid users to tune on"
    lines += [f"Baseline hyper-parameters ({how}): `{json.dumps(chosen)}`."]
    if skipped:
        lines += [f"Skipped: {skipped}."]
    if r.get("routes_without_items"):
        why = " (it needs an item category)" if r["routes_without_items"] == ["route_category"] else ""
        lines += [f"Routes that returned no item for any test user (left out): {', '.join(r['routes_without_items'])}{why}."]
    prior = r.get("train_report", {}).get("popularity_prior") or {}
    if prior.get("weight") is not None:
        lines += [f"Popularity prior of the served score: w = {prior['weight']} (chosen by `train` on its "
                  f"{str(prior['chosen_on']).replace('_', ' ')}); `ranker_without_prior` is the same ranker's order with w = 0."]
    ann = r.get("train_report", {}).get("ann_popularity_prior") or {}
    if ann.get("weight") is not None:
        how = "fixed by the config" if ann["chosen_on"] == "config" else f"chosen by `train` on its {ann['chosen_on']}"
        lines += [f"Popularity prior of the ann route (`two_tower`, `route_ann`): b = {ann['weight']} ({how})."]
    whole = r.get("train_report", {}).get("whole_history_share") or {}
    if whole.get("share") is not None:
        how = "fixed by the config" if whole["chosen_on"] == "config" else \
            f"chosen by `train` on its {str(whole['chosen_on']).replace('_', ' ')}"
        lines += [f"Two-tower rows that read the whole history: share {whole['share']} ({how})."]
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = "warm" if any("warm" in v for v in r["results"].values()) else "cold"
    names = [n for n in ORDER if group in r["results"].get(n, {})]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("recall@10", "ndcg@10")):
        means = [r["results"][n][group][metric]["mean"] for n in names]
        ses = [r["results"][n][group][metric]["se"] for n in names]
        ax.barh(names, means, xerr=ses, color=["#999"] * (len(names) - 1) + ["#2a6"])
        ax.set_xlabel(f"{metric} ({group} users, ± s.e.)")
        ax.invert_yaxis()
    fig.suptitle(f"{r['dataset']}: split {r['split']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
