"""How much can any model win on a synthetic shop? Oracles that read the generator's hidden truth,
against estimates of the same quantities from what the data shows.

    .venv/bin/python -m benchmarks.synthetic_ceiling --artifacts artifacts --tag small
    .venv/bin/python -m benchmarks.synthetic_ceiling --artifacts /tmp/a_medium --tag medium

Needs a synthetic shop built with `shoprec data --size S` and `shoprec features` (time split). The
users, their truth and the seen-item exclusion are those of `shoprec evaluate` (training.evaluate.
test_users), so the figures sit beside quality_<tag>.json's warm-user table; the report copies the
served pipeline's and the two-tower's rows from it when it is there.

Every system scores the whole catalog for each warm test user (seen items excluded):
- `popularity`: the train positives' counts (as in evaluate);
- `oracle`: the generator's own click model with the user's LATENT preferences (late ones for a
  user who shifted, whether or not the data has shown the shift yet), price tier and brands;
  approximate: it ignores the 15 % of session intents set by the hour of day;
- `oracle_category`: global share + the user's latent category preference x the item's share of
  its category (no price, no brand);
- `oracle_pre_shift`: the same with the early preference only (a perfect long-term profile);
- `oracle_revealed`: the same with the preference the user's train actions could reveal: a shifted
  user's late one once the train window holds an action of theirs from after the shift (any visit,
  however short), the early one before. What a model that read each new taste exactly from the first
  visit showing it would reach: optimistic for any model of the data;
- `history_after_shift_*`: the `history_sessions` estimate told the shift time: a revealed shifted
  user's preference is estimated from their visits after the shift alone. What detecting every shift
  perfectly, but estimating the new taste from the visits that show it, would reach;
- `history_*`: the same formula with the category preference ESTIMATED from the user's train
  positives (click shares; per-session shares with a decay per older session and additive
  smoothing), global and in-category shares from train counts. `best_history` is the best of them
  on test, which flatters it: an upper bound of that family (the after-shift ones, which read the
  truth, are not in it).
- `history_click_model_smooth*`: the generator's own click model (as `oracle`) filled in with what the
  user's train positives show: the category preference as `history_sessions_decay0.8_smooth*`, the price
  tier as the mean relative price of the items they clicked (shrunk toward 0 by one pseudo-click), the two
  favourite brands as their two most clicked brands. What a model that knew the generator's form and read
  every user's parameters from the data would reach (in `best_history` too: no user's truth is read, though
  item popularity and the model's coefficients are the generator's);
- `history_click_model_cells_smooth*`: the same, the category estimate smoothed toward the mean shares of the
  train users of the same age and region (the generator's taste has a prior by age and region) instead of
  toward uniform shares;
`oracle_category` - `oracle_revealed`: the shifts the train window has not shown yet;
`oracle_revealed` - `history_after_shift_*`: what the visits that show a new taste leave uncertain;
`history_after_shift_*` - `best_history`: noticing the shift.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from feature_workflows import synthetic
from feature_workflows.history import POSITIVE_KIND
from shoprec.config import REPO_ROOT
from training import evaluate as E
from training import metrics as M
from training.data import FeatureData

from .machine import describe

CHUNK = 250  # users scored at once: CHUNK x items float64 arrays
ESTIMATES = {"history_click_shares": (None, 0.0)} | {
    f"history_sessions_decay{d}_smooth{a}": (d, a) for d in (1.0, 0.8, 0.6, 0.3) for a in (0.5, 2.0, 6.0, 12.0, 24.0)}


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _category_scores(q: np.ndarray, cat: np.ndarray, global_share: np.ndarray, in_cat_share: np.ndarray) -> np.ndarray:
    """The generator's impression mix: 20 % best-sellers, 80 % the session's intent category (85 % of
    intents follow the preference)."""
    pop_share, intent = synthetic.POPULAR_SHARE, 0.85
    return pop_share * global_share[None, :] + (1 - pop_share) * intent * q[:, cat] * in_cat_share[None, :]


def _click_oracle(latent, rows: slice, items: dict, q: np.ndarray) -> np.ndarray:
    """Expected clicks per item under the generator's click model (see synthetic._draw_events)."""
    cat, log_pop = items["category"], items["log_pop"]
    gp = np.exp(log_pop) / np.exp(log_pop).sum()
    cat_pop = np.bincount(cat, weights=np.exp(log_pop), minlength=q.shape[1])
    pic = np.exp(log_pop) / cat_pop[cat]
    gap = np.abs(items["rel_price"][None, :] - latent.tier[rows, None])
    fav = (items["brand"][None, :] == latent.fav_brands[rows, 0:1]) | (items["brand"][None, :] == latent.fav_brands[rows, 1:2])
    base = -3.2 + 3.0 * q[:, cat] + 1.2 * fav - 0.8 * gap + 0.25 * log_pop[None, :]
    p_int = 0.85 * q[:, cat]
    shown_pop = synthetic.POPULAR_SHARE * gp[None, :]
    shown_cat = (1 - synthetic.POPULAR_SHARE) * p_int * pic[None, :] * np.exp(-1.2 * gap)  # the shop's price-fit pick
    return shown_pop * (p_int * _sig(base + 2.2) + (1 - p_int) * _sig(base)) + shown_cat * _sig(base + 2.2)


def _estimates(pos: pd.DataFrame, users: np.ndarray, cat: np.ndarray, n_cat: int, grid: dict | None = None,
               prior: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Category preference per user from their train positives, one matrix per `grid` entry (default ESTIMATES),
    each smoothed toward `prior` ([users, categories] rows summing to 1; default uniform)."""
    at = {int(u): i for i, u in enumerate(users)}
    p = pos[pos["user_id"].isin(users)].copy()
    p["row"], p["c"] = p["user_id"].map(at).values, cat[p["item_row"].values]
    out = {}
    prior = np.full((1, n_cat), 1.0 / n_cat) if prior is None else prior
    for name, (decay, smooth) in (ESTIMATES if grid is None else grid).items():
        q = np.zeros((len(users), n_cat))
        if decay is None:
            np.add.at(q, (p["row"].values, p["c"].values), 1.0)
        else:
            s = p.groupby(["row", "session_id", "c"]).size().rename("n").reset_index()
            s["w"] = s["n"] / s.groupby(["row", "session_id"])["n"].transform("sum")  # each session counts once
            last = p.groupby(["row", "session_id"])["ts"].max().rename("ts")
            s = s.join(last, on=["row", "session_id"])
            age = s.groupby("row")["ts"].rank(ascending=False, method="dense").values - 1  # 0: the latest session
            np.add.at(q, (s["row"].values, s["c"].values), s["w"].values * decay ** age)
        out[name] = (q + smooth * prior) / np.maximum(q.sum(1, keepdims=True) + smooth, 1e-12)
    return out


CLICK_MODEL_DECAY, CLICK_MODEL_SMOOTH = 0.8, (2.0, 6.0)  # history_click_model_*: the category estimate it reads
CELL_COLUMNS = ("age", "region")  # history_click_model_cells_*: users alike in these attributes share a prior


def _cell_prior(pos: pd.DataFrame, users: np.ndarray, user_table: pd.DataFrame, cat: np.ndarray, n_cat: int) -> np.ndarray:
    """[users, categories]: the mean decayed, unsmoothed category shares of every train user with positives in the
    same CELL_COLUMNS cell (uniform for a cell without any)."""
    everyone = np.sort(pos["user_id"].unique())
    shares = _estimates(pos, everyone, cat, n_cat, {"raw": (CLICK_MODEL_DECAY, 0.0)})["raw"]
    table = user_table.set_index("user_id")
    cell = lambda ids: table.reindex(ids)[list(CELL_COLUMNS)].astype(str).agg("|".join, axis=1).to_numpy()  # noqa: E731
    means = pd.DataFrame(shares).groupby(cell(everyone)).mean()
    return means.reindex(cell(users)).fillna(1.0 / n_cat).to_numpy()


def _price_and_brands(pos: pd.DataFrame, users: np.ndarray, items: dict) -> SimpleNamespace:
    """Each user's price tier (mean relative price of their positives, shrunk toward 0 by one pseudo-click) and two
    most clicked brands (one brand twice when they clicked one; -1, matching nothing, without positives)."""
    at = pd.Series(np.arange(len(users)), index=users)
    p = pos[pos["user_id"].isin(users)]
    row = at[p["user_id"].to_numpy()].to_numpy()
    n = np.bincount(row, minlength=len(users))
    tier = np.bincount(row, weights=items["rel_price"][p["item_row"].to_numpy()], minlength=len(users)) / (n + 1.0)
    counts = pd.DataFrame({"r": row, "b": items["brand"][p["item_row"].to_numpy()]}).value_counts().rename("n").reset_index()
    top = counts.sort_values(["r", "n", "b"], ascending=[True, False, True]).groupby("r").head(2)
    rank = top.groupby("r").cumcount().to_numpy()
    fav = np.full((len(users), 2), -1, np.int64)
    fav[top["r"].to_numpy(), rank] = top["b"].to_numpy()
    fav[:, 1] = np.where(fav[:, 1] < 0, fav[:, 0], fav[:, 1])
    return SimpleNamespace(tier=tier, fav_brands=fav)


def measure(artifacts: Path, max_users: int = 20_000, only: tuple = ()) -> dict:
    raw = json.loads((artifacts / "data" / "raw" / "schema.json").read_text())
    if not str(raw.get("source", "")).startswith("synthetic-"):
        raise SystemExit(f"{artifacts}: not a synthetic shop (source {raw.get('source')!r}); the ceiling needs the generator's truth")
    data = FeatureData(artifacts / "features")
    if data.schema["split"] == "none":
        raise SystemExit(f"{artifacts}/features: built with --deploy; nothing is held out")
    train, users, truth = E.test_users(data, max_users)
    warm = np.isin(users, train["user_id"].unique())
    users, truth = users[warm], [t for t, w in zip(truth, warm) if w]
    seen = E._seen(users, train, data.n_items)
    items, latent = synthetic.latent_truth(raw["size"], int(raw["seed"]), users)
    if not np.array_equal(data.items["item_ids"], synthetic.ITEM_ID_BASE + np.arange(data.n_items)):
        raise SystemExit(f"{artifacts}: item rows are not the generator's item order")
    cat, n_cat = items["category"], latent.pref.shape[1]
    pos = train[train["kind"] >= POSITIVE_KIND]
    count = np.bincount(pos["item_row"].values, minlength=data.n_items).astype(float)
    emp_global = count / count.sum()
    emp_in_cat = (count + 1) / np.bincount(cat, weights=count + 1, minlength=n_cat)[cat]
    gp = np.exp(items["log_pop"])
    lat_global, lat_in_cat = gp / gp.sum(), gp / np.bincount(cat, weights=gp, minlength=n_cat)[cat]
    late = np.where(latent.shifted[:, None], latent.pref2, latent.pref)
    shown = latent.shifted & (train.groupby("user_id")["ts"].max().reindex(users).to_numpy() >= latent.shift_ts)
    revealed = np.where(shown[:, None], latent.pref2, latent.pref)
    est = _estimates(pos, users, cat, n_cat)
    shift_of = pd.Series(np.where(shown, latent.shift_ts, -1), index=users)
    after = pos[pos["ts"].values >= shift_of.reindex(pos["user_id"]).fillna(-1).to_numpy()]
    est |= {name.replace("history_sessions_decay1.0", "history_after_shift"): q
            for name, q in _estimates(after, users, cat, n_cat).items() if "decay1.0" in name}

    seen_taste = _price_and_brands(pos, users, items)
    click_model = {f"history_click_model_smooth{a}": est[f"history_sessions_decay{CLICK_MODEL_DECAY}_smooth{a}"]
                   for a in CLICK_MODEL_SMOOTH}
    wanted = lambda name: not only or name in only  # noqa: E731 - the cell prior reads every train user: only when asked
    if any(wanted(f"history_click_model_cells_smooth{a}") for a in CLICK_MODEL_SMOOTH):
        prior = _cell_prior(pos, users, pd.read_parquet(artifacts / "data" / "raw" / "users.parquet"), cat, n_cat)
        grid = {f"history_click_model_cells_smooth{a}": (CLICK_MODEL_DECAY, a) for a in CLICK_MODEL_SMOOTH}
        click_model |= _estimates(pos, users, cat, n_cat, grid, prior)

    scorers = {
        "popularity": lambda sl: np.broadcast_to(count, (sl.stop - sl.start, len(count))),
        "oracle": lambda sl: _click_oracle(latent, sl, items, late[sl]),
        "oracle_category": lambda sl: _category_scores(late[sl], cat, lat_global, lat_in_cat),
        "oracle_pre_shift": lambda sl: _category_scores(latent.pref[sl], cat, lat_global, lat_in_cat),
        "oracle_revealed": lambda sl: _category_scores(revealed[sl], cat, lat_global, lat_in_cat),
        **{name: (lambda sl, q=q: _category_scores(q[sl], cat, emp_global, emp_in_cat)) for name, q in est.items()},
        **{name: (lambda sl, q=q: _click_oracle(seen_taste, sl, items, q[sl])) for name, q in click_model.items()},
    }
    unknown = sorted(set(only) - set(scorers))
    if unknown:
        raise SystemExit(f"synthetic_ceiling: --only {' '.join(unknown)}: no such system (known: {' '.join(scorers)})")
    results = {}
    print(f"ceiling: {len(users)} warm users, {int(latent.shifted.sum())} shifted, "
          f"{int(shown.sum())} of them with a train action after the shift", flush=True)
    for name, fn in scorers.items():
        if only and name not in only and name != "popularity":
            continue
        t0 = time.time()
        top = np.concatenate([E.top_n_unseen(fn(slice(s, min(s + CHUNK, len(users)))), seen[s : s + CHUNK])
                              for s in range(0, len(users), CHUNK)])
        results[name] = {
            "ndcg@10": M.mean_se(M.per_user_ndcg(top, truth, 10)),
            "recall@10": M.mean_se(M.per_user_recall(top, truth, 10)),
            "recall@50": M.mean_se(M.per_user_recall(top, truth, 50)),
        }
        print(f"ceiling: {name:40s} ndcg@10 {results[name]['ndcg@10'][0]:.4f} ({time.time() - t0:.0f}s)", flush=True)
    from_data = {n for n in (est.keys() | click_model.keys()) & results.keys() if not n.startswith("history_after_shift")}
    if from_data:
        best = max(from_data, key=lambda n: results[n]["ndcg@10"][0])
        results["best_history"] = {**results[best], "which": best}
    return {"users": len(users), "items": int(data.n_items), "size": raw["size"], "seed": raw["seed"],
            "results": {k: {m: (v if m == "which" else {"mean": v[0], "se": v[1]}) for m, v in r.items()}
                        for k, r in results.items()}}


def markdown(r: dict) -> str:
    pop = r["results"]["popularity"]["ndcg@10"]["mean"]
    lines = [f"# What a model could win on the synthetic `{r['tag']}` shop",
             "",
             (f"{r['users']} warm test users of `shoprec evaluate` (same truth, seen items excluded), {r['items']} items. "
             f"Command: `{r['command']}`. Mean ± standard error over users. `best_history` is the best estimate on test "
             "(optimistic). Rows from quality_*.json are copied from `shoprec evaluate`'s warm table."),
             "",
             "| system | ndcg@10 | × popularity | recall@10 | recall@50 |",
             "|---|---|---|---|---|"]
    for name, m in r["results"].items():
        label = f"{name} ({m['which']})" if "which" in m else name
        cells = [f"{m[k]['mean']:.4f} ± {m[k]['se']:.4f}" for k in ("ndcg@10", "recall@10", "recall@50")]
        lines.append(f"| {label} | {cells[0]} | {m['ndcg@10']['mean'] / pop:.2f} | {cells[1]} | {cells[2]} |")
    lines += ["", f"Machine: {r['machine']}. {r['seconds']} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts", help="a synthetic shop's artifacts (data + features)")
    ap.add_argument("--tag", required=True, help="writes RESULTS/ceiling_<tag>.{json,md}")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--quality", type=Path, default=None,
                    help="a quality_<tag>.json to copy the served pipeline's and two-tower's warm rows from "
                         "(default: RESULTS/quality_<tag>.json when it exists)")
    ap.add_argument("--max-users", type=int, default=20_000, help="as `shoprec evaluate` (default 20000)")
    ap.add_argument("--only", nargs="+", default=(), metavar="SYSTEM",
                    help="score only these systems (and popularity); default: all")
    args = ap.parse_args(argv)
    t0 = time.time()
    r = measure(args.artifacts, args.max_users, tuple(args.only))
    quality = args.quality or args.results / f"quality_{args.tag}.json"
    if quality.exists():
        q = json.loads(quality.read_text())["results"]
        for name in ("two_tower", "served_pipeline"):
            if "warm" in q.get(name, {}):
                r["results"][f"{name} ({quality.name})"] = {
                    k: q[name]["warm"][k] for k in ("ndcg@10", "recall@10", "recall@50")}
    r.update(tag=args.tag, machine=describe(), seconds=round(time.time() - t0, 1),
             command=" ".join(["python -m benchmarks.synthetic_ceiling --artifacts ARTIFACTS --tag", args.tag,
                               *(["--quality", str(args.quality)] if args.quality else []),
                               *(["--only", *args.only] if args.only else [])]))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"ceiling_{args.tag}.json").write_text(json.dumps(r, indent=1) + "\n")
    (args.results / f"ceiling_{args.tag}.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
