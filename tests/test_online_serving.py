"""Live user state through the served ensemble: a real tritonserver with its private redis-server.
Events change the next request's list; Redis failing never fails a request."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from client import RecommenderClient
from runtime.online_store import OnlineStore
from runtime.request_transform import UserStore

pytestmark = pytest.mark.integration
NOW = int(time.time()) - 3_600  # after every action of the export: live events come last


@pytest.fixture(scope="module")
def online(triton, artifacts, cfg):
    assert triton.online_url, "the served ensemble runs with its private online store by default"
    return OnlineStore.open(artifacts / "serving", triton.online_url, cfg.serve)


@pytest.fixture(scope="module")
def spare_users(artifacts):
    """Warm users the other integration tests never ask for (they compare lists to the snapshot)."""
    store = UserStore.load(artifacts / "serving" / "user_store.npz")
    warm = store.user_id[store.arrays["activity"] > 0]
    used = set(warm[:: max(1, len(warm) // 30)][:30].tolist()) | set(warm[:: max(1, len(warm) // 12)][:12].tolist())
    return [int(u) for u in warm[::-1] if int(u) not in used][:20]


def _table(pipeline):
    t = pipeline.item_table
    return t["item_ids"], t["category_code"]


def _events(user, item_ids, kind, start=NOW):
    return [{"user_id": user, "item_id": int(i), "type": kind, "timestamp": start + n} for n, i in enumerate(item_ids)]


def test_clicks_in_a_new_category_raise_its_share_of_the_next_list(triton, online, pipeline, spare_users):
    ids, category = _table(pipeline)
    popularity = pipeline.item_table["popularity"]
    raised = 0
    with RecommenderClient(triton.grpc_url) as c:
        for user in spare_users[:4]:
            before = c.recommend(user, k=10)
            shown = category[np.searchsorted(ids, before.item_ids)]
            # the category with the most items that the list does not show at all
            absent = [k for k in np.unique(category[category >= 0]) if k not in set(shown.tolist())]
            target = max(absent, key=lambda k: (category == k).sum())
            rows = np.flatnonzero(category == target)
            clicked = ids[rows[np.argsort(-popularity[rows], kind="stable")[:3]]]
            online.ingest(_events(user, clicked, "click"))
            after = c.recommend(user, k=10)
            share = (category[np.searchsorted(ids, after.item_ids)] == target).mean()
            assert not after.degraded and not set(clicked.tolist()) & set(after.item_ids.tolist())
            raised += share > 0
    assert raised >= 3, f"the clicked category entered only {raised} of 4 lists"


def test_a_purchased_item_is_not_served_again(triton, online, spare_users):
    user = spare_users[5]
    with RecommenderClient(triton.grpc_url) as c:
        top = int(c.recommend(user, k=10).item_ids[0])
        online.ingest(_events(user, [top], "purchase"))
        after = c.recommend(user, k=10)
        assert top not in after.item_ids.tolist() and len(after.item_ids) == 10
        assert top in c.recommend(user, k=50, exclude_seen=False).item_ids.tolist()


def test_an_unknown_user_with_a_few_events_is_no_longer_cold(triton, online, pipeline):
    ids, _ = _table(pipeline)
    user = 990_001
    with RecommenderClient(triton.grpc_url) as c:
        assert c.recommend(user, k=10).cold_start
        online.ingest(_events(user, ids[[1, 2, 3]], "click"))
        warm = c.recommend(user, k=10)
        assert not warm.cold_start and not {int(i) for i in ids[[1, 2, 3]]} & set(warm.item_ids.tolist())


def test_an_unavailable_item_leaves_every_list_at_the_next_request(triton, online, spare_users):
    users = [*spare_users[6:10], 990_002]  # warm users and a cold one
    with RecommenderClient(triton.grpc_url) as c:
        tops = {u: c.recommend(u, k=10).item_ids for u in users}
        item = int(tops[users[-1]][0])  # the cold list's first item: popular, in many lists
        try:
            online.set_available([item], available=False)
            for u in users:
                served = c.recommend(u, k=10)
                assert item not in served.item_ids.tolist() and len(served.item_ids) == 10, u
        finally:
            online.set_available([item], available=True)
        np.testing.assert_array_equal(c.recommend(users[-1], k=10).item_ids, tops[users[-1]])


def test_events_cli_reports_accepted_duplicate_and_rejected(triton, artifacts, pipeline, spare_users, tmp_path, capsys):
    from app.cli import main

    ids, _ = _table(pipeline)
    user = spare_users[11]
    lines = [json.dumps({"user_id": user, "item_id": int(ids[7]), "type": "view", "timestamp": NOW, "event_id": "cli-1"}),
             json.dumps({"user_id": user, "item_id": int(ids[7]), "type": "view", "timestamp": NOW, "event_id": "cli-1"}),
             "{not json",
             json.dumps({"user_id": user, "item_id": int(ids[8]), "type": "refund", "timestamp": NOW})]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["--artifacts", str(artifacts), "--quiet", "events", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["accepted"], out["duplicates"], out["rejected"], out["read"]) == (1, 1, 2, 4)
    assert out["reasons"][0].startswith("line 3: not JSON")
    assert out["reasons"][1] == "line 4: type 'refund' is not one of view, click, cart, purchase"


def test_flushed_user_is_served_from_the_snapshot(triton, online, pipeline, spare_users):
    user = spare_users[12]
    with RecommenderClient(triton.grpc_url) as c:
        online.ingest(_events(user, [int(c.recommend(user, k=1).item_ids[0])], "purchase"))
        assert not np.array_equal(c.recommend(user, k=10).item_ids, pipeline.recommend([user], 10)[0][0])
        online.client.delete(online.key("state", user), online.key("acts", user))
        served = c.recommend(user, k=10)
        assert not served.degraded
        np.testing.assert_array_equal(served.item_ids, pipeline.recommend([user], 10)[0][0])


def test_killed_store_degrades_to_the_snapshot_and_recovers(triton, online, pipeline, spare_users):
    """Redis killed (SIGKILL, no goodbye): requests keep succeeding from the snapshot, marked degraded; the
    server restarts its private store, whose append-only file brings the live state back."""
    user = spare_users[13]
    with RecommenderClient(triton.grpc_url) as c:
        top = int(c.recommend(user, k=1).item_ids[0])
        online.ingest(_events(user, [top], "purchase"))
        time.sleep(1.5)  # appendfsync everysec: the event is on disk
        os.kill(triton.redis.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        degraded = c.recommend(user, k=10)
        assert degraded.degraded
        np.testing.assert_array_equal(degraded.item_ids, pipeline.recommend([user], 10)[0][0])  # the snapshot's list
        while True:
            served = c.recommend(user, k=10)
            if not served.degraded:
                break
            assert time.monotonic() - t0 < 5.0, "not back to live state within 5 s"
            time.sleep(0.05)
        assert top not in served.item_ids.tolist()  # the live purchase survived the crash
