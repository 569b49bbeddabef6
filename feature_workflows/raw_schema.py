"""The raw format every data source is written in, and the checks applied when it is read back.

`shoprec data` writes ARTIFACTS/data/raw/:
  interactions/part-*.parquet  user_id int64, item_id int64, ts int64 (unix seconds),
                               session_id int64, event str, device str
  items.parquet                item_id int64 + attribute columns
  users.parquet                user_id int64 + attribute columns (may be user_id alone)
  schema.json                  the kind of every attribute column and the item roles

Events, weakest first (EVENTS). `impression` means "shown to the user" and is not something
the user did; every other event is an interaction (the user viewed, clicked, carted or bought the
item, or rated it), and interactions are what the seen-item filter removes. `click` and stronger
are positives: the targets of retrieval and ranking. Rating data maps onto these events in
`feature_workflows.sources` (below the positive threshold -> view, at or above it -> click, at or
above the strong threshold -> purchase).

Attribute kinds (schema.json): categorical, numeric, multi (several values in one string, split on
`|`, e.g. genres), text (kept for display, not a model feature) and timestamp (unix seconds).
Roles: `category` names the attribute that is an item's category (history, diversity, repeat-purchase
rules; the first value of a multi column), `price` a numeric price column, `created` a timestamp
column of when the item appeared. A role may be null: the features that need it are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from shoprec.errors import UserError

EVENTS = ("impression", "view", "click", "cart", "purchase")  # weakest first
INTERACTION_EVENTS = EVENTS[1:]  # what the user did (the seen-item filter), not what was shown
POSITIVE_EVENTS = ("click", "cart", "purchase")
KINDS = ("categorical", "numeric", "multi", "text", "timestamp")
MULTI_SEPARATOR = "|"
RAW_FORMAT = "shoprec-raw/1"

INTERACTION_COLUMNS = {"user_id": "int", "item_id": "int", "ts": "int", "session_id": "int", "event": "str",
                       "device": "str"}
ID_COLUMN = {"users": "user_id", "items": "item_id"}


class RawDataError(UserError, ValueError):
    """A raw input is missing, empty, or has a missing, mistyped or invalid column (one-line message)."""


def _kind_ok(series: pd.Series, kind: str) -> bool:
    if kind == "int":
        return pd.api.types.is_integer_dtype(series)
    if kind in ("float", "numeric"):
        return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if kind == "timestamp":
        return pd.api.types.is_integer_dtype(series)
    return pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series)


def default_roles(kinds: dict[str, str]) -> dict[str, str | None]:
    """The item roles a schema gets when the source does not name them."""
    category = "category" if kinds.get("category") in ("categorical", "multi") else next(
        (c for c, k in kinds.items() if k in ("categorical", "multi")), None)
    price = "price" if kinds.get("price") == "numeric" else None
    created = "created_ts" if kinds.get("created_ts") == "timestamp" else None
    return {"category": category, "price": price, "created": created}


def make_schema(item_kinds: dict[str, str], user_kinds: dict[str, str], source: str,
                roles: dict[str, str | None] | None = None, **extra) -> dict:
    for table, kinds in (("items", item_kinds), ("users", user_kinds)):
        bad = {c: k for c, k in kinds.items() if k not in KINDS}
        if bad:
            raise RawDataError(f"{table}: unknown column kind(s) {bad}; allowed {list(KINDS)}")
    roles = {**default_roles(item_kinds), **(roles or {})}
    for role, col in roles.items():
        if col is not None and col not in item_kinds:
            raise RawDataError(f"items: role {role!r} names column {col!r}, which is not an item column")
    return {"format": RAW_FORMAT, "source": source, "items": dict(item_kinds), "users": dict(user_kinds),
            "roles": roles, **extra}


def validate_interactions(df: pd.DataFrame, source: str) -> pd.DataFrame:
    if len(df) == 0:
        raise RawDataError(f"{source}: interactions table is empty")
    missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
    if missing:
        raise RawDataError(f"{source}: interactions table is missing column(s) {missing}; has {list(df.columns)}")
    for col, kind in INTERACTION_COLUMNS.items():
        if not _kind_ok(df[col], kind):
            raise RawDataError(f"{source}: column {col!r} of interactions should be {kind}, found dtype {df[col].dtype}")
    bad = ~df["event"].isin(EVENTS)
    if bad.any():
        row = int(np.flatnonzero(bad.values)[0])
        raise RawDataError(f"{source}: row {row + 1}: column 'event' has unknown value {df['event'].iloc[row]!r}; "
                           f"allowed {list(EVENTS)}")
    if not df["event"].isin(INTERACTION_EVENTS).any():
        raise RawDataError(f"{source}: interactions hold no user interaction ({list(INTERACTION_EVENTS)}); nothing to learn from")
    return df[list(INTERACTION_COLUMNS)].reset_index(drop=True)


def validate_attributes(df: pd.DataFrame, table: str, kinds: dict[str, str], source: str) -> pd.DataFrame:
    id_col = ID_COLUMN[table]
    if len(df) == 0:
        raise RawDataError(f"{source}: {table} table is empty")
    missing = [c for c in (id_col, *kinds) if c not in df.columns]
    if missing:
        raise RawDataError(f"{source}: {table} table is missing column(s) {missing}; has {list(df.columns)}")
    if not _kind_ok(df[id_col], "int"):
        raise RawDataError(f"{source}: column {id_col!r} of {table} should be int, found dtype {df[id_col].dtype}")
    dup = df[id_col].duplicated()
    if dup.any():
        raise RawDataError(f"{source}: {table} lists {id_col} {int(df[id_col][dup].iloc[0])} more than once")
    for col, kind in kinds.items():
        if df[col].isna().all():
            continue  # an all-null column is allowed here; the features stage leaves it out
        if not _kind_ok(df[col], "str" if kind in ("categorical", "multi", "text") else kind):
            raise RawDataError(f"{source}: column {col!r} of {table} should be {kind}, found dtype {df[col].dtype}")
    return df[[id_col, *kinds]].reset_index(drop=True)


def raw_paths(raw_dir: str | Path) -> dict[str, Path]:
    raw_dir = Path(raw_dir)
    return {"users": raw_dir / "users.parquet", "items": raw_dir / "items.parquet",
            "interactions": raw_dir / "interactions", "schema": raw_dir / "schema.json"}


def clear_raw(raw_dir: str | Path) -> None:
    """Remove what an earlier `shoprec data` wrote, before reading new input: a run that stops on bad input must
    not leave the previous data set for `features` to read as if it were the new one."""
    paths = raw_paths(raw_dir)
    paths["schema"].unlink(missing_ok=True)  # first: without it nothing reads the rest
    for path in (paths["users"], paths["items"], *paths["interactions"].glob("part-*.parquet")):
        path.unlink(missing_ok=True)


def write_raw(tables: dict[str, pd.DataFrame], schema: dict, out_dir: str | Path) -> dict:
    """Write validated tables and schema.json; replaces whatever an earlier `shoprec data` left."""
    out = Path(out_dir)
    paths = raw_paths(out)
    paths["interactions"].mkdir(parents=True, exist_ok=True)
    for old in paths["interactions"].glob("part-*.parquet"):
        old.unlink()
    tables["users"].to_parquet(paths["users"], index=False)
    tables["items"].to_parquet(paths["items"], index=False)
    tables["interactions"].to_parquet(paths["interactions"] / "part-00000.parquet", index=False)
    paths["schema"].write_text(json.dumps(schema, indent=1) + "\n")
    return {k: int(len(v)) for k, v in tables.items()}


def read_schema(raw_dir: str | Path) -> dict:
    path = raw_paths(raw_dir)["schema"]
    if not path.is_file():
        raise RawDataError(f"{path}: not found; run `shoprec data` first")
    schema = json.loads(path.read_text())
    if schema.get("format") != RAW_FORMAT:
        raise RawDataError(f"{path}: format {schema.get('format')!r}, expected {RAW_FORMAT!r}; re-run `shoprec data`")
    return schema


def read_table(raw_dir: str | Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read and validate one raw table (interactions is a folder of parquet parts)."""
    path = raw_paths(raw_dir)[table]
    if not path.exists():
        raise RawDataError(f"{path}: not found; run `shoprec data` first")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt/empty files
        raise RawDataError(f"{path}: cannot read as parquet ({type(exc).__name__})") from exc
    if table == "interactions":
        df = validate_interactions(df, str(path))
    else:
        df = validate_attributes(df, table, read_schema(raw_dir)[table], str(path))
    return df[columns] if columns else df


def summarize(raw_dir: str | Path) -> dict:
    users = read_table(raw_dir, "users", ["user_id"])
    items = read_table(raw_dir, "items", ["item_id"])
    inter = read_table(raw_dir, "interactions", ["event"])
    counts = inter["event"].value_counts().reindex(list(EVENTS), fill_value=0)
    return {"users": int(len(users)), "items": int(len(items)), "interactions": int(len(inter)),
            **{f"events_{k}": int(v) for k, v in counts.items()}}
