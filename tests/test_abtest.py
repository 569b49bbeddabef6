"""`shoprec abtest` (benchmarks/abtest.py): replayed shoppers whose clicks come from the generator's planted truth.

The simulator must find a planted difference and must not invent one; against the session's real server it
reads each user's arm from the response."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.abtest import analyse, run_abtest, shop_of
from feature_workflows.synthetic import ITEM_ID_BASE, SIZES, USER_ID_BASE, latent_truth, respond
from shoprec.errors import UserError


def _truth_lists(items, truth, k, rng, best: bool):
    """Per user, k items: the ones their planted taste likes most (best), or random ones."""
    n_items = len(items["category"])
    pref = np.where(truth.shifted[:, None], truth.pref2, truth.pref)
    if not best:
        return np.stack([rng.choice(n_items, k, replace=False) for _ in range(len(pref))]) + ITEM_ID_BASE
    score = pref[:, items["category"]] + 0.3 * (items["brand"][None, :, None] == truth.fav_brands[:, None, :]).any(2)
    return np.argsort(-score, axis=1)[:, :k] + ITEM_ID_BASE


def test_the_simulator_finds_a_planted_better_arm_and_no_difference_between_equal_arms():
    rng = np.random.default_rng(3)
    users = USER_ID_BASE + np.arange(800)
    items, truth = latent_truth("tiny", 7, users)
    good, bad = _truth_lists(items, truth, 10, rng, True), _truth_lists(items, truth, 10, rng, False)
    arm = np.array(["a", "b"] * 400)
    lists = np.where((arm == "b")[:, None], bad, good)
    clicks, buys = respond(items, truth, lists, rng)
    report = analyse([{"layer": a} for a in arm], clicks, buys, np.full(len(arm), 10))["layer"]
    assert report["a"]["ctr"] > report["b"]["ctr"] and report["b"]["ctr_p"] < 1e-6
    assert report["b"]["verdict"].startswith("a has the higher CTR")
    same_clicks, same_buys = respond(items, truth, good, rng)  # A/A: both arms get the good lists
    aa = analyse([{"layer": a} for a in arm], same_clicks, same_buys, np.full(len(arm), 10))["layer"]
    assert aa["b"]["ctr_p"] > 0.05 and aa["b"]["verdict"].startswith("no significant CTR difference")
    # position matters: the same items shown lower are clicked less (examination), pads are never clicked
    flipped = np.where(np.arange(10) < 5, -1, good)
    assert respond(items, truth, flipped, rng)[0][:, :5].sum() == 0


def test_abtest_against_the_served_experiment(triton, artifacts):
    report = run_abtest(triton.grpc_url, "grpc", artifacts / "data" / "raw", users=200, k=5, workers=2)
    arms = report["layers"]["ranking"]
    assert set(arms) == {"a", "b"} and sum(a["users"] for a in arms.values()) == 200
    assert all(0 <= a["ctr"] <= 1 and a["shown"] == 5 * a["users"] for a in arms.values())
    assert "verdict" in arms["b"] and report["shop"] == {"size": "tiny", "seed": 7}
    assert report["users"] <= SIZES["tiny"].users


def test_abtest_needs_the_synthetic_shop(tmp_path):
    (tmp_path / "schema.json").write_text('{"source": "movielens-latest-small"}')
    with pytest.raises(UserError, match="has no planted truth"):
        shop_of(tmp_path)
