"""End to end on small files the test writes itself, in each MovieLens layout and in the generic
format: `shoprec data / features / train / export` through the CLI, then a real tritonserver.
Checks: finite training losses, ONNX parity, served lists equal the in-process lists, and no item
the user interacted with in any served list."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from shoprec.config import DEFAULT_CONFIG

pytestmark = pytest.mark.integration

N_USERS, N_ITEMS, PER_USER = 90, 60, 28
GENRES = ["Action", "Comedy", "Drama", "Horror"]


def planted_ratings(seed: int = 0):
    """Users of four tastes rate items of their genre high and the others low, over a year."""
    rng = np.random.default_rng(seed)
    item_genre = np.arange(N_ITEMS) % 4
    rows = []
    for u in range(1, N_USERS + 1):
        taste = u % 4
        items = rng.choice(N_ITEMS, PER_USER, replace=False)
        for i in items:
            good = item_genre[i] == taste
            rating = rng.choice([4, 5]) if good and rng.random() < 0.85 else rng.choice([1, 2, 3])
            rows.append((u, int(i) + 1, int(rating), 1_000_000_000 + int(rng.integers(0, 365 * 86400))))
    return rows, item_genre


def write_layout(layout: str, d):
    rows, item_genre = planted_ratings()
    d.mkdir(parents=True)
    titles = [f"Movie {i} (19{70 + i % 30})" for i in range(1, N_ITEMS + 1)]
    if layout == "movielens-100k":
        (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
        flags = lambda g: "|".join("1" if j == 1 + [1, 5, 8, 11][g] else "0" for j in range(19))  # noqa: E731
        (d / "u.item").write_text("".join(f"{i}|{titles[i - 1]}|01-Jan-1995||http://x|{flags(item_genre[i - 1])}\n"
                                          for i in range(1, N_ITEMS + 1)))
        (d / "u.user").write_text("".join(f"{u}|{20 + u % 40}|{'MF'[u % 2]}|other|{u % 10}0000\n" for u in range(1, N_USERS + 1)))
        return ["--source", layout, "--movielens-dir", str(d)]
    if layout == "movielens-1m":
        (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
        (d / "movies.dat").write_text("".join(f"{i}::{titles[i - 1]}::{GENRES[item_genre[i - 1]]}\n" for i in range(1, N_ITEMS + 1)))
        (d / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::25::{u % 20}::{u % 10}0000\n" for u in range(1, N_USERS + 1)))
        return ["--source", layout, "--movielens-dir", str(d)]
    if layout == "movielens-latest-small":
        (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
            f"{u},{i},{r - 0.5 if r == 5 and u % 3 == 0 else r},{t}\n" for u, i, r, t in rows))  # half stars too
        (d / "movies.csv").write_text("movieId,title,genres\n" + "".join(
            f'{i},"{titles[i - 1].replace("Movie", "Movie, The")}",{GENRES[item_genre[i - 1]]}|Drama\n' for i in range(1, N_ITEMS + 1)))
        return ["--source", layout, "--movielens-dir", str(d)]
    # the generic format: events with ISO timestamps, items with a multi-valued and a numeric column;
    # "generic-string-ids": the same with text ids (user "u007", item "sku-0042"), loaded with --string-ids
    text = layout == "generic-string-ids"
    uid = (lambda u: f"u{u:03d}") if text else (lambda u: u)  # noqa: E731
    iid = (lambda i: f"sku-{i:04d}") if text else (lambda i: i)  # noqa: E731
    events = {1: "view", 2: "view", 3: "view", 4: "click", 5: "purchase"}
    (d / "events.csv").write_text("user_id,item_id,timestamp,event\n" + "".join(
        f"{uid(u)},{iid(i)},{np.datetime64(t, 's')}Z,{events[r]}\n" for u, i, r, t in rows))
    (d / "items.csv").write_text("item_id,genres,price,title\n" + "".join(
        f"{iid(i)},{GENRES[item_genre[i - 1]]}|Drama,{5 + i % 7}.5,{titles[i - 1]}\n" for i in range(1, N_ITEMS + 1)))
    (d / "users.csv").write_text("user_id,segment\n" + "".join(f"{uid(u)},s{u % 3}\n" for u in range(1, N_USERS + 1)))
    return ["--source", "interactions", "--interactions", str(d / "events.csv"), "--items", str(d / "items.csv"),
            "--users", str(d / "users.csv"), "--item-column", "genres=multi", "--item-column", "title=text",
            *(["--string-ids"] if text else [])]


def write_config(path, **sections):
    """The default config with some keys changed (TOML written back, flat sections)."""
    cfg = tomllib.loads(DEFAULT_CONFIG.read_text())
    for section, values in sections.items():
        cfg[section].update(values)

    def fmt(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    path.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {fmt(v)}" for k, v in kv.items()) + "\n" for s, kv in cfg.items()))
    return path


@pytest.mark.parametrize("layout", ["movielens-100k", "movielens-1m", "movielens-latest-small", "generic",
                                    "generic-string-ids"])
def test_end_to_end(layout, tmp_path, capsys):
    from client import RecommenderClient
    from feature_workflows.raw_schema import read_table
    from runtime.pipeline import Pipeline
    from runtime.request_transform import UserStore
    from serving.launcher import TritonServer
    from shoprec.config import load_config
    from shoprec.manifest import verify_manifest

    config = write_config(tmp_path / "test.toml", retrieval={"epochs": 3, "patience": 1, "batch_size": 128},
                          ranking={"steps": 150})
    art = tmp_path / "artifacts"
    base = ["--config", str(config), "--artifacts", str(art), "--quiet"]
    assert main(base + ["data", *write_layout(layout, tmp_path / "files")]) == 0
    for stage in (["features", "--deploy"], ["train", "--device", "cpu"], ["export"]):
        assert main(base + stage) == 0, stage
    assert main(base + ["evaluate"]) == 2  # everything trained: nothing held out to evaluate on (one-line error)

    report = json.loads((art / "models" / "train_report.json").read_text())
    losses = [h["loss"] for part in ("retrieval_stage_a", "retrieval", "ranking") for h in report[part]["history"]]
    assert losses and np.isfinite(losses).all()
    assert max(verify_manifest(art / "serving")["report"]["onnx_max_abs_diff"].values()) < 1e-4

    cfg = load_config(config)
    store = UserStore.load(art / "serving" / "user_store.npz")
    pipe = Pipeline(art / "serving", cfg=cfg.serve)
    item_ids = pipe.item_table["item_ids"]
    assert len(store.user_id) == N_USERS
    with TritonServer.from_config(cfg.serve, art, ephemeral_ports=True, config_path=config) as server:
        with RecommenderClient(server.grpc_url) as c:
            for row, user in enumerate(store.user_id):
                served = c.recommend(int(user), k=20)
                seen = set(item_ids[store.history(row)[0]].tolist())
                assert seen and not seen & set(served.item_ids.tolist()), user
                if row % 15 == 0:
                    np.testing.assert_array_equal(served.item_ids, pipe.recommend([user], 20)[0][0])
            if layout == "generic-string-ids":  # a user asked for by their text id; items shown by theirs
                from client import key_id

                assert key_id("u007") in set(store.user_id.tolist())
                served = c.recommend(key_id("u007"), k=5)
                assert len(served.item_ids) == 5 and not served.cold_start
                keys = dict(zip(*(read_table(art / "data" / "raw", "items")[c] for c in ("item_id", "item_key"))))
                assert all(keys[i].startswith("sku-") for i in served.item_ids.tolist())
                from client.cli import item_details

                assert list(item_details(art)["columns"])[:2] == ["category", "item_key"]  # `shoprec recommend` shows it
        if layout == "generic-string-ids":  # the CLI by text ids: a user and the item they are looking at
            capsys.readouterr()
            assert main(base + ["recommend", "--user-key", "u007", "--context-key", "sku-0001", "--scene", "item_detail",
                                "-k", "3", "--url", server.grpc_url]) == 0
            table = capsys.readouterr().out.splitlines()
            assert table[0].startswith(f"user {key_id('u007')}: 3 items") and "item_key" in table[1]
            assert all(" sku-" in line for line in table[2:5]), table
            for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):  # refused as invalid: exit 2
                with pytest.raises(SystemExit) as exit_:
                    main(base + ["recommend", "--user-key", "u007", "-k", "100000", "--url", url, "--protocol", protocol])
                assert exit_.value.code == 2
                err = capsys.readouterr().err.strip().splitlines()
                assert len(err) == 1 and err[0].startswith("shoprec recommend: error: ") and "k must be <=" in err[0], err


def _events_csv(path, n_users: int, per_user: int, stamp=None, seed: int = 0):
    """Planted tastes as events; `stamp(ts)` rewrites the timestamps (coarse clocks)."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, n_users + 1):
        for _ in range(per_user):
            item = int(rng.choice(np.arange(u % 4, N_ITEMS, 4))) + 1 if rng.random() < 0.8 else int(rng.integers(1, N_ITEMS + 1))
            ts = 1_709_251_200 + int(rng.integers(0, 30 * 86400))
            lines.append(f"{u},{item},{stamp(ts) if stamp else ts},{rng.choice(['view', 'click', 'purchase'], p=[.5, .4, .1])}")
    path.write_text("user_id,item_id,timestamp,event\n" + "\n".join(lines) + "\n")
    return str(path)


def test_small_and_coarse_data_train_or_say_why(tmp_path, capsys, caplog):
    """What a new user's first sample looks like: 30 users of 10 events train (a ranker from 3 lists: one kept to
    check it, never none); events that all share one timestamp cannot be split in time, and the one-line error says
    so and what to use; dates without times leave no valid period: a warning says so, and evaluate says its baselines
    are untuned, names its report after the data's source, and shows category figures as n/a without a category."""
    config = write_config(tmp_path / "fast.toml", retrieval={"epochs": 2, "patience": 1, "batch_size": 128,
                                                            "whole_history_share": [0.5]}, ranking={"steps": 50})

    def run(name, csv, *stages):
        base = ["--config", str(config), "--artifacts", str(tmp_path / name), "--quiet"]
        codes = [main(base + ["data", "--source", "interactions", "--interactions", csv])]
        for stage in stages:
            codes.append(main(base + stage))
            if codes[-1]:
                break
        return codes, tmp_path / name

    codes, art = run("tiny", _events_csv(tmp_path / "tiny.csv", 30, 10), ["features"], ["train", "--device", "cpu"])
    assert codes == [0, 0, 0]
    lists = json.loads((art / "models" / "train_report.json").read_text())["ranking"]["lists"]
    assert lists["valid_users"] >= 1 and lists["train_users"] >= 1

    day = lambda ts: "2024-03-01"  # noqa: E731
    codes, _ = run("one_day", _events_csv(tmp_path / "one_day.csv", 60, 8, day), ["features"])
    assert codes == [0, 2]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the 'time' split left no training actions" in err and "1 distinct timestamp(s)" in err
    assert err.endswith("use --split random or user-time, or --deploy")

    # views only: `data` warns, and `features` says that no action is a positive (more data would not help), with or
    # without a split (--deploy once ended in an NVTabular traceback)
    views = Path(_events_csv(tmp_path / "views.csv", 30, 10))
    views.write_text(views.read_text().replace(",click", ",view").replace(",purchase", ",view"))
    codes, _ = run("views", str(views), ["features"])
    err = capsys.readouterr().err
    assert codes == [0, 2] and "shoprec data: warning: no event is a positive (a click, cart or purchase" in err
    assert re.search(r"none of the \d+ actions is a positive .* lower `shoprec data --positive-threshold`$",
                     err.strip().splitlines()[-1])
    codes, _ = run("views_deploy", str(views), ["features", "--deploy"])
    assert codes == [0, 2] and re.search(r"none of the \d+ actions is a positive", capsys.readouterr().err)

    dates = lambda ts: str(np.datetime64(1_709_251_200 + ts % (4 * 86400), "s"))[:10]  # noqa: E731
    with caplog.at_level("WARNING", logger="shoprec.features"):
        codes, art = run("dates", _events_csv(tmp_path / "dates.csv", 120, 10, dates), ["features"],
                         ["train", "--device", "cpu"], ["export"], ["evaluate"])
    assert codes == [0, 0, 0, 0, 0]
    assert any("split left no valid actions" in r.getMessage() and "4 distinct timestamp(s)" in r.getMessage()
               for r in caplog.records)
    report = json.loads((art / "results" / "quality_interactions.json").read_text())
    assert report["baselines_tuned"] is False and "the split left no valid users to tune on" in report["protocol"]
    # no item table, so no category: diversity is unknown (n/a), not 0, and the category route, empty, is left out
    assert report["results"]["served_pipeline"]["warm"]["diversity@10"]["mean"] is None
    assert "route_category" in report["routes_without_items"] and "route_category" not in report["results"]
    md = (art / "results" / "quality_interactions.md").read_text()
    assert "| n/a |" in md and "left out): route_category" in md


def test_a_rating_scale_of_your_own(tmp_path):
    """Ratings 1-10: refused with the default scale (the message names the flag), loaded with --rating-range 1 10,
    --positive-threshold 7 and --strong-threshold 9."""
    rows = [(u, i, r, 1_700_000_000 + u * 100 + i) for u in range(1, 21) for i, r in zip(range(1, 6), (10, 9, 7, 6, 2))]
    csv = tmp_path / "r.csv"
    csv.write_text("user_id,item_id,timestamp,rating\n" + "".join(f"{u},{i},{t},{r}\n" for u, i, r, t in rows))
    base = ["--artifacts", str(tmp_path / "a"), "--quiet", "data", "--source", "interactions", "--interactions", str(csv)]
    assert main(base) == 2
    assert main(base + ["--rating-range", "1", "10", "--positive-threshold", "7", "--strong-threshold", "9"]) == 0
    from feature_workflows.raw_schema import read_table

    events = read_table(tmp_path / "a" / "data" / "raw", "interactions")["event"].value_counts().to_dict()
    assert events == {"view": 100, "click": 60, "purchase": 40}  # ratings 10, 9, 7 click; 10, 9 purchase
