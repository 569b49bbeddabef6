"""Your own data: interactions (and optional item and user tables) from CSV or Parquet, converted
into the raw format of `feature_workflows.raw_schema`.

Files: CSV (`.csv`, `.csv.gz`, `.csv.bz2`: UTF-8, comma-separated, a header row), TSV (`.tsv`,
`.tsv.gz`: tab-separated, a header row) or Parquet (`.parquet`, or a folder of `.parquet` parts,
read in file-name order).

Interactions (required), one row per event or per rating:

| column       | required         | values                                                              |
|--------------|------------------|---------------------------------------------------------------------|
| `user_id`    | yes              | integer >= 0 that fits int64 (any text with `string_ids`)           |
| `item_id`    | yes              | integer >= 0 that fits int64 (any text with `string_ids`)           |
| `timestamp`  | yes              | unix seconds, or ISO-8601 / `YYYY-MM-DD HH:MM:SS` text (UTC)        |
| `event`      | exactly one of   | `view`, `click`, `cart`, `purchase`; `impression` = shown, not acted on |
| `rating`     | `event`, `rating`| a number within the rating range (default 0.5..5; half stars kept)  |
| `session_id` | no               | integer; without it each (user, timestamp) pair is its own session  |
| `device`     | no               | text; without it (or where empty) `unknown`                         |

Other columns are ignored. Event names are matched ignoring case and surrounding spaces.
Ids are integers, unless the spec's `string_ids` (`shoprec data --string-ids`) says they are text (SKUs,
UUIDs, hashed e-mails): then every user and item id, in every file, is hashed to the integer
`shoprec.ids.key_id(text)` (stable, below 2^53; `007` and `7` are two ids), and the items and users
tables get a text column `item_key` / `user_key` holding it. Requests name users by that integer:
`client.key_id("c0ffee-42")`. Two texts that hash alike are refused, naming both.
Timestamps: integer or fractional unix seconds (the fraction is dropped), a Parquet datetime
column, or ISO-8601 text such as `2024-03-01T12:30:00Z`, `2024-03-01 12:30:00`,
`2024-03-01T12:30:00+02:00` or `2024-03-01`; text without a zone is UTC, text with one is converted
to UTC. A value past the year 5000 as seconds is refused (it is most likely milliseconds).

Ratings become events at the rating's timestamp: every rating is one `view` (so the seen-item
filter knows every rated item); a rating >= the positive threshold (default 4) is also a `click`
(the positive that retrieval and ranking learn from); a rating >= the strong threshold (default 5;
none: never) is also a `purchase`.

Duplicates: a row that repeats another row's user, item, timestamp and event (or rating) exactly
is dropped. Rating data keeps one rating per (user, item): the latest (on equal timestamps, the
last row in the file); the older ratings are dropped. Event data keeps repeated events of the same
(user, item) at different times: they are real repeat behaviour. The load report counts every
dropped row (`duplicates_dropped` = `duplicates_exact` + `duplicates_rerated`).

Items (optional): a table with `item_id` and any attribute columns. Each attribute has a kind:
`categorical`, `numeric`, `multi` (several values in one string separated by `|`, e.g.
`Action|Comedy`, kept as that string), `text` (shown, not a model feature) or `timestamp` (read
like the interaction timestamps, stored as unix seconds). Name kinds with `item_columns`
(`genres=multi`); a column not named is `numeric` when all its values are numbers, `timestamp`
when it is a Parquet datetime column, otherwise `categorical`. Name a column `categorical` to keep
numeric-looking codes as text (zip code `01234` stays `01234`). Empty cells are nulls. A column
with no value at all is kept and listed in the report (`empty_columns`); the features stage leaves
it out. Users (optional): the same, with `user_id` and `user_columns`.

Items (users) that interactions mention but the items (users) table lacks are added with null
attributes and counted (`items_added`, `users_added`): nothing is lost. Items and users that no
interaction mentions are kept. Without an items (users) file the table is the distinct ids of the
interactions, without attributes.

Roles: `category_column` names the item attribute that is the item's category (categorical or
multi), `price_column` a numeric price; unnamed, `raw_schema.default_roles` chooses.

Errors are `RawDataError`s with a one-line message naming the file, the row (the 1-based data row,
header not counted) and the column, e.g.
`interactions.csv: row 17: column 'timestamp': cannot parse 'yesterday' as unix seconds or ISO-8601`.

All parsing is vectorised pandas/numpy (no per-row Python), for files of tens of millions of rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NoReturn, Sequence

import numpy as np
import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES  # pandas' default missing-value words (public in docs, private path)

from shoprec.ids import id_text, key_id

from .history import KIND, POSITIVE_KIND
from .raw_schema import (EVENTS, KINDS, RawDataError, make_schema, validate_attributes,
                         validate_interactions)

INTERACTION_INPUT = ("user_id", "item_id", "timestamp", "event", "rating", "session_id", "device")
REQUIRED = ("user_id", "item_id", "timestamp")
VIEW, CLICK, PURCHASE = EVENTS.index("view"), EVENTS.index("click"), EVENTS.index("purchase")
INT64_MAX = int(np.iinfo(np.int64).max)
MAX_SECONDS = 95_617_584_000  # 5000-01-01T00:00:00Z: later "seconds" are milliseconds or worse
INT_TEXT = re.compile(r"[+-]?\d+")
# ISO-8601 date, optional time (seconds and fraction optional), optional zone. Only text of this
# shape reaches pd.to_datetime, so that what it would also accept ("now", "today", "20200101" as a
# date) is an error or unix seconds, never a guess.
ISO_PATTERN = r"\s*\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?\s*(?:Z|[+-]\d{2}:?\d{2})?\s*"
# pandas 1.x parses any ISO-8601 string fast when given an ISO format; 2.x spells that "ISO8601".
ISO_FORMAT = "ISO8601" if int(pd.__version__.split(".")[0]) >= 2 else "%Y-%m-%dT%H:%M:%S%z"
CSV_SUFFIXES = {".csv": ",", ".csv.gz": ",", ".csv.bz2": ",", ".tsv": "\t", ".tsv.gz": "\t"}
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class SourceSpec:
    """Where a user's own data lives and how to read it (see the module docstring for the format)."""

    interactions: str
    items: str | None = None
    users: str | None = None
    item_columns: dict[str, str] = field(default_factory=dict)
    user_columns: dict[str, str] = field(default_factory=dict)
    positive_threshold: float = 4.0
    strong_threshold: float | None = 5.0
    rating_range: tuple[float, float] = (0.5, 5.0)
    category_column: str | None = None
    price_column: str | None = None
    string_ids: bool = False  # user and item ids are text: each becomes shoprec.ids.key_id(text)


@dataclass(frozen=True, eq=False)
class Frame:
    """A table as read from one file, with what error messages call it: the file, the unit of a
    position ("row": data row, header not counted; "line": headerless files) and, where a reader
    renamed columns to the canonical names, each column's name in the file. `header` lists every
    column of the file when only some were read (for "has [...]" in messages)."""

    df: pd.DataFrame
    name: str
    unit: str = "row"
    labels: Mapping[str, str] = field(default_factory=dict)
    header: tuple[str, ...] = ()

    def columns_in_file(self) -> list[str]:
        return list(self.header) or [self.labels.get(c, c) for c in self.df.columns]

    def fail(self, values: pd.Series | np.ndarray, bad: np.ndarray, col: str,
             what: Callable[[object], str]) -> NoReturn:
        """Raise the one-line error for the first position where `bad` holds; `what` words it from
        the offending value."""
        pos = int(np.flatnonzero(np.asarray(bad))[0])
        value = values.iloc[pos] if isinstance(values, pd.Series) else values[pos]
        raise RawDataError(f"{self.name}: {self.unit} {pos + 1}: column {self.labels.get(col, col)!r}: {what(value)}")


def _show(value: object) -> str:
    """repr of a cell value as the user wrote it (numpy scalars as plain Python numbers, nulls as '')."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value is pd.NaT:
        return "''"
    return repr(value.item() if isinstance(value, np.generic) else value)


def _fmt_range(lo: float, hi: float) -> str:
    return f"[{float(lo)!r}, {float(hi)!r}]"


# ---------------------------------------------------------------------------------------------
# Column parsers: each returns plain numpy arrays / object Series and raises on the first bad cell.
# ---------------------------------------------------------------------------------------------

def _plain(series: pd.Series) -> pd.Series:
    """Categorical (Parquet dictionary) columns as their values, so dtype checks see the real type."""
    return series.astype(object) if isinstance(series.dtype, pd.CategoricalDtype) else series


TEXT_ID_HINT = "; text ids: --string-ids"  # your own files only: MovieLens ids are integers by their format


def parse_ints(frame: Frame, col: str, noun: str = "id", negative_ok: bool = False, hint: str = "") -> np.ndarray:
    """Column `col` as int64; empty, non-integer, too-large (and, unless `negative_ok`, negative)
    values are errors naming the file, position and column (a value that is not an integer: with `hint`
    appended)."""
    s = _plain(frame.df[col])
    rule = "integers" if negative_ok else "integers >= 0"
    not_int = f"is not an integer {noun}{hint}"
    null = s.isna().to_numpy()
    if null.any():
        frame.fail(s, null, col, lambda v: f"empty value; {noun}s must be {rule}")
    if pd.api.types.is_bool_dtype(s):
        frame.fail(s, np.ones(len(s), bool), col, lambda v: f"{_show(v)} {not_int}")
    if pd.api.types.is_integer_dtype(s):
        if pd.api.types.is_unsigned_integer_dtype(s):
            big = s.to_numpy() > INT64_MAX
            if big.any():
                frame.fail(s, big, col, lambda v: f"{noun} {v} does not fit int64")
        values = s.to_numpy(dtype=np.int64)
    elif pd.api.types.is_float_dtype(s):
        f = s.to_numpy(dtype=np.float64)
        frac = ~np.isfinite(f) | (f != np.floor(f))
        if frac.any():
            frame.fail(s, frac, col, lambda v: f"{_show(v)} {not_int}")
        big = np.abs(f) >= 2.0 ** 63
        if big.any():
            frame.fail(s, big, col, lambda v: f"{noun} {v:.0f} does not fit int64")
        values = f.astype(np.int64)
    else:
        values = _int_strings(frame, s, col, noun, f"{noun}s must be {rule}", not_int)
    if not negative_ok:
        neg = values < 0
        if neg.any():
            frame.fail(values, neg, col, lambda v: f"negative {noun} {v}; {noun}s must be {rule}{hint}")
    return values


def _int_strings(frame: Frame, s: pd.Series, col: str, noun: str, rule: str, not_int: str) -> np.ndarray:
    """Integers written as text (headerless files, CSV columns with a stray word): a fast C parse,
    and only when that fails a per-cell check to find and name the first bad value. A first value
    that is not integer text is reported at once (string ids: no pass over a huge column first)."""
    if INT_TEXT.fullmatch(str(s.iloc[0]).strip()):
        fast = pd.to_numeric(s, errors="coerce")
        if fast.dtype == np.int64:
            return fast.to_numpy()
    text = s.astype(str).str.strip()
    bad = ~text.str.fullmatch(INT_TEXT.pattern).to_numpy(dtype=bool)
    if bad.any():
        frame.fail(s, bad, col, lambda v: f"{_show(v)} {not_int}" if str(v).strip() else f"empty value; {rule}")
    digits = text.str.lstrip("+-").str.lstrip("0")
    big = ((digits.str.len() > 19) | ((digits.str.len() == 19) & (digits > str(INT64_MAX)))).to_numpy()
    if big.any():
        frame.fail(s, big, col, lambda v: f"{noun} {str(v).strip()} does not fit int64")
    return pd.to_numeric(text).to_numpy(dtype=np.int64)


def parse_timestamps(frame: Frame, col: str, allow_null: bool = False) -> pd.Series:
    """Column `col` as unix seconds: int64, or nullable Int64 when `allow_null` and a value is
    missing. Accepts integer/float seconds, datetime columns (naive = UTC) and ISO-8601 text."""
    s = _plain(frame.df[col])
    cannot = lambda v: f"cannot parse {_show(v)} as unix seconds or ISO-8601"  # noqa: E731
    null = s.isna().to_numpy()
    if null.any() and not allow_null:
        frame.fail(s, null, col, lambda v: "empty value; expected unix seconds or ISO-8601")
    values = None  # exact int64 seconds where the input already is integer
    if pd.api.types.is_datetime64_any_dtype(s):
        seconds = _datetime_seconds(s)
    elif pd.api.types.is_bool_dtype(s):
        frame.fail(s, ~null, col, cannot)
    elif pd.api.types.is_integer_dtype(s):
        if pd.api.types.is_unsigned_integer_dtype(s) and (s.to_numpy() > INT64_MAX).any():
            frame.fail(s, s.to_numpy() > INT64_MAX, col, lambda v: f"timestamp {v} does not fit int64")
        values = s.to_numpy(dtype=np.int64, na_value=0)
    elif pd.api.types.is_float_dtype(s):
        seconds = s.to_numpy(dtype=np.float64)
    else:
        num = pd.to_numeric(s, errors="coerce") if _looks_numeric(s, null) else None
        if num is not None and num.dtype == np.int64:  # all integer text: exact, no float round trip
            values = num.to_numpy()
        else:
            seconds = _text_seconds(s, null)
    if values is None:
        bad = ~np.isfinite(seconds) & ~null
        if bad.any():
            frame.fail(s, bad, col, cannot)
        values = np.floor(np.clip(np.nan_to_num(seconds), -MAX_SECONDS, MAX_SECONDS)).astype(np.int64)
    # Milliseconds (or micro-) given as seconds would silently become dates thousands of years away.
    late = (np.abs(values) > MAX_SECONDS) & ~null
    if late.any():
        frame.fail(s, late, col, lambda v: f"timestamp {_show(v)} is beyond the year 5000 as unix seconds; "
                                           "milliseconds? divide by 1000")
    if null.any():
        return pd.Series(pd.arrays.IntegerArray(values, null.copy()))
    return pd.Series(values, dtype=np.int64)


def _looks_numeric(s: pd.Series, null: np.ndarray) -> bool:
    """Whether the first value is integer text (then the C number parser is tried on the whole
    column; on ISO text it would be slow, failing on every value)."""
    if null.all():
        return False
    return str(s.iloc[int(np.argmin(null))]).strip().lstrip("+-").isdigit()


def _text_seconds(s: pd.Series, null: np.ndarray) -> np.ndarray:
    """Unix seconds (float, NaN where unparseable or null) of text timestamps. Values shaped
    YYYY-MM-DD... go to pandas' ISO-8601 parser (strict: "2020-13-01" or a trailing word fail);
    the few that fail or are otherwise shaped get a second, per-value look: surrounding spaces
    stripped, the full ISO pattern, else a number (unix seconds written as text)."""
    seconds = np.full(len(s), np.nan)
    shaped = _iso_shaped(s)
    if shaped.any():
        seconds[shaped] = _iso_seconds(s[shaped])
    rest = np.isnan(seconds) & ~null
    if rest.any():
        text = s[rest].astype(str).str.strip()
        iso = text.str.fullmatch(ISO_PATTERN).to_numpy(dtype=bool)
        sub = np.full(len(text), np.nan)
        if iso.any():
            sub[iso] = _iso_seconds(text[iso])
        sub[~iso] = pd.to_numeric(text[~iso], errors="coerce").to_numpy(dtype=np.float64)
        seconds[rest] = sub
    return seconds


def _iso_shaped(s: pd.Series) -> np.ndarray:
    """Whether each value starts with YYYY-MM-DD, checked on a matrix of the first 10 bytes (no
    per-value Python: regex matching tens of millions of strings takes minutes)."""
    try:
        raw = s.to_numpy().astype("S10")
    except (UnicodeEncodeError, TypeError, ValueError):  # non-ASCII text: the per-value look decides
        return np.zeros(len(s), bool)
    m = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(len(s), 10)
    digits = (m >= ord("0")) & (m <= ord("9"))
    return digits[:, [0, 1, 2, 3, 5, 6, 8, 9]].all(axis=1) & (m[:, 4] == ord("-")) & (m[:, 7] == ord("-"))


def _iso_seconds(text: pd.Series) -> np.ndarray:
    """Unix seconds (float, NaN where not a valid ISO-8601 time) of ISO-shaped strings."""
    return _datetime_seconds(pd.to_datetime(text, format=ISO_FORMAT, utc=True, errors="coerce"))


def _datetime_seconds(s: pd.Series) -> np.ndarray:
    """Unix seconds (float, NaN for NaT) of a datetime column; naive values are taken as UTC."""
    if getattr(s.dt, "tz", None) is not None:
        s = s.dt.tz_convert("UTC").dt.tz_localize(None)
    ns = s.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    out = np.floor_divide(ns, 10**9).astype(np.float64)
    out[s.isna().to_numpy()] = np.nan
    return out


def _parse_ratings(frame: Frame, col: str, lo: float, hi: float) -> np.ndarray:
    """Ratings as float64 within [lo, hi] (inclusive)."""
    s = _plain(frame.df[col])
    allowed = f"ratings must lie in {_fmt_range(lo, hi)}"
    if pd.api.types.is_bool_dtype(s):
        frame.fail(s, np.ones(len(s), bool), col, lambda v: f"{_show(v)} is not a number; {allowed}")
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num)
    if bad.any():
        frame.fail(s, bad, col, lambda v: f"{_show(v)} is not a number; {allowed}")
    out = (num < lo) | (num > hi)
    if out.any():
        frame.fail(s, out, col, lambda v: f"rating {_show(v)} is outside the allowed range {_fmt_range(lo, hi)} "
                                          "(another scale: --rating-range LO HI)")
    return num


def _parse_events(frame: Frame, col: str) -> np.ndarray:
    """Event names as int8 indexes into EVENTS; matched on the distinct values only (fast on
    tens of millions of rows), ignoring case and surrounding spaces."""
    s = frame.df[col]
    codes, uniques = pd.factorize(s)
    lookup = [EVENTS.index(str(u).strip().lower()) if str(u).strip().lower() in EVENTS else -1 for u in uniques]
    events = np.array([*lookup, -1], dtype=np.int8)[codes]  # code -1 (null) picks the trailing -1
    bad = events < 0
    if bad.any():
        frame.fail(s, bad, col, lambda v: (f"unknown value {_show(v)}" if _show(v) != "''" else "empty value")
                   + f"; allowed {list(EVENTS)}")
    return events


def as_strings(series: pd.Series, fill: str | None = None) -> pd.Series:
    """Values as str (object dtype), nulls and blank strings as `fill`; converted on the distinct
    values only. Floats that are all whole numbers are written without '.0' (a code read as float
    because of a missing value stays '10', not '10.0')."""
    s = _plain(series)
    if pd.api.types.is_float_dtype(s):
        f = s.to_numpy(dtype=np.float64)
        finite = f[np.isfinite(f)]
        if len(finite) and (finite == np.floor(finite)).all() and np.abs(finite).max() < 2.0 ** 53:
            s = s.astype("Int64")
    codes, uniques = pd.factorize(s)
    labels = [str(u) for u in uniques]
    labels = np.array([lab if lab.strip() else fill for lab in labels] + [fill], dtype=object)
    return pd.Series(labels[codes], index=series.index, dtype=object)


# ---------------------------------------------------------------------------------------------
# Interactions
# ---------------------------------------------------------------------------------------------

def _require_rows(frame: Frame) -> None:
    if len(frame.df) == 0:
        raise RawDataError(f"{frame.name}: no data rows")


def _require_columns(frame: Frame, needed: Sequence[str]) -> None:
    missing = [frame.labels.get(c, c) for c in needed if c not in frame.df.columns]
    if missing:
        raise RawDataError(f"{frame.name}: missing column(s) {missing}; has {frame.columns_in_file()}")


def parse_key_ids(frame: Frame, col: str) -> tuple[np.ndarray, pd.Series]:
    """Column `col` of text ids -> (the int64 id of each row, id -> text of each distinct id): `shoprec.ids.key_id`
    of each distinct stripped text (numbers count as their text: `007` and `7` are two ids). Text, UTF-8 bytes and
    integer columns are read (`shoprec.ids.id_text`); a float or boolean value is an error (its text would depend
    on how the file stored it). Empty values are errors naming the file, position and column; two texts with one
    id are an error naming both."""
    s = _plain(frame.df[col])
    label = frame.labels.get(col, col)
    if pd.api.types.is_float_dtype(s) or pd.api.types.is_bool_dtype(s):
        raise RawDataError(f"{frame.name}: column {label!r}: text ids must be text or integers, not {s.dtype}; "
                           "store the column as text")
    codes, uniq = pd.factorize(s)  # every text is read and hashed once
    texts = [id_text(v) for v in uniq]
    bad = np.array([t is None for t in texts] + [False])
    if bad.any():
        frame.fail(s, bad[codes], col,
                   lambda v: f"{_show(v)} is not a text id (text, UTF-8 bytes or an integer); store the column as text")
    stripped = np.array([t.strip() for t in texts], dtype=object)
    empty = np.append(stripped == "", True)[codes]  # code -1 (a null) lands on the appended True
    if empty.any():
        frame.fail(s, empty, col, lambda v: "empty value; text ids must not be empty")
    inner, keys = pd.factorize(stripped)  # texts equal after stripping: one id
    hashed = np.fromiter((key_id(k) for k in keys), dtype=np.int64, count=len(keys))
    dup = pd.Series(hashed).duplicated(keep=False).to_numpy()
    if dup.any():
        first = hashed[dup][0]
        a, b = (str(k) for k in keys[hashed == first][:2])
        raise RawDataError(f"{frame.name}: column {label!r}: the text ids {a!r} and {b!r} hash to the "
                           f"same id {first}; rename one of them, or map the ids to integers yourself")
    return hashed[inner[codes]], pd.Series(keys, index=hashed, dtype=object)


KEY_COLUMN = {"user_id": "user_key", "item_id": "item_key"}  # with string ids: the text beside the id, kind text


def _merge_keys(known: pd.Series, more: pd.Series, frame: Frame, col: str) -> pd.Series:
    """Two id -> text maps as one; an id with two texts (two files' texts hash alike) is an error naming both."""
    both = known.index.intersection(more.index)
    clash = both[known.loc[both].to_numpy() != more.loc[both].to_numpy()]
    if len(clash):
        i = clash[0]
        raise RawDataError(f"{frame.name}: column {frame.labels.get(col, col)!r}: the text ids {known.loc[i]!r} and "
                           f"{more.loc[i]!r} hash to the same id {i}; rename one of them, or map the ids to integers yourself")
    return pd.concat([known, more[~more.index.isin(both)]])


def _check_spec(spec: SourceSpec) -> None:
    """Thresholds and range that cannot describe a rating scale are errors, not silent oddities."""
    lo, hi = spec.rating_range
    if not lo <= hi:
        raise RawDataError(f"rating_range {_fmt_range(lo, hi)}: the low end is above the high end")
    default = SourceSpec("")
    if hi != default.rating_range[1] and (spec.positive_threshold, spec.strong_threshold) == \
            (default.positive_threshold, default.strong_threshold):
        # the star thresholds on a scale not ending at 5 would label most ratings positive (1-10) or none (0-1)
        raise RawDataError(f"rating_range {_fmt_range(lo, hi)}: set the thresholds on that scale (--positive-threshold, "
                           f"--strong-threshold); the defaults {default.positive_threshold:g} and "
                           f"{default.strong_threshold:g} are for {_fmt_range(*default.rating_range)} stars")
    if spec.strong_threshold is not None and spec.strong_threshold < spec.positive_threshold:
        raise RawDataError(f"strong_threshold {spec.strong_threshold} is below positive_threshold "
                           f"{spec.positive_threshold}; a purchase must also be a click (set both: --positive-threshold, "
                           "--strong-threshold)")


def _parse_interactions(frame: Frame, spec: SourceSpec, hint: str = "") -> tuple[pd.DataFrame, str, dict[str, pd.Series]]:
    """The interaction columns parsed and checked; value column `rating` (float) or `event` (int8
    index into EVENTS). Returns (frame, mode, keys) with mode "rating" or "event" and, with
    `spec.string_ids`, keys = {"user_id": id -> text, "item_id": id -> text} (else {})."""
    _require_rows(frame)
    _require_columns(frame, REQUIRED)
    cols = frame.df.columns
    label = lambda c: frame.labels.get(c, c)  # noqa: E731
    if "event" in cols and "rating" in cols:
        raise RawDataError(f"{frame.name}: has both {label('event')!r} and {label('rating')!r} columns; "
                           "keep exactly one")
    if "event" not in cols and "rating" not in cols:
        raise RawDataError(f"{frame.name}: needs an 'event' or a 'rating' column; has {frame.columns_in_file()}")
    keys: dict[str, pd.Series] = {}
    if spec.string_ids:
        parsed = {}
        for col in ("user_id", "item_id"):
            parsed[col], keys[col] = parse_key_ids(frame, col)
        users, items = parsed["user_id"], parsed["item_id"]
    else:
        users, items = parse_ints(frame, "user_id", hint=hint), parse_ints(frame, "item_id", hint=hint)
    out = pd.DataFrame({"user_id": users, "item_id": items, "ts": parse_timestamps(frame, "timestamp").to_numpy()})
    mode = "rating" if "rating" in cols else "event"
    if mode == "rating":
        out["rating"] = _parse_ratings(frame, "rating", *spec.rating_range)
    else:
        out["event"] = _parse_events(frame, "event")
    if "session_id" in cols:
        out["session_id"] = parse_ints(frame, "session_id", noun="session id", negative_ok=True)
    out["device"] = as_strings(frame.df["device"], "unknown").to_numpy() if "device" in cols else "unknown"
    return out, mode, keys


def _drop_duplicates(df: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, int, int]:
    """(kept rows, exact duplicates dropped, older ratings of re-rated pairs dropped)."""
    exact = df.duplicated(["user_id", "item_id", "ts", mode], keep="first").to_numpy()
    df = df[~exact]
    rerated = 0
    if mode == "rating":
        # Stable sort by time keeps file order among equal timestamps, so keep="last" is
        # "latest rating, ties: last row in the file".
        df = df.iloc[np.argsort(df["ts"].to_numpy(), kind="stable")]
        older = df.duplicated(["user_id", "item_id"], keep="last").to_numpy()
        df = df[~older]
        rerated = int(older.sum())
    return df.reset_index(drop=True), int(exact.sum()), rerated


def _dense_sessions(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """A session id per (user, timestamp) pair: the pair's dense rank in (user, ts) order, so
    different users never share an id and equal inputs give equal ids."""
    order = np.lexsort((ts, user))
    u, t = user[order], ts[order]
    new = np.ones(len(order), bool)
    new[1:] = (u[1:] != u[:-1]) | (t[1:] != t[:-1])
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.cumsum(new) - 1
    return ranks


def _to_events(df: pd.DataFrame, mode: str, spec: SourceSpec) -> pd.DataFrame:
    """Rows in the raw interaction format, sorted by (ts, user_id) stably. Ratings expand into
    view (+ click at >= positive_threshold, + purchase at >= strong_threshold)."""
    cols = ["user_id", "item_id", "ts", "session_id", "device"]
    if mode == "rating":
        rating = df["rating"].to_numpy()
        blocks = [np.arange(len(df)), np.flatnonzero(rating >= spec.positive_threshold)]
        events = [np.full(len(blocks[0]), VIEW, np.int8), np.full(len(blocks[1]), CLICK, np.int8)]
        if spec.strong_threshold is not None:
            blocks.append(np.flatnonzero(rating >= spec.strong_threshold))
            events.append(np.full(len(blocks[-1]), PURCHASE, np.int8))
        take, event = np.concatenate(blocks), np.concatenate(events)
    else:
        take, event = np.arange(len(df)), df["event"].to_numpy()
    # lexsort is stable: at one (ts, user) views come before clicks before purchases, and
    # event rows keep their file order.
    sort = np.lexsort((df["user_id"].to_numpy()[take], df["ts"].to_numpy()[take]))
    order, event = take[sort], event[sort]
    out = {c: df[c].to_numpy()[order] for c in cols}
    out["event"] = np.array(EVENTS, dtype=object)[event]
    return pd.DataFrame(out)[["user_id", "item_id", "ts", "session_id", "event", "device"]]


def _interactions(frame: Frame, spec: SourceSpec, hint: str = "") -> tuple[pd.DataFrame, dict, dict[str, pd.Series]]:
    """Raw-format interactions from an interaction table, the counts for the load report, and the text ids'
    maps (`_parse_interactions`)."""
    df, mode, keys = _parse_interactions(frame, spec, hint)
    read = len(df)
    df, exact, rerated = _drop_duplicates(df, mode)
    if "session_id" not in df.columns:
        df["session_id"] = _dense_sessions(df["user_id"].to_numpy(), df["ts"].to_numpy())
    events = validate_interactions(_to_events(df, mode, spec), frame.name)
    report = {"interactions_file": frame.name, "mode": mode, "rows_read": read, "rows_kept": len(df),
              "duplicates_dropped": exact + rerated, "duplicates_exact": exact, "duplicates_rerated": rerated,
              "events": len(events)}
    return events, report, keys


# ---------------------------------------------------------------------------------------------
# Items and users
# ---------------------------------------------------------------------------------------------

def _infer_kind(series: pd.Series) -> str:
    s = _plain(series)
    if pd.api.types.is_datetime64_any_dtype(s):
        return "timestamp"
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        return "numeric"
    return "categorical"


def _numeric(frame: Frame, col: str) -> pd.Series:
    """A numeric attribute: int64 when whole and complete, else float64 (nulls allowed)."""
    s = _plain(frame.df[col])
    if pd.api.types.is_bool_dtype(s):
        return s.astype(np.int64)
    if pd.api.types.is_numeric_dtype(s):
        num = s
    else:
        num = pd.to_numeric(s, errors="coerce")
        blank = s.isna() | (s.astype(str).str.strip() == "")
        bad = (num.isna() & ~blank).to_numpy()
        if bad.any():
            frame.fail(s, bad, col, lambda v: f"cannot parse {_show(v)} as a number")
    return _finish_numeric(num)


def _finish_numeric(num: pd.Series) -> pd.Series:
    if pd.api.types.is_integer_dtype(num) and not num.isna().any():
        return num.astype(np.int64)
    return num.astype(np.float64)


def _convert(frame: Frame, col: str, kind: str) -> pd.Series:
    """One attribute column converted to its kind's storage type."""
    if kind == "numeric":
        return _numeric(frame, col)
    if kind == "timestamp":
        return parse_timestamps(frame, col, allow_null=True)
    return as_strings(frame.df[col])


def _finish(series: pd.Series, kind: str) -> pd.Series:
    """Storage type again after appending null rows (int columns widen, timestamps stay integer)."""
    if kind == "numeric":
        return _finish_numeric(series)
    if kind == "timestamp":
        return series.astype("Int64") if series.isna().any() else series.astype(np.int64)
    return series.astype(object).where(series.notna(), None)


def _check_kinds(kinds: Mapping[str, str], what: str) -> None:
    bad = {c: k for c, k in kinds.items() if k not in KINDS}
    if bad:
        raise RawDataError(f"{what}: unknown column kind(s) {bad}; allowed {list(KINDS)}")


def _attributes(frame: Frame | None, table: str, kinds: Mapping[str, str], referenced: np.ndarray,
                keys: pd.Series | None = None, hint: str = "") -> tuple[pd.DataFrame, dict[str, str], dict]:
    """The items or users table with typed attributes, ids the interactions mention but the table
    lacks appended with null attributes; (table, kinds, report). With text ids (`keys`: the
    interactions' id -> text) the table's ids are hashed too, and a text column `item_key` /
    `user_key` holds every row's text id."""
    id_col = "item_id" if table == "items" else "user_id"
    option = "item_columns" if table == "items" else "user_columns"
    _check_kinds(kinds, option)
    ids = np.unique(referenced)
    if frame is None:
        if kinds:
            raise RawDataError(f"{option} names {sorted(kinds)} but no {table} file was given")
        out = pd.DataFrame({id_col: ids})
        if keys is None:
            return out, {}, {f"{table}_file": None, f"{table}_added": 0, "empty": [], "warnings": []}
        out[KEY_COLUMN[id_col]] = keys.reindex(ids).to_numpy(dtype=object)
        return out, {KEY_COLUMN[id_col]: "text"}, {f"{table}_file": None, f"{table}_added": 0, "empty": [],
                                                    "warnings": []}
    _require_rows(frame)
    _require_columns(frame, [id_col])
    absent = [c for c in kinds if c not in frame.df.columns or c == id_col]
    if absent:
        raise RawDataError(f"{frame.name}: {option} names column(s) {absent}, which the {table} table lacks; "
                           f"has {frame.columns_in_file()}")
    if keys is None:
        own, own_keys = parse_ints(frame, id_col, hint=hint), None
    else:
        if KEY_COLUMN[id_col] in frame.df.columns:
            raise RawDataError(f"{frame.name}: has a column {KEY_COLUMN[id_col]!r}, which --string-ids writes (the text "
                               f"id); rename it")
        own, own_keys = parse_key_ids(frame, id_col)
    dup = pd.Series(own).duplicated().to_numpy()
    if dup.any():
        frame.fail(own, dup, id_col, lambda v: f"{id_col} {v if own_keys is None else _show(own_keys[v])} is listed "
                                               "more than once")
    attrs = [c for c in frame.df.columns if c != id_col]
    all_kinds = {c: kinds.get(c) or _infer_kind(frame.df[c]) for c in attrs}
    doubts = [_doubt(frame, c, all_kinds[c], option) for c in attrs if c not in kinds]
    out = pd.DataFrame({id_col: own})
    for c, k in all_kinds.items():
        out[c] = _convert(frame, c, k).reset_index(drop=True)
    empty = [c for c in attrs if out[c].isna().all()]
    missing = np.setdiff1d(ids, own, assume_unique=True)
    if len(missing):
        out = pd.concat([out, pd.DataFrame({id_col: missing})], ignore_index=True)
        for c, k in all_kinds.items():
            out[c] = _finish(out[c], k)
    if keys is not None:
        merged = _merge_keys(keys, own_keys, frame, id_col)
        out[KEY_COLUMN[id_col]] = merged.reindex(out[id_col].to_numpy()).to_numpy(dtype=object)
        all_kinds[KEY_COLUMN[id_col]] = "text"
    out = validate_attributes(out, table, all_kinds, frame.name)
    return out, all_kinds, {f"{table}_file": frame.name, f"{table}_added": int(len(missing)), "empty": empty,
                            "warnings": [d for d in doubts if d]}


def _doubt(frame: Frame, col: str, kind: str, option: str) -> str | None:
    """Why an inferred column may not be the feature it becomes (None: no doubt): a spreadsheet's saved row index,
    or a categorical with a value per row (an id, free text), which the models would learn nothing from."""
    label = frame.labels.get(col, col)
    if re.fullmatch(r"Unnamed: \d+", str(label)):
        return (f"{frame.name}: column {label!r} looks like a saved row index, and becomes a {kind} feature; drop it, or "
                f"keep it for display: --{option.replace('_', '-')[:-1]} '{label}=text'")
    values = frame.df[col].dropna()
    distinct = values.nunique()
    if kind == "categorical" and len(values) >= 100 and distinct >= 0.9 * len(values):
        return (f"{frame.name}: column {label!r} has {distinct:,} distinct values in {len(values):,} rows (an id or free "
                f"text?), and becomes a categorical feature; to show it only: --{option.replace('_', '-')[:-1]} "
                f"'{label}=text'")
    return None


def _roles(spec: SourceSpec, item_kinds: Mapping[str, str]) -> dict[str, str | None]:
    """Role overrides from the spec; a named column must exist and have a kind the role can use."""
    roles: dict[str, str | None] = {}
    for role, col, ok in (("category", spec.category_column, ("categorical", "multi")),
                          ("price", spec.price_column, ("numeric",))):
        if col is None:
            continue
        if col not in item_kinds:
            raise RawDataError(f"{role}_column {col!r} is not an item attribute; item attributes {list(item_kinds)}")
        if item_kinds[col] not in ok:
            raise RawDataError(f"{role}_column {col!r} is {item_kinds[col]}; it must be {' or '.join(ok)}")
        roles[role] = col
    return roles


POSITIVE_EVENTS = tuple(e for e, k in KIND.items() if k >= POSITIVE_KIND)  # what the models learn from
NO_POSITIVE = ("no event is a positive (a click, cart or purchase; with ratings, one at or above the positive "
               "threshold): the models learn from positives, so `features` will refuse this data; with ratings, "
               "lower --positive-threshold")


def build_tables(interactions: Frame, items: Frame | None, users: Frame | None, spec: SourceSpec,
                 source: str) -> tuple[dict[str, pd.DataFrame], dict]:
    """The shared core of every file-based source: frames with canonical column names -> validated
    raw tables and their schema (with the load report under "load_report"). `spec`'s paths are
    not read here; its kinds, thresholds and roles are used."""
    _check_spec(spec)
    hint = TEXT_ID_HINT if source == "interactions" else ""
    inter, report, keys = _interactions(interactions, spec, hint)
    item_columns = dict(spec.item_columns)
    # the price column (named, or the one called "price") is numeric: a value that is not ("78,19", "$12.50") is an
    # error naming its row, where inferring its kind would make it a category and the item quietly lose its price
    price = spec.price_column or "price"
    if items is not None and price in items.df.columns and price not in item_columns:
        item_columns[price] = "numeric"
    item_df, item_kinds, item_rep = _attributes(items, "items", item_columns, inter["item_id"].to_numpy(),
                                                keys.get("item_id"), hint)
    user_df, user_kinds, user_rep = _attributes(users, "users", spec.user_columns, inter["user_id"].to_numpy(),
                                                keys.get("user_id"), hint)
    report.update({k: v for k, v in {**item_rep, **user_rep}.items() if k not in ("empty", "warnings")})
    report["warnings"] = item_rep["warnings"] + user_rep["warnings"]
    if not inter["event"].isin(list(POSITIVE_EVENTS)).any():
        report["warnings"].insert(0, NO_POSITIVE)
    if spec.string_ids:
        report["string_ids"] = True
    report["empty_columns"] = {"items": item_rep["empty"], "users": user_rep["empty"]}
    schema = make_schema(item_kinds, user_kinds, source=source, roles=_roles(spec, item_kinds), load_report=report)
    return {"interactions": inter, "items": item_df, "users": user_df}, schema


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _file_kind(path: Path) -> str:
    """"parquet" or the CSV separator for a path, by its name; anything else is an error."""
    if path.is_dir():
        return "parquet"
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    for suffix, sep in CSV_SUFFIXES.items():
        if name.endswith(suffix):
            return sep
    raise RawDataError(f"{path}: unsupported file type; use {', '.join([*CSV_SUFFIXES, *PARQUET_SUFFIXES])} "
                       "or a folder of .parquet files")


def _read_parquet(path: Path, wanted: Sequence[str] | None) -> tuple[pd.DataFrame, list[str]]:
    import pyarrow.dataset as ds

    if path.is_dir() and not any(path.rglob("*.parquet")):
        raise RawDataError(f"{path}: folder holds no .parquet files")
    try:
        names = ds.dataset(str(path), format="parquet").schema.names
        columns = [c for c in names if wanted is None or c.strip() in wanted]
        df = pd.read_parquet(path, columns=columns)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise RawDataError(f"{path}: cannot read as parquet ({type(exc).__name__})") from exc
    return df.rename(columns=lambda c: str(c).strip()), [str(c).strip() for c in names]


def _read_csv(path: Path, sep: str, wanted: Sequence[str] | None, text: Sequence[str], literal: Sequence[str] = (),
              ) -> tuple[pd.DataFrame, list[str]]:
    try:
        header = pd.read_csv(path, sep=sep, nrows=0).columns
        if len(header) == 1 and sep == ",":  # a spreadsheet's export may separate by ";" (decimal commas), "|" or tabs
            other = next((c for c in (";", "\t", "|") if c in str(header[0])), None)
            if other is not None:
                sep, header = other, pd.read_csv(path, sep=other, nrows=0).columns
        columns = [c for c in header if wanted is None or str(c).strip() in wanted]
        # Text columns stay text: a numeric-looking device name is still a name, and a zip code
        # keeps its leading 0. Blank lines are kept as rows so that "row N" is the file's line
        # N + 1; trailing ones are dropped below.
        dtype = {c: str for c in columns if str(c).strip() in text or str(c).strip() in literal}
        # `literal` columns (text ids) are missing only where blank: "NA" or "null" is somebody's id
        na = {} if not any(str(c).strip() in literal for c in columns) else {
            "keep_default_na": False,
            "na_values": {c: [""] if str(c).strip() in literal else sorted(STR_NA_VALUES) for c in columns}}
        df = pd.read_csv(path, sep=sep, usecols=columns, dtype=dtype, low_memory=False, skip_blank_lines=False, **na)
    except pd.errors.EmptyDataError as exc:
        raise RawDataError(f"{path}: file is empty") from exc
    except pd.errors.ParserError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RawDataError(f"{path}: cannot parse as {'TSV' if sep == chr(9) else 'CSV'}: {first}") from exc
    except UnicodeDecodeError as exc:
        raise RawDataError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    df = df.rename(columns=lambda c: str(c).strip())
    end = len(df)
    while end and df.iloc[end - 1].isna().all():  # trailing blank lines only, not a pass over the data
        end -= 1
    return df.iloc[:end], [str(c).strip() for c in header]


def read_frame(path: str | Path, wanted: Sequence[str] | None = None, text: Sequence[str] = (),
               literal: Sequence[str] = ()) -> Frame:
    """One table from CSV/TSV/Parquet as a Frame named by its path; `wanted` limits the columns
    read (the rest are ignored, which saves memory on wide exports); CSV columns in `text` are
    read as strings, not numbers, and those in `literal` too, with only a blank cell missing (not
    pandas' "NA", "null", "nan"...)."""
    p = Path(path)
    if not p.exists():
        raise RawDataError(f"{path}: not found")
    kind = _file_kind(p)
    if p.is_file() and p.stat().st_size == 0:
        raise RawDataError(f"{path}: file is empty")
    df, header = _read_parquet(p, wanted) if kind == "parquet" else _read_csv(p, kind, wanted, text, literal)
    frame = Frame(df.reset_index(drop=True), str(path), header=tuple(header))
    _require_rows(frame)
    return frame


def _text_columns(kinds: Mapping[str, str]) -> list[str]:
    """Columns whose values are names, not numbers (timestamps are parsed from text too)."""
    return [c for c, k in kinds.items() if k in ("categorical", "multi", "text", "timestamp")]


def load_interactions_source(spec: SourceSpec) -> tuple[dict[str, pd.DataFrame], dict]:
    """Read a user's own files (see the module docstring) -> ({"interactions", "items", "users"}
    raw tables, schema); the schema's "load_report" holds rows read and kept, duplicates dropped,
    items/users added and empty attribute columns."""
    _check_spec(spec)
    ids = ("user_id", "item_id") if spec.string_ids else ()  # text ids: "007" keeps its zeros, "NA" is an id
    inter = read_frame(spec.interactions, INTERACTION_INPUT, text=("event", "device"), literal=ids)
    items = read_frame(spec.items, text=_text_columns(spec.item_columns), literal=ids[1:]) if spec.items else None
    users = read_frame(spec.users, text=_text_columns(spec.user_columns), literal=ids[:1]) if spec.users else None
    return build_tables(inter, items, users, spec, source="interactions")


def parse_column_kinds(pairs: Sequence[str]) -> dict[str, str]:
    """["genres=multi", "title=text"] -> {"genres": "multi", "title": "text"} (CLI --item-column)."""
    kinds: dict[str, str] = {}
    for pair in pairs:
        col, sep, kind = pair.partition("=")
        col, kind = col.strip(), kind.strip().lower()
        if not sep or not col or kind not in KINDS:
            raise RawDataError(f"column kind {pair!r}: expected COLUMN=KIND with KIND one of {list(KINDS)}")
        if col in kinds:
            raise RawDataError(f"column kind {pair!r}: column {col!r} is given a kind twice")
        kinds[col] = kind
    return kinds
