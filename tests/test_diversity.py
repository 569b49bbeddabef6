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


@pytest.mark.parametrize("k", [0, -3, 10_000])
def test_top_k_checks_k_itself_for_a_direct_caller(artifacts, cfg, k):
    """The gpu profile's topk (and cpu-stages' ranking) can be called directly: k is checked there too, so a bad k
    is this request's error, never a slice of a batch-wide sort that depends on its batch-mates."""
    step = _topk(artifacts, cfg)
    t = {"candidate_rows": np.zeros((1, 3), np.int64), "ranking_scores": np.zeros((1, 3), np.float32),
         "k": np.array([[k]], np.int32), "cold_start": np.array([[False]])}
    with pytest.raises(RequestError, match=r"k must be (>= 1|<= \d+)"):
        step.check(t)


def test_a_failed_batch_leaves_no_counts_and_a_good_one_all(artifacts, cfg):
    """batch_counts: the Triton adapter re-runs a failed batch request by request, so what the failed run counted
    is dropped; a batch that succeeds lands whole; counts outside a batch land at once."""
    step = _topk(artifacts, cfg)
    step.take_counts()
    with pytest.raises(ValueError):
        with step.batch_counts():
            step.count("shoprec_served_items_total", 5)
            raise ValueError("the batch failed")
    assert step.take_counts() == {}
    with step.batch_counts():
        step.count("shoprec_served_items_total", 5)
        assert step.take_counts() == {}  # a publisher mid-batch finds nothing of it
    step.count("shoprec_served_items_total", 2)
    assert step.take_counts() == {("shoprec_served_items_total", ()): 7.0}


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


def _step_with(artifacts, cfg, **serve):
    import dataclasses

    from runtime.steps import Bundle

    return TopK(contract.STEP_BY_NAME["topk"], Bundle(artifacts / "serving"), dataclasses.replace(cfg.serve, **serve))


def _ranked(pipeline, n_users=5):
    users = pipeline.steps["feature_transform"].store.user_id[:n_users]
    t = pipeline.rank(pipeline.request(users, 10))
    return t["candidate_rows"], t["ranking_scores"]


def test_a_category_cap_limits_each_list_and_still_fills_k(artifacts, cfg, pipeline):
    step = _step_with(artifacts, cfg, max_per_category=2)
    row_of = {int(i): r for r, i in enumerate(step.item_ids)}
    rows, scores = _ranked(pipeline)
    for r, s in zip(rows, scores):
        ids, _ = step(r, s, 10)
        cats = step.category[[row_of[int(i)] for i in ids]]
        assert len(ids) == 10 and np.bincount(cats[cats >= 0]).max() <= 2
        plain, _ = _step_with(artifacts, cfg)(r, s, 10)
        assert ids[0] == plain[0]  # the best item always leads


def test_a_batch_of_requests_in_one_call_serves_each_as_alone_and_counts_every_list(artifacts, cfg, pipeline):
    step = _step_with(artifacts, cfg)
    rows, scores = _ranked(pipeline, 6)
    step.category = np.where(np.arange(len(step.category)) % 3 == 0, -1, step.category)  # some items without one,
    step.category[rows[0][best_first(rows[:1], scores[:1], 2)[0]]] = -1  # the first list's two best among them
    counts, k = [1, 2, 3], np.array([3, 8, 8, 12, 12, 12])
    lam = np.array([0.0, 0.0, 0.6, 0.0, 0.3, 0.0])  # MMR users beside the ones one sort serves
    t = {"candidate_rows": rows, "ranking_scores": scores, "k": k[:, None].astype(np.int32),
         "diversity": lam[:, None].astype(np.float32)}
    got = step.run_requests(t, counts)
    counted = {name: v for (name, _), v in step.take_counts().items() if name.startswith(("shoprec_list", "shoprec_served_items"))}
    pairs = diverse = items = 0
    user = 0
    for request, n_users in zip(got, counts):
        ids, best, masks = request
        lists = [step.order(rows[user + j], scores[user + j], int(k[user + j]), float(lam[user + j])) for j in range(n_users)]
        assert ids.shape == (n_users, max(len(o) for o in lists)) and ids.dtype == np.int64 and best.dtype == np.float32
        for j, order in enumerate(lists):
            served = rows[user + j][order]
            np.testing.assert_array_equal(ids[j][: len(order)], step.item_ids[served])
            np.testing.assert_array_equal(best[j][: len(order)], scores[user + j][order])
            assert (ids[j][len(order):] == -1).all() and (best[j][len(order):] == -np.inf).all()
            cats = step.category[served]
            items += len(cats)
            pairs += len(cats) * (len(cats) - 1) // 2
            diverse += sum(int(a != b) for x, a in enumerate(cats) for b in cats[x + 1 :])  # no category: one of its own
        user += n_users
    assert counted == {"shoprec_served_items_total": items, "shoprec_list_pairs_total": pairs,
                       "shoprec_list_pairs_diverse_total": diverse}
    assert diverse < pairs  # the lists hold items of one category (or none) together


def test_the_fused_cpu_model_answers_a_batch_of_requests_in_one_top_k_call(artifacts, cfg):
    from runtime.pipeline import Pipeline
    from runtime.steps import merge_requests

    p = Pipeline(artifacts / "serving", cfg=cfg.serve, profile="cpu")
    step, fused = p.graph[-1], p.steps[p.graph[-1].name]  # the one model of the cpu profile: the whole graph
    users = fused.parts[0][1].store.user_id[:5]
    requests = [p.request(users[:2], 3, diversity=0.0), p.request(users[2:3], 12, diversity=0.0),
                p.request(users[3:], 7, diversity=0.4)]
    # each request checked alone, as Triton's adapter does, then merged into one batch
    batch = merge_requests(step, [fused.check({t.name: r.get(t.name) for t in step.inputs}) for r in requests])
    calls = []
    topk = fused.parts[-1][1]
    topk.run_requests = lambda t, counts, run=topk.run_requests: calls.append(counts) or run(t, counts)
    got = fused.run_requests(batch, [2, 1, 2])
    assert calls == [[2, 1, 2]]  # top-k saw the whole batch once
    # the same batch request by request, top-k run on each request's rows of the batched tensors
    tensors = fused._run(fused.parts[: fused.split], dict(batch))
    for (a, b), outputs in zip(((0, 2), (2, 3), (3, 5)), got):
        alone = fused._run(fused.parts[fused.split :], {k: None if v is None else v[a:b] for k, v in tensors.items()})
        for x, out in zip(step.outputs, outputs):
            assert out.dtype == alone[x.name].dtype and out.shape == alone[x.name].shape, x.name
            np.testing.assert_array_equal(out, alone[x.name], err_msg=x.name)


def test_blocked_items_are_never_served_and_the_file_is_reread(artifacts, cfg, tmp_path):
    import dataclasses
    import os
    import time

    from runtime.pipeline import Pipeline

    blocked = tmp_path / "blocked.txt"
    blocked.write_text("# nothing blocked yet\n")
    served = Pipeline(artifacts / "serving", cfg=dataclasses.replace(cfg.serve, blocked_items_file=str(blocked)))
    served.steps["feature_transform"].blocked.check_every_s = 0.0
    user = served.steps["feature_transform"].store.user_id[:1]
    before = served.recommend(user, 10)[0][0]
    blocked.write_text(f"{before[0]}\n{before[3]}  # out of stock\n999999999999\n")
    os.utime(blocked, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    after = served.recommend(user, 10)[0][0]
    assert before[0] not in after and before[3] not in after and len(after) == 10
    blocked.write_text("not-a-number\n")
    os.utime(blocked, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    np.testing.assert_array_equal(served.recommend(user, 10)[0][0], after)  # a broken file keeps the last good list


def test_blocked_items_leave_the_candidates_so_lists_stay_full(artifacts, cfg, pipeline, tmp_path):
    """Blocking every candidate a user had still serves a full list: the feature step sends the blocked items as
    unavailable, so each recall route skips them (a filter in top-k alone would leave the list empty)."""
    import dataclasses

    from runtime.pipeline import Pipeline

    user = pipeline.steps["feature_transform"].store.user_id[:1]
    table = pipeline.steps["topk"].item_ids
    candidates = pipeline.rank(pipeline.request(user, 10))["candidate_rows"][0]
    blocked_ids = table[candidates[candidates >= 0]]
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("".join(f"{i}\n" for i in blocked_ids))
    served = Pipeline(artifacts / "serving", cfg=dataclasses.replace(cfg.serve, blocked_items_file=str(blocked)))
    ids = served.recommend(user, 10)[0][0]
    assert len(blocked_ids) > 10 and len(ids) == 10 and not set(ids.tolist()) & set(blocked_ids.tolist())


def test_blocked_items_file_must_exist_and_be_absolute(artifacts, cfg, tmp_path):
    import dataclasses

    from runtime.pipeline import Pipeline

    def load(path):
        return Pipeline(artifacts / "serving", cfg=dataclasses.replace(cfg.serve, blocked_items_file=path))

    with pytest.raises(FileNotFoundError, match="does not exist \\(create it empty to block nothing\\)"):
        load(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="must be an absolute path"):
        load("blocked.txt")
