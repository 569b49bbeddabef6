"""The NVTabular workflows: one for the query side (user + context), one for the item catalog.

The query workflow is fit on training rows and is what the server executes per request (through
the plan exported by `feature_workflows.export_plan`); the item workflow is fit on the catalog
known at training time and is precomputed into the item feature table.
"""

from __future__ import annotations

from pathlib import Path

from shoprec.config import FeatureConfig

from .history import recent_category_columns, recent_item_columns
from .nvt_compat import categorify

USER_STRING_COLUMNS = ["gender", "region", "user_device", "fav_category"]
CONTEXT_COLUMNS = ["hour", "weekday", "device"]
TARGET_COLUMNS = ["click", "purchase"]
ITEM_CONTINUOUS = ["price", "popularity", "item_age_days"]


def query_input_columns(cfg: FeatureConfig) -> list[str]:
    """Raw columns a request row has (after the user store lookup)."""
    return ["user_id", "age", *USER_STRING_COLUMNS, *recent_item_columns(cfg.recent_items),
            *recent_category_columns(cfg.recent_categories), "activity", "price_level", *CONTEXT_COLUMNS]


def query_workflow(cfg: FeatureConfig, cat_dir: str | Path, with_targets: bool = True):
    import nvtabular as nvt
    from merlin.schema import Tags
    from nvtabular import ops

    user_id = ["user_id"] >> categorify(cat_dir) >> ops.TagAsUserID()
    age = (
        ["age"]
        >> ops.FillMissing(fill_val=35)
        >> ops.Bucketize({"age": list(cfg.age_buckets)})
        >> ops.AddTags([Tags.USER, Tags.CATEGORICAL])
    )
    user_cats = USER_STRING_COLUMNS >> categorify(cat_dir) >> ops.AddTags([Tags.USER])
    # recent items share one vocabulary (joint encoding): the same item has the same code in every slot
    recent = [recent_item_columns(cfg.recent_items)] >> categorify(cat_dir, encode_type="joint") >> ops.AddTags([Tags.USER])
    recent_cats = ([recent_category_columns(cfg.recent_categories)] >> categorify(cat_dir, encode_type="joint")
                   >> ops.AddTags([Tags.USER]))
    activity = ["activity"] >> ops.FillMissing(fill_val=0) >> ops.LogOp() >> ops.Normalize() >> ops.AddTags([Tags.USER])
    price_level = ["price_level"] >> ops.FillMissing(fill_val=0) >> ops.Normalize() >> ops.AddTags([Tags.USER])
    context = CONTEXT_COLUMNS >> categorify(cat_dir) >> ops.AddTags([Tags.CONTEXT])
    graph = user_id + age + user_cats + recent + recent_cats + activity + price_level + context
    if with_targets:
        graph = graph + (TARGET_COLUMNS >> ops.AddTags([Tags.TARGET, Tags.BINARY_CLASSIFICATION]))
    return nvt.Workflow(graph)


def item_workflow(cat_dir: str | Path):
    import nvtabular as nvt
    from merlin.schema import Tags
    from nvtabular import ops

    item_id = ["item_id"] >> categorify(cat_dir) >> ops.TagAsItemID()
    cats = ["category", "brand"] >> categorify(cat_dir) >> ops.AddTags([Tags.ITEM])
    price = ["price"] >> ops.FillMedian() >> ops.LogOp() >> ops.Normalize() >> ops.AddTags([Tags.ITEM])
    others = ["popularity", "item_age_days"] >> ops.Clip(min_value=0) >> ops.LogOp() >> ops.Normalize() >> ops.AddTags([Tags.ITEM])
    return nvt.Workflow(item_id + cats + price + others)
