import numpy as np
import pandas as pd
import pytest

from feature_workflows.raw_schema import read_table, summarize
from feature_workflows.synthetic import SIZES, generate


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    generate(out, "tiny", seed=3, progress=False)
    return out


def test_deterministic_by_seed(raw, tmp_path):
    generate(tmp_path / "same", "tiny", seed=3, progress=False)
    generate(tmp_path / "other", "tiny", seed=4, progress=False)
    a = read_table(raw, "interactions")
    pd.testing.assert_frame_equal(a, read_table(tmp_path / "same", "interactions"))
    assert not a.equals(read_table(tmp_path / "other", "interactions"))


def test_schema_and_event_funnel(raw):
    s = summarize(raw)
    assert s["users"] == SIZES["tiny"].users and s["items"] == SIZES["tiny"].items
    assert s["events_impression"] > s["events_click"] > s["events_cart"] >= s["events_purchase"] > 0
    inter = read_table(raw, "interactions")
    keys = ["user_id", "item_id", "session_id"]
    clicks = inter[inter.event == "click"][keys].drop_duplicates()
    purchases = inter[inter.event == "purchase"][keys].drop_duplicates()
    # every purchase follows a click of the same item in the same session
    assert len(purchases.merge(clicks, on=keys)) == len(purchases)


def test_popularity_is_long_tailed(raw):
    imp = read_table(raw, "interactions").query("event == 'impression'")
    counts = np.sort(imp.item_id.value_counts().values)[::-1]
    top10 = counts[: max(1, len(counts) // 10)].sum() / counts.sum()
    assert top10 > 0.3, f"top 10% of items get only {top10:.2f} of impressions"


def test_history_predicts_future_purchases_far_above_chance(raw):
    inter = read_table(raw, "interactions")
    items = read_table(raw, "items")
    ev = inter.merge(items[["item_id", "category"]], on="item_id")
    cut = np.quantile(ev.ts, 0.8)
    past = ev[(ev.ts < cut) & (ev.event == "click")]
    future = ev[(ev.ts >= cut) & (ev.event == "purchase")]
    top_cat = past.groupby("user_id").category.agg(lambda s: s.value_counts().index[0])
    hit = (future.user_id.map(top_cat) == future.category).mean()
    chance = 1.0 / items.category.nunique()
    assert hit > 3 * chance, f"top past category matches {hit:.3f} of future purchases, chance {chance:.3f}"


def test_ground_truth_written(raw):
    truth = pd.read_parquet(raw / "ground_truth.parquet")
    assert len(truth) == SIZES["tiny"].users
    assert truth.shifted.any() and (~truth.shifted).any()


def test_unknown_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        generate(tmp_path, "huge")
