"""Scenes, fusion weights, layered experiments and the scene routes' precomputed arrays (runtime/strategy.py,
runtime/candidates.py), in-process over the test bundle; tests/test_serving_integration.py sends the same
requests to a real tritonserver."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.candidates import ROUTES, TRAINING_WEIGHTS, _fuse, copurchase_neighbours, trending_order
from runtime.steps import RequestError
from runtime.strategy import Strategy, StrategyError, _salt, bucket
from shoprec.config import ServeConfig


def _lists(*ranked, n=4):
    out = [np.array([r + [-1] * (n - len(r))]) for r in ranked]
    return out + [np.full((1, n), -1)] * (len(ROUTES) - len(out))


def _weights(*w):
    out = np.zeros((1, len(ROUTES)))
    out[0, : len(w)] = w
    return out


def test_equal_weights_interleave_rank_by_rank_and_weights_set_the_shares():
    lists = _lists([1, 2, 3], [2, 5, 6, 7])
    np.testing.assert_array_equal(_fuse(lists, _weights(1, 1), 4), [[1, 2, 5, 3]])  # round robin, first occurrence wins
    np.testing.assert_array_equal(_fuse(lists, _weights(1, 2), 4), [[2, 1, 5, 6]])  # route 2 takes two slots per one
    np.testing.assert_array_equal(_fuse(lists, _weights(0, 1), 4), [[2, 5, 6, 7]])  # weight 0: off
    np.testing.assert_array_equal(_fuse(lists, _weights(1, 0.001), 4), [[1, 2, 3, 5]])  # a fallback only fills


def _fuse_by_sorting(lists, weights, n):
    """The fusion as its docstring states it, one user at a time: every (rank, route) entry a list holds, sorted by
    (rank + 1) / weight, ties by rank then route; first occurrences, first n."""
    out = np.full((len(weights), n), -1)
    for u, w in enumerate(weights):
        entries = sorted(((p + 1) / w[r], p, r, int(x[u, p])) for r, x in enumerate(lists) if w[r] > 0
                         for p in range(x.shape[1]) if x[u, p] >= 0)
        taken = list(dict.fromkeys(e[3] for e in entries))[:n]
        out[u, : len(taken)] = taken
    return out


def test_fusion_matches_a_plain_sort_for_any_weights_and_gaps():
    """_fuse orders entries by a permutation cached per weight vector, not by sorting each batch's keys: the same
    lists as sorting, with per-user weights (experiment arms), zero weights, empty slots and repeated items."""
    rng = np.random.default_rng(3)
    n, routes = 12, 4
    lists = [np.where(rng.random((9, n)) < 0.2, -1, rng.integers(0, 30, (9, n))) for _ in range(routes)]
    for x in lists:  # a route's list holds each item once
        for row in x:
            _, first = np.unique(row, return_index=True)
            dup = np.setdiff1d(np.arange(n), first)
            row[dup] = -1
    weights = rng.choice([0.0, 0.5, 1.0, 2.0, 3.0], size=(9, routes))
    weights[0] = 1.0
    weights[1] = weights[2]
    got, reached = _fuse(lists, weights, n, with_cutoff=True)
    np.testing.assert_array_equal(got, _fuse_by_sorting(lists, weights, n))
    assert reached.shape == (9, n, routes)
    same = np.tile(weights[3], (9, 1))  # one weight vector for the whole batch: the shared-permutation path
    np.testing.assert_array_equal(_fuse(lists, same, n), _fuse_by_sorting(lists, same, n))


def test_trending_weighs_recent_positives_and_copurchase_links_later_purchases():
    day = 86400
    # item 0: three positives 30 days ago; item 1: two positives today; item 2: a view only
    order = trending_order(np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 0, 30 * day, 30 * day, 30 * day]),
                           np.array([2, 2, 4, 2, 3, 1]), 3, half_life_days=7.0)
    np.testing.assert_array_equal(order, [1, 0])
    # user 1 buys 0 then 1 (later session), user 2 buys 2 and 3 in one session; a click never counts
    co = copurchase_neighbours(np.array([1, 1, 2, 2, 2]), np.array([1, 2, 5, 5, 5]), np.array([1, 2, 1, 2, 3]),
                               np.array([0, 1, 2, 3, 0]), np.array([4, 4, 4, 4, 2]), 4)
    neighbours = {i: co["indices"][co["indptr"][i]:co["indptr"][i + 1]].tolist() for i in range(4)}
    assert neighbours == {0: [1], 1: [], 2: [3], 3: [2]}  # after: 0 -> 1 only; together: both ways


def test_scene_and_experiment_config_errors_name_the_key():
    base = ServeConfig()
    bad = [({"scenes": {"x": {"routes": {"nope": 1.0}}}}, "serve.scenes.x.routes: unknown route 'nope'"),
           ({"scenes": {"x": {"routes": {"popular": 0.0}}}}, "serve.scenes.x.routes: at least one route"),
           ({"scenes": {"x": {"routes": {"popular": 1.0}, "colour": 1}}}, r"serve.scenes.x: unknown key\(s\) \['colour'\]"),
           ({"scenes": {"x": {"routes": {"popular": 1.0}, "order": "random"}}}, "serve.scenes.x.order must be"),
           ({"default_scene": "shop"}, "serve.default_scene 'shop' is not a scene"),
           ({"experiments": {"l": {"salt": "s", "arms": {"a": 0.5, "b": 0.4}}}}, "shares must be >= 0 and sum to 1"),
           ({"experiments": {"l": {"arms": {"a": 1.0}}}}, "serve.experiments.l.salt must be"),
           ({"experiments": {"l": {"salt": "s", "arms": {"a": 1.0}, "set": {"b": {}}}}}, r"\['b'\] are not arms"),
           ({"experiments": {"l": {"salt": "s", "arms": {"a": 1.0}, "set": {"a": {"exclude_seen": False}}}}},
            r"serve.experiments.l.set.a: unknown key\(s\) \['exclude_seen'\]"),
           ({"experiments": {"l1": {"salt": "1", "arms": {"a": 1.0}, "set": {"a": {"diversity": 0.1}}},
                             "l2": {"salt": "2", "arms": {"b": 1.0}, "set": {"b": {"diversity": 0.2}}}}},
            "'diversity' is set by layers 'l1' and 'l2'"),
           ({"experiments": {"l1": {"salt": "1", "arms": {"a": 1.0}, "set": {"a": {"routes": {"trending": 2.0}}}},
                             "l2": {"salt": "2", "arms": {"b": 1.0},
                                    "set": {"b": {"scenes": {"home": {"routes": {"trending": 0.0}}}}}}}},
            "'routes.trending' is set by layers 'l1' and 'l2'"),
           ({"experiments": {"l": {"salt": "s", "arms": {"a": float("nan"), "b": 1.0}}}}, "shares must be >= 0 and sum to 1"),
           ({"experiments": {"l": {"salt": "s", "arms": {"a": "half", "b": 0.5}}}}, "shares must be numbers"),
           ({"experiments": {"x=y": {"salt": "s", "arms": {"a": 1.0}}}}, "layer names may not be empty or hold"),
           ({"experiments": {"l1": {"salt": "same", "arms": {"a": 1.0}}, "l2": {"salt": "same", "arms": {"b": 1.0}}}},
            "every layer needs its own salt"),
           ({"experiments": {"l": {"salt": "s", "arms": {"a": 1.0}, "set": {"a": {"scenes": {"shop": {}}}}}}},
            r"arms set scenes \['shop'\] that are not scenes")]
    for changes, message in bad:
        with pytest.raises(StrategyError, match=message):
            Strategy(dataclasses.replace(base, **changes))


def test_layers_hash_users_independently_stably_and_in_their_shares():
    cfg = dataclasses.replace(ServeConfig(), experiments={
        "recall": {"salt": "r1", "arms": {"control": 0.5, "up": 0.5}, "set": {"up": {"routes": {"trending": 3.0}}}},
        "rerank": {"salt": "r2", "arms": {"control": 0.8, "mmr": 0.2}, "set": {"mmr": {"diversity": 0.3}}}})
    st = Strategy(cfg)
    users = np.arange(1, 200_001)
    variant = st.assign(users)
    recall_up = np.array([st.arms(v)[0][1] == "up" for v in range(4)])[variant]
    mmr = np.array([st.arms(v)[1][1] == "mmr" for v in range(4)])[variant]
    assert abs(recall_up.mean() - 0.5) < 0.005 and abs(mmr.mean() - 0.2) < 0.005
    assert abs((recall_up & mmr).mean() - recall_up.mean() * mmr.mean()) < 0.003  # independent layers
    np.testing.assert_array_equal(st.assign(users[:100]), variant[:100])  # stable
    # golden values: the hash is fixed arithmetic (blake2b of the salt, splitmix64), not Python's per-process hash,
    # so a user keeps their arm across processes and releases; a change here re-draws every running experiment
    np.testing.assert_allclose(bucket(np.array([42, 1000000]), _salt("recall-2026-11")), [0.7416689710723986, 0.6010784798444412],
                               rtol=0, atol=1e-15)
    forced = st.assign(users[:2], [st.parse_forced("recall=up, rerank=mmr"), {}])
    # the Triton adapter concatenates the parsed requests of a batch into an object array
    batched = np.concatenate([np.array([st.parse_forced("recall=up, rerank=mmr")], dtype=object), np.array([{}], dtype=object)])
    np.testing.assert_array_equal(st.assign(users[:2], batched), forced)
    assert st.label(forced[0]) == "recall=up,rerank=mmr" and forced[1] == variant[1]
    r = st.resolve(st.scene_code["home"], forced[0])
    assert r.weights[ROUTES.index("trending")] == 3.0 and r.diversity == 0.3
    # an arm's routes for every scene re-weight the routes a scene uses; they add none to item_detail
    detail = st.resolve(st.scene_code["item_detail"], forced[0])
    assert detail.weights[ROUTES.index("trending")] == 0 and detail.diversity == 0.3
    with pytest.raises(ValueError, match="layer 'recall' has no arm 'down'"):
        st.parse_forced("recall=down")
    with pytest.raises(ValueError, match="is not layer=arm"):
        st.parse_forced("ranking")
    with pytest.raises(ValueError, match="layer 'recall' is named twice"):  # not the last one silently winning
        st.parse_forced("recall=up,recall=control")


def test_an_arm_may_change_one_scene_only():
    cfg = dataclasses.replace(ServeConfig(), experiments={"detail": {
        "salt": "d", "arms": {"control": 0.5, "ann_only": 0.5},
        "set": {"ann_only": {"scenes": {"item_detail": {"routes": {"similar": 0.0, "ann": 1.0}, "order": "ranker"}}}}}})
    st = Strategy(cfg)
    arm = st.assign(np.array([1]), [st.parse_forced("detail=ann_only")])[0]
    detail, home = st.resolve(st.scene_code["item_detail"], arm), st.resolve(st.scene_code["home"], arm)
    assert detail.weights[ROUTES.index("similar")] == 0 and detail.weights[ROUTES.index("ann")] == 1 and detail.by_ranker
    np.testing.assert_array_equal(home.weights, st.resolve(st.scene_code["home"], 0).weights)


def test_a_scene_of_context_routes_still_serves_a_request_without_context(pipeline):
    cfg = dataclasses.replace(pipeline.cfg, scenes={"pdp": {"routes": {"similar": 1.0}, "order": "recall"}})
    st = Strategy(cfg)
    assert st.resolve(st.scene_code["pdp"], 0).weights[ROUTES.index("popular")] > 0  # the fallback is added
    from runtime.pipeline import Pipeline

    p = Pipeline(pipeline.bundle.path, cfg=cfg)
    assert len(p.recommend([-3], 5, scene="pdp")[0][0]) == 5


def test_internal_steps_refuse_strategy_codes_outside_the_config(pipeline):
    t = pipeline.run(pipeline.request([-3], 5), stop="retrieval")
    for step in ("retrieval", "topk"):
        impl = pipeline.steps[step]
        bad = {x.name: t.get(x.name) for x in impl.step.inputs}
        bad["strategy"] = np.array([[7, 0]], np.int32)
        with pytest.raises(RequestError, match="strategy scene code must be in 0..2"):
            impl.check(bad)


def test_the_training_lists_fuse_the_routes_the_home_scene_starts_from():
    home = Strategy(ServeConfig()).resolve(0, 0).weights
    np.testing.assert_array_equal(home > 0, (TRAINING_WEIGHTS > 0) | (np.array(ROUTES) == "trending"))


def test_scenes_in_process(pipeline):
    table = pipeline.item_table
    store = pipeline.bundle.npz("user_store")
    user = int(store["user_id"][store["activity"] > 0][0])
    cats = table["category_code"]
    row = {int(i): j for j, i in enumerate(table["item_ids"])}
    context = [int(table["item_ids"][row_]) for row_ in table["popular_rows"][:2]]
    detail = pipeline.recommend([user], 10, scene="item_detail", context_item_ids=context, with_routes=True)[0]
    assert len(detail[0]) == 10 and not set(detail[0].tolist()) & set(context)
    similar = (1 << ROUTES.index("similar")) | (1 << ROUTES.index("similar_ann"))
    assert (detail[3] & similar).all()  # every item from a similar-items route (attribution: the scene's routes only)
    cart = pipeline.recommend([user], 10, scene="cart", context_item_ids=context, with_routes=True)[0]
    assert not {cats[row[int(i)]] for i in cart[0]} & {cats[row[i]] for i in context}  # no substitutes
    home = pipeline.recommend([user], 10, with_routes=True)[0]
    assert not (home[3] & similar).any()  # home sent no context: the context routes stay off
    with pytest.raises(RequestError, match=r"scene must be one of \['home', 'item_detail', 'cart'\], got 'checkout'"):
        pipeline.recommend([user], 10, scene="checkout")
    with pytest.raises(RequestError, match=r"context_item_ids: at most 50 items"):
        pipeline.recommend([user], 10, scene="cart", context_item_ids=list(range(51)))
    with pytest.raises(RequestError, match=r"force_arms: at most 1024 characters, got 1030"):  # not cut silently
        pipeline.recommend([user], 10, force_arms=" " * 1030)
    # unknown context ids are ignored (and counted): a cold request still gets the fallback
    ids = pipeline.recommend([user], 5, scene="item_detail", context_item_ids=[-7])[0][0]
    assert len(ids) == 5


def test_a_failing_route_degrades_to_the_others(pipeline):
    gen = pipeline.steps["retrieval"].generator
    store = pipeline.bundle.npz("user_store")
    user = int(store["user_id"][store["activity"] > 0][0])
    before = pipeline.recommend([user], 10)[0][0]
    index, gen.index = gen.index, object()  # FAISS calls on this fail
    try:
        pipeline.steps["retrieval"].take_counts()
        t = pipeline.run(pipeline.request([user], 10), stop="candidate_features")
        errors = pipeline.steps["retrieval"].take_counts().get(("shoprec_route_errors_total", (("route", "ann"),)))
        assert errors == 1 and (t["candidate_rows"] >= 0).sum() == t["candidate_rows"].shape[1]
        assert len(pipeline.recommend([user], 10)[0][0]) == 10
    finally:
        gen.index = index
    np.testing.assert_array_equal(pipeline.recommend([user], 10)[0][0], before)


def test_blends_weigh_the_rankers_probabilities(pipeline, cfg):
    """The exported score is the blend (1, ranking.cvr_weight, 0); other blends re-order by pCTR, pCTR*pCVR and the
    item's value (its price over the median price); a scene or an arm sets one, a request overrides it within limits."""
    store = pipeline.bundle.npz("user_store")
    users = store["user_id"][store["activity"] > 0][:3]
    default = pipeline.recommend(users, 10)
    same = pipeline.recommend(users, 10, blend=[1.0, cfg.ranking.cvr_weight, 0.0])
    for a, b in zip(default, same):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
    t = pipeline.rank(pipeline.request(users[:1], 10))
    probs, rows = t["ranking_probs"][0], t["candidate_rows"][0]
    value = pipeline.steps["topk"].value
    assert value is not None and abs(float(np.median(value[value > 0])) - 1.0) < 1e-6  # the tiny shop has prices
    want = probs[:, 0] * probs[:, 1] * value[np.maximum(rows, 0)]
    ids, scores, _ = pipeline.recommend(users[:1], 10, blend=[0.0, 0.0, 1.0])[0]
    np.testing.assert_allclose(scores, np.sort(want[rows >= 0])[::-1][:10], rtol=1e-5)  # expected revenue order
    for blend, message in (([0.0, 0.0, 0.0], "at least one weight > 0"), ([11.0, 0.0, 0.0], r"each in \[0, 10\]"),
                           ([-1.0, 1.0, 0.0], r"each in \[0, 10\]")):
        with pytest.raises(RequestError, match=message):
            pipeline.recommend(users[:1], 10, blend=blend)
    with pytest.raises(StrategyError, match=r"serve.scenes.x.blend must be a table of \['ctr', 'cvr', 'value'\]"):
        Strategy(dataclasses.replace(ServeConfig(), scenes={"x": {"routes": {"popular": 1.0}, "blend": {"price": 1.0}}}))
    st = Strategy(dataclasses.replace(ServeConfig(), scenes={"x": {"routes": {"popular": 1.0}, "blend": {"value": 2.0}}}))
    np.testing.assert_array_equal(st.resolve(st.scene_code["x"], 0).blend, [0.0, 0.0, 2.0])
    assert st.resolve(st.scene_code["home"], 0).blend is None
