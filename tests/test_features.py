"""NVTabular workflows, the CPU-bug workaround, and parity of the NumPy request-time path."""

import json

import numpy as np
import pandas as pd
import pytest

from feature_workflows import nvt_compat
from feature_workflows.export_plan import UnsupportedOp, build_plan
from feature_workflows.history import recent_category_columns
from feature_workflows.request_transform import TransformPlan
from feature_workflows.workflows import query_input_columns
from shoprec.manifest import verify_manifest


def _fit_small(tmp_path):
    import nvtabular as nvt

    df = pd.DataFrame({"c": ["x", "y", "x", None, "z", "x", "y", "w"]})
    wf = nvt.Workflow(["c"] >> nvt_compat.categorify(tmp_path / "cats"))
    wf.fit(nvt.Dataset(df))
    return wf


def test_shuffled_index_bug_is_worked_around(tmp_path):
    import nvtabular as nvt

    wf = _fit_small(tmp_path)
    frame = pd.DataFrame({"c": ["z", None, "x", "y", None, "q"]}, index=[5, 3, 0, 4, 1, 2])
    expected = nvt_compat.transform(wf, frame.reset_index(drop=True))["c"].tolist()
    assert expected[1] == 1 and expected[4] == 1 and expected[5] == 2  # null, null, out-of-vocabulary
    assert nvt_compat.transform(wf, frame)["c"].tolist() == expected
    # the raw NVTabular call on the same frame is what the workaround exists for: wrong codes or an error
    try:
        raw = wf.transform(nvt.Dataset(frame)).to_ddf().compute()["c"].tolist()
    except Exception:  # noqa: BLE001 - raising is one of the two observed failure modes
        raw = None
    assert raw != expected


def test_workflow_save_load_round_trip(artifacts):
    import nvtabular as nvt

    wf = nvt.Workflow.load(str(artifacts / "features" / "workflows" / "query"))
    train = pd.read_parquet(artifacts / "features" / "train.parquet")
    assert wf.output_schema["user_id"].int_domain.max + 1 >= train["user_id"].max()
    assert {"user_id", "recent_item_1", "hour", "click"} <= set(wf.output_schema.column_names)
    tags = {c.name: {t.value for t in c.tags} for c in wf.output_schema}
    assert {"id", "user"} <= tags["user_id"] and "context" in tags["hour"] and "target" in tags["click"]
    assert {"id", "item"} <= {t.value for t in nvt.Workflow.load(str(artifacts / "features" / "workflows" / "item")).output_schema["item_id"].tags}


def _raw_rows(artifacts, n=400, seed=0):
    """Raw query rows like the server builds them, with unknown ids, unseen strings and nulls mixed in."""
    from feature_workflows.synthetic import USER_ID_BASE

    rng = np.random.default_rng(seed)
    store = np.load(artifacts / "features" / "serving" / "user_store.npz", allow_pickle=False)
    pick = rng.integers(0, len(store["user_id"]), n)
    rows = {"user_id": store["user_id"][pick].astype(np.int64)}
    for col in store.files:
        if col.endswith("__null") or col == "user_id":
            continue
        v, null = store[col][pick], store[f"{col}__null"][pick]
        rows[col] = np.where(null, np.nan, v) if v.dtype.kind == "f" else np.where(null, None, v.astype(object))
    rows["user_id"][:20] = USER_ID_BASE + 10**6 + np.arange(20)  # unknown users
    rows["gender"][20:30] = "X"  # unseen value
    rows["region"][30:40] = None  # null
    rows["age"] = rows["age"].astype(float)
    rows["age"][40:50] = np.nan
    rows["recent_item_1"][50:60] = 123.0  # unknown item id
    rows["activity"][60:70] = np.nan
    rows["hour"] = rng.integers(0, 24, n)
    rows["weekday"] = rng.integers(0, 7, n)
    rows["device"] = rng.choice(np.array(["mobile", "desktop", "tablet", "fridge", None], dtype=object), n)
    return rows


def test_request_transform_equals_workflow_transform(artifacts, cfg):
    import nvtabular as nvt

    feat = artifacts / "features"
    verify_manifest(feat)
    wf = nvt.Workflow.load(str(feat / "workflows" / "query"))
    plan = TransformPlan.load(feat / "serving" / "query_plan.json", feat / "serving" / "query_vocab.npz")
    rows = _raw_rows(artifacts)
    frame = pd.DataFrame({c: rows[c] for c in query_input_columns(cfg.features)})
    for c in ("gender", "region", "user_device", "fav_category", *recent_category_columns(cfg.features.recent_categories), "device"):
        frame[c] = frame[c].astype(object)
    frame["click"] = 0
    frame["purchase"] = 0
    want = nvt_compat.transform(wf, frame)
    got = plan.transform(rows)
    assert set(plan.cat_names) | set(plan.cont_names) == set(want.columns) - {"click", "purchase"}
    for name in plan.cat_names:
        np.testing.assert_array_equal(got[name], want[name].values.astype(np.int64), err_msg=name)
    for name in plan.cont_names:
        np.testing.assert_allclose(got[name], want[name].values.astype(np.float32), rtol=1e-6, atol=1e-6, err_msg=name)
    assert (got["user_id"][:20] == 2).all()  # unknown users -> OOV, never a crash
    assert (got["region"][30:40] == 1).all()  # null -> null code


def test_plan_is_json_and_npz_without_pickles(artifacts):
    serving = artifacts / "features" / "serving"
    plan = json.loads((serving / "query_plan.json").read_text())
    assert plan["format"] == "shoprec-transform-plan/1"
    for name in ("query_vocab.npz", "user_store.npz", "item_table.npz"):
        with np.load(serving / name, allow_pickle=False) as z:
            for key in z.files:
                assert z[key].dtype != object, f"{name}:{key}"


def test_unsupported_op_is_refused_at_export(tmp_path):
    import nvtabular as nvt
    from nvtabular import ops

    wf = nvt.Workflow(["a"] >> ops.LambdaOp(lambda col: col * 2))
    wf.fit(nvt.Dataset(pd.DataFrame({"a": [1.0, 2.0]})))
    with pytest.raises(UnsupportedOp, match="on column 'a' has no NumPy execution"):
        build_plan(wf)


def test_split_is_by_time_and_stats_from_train(artifacts):
    feat = artifacts / "features"
    schema = json.loads((feat / "schema.json").read_text())
    train, test = pd.read_parquet(feat / "train.parquet"), pd.read_parquet(feat / "test.parquet")
    assert train.ts.max() < schema["t_valid"] <= schema["t_test"] <= test.ts.min()
