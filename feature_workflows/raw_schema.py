"""The raw schema every data source is mapped onto, and the checks applied when reading it.

Three tables: users, items, interactions. A source (synthetic generator, MovieLens loaders, a
user's own export) writes parquet with exactly these columns; `read_table` refuses anything
else with an error naming the file and the column.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

EVENTS = ("impression", "click", "cart", "purchase")  # ordered: a later event implies the earlier ones

RAW_SCHEMA: dict[str, dict[str, str]] = {
    "users": {"user_id": "int", "age": "int", "gender": "str", "region": "str", "device": "str"},
    "items": {"item_id": "int", "category": "str", "brand": "str", "price": "float", "created_ts": "int"},
    "interactions": {
        "user_id": "int",
        "item_id": "int",
        "ts": "int",
        "session_id": "int",
        "event": "str",
        "device": "str",
    },
}


class RawDataError(ValueError):
    """A raw input file is missing, empty, or has missing/mistyped columns."""


def _kind_ok(series: pd.Series, kind: str) -> bool:
    if kind == "int":
        return pd.api.types.is_integer_dtype(series)
    if kind == "float":
        return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    return pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series)


def validate_frame(df: pd.DataFrame, table: str, source: str) -> pd.DataFrame:
    """Check one raw table; return it with only the schema's columns, in schema order."""
    schema = RAW_SCHEMA[table]
    if len(df) == 0:
        raise RawDataError(f"{source}: {table} table is empty")
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise RawDataError(f"{source}: {table} table is missing column(s) {missing}; has {list(df.columns)}")
    for col, kind in schema.items():
        if not _kind_ok(df[col], kind):
            raise RawDataError(f"{source}: column {col!r} of {table} should be {kind}, found dtype {df[col].dtype}")
    for col in ("user_id", "item_id"):
        if col in schema and df[col].isna().any():
            raise RawDataError(f"{source}: column {col!r} of {table} has null ids")
    if table == "interactions":
        bad = ~df["event"].isin(EVENTS)
        if bad.any():
            raise RawDataError(
                f"{source}: column 'event' of interactions has unknown value(s) "
                f"{sorted(df.loc[bad, 'event'].astype(str).unique()[:5])}; allowed {list(EVENTS)}"
            )
    return df[list(schema)].reset_index(drop=True)


def raw_paths(raw_dir: str | Path) -> dict[str, Path]:
    raw_dir = Path(raw_dir)
    return {"users": raw_dir / "users.parquet", "items": raw_dir / "items.parquet", "interactions": raw_dir / "interactions"}


def read_table(raw_dir: str | Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read and validate one raw table (interactions is a folder of parquet parts)."""
    path = raw_paths(raw_dir)[table]
    if not path.exists():
        raise RawDataError(f"{path}: not found; run `shoprec data` first")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt/empty files
        raise RawDataError(f"{path}: cannot read as parquet ({exc})") from exc
    df = validate_frame(df, table, str(path))
    return df[columns] if columns else df


def summarize(raw_dir: str | Path) -> dict:
    users = read_table(raw_dir, "users", ["user_id"])
    items = read_table(raw_dir, "items", ["item_id"])
    inter = read_table(raw_dir, "interactions", ["event"])
    counts = inter["event"].value_counts().reindex(list(EVENTS), fill_value=0)
    return {
        "users": int(len(users)),
        "items": int(len(items)),
        "interactions": int(len(inter)),
        **{f"events_{k}": int(v) for k, v in counts.items()},
    }
