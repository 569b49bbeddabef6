"""The raw format's checks: one-line errors naming the file, the row and the column."""

import json

import pandas as pd
import pytest

from feature_workflows.raw_schema import (RawDataError, make_schema, read_schema, read_table, validate_attributes,
                                          validate_interactions, write_raw)


def _inter(**over):
    frame = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 11], "ts": [100, 200], "session_id": [1, 2],
                          "event": ["click", "view"], "device": ["unknown", "mobile"]})
    for k, v in over.items():
        frame[k] = v
    return frame


def test_unknown_event_names_the_row():
    with pytest.raises(RawDataError, match=r"src: row 2: column 'event' has unknown value 'like'; allowed"):
        validate_interactions(_inter(event=["click", "like"]), "src")


def test_missing_and_mistyped_columns():
    with pytest.raises(RawDataError, match=r"src: interactions table is missing column\(s\) \['device'\]"):
        validate_interactions(_inter().drop(columns="device"), "src")
    with pytest.raises(RawDataError, match=r"column 'ts' of interactions should be int, found dtype object"):
        validate_interactions(_inter(ts=["a", "b"]), "src")


def test_impressions_alone_are_nothing_to_learn_from():
    with pytest.raises(RawDataError, match="no user interaction"):
        validate_interactions(_inter(event=["impression", "impression"]), "src")


def test_attribute_tables():
    kinds = {"genre": "categorical", "price": "numeric"}
    items = pd.DataFrame({"item_id": [10, 10], "genre": ["a", "b"], "price": [1.0, 2.0]})
    with pytest.raises(RawDataError, match="items lists item_id 10 more than once"):
        validate_attributes(items, "items", kinds, "src")
    items = pd.DataFrame({"item_id": [10, 11], "genre": ["a", "b"], "price": ["x", "y"]})
    with pytest.raises(RawDataError, match="column 'price' of items should be numeric"):
        validate_attributes(items, "items", kinds, "src")
    # a column without any value is allowed here (the features stage leaves it out)
    items = pd.DataFrame({"item_id": [10, 11], "genre": ["a", "b"], "price": [float("nan")] * 2})
    assert list(validate_attributes(items, "items", kinds, "src").columns) == ["item_id", "genre", "price"]


def test_schema_kinds_and_roles():
    with pytest.raises(RawDataError, match="unknown column kind"):
        make_schema({"genre": "colour"}, {}, "src")
    with pytest.raises(RawDataError, match="role 'price' names column 'cost', which is not an item column"):
        make_schema({"genre": "categorical"}, {}, "src", roles={"price": "cost"})
    s = make_schema({"genres": "multi", "price": "numeric"}, {}, "src")
    assert s["roles"] == {"category": "genres", "price": "price", "created": None}


def test_round_trip_and_missing_files(tmp_path):
    with pytest.raises(RawDataError, match="schema.json: not found; run `shoprec data` first"):
        read_schema(tmp_path)
    schema = make_schema({"genre": "categorical"}, {}, "src")
    tables = {"interactions": _inter(), "items": pd.DataFrame({"item_id": [10, 11], "genre": ["a", None]}),
              "users": pd.DataFrame({"user_id": [1, 2]})}
    write_raw(tables, schema, tmp_path)
    assert read_table(tmp_path, "items")["genre"].tolist() == ["a", None]
    assert len(read_table(tmp_path, "interactions")) == 2
    (tmp_path / "items.parquet").write_text("garbage")
    with pytest.raises(RawDataError, match="items.parquet: cannot read as parquet"):
        read_table(tmp_path, "items")
    (tmp_path / "schema.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RawDataError, match="format 'other'"):
        read_schema(tmp_path)
