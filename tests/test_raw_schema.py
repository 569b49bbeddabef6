import pandas as pd
import pytest

from feature_workflows.raw_schema import RawDataError, read_table


def _write(tmp_path, users: pd.DataFrame):
    (tmp_path / "interactions").mkdir(exist_ok=True)
    users.to_parquet(tmp_path / "users.parquet", index=False)


def test_missing_column_names_file_and_column(tmp_path):
    _write(tmp_path, pd.DataFrame({"user_id": [1], "age": [30], "gender": ["F"], "region": ["r"]}))
    with pytest.raises(RawDataError, match=r"users.parquet: users table is missing column\(s\) \['device'\]"):
        read_table(tmp_path, "users")


def test_wrong_type_names_column(tmp_path):
    _write(tmp_path, pd.DataFrame({"user_id": ["a"], "age": [30], "gender": ["F"], "region": ["r"], "device": ["m"]}))
    with pytest.raises(RawDataError, match=r"column 'user_id' of users should be int"):
        read_table(tmp_path, "users")


def test_empty_table(tmp_path):
    _write(tmp_path, pd.DataFrame({c: pd.Series([], dtype=t) for c, t in
                                   [("user_id", "int64"), ("age", "int64"), ("gender", "object"), ("region", "object"), ("device", "object")]}))
    with pytest.raises(RawDataError, match="users table is empty"):
        read_table(tmp_path, "users")


def test_not_parquet_and_missing(tmp_path):
    with pytest.raises(RawDataError, match="not found; run `shoprec data` first"):
        read_table(tmp_path, "items")
    (tmp_path / "items.parquet").write_text("garbage")
    with pytest.raises(RawDataError, match="items.parquet: cannot read as parquet"):
        read_table(tmp_path, "items")
