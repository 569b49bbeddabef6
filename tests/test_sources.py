"""The "your own data" loader on tiny fixture files: format, rating mapping, duplicates, added
items/users, and the exact one-line error messages."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from feature_workflows.raw_schema import RawDataError, read_table, write_raw
from feature_workflows.sources import SourceSpec, load_interactions_source, parse_column_kinds


def _csv(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _load(tmp_path, inter: str, name: str = "interactions.csv", **kw):
    return load_interactions_source(SourceSpec(_csv(tmp_path / name, inter), **kw))


def _events(tables) -> dict[str, int]:
    return tables["interactions"]["event"].value_counts().to_dict()


EVENT_CSV = ("user_id,item_id,timestamp,event,session_id,device,note\n"
             "1,10,100,view,7,mobile,x\n"
             "1,10,105,click,7,mobile,y\n"
             "2,20,90,impression,8,,z\n"
             "2,20,95,purchase,8,desktop,z\n")


def test_event_csv(tmp_path):
    tables, schema = _load(tmp_path, EVENT_CSV)
    inter = tables["interactions"]
    assert list(inter.columns) == ["user_id", "item_id", "ts", "session_id", "event", "device"]
    assert list(inter.ts) == [90, 95, 100, 105]  # sorted by time
    assert list(inter.event) == ["impression", "purchase", "view", "click"]
    assert list(inter.session_id) == [8, 8, 7, 7]
    assert list(inter.device) == ["unknown", "desktop", "mobile", "mobile"]  # empty device -> unknown
    assert list(tables["items"].columns) == ["item_id"] and sorted(tables["items"].item_id) == [10, 20]
    assert list(tables["users"].columns) == ["user_id"] and sorted(tables["users"].user_id) == [1, 2]
    assert schema["source"] == "interactions" and schema["items"] == {} and schema["users"] == {}
    report = schema["load_report"]
    assert (report["mode"], report["rows_read"], report["rows_kept"], report["events"]) == ("event", 4, 4, 4)


def test_event_values_ignore_case_and_spaces(tmp_path):
    tables, _ = _load(tmp_path, "user_id,item_id,timestamp,event\n1,10,100, Click\n1,11,101,VIEW\n")
    assert list(tables["interactions"].event) == ["click", "view"]


def test_rating_csv_half_stars(tmp_path):
    text = ("user_id,item_id,timestamp,rating\n"
            "1,10,100,3.5\n"   # view only
            "1,11,101,4\n"     # view + click
            "1,12,102,4.5\n"   # view + click
            "2,10,103,5\n"     # view + click + purchase
            "2,13,104,0.5\n")  # view only
    tables, schema = _load(tmp_path, text)
    assert _events(tables) == {"view": 5, "click": 3, "purchase": 1}
    inter = tables["interactions"]
    assert sorted(inter[inter.event == "click"].item_id) == [10, 11, 12]
    assert list(inter[inter.ts == 103].event) == ["view", "click", "purchase"]  # weakest first, same time
    assert schema["load_report"]["mode"] == "rating"


def test_rating_thresholds(tmp_path):
    text = "user_id,item_id,timestamp,rating\n1,10,100,3\n1,11,101,5\n"
    tables, _ = _load(tmp_path, text, positive_threshold=3.0, strong_threshold=None)
    assert _events(tables) == {"view": 2, "click": 2}
    tables, _ = _load(tmp_path, "user_id,item_id,timestamp,rating\n1,10,100,9\n", rating_range=(1, 10),
                      positive_threshold=7, strong_threshold=9)
    assert _events(tables) == {"view": 1, "click": 1, "purchase": 1}


def test_parquet_file_and_folder(tmp_path):
    df = pd.DataFrame({"user_id": [1, 2], "item_id": [10, 20], "timestamp": [100, 200], "event": ["click", "view"]})
    df.to_parquet(tmp_path / "inter.parquet", index=False)
    tables, _ = load_interactions_source(SourceSpec(str(tmp_path / "inter.parquet")))
    assert list(tables["interactions"].event) == ["click", "view"]
    folder = tmp_path / "parts"
    folder.mkdir()
    df.iloc[:1].to_parquet(folder / "part-0.parquet", index=False)
    df.iloc[1:].to_parquet(folder / "part-1.parquet", index=False)
    tables, _ = load_interactions_source(SourceSpec(str(folder)))
    assert list(tables["interactions"].item_id) == [10, 20]


def test_parquet_datetime_timestamps(tmp_path):
    df = pd.DataFrame({"user_id": [1], "item_id": [10], "rating": [4.0],
                       "timestamp": pd.to_datetime(["2020-01-01T00:00:10"])})  # naive -> UTC
    df.to_parquet(tmp_path / "r.parquet", index=False)
    tables, _ = load_interactions_source(SourceSpec(str(tmp_path / "r.parquet")))
    assert set(tables["interactions"].ts) == {1577836810}


def test_iso_timestamps(tmp_path):
    text = ("user_id,item_id,timestamp,event\n"
            "1,10,2020-01-01T00:00:00Z,click\n"
            "1,11,2020-01-01 00:00:01,click\n"
            "1,12,2020-01-01T02:00:02+02:00,click\n"
            "1,13,2020-01-01,click\n"
            "1,14,1577836804,click\n"            # unix seconds mixed in
            "1,15, 2020-01-01T00:00:05.7Z ,click\n")  # spaces; fraction dropped
    tables, _ = _load(tmp_path, text)
    assert list(tables["interactions"].ts) == [1577836800, 1577836800, 1577836801, 1577836802, 1577836804,
                                               1577836805]


def test_tsv_and_gzip(tmp_path):
    tsv = tmp_path / "inter.tsv"
    tsv.write_text("user_id\titem_id\ttimestamp\tevent\n1\t10\t100\tclick\n")
    assert len(load_interactions_source(SourceSpec(str(tsv)))[0]["interactions"]) == 1
    gz = tmp_path / "inter.csv.gz"
    pd.DataFrame({"user_id": [1], "item_id": [10], "timestamp": [100], "event": ["view"]}).to_csv(gz, index=False)
    assert len(load_interactions_source(SourceSpec(str(gz)))[0]["interactions"]) == 1


def test_missing_session_and_device(tmp_path):
    text = ("user_id,item_id,timestamp,event\n"
            "1,10,100,view\n1,11,100,click\n"   # same user and time: one session
            "1,12,200,view\n"                   # later: another
            "2,10,100,view\n")                  # same time, other user: another
    inter = _load(tmp_path, text)[0]["interactions"]
    assert set(inter.device) == {"unknown"} and inter.session_id.dtype == np.int64
    assert inter.groupby(["user_id", "ts"]).session_id.nunique().max() == 1  # one id per (user, ts)
    assert inter.drop_duplicates(["user_id", "ts"]).session_id.is_unique  # never shared across pairs/users
    again = _load(tmp_path, text)[0]["interactions"]
    assert list(again.session_id) == list(inter.session_id)  # deterministic


def test_duplicates_exact_dropped_and_counted(tmp_path):
    text = ("user_id,item_id,timestamp,event,device\n"
            "1,10,100,click,a\n"
            "1,10,100,click,b\n"   # exact duplicate (device is not part of the key)
            "1,10,200,click,a\n"   # repeat at another time: kept
            "1,10,100,view,a\n")   # another event at the same time: kept
    tables, schema = _load(tmp_path, text)
    assert len(tables["interactions"]) == 3
    report = schema["load_report"]
    assert (report["rows_read"], report["rows_kept"], report["duplicates_dropped"]) == (4, 3, 1)


def test_duplicates_rerated_pair_keeps_latest(tmp_path):
    text = ("user_id,item_id,timestamp,rating\n"
            "1,10,300,2\n"     # latest for (1, 10): kept
            "1,10,100,5\n"     # older: dropped
            "1,10,100,5\n"     # exact duplicate: dropped
            "1,20,50,1\n"
            "1,20,50,4\n")     # same time, later in the file: kept
    tables, schema = _load(tmp_path, text)
    inter = tables["interactions"]
    assert list(inter[inter.item_id == 10].event) == ["view"] and set(inter[inter.item_id == 10].ts) == {300}
    assert sorted(inter[inter.item_id == 20].event) == ["click", "view"]
    report = schema["load_report"]
    assert (report["duplicates_exact"], report["duplicates_rerated"], report["duplicates_dropped"]) == (1, 2, 3)
    assert report["rows_kept"] == 2


ITEMS_CSV = ("item_id,genres,price,title,brand,launched,empty\n"
             "10,Action|Comedy,9.5,\"Toy, Story\",acme,2020-01-01,\n"
             "20,Drama,12,Heat,7,,\n"
             "30,,,Up,acme,1577836800,\n")
INTER_CSV = "user_id,item_id,timestamp,event\n1,10,100,click\n2,20,101,view\n2,40,102,view\n"


def test_items_kinds_explicit_inferred_and_added(tmp_path):
    items = _csv(tmp_path / "items.csv", ITEMS_CSV)
    spec = SourceSpec(_csv(tmp_path / "i.csv", INTER_CSV), items=items,
                      item_columns={"genres": "multi", "title": "text", "brand": "categorical", "launched": "timestamp"},
                      price_column="price")
    tables, schema = load_interactions_source(spec)
    assert schema["items"] == {"genres": "multi", "price": "numeric", "title": "text", "brand": "categorical",
                               "launched": "timestamp", "empty": "numeric"}
    assert schema["roles"] == {"category": "genres", "price": "price", "created": None}
    it = tables["items"].set_index("item_id")
    assert it.loc[10, "genres"] == "Action|Comedy" and it.loc[10, "title"] == "Toy, Story"
    assert it.loc[20, "brand"] == "7" and it.loc[20, "price"] == 12.0  # categorical kept as str
    assert it.loc[10, "launched"] == 1577836800 and it.loc[30, "launched"] == 1577836800
    assert pd.isna(it.loc[20, "launched"]) and pd.api.types.is_integer_dtype(it["launched"])
    assert list(it.index) == [10, 20, 30, 40]  # 40: referenced by an interaction, not in the file
    assert it.loc[40].isna().all()
    report = schema["load_report"]
    assert report["items_added"] == 1 and report["empty_columns"] == {"items": ["empty"], "users": []}


def test_items_category_inferred_first_categorical(tmp_path):
    items = _csv(tmp_path / "items.csv", "item_id,price,shop\n10,1.5,a\n20,2,b\n")
    _, schema = load_interactions_source(
        SourceSpec(_csv(tmp_path / "i.csv", "user_id,item_id,timestamp,event\n1,10,1,click\n"), items=items))
    assert schema["items"] == {"price": "numeric", "shop": "categorical"}
    assert schema["roles"]["category"] == "shop" and schema["roles"]["price"] == "price"


def test_users_table_added_and_round_trip(tmp_path):
    users = _csv(tmp_path / "users.csv", "user_id,age,segment,zip\n1,30,gold,01234\n3,41,,98765\n")
    items = _csv(tmp_path / "items.csv", ITEMS_CSV)
    spec = SourceSpec(_csv(tmp_path / "i.csv", INTER_CSV), items=items, users=users,
                      item_columns={"genres": "multi", "title": "text", "launched": "timestamp"},
                      user_columns={"zip": "categorical"})
    tables, schema = load_interactions_source(spec)
    us = tables["users"].set_index("user_id")
    assert schema["users"] == {"age": "numeric", "segment": "categorical", "zip": "categorical"}
    assert list(us.index) == [1, 3, 2] and pd.isna(us.loc[2, "age"]) and us.loc[1, "segment"] == "gold"
    assert us.loc[1, "zip"] == "01234"  # named categorical: read as text, leading zero kept
    assert schema["load_report"]["users_added"] == 1
    write_raw(tables, schema, tmp_path / "raw")
    for name in ("interactions", "items", "users"):
        back = read_table(tmp_path / "raw", name)
        pd.testing.assert_frame_equal(back, tables[name], check_dtype=False)


def test_columns_that_may_not_be_features_are_warned_about(tmp_path):
    """An inferred column that is a saved row index, or a categorical with a value per row (an id, free text),
    loads, with a warning in the load report that names it and the option that keeps it for display."""
    n = 120
    lines = "\n".join(f"{i},{i + 1},note {i},gold,{30 + i % 5}" for i in range(n))
    users = _csv(tmp_path / "users.csv", "Unnamed: 0,user_id,signup_note,segment,age\n" + lines + "\n")
    inter = _csv(tmp_path / "i.csv", INTER_CSV)
    _, schema = load_interactions_source(SourceSpec(inter, users=users))
    assert [w.replace(str(tmp_path) + "/", "") for w in schema["load_report"]["warnings"]] == [
        "users.csv: column 'Unnamed: 0' looks like a saved row index, and becomes a numeric feature; drop it, or keep "
        "it for display: --user-column 'Unnamed: 0=text'",
        "users.csv: column 'signup_note' has 120 distinct values in 120 rows (an id or free text?), and becomes a "
        "categorical feature; to show it only: --user-column 'signup_note=text'"]
    _, schema = load_interactions_source(SourceSpec(inter, users=users, user_columns={"signup_note": "text",
                                                                                      "Unnamed: 0": "text"}))
    assert schema["load_report"]["warnings"] == []  # named: the user's choice


def test_string_ids_hash_every_file_alike_and_keep_the_text(tmp_path):
    """--string-ids: each id's text becomes shoprec.ids.key_id(text) in interactions, items and users alike;
    numbers count as their text (007 and 7 differ); items and users get the text as item_key / user_key, also for
    the ids only the interactions mention; the files round-trip through the raw format."""
    from shoprec.ids import key_id

    inter = _csv(tmp_path / "i.csv", "user_id,item_id,timestamp,event\nalice,SKU-007,100,click\nalice,007,101,view\n"
                                    " bob ,7,102,purchase\nbob,SKU-007,103,view\n")
    items = _csv(tmp_path / "items.csv", "item_id,price\nSKU-007,3.5\nSKU-9,2\n7,1\n")
    users = _csv(tmp_path / "users.csv", "user_id,segment\nbob,gold\n")
    tables, schema = load_interactions_source(SourceSpec(inter, items=items, users=users, string_ids=True))
    ev = tables["interactions"]
    assert ev["user_id"].tolist() == [key_id("alice"), key_id("alice"), key_id("bob"), key_id("bob")]
    assert ev["item_id"].tolist() == [key_id("SKU-007"), key_id("007"), key_id("7"), key_id("SKU-007")]
    assert key_id("007") != key_id("7")
    it = tables["items"].set_index("item_id")
    assert it.loc[key_id("SKU-9"), "item_key"] == "SKU-9" and it.loc[key_id("7"), "price"] == 1.0
    assert it.loc[key_id("007"), "item_key"] == "007" and pd.isna(it.loc[key_id("007"), "price"])  # added from interactions
    us = tables["users"].set_index("user_id")
    assert us.loc[key_id("bob"), "segment"] == "gold" and us.loc[key_id("alice"), "user_key"] == "alice"
    assert schema["items"]["item_key"] == "text" and schema["users"]["user_key"] == "text"
    assert schema["load_report"]["string_ids"] is True and schema["load_report"]["items_added"] == 1
    write_raw(tables, schema, tmp_path / "raw")
    for name in ("interactions", "items", "users"):
        pd.testing.assert_frame_equal(read_table(tmp_path / "raw", name), tables[name], check_dtype=False)
    # pandas' missing-value words are ids here ("NA", "null"); integer and UTF-8 bytes columns give their text
    from feature_workflows.sources import build_tables, Frame

    tables, _ = _load(tmp_path, "user_id,item_id,timestamp,event,device\nNA,null,100,click,NA\n", string_ids=True)
    assert tables["users"]["user_key"].tolist() == ["NA"] and tables["items"]["item_key"].tolist() == ["null"]
    assert tables["interactions"]["device"].tolist() == ["unknown"]  # other columns keep pandas' missing values
    frame = Frame(pd.DataFrame({"user_id": [b"u1", b"u2"], "item_id": np.array([7, 8]), "timestamp": [1, 2],
                                "event": "click"}), "mem")
    tables, _ = build_tables(frame, None, None, SourceSpec("mem", string_ids=True), "interactions")
    assert tables["interactions"]["user_id"].tolist() == [key_id("u1"), key_id("u2")]
    assert tables["items"]["item_key"].tolist() == [k for _, k in sorted([(key_id("7"), "7"), (key_id("8"), "8")])]
    # without an items or users file, the tables are the ids with their text
    tables, _ = load_interactions_source(SourceSpec(inter, string_ids=True))
    assert dict(zip(tables["users"]["user_id"], tables["users"]["user_key"])) == {key_id("alice"): "alice",
                                                                                  key_id("bob"): "bob"}


def test_key_id_is_stable_across_processes_and_json_safe():
    """The id of a text must not depend on the process (Python's own str hash does: PYTHONHASHSEED), or a client could
    not compute a user's id; and below 2**53, exact as a float64 and as a JSON number everywhere."""
    import os
    import subprocess
    import sys

    from shoprec.ids import KEY_BITS, key_id

    keys = ["alice", "SKU-007", "c0ffee-42", "ü-é-中文", "x" * 300]
    code = "import sys; from shoprec.ids import key_id; print(*[key_id(k) for k in sys.argv[1:]])"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, *keys], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split()
        assert [int(v) for v in out] == [key_id(k) for k in keys]
    assert KEY_BITS == 53 and all(0 <= key_id(k) < 2 ** 53 and float(key_id(k)) == key_id(k) for k in keys)
    assert len({key_id(k) for k in keys}) == len(keys) and key_id(" alice ") == key_id("alice")
    # pinned: a change of the hash would silently re-number every deployed shop's users and items
    assert key_id("alice") == int.from_bytes(__import__("hashlib").blake2b(b"alice", digest_size=8).digest(), "big") >> 11
    with pytest.raises(ValueError, match="empty text id"):
        key_id("  ")


# ---- errors: one line, naming file, row and column ------------------------------------------------

def _raises(tmp_path, text: str, pattern: str, **kw) -> str:
    with pytest.raises(RawDataError, match=pattern) as info:
        _load(tmp_path, text, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


HEAD = "user_id,item_id,timestamp,event\n"
RHEAD = "user_id,item_id,timestamp,rating\n"


def test_error_unparseable_timestamp(tmp_path):
    _raises(tmp_path, HEAD + "1,10,100,click\n1,11,yesterday,click\n",
            r"interactions\.csv: row 2: column 'timestamp': cannot parse 'yesterday' as unix seconds or ISO-8601$")
    _raises(tmp_path, HEAD + "1,10,2020-13-01,click\n", r"row 1: column 'timestamp': cannot parse '2020-13-01'")
    _raises(tmp_path, HEAD + "1,10,now,click\n", r"row 1: column 'timestamp': cannot parse 'now'")
    _raises(tmp_path, HEAD + "1,10,100,click\n1,11,,click\n", r"row 2: column 'timestamp': empty value")
    _raises(tmp_path, HEAD + "1,10,1577836800000,click\n",
            re.escape("row 1: column 'timestamp': timestamp 1577836800000 is beyond the year 5000 as unix seconds; "
                      "milliseconds? divide by 1000"))


def test_error_rating_out_of_range_and_not_numeric(tmp_path):
    _raises(tmp_path, RHEAD + "1,10,100,4\n1,11,101,7\n",
            re.escape("interactions.csv: row 2: column 'rating': rating 7 is outside the allowed range [0.5, 5.0]"))
    _raises(tmp_path, RHEAD + "1,10,100,0\n",
            re.escape("row 1: column 'rating': rating 0 is outside the allowed range [0.5, 5.0]"))
    _raises(tmp_path, RHEAD + "1,10,100,4\n1,11,101,good\n",
            re.escape("interactions.csv: row 2: column 'rating': 'good' is not a number; ratings must lie in [0.5, 5.0]"))


def test_error_ids(tmp_path):
    _raises(tmp_path, HEAD + "1,10,100,click\n-4,11,101,click\n",
            re.escape("interactions.csv: row 2: column 'user_id': negative id -4; ids must be integers >= 0; "
                      "text ids: --string-ids"))
    _raises(tmp_path, HEAD + "1,10,100,click\n1,sku-9,101,click\n",
            re.escape("interactions.csv: row 2: column 'item_id': 'sku-9' is not an integer id; "
                      "text ids: --string-ids"))
    _raises(tmp_path, HEAD + "1,10.5,100,click\n", r"row 1: column 'item_id': 10\.5 is not an integer id")
    _raises(tmp_path, HEAD + "1,10,100,click\n,11,101,click\n",
            re.escape("row 2: column 'user_id': empty value; ids must be integers >= 0"))
    _raises(tmp_path, HEAD + "1,99999999999999999999,100,click\n",
            re.escape("row 1: column 'item_id': id 99999999999999999999 does not fit int64"))
    _raises(tmp_path, HEAD + "1,9223372036854775808,100,click\n",
            re.escape("row 1: column 'item_id': id 9223372036854775808 does not fit int64"))


def test_error_string_ids(tmp_path, monkeypatch):
    """--string-ids errors: an empty id names file, row and column; two texts with one id (forced here) are refused
    naming both, inside one file and across files; an items file with its own item_key column is refused."""
    import feature_workflows.sources as sources

    _raises(tmp_path, HEAD + "alice,SKU-1,100,click\nbob, ,101,click\n",
            re.escape("interactions.csv: row 2: column 'item_id': empty value; text ids must not be empty"),
            string_ids=True)
    real = sources.key_id
    monkeypatch.setattr(sources, "key_id", lambda k: 5 if k in ("SKU-1", "SKU-2") else real(k))
    _raises(tmp_path, HEAD + "alice,SKU-1,100,click\nbob,SKU-2,101,click\n",
            re.escape("interactions.csv: column 'item_id': the text ids 'SKU-1' and 'SKU-2' hash to the same id 5; "
                      "rename one of them, or map the ids to integers yourself"), string_ids=True)
    items = _csv(tmp_path / "items.csv", "item_id,price\nSKU-2,1\n")
    with pytest.raises(RawDataError, match=re.escape("items.csv: column 'item_id': the text ids 'SKU-1' and 'SKU-2' hash "
                                                     "to the same id 5")):
        _load(tmp_path, HEAD + "alice,SKU-1,100,click\n", items=items, string_ids=True)
    monkeypatch.setattr(sources, "key_id", real)
    # a text printed in a message is quoted (one line even for a text with a line break)
    items = _csv(tmp_path / "items.csv", 'item_id,price\n"a\nb",1\n"a\nb",2\n')
    with pytest.raises(RawDataError, match=re.escape("items.csv: row 2: column 'item_id': item_id 'a\\nb' is listed "
                                                     "more than once")) as info:
        _load(tmp_path, HEAD + "alice,SKU-1,100,click\n", items=items, string_ids=True)
    assert "\n" not in str(info.value)
    # a float column would give 7.0 and 7 two ids; bytes that are not UTF-8 are not text
    pd.DataFrame({"item_id": [8.0, 9.5], "price": [1.0, 2.0]}).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(RawDataError, match=re.escape("items.parquet: column 'item_id': text ids must be text or "
                                                     "integers, not float64; store the column as text")):
        _load(tmp_path, HEAD + "alice,8,100,click\n", items=str(tmp_path / "items.parquet"), string_ids=True)
    pd.DataFrame({"user_id": [b"ok", b"\xff"], "item_id": ["a", "b"], "timestamp": [1, 2], "event": "click"}) \
        .to_parquet(tmp_path / "bytes.parquet")
    with pytest.raises(RawDataError, match=re.escape("bytes.parquet: row 2: column 'user_id': b'\\xff' is not a text id")):
        load_interactions_source(SourceSpec(str(tmp_path / "bytes.parquet"), string_ids=True))
    items = _csv(tmp_path / "items.csv", "item_id,item_key\nSKU-1,x\n")
    with pytest.raises(RawDataError, match=re.escape("items.csv: has a column 'item_key', which --string-ids writes")):
        _load(tmp_path, HEAD + "alice,SKU-1,100,click\n", items=items, string_ids=True)


def test_error_columns(tmp_path):
    _raises(tmp_path, "user_id,item,timestamp,event\n1,10,100,click\n",
            re.escape("interactions.csv: missing column(s) ['item_id']; has ['user_id', 'item', 'timestamp', 'event']"))
    _raises(tmp_path, "user_id,item_id,timestamp,event,rating\n1,10,100,click,4\n",
            re.escape("interactions.csv: has both 'event' and 'rating' columns; keep exactly one"))
    _raises(tmp_path, "user_id,item_id,timestamp,score\n1,10,100,4\n",
            re.escape("interactions.csv: needs an 'event' or a 'rating' column; has ['user_id', 'item_id', 'timestamp', "
                      "'score']"))


def test_error_unknown_event(tmp_path):
    _raises(tmp_path, HEAD + "1,10,100,click\n1,11,101,like\n",
            re.escape("interactions.csv: row 2: column 'event': unknown value 'like'; "
                      "allowed ['impression', 'view', 'click', 'cart', 'purchase']"))


def test_error_empty_and_missing_file(tmp_path):
    _raises(tmp_path, "", r"interactions\.csv: file is empty$")
    _raises(tmp_path, HEAD, r"interactions\.csv: no data rows$")
    with pytest.raises(RawDataError, match=r"nope\.csv: not found$"):
        load_interactions_source(SourceSpec(str(tmp_path / "nope.csv")))
    with pytest.raises(RawDataError, match=r"inter\.json: unsupported file type"):
        load_interactions_source(SourceSpec(_csv(tmp_path / "inter.json", "{}")))


def test_error_rows_counted_with_blank_lines(tmp_path):
    # "row N" is the data row (header not counted), blank lines included: a blank line inside the
    # file is a row without values; trailing blank lines are ignored.
    _raises(tmp_path, HEAD + "1,10,100,click\n\n1,x,101,click\n", r"row 2: column 'user_id': empty value")
    _raises(tmp_path, HEAD + "1,10,100,click\n1,x,101,click\n\n\n", r"row 2: column 'item_id': 'x' is not")
    assert len(_load(tmp_path, HEAD + "1,10,100,click\n\n\n")[0]["interactions"]) == 1


def test_error_item_attribute_values(tmp_path):
    inter = _csv(tmp_path / "i.csv", INTER_CSV)
    items = _csv(tmp_path / "items.csv", "item_id,price\n10,1\n20,cheap\n")
    with pytest.raises(RawDataError, match=re.escape("items.csv: row 2: column 'price': cannot parse 'cheap' as a number")):
        load_interactions_source(SourceSpec(inter, items=items, item_columns={"price": "numeric"}))
    items = _csv(tmp_path / "items.csv", "item_id,price\n10,1\n10,2\n")
    with pytest.raises(RawDataError, match=re.escape("items.csv: row 2: column 'item_id': item_id 10 is listed more than once")):
        load_interactions_source(SourceSpec(inter, items=items))
    items = _csv(tmp_path / "items.csv", "item_id,made\n10,soon\n")
    with pytest.raises(RawDataError, match=re.escape("items.csv: row 1: column 'made': cannot parse 'soon' as unix seconds")):
        load_interactions_source(SourceSpec(inter, items=items, item_columns={"made": "timestamp"}))


def test_a_price_that_is_not_a_number_is_an_error_not_a_category(tmp_path):
    """A column named price (or --price-column) is numeric unless named otherwise: a decimal comma or a currency sign
    is an error naming its row, where inferring the kind would have made prices categories and the role vanish."""
    inter = _csv(tmp_path / "i.csv", INTER_CSV)
    items = _csv(tmp_path / "items.csv", "item_id,price,cost\n10,12.5,1\n20,\"78,19\",$3\n")
    with pytest.raises(RawDataError, match=re.escape("items.csv: row 2: column 'price': cannot parse '78,19' as a number")):
        load_interactions_source(SourceSpec(inter, items=items))
    with pytest.raises(RawDataError, match=re.escape("items.csv: row 2: column 'cost': cannot parse '$3' as a number")):
        load_interactions_source(SourceSpec(inter, items=items, price_column="cost"))
    _, schema = load_interactions_source(SourceSpec(inter, items=items, item_columns={"price": "categorical"}))
    assert schema["items"]["price"] == "categorical" and schema["roles"]["price"] is None  # named so: the user's choice
    items = _csv(tmp_path / "items.csv", "item_id,price\n10,12.5\n20,3\n")
    _, schema = load_interactions_source(SourceSpec(inter, items=items))
    assert schema["items"]["price"] == "numeric" and schema["roles"]["price"] == "price"


def test_a_spreadsheet_csv_separated_by_semicolons_is_read(tmp_path):
    text = "user_id;item_id;timestamp;event\n1;10;100;click\n2;11;101;view\n"
    tables, _ = _load(tmp_path, text)
    assert list(tables["interactions"].item_id) == [10, 11] and list(tables["interactions"].event) == ["click", "view"]
    with pytest.raises(RawDataError, match=re.escape("missing column(s) ['timestamp']")):
        _load(tmp_path, "user_id;item_id;time;event\n1;10;100;click\n")  # read by its separator, then checked


def test_error_kind_for_absent_column(tmp_path):
    inter = _csv(tmp_path / "i.csv", INTER_CSV)
    items = _csv(tmp_path / "items.csv", "item_id,genres\n10,A\n")
    with pytest.raises(RawDataError, match=re.escape("items.csv: item_columns names column(s) ['genre'], which the items "
                                                     "table lacks; has ['item_id', 'genres']")):
        load_interactions_source(SourceSpec(inter, items=items, item_columns={"genre": "multi"}))
    with pytest.raises(RawDataError, match=re.escape("user_columns names ['age'] but no users file was given")):
        load_interactions_source(SourceSpec(inter, user_columns={"age": "numeric"}))
    with pytest.raises(RawDataError, match=re.escape("item_columns: unknown column kind(s) {'genres': 'list'}")):
        load_interactions_source(SourceSpec(inter, items=items, item_columns={"genres": "list"}))
    with pytest.raises(RawDataError, match=re.escape("items.csv: row 1: column 'genres': cannot parse 'A' as a number")):
        load_interactions_source(SourceSpec(inter, items=items, price_column="genres"))  # the price role is numeric
    with pytest.raises(RawDataError, match=re.escape("price_column 'genres' is categorical; it must be numeric")):
        load_interactions_source(SourceSpec(inter, items=items, price_column="genres", item_columns={"genres": "categorical"}))
    with pytest.raises(RawDataError, match=re.escape("category_column 'kind' is not an item attribute")):
        load_interactions_source(SourceSpec(inter, items=items, category_column="kind"))


def test_parse_column_kinds():
    assert parse_column_kinds(["genres=multi", " title = text "]) == {"genres": "multi", "title": "text"}
    assert parse_column_kinds([]) == {}
    for bad in ("genres:multi", "genres=list", "=text"):
        with pytest.raises(RawDataError, match=re.escape(f"column kind {bad!r}: expected COLUMN=KIND with KIND one of "
                                                         "['categorical', 'numeric', 'multi', 'text', 'timestamp']")):
            parse_column_kinds([bad])
    with pytest.raises(RawDataError, match=r"column kind 'a=text': column 'a' is given a kind twice"):
        parse_column_kinds(["a=multi", "a=text"])


def test_vectorised_on_many_rows(tmp_path):
    # 200k rows load without per-row Python work (a loop over rows would take far longer than this bound).
    import time

    n = 200_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": rng.integers(0, 5000, n), "item_id": rng.integers(0, 3000, n),
                       "timestamp": rng.integers(10**9, 10**9 + 10**7, n), "rating": rng.integers(1, 11, n) / 2})
    df.to_csv(tmp_path / "big.csv", index=False)
    start = time.perf_counter()
    tables, schema = load_interactions_source(SourceSpec(str(tmp_path / "big.csv")))
    assert time.perf_counter() - start < 20
    report = schema["load_report"]
    assert report["rows_kept"] == df.drop_duplicates(["user_id", "item_id"]).shape[0]
    assert report["events"] == len(tables["interactions"])
