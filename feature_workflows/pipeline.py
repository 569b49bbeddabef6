"""`shoprec features`: raw tables -> fitted workflows, transformed splits, serving feature files.

Writes into OUT (default artifacts/features):
  workflows/query, workflows/item   saved NVTabular workflows (offline use only: they unpickle)
  train/valid/test.parquet          transformed query features + labels + item_row, time-split
  item_features.parquet             transformed catalog (one row per item, row = item_row)
  serving/query_plan.json, query_vocab.npz   the request-time transform (NumPy, no pickles)
  serving/user_store.npz            raw user profile + history snapshot at the test cut-off
  serving/item_table.npz            packed item features, raw ids, popularity order, display data
  schema.json                       column groups, cardinalities, split times
  manifest.json                     sha256 of every file above
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from shoprec.config import FeatureConfig
from shoprec.manifest import write_manifest

from . import nvt_compat
from .export_plan import save_plan
from .history import DAY, attach_history, click_states, context_from_ts, recent_category_columns, recent_item_columns, snapshot
from .raw_schema import RawDataError, read_table
from .request_transform import TransformPlan
from .workflows import TARGET_COLUMNS, item_workflow, query_input_columns, query_workflow

STORE_COLUMNS_EXCLUDE = {"hour", "weekday", "device"}  # context comes with the request, not the store


def impression_rows(inter: pd.DataFrame) -> pd.DataFrame:
    """One row per (session, item) shown, labelled with click / purchase."""
    keys = ["user_id", "item_id", "session_id"]
    imp = inter[inter["event"] == "impression"].drop_duplicates(keys)[keys + ["ts", "device"]]
    for label in TARGET_COLUMNS:
        hit = inter.loc[inter["event"] == label, keys].drop_duplicates()
        hit[label] = 1
        imp = imp.merge(hit, on=keys, how="left")
        imp[label] = imp[label].fillna(0).astype(np.int8)
    if imp.empty:
        raise RawDataError("interactions contain no 'impression' events; nothing to train on")
    return imp.sort_values("ts", kind="stable").reset_index(drop=True)


def _query_rows(rows: pd.DataFrame, users: pd.DataFrame, states: pd.DataFrame) -> pd.DataFrame:
    """Impression rows + profile + history + context. History is the state when the row's session
    began: the server's user store is a snapshot that no click of the running session updates, so a
    model trained on in-session history would lean on a signal it never gets when serving."""
    rows = rows.merge(users.rename(columns={"device": "user_device"}), on="user_id", how="left")
    row_ts = rows["ts"].values
    rows["ts"] = rows.groupby("session_id")["ts"].transform("min").values
    rows = attach_history(rows, states)
    rows["ts"] = row_ts
    rows["hour"], rows["weekday"] = context_from_ts(rows["ts"].values)
    return rows


def _store_arrays(store: pd.DataFrame, columns: list[str]) -> dict[str, np.ndarray]:
    store = store.sort_values("user_id").reset_index(drop=True)
    arrays = {"user_id": store["user_id"].values.astype(np.int64)}
    for col in columns:
        if col == "user_id":
            continue
        s = store[col]
        null = s.isna().values
        if pd.api.types.is_numeric_dtype(s):
            arrays[col] = s.values.astype(np.float64)
        else:
            arrays[col] = np.asarray(s.fillna("").astype(str).values, dtype=str)
        arrays[f"{col}__null"] = null
    return arrays


def build_features(raw_dir: str | Path, out_dir: str | Path, cfg: FeatureConfig, progress: bool = True) -> dict:
    t0 = time.time()
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "serving").mkdir(parents=True)
    steps = tqdm(total=7, desc="features", unit="step", disable=not progress)

    users = read_table(raw_dir, "users")
    items = read_table(raw_dir, "items")
    inter = read_table(raw_dir, "interactions")
    imp = impression_rows(inter)
    t_valid = int(np.quantile(imp["ts"].values, 1 - cfg.valid_fraction - cfg.test_fraction))
    t_test = int(np.quantile(imp["ts"].values, 1 - cfg.test_fraction))
    steps.update()

    # clicks carry the item's category and its price relative to the category's (catalog known at
    # t_valid) for the history state
    known = items[items["created_ts"] < t_valid]
    cat_log_price = np.log(known["price"].clip(lower=0.01)).groupby(known["category"]).mean()
    clicks = inter.loc[inter["event"] == "click", ["user_id", "item_id", "ts"]].merge(
        items[["item_id", "category", "price"]], on="item_id", how="left"
    )
    rel = np.log(clicks.pop("price").clip(lower=0.01)) - clicks["category"].map(cat_log_price)
    clicks["rel_price"] = rel.fillna(0.0)
    states = click_states(clicks, cfg.recent_items, cfg.recent_categories)
    rows = _query_rows(imp, users, states)
    train = rows[rows["ts"] < t_valid]
    valid = rows[(rows["ts"] >= t_valid) & (rows["ts"] < t_test)]
    test = rows[rows["ts"] >= t_test]
    if len(train) == 0 or len(test) == 0:
        raise RawDataError("time split left an empty train or test set; need interactions spread over time")
    steps.update()

    # item catalog: statistics from the training window only
    train_clicks = clicks[clicks["ts"] < t_valid]
    pop = train_clicks.groupby("item_id").size()
    items = items.reset_index(drop=True)
    items["popularity"] = items["item_id"].map(pop).fillna(0).astype(np.float64)
    items["item_age_days"] = ((t_test - items["created_ts"]) / DAY).astype(np.float64)
    iw = item_workflow(out / "categories")
    iw.fit(__import__("nvtabular").Dataset(items[items["created_ts"] < t_valid].reset_index(drop=True)))
    item_feats = nvt_compat.transform(iw, items)
    item_feats["item_id_raw"] = items["item_id"].values
    item_feats.to_parquet(out / "item_features.parquet", index=False)
    iw.save(str(out / "workflows" / "item"))
    steps.update()

    # query (user + context) workflow, fit on train rows
    qcols = query_input_columns(cfg)
    qw = query_workflow(cfg, out / "categories")
    import nvtabular as nvt

    qw.fit(nvt.Dataset(train[qcols + TARGET_COLUMNS].reset_index(drop=True)))
    qw.save(str(out / "workflows" / "query"))
    steps.update()

    order = np.argsort(items["item_id"].values)
    sorted_ids = items["item_id"].values[order]
    split_sizes = {}
    for name, part in (("train", train), ("valid", valid), ("test", test)):
        feats = nvt_compat.transform(qw, part[qcols + TARGET_COLUMNS])
        pos = np.searchsorted(sorted_ids, part["item_id"].values)
        feats["item_row"] = order[np.minimum(pos, len(order) - 1)].astype(np.int64)
        feats["user_id_raw"] = part["user_id"].values
        feats["item_id_raw"] = part["item_id"].values
        feats["ts"] = part["ts"].values
        feats["device_raw"] = part["device"].astype(str).values  # raw request context, for evaluation
        feats.to_parquet(out / f"{name}.parquet", index=False)
        split_sizes[name] = int(len(feats))
    steps.update()

    # serving files: plan, user store snapshot at the test cut-off, packed item table
    save_plan(qw, out / "serving", "query")
    plan = TransformPlan.load(out / "serving" / "query_plan.json", out / "serving" / "query_vocab.npz")
    store = users.rename(columns={"device": "user_device"}).merge(snapshot(states, t_test), on="user_id", how="left")
    store_cols = [c for c in qcols if c not in STORE_COLUMNS_EXCLUDE]
    np.savez(out / "serving" / "user_store.npz", **_store_arrays(store, store_cols))
    item_plan_cat = [c for c in item_feats.columns if c in ("item_id", "category", "brand")]
    item_plan_cont = [c for c in item_feats.columns if c in ("price", "popularity", "item_age_days")]
    popular = np.argsort(-items["popularity"].values, kind="stable").astype(np.int64)
    np.savez(
        out / "serving" / "item_table.npz",
        item_ids=items["item_id"].values.astype(np.int64),
        item_cat=item_feats[item_plan_cat].values.astype(np.int64),
        item_cont=item_feats[item_plan_cont].values.astype(np.float32),
        cat_names=np.array(item_plan_cat),
        cont_names=np.array(item_plan_cont),
        popular_rows=popular,
        category=np.asarray(items["category"].astype(str).values, dtype=str),
        brand=np.asarray(items["brand"].astype(str).values, dtype=str),
        price=items["price"].values.astype(np.float64),
    )
    steps.update()

    item_card = {}
    for col in iw.output_schema:
        sizes = col.properties.get("embedding_sizes")
        if sizes:
            item_card[col.name] = int(sizes["cardinality"])
    # columns encoded with one joint vocabulary (recent items, recent categories) share an embedding table
    vocab_of = {c["name"]: next((op["vocab"] for op in c["ops"] if op["type"] == "categorify"), c["name"]) for c in plan.columns}
    schema = {
        "query_cat": plan.cat_names,
        "query_vocabularies": [vocab_of[c] for c in plan.cat_names],
        "query_cont": plan.cont_names,
        "query_cardinalities": plan.cardinalities,
        "item_cat": item_plan_cat,
        "item_cont": item_plan_cont,
        "item_cardinalities": {c: item_card[c] for c in item_plan_cat},
        "targets": TARGET_COLUMNS,
        "user_id_column": "user_id",
        "recent_item_columns": recent_item_columns(cfg.recent_items),
        "recent_category_columns": recent_category_columns(cfg.recent_categories),
        "t_valid": t_valid,
        "t_test": t_test,
        "rows": split_sizes,
        "items": int(len(items)),
        "users": int(len(users)),
    }
    (out / "schema.json").write_text(json.dumps(schema, indent=1) + "\n")
    write_manifest(out, extra={"stage": "features"})
    steps.update()
    steps.close()
    return {"out": str(out), **split_sizes, "items": int(len(items)), "seconds": round(time.time() - t0, 1)}
