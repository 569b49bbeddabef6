"""Loaders for MovieLens files a user has downloaded: the 100K, 1M and latest-small layouts.

MovieLens may not be redistributed, so nothing here ships its data; the tests write small fixture
files in the same layouts. Each loader only reads its files into frames with the canonical column
names of `feature_workflows.sources` and hands them to `sources.build_tables`, so validation,
the rating -> event mapping and the duplicates policy are the ones of "your own data":

- every rating is a `view`; rating >= 4 is also a `click`; rating 5 is also a `purchase`
  (range 0.5..5, half stars kept: latest-small has them);
- each (user, timestamp) pair is a session; device is "unknown";
- items: `title` (text), `genres` (multi, "Action|Comedy"; the item's category role; null when
  none is listed: 100K's "unknown" flag and latest's "(no genres listed)" mean none), `year`
  (numeric, from the title's "(1995)", else 100K's release date; null if neither);
- users (100K, 1M): `age` (numeric; 1M age codes become a representative age), `gender` and
  `occupation` (categorical; 1M occupations stay codes as strings), `region` (categorical,
  "zip_" + the zip code's first digit, or "zip_other"). latest-small has no user file: users are
  the distinct user ids, without attributes.

Layouts (headerless files are latin-1 and named by line in errors; CSVs by data row):
  movielens-100k          u.data  user \\t item \\t rating \\t timestamp
                          u.item  id|title|release date|video release date|url|19 genre flags
                          u.user  id|age|gender|occupation|zip
  movielens-1m            ratings.dat UserID::MovieID::Rating::Timestamp
                          movies.dat  MovieID::Title::Genres
                          users.dat   UserID::Gender::Age::Occupation::Zip-code
  movielens-latest-small  ratings.csv userId,movieId,rating,timestamp
                          movies.csv  movieId,title,genres (titles quoted where they hold commas)
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .raw_schema import RawDataError
from .sources import Frame, SourceSpec, build_tables, parse_ints, read_frame

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
NO_GENRE = {"unknown", "(no genres listed)"}  # what MovieLens writes when it knows no genre
ML1M_AGE = {1: 16, 18: 21, 25: 30, 35: 40, 45: 47, 50: 52, 56: 60}  # ML-1M age codes -> representative age
FILES = {
    "movielens-100k": ("u.data", "u.item", "u.user"),
    "movielens-1m": ("ratings.dat", "movies.dat", "users.dat"),
    "movielens-latest-small": ("ratings.csv", "movies.csv"),
}
# a ratings file under another name: ML-1M split by user ranges (e.g. ratings_users1-2999.dat), when it is the only one
RENAMED = {"ratings.dat": "ratings*.dat"}
RATINGS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_KINDS = {"title": "text", "genres": "multi", "year": "numeric"}
USER_KINDS = {"age": "numeric", "gender": "categorical", "occupation": "categorical", "region": "categorical"}
YEAR_IN_TITLE = r"\((\d{4})(?:[-–]\d{4})?\)\s*$"  # "Toy Story (1995)", latest's series "(2006–2007)"


def _need(folder: Path, flavour: str) -> list[Path]:
    """The flavour's files in `folder`; every missing one is listed in a single error (with a hint
    when they sit one folder down, as after unzipping into a parent folder)."""
    if not folder.is_dir():
        raise RawDataError(f"{folder}: not found (expected a folder holding the MovieLens {flavour} files)")
    names = FILES[flavour]
    found = {n: folder / n for n in names if (folder / n).is_file()}
    for name in set(names) - set(found):
        others = sorted(p for p in folder.glob(RENAMED.get(name, name)) if p.is_file())
        if len(others) > 1:
            raise RawDataError(f"{folder}: no {name} and several files that could be it: {[p.name for p in others]}; "
                               f"keep one, or name it {name}")
        if others:
            found[name] = others[0]
    missing = [n for n in names if n not in found]
    if missing:
        below = [d for d in sorted(folder.iterdir()) if d.is_dir() and all((d / n).is_file() for n in names)]
        hint = f"; they are in {below[0]}: pass that folder" if below else ""
        raise RawDataError(f"{folder}: MovieLens {flavour} file(s) not found: {missing}; expected {list(names)}{hint}")
    return [found[n] for n in names]


def _read_lines(path: Path, sep: str, names: list[str], text: tuple[str, ...] = ()) -> Frame:
    """A headerless `sep`-separated latin-1 file as columns `names` (those in `text` kept as
    strings, e.g. zip codes with a leading 0; the rest as the C parser infers). Every line must
    have len(names) fields: the first that does not is an error naming it. Trailing blank lines are
    ignored; a blank line elsewhere is malformed. Quotes are ordinary characters (titles hold them)."""
    content = re.sub(r"(?:\n[ \r]*)+\Z", "", "\n" + path.read_bytes().decode("latin-1").replace("\r\n", "\n"))[1:]
    if not content.strip():
        raise RawDataError(f"{path}: file is empty")
    if sep != "\t":
        content = content.replace(sep, "\t")  # one-character separator: the fast C parser
    fields = _fields_per_line(content)
    bad = fields != len(names)
    if bad.any():
        line = int(np.flatnonzero(bad)[0])
        raise RawDataError(f"{path}: line {line + 1}: expected {len(names)} {sep!r}-separated fields "
                           f"({', '.join(names)}), found {fields[line]}")
    df = pd.read_csv(io.StringIO(content), sep="\t", header=None, names=names, quoting=csv.QUOTE_NONE,
                     dtype={n: str for n in text}, keep_default_na=False, na_values=[""])
    return Frame(df, str(path), unit="line")


def _fields_per_line(content: str) -> np.ndarray:
    """Tab-separated fields on each line, counted on the bytes (no per-line Python)."""
    data = np.frombuffer((content + "\n").encode("latin-1"), dtype=np.uint8)
    tabs = np.concatenate([[0], np.cumsum(data == ord("\t"))])
    ends = np.flatnonzero(data == ord("\n"))
    return np.diff(np.concatenate([[0], tabs[ends]])) + 1


def _with(frame: Frame, df: pd.DataFrame) -> Frame:
    """Another table built from `frame`'s rows, reported under the same file, unit and labels."""
    return Frame(df, frame.name, frame.unit, frame.labels, frame.header)


def _year(titles: pd.Series, fallback: pd.Series | None = None) -> pd.Series:
    """Release year from a title's trailing "(1995)", else from `fallback` (float, NaN if neither)."""
    year = pd.to_numeric(titles.astype(str).str.extract(YEAR_IN_TITLE, expand=False), errors="coerce")
    if fallback is not None:
        year = year.fillna(fallback)
    return year.astype(np.float64)


def _genres(values: pd.Series) -> pd.Series:
    """Genre strings with the "no genre" markers dropped; none left -> null."""
    split = values.fillna("").astype(str).str.split("|")
    kept = split.map(lambda gs: "|".join(g for g in gs if g and g not in NO_GENRE))  # per item: small tables
    return kept.where(kept != "", None)


def _region(zips: pd.Series) -> pd.Series:
    """"zip_" + the zip code's first digit (a coarse US region), "zip_other" for foreign or missing."""
    first = zips.fillna("").astype(str).str.strip().str[:1]
    return ("zip_" + first).where(first.str.isdigit(), "zip_other")


def _genres_from_flags(items: Frame) -> pd.Series:
    """100K's 19 genre flag columns -> "Action|Comedy" in u.item's genre order (null if none)."""
    flags = items.df[ML100K_GENRES].fillna("").apply(lambda c: c.str.strip())
    for genre in ML100K_GENRES:
        bad = ~flags[genre].isin(["0", "1"]).to_numpy()
        if bad.any():
            items.fail(flags[genre], bad, genre, lambda v: f"genre flag {v!r} is not 0 or 1")
    joined = pd.Series("", index=flags.index, dtype=object)
    for genre in ML100K_GENRES:
        joined = joined + np.where(flags[genre].to_numpy() == "1", genre + "|", "")
    return _genres(joined.str.rstrip("|"))


def _spec(ratings: Path, items: Path, users: Path | None) -> SourceSpec:
    return SourceSpec(interactions=str(ratings), items=str(items), users=str(users) if users else None,
                      item_columns=ITEM_KINDS, user_columns=USER_KINDS if users else {},
                      category_column="genres")


def load_ml100k(folder: str | Path) -> tuple[dict[str, pd.DataFrame], dict]:
    """MovieLens 100K (u.data, u.item, u.user) -> (raw tables, schema)."""
    p_data, p_item, p_user = _need(Path(folder), "movielens-100k")
    ratings = _read_lines(p_data, "\t", RATINGS)
    items = _read_lines(p_item, "|", ["item_id", "title", "release", "video_release", "url", *ML100K_GENRES],
                        text=("title", "release", "video_release", "url", *ML100K_GENRES))
    users = _read_lines(p_user, "|", ["user_id", "age", "gender", "occupation", "zip"],
                        text=("gender", "occupation", "zip"))
    released = pd.to_datetime(items.df["release"].str.strip(), format="%d-%b-%Y", errors="coerce")
    item_df = pd.DataFrame({"item_id": items.df["item_id"], "title": items.df["title"],
                            "genres": _genres_from_flags(items), "year": _year(items.df["title"], released.dt.year)})
    user_df = users.df[["user_id", "age", "gender", "occupation"]].assign(region=_region(users.df["zip"]))
    return build_tables(ratings, _with(items, item_df), _with(users, user_df), _spec(p_data, p_item, p_user),
                        source="movielens-100k")


def load_ml1m(folder: str | Path) -> tuple[dict[str, pd.DataFrame], dict]:
    """MovieLens 1M (ratings.dat, movies.dat, users.dat) -> (raw tables, schema)."""
    p_ratings, p_movies, p_users = _need(Path(folder), "movielens-1m")
    ratings = _read_lines(p_ratings, "::", RATINGS)
    movies = _read_lines(p_movies, "::", ["item_id", "title", "genres"], text=("title", "genres"))
    users = _read_lines(p_users, "::", ["user_id", "gender", "age", "occupation", "zip"],
                        text=("gender", "occupation", "zip"))
    item_df = pd.DataFrame({"item_id": movies.df["item_id"], "title": movies.df["title"],
                            "genres": _genres(movies.df["genres"]), "year": _year(movies.df["title"])})
    codes = parse_ints(users, "age", noun="age code")
    unknown = ~np.isin(codes, list(ML1M_AGE))
    if unknown.any():
        users.fail(codes, unknown, "age", lambda v: f"unknown age code {v}; expected one of {list(ML1M_AGE)}")
    user_df = pd.DataFrame({"user_id": users.df["user_id"], "age": pd.Series(codes).map(ML1M_AGE).to_numpy(),
                            "gender": users.df["gender"], "occupation": users.df["occupation"],
                            "region": _region(users.df["zip"])})
    return build_tables(ratings, _with(movies, item_df), _with(users, user_df), _spec(p_ratings, p_movies, p_users),
                        source="movielens-1m")


def _csv(path: Path, columns: dict[str, str]) -> Frame:
    """A MovieLens CSV with its columns renamed to the canonical names (`columns`: file name ->
    canonical); messages keep the file's names."""
    frame = read_frame(path)
    missing = [c for c in columns if c not in frame.df.columns]
    if missing:
        raise RawDataError(f"{path}: missing column(s) {missing}; has {frame.columns_in_file()}")
    df = frame.df[list(columns)].rename(columns=columns)
    return Frame(df, frame.name, labels={new: old for old, new in columns.items()}, header=frame.header)


def load_ml_latest_small(folder: str | Path) -> tuple[dict[str, pd.DataFrame], dict]:
    """MovieLens latest-small (ratings.csv, movies.csv; no users file) -> (raw tables, schema)."""
    p_ratings, p_movies = _need(Path(folder), "movielens-latest-small")
    ratings = _csv(p_ratings, {"userId": "user_id", "movieId": "item_id", "rating": "rating", "timestamp": "timestamp"})
    movies = _csv(p_movies, {"movieId": "item_id", "title": "title", "genres": "genres"})
    item_df = pd.DataFrame({"item_id": movies.df["item_id"], "title": movies.df["title"],
                            "genres": _genres(movies.df["genres"]), "year": _year(movies.df["title"])})
    return build_tables(ratings, _with(movies, item_df), None, _spec(p_ratings, p_movies, None),
                        source="movielens-latest-small")


LOADERS = {"movielens-100k": load_ml100k, "movielens-1m": load_ml1m, "movielens-latest-small": load_ml_latest_small}


def load_movielens(folder: str | Path, flavour: str) -> tuple[dict[str, pd.DataFrame], dict]:
    """The MovieLens files of `flavour` in `folder` -> (raw tables, schema with its load report)."""
    if flavour not in LOADERS:
        raise RawDataError(f"unknown MovieLens flavour {flavour!r}; expected one of {list(LOADERS)}")
    return LOADERS[flavour](folder)
