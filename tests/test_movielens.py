"""MovieLens loaders on small fixture files written in the official layouts (no MovieLens data is shipped)."""

import numpy as np
import pytest

from feature_workflows.movielens import load_ml1m, load_ml100k, write_raw
from feature_workflows.raw_schema import RawDataError, read_table

GENRES = "|".join(["0"] * 19)


def _ml100k(d):
    d.mkdir()
    (d / "u.data").write_text("1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t891717742\n2\t30\t1\t878887116\n")
    g = ["0"] * 19
    g[1] = "1"  # Action
    g2 = ["0"] * 19
    g2[5] = "1"  # Comedy
    (d / "u.item").write_text(
        f"10|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(g)}\n"
        f"20|GoldenEye (1995)|01-Jan-1995||http://x|{'|'.join(g2)}\n"
        f"30|Four Rooms (1995)|01-Jan-1995||http://x|{GENRES}\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return d


def _ml1m(d):
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (d / "movies.dat").write_text("1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation|Children's|Musical\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    return d


def test_ml100k_mapping(tmp_path):
    t = load_ml100k(_ml100k(tmp_path / "ml"))
    inter = t["interactions"]
    assert (inter.event == "impression").sum() == 4
    assert sorted(inter[inter.event == "click"].item_id) == [10, 10]  # ratings 5 and 4
    assert list(inter[inter.event == "purchase"].item_id) == [10]  # rating 5 only
    items = t["items"].set_index("item_id")
    assert items.loc[10, "category"] == "Action" and items.loc[20, "category"] == "Comedy"
    assert items.loc[30, "category"] == "unknown" and items.loc[10, "brand"] == "1990s"
    assert np.isnan(items.price).all()
    assert list(t["users"].region) == ["zip_8", "zip_9"]


def test_ml1m_mapping_and_round_trip(tmp_path):
    t = load_ml1m(_ml1m(tmp_path / "ml"))
    assert t["items"].set_index("item_id").loc[661, "category"] == "Animation"
    assert t["users"].set_index("user_id").loc[2, "age"] == 60
    write_raw(t, tmp_path / "raw")
    back = read_table(tmp_path / "raw", "interactions")
    assert len(back) == len(t["interactions"]) and set(back.event) == {"impression", "click", "purchase"}


def test_missing_file_named(tmp_path):
    d = _ml100k(tmp_path / "ml")
    (d / "u.user").unlink()
    with pytest.raises(RawDataError, match="u.user"):
        load_ml100k(d)


def test_empty_and_malformed_files_named(tmp_path):
    d = _ml100k(tmp_path / "ml")
    (d / "u.data").write_text("")
    with pytest.raises(RawDataError, match=r"u.data: file is empty"):
        load_ml100k(d)
    (d / "u.data").write_text("1\tten\t5\t881250949\n")
    with pytest.raises(RawDataError, match=r"u.data: column 'item_id' has a non-integer value 'ten'"):
        load_ml100k(d)
