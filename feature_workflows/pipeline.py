"""`shoprec features`: raw tables -> splits, fitted workflows, training rows, serving feature files.

Splits (config [features] split): `time` (global timestamp quantiles: the last test_fraction of
the timeline is test, the valid_fraction before it valid), `user-time` (inside each user), `random`
(per action), or `none` (deployment: every event trains and the served user state holds every
event). Valid and test exist for evaluation and tuning only.

Inside train, a holdout (`holdout_latest` of each user's latest actions plus `holdout_random` of
the rest, whole sessions at a time) is what the two-tower early-stops on and what the ranker learns to rank (models fitted
on the other train actions produce its candidates); training then refits on all of train.

Writes into OUT (default artifacts/features):
  workflows/query, workflows/item   saved NVTabular workflows (offline use only: they unpickle)
  actions.parquet                   every action (user, item_row, ts, session, kind, split, fold)
  train.parquet                     two-tower rows: each positive train action with the user's
                                    state at its session start (transformed) and the item row
  serving/query_plan.json, query_vocab.npz   the request-time transform (NumPy, no pickles)
  serving/user_store.npz            user attributes + history state after the train split
  serving/item_table.npz            packed item features, raw ids, display data, popularity order
  schema.json                       column groups, cardinalities, roles, split summary
  manifest.json                     sha256 of every file above
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from runtime.request_transform import TransformPlan, raw_rows
from shoprec.config import FeatureConfig
from shoprec.manifest import write_manifest
from shoprec.progress import Steps

from . import nvt_compat
from .export_plan import save_plan
from .history import DAY, NEVER, POSITIVE_KIND, ActionLog, actions_from_events, context_from_ts
from .raw_schema import RawDataError, read_schema, read_table
from .workflows import (
    item_input_frame,
    item_spec,
    item_workflow,
    multi_slot_columns,
    query_input_columns,
    query_spec,
    query_workflow,
    usable_columns,
)

log = logging.getLogger("shoprec.features")
SPLITS = ("time", "user-time", "random", "none")
HOLDOUT_UNITS = ("session", "action")
SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}


def assign_split(ts: np.ndarray, user: np.ndarray, item: np.ndarray, cfg: FeatureConfig) -> tuple[np.ndarray, dict]:
    """Split code (0 train, 1 valid, 2 test) per action, and the cut points."""
    n = len(ts)
    fv, ft = cfg.valid_fraction, cfg.test_fraction
    if cfg.split == "none":
        return np.zeros(n, np.int8), {}
    if cfg.split == "time":
        cuts = {"t_valid": int(np.quantile(ts, 1 - fv - ft)), "t_test": int(np.quantile(ts, 1 - ft))}
        return time_part(ts, cuts), cuts
    if cfg.split == "random":
        u = np.random.default_rng(cfg.split_seed).random(n)
        return np.where(u < 1 - fv - ft, 0, np.where(u < 1 - ft, 1, 2)).astype(np.int8), {}
    if cfg.split == "user-time":
        order = np.lexsort((item, ts, user))
        rank, size = _rank_in_user(user[order])
        n_tr, n_va = np.floor((1 - fv - ft) * size), np.floor(fv * size)
        part = np.empty(n, np.int8)
        part[order] = np.where(rank < n_tr, 0, np.where(rank < n_tr + n_va, 1, 2))
        return part, {}
    raise ValueError(f"features.split must be one of {SPLITS}, got {cfg.split!r}")


def time_part(ts: np.ndarray, cuts: dict) -> np.ndarray:
    """The time split's code per timestamp: 0 before t_valid, 1 before t_test, 2 from then on."""
    return np.searchsorted(np.array([cuts["t_valid"], cuts["t_test"]]), ts, side="right").astype(np.int8)


def _rank_in_user(sorted_users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_users)) + 1]
    sizes = np.diff(np.r_[starts, len(sorted_users)])
    return np.arange(len(sorted_users)) - np.repeat(starts, sizes), np.repeat(sizes, sizes)


def _utc(ts: int) -> str:
    return str(np.datetime64(int(ts), "s")).replace("T", " ")


def assign_holdout(actions: pd.DataFrame, cfg: FeatureConfig) -> np.ndarray:
    """Fold per train action: 0 fit, 1 holdout (the latest `holdout_latest` of each user's train
    actions, by (ts, item), plus `holdout_random` of the others at random).

    `holdout_unit = "session"` holds out whole sessions (user, session_id): a session with any of the
    user's latest actions, and each other session with chance `holdout_random` (the draw of its first
    action). So no label is the rest of a visit whose start the models saw: the ranker learns what a user
    does on another visit, which is what the server and evaluation ask of it. Where every session is one
    action (rating data without session ids: one session per user and timestamp, so ties on a timestamp
    go together) it is the per-action rule. A user whose sessions would all be held out gets back the ones
    drawn at random; one whose latest actions span every session (most often a single visit) keeps the
    per-action rule. So the fit-fold models see every user the per-action rule lets them see.
    `"action"`: per action, sessions split."""
    if cfg.holdout_unit not in HOLDOUT_UNITS:
        raise ValueError(f"features.holdout_unit must be one of {HOLDOUT_UNITS}, got {cfg.holdout_unit!r}")
    a = actions
    order = np.lexsort((a["item_row"].values, a["ts"].values, a["user_id"].values))
    rank, size = _rank_in_user(a["user_id"].values[order])
    latest = np.zeros(len(a), bool)
    latest[order] = rank >= size - np.floor(cfg.holdout_latest * size)
    rnd = np.random.default_rng(cfg.split_seed + 1).random(len(a)) < cfg.holdout_random
    if cfg.holdout_unit == "action" or "session_id" not in a.columns or not len(a):
        return (latest | rnd).astype(np.int8)
    session = a.groupby(["user_id", "session_id"], sort=False).ngroup().to_numpy()
    first = np.full(session.max() + 1, len(a), np.int64)
    np.minimum.at(first, session, np.arange(len(a)))
    by_latest = np.zeros(len(first), bool)
    np.logical_or.at(by_latest, session, latest)
    user = pd.factorize(a["user_id"])[0]

    def fitted(fold: np.ndarray) -> np.ndarray:  # per row: does its user keep a fit action?
        keeps = np.zeros(user.max() + 1, bool)
        keeps[user[~fold]] = True
        return keeps[user]

    fold = (by_latest | rnd[first])[session]
    fold = np.where(fitted(fold), fold, by_latest[session])  # the random draws took the user's last fit visit
    return np.where(fitted(fold), fold, latest | rnd).astype(np.int8)


def _category_codes(items: pd.DataFrame, roles: dict, kinds: dict) -> tuple[np.ndarray | None, np.ndarray]:
    col = roles.get("category")
    if col is None or col not in items.columns or items[col].isna().all():
        return None, np.array([], dtype=str)
    values = items[col]
    if kinds.get(col) == "multi":
        values = values.map(lambda v: None if v is None or v != v else (str(v).split("|")[0].strip() or None))
    codes, names = pd.factorize(values.astype("object"), sort=True)
    return codes.astype(np.int64), np.asarray(names.astype(str), dtype=str)


def _rel_price(items: pd.DataFrame, roles: dict, category: np.ndarray | None) -> np.ndarray | None:
    col = roles.get("price")
    if col is None or col not in items.columns or items[col].isna().all():
        return None
    logp = np.log(items[col].astype(float).clip(lower=0.01))
    if category is not None:
        logp = logp - logp.groupby(category).transform("mean")
    return logp.fillna(0.0).values.astype(np.float64)


def _item_value(items: pd.DataFrame, roles: dict) -> np.ndarray:
    """The items' value for the serving blend (runtime/strategy.py): their price, the median price where missing (as
    the models' price feature is filled: an unknown price is a typical one, not a free item); empty without one."""
    col = roles.get("price")
    if col is None or col not in items.columns or items[col].isna().all():
        return np.zeros(0)
    price = items[col].astype(float).clip(lower=0)
    return price.fillna(price.median()).values.astype(np.float64)


def _item_statistics(items: pd.DataFrame, train: pd.DataFrame, impressions: pd.DataFrame, roles: dict,
                     t_ref: int) -> pd.DataFrame:
    """Statistics per item row from the given training actions: positives, exposures (shown or acted
    on), positive rate (smoothed toward the catalog mean) and age."""
    n = len(items)
    pos = np.bincount(train.loc[train["kind"] >= POSITIVE_KIND, "item_row"], minlength=n).astype(np.float64)
    exposures = np.bincount(train["item_row"], minlength=n) + np.bincount(impressions["item_row"], minlength=n)
    prior = pos.sum() / max(exposures.sum(), 1)
    stats = pd.DataFrame({"popularity": pos, "exposures": exposures.astype(np.float64),
                          "positive_rate": (pos + 5 * prior) / (exposures + 5)})
    created = roles.get("created")
    if created is not None and created in items.columns and items[created].notna().any():
        stats["item_age_days"] = ((t_ref - items[created].astype("float64")) / DAY).clip(lower=0).values
    return stats


def _store_arrays(users: pd.DataFrame, attr_cols: list[str], log_: ActionLog, n_seq: int, n_cat: int) -> dict:
    """user_store.npz: attributes (+ null masks), state after every action in `log_`, history CSR
    (item rows, kinds, timestamps, sessions)."""
    users = users.sort_values("user_id").reset_index(drop=True)
    ids = users["user_id"].values.astype(np.int64)
    arrays: dict[str, np.ndarray] = {"user_id": ids}
    for col in attr_cols:
        s = users[col]
        arrays[f"attr__{col}__null"] = s.isna().values
        arrays[f"attr__{col}"] = (s.astype(float).values if pd.api.types.is_numeric_dtype(s)
                                  else np.asarray(s.fillna("").astype(str).values, dtype=str))
    state = log_.states(ids, NEVER, n_seq, n_cat)
    for key, value in state.items():
        arrays[key] = value
    # every action in time order: the seen filter and item-to-item routes read rows and kinds; the online
    # store (runtime/online_store.py) seeds a user's live actions from all four, so an event merges with
    # the snapshot exactly as the offline dedup would (one action per item and session)
    arrays["hist_indptr"], idx = log_.history_index(ids)
    arrays["hist_rows"], arrays["hist_kinds"] = log_.row[idx], log_.kind[idx]
    arrays["hist_ts"], arrays["hist_session"] = log_.ts[idx], log_.session[idx]
    return arrays


@dataclass
class _Split:
    """The raw tables read and checked, the actions split (train/valid/test) and folded (fit/holdout)."""

    raw_schema: dict
    users: pd.DataFrame
    items: pd.DataFrame
    actions: pd.DataFrame  # one row per interaction: user_id, item_row, ts, session_id, kind, device, split, fold
    impressions: pd.DataFrame  # what was shown before the held-out period (user_id, item_row, ts, session_id)
    cuts: dict
    train_end: int

    @property
    def part(self) -> np.ndarray:
        return self.actions["split"].values

    @property
    def train(self) -> pd.DataFrame:
        return self.actions[self.actions["split"].values == 0]


@dataclass
class _ItemFeatures:
    spec: dict
    workflow: object
    feats: pd.DataFrame  # statistics from every train action (served)
    feats_fit: pd.DataFrame  # statistics from the fit fold (what the fold-trained models see)
    stats: pd.DataFrame
    stats_fit: pd.DataFrame
    cat_names: list[str]
    cont_names: list[str]
    category: np.ndarray | None
    category_names: np.ndarray
    rel_price: np.ndarray | None
    dropped: list[str]


def build_features(raw_dir: str | Path, out_dir: str | Path, cfg: FeatureConfig, progress: bool = True) -> dict:
    t0 = time.time()
    if cfg.split not in SPLITS:
        raise ValueError(f"features.split must be one of {SPLITS}, got {cfg.split!r}")
    if cfg.holdout_unit not in HOLDOUT_UNITS:
        raise ValueError(f"features.holdout_unit must be one of {HOLDOUT_UNITS}, got {cfg.holdout_unit!r}")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)  # never leave a stale file of an earlier run beside the new ones
    (out / "serving").mkdir(parents=True)
    steps = Steps("features", 6, progress)
    data = _read_and_split(Path(raw_dir), cfg)
    steps.done("split")
    it = _item_features(data, out)
    steps.done("item workflow")
    qw, qspec, log_all, dropped_users, train_rows = _query_features(data, it, cfg, out)
    steps.done("query workflow")
    n_rows = _training_rows(qw, train_rows, it, cfg, out)
    data.actions.to_parquet(out / "actions.parquet", index=False)
    steps.done("training rows")
    plan = _serving_files(qw, qspec, log_all, data, it, cfg, out)
    steps.done("serving files")
    schema = _schema(plan, qspec, data, it, cfg, dropped_users, n_rows)
    (out / "schema.json").write_text(json.dumps(schema, indent=1) + "\n")
    write_manifest(out, extra={"stage": "features"})
    steps.done("schema + manifest")
    if it.dropped or dropped_users:
        log.warning("left out columns without any value: items %s, users %s", it.dropped, dropped_users)
    return {"out": str(out), "split": cfg.split, **schema["actions"], "train_rows": n_rows, "items": int(len(data.items)),
            "dropped_columns": schema["dropped_columns"], "seconds": round(time.time() - t0, 1)}


def _read_and_split(raw_dir: Path, cfg: FeatureConfig) -> _Split:
    raw_schema = read_schema(raw_dir)
    users = read_table(raw_dir, "users")
    items = read_table(raw_dir, "items").sort_values("item_id", kind="stable").reset_index(drop=True)
    inter = read_table(raw_dir, "interactions")
    item_row = pd.Series(np.arange(len(items)), index=items["item_id"].values)
    unknown_items = ~inter["item_id"].isin(item_row.index)
    if unknown_items.any():
        raise RawDataError(f"{raw_dir}: interactions reference {int(unknown_items.sum())} events of item ids missing from "
                           f"items.parquet (e.g. {int(inter.loc[unknown_items, 'item_id'].iloc[0])})")
    missing_users = np.setdiff1d(inter["user_id"].unique(), users["user_id"].values)
    if len(missing_users):  # users known only from their events: no attributes (nulls)
        users = pd.concat([users, pd.DataFrame({"user_id": missing_users})], ignore_index=True)
    actions = actions_from_events(inter, item_row)
    if not len(actions):
        raise RawDataError(f"{raw_dir}: no user interactions (view/click/cart/purchase) to learn from")
    if not (actions["kind"].values >= POSITIVE_KIND).any():  # more data or another split would not help
        raise RawDataError(f"{raw_dir}: none of the {len(actions)} actions is a positive (a click, cart or purchase; "
                           "with ratings, one at or above the positive threshold): the models learn from positives. "
                           "With ratings, lower `shoprec data --positive-threshold`")
    part, cuts = assign_split(actions["ts"].values, actions["user_id"].values, actions["item_row"].values, cfg)
    if cuts:  # a global time split (cut at its actions' quantiles): a session that spans a cut leaves each side's
        # events on that side, so the actions are made again with the cuts
        actions = actions_from_events(inter, item_row, cuts=(cuts["t_valid"], cuts["t_test"]))
        part = time_part(actions["ts"].values, cuts)
    session_device = inter.drop_duplicates(["user_id", "session_id"]).set_index(["user_id", "session_id"])["device"]
    actions["device"] = session_device.reindex(pd.MultiIndex.from_arrays(
        [actions["user_id"].values, actions["session_id"].values])).values
    imp = inter[inter["event"] == "impression"]
    impressions = pd.DataFrame({"user_id": imp["user_id"].values, "item_row": imp["item_id"].map(item_row).values,
                                "ts": imp["ts"].values, "session_id": imp["session_id"].values})
    actions["split"] = part
    ts = actions["ts"].values
    stamps = f"{len(np.unique(ts))} distinct timestamp(s), {_utc(ts.min())} .. {_utc(ts.max())}"
    if not (part == 0).any():
        raise RawDataError(f"{raw_dir}: the {cfg.split!r} split left no training actions ({len(ts)} actions, {stamps}); "
                           "use --split random or user-time, or --deploy")
    if not ((part == 0) & (actions["kind"].values >= POSITIVE_KIND)).any():
        raise RawDataError(f"{raw_dir}: the {cfg.split!r} split left no positive (click, cart or purchase) among the "
                           f"training actions ({len(ts)} actions, {stamps}); use another --split, or --deploy")
    if cfg.split != "none" and not (part == 1).any():
        log.warning("the %r split left no valid actions (%d actions, %s): train chooses its hyper-parameters on the "
                    "holdout inside train and evaluate's baselines keep their first grid point; --split random or "
                    "user-time avoids it", cfg.split, len(ts), stamps)
    if cfg.split != "none" and not ((part == 2) & (actions["kind"].values >= POSITIVE_KIND)).any():
        raise RawDataError(f"{raw_dir}: the {cfg.split!r} split left no positive in the test part; "
                           "need more data or `features.split = \"none\"`")
    fold = np.full(len(actions), -1, np.int8)
    fold[part == 0] = assign_holdout(actions[part == 0], cfg)
    actions["fold"] = fold
    train_end = int(actions.loc[part == 0, "ts"].max()) + 1
    if cfg.split == "time":
        impressions = impressions[impressions["ts"] < cuts["t_valid"]]
    elif cfg.split != "none":  # per-user or random splits: keep the impressions shown before the user's first held-out action
        first_out = actions[part > 0].groupby("user_id")["ts"].min()
        impressions = impressions[impressions["ts"] < impressions["user_id"].map(first_out).fillna(NEVER).values]
    return _Split(raw_schema, users, items, actions, impressions, cuts, train_end)


def _item_features(data: _Split, out: Path) -> _ItemFeatures:
    """Item attributes that carry information, statistics from the training window, the fitted item workflow."""
    items, roles, part = data.items, data.raw_schema["roles"], data.part
    fold = data.actions["fold"].values
    kinds, dropped = usable_columns(items, data.raw_schema["items"])
    category, category_names = _category_codes(items, roles, data.raw_schema["items"])
    rel_price = _rel_price(items, roles, category)
    # two sets of statistics: from every train action (served), and from the fit fold only (what the
    # models trained on the fold see), so no holdout label counts toward its own item's popularity, and no
    # held-out visit's impressions toward its exposures (the slate a held-out click came from: a served
    # request never knows its own visit's impressions)
    stats = _item_statistics(items, data.actions[part == 0], data.impressions, roles, data.train_end)
    hold = data.actions[(part == 0) & (fold == 1)]
    imp = data.impressions
    held = pd.MultiIndex.from_arrays([hold["user_id"].values, hold["session_id"].values])
    imp_fit = imp[~pd.MultiIndex.from_arrays([imp["user_id"].values, imp["session_id"].values]).isin(held)]
    stats_fit = _item_statistics(items, data.actions[(part == 0) & (fold == 0)], imp_fit, roles, data.train_end)
    ispec = item_spec(kinds, roles, "item_age_days" in stats.columns)
    iframe = item_input_frame(pd.concat([items, stats], axis=1), ispec)
    iframe_fit = item_input_frame(pd.concat([items, stats_fit], axis=1), ispec)
    acted = np.zeros(len(items), bool)
    acted[data.actions.loc[part == 0, "item_row"].values] = True
    iw = item_workflow(ispec, out / "categories")
    nvt_compat.fit(iw, iframe[acted])  # ids never acted on in train stay out-of-vocabulary
    feats, feats_fit = nvt_compat.transform(iw, iframe), nvt_compat.transform(iw, iframe_fit)
    iw.save(str(out / "workflows" / "item"))
    cat_names = ["item_id", *ispec["cat"], *[c for m in ispec["multi"] for c in multi_slot_columns(m)]]
    cont_names = [*ispec["num"], *ispec["price"], *ispec["stats"]]
    return _ItemFeatures(ispec, iw, feats, feats_fit, stats, stats_fit, cat_names, cont_names, category, category_names,
                         rel_price, dropped)


def _query_features(data: _Split, it: _ItemFeatures, cfg: FeatureConfig, out: Path):
    """The history state and the query workflow fitted on the two-tower's training rows: each positive
    train action, with the state when its session began (the server's snapshot never holds the
    running session's own clicks)."""
    user_kinds, dropped_users = usable_columns(data.users, data.raw_schema["users"])
    qspec = query_spec(user_kinds, cfg.recent_categories, it.category is not None, it.rel_price is not None)
    train_actions = data.train
    log_all = ActionLog(train_actions, it.category, it.rel_price)
    rows = train_actions[train_actions["kind"] >= POSITIVE_KIND]
    session_start = rows.groupby(["user_id", "session_id"])["ts"].transform("min").values
    rows = rows.assign(state_ts=session_start)  # the time the row's state is taken at (train.parquet's state_ts)
    state = log_all.states(rows["user_id"].values, session_start, cfg.sequence_length, cfg.recent_categories)
    attrs = _user_attrs(data.users, rows["user_id"].values, qspec)
    hour, weekday = context_from_ts(rows["ts"].values)
    raw = raw_rows(qspec, state, attrs, it.category_names, hour, weekday, rows["device"].values)
    qframe = pd.DataFrame(raw)[query_input_columns(qspec)]
    qw = query_workflow(qspec, out / "categories")
    nvt_compat.fit(qw, qframe)
    qw.save(str(out / "workflows" / "query"))
    return qw, qspec, log_all, dropped_users, (rows, state, qframe)


TRAINING_ROWS_CHUNK = 500_000  # rows transformed and written at a time: the large shop's rows do not fit in memory twice


def _training_rows(qw, train_rows, it: _ItemFeatures, cfg: FeatureConfig, out: Path) -> int:
    """train.parquet: the query features of each training row, its sequence as item codes, its label.
    Transformed and written TRAINING_ROWS_CHUNK rows at a time (the fitted workflow is row-wise, so
    the chunks give what one transform of every row would)."""
    rows, state, qframe = train_rows
    codes = it.feats["item_id"].values.astype(np.int64)
    seq = state["seq_rows"]
    writer, schema = None, None
    try:
        for lo in range(0, max(len(rows), 1), TRAINING_ROWS_CHUNK):  # an empty table is still written
            hi = min(lo + TRAINING_ROWS_CHUNK, len(rows))
            feats = nvt_compat.transform(qw, qframe.iloc[lo:hi])
            part = seq[lo:hi]
            extra = {f"seq_{i + 1}": np.where(part[:, i] >= 0, codes[np.maximum(part[:, i], 0)], 0)
                     for i in range(cfg.sequence_length)}
            extra.update({f"seq_kind_{i + 1}": state["seq_kinds"][lo:hi, i] for i in range(cfg.sequence_length)})
            extra.update({"item_row": rows["item_row"].values[lo:hi], "kind": rows["kind"].values[lo:hi],
                          "fold": rows["fold"].values[lo:hi], "user_id_raw": rows["user_id"].values[lo:hi],
                          "ts": rows["ts"].values[lo:hi], "state_ts": rows["state_ts"].values[lo:hi]})
            table = pa.Table.from_pandas(pd.concat([feats, pd.DataFrame(extra)], axis=1), preserve_index=False)
            if writer is None:
                schema = table.schema
                writer = pq.ParquetWriter(out / "train.parquet", schema)
            writer.write_table(table.select(schema.names).cast(schema))
    finally:
        if writer is not None:
            writer.close()
    return int(len(rows))


def _serving_files(qw, qspec: dict, log_all: ActionLog, data: _Split, it: _ItemFeatures, cfg: FeatureConfig,
                   out: Path) -> TransformPlan:
    """The request-time plan, the user store (state after the train split) and the packed item table."""
    save_plan(qw, out / "serving", "query")
    plan = TransformPlan.load(out / "serving" / "query_plan.json", out / "serving" / "query_vocab.npz")
    attr_cols = [c.removeprefix("user_") for c in qspec["user_cat"] + qspec["user_num"]]
    store = _store_arrays(data.users[["user_id", *attr_cols]], attr_cols, log_all, cfg.sequence_length, cfg.recent_categories)
    np.savez(out / "serving" / "user_store.npz", **store)  # `export` adds each user's columns, encoded once
    items = data.items
    display = {f"display__{c}": np.asarray(items[c].fillna("").astype(str).values, dtype=str)
               for c, k in data.raw_schema["items"].items() if k in ("text", "categorical", "multi")}
    np.savez(
        out / "serving" / "item_table.npz",
        item_ids=items["item_id"].values.astype(np.int64),
        item_cat=it.feats[it.cat_names].values.astype(np.int64),
        item_cont=it.feats[it.cont_names].values.astype(np.float32),
        item_cont_fit=it.feats_fit[it.cont_names].values.astype(np.float32),
        popular_rows_fit=np.lexsort((np.arange(len(items)), -it.stats_fit["popularity"].values)).astype(np.int64),
        cat_names=np.array(it.cat_names),
        cont_names=np.array(it.cont_names),
        popular_rows=np.lexsort((np.arange(len(items)), -it.stats["popularity"].values)).astype(np.int64),
        popularity=it.stats["popularity"].values.astype(np.float64),
        popularity_fit=it.stats_fit["popularity"].values.astype(np.float64),
        category_code=it.category if it.category is not None else np.full(len(items), -1, np.int64),
        category_names=it.category_names,
        rel_price=it.rel_price if it.rel_price is not None else np.zeros(0),  # empty: the items have no price
        value=_item_value(items, data.raw_schema["roles"]),  # what a blend's value weight multiplies (price); empty: none
        **display,
    )
    return plan


def _schema(plan: TransformPlan, qspec: dict, data: _Split, it: _ItemFeatures, cfg: FeatureConfig, dropped_users: list,
            n_rows: int) -> dict:
    """schema.json: what training and export read about the features (names, vocabularies, cardinalities, split)."""
    item_card = {}
    for col in it.workflow.output_schema:
        sizes = col.properties.get("embedding_sizes")
        if sizes:
            item_card[col.name] = int(sizes["cardinality"])
    vocab_of = {c["name"]: next((op["vocab"] for op in c["ops"] if op["type"] == "categorify"), c["name"]) for c in plan.columns}
    multi = it.spec["multi"]
    return {
        "query_spec": qspec,
        "query_cat": plan.cat_names,
        "query_vocabularies": [vocab_of[c] for c in plan.cat_names],
        "query_cont": plan.cont_names,
        "query_cardinalities": plan.cardinalities,
        "context_columns": [c for c in plan.cat_names if c in qspec["context"]],
        "item_cat": it.cat_names,
        "item_vocabularies": [c if not any(c in multi_slot_columns(m) for m in multi)
                              else next(m for m in multi if c in multi_slot_columns(m)) for c in it.cat_names],
        "item_cont": it.cont_names,
        "item_cardinalities": {c: item_card[c] for c in it.cat_names},
        "sequence_length": cfg.sequence_length,
        "recent_categories": cfg.recent_categories,
        "roles": data.raw_schema["roles"],
        "dropped_columns": {"items": it.dropped, "users": dropped_users},
        "split": cfg.split, "cuts": data.cuts, "train_end": data.train_end,
        "actions": {name: int((data.part == code).sum()) for name, code in SPLIT_CODE.items()},
        "holdout_actions": int((data.actions["fold"].values == 1).sum()),
        "train_rows": n_rows,
        "items": int(len(data.items)),
        "users": int(len(data.users)),
        "source": data.raw_schema.get("source"),
    }


def _user_attrs(users: pd.DataFrame, user_ids: np.ndarray, qspec: dict) -> dict[str, np.ndarray]:
    """Raw attribute columns for each query user (None / NaN where unknown)."""
    cat = [c.removeprefix("user_") for c in qspec["user_cat"]]
    num = [c.removeprefix("user_") for c in qspec["user_num"]]
    table = users.set_index("user_id")[cat + num].reindex(user_ids)
    out: dict[str, np.ndarray] = {"user_id": np.asarray(user_ids, dtype=np.int64)}
    for col in cat:
        v = table[col]
        out[col] = np.asarray(v.astype("object").where(v.notna(), None).map(lambda x: x if x is None else str(x)).values, dtype=object)
    for col in num:
        out[col] = table[col].astype(float).values
    return out
