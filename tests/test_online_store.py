"""The online store against a real redis-server: event validation, idempotency, order, memory bounds,
and point-in-time consistency (events replayed into Redis give the features the offline pipeline
computes for the same moment, row by row)."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feature_workflows.history import KIND, NEVER, ActionLog
from runtime.online_store import IngestReport, OnlineStore, OnlineStoreError
from runtime.request_transform import UserStore, raw_rows
from runtime.user_state import pack, unpack, user_state

NAMES = {v: k for k, v in KIND.items()}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from serving.online import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("online")).start()
    yield server.url
    server.stop()


def test_the_private_redis_starts_from_a_relative_data_folder(tmp_path, monkeypatch):
    """redis-server opens its log file after moving into its data folder: a relative path must not be read twice."""
    from serving.online import RedisServer, ping

    monkeypatch.chdir(tmp_path)
    server = RedisServer(Path("artifacts") / "online").start()
    try:
        assert ping(server.url) and (tmp_path / "artifacts" / "online" / "redis.log").exists()
    finally:
        server.stop()


def test_a_private_redis_left_by_a_killed_server_is_adopted_restarted_and_stopped(tmp_path):
    """`shoprec serve` killed without stopping leaves its redis-server running. The next server on those artifacts
    shares it and, its owner gone, looks after it: restarts it when it dies, stops it on exit. Meanwhile
    `shoprec events` refuses to write to it (no server would read what it wrote)."""
    import os
    import signal
    import subprocess
    import time

    from app.events import EventsError, online_url
    from serving.online import RedisServer, pid_alive, ping

    data = tmp_path / "artifacts" / "online"
    first = RedisServer(data).start()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (data / "owner").write_text(f"{gone.pid}\n")  # the server that started it was killed
    with pytest.raises(EventsError, match=f"left by a server that is gone \\(pid {gone.pid}\\)"):
        online_url(tmp_path / "artifacts", "private")
    second = RedisServer(data).start()
    try:
        assert second.process is None and second.adopted_pid == first.process.pid and second.alive()
        assert (data / "owner").read_text().strip() == str(os.getpid())
        assert online_url(tmp_path / "artifacts", "private") == second.url
        os.kill(second.adopted_pid, signal.SIGKILL)
        first.process.wait()
        deadline = time.time() + 5
        while pid_alive(second.adopted_pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not second.alive()  # the launcher's supervisor then starts it again:
        second.start()
        assert second.process is not None and ping(second.url)
    finally:
        second.stop()
        first.stop()
    assert not ping(second.url)


@pytest.fixture()
def store(redis_url, artifacts, cfg):
    import redis

    redis.Redis.from_url(redis_url).flushall()
    return OnlineStore.open(artifacts / "serving", redis_url, cfg.serve)


def _random_actions(rng, n_users=40, n_items=30, n=600):
    return pd.DataFrame({"user_id": rng.integers(0, n_users, n), "item_row": rng.integers(0, n_items, n),
                         "ts": rng.integers(1_000, 1_500, n), "kind": rng.integers(1, 5, n).astype(np.int8),
                         "session_id": rng.integers(0, 5, n)}).drop_duplicates(["user_id", "item_row", "session_id"])


def test_user_state_equals_the_offline_state_for_the_same_actions():
    rng = np.random.default_rng(3)
    acts = _random_actions(rng)
    category = rng.integers(-1, 4, 30)  # -1: items without a category count but never lead
    rel_price = rng.normal(size=30)
    log = ActionLog(acts, category, rel_price)
    users = np.unique(acts["user_id"])
    offline = log.states(users, NEVER, 7, 3)
    for i, u in enumerate(users):
        mine = acts[acts["user_id"] == u].sample(frac=1, random_state=i)  # arrival order does not matter
        live = unpack(pack(user_state(mine["item_row"], mine["kind"], mine["ts"], category, rel_price, 7, 3)))
        for key, value in offline.items():
            np.testing.assert_allclose(live[key], value[i], rtol=1e-9, err_msg=f"user {u}: {key}")
        indptr, rows, kinds = log.history_csr(np.array([u]))
        np.testing.assert_array_equal(live["hist_rows"], rows)
        np.testing.assert_array_equal(live["hist_kinds"], kinds)


def test_a_value_of_another_format_is_refused():
    with pytest.raises(ValueError, match="truncated"):
        unpack(b"\x00" * 10)
    blob = bytearray(pack(user_state(np.array([1]), np.array([2]), np.array([5]), None, None, 3, 0)))
    blob[0] = 9
    with pytest.raises(ValueError, match="format 9"):
        unpack(bytes(blob))


def test_a_state_carries_its_encoded_columns_and_the_first_format_is_still_read():
    state = user_state(np.array([4, 2, 7]), np.array([1, 2, 4]), np.array([5, 6, 9]), np.arange(10) % 3, None, 4, 2)
    encoded = (np.array([3, 1, 4], np.int64), np.array([0.5, -2.0], np.float32))
    got = unpack(pack(state, encoded))
    np.testing.assert_array_equal(got["enc_cat"], encoded[0])
    np.testing.assert_array_equal(got["enc_cont"], encoded[1])
    plain = pack(state)
    assert "enc_cat" not in unpack(plain)
    # format 1 (before the encoded columns): a six-int header, the same body; a store written then is still read
    header = np.frombuffer(plain, np.int64, 8).copy()
    old = np.array([1, *header[1:6]], np.int64).tobytes() + plain[64:]
    for key, value in unpack(plain).items():
        np.testing.assert_array_equal(unpack(old)[key], value, err_msg=key)
    with pytest.raises(ValueError, match="does not hold the sizes"):
        unpack(pack(state, encoded)[:-4])


def test_bad_events_are_rejected_with_their_reason_and_the_rest_kept(store, pipeline):
    item = int(pipeline.item_table["item_ids"][0])
    events = [
        {"user_id": 900001, "item_id": item, "type": "click", "timestamp": 1_700_000_000},
        {"user_id": 900001, "item_id": 123456789, "type": "click", "timestamp": 1_700_000_001},
        {"user_id": "x", "item_id": item, "type": "click", "timestamp": 1_700_000_002},
        {"user_id": 900001, "item_id": item, "type": "like", "timestamp": 1_700_000_003},
        {"user_id": 900001, "item_id": item, "type": "view", "timestamp": "yesterday"},
        {"user_id": 900001, "item_id": item, "type": "view"},
        {"user_id": 900001, "item_id": item, "type": "view", "timestamp": -5},
        "not an object",
        {"user_id": 900001, "item_id": item, "type": "purchase", "timestamp": "2023-11-14T22:13:21Z"},
        {"user_id": 10**20, "item_id": item, "type": "view", "timestamp": 5},  # once a traceback that lost the batch
        {"user_id": 900001, "item_id": item, "type": "view", "timestamp": 1_700_000_000_123},
        {"user_id": 900001, "item_id": item, "type": "view", "timestamp": int(time.time()) + 86_400},  # a day ahead
    ]
    report = store.ingest(events).as_dict()
    assert report["accepted"] == 2 and report["rejected"] == 10
    assert report["reasons"][:-1] == [
        "event 2: item_id 123456789 is not in the served catalog",
        "event 3: user_id 'x' is not an integer",
        "event 4: type 'like' is not one of view, click, cart, purchase",
        "event 5: timestamp 'yesterday' is neither unix seconds nor ISO-8601",
        "event 6: missing timestamp",
        f"event 7: timestamp -5 is outside 0..{(1 << 34) - 1} unix seconds",
        "event 8: not an object with user_id, item_id, type, timestamp",
        f"event 10: user_id {10**20} does not fit in int64",
        f"event 11: timestamp 1700000000123 is outside 0..{(1 << 34) - 1} unix seconds (milliseconds? divide by 1000)",
    ]
    assert re.fullmatch(r"event 12: timestamp \d+ is 86(399|400) s ahead of this machine's clock \(more than "
                        r"serve.online_max_ahead_s = 3600\)", report["reasons"][-1]), report["reasons"][-1]
    late = IngestReport(rejected=[(5, "b"), (2, "a")])  # rejections arrive by batch: shown in line order
    assert late.as_dict()["reasons"] == ["event 3: a", "event 6: b"]
    import io

    from app.events import ingest_stream

    text = '{"user_id": "ana", "item_id": "sku-zzz", "type": "view", "timestamp": 5}\n"a string"\n'
    out = ingest_stream(store, io.StringIO(text), "jsonl", progress=False, string_ids=True)
    assert out["reasons"] == ["line 1: item_id 'sku-zzz' is not in the served catalog",  # its text, not its hash
                              "line 2: not a JSON object with user_id, item_id, type, timestamp (a str)"]
    states, _, degraded = store.read(np.array([900001]))
    assert not degraded and states[0]["activity"] == 2 and states[0]["positives"] == 2


def test_events_are_idempotent_on_their_id_and_placed_by_time(store, pipeline):
    ids = pipeline.item_table["item_ids"]
    ev = [{"user_id": 900002, "item_id": int(ids[i]), "type": "view", "timestamp": 1_700_000_000 + 10 * i, "event_id": f"e{i}"}
          for i in range(5)]
    first = store.ingest(ev[3:] + ev[:3])  # out of order
    again = store.ingest(ev + [dict(ev[0])])  # every one already applied
    assert (first.accepted, first.duplicates) == (5, 0)
    assert (again.accepted, again.duplicates) == (0, 6)
    state = store.read(np.array([900002]))[0][0]
    assert state["activity"] == 5
    assert state["seq_rows"][:5].tolist() == [4, 3, 2, 1, 0]  # most recent first, whatever the arrival order
    # same item and session again: one action, first time, strongest kind (the offline dedup)
    store.ingest([{"user_id": 900002, "item_id": int(ids[4]), "type": "purchase", "timestamp": 1_700_000_000 + 41,
                   "session_id": None}])
    store.ingest([{"user_id": 900002, "item_id": int(ids[4]), "type": "purchase", "timestamp": 1_700_000_040}])
    state = store.read(np.array([900002]))[0][0]
    assert state["activity"] == 6 and state["hist_kinds"].tolist() == [1, 1, 1, 1, 4, 4]


def test_memory_per_user_is_bounded(redis_url, artifacts, cfg, pipeline):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    small = OnlineStore.open(artifacts / "serving", redis_url, dataclasses.replace(cfg.serve, online_max_actions=4))
    ids = pipeline.item_table["item_ids"]
    small.ingest([{"user_id": 900003, "item_id": int(ids[i]), "type": "click", "timestamp": 1_000 + i} for i in range(10)])
    state = small.read(np.array([900003]))[0][0]
    assert state["activity"] == 4 and state["hist_rows"].tolist() == [6, 7, 8, 9]  # the latest four
    assert client.hlen(small.key("acts", 900003)) == 4
    ttl = client.ttl(small.key("state", 900003))
    assert 0 < ttl <= cfg.serve.online_ttl_days * 86_400


def test_a_full_store_refuses_a_batch_whole_and_keeps_every_earlier_user(redis_url, artifacts, cfg, pipeline):
    """The private instance runs with noeviction: at its maxmemory a batch of events is refused with a one-line
    reason, and no earlier user's live actions are dropped (an LRU eviction would take a user's actions and leave
    their state, or the other way round, and the next event would seed from the snapshot: live events lost)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    store = OnlineStore.open(artifacts / "serving", redis_url, cfg.serve)
    ids = pipeline.item_table["item_ids"]
    before = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 300_000)
    written, refused = [], None
    try:
        for user in range(910_000, 912_000):
            try:
                store.ingest([{"user_id": user, "item_id": int(ids[(user + j) % len(ids)]), "type": "click",
                               "timestamp": 1_000 + j} for j in range(40)])
            except OnlineStoreError as exc:
                refused = (user, str(exc))
                break
            written.append(user)
        used, limit = store.memory()  # what the feature step's gauges publish, and the alert reads
    finally:
        client.config_set("maxmemory", before)
    assert refused is not None and written, "the store never filled"
    assert "full (its maxmemory; raise serve.online_max_memory_mb" in refused[1] and "\n" not in refused[1]
    assert 0.9 < used / limit < 1.1, (used, limit)  # ShoprecOnlineStoreNearlyFull would fire
    assert client.hlen(store.key("acts", refused[0])) == 0 and client.get(store.key("state", refused[0])) is None
    states = store.read(np.array(written))[0]
    assert all(s is not None and s["activity"] >= 40 for s in states)  # every earlier user whole
    assert all(client.hlen(store.key("acts", u)) >= 40 for u in written)
    client.flushall()


def test_event_ids_per_user_are_bounded_and_the_latest_still_deduplicate(redis_url, artifacts, cfg, pipeline):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    small = OnlineStore.open(artifacts / "serving", redis_url, dataclasses.replace(cfg.serve, online_max_event_ids=5))
    ids = pipeline.item_table["item_ids"]
    events = [{"user_id": 900004, "item_id": int(ids[i]), "type": "view", "timestamp": 1_000 + i, "event_id": f"e{i}"}
              for i in range(8)]
    small.ingest(events[:3])
    small.ingest(events[3:])
    kept = {k.decode() for k in client.hkeys(small.key("events", 900004))}
    assert kept == {f"e{i}" for i in range(3, 8)}  # the five latest by event time
    report = small.ingest(events[3:])
    assert report.accepted == 0 and report.duplicates == 5
    again = small.ingest(events[:1])  # its id is forgotten, but the action it made is still there: nothing changes
    assert (again.accepted, again.duplicates) == (0, 1)
    moved = small.ingest([{**events[0], "type": "click"}])  # the same id forgotten, with a stronger type: applied
    assert (moved.accepted, moved.duplicates) == (1, 0)


def test_unavailable_items_round_trip(store, pipeline):
    ids = pipeline.item_table["item_ids"]
    changed, unknown = store.set_available([int(ids[3]), int(ids[5]), 987654321], available=False)
    assert changed == 2 and unknown == [987654321]
    assert sorted(store.read(np.array([1]))[1].tolist()) == [3, 5]
    store.set_available([int(ids[3])], available=True)
    assert store.read(np.array([1]))[1].tolist() == [5]
    # the next export's store (another key prefix) reads the same list: raw ids outlive an export
    import copy

    nxt = copy.copy(store)
    nxt.prefix = "shoprec:000000000000"
    assert nxt.unavailable_ids().tolist() == [int(ids[5])] and nxt.read(np.array([1]))[1].tolist() == [5]


def test_replayed_events_give_the_offline_features_row_by_row(store, artifacts, cfg, redis_url):
    """Point-in-time consistency: the valid/test actions replayed (shuffled) into Redis over the export's
    snapshot; the feature step's tensors for those users equal the offline pipeline's for the same
    actions: ActionLog over train + replayed actions, the query plan, the item codes."""
    from runtime.pipeline import Pipeline

    actions = pd.read_parquet(artifacts / "features" / "actions.parquet")
    later = actions[actions["split"] > 0].sample(frac=1, random_state=1)
    table = np.load(artifacts / "serving" / "item_table.npz")
    events = [{"user_id": int(r.user_id), "item_id": int(table["item_ids"][r.item_row]), "type": NAMES[int(r.kind)],
               "timestamp": int(r.ts), "session_id": int(r.session_id), "event_id": f"replay-{i}"}
              for i, r in enumerate(later.itertuples())]
    report = store.ingest(events)
    assert report.accepted == len(events) and not report.rejected

    live = Pipeline(artifacts / "serving", cfg=dataclasses.replace(cfg.serve, online_store=redis_url))
    step = live.steps["feature_transform"]
    users = np.unique(later["user_id"].values)
    assert len(users) > 20
    got = step(users)
    assert got["live"].all() and not got["degraded"]
    # the store encoded each live user's columns when their events arrived: the step read them, not the plan
    states, _, _ = step.online.read(users)
    assert all(len(one["enc_cat"]) == len(step.columns.cat) for one in states)

    snapshot = UserStore.load(artifacts / "serving" / "user_store.npz")
    has_cat = "recent_categories" in snapshot.arrays
    log = ActionLog(actions, table["category_code"] if has_cat else None,
                    table["rel_price"] if "price_level" in snapshot.arrays else None)
    n_cat = snapshot.arrays["recent_categories"].shape[1] if has_cat else 0
    state = log.states(users, NEVER, snapshot.arrays["seq_rows"].shape[1], n_cat)
    state["seq_rows"], state["seq_kinds"] = state["seq_rows"][:, : step.seq_len], state["seq_kinds"][:, : step.seq_len]
    rows = snapshot.lookup(users)
    raw = raw_rows(step.spec, state, snapshot.attrs(users, rows), step.category_names)
    cat, cont = step.plan.pack(step.plan.transform(raw))
    np.testing.assert_array_equal(got["user_cat"], cat)
    np.testing.assert_allclose(got["user_cont"], cont, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["seq_items"], np.where(state["seq_rows"] >= 0, step.item_codes[np.maximum(state["seq_rows"], 0)], 0))
    np.testing.assert_array_equal(got["seq_kinds"], state["seq_kinds"])
    indptr, hist_rows, hist_kinds = log.history_csr(users)
    for i in range(len(users)):
        n = indptr[i + 1] - indptr[i]
        np.testing.assert_array_equal(got["history_rows"][i, :n], hist_rows[indptr[i] : indptr[i + 1]])
        np.testing.assert_array_equal(got["history_kinds"][i, :n], hist_kinds[indptr[i] : indptr[i + 1]])
        assert (got["history_rows"][i, n:] == -1).all()
    assert not got["cold"].any()


def test_a_dead_store_degrades_to_the_snapshot_without_failing(artifacts, cfg, pipeline):
    from runtime.pipeline import Pipeline

    dead = Pipeline(artifacts / "serving", cfg=dataclasses.replace(cfg.serve, online_store="redis://127.0.0.1:9/0",
                                                                    online_timeout_ms=20))
    users = pipeline.steps["feature_transform"].store.user_id[:4]
    got = dead.steps["feature_transform"](users)
    assert got["degraded"] and not got["live"].any()
    assert dead.steps["feature_transform"].online.memory() is None
    assert dead.steps["feature_transform"].gauge_values() == {}  # no gauge rather than a made-up value
    for a, b in zip(dead.recommend(users, 10), pipeline.recommend(users, 10)):
        np.testing.assert_array_equal(a[0], b[0])


def test_trending_counts_events_per_item_over_the_last_hours(store, pipeline):
    ids = pipeline.item_table["item_ids"]
    now = (int(time.time()) // 3600 - 1) * 3600 + 1800  # the middle of the hour before: every event in the past
    events = [{"user_id": 900010 + j, "item_id": int(ids[i]), "type": "view", "timestamp": now - 600}
              for i, times in ((2, 3), (4, 1), (6, 2)) for j in range(times)]
    events.append({"user_id": 900020, "item_id": int(ids[4]), "type": "click", "timestamp": now - 5 * 3600})  # older
    events.append(dict(events[0]))  # sent twice, with no event id or session id: the same action, counted once
    report = store.ingest(events)
    assert (report.accepted, report.duplicates) == (len(events) - 1, 1)
    assert store.trending(hours=1, now=now) == [(int(ids[2]), 3), (int(ids[6]), 2), (int(ids[4]), 1)]
    assert store.trending(hours=6, now=now, n=1) == [(int(ids[2]), 3)]
    assert store.trending(hours=6, now=now)[1:] == [(int(ids[4]), 2), (int(ids[6]), 2)]  # ties by item id
    with pytest.raises(ValueError, match="trending hours must be in 1..47"):
        store.trending(hours=100)

