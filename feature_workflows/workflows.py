"""The NVTabular workflows, built from the raw schema's column kinds.

query  one row per request: user id, user attributes, history summaries (activity, positives,
       recent categories, favourite category, price level) and context (hour, weekday, device).
       Fit on the training rows; the server executes it per request through the plan exported by
       `feature_workflows.export_plan`.
item   one row per item: item id, attributes, and training-window statistics (popularity,
       exposures, positive rate, age). Fit on the items known in the training window and
       precomputed into the item table.

Kinds: categorical -> Categorify; numeric -> FillMedian, Normalize (a column named by the `price`
role: Clip at 0, log, Normalize); multi -> its first MULTI_SLOTS values as slot columns sharing one
vocabulary (the model mean-pools them); timestamp and text are not model features (the `created`
timestamp becomes the item's age). A column with no value at all is left out (`usable_columns`).
The user's recent item *sequence* is not a workflow column: it is item-id codes looked up in the
item table (`ItemTable.codes`), the same ids the item tower embeds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .history import recent_category_columns
from .nvt_compat import categorify

CONTEXT_COLUMNS = ["hour", "weekday", "device"]
MULTI_SLOTS = 3
ITEM_STATS = ["popularity", "exposures", "positive_rate"]


def multi_slot_columns(col: str) -> list[str]:
    return [f"{col}_{i}" for i in range(1, MULTI_SLOTS + 1)]


def split_multi(values: pd.Series, col: str) -> pd.DataFrame:
    """'A|B' -> columns col_1='A', col_2='B', col_3=None."""
    parts = values.astype("object").where(values.notna(), None)
    lists = parts.map(lambda v: [] if v is None else [p.strip() for p in str(v).split("|") if p.strip()])
    return pd.DataFrame({name: lists.map(lambda xs, i=i: xs[i] if i < len(xs) else None)
                         for i, name in enumerate(multi_slot_columns(col))}, index=values.index)


def usable_columns(frame: pd.DataFrame, kinds: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(kinds of the columns that become features, names of the columns left out because every value
    is null). Text and timestamp columns are never features themselves."""
    keep, dropped = {}, []
    for col, kind in kinds.items():
        if kind in ("text", "timestamp"):
            continue
        if col not in frame.columns or frame[col].isna().all():
            dropped.append(col)
            continue
        keep[col] = kind
    return keep, dropped


def query_spec(user_kinds: dict[str, str], n_categories: int, has_category: bool, has_price: bool) -> dict:
    """The query workflow's raw input columns by role (also what the user store holds)."""
    # attribute columns are prefixed in the query rows: a user attribute `device` is not the context `device`
    cat = [f"user_{c}" for c, k in user_kinds.items() if k in ("categorical", "multi")]
    num = [f"user_{c}" for c, k in user_kinds.items() if k == "numeric"]
    history_cat = (recent_category_columns(n_categories) + ["fav_category"]) if has_category else []
    history_num = ["activity", "positives"] + (["price_level"] if has_price else [])
    return {"user_cat": cat, "user_num": num, "history_cat": history_cat, "history_num": history_num,
            "context": list(CONTEXT_COLUMNS)}


def query_input_columns(spec: dict) -> list[str]:
    return ["user_id", *spec["user_cat"], *spec["user_num"], *spec["history_cat"], *spec["history_num"], *spec["context"]]


def query_workflow(spec: dict, cat_dir: str | Path):
    import nvtabular as nvt
    from merlin.schema import Tags
    from nvtabular import ops

    graph = ["user_id"] >> categorify(cat_dir) >> ops.TagAsUserID()
    if spec["user_cat"]:
        graph = graph + (spec["user_cat"] >> categorify(cat_dir) >> ops.AddTags([Tags.USER]))
    if spec["user_num"]:
        graph = graph + (spec["user_num"] >> ops.FillMedian() >> ops.Normalize() >> ops.AddTags([Tags.USER]))
    recent = [c for c in spec["history_cat"] if c.startswith("recent_category_")]
    if recent:
        # one joint vocabulary: a category has the same code in every slot (one embedding table)
        graph = graph + ([recent] >> categorify(cat_dir, encode_type="joint") >> ops.AddTags([Tags.USER]))
    if "fav_category" in spec["history_cat"]:
        graph = graph + (["fav_category"] >> categorify(cat_dir) >> ops.AddTags([Tags.USER]))
    counts = [c for c in spec["history_num"] if c in ("activity", "positives")]
    graph = graph + (counts >> ops.FillMissing(fill_val=0) >> ops.LogOp() >> ops.Normalize() >> ops.AddTags([Tags.USER]))
    if "price_level" in spec["history_num"]:
        graph = graph + (["price_level"] >> ops.FillMissing(fill_val=0) >> ops.Normalize() >> ops.AddTags([Tags.USER]))
    graph = graph + (spec["context"] >> categorify(cat_dir) >> ops.AddTags([Tags.CONTEXT]))
    return nvt.Workflow(graph)


def item_spec(item_kinds: dict[str, str], roles: dict, has_created: bool) -> dict:
    cat = [c for c, k in item_kinds.items() if k == "categorical"]
    multi = [c for c, k in item_kinds.items() if k == "multi"]
    num = [c for c, k in item_kinds.items() if k == "numeric" and c != roles.get("price")]
    price = [roles["price"]] if roles.get("price") in item_kinds else []
    stats = ITEM_STATS + (["item_age_days"] if has_created else [])
    return {"cat": cat, "multi": multi, "num": num, "price": price, "stats": stats}


def item_input_frame(items: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """The item workflow's input: ids, categorical, multi slots, numeric and statistics columns."""
    frame = items[["item_id", *spec["cat"], *spec["num"], *spec["price"], *spec["stats"]]].copy()
    for col in spec["cat"]:
        frame[col] = frame[col].astype("object").where(frame[col].notna(), None)
    for col in spec["multi"]:
        frame = pd.concat([frame, split_multi(items[col], col)], axis=1)
    return frame


def item_workflow(spec: dict, cat_dir: str | Path):
    import nvtabular as nvt
    from merlin.schema import Tags
    from nvtabular import ops

    graph = ["item_id"] >> categorify(cat_dir) >> ops.TagAsItemID()
    if spec["cat"]:
        graph = graph + (spec["cat"] >> categorify(cat_dir) >> ops.AddTags([Tags.ITEM]))
    for col in spec["multi"]:
        graph = graph + ([multi_slot_columns(col)] >> categorify(cat_dir, encode_type="joint") >> ops.AddTags([Tags.ITEM]))
    if spec["num"]:
        graph = graph + (spec["num"] >> ops.FillMedian() >> ops.Normalize() >> ops.AddTags([Tags.ITEM]))
    if spec["price"]:
        graph = graph + (spec["price"] >> ops.FillMedian() >> ops.Clip(min_value=0) >> ops.LogOp() >> ops.Normalize()
                         >> ops.AddTags([Tags.ITEM]))
    counts = [c for c in spec["stats"] if c != "positive_rate"]
    graph = graph + (counts >> ops.Clip(min_value=0) >> ops.LogOp() >> ops.Normalize() >> ops.AddTags([Tags.ITEM]))
    graph = graph + (["positive_rate"] >> ops.Normalize() >> ops.AddTags([Tags.ITEM]))
    return nvt.Workflow(graph)
