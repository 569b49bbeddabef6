"""Loaders for MovieLens files a user has downloaded (100K and 1M layouts).

MovieLens may not be redistributed, so nothing here ships its data; the tests use small fixture
files written in the same layouts. Mapping onto the raw schema (feature_workflows.raw_schema):

- every rating is an `impression` (the user saw and rated the movie);
- rating >= 4 is also a `click` (the positive for retrieval and ranking);
- rating == 5 is also a `purchase` (the strong positive, for the CVR head);
- first listed genre -> category; release decade -> brand; release date -> created_ts;
- price is unknown (NaN: the workflow fills and normalises it);
- first digit of the zip code -> region; device is "unknown"; a session is a user-day.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from .raw_schema import RawDataError, validate_frame

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
ML1M_AGE = {1: 16, 18: 21, 25: 30, 35: 40, 45: 47, 50: 52, 56: 60}  # ML-1M age codes -> representative age


def _need(folder: Path, names: list[str]) -> list[Path]:
    paths = [folder / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RawDataError(f"MovieLens files not found: {missing}")
    for p in paths:
        if p.stat().st_size == 0:
            raise RawDataError(f"{p}: file is empty")
    return paths


def _read(path: Path, sep: str, names: list[str], ints: list[str]) -> pd.DataFrame:
    df = pd.read_csv(path, sep=sep, names=names, header=None, engine="python", encoding="latin-1", dtype=str)
    if df.shape[1] != len(names) or df[names[-1]].isna().all():
        raise RawDataError(f"{path}: expected {len(names)} {sep!r}-separated columns {names}")
    for col in ints:
        values = pd.to_numeric(df[col], errors="coerce")
        if values.isna().any():
            row = int(values.isna().idxmax())
            raise RawDataError(f"{path}: column {col!r} has a non-integer value {df[col].iloc[row]!r} at line {row + 1}")
        df[col] = values.astype(np.int64)
    return df


def _interactions(ratings: pd.DataFrame) -> pd.DataFrame:
    base = pd.DataFrame(
        {
            "user_id": ratings["user_id"].astype(np.int64),
            "item_id": ratings["item_id"].astype(np.int64),
            "ts": ratings["ts"].astype(np.int64),
            "session_id": ratings["user_id"].astype(np.int64) * 100_000 + ratings["ts"].astype(np.int64) // 86_400,
            "device": "unknown",
        }
    )
    parts = [base.assign(event="impression")]
    parts.append(base[ratings["rating"].values >= 4].assign(event="click"))
    parts.append(base[ratings["rating"].values == 5].assign(event="purchase"))
    out = pd.concat(parts, ignore_index=True).sort_values(["ts", "user_id"], kind="stable")
    return out[["user_id", "item_id", "ts", "session_id", "event", "device"]].reset_index(drop=True)


def _decade(year: pd.Series) -> pd.Series:
    return year.map(lambda y: f"{int(y) // 10 * 10}s" if pd.notna(y) else "unknown")


def _region(zips: pd.Series) -> pd.Series:
    return zips.fillna("").astype(str).str[:1].map(lambda d: f"zip_{d}" if d.isdigit() else "zip_other")


def load_ml100k(folder: str | Path) -> dict[str, pd.DataFrame]:
    folder = Path(folder)
    p_data, p_item, p_user = _need(folder, ["u.data", "u.item", "u.user"])
    ratings = _read(p_data, "\t", ["user_id", "item_id", "rating", "ts"], ["user_id", "item_id", "rating", "ts"])
    items = _read(p_item, r"\|", ["item_id", "title", "release", "video", "url", *ML100K_GENRES], ["item_id"])
    users = _read(p_user, r"\|", ["user_id", "age", "gender", "occupation", "zip"], ["user_id", "age"])
    flags = items[ML100K_GENRES].apply(pd.to_numeric, errors="coerce").fillna(0).values.astype(bool)
    first = np.where(flags.any(1), flags.argmax(1), 0)
    released = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce")
    items_out = pd.DataFrame(
        {
            "item_id": items["item_id"],
            "category": np.array(ML100K_GENRES)[first],
            "brand": _decade(released.dt.year),
            "price": np.nan,
            "created_ts": (released.astype("int64") // 10**9).where(released.notna(), 0).astype(np.int64),
        }
    )
    users_out = pd.DataFrame(
        {"user_id": users["user_id"], "age": users["age"], "gender": users["gender"], "region": _region(users["zip"]),
         "device": "unknown"}
    )
    return _checked(users_out, items_out, _interactions(ratings), str(folder))


def load_ml1m(folder: str | Path) -> dict[str, pd.DataFrame]:
    folder = Path(folder)
    p_ratings, p_movies, p_users = _need(folder, ["ratings.dat", "movies.dat", "users.dat"])
    ratings = _read(p_ratings, "::", ["user_id", "item_id", "rating", "ts"], ["user_id", "item_id", "rating", "ts"])
    movies = _read(p_movies, "::", ["item_id", "title", "genres"], ["item_id"])
    users = _read(p_users, "::", ["user_id", "gender", "age", "occupation", "zip"], ["user_id", "age"])
    year = movies["title"].map(lambda t: (m := re.search(r"\((\d{4})\)\s*$", str(t))) and int(m.group(1)))
    year = pd.to_numeric(year, errors="coerce")
    created = pd.to_datetime(year.astype("Int64").astype(str) + "-01-01", errors="coerce")
    items_out = pd.DataFrame(
        {
            "item_id": movies["item_id"],
            "category": movies["genres"].fillna("unknown").str.split("|").str[0],
            "brand": _decade(year),
            "price": np.nan,
            "created_ts": (created.astype("int64") // 10**9).where(created.notna(), 0).astype(np.int64),
        }
    )
    users_out = pd.DataFrame(
        {
            "user_id": users["user_id"],
            "age": users["age"].map(lambda a: ML1M_AGE.get(int(a), int(a))).astype(np.int64),
            "gender": users["gender"],
            "region": _region(users["zip"]),
            "device": "unknown",
        }
    )
    return _checked(users_out, items_out, _interactions(ratings), str(folder))


def _checked(users, items, interactions, source) -> dict[str, pd.DataFrame]:
    return {
        "users": validate_frame(users, "users", f"{source} (users)"),
        "items": validate_frame(items, "items", f"{source} (items)"),
        "interactions": validate_frame(interactions, "interactions", f"{source} (ratings)"),
    }


def write_raw(tables: dict[str, pd.DataFrame], out_dir: str | Path) -> dict:
    out = Path(out_dir)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    for old in (out / "interactions").glob("part-*.parquet"):
        old.unlink()
    tables["users"].to_parquet(out / "users.parquet", index=False)
    tables["items"].to_parquet(out / "items.parquet", index=False)
    tables["interactions"].to_parquet(out / "interactions" / "part-00000.parquet", index=False)
    return {k: len(v) for k, v in tables.items()}


def load_movielens(folder: str | Path, flavour: str) -> dict[str, pd.DataFrame]:
    if flavour == "movielens-100k":
        return load_ml100k(folder)
    if flavour == "movielens-1m":
        return load_ml1m(folder)
    raise ValueError(f"unknown MovieLens flavour {flavour!r}")
