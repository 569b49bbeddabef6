import dataclasses
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from app.cli import build_parser
from shoprec.config import Config, load_config

COMMANDS = ["data", "features", "train", "export", "evaluate", "serve", "events", "items", "recommend", "bench", "all"]


def test_help_lists_every_stage():
    text = build_parser().format_help()
    for c in COMMANDS:
        assert c in text


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command):
    out = subprocess.run([sys.executable, "-m", "app.cli", command, "--help"], capture_output=True, text=True, check=True)
    assert "usage: shoprec" in out.stdout and command in out.stdout


def test_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[serve]\nnum_candidate = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_candidate'\]"):
        load_config(p)


def test_default_file_and_dataclass_defaults_agree():
    # a partial config file falls back to the dataclass defaults: they must be the shipped defaults
    assert load_config() == Config()
    assert dataclasses.asdict(load_config())["serve"]["num_candidates"] == 300


def test_bad_input_is_one_line_naming_file_row_and_column(tmp_path):
    """... and leaves no earlier data set behind for `features` to take for the new one."""
    good, bad = tmp_path / "good.csv", tmp_path / "events.csv"
    good.write_text("user_id,item_id,timestamp,event\n1,2,1700000000,click\n")
    bad.write_text("user_id,item_id,timestamp,event\n1,2,1700000000,click\n1,3,yesterday,view\n")
    base = [sys.executable, "-m", "app.cli", "--artifacts", str(tmp_path / "a")]
    assert subprocess.run(base + ["data", "--source", "interactions", "--interactions", str(good)]).returncode == 0
    assert (tmp_path / "a" / "data" / "raw" / "schema.json").is_file()
    out = subprocess.run(base + ["data", "--source", "interactions", "--interactions", str(bad)], capture_output=True,
                         text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "events.csv: row 2: column 'timestamp'" in lines[0] and lines[0].startswith("shoprec data: error:")
    assert not list((tmp_path / "a" / "data" / "raw").rglob("*.*"))  # good.csv's tables are gone with its schema
    out = subprocess.run(base + ["features"], capture_output=True, text=True)
    assert out.returncode == 2 and "run `shoprec data` first" in out.stderr, out.stderr


def test_a_rating_scale_not_ending_at_5_needs_its_own_thresholds(tmp_path):
    """--rating-range 1 10 with the star thresholds (4, 5) would label most ratings positive: one line, exit 2."""
    ratings = tmp_path / "r.csv"
    ratings.write_text("user_id,item_id,timestamp,rating\n1,2,1700000000,9\n1,3,1700000001,3\n")
    cmd = [sys.executable, "-m", "app.cli", "--artifacts", str(tmp_path / "a"), "data", "--source", "interactions",
           "--interactions", str(ratings), "--rating-range", "1", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == (
        "shoprec data: error: rating_range [1.0, 10.0]: set the thresholds on that scale (--positive-threshold, "
        "--strong-threshold); the defaults 4 and 5 are for [0.5, 5.0] stars")
    out = subprocess.run(cmd + ["--positive-threshold", "7", "--strong-threshold", "9"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ratings.write_text("user_id,item_id,timestamp,rating\n1,2,1700000000,4\n1,3,1700000001,1\n")
    out = subprocess.run(cmd[:-2] + ["1", "5"], capture_output=True, text=True)  # a 1-5 scale: the stars' thresholds fit
    assert out.returncode == 0, out.stderr


def test_events_read_the_loaders_event_column_as_type():
    import io

    from app.events import EventsError, read_events

    rows = list(read_events(io.StringIO("user_id,item_id,event,timestamp\n1,2,click,5\n"), "csv"))
    assert rows == [(2, {"user_id": "1", "item_id": "2", "type": "click", "timestamp": "5"})]
    rows = list(read_events(io.StringIO('{"user_id": 1, "item_id": 2, "event": "view", "timestamp": 5}\n'), "jsonl"))
    assert rows == [(1, {"user_id": 1, "item_id": 2, "type": "view", "timestamp": 5})]
    with pytest.raises(EventsError, match=re.escape("CSV header lacks type (has: user_id, item_id, timestamp)")):
        list(read_events(io.StringIO("user_id,item_id,timestamp\n1,2,5\n"), "csv"))


@pytest.mark.parametrize("text,delimiter", [
    ("user_id\titem_id\ttype\ttimestamp\n1\t2\tclick\t5\n", "\t"),  # a .tsv file
    ("user_id\titem_id\ttype\ttimestamp\n1\t2\tclick\t5\n", None),  # tabs found in the header
    ("user_id;item_id;type;timestamp\n1;2;click;5\n", None),  # a spreadsheet's export
    ("user_id, item_id, type, timestamp\n1,2,click,5\n", None),  # spaces after the header's commas
])
def test_events_csv_reads_what_shoprec_data_reads(text, delimiter):
    import io

    from app.events import read_events

    assert list(read_events(io.StringIO(text), "csv", delimiter)) == [
        (2, {"user_id": "1", "item_id": "2", "type": "click", "timestamp": "5"})]


def test_events_name_lines_bad_json_objects_and_text_ids(tmp_path):
    import io

    from app.events import read_events, text_ids

    text = '"just a string"\n[1, 2]\n{"user_id": 1, "item_id": 2, "type": "view", "timestamp": 5}\n'
    assert [r for _, r in read_events(io.StringIO(text), "jsonl")][:2] == [
        "not a JSON object with user_id, item_id, type, timestamp (a str)",
        "not a JSON object with user_id, item_id, type, timestamp (a list)"]
    quoted = 'user_id,item_id,type,timestamp\n"a\nb",2,view,5\n1,2,view,6\n'  # a quoted field over two lines
    assert [n for n, _ in read_events(io.StringIO(quoted), "csv")] == [3, 4]
    assert text_ids({"item_id": "sku-1", "type": "view", "timestamp": 5}) == "missing user_id"
    path = tmp_path / "bom.csv"  # a spreadsheet's byte-order mark before the header
    path.write_bytes("user_id,item_id,type,timestamp\n1,2,view,5\n".encode("utf-8-sig"))
    with path.open(encoding="utf-8-sig", newline="") as fh:
        assert [e["user_id"] for _, e in read_events(fh, "csv")] == ["1"]


def test_string_ids_need_your_own_files_and_a_text_user_key(tmp_path):
    """--string-ids with the synthetic shop or MovieLens would do nothing: refused in one line; so is an empty
    --user-key (before any connection)."""
    out = subprocess.run([sys.executable, "-m", "app.cli", "--artifacts", str(tmp_path / "a"), "data", "--source",
                          "synthetic", "--size", "tiny", "--string-ids"], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "shoprec data: --string-ids applies to --source interactions (your own files), not synthetic"
    out = subprocess.run([sys.executable, "-m", "app.cli", "recommend", "--user-key", " "], capture_output=True, text=True)
    assert out.returncode != 0 and out.stderr.strip() == "shoprec recommend: --user-key: empty text id"


@pytest.mark.parametrize("argv,code,line", [
    (["--user", "1", "-k", str(2**32 + 5)], 2,  # numpy would have wrapped it to k = 5
     f"k must be an integer in the INT32 range [-2147483648, 2147483647], got {2**32 + 5}"),
    (["--user", str(2**63)], 2, f"user_id must be an integer in the INT64 range [{-2**63}, {2**63 - 1}], got {2**63}"),
    (["--user", "1", "--context", str(10**20)], 2, f"context_item_ids must be an integer in the INT64 range [{-2**63}, {2**63 - 1}], got {10**20}"),
    (["--user", "1", "--protocol", "http"], 1, "cannot reach 127.0.0.1:{port} over http: [Errno 111] Connection refused"),
])
def test_recommend_refuses_values_outside_the_wire_types_and_names_an_unreachable_server(argv, code, line):
    """Checked before anything is sent, one line each (exit 2, bad input); nothing listening: one line, exit 1."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, "-m", "app.cli", "recommend", "--url", f"127.0.0.1:{port}", *argv],
                         capture_output=True, text=True)
    assert (out.returncode, out.stderr.strip()) == (code, "shoprec recommend: error: " + line.format(port=port))


def test_events_with_text_ids_are_hashed_as_the_loader_hashed_them():
    """`shoprec events --string-ids`: user_id and item_id become key_id(text) (an integer counts as its decimal text,
    as in the loader); a float, a boolean or an empty id is the event's rejection reason."""
    from app.events import text_ids
    from shoprec.ids import key_id

    event = {"user_id": "c0ffee-42", "item_id": 7, "type": "click", "timestamp": 1}
    assert text_ids(event) is None and event == {"user_id": key_id("c0ffee-42"), "item_id": key_id("7"), "type": "click",
                                                 "timestamp": 1}
    assert text_ids({"user_id": "u", "item_id": 7.0}) == "item_id 7.0 is not a text id (text or an integer)"
    assert text_ids({"user_id": True, "item_id": "a"}) == "user_id True is not a text id (text or an integer)"
    assert text_ids({"user_id": " ", "item_id": "a"}) == "user_id ' ' is not a text id (text or an integer)"
    assert text_ids({"item_id": "a"}) == "missing user_id"


def test_items_take_integer_or_text_ids():
    """`shoprec items --unavailable/--available`: integers, or with --string-ids text ids as key_id(text); anything
    else is a one-line error naming the option, before any store is opened."""
    from app.events import EventsError, item_ids
    from shoprec.ids import key_id

    assert item_ids(["5000017", " 7 "], False, "--unavailable") == [5000017, 7]
    with pytest.raises(EventsError, match=re.escape(f"--unavailable '{10**20}' does not fit in int64")):
        item_ids([str(10**20)], False, "--unavailable")  # once a traceback from the store
    assert item_ids(["sku-1", "7"], True, "--unavailable") == [key_id("sku-1"), key_id("7")]
    assert item_ids(None, False, "--available") == []
    with pytest.raises(EventsError, match=re.escape("--unavailable: 'sku-1' is not an integer item id (text ids: "
                                                    "--string-ids)")):
        item_ids(["sku-1"], False, "--unavailable")
    with pytest.raises(EventsError, match="--available: empty text id"):
        item_ids([" "], True, "--available")


def test_evaluate_scores_every_system_with_standard_errors_and_keeps_reports(artifacts, cfg, tmp_path):
    import json

    from training.evaluate import EvaluationError, evaluate

    report = evaluate(artifacts / "features", artifacts / "serving", tmp_path, cfg, tag="t", progress=False)
    warm = {name: r["warm"] for name, r in report["results"].items()}
    assert {"popularity", "als", "item_knn", "ease", "two_tower", "served_pipeline", "merged_order"} <= set(warm)
    for figures in warm.values():
        for metric in ("recall@10", "recall@50", "recall@100", "ndcg@10", "hitrate@10", "diversity@10", "novelty@10"):
            assert 0 <= figures[metric]["mean"] and figures[metric]["se"] >= 0
    assert warm["served_pipeline"]["ndcg@10"]["mean"] > warm["popularity"]["ndcg@10"]["mean"]
    assert json.loads((tmp_path / "quality_t.json").read_text())["dataset"] == "t"
    assert (tmp_path / "quality_t.md").read_text().count("served_pipeline") >= 1 and (tmp_path / "quality_t.png").exists()
    with pytest.raises(EvaluationError, match="quality_t.json exists; pass --tag NAME"):
        evaluate(artifacts / "features", artifacts / "serving", tmp_path, cfg, tag="t")


def test_item_knn_neighbours_are_capped_by_the_catalog_size(artifacts, cfg, monkeypatch):
    """K x items stays under evaluate.KNN_MAX_SLOTS: a big catalog's item-kNN baseline gets fewer neighbours
    (the grid's points over the cap are dropped; with none left, the cap itself, at least 10)."""
    from training import evaluate as ev
    from training.data import FeatureData

    data = FeatureData(artifacts / "features")
    train, users, truth = ev.test_users(data)
    seen = ev._seen(users, train, data.n_items)
    base = ev.Baselines(data, train, cfg)
    monkeypatch.setattr(ev, "KNN_MAX_SLOTS", 200 * data.n_items)
    valid = (users, truth, seen)
    assert base.run("item_knn", users, seen, valid)[1]["params"]["K"] in (50, 200)
    monkeypatch.setattr(ev, "KNN_MAX_SLOTS", 30 * data.n_items)
    top, info = base.run("item_knn", users, seen, valid)
    assert info["params"] == {"K": 30} and top.shape == (len(users), ev.TOPN)


def test_evaluate_reports_the_ranker_without_the_prior_beside_the_served_lists(artifacts, cfg, tmp_path):
    """With a popularity prior in the bundle, evaluate also scores the ranker's own order (w = 0), so the prior's
    effect sits in the same report; the served lists follow the prior. (A copy of the bundle with w = 4.)"""
    import json

    from shoprec.manifest import read_manifest, write_manifest
    from training.data import FeatureData
    from training.evaluate import served_lists, test_users

    bundle = tmp_path / "bundle"
    shutil.copytree((artifacts / "serving").resolve(), bundle)
    dims = json.loads((bundle / "contract.json").read_text())
    (bundle / "contract.json").write_text(json.dumps({**dims, "popularity_prior": 4.0}))
    old = read_manifest(bundle)
    write_manifest(bundle, extra={k: old[k] for k in ("stage", "bundle_version", "report") if k in old})
    _, users, _ = test_users(FeatureData(artifacts / "features"))
    full, extra, _ = served_lists(bundle, users[:50], cfg)
    assert (extra["ranker_without_prior"] != full).any()
    pop = FeatureData(artifacts / "features").items["popularity"]
    assert pop[np.maximum(full[:, :10], 0)].mean() > pop[np.maximum(extra["ranker_without_prior"][:, :10], 0)].mean()
    _, extra0, _ = served_lists((artifacts / "serving").resolve(), users[:50], cfg)
    chosen = json.loads((artifacts / "serving" / "contract.json").read_text())["popularity_prior"]
    assert ("ranker_without_prior" in extra0) == (chosen > 0)  # only a bundle with a prior gets the row
