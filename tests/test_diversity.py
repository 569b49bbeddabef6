"""MMR diversity in the top-k step: off by default (the ranker's order exactly), a per-request lambda."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.steps import RequestError, TopK, best_first, mmr_order
from shoprec import contract


def _planted():
    # candidates 0 and 1 are near-duplicates and score best; 2 is different and scores a little lower
    emb = np.array([[1.0, 0.0], [0.999, 0.045], [0.0, 1.0], [0.7, 0.7], [0.6, 0.8]])
    rows = np.array([0, 1, 2, 3, 4, -1])
    scores = np.array([0.9, 0.89, 0.8, 0.5, 0.4, 0.0])
    return emb, rows, scores


def test_lambda_zero_is_the_rankers_order_exactly():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8))
    rows = np.r_[rng.permutation(50)[:40], [-1] * 5]
    scores = rng.random(45)
    scores[3] = scores[7]  # a tie keeps the candidate order
    want = best_first(rows, scores, 10)
    np.testing.assert_array_equal(mmr_order(rows, scores, 10, 0.0, emb, 50), want[rows[want] >= 0])


def test_mmr_moves_a_near_duplicate_down_and_keeps_the_best_first():
    emb, rows, scores = _planted()
    assert list(mmr_order(rows, scores, 3, 0.0, emb, 50)) == [0, 1, 2]
    # by hand: relevance scaled to 1, .98, .8, .2, 0; after 0, candidate 2 gains .5*.8 - 0 = .4 against 1's
    # .5*.98 - .5*.999 < 0, so the different item 2 moves above the near-duplicate 1
    assert list(mmr_order(rows, scores, 3, 0.5, emb, 50)) == [0, 2, 1]
    top = mmr_order(rows, scores, 5, 1.0, emb, 50)
    assert top[0] == 0 and 1 in top and len(set(top)) == 5 and -1 not in rows[top]


def test_only_the_pool_is_considered():
    emb, rows, scores = _planted()
    # pool 2 = the two best by score: however diverse 2 is, it is never considered
    assert set(mmr_order(rows, scores, 2, 1.0, emb, 2)) == {0, 1}
    assert set(mmr_order(rows, scores, 2, 1.0, emb, 50)) == {0, 2}


def _topk(artifacts, cfg):
    from runtime.steps import Bundle

    return TopK(contract.STEP_BY_NAME["topk"], Bundle(artifacts / "serving"), cfg.serve)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_diversity_outside_zero_one_is_a_request_error(artifacts, cfg, bad):
    step = _topk(artifacts, cfg)
    t = {"candidate_rows": np.zeros((1, 3), np.int64), "ranking_scores": np.zeros((1, 3), np.float32),
         "k": np.array([[2]], np.int32), "cold_start": np.array([[False]]), "diversity": np.array([[bad]], np.float32)}
    with pytest.raises(RequestError, match=r"diversity must be in \[0, 1\]"):
        step.check(t)


def test_diversity_raises_list_diversity_in_the_pipeline(pipeline):
    users = pipeline.steps["feature_transform"].store.user_id[:30]
    emb = pipeline.steps["topk"].embeddings
    ids = pipeline.item_table["item_ids"]
    row_of = {int(i): r for r, i in enumerate(ids)}

    def mean_similarity(lists):
        out = []
        for items, _, _ in lists:
            e = emb[[row_of[int(i)] for i in items]]
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            s = e @ e.T
            out.append((s.sum() - len(e)) / (len(e) * (len(e) - 1)))
        return float(np.mean(out))

    plain, diverse = pipeline.recommend(users, 10), pipeline.recommend(users, 10, diversity=0.7)
    assert mean_similarity(diverse) < mean_similarity(plain)
    for (a, sa, _), (b, sb, _) in zip(plain, diverse):
        assert a[0] == b[0] and len(a) == len(b)  # the best item leads either way


def test_the_curve_runs_on_the_tiny_shop(artifacts, tmp_path):
    import json

    from benchmarks import diversity_curve

    diversity_curve.main(["--tag", "tiny", "--artifacts", str(artifacts), "--out", str(tmp_path), "--max-users", "60"])
    report = json.loads((tmp_path / "diversity_tiny.json").read_text())
    points = report["points"]
    assert [p["lambda"] for p in points] == list(diversity_curve.LAMBDAS) and report["users"] > 0
    assert points[-1]["embedding_diversity@10"][0] > points[0]["embedding_diversity@10"][0]
    assert (tmp_path / "diversity_tiny.md").read_text().count("\n| 0.") == len(points)  # one table row per lambda
    assert (tmp_path / "diversity_tiny.png").stat().st_size > 0
