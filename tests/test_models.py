"""Modules, losses, the recall routes, a short training run on planted data, fail-fast, ONNX parity,
FAISS, manifests and lineage."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from runtime.candidates import DENSE_FEATURES, ROUTES, CandidateGenerator, CategoryPrior, ItemNeighbours, _fuse, _position, popularity_bias
from runtime.faiss_search import augment, recall_vs_exact, search
from shoprec import contract
from shoprec.config import IndexConfig
from shoprec.manifest import ArtifactError, sha256_file, verify_manifest, verify_tree, write_manifest
from training import metrics as M
from training.cf import _top_abs_dense, active_items, ease_block, ease_items, to_neighbours
from training.index import build_index
from training.modules import FieldArch, Ranker, RankerServing, SequenceEncoder, TargetAttention, TwoTower, sampled_softmax_loss


def _two_tower(seq_len=5):
    torch.manual_seed(0)
    # user fields: 0 id, 1 age, 2-3 two slots of one history list (one table); item: id + genre
    return TwoTower([50, 7, 9, 9], [0, 1, 2, 2], [1, 2, 3], 2, [30, 6], [0, 1], 3, seq_len, out_dim=8, hidden=[16],
                    id_dim=4, field_dim=4)


def test_towers_shapes_normalisation_and_empty_history():
    m = _two_tower().eval()
    cat, cont = torch.tensor([[3, 2, 5, 0], [49, 2, 0, 0]]), torch.randn(2, 2)
    seq = torch.tensor([[4, 7, 0, 0, 0], [0, 0, 0, 0, 0]])  # the second user has no history
    kinds = torch.tensor([[2, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    u = m.user_tower(cat, cont, seq, kinds)
    v = m.item_tower(torch.randint(3, 6, (4, 2)), torch.randn(4, 3))
    assert u.shape == (2, 8) and v.shape == (4, 8) and torch.isfinite(u).all()
    torch.testing.assert_close(u.norm(dim=1), torch.ones(2))
    assert m.user_tower.sequence.items is m.item_tower.id_table  # one item-id table for both towers


def test_pooled_fields_ignore_padding_and_nulls():
    # fields: 0 id (unused), 1 age, 2-3 two slots of one history list (one table, mean-pooled)
    arch = FieldArch([50, 9, 9, 9], dim=4, tables=[0, 1, 2, 2], fields=[1, 2, 3])
    out = arch(torch.tensor([[5, 3, 0, 1], [5, 3, 4, 6]]))
    age, history = arch.tables[0].weight, arch.tables[1].weight
    torch.testing.assert_close(out[0, 0], age[3])
    torch.testing.assert_close(out[0, 1], torch.zeros(4))  # padding (0) and null (1) slots are left out
    torch.testing.assert_close(out[1, 1], (history[4] + history[6]) / 2)


def test_fused_fields_give_the_same_vectors_from_one_lookup():
    """FieldArch(fused=True), the form export writes: the tables laid end to end, one lookup, bit for bit the
    per-table vectors (pooled slots, single fields, a shared table, codes at each table's edges)."""
    torch.manual_seed(2)
    shared = torch.nn.Embedding(30, 4)
    arch = FieldArch([30, 9, 12, 12, 7], dim=4, tables=[0, 1, 2, 2, 3], fields=[0, 1, 2, 3, 4], shared={0: shared})
    assert arch.tables[0] is shared and arch.offsets.tolist() == [0, 30, 39, 39, 51]
    cat = torch.tensor([[29, 0, 11, 1, 6], [0, 8, 0, 0, 0], [5, 3, 4, 7, 2]])
    assert torch.equal(arch(cat, fused=True), arch(cat))
    assert torch.equal(arch(cat.unsqueeze(1).expand(3, 5, 5), fused=True), arch(cat.unsqueeze(1).expand(3, 5, 5)))
    seen = []
    handle = torch.nn.Module.register_forward_hook(shared, lambda *a: seen.append(1))
    arch(cat, fused=True)
    handle.remove()
    assert not seen  # the fused form does not call the tables one by one


def test_sequence_order_matters():
    torch.manual_seed(1)
    enc = SequenceEncoder(torch.nn.Embedding(20, 8), 4, 8).eval()
    a = enc(torch.tensor([[3, 4, 5, 0]]), torch.tensor([[2, 2, 1, 0]]))
    b = enc(torch.tensor([[5, 4, 3, 0]]), torch.tensor([[1, 2, 2, 0]]))
    assert not torch.allclose(a, b)  # positions and kinds are read: the same bag in another order differs


def test_logq_correction_lowers_the_logit_of_popular_negatives_by_their_log_q():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    v = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    ids = torch.arange(3)
    log_q = torch.tensor([2.0, 0.0, 0.0])  # item 0 is a popular (often sampled) negative
    got = sampled_softmax_loss(u, v, ids, log_q, 0.5)
    logits = u @ v.T / 0.5 - log_q[None, :]
    want = torch.nn.functional.cross_entropy(logits, ids)
    torch.testing.assert_close(got, want)
    # users 1 and 2 see item 0 as a negative with a lower logit, so their loss falls
    per_row = torch.nn.functional.cross_entropy(logits, ids, reduction="none")
    plain = torch.nn.functional.cross_entropy(u @ v.T / 0.5, ids, reduction="none")
    assert (per_row[1:] < plain[1:]).all()


def test_mixed_negatives_add_to_the_softmax_and_mask_the_positive():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    ids = torch.arange(4)
    base = sampled_softmax_loss(e, e, ids, None, 0.1)
    extra = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    assert sampled_softmax_loss(e, e, ids, None, 0.1, extra, torch.arange(10, 15)) > base
    # masking of a row's own positive among the extras: tests/test_fallbacks.py, against a hand-computed softmax


def test_target_attention_without_history_is_zero():
    att = TargetAttention(4)
    out = att(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.zeros(2, 5))
    torch.testing.assert_close(out, torch.zeros(2, 3, 4), atol=1e-3, rtol=0)


@pytest.mark.parametrize("deep", [True, False])
def test_ranker_shapes_and_serving_scores(deep):
    torch.manual_seed(0)
    ids = torch.nn.Embedding(30, 4)
    r = Ranker([50, 7], [0, 1], [1], 2, [30, 6], [0, 1], 3, 7, 5, dim=4, bottom=[8, 4], top=[8], id_table=ids, deep=deep)
    args = (torch.tensor([[3, 2]]), torch.randn(1, 2), torch.tensor([[4, 5, 0, 0, 0]]), torch.tensor([[2, 1, 0, 0, 0]]),
            torch.randint(3, 6, (1, 11, 2)), torch.randn(1, 11, 3), torch.randn(1, 11, 7))
    assert r(*args).shape == (1, 11, 2)
    s, p = RankerServing(r.eval(), cvr_weight=1.0)(*args)
    assert s.shape == (1, 11) and ((s >= 0) & (s <= 2)).all()
    assert p.shape == (1, 11, 2) and torch.allclose(s, p[..., 0] * (1 + p[..., 1]))  # the blend the top-k step recomputes
    assert not r.item_ids.weight.requires_grad  # the two-tower's item-id table, frozen


def test_user_item_crosses_let_a_user_feature_reorder_the_list(tmp_path):
    """Wide alone, a user feature adds the same to every candidate of the list; the cross term (ranking.user_item_cross)
    is sum_uc x_u W[u, head, c] x_c over standardised features, zero at the start."""
    torch.manual_seed(0)
    ids = torch.nn.Embedding(30, 4)
    r = Ranker([50, 7], [0, 1], [1], 2, [30, 6], [0, 1], 3, 7, 5, dim=4, bottom=[8, 4], top=[8], id_table=ids, deep=False,
               cross=True).eval()
    plain = Ranker([50, 7], [0, 1], [1], 2, [30, 6], [0, 1], 3, 7, 5, dim=4, bottom=[8, 4], top=[8], id_table=ids,
                   deep=False).eval()
    plain.wide.load_state_dict(r.wide.state_dict())
    args = [torch.tensor([[3, 2]]), torch.randn(1, 2), torch.tensor([[4, 5, 0, 0, 0]]), torch.tensor([[2, 1, 0, 0, 0]]),
            torch.randint(3, 6, (1, 11, 2)), torch.randn(1, 11, 3), torch.randn(1, 11, 7)]
    torch.testing.assert_close(r(*args), plain(*args))  # zero-initialised: the wide ranker it starts from
    with torch.no_grad():
        r.cross.normal_()
    x = torch.cat([args[1].unsqueeze(1).expand(1, 11, 2), args[5], args[6]], -1)
    w = r.cross.reshape(2, 2, 10)
    want = plain(*args) + torch.einsum("bnu,ukc,bnc->bnk", x[..., :2], w, x[..., 2:])
    torch.testing.assert_close(r(*args), want)
    other = [*args[:1], args[1] + 3.0, *args[2:]]  # another user, the same candidates
    order = lambda m, a: m(*a)[0, :, 0].argsort()  # noqa: E731
    assert torch.equal(order(plain, args), order(plain, other))
    assert not torch.equal(order(r, args), order(r, other))
    from training.export import _export, parity

    serving = RankerServing(r, cvr_weight=1.0)  # exported with a variable candidate count, as export writes it
    _export(serving, tuple(args), tmp_path / "ranker.onnx", "ranker")
    assert parity(tmp_path / "ranker.onnx", serving, tuple(a[:, :5] if a.dim() == 3 else a for a in args), "ranker") < 1e-5


def test_a_ranker_input_constant_in_training_is_ignored_not_blown_up():
    """One category in the catalog: the category affinity is 1 for every training candidate. An unknown user's 0
    once became (0 - 1) / 1e-6 and saturated every score; such an input now reads as its mean."""
    torch.manual_seed(0)
    ids = torch.nn.Embedding(30, 4)
    r = Ranker([50, 7], [0, 1], [1], 2, [30, 6], [0, 1], 3, 7, 5, dim=4, bottom=[8, 4], top=[8], id_table=ids).eval()
    std = torch.ones(12)
    std[5] = 0.0  # cand_dense[..., 0], after 2 user and 3 item columns
    mean = torch.zeros(12)
    mean[5] = 1.0
    r.set_normalisation(mean, std)
    dense = torch.randn(1, 11, 7)
    args = [torch.tensor([[3, 2]]), torch.randn(1, 2), torch.tensor([[4, 5, 0, 0, 0]]), torch.tensor([[2, 1, 0, 0, 0]]),
            torch.randint(3, 6, (1, 11, 2)), torch.randn(1, 11, 3)]
    seen = r(*args, dense.clone().index_fill_(2, torch.tensor([0]), 1.0))
    unseen = r(*args, dense.clone().index_fill_(2, torch.tensor([0]), 0.0))
    torch.testing.assert_close(seen, unseen)
    assert torch.isfinite(seen).all() and seen.std() > 0


def test_item_neighbours_score_like_the_dense_product():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(6, 6)).astype(np.float32)
    nb = to_neighbours(_top_abs_dense(b, 3))
    dense = nb_dense = np.zeros((6, 6), np.float32)
    for i in range(6):
        nb_dense[i, nb.indices[nb.indptr[i]:nb.indptr[i + 1]]] = nb.values[nb.indptr[i]:nb.indptr[i + 1]]
    # each row keeps its 3 largest |weights|
    assert all(set(np.flatnonzero(dense[i])) == set(np.argsort(-np.abs(b[i]))[:3]) for i in range(6))
    hist = (np.array([0, 2, 3]), np.array([1, 4, 5]))  # user 0: items 1, 4; user 1: item 5
    want = np.stack([nb_dense[[1, 4]].sum(0), nb_dense[5]])
    np.testing.assert_allclose(nb.scores(*hist), want, rtol=1e-6)


def test_item_neighbours_refuse_malformed_arrays_naming_the_fault():
    ok = {"indptr": np.array([0, 2, 3]), "indices": np.array([1, 0, 0]), "values": np.array([0.5, 1.0, 2.0], np.float32)}
    assert ItemNeighbours.from_arrays(ok).n_items == 2
    for change, message in (({"indptr": np.array([0, 3, 2])}, "malformed CSR arrays"),
                            ({"indptr": np.zeros(0, np.int64)}, "malformed CSR arrays"),
                            ({"indices": np.array([1, 0, 2])}, r"indices outside 0\.\.1"),
                            ({"values": np.array([0.5, np.nan, np.inf], np.float32)}, "2 weights are NaN or infinite")):
        with pytest.raises(ValueError, match=message):
            ItemNeighbours.from_arrays({**ok, **change})


@pytest.mark.parametrize("per_item", [5, 90])
def test_item_neighbours_give_the_same_entries_by_rows_or_by_index(monkeypatch, per_item):
    """Long neighbour rows are copied row by row, short ones gathered through an index: the same entries in the
    same order either way, for one user and for several, with and without per-action weights."""
    import runtime.candidates as C

    rng = np.random.default_rng(per_item)
    n = 400
    lengths = rng.integers(0, 2 * per_item, n)
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    nb = ItemNeighbours.from_arrays({"indptr": indptr, "indices": rng.integers(0, n, indptr[-1]),
                                     "values": rng.normal(size=indptr[-1]).astype(np.float32)})
    for users in ([0, 40], [0, 3, 3, 50, 51]):
        hist_indptr = np.array(users, np.int64)
        rows = rng.integers(0, n, users[-1])
        weights = rng.random(len(rows))
        dense = np.zeros((len(users) - 1, n))
        for u in range(len(users) - 1):
            for r, w in zip(rows[users[u]:users[u + 1]], weights[users[u]:users[u + 1]]):
                np.add.at(dense[u], nb.indices[indptr[r]:indptr[r + 1]], w * nb.values[indptr[r]:indptr[r + 1]])
        got = {}
        for long_rows in (1, 10**9):
            monkeypatch.setattr(C, "LONG_ROWS", long_rows)
            got[long_rows] = (nb._entries(hist_indptr, rows), nb._entries(hist_indptr, rows, weights),
                              nb.scores(hist_indptr, rows, weights))
        for a, b in zip(got[1][:2], got[10**9][:2]):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(got[1][2], got[10**9][2])
        np.testing.assert_allclose(got[1][2], dense, rtol=1e-5, atol=1e-5)


def test_ease_weights_have_zero_diagonal_and_reconstruct():
    import scipy.sparse as sp

    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], np.float32))
    b = ease_block(x, 0.5, np.arange(4))
    assert np.allclose(np.diag(b), 0)
    scores = np.asarray(x[0] @ b).ravel()
    assert scores[2] > scores[3]  # item 2 co-occurs with item 1, item 3 with neither of user 0's items


def test_ease_over_the_active_items_equals_ease_over_the_whole_catalog():
    """Items nobody touched are decoupled in EASE: inverting over the active items alone gives the same
    weights, and the idle items get none."""
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    dense = (rng.random((40, 12)) < 0.3).astype(np.float32)
    dense[:, [2, 7, 11]] = 0  # never interacted with
    x = sp.csr_matrix(dense)
    active = [i for i in range(12) if i not in (2, 7, 11)]
    assert list(active_items(x)) == active and list(ease_items(x, 12_000)) == active
    b = ease_block(x, 2.0, np.array(active))
    g = dense.T.astype(np.float64) @ dense + 2.0 * np.eye(12)
    p = np.linalg.inv(g)
    want = -p / np.diag(p)
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(b, want[np.ix_(active, active)], atol=1e-5)
    assert not want[[2, 7, 11]].any() and not want[:, [2, 7, 11]].any()  # what leaving them out drops


def test_ease_over_a_bigger_catalog_is_fitted_over_its_most_active_items():
    """Above cf.ease_max_items active items, EASE covers the most interacted-with ones: the route's weights are
    EASE's over exactly those (the strongest per item), the others have none, and the evaluation's scorer ranks
    them after every covered item."""
    from dataclasses import replace

    import scipy.sparse as sp

    from shoprec.config import CFConfig
    from training.cf import EaseScorer, ease_block, ease_items, fit_neighbours

    rng = np.random.default_rng(5)
    pop = np.linspace(0.6, 0.05, 30)
    dense = (rng.random((200, 30)) < pop).astype(np.float32)
    dense[:, 29] = 0  # never interacted with
    x = sp.csr_matrix(dense)
    cfg = replace(CFConfig(), ease_max_items=10, neighbours=500)
    head = ease_items(x, 10)
    assert list(head) == list(np.sort(np.argsort(-dense.sum(0), kind="stable")[:10])) and len(ease_items(x, 50)) == 29
    route = fit_neighbours(x, cfg, 2.0)
    w = sp.csr_matrix((route.values, route.indices, route.indptr), shape=(30, 30)).toarray()
    tail = np.setdiff1d(np.arange(30), head)
    assert not w[tail].any() and not w[:, tail].any()
    np.testing.assert_allclose(w[np.ix_(head, head)], ease_block(x, 2.0, head), atol=1e-6)
    scores = EaseScorer(x, 2.0, 10)(x[:5])
    assert np.isneginf(scores[:, tail]).all() and np.isfinite(scores[:, head]).all()
    assert CFConfig().method == "auto" and fit_neighbours(x, replace(cfg, method="knn")).indptr[-1] > 0  # kNN: every item


def _generator(n_items=8, exempt=None):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n_items, 4)).astype(np.float32)
    full = np.ones((n_items, n_items), np.float32) - np.eye(n_items, dtype=np.float32)
    nb = to_neighbours(_top_abs_dense(full * rng.random((n_items, n_items)).astype(np.float32), 3))
    return CandidateGenerator(emb, None, nb, nb, np.arange(n_items), 5, 2, exempt), emb


def test_candidates_never_hold_a_seen_item_unless_exempt_or_asked():
    gen, emb = _generator()
    indptr, rows, kinds = np.array([0, 3, 3]), np.array([0, 1, 2]), np.array([2, 1, 2])
    cand, dense, lists = gen(emb[:2], indptr, rows, kinds)
    assert not set(cand[0]) & {0, 1, 2} and (cand >= 0).all() and dense.shape == (2, 5, len(DENSE_FEATURES))
    assert (lists["cf_all"][1] == -1).all() and (lists["cf_pos"][1] == -1).all()  # no history: ANN + popular only
    kept, _, _ = gen(emb[:2], indptr, rows, kinds, exclude_seen=np.array([False, True]))
    assert set(kept[0]) & {0, 1, 2}
    gen2, _ = _generator(exempt=np.isin(np.arange(8), [1]))
    cand2, _, _ = gen2(emb[:1], indptr[:2], rows, kinds)
    assert not set(cand2[0]) & {0, 2}  # item 1 is of a repeat-purchase category: it may come back


def test_popular_route_is_the_popularity_order_without_each_users_seen_items():
    rng = np.random.default_rng(3)
    n_items, n = 200, 20
    popular = rng.permutation(n_items)
    gen = CandidateGenerator(rng.normal(size=(n_items, 4)).astype(np.float32), None, *(2 * [to_neighbours(
        _top_abs_dense(rng.random((n_items, n_items)).astype(np.float32), 3))]), popular, n, 2)
    lengths = np.array([0, 1, 30, 150])  # the last user has seen most of the catalog: 50 items left
    indptr = np.r_[0, np.cumsum(lengths)]
    rows = np.concatenate([rng.choice(n_items, size=k, replace=False) for k in lengths])
    _, _, lists = gen(np.zeros((4, 4), np.float32), indptr, rows, np.full(len(rows), 2))
    for u in range(4):
        seen = set(rows[indptr[u]:indptr[u + 1]].tolist())
        want = [int(i) for i in popular if i not in seen][:n]
        assert lists["popular"][u].tolist() == want


def test_category_route_is_the_users_categories_times_the_items_share_of_them():
    # items 0-3 in category 0, 4-7 in category 1, 8-9 without; popularity inside each category differs
    category = np.array([0, 0, 0, 0, 1, 1, 1, 1, -1, -1])
    popularity = np.array([9, 3, 0, 0, 1, 5, 2, 0, 50, 50])
    prior = CategoryPrior.from_popularity(category, popularity, decay=0.5)
    np.testing.assert_allclose(prior.p_in_category[:4], np.array([10, 4, 1, 1]) / 16, rtol=1e-6)
    assert (prior.p_in_category[8:] == 0).all()
    indptr, rows = np.array([0, 3, 3]), np.array([0, 4, 5])  # user 0: one action in cat 0, then two in cat 1
    shares = prior.shares(indptr, rows)
    w = np.array([0.25, 0.5, 1.0])  # the latest action weighs 1, each older one half as much
    np.testing.assert_allclose(shares[0], [w[0] / w.sum(), w[1:].sum() / w.sum()])
    assert (shares[1] == 0).all()  # no history
    rng = np.random.default_rng(0)
    nb = to_neighbours(_top_abs_dense(rng.random((10, 10)).astype(np.float32), 3))
    gen = CandidateGenerator(rng.normal(size=(10, 4)).astype(np.float32), None, nb, nb, np.argsort(-popularity), 4, 2,
                             categories=prior)
    _, dense, lists = gen(np.zeros((2, 4), np.float32), indptr, rows, np.full(3, 2))
    assert lists["category"][0].tolist() == [6, 7, 1, 2]  # cat 1 first (unseen, by popularity), then cat 0's best unseen
    assert (lists["category"][1] == -1).all()  # without history the route is empty
    assert dense.shape[2] == len(DENSE_FEATURES)
    # smoothed: (W * shares + alpha * the catalog's category shares) / (W + alpha), W the decayed action count
    smooth = CategoryPrior.from_popularity(category, popularity, decay=0.5, smoothing=3.5)
    np.testing.assert_allclose(smooth.global_share, [16 / 28, 12 / 28])
    np.testing.assert_allclose(smooth.shares(indptr, rows)[0], (w.sum() * shares[0] + 3.5 * smooth.global_share) / (w.sum() + 3.5))
    assert (smooth.shares(indptr, rows)[1] == 0).all()  # still no shares without history: the route stays empty
    with pytest.raises(ValueError, match="category smoothing must be a finite number >= 0; got -1"):
        CategoryPrior.from_popularity(category, popularity, smoothing=-1)


@pytest.mark.parametrize("index,seed,n,smoothing", [("none", 11, 60, 0.0), ("flat", 11, 60, 0.0), ("flat", 12, 60, 0.0),
                                                    ("none", 13, 60, 0.0), ("flat", 14, 8, 0.0), ("flat", 15, 60, 5.0),
                                                    ("none", 16, 8, 2.0)])
def test_sparse_routes_give_the_dense_routes_lists_and_features(index, seed, n, smoothing):
    """Large catalogs keep per-user tables sparse (runtime/sparse_routes.py); on random catalogs both give the same
    candidates, features, route lists and route masks: negative item-to-item weights (EASE), ties in the category
    route (equal popularity), exempt repeat categories, unavailable items, context items and a cart's categories,
    users without history or without positives, per-user fusion weights, and lists that need zero-score fills. With
    few candidates (n = 8) a category holds more than a user needs, and the category route skips what cannot win; with
    its shares smoothed, every category is in play for every user with history."""
    import faiss

    rng = np.random.default_rng(seed)
    n_items, n_cat = 400, 7
    emb = rng.normal(size=(n_items, 8)).astype(np.float32)
    w = rng.normal(size=(n_items, n_items)).astype(np.float32) * (rng.random((n_items, n_items)) < 0.05)
    cf_all = to_neighbours(_top_abs_dense(w, 12))
    cf_pos = to_neighbours(_top_abs_dense(np.abs(w[::-1]), 6))
    copurchase = to_neighbours(_top_abs_dense(np.abs(w.T), 4))
    category = np.where(rng.random(n_items) < 0.1, -1, rng.integers(0, n_cat, n_items))
    # many equal popularities: category-route ties; distinct ones (n = 8) for the category route's pruning
    popularity = rng.choice([0.0, 1.0, 5.0, 40.0], n_items) if n > 8 else rng.pareto(1.1, n_items) * 10
    prior = CategoryPrior.from_popularity(category, popularity, smoothing=smoothing)  # smoothed: every category in play
    exempt = category == 3
    flat = None
    if index == "flat":
        flat = faiss.IndexFlatIP(8)
        flat.add(emb)
    kw = dict(item_embeddings=emb, index=flat, cf_all=cf_all, cf_pos=cf_pos, popular_rows=np.argsort(-popularity),
              n_candidates=n, recent_window=3, exempt=exempt, categories=prior, trending_rows=rng.permutation(n_items)[:90],
              copurchase=copurchase)
    dense, sparse = CandidateGenerator(**kw, sparse=False), CandidateGenerator(**kw, sparse=True)
    assert sparse.sparse and not dense.sparse
    lengths = np.array([0, 1, 4, 25, 120, 2, 0, 9])
    u = len(lengths)
    indptr = np.r_[0, np.cumsum(lengths)]
    rows = np.concatenate([rng.choice(n_items, size=k, replace=False) for k in lengths])
    kinds = rng.integers(1, 5, len(rows))
    kinds[indptr[5]:indptr[6]] = 1  # a user without positives
    ctx_lengths = np.array([1, 0, 2, 0, 3, 1, 1, 0])
    ctx_indptr = np.r_[0, np.cumsum(ctx_lengths)]
    ctx_rows = rng.choice(n_items, size=int(ctx_lengths.sum()), replace=False)
    weights = np.tile(np.array([1.0 if r != "trending" else 0.5 for r in ROUTES]), (u, 1))
    weights[1, ROUTES.index("ann")] = 0.0
    weights[2] *= np.linspace(0.2, 2.0, len(ROUTES))
    args = (rng.normal(size=(u, 8)).astype(np.float32), indptr, rows, kinds)
    options = dict(exclude_seen=np.array([True, True, False, True, True, True, True, True]), with_routes=True,
                   unavailable=rng.choice(n_items, 15, replace=False), weights=weights, context=(ctx_indptr, ctx_rows),
                   exclude_context_categories=np.array([False, False, True, False, True, True, False, False]))
    a, b = dense(*args, **options), sparse(*args, **options)
    assert a[2].keys() == b[2].keys()
    for route in a[2]:
        np.testing.assert_array_equal(a[2][route], b[2][route], err_msg=route)
    for x, y in ((a[0], b[0]), (a[1], b[1]), (a[3], b[3])):
        np.testing.assert_array_equal(x, y)
    assert (a[2]["cf_all"][:, -1] >= 0).sum() >= 3  # every list full: zero-score fills were made where needed
    assert {r for r in a[2] if (a[2][r] >= 0).any()} >= {"cf_all", "cf_pos", "ann", "category", "similar", "copurchase"}


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_the_ann_route_gives_a_user_the_same_list_alone_or_batched(kind):
    """An approximate index searches wider for a larger k (HNSW's ef, IVF's exact fallback when the probed lists
    run short), so each user's k comes from their own blocked items (ann_margin), never the batch's: a light user's
    list is the same beside a heavy one as alone, and a user past the margin's first step still gets n items."""
    from runtime.candidates import ANN_MARGIN_MIN, ann_margin

    assert ann_margin(np.array([0, 1, 64, 65, 300])).tolist() == [ANN_MARGIN_MIN, 64, 64, 128, 512]
    rng = np.random.default_rng(4)
    n_items = 3000
    emb = rng.normal(size=(n_items, 16)).astype(np.float32)
    index, _ = build_index(emb, IndexConfig(kind=kind, ivf_nprobe=2, hnsw_ef_search=40), kind=kind)
    nb = ItemNeighbours.empty(n_items)  # the ann route alone matters here
    gen = CandidateGenerator(emb, index, nb, nb, np.arange(n_items), 60, 2, sparse=True)
    lengths = np.array([3, 400, 0, 10, 150])
    rows = np.concatenate([rng.choice(n_items, size=k, replace=False) for k in lengths])
    indptr = np.r_[0, np.cumsum(lengths)]
    user_emb = rng.normal(size=(len(lengths), 16)).astype(np.float32)
    kinds = np.full(len(rows), 2)
    batched = gen(user_emb, indptr, rows, kinds)[2]["ann"]
    for u in range(len(lengths)):
        alone = gen(user_emb[u : u + 1], np.r_[0, lengths[u]], rows[indptr[u] : indptr[u + 1]], kinds[: lengths[u]])[2]["ann"]
        np.testing.assert_array_equal(alone[0], batched[u], err_msg=f"user {u}")
    assert (batched >= 0).all()  # the heavy users' lists are full too


def test_sparse_routes_match_dense_on_a_catalog_smaller_than_the_lists():
    """A catalog of 30 with 25 candidates: users run out of items, and EASE-like negative scores fill the end."""
    rng = np.random.default_rng(5)
    n_items = 30
    w = rng.normal(size=(n_items, n_items)).astype(np.float32)
    nb = to_neighbours(_top_abs_dense(w, 20))
    prior = CategoryPrior.from_popularity(rng.integers(0, 3, n_items), rng.integers(0, 4, n_items).astype(float))
    kw = dict(item_embeddings=rng.normal(size=(n_items, 4)).astype(np.float32), index=None, cf_all=nb, cf_pos=nb,
              popular_rows=rng.permutation(n_items), n_candidates=25, recent_window=2, categories=prior)
    lengths = np.array([3, 12, 0, 20])
    indptr = np.r_[0, np.cumsum(lengths)]
    rows = np.concatenate([rng.choice(n_items, size=k, replace=False) for k in lengths])
    args = (rng.normal(size=(4, 4)).astype(np.float32), indptr, rows, np.full(len(rows), 2))
    a = CandidateGenerator(**kw, sparse=False)(*args, with_routes=True, unavailable=np.array([[1, -1], [2, 3], [-1, -1], [4, 5]]))
    b = CandidateGenerator(**kw, sparse=True)(*args, with_routes=True, unavailable=np.array([[1, -1], [2, 3], [-1, -1], [4, 5]]))
    for route in a[2]:
        np.testing.assert_array_equal(a[2][route], b[2][route], err_msg=route)
    for x, y in ((a[0], b[0]), (a[1], b[1]), (a[3], b[3])):
        np.testing.assert_array_equal(x, y)
    s_all = nb.scores(indptr[:2], rows[:3])[0]
    assert (s_all[a[2]["cf_all"][0][a[2]["cf_all"][0] >= 0]] < 0).any()  # negative scores were placed, in order
    assert (a[2]["cf_all"][3] == -1).any()  # this user has fewer items left than the list holds
    assert not {1} & set(a[0][0].tolist()) and not {4, 5} & set(a[0][3].tolist())  # unavailable per user


@pytest.mark.parametrize("n", [1, 5, 40])
def test_the_category_route_keeps_every_item_tying_past_its_cut(n):
    """Categories far larger than a list, whose tails tie (items nobody acted on share one P(item | category), and
    float32 rounds some products of unequal P to one score): the sparse route finds every item tying with its cut
    in one pass and ranks them by row as the dense route does, blocked items skipped (each category's cut counts
    the user's blocked items in that category only) and a user's blocked category left out."""
    from runtime.sparse_routes import Blocked, CategoryScores, DenseScores

    rng = np.random.default_rng(n)
    n_items, n_users = 3000, 6
    category = rng.integers(0, 4, n_items)
    category[rng.random(n_items) < 0.05] = -1
    p = np.full(n_items, 1e-4, np.float32)  # the tied tail
    head = rng.random(n_items) < 0.01
    p[head] = rng.choice([0.02, 0.01], int(head.sum()))
    near = rng.random(n_items) < 0.2  # a hair apart: float32 products may round together
    p[near] *= np.float32(1) + rng.integers(-3, 4, int(near.sum())).astype(np.float32) * np.float32(1e-7)
    p[category < 0] = 0
    shares = rng.dirichlet(np.ones(4), n_users) * (rng.random((n_users, 4)) < 0.8)
    shares[0] = 0  # no history
    users = np.repeat(np.arange(n_users), 30)
    items = rng.integers(0, n_items, len(users))
    whole = np.zeros((n_users, 4), bool)
    whole[2, 1] = True  # a cart request's category
    blocked = Blocked.build(n_users, n_items, users, items, None, True, category, whole)
    sparse = CategoryScores(shares, category, p, *CategoryScores.index(category, p)).top(blocked, n)
    scores = np.where(category >= 0, shares[:, np.maximum(category, 0)] * p[None, :], 0).astype(np.float32)
    dense = DenseScores(scores).top(Blocked.build(n_users, n_items, users, items, None, False, category, whole), n, fill=False)
    np.testing.assert_array_equal(sparse, dense)
    assert (sparse[1:, -1] >= 0).all()  # every list with history was filled from the tied tail


@pytest.mark.parametrize("n", [1, 5, 20])
def test_each_category_cut_makes_room_for_the_users_blocked_items_in_it(n):
    """Distinct P (no ties to hide a short cut), users who blocked many of a category's best items and many
    elsewhere: each category's cut holds n + the user's blocked items in that category, and the lists equal the
    dense route's."""
    from runtime.sparse_routes import Blocked, CategoryScores, DenseScores

    rng = np.random.default_rng(11 + n)
    n_items, n_users, n_cat = 2000, 8, 5
    category = rng.integers(0, n_cat, n_items)
    p = rng.permutation(np.linspace(1e-3, 1.0, n_items)).astype(np.float32)
    shares = rng.dirichlet(np.ones(n_cat), n_users)
    best = np.argsort(-p, kind="stable")
    users, items = [], []
    for u in range(n_users):  # each user: the best items of one category, and a spread elsewhere
        mine = best[category[best] == u % n_cat][: 3 * n]
        others = rng.choice(np.flatnonzero(category != u % n_cat), 40 * (u % 3), replace=False)
        items += [*mine, *others]
        users += [u] * (len(mine) + len(others))
    users, items = np.array(users), np.array(items)
    blocked = Blocked.build(n_users, n_items, users, items, None, True, category, None)
    sparse = CategoryScores(shares, category, p, *CategoryScores.index(category, p)).top(blocked, n)
    scores = (shares[:, category] * p[None, :]).astype(np.float32)
    dense = DenseScores(scores).top(Blocked.build(n_users, n_items, users, items, None, False, category, None), n, fill=False)
    np.testing.assert_array_equal(sparse, dense)


def test_the_category_bound_is_not_taken_from_subnormal_scores():
    """float32 rounds subnormal products by far more than its usual relative error: a tiny share (thousands of
    decayed actions ago) must not prune items the dense route would rank."""
    from runtime.sparse_routes import Blocked, CategoryScores, DenseScores

    category = np.array([1, 1, 1, 0])
    p = np.array([1.0, 0.37, 0.364, 1.0], np.float32)
    shares = np.array([[1.0, 1e-44]])
    blocked = Blocked.build(1, 4, np.zeros(0, np.int64), np.zeros(0, np.int64), None, True, category, None)
    sparse = CategoryScores(shares, category, p, *CategoryScores.index(category, p)).top(blocked, 3)
    dense = DenseScores((shares[:, category] * p[None, :]).astype(np.float32)).top(blocked, 3, fill=False)
    np.testing.assert_array_equal(sparse, dense)


def test_a_subnormal_or_zero_cut_finds_its_tied_tail_as_the_dense_route():
    """A category touched thousands of decayed actions ago: its cut scores subnormal or 0, past the cut a long tail
    ties (one P for the items nobody acted on) and some products round together. The tied run's end is found by
    bisection (a zero cut keeps nothing: score-0 items are never proposed), the lists those of the dense route."""
    from runtime.sparse_routes import Blocked, CategoryScores, DenseScores

    rng = np.random.default_rng(7)
    n_items = 4000
    category = np.where(np.arange(n_items) < 3500, 0, 1)
    p = np.full(n_items, 2e-4, np.float32)
    p[:40] = rng.choice(np.array([0.05, 0.02, 2.0001e-4, 1.9999e-4], np.float32), 40)
    shares = np.array([[1e-40, 0.0], [1e-42, 0.5], [1e-46, 0.0], [3e-39, 1e-3], [0.0, 0.0]])
    users = np.array([1, 3, 3]); items = np.array([5, 2, 3700])
    blocked = Blocked.build(len(shares), n_items, users, items, None, True, category, None)
    dense_blocked = Blocked.build(len(shares), n_items, users, items, None, False, category, None)
    scores = (shares[:, category] * p[None, :]).astype(np.float32)
    for n in (1, 3, 30, 60):
        sparse = CategoryScores(shares, category, p, *CategoryScores.index(category, p)).top(blocked, n)
        np.testing.assert_array_equal(sparse, DenseScores(scores).top(dense_blocked, n, fill=False))
    assert (sparse[0] >= 0).all() and (sparse[2] < 0).all()  # the subnormal tail fills a list; a zero one does not


@pytest.mark.parametrize("entries", [50, 4000])
def test_sparse_scores_sum_alike_in_order_or_in_one_table(monkeypatch, entries):
    """from_entries sums a few entries by ordering them, as many as half the cells in one [users, items] table: the
    same keys and float32 values either way (entries that cancel to 0 left out, repeated keys summed in order)."""
    import runtime.sparse_routes as sr

    rng = np.random.default_rng(entries)
    n_users, n_items = 3, 1000
    targets = rng.integers(0, n_users * n_items, entries)
    values = rng.choice(np.array([0.1, -0.1, 1e-8, 3.0, 7e5], np.float32), entries)
    targets = np.concatenate([targets, [17, 17]]); values = np.concatenate([values, [0.5, -0.5]]).astype(np.float32)
    got = {}
    for cells in (0, sr.DENSE_SUM_CELLS):
        monkeypatch.setattr(sr, "DENSE_SUM_CELLS", cells)
        got[cells] = sr.SparseScores.from_entries(targets, values, n_users, n_items)
    a, b = got.values()
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)
    want = np.bincount(targets, weights=values, minlength=n_users * n_items).astype(np.float32)
    np.testing.assert_array_equal(a.keys, np.flatnonzero(want))
    np.testing.assert_array_equal(a.values, want[want != 0])
    assert a.keys.dtype == b.keys.dtype == np.int64 and a.values.dtype == b.values.dtype == np.float32


def test_stable_order_is_a_stable_argsort_for_small_and_huge_keys():
    """One sort of key * 2^b + position where that fits 63 bits, argsort beyond: both the stable argsort."""
    from runtime.sparse_routes import stable_order

    rng = np.random.default_rng(3)
    for keys in (rng.integers(0, 50, 1000), rng.integers(0, 1 << 40, 3000), rng.integers(0, 1 << 62, 200),
                 np.array([5]), np.zeros(0, np.int64), np.full(70, 1 << 20), np.array([3, 1, 3, 0, 1]) << 28):
        keys = keys.astype(np.int32 if keys.max(initial=0) < 1 << 31 else np.int64)  # a narrow dtype is widened first
        ordered, order = stable_order(keys)
        want = np.argsort(keys, kind="stable")
        np.testing.assert_array_equal(order, want)
        np.testing.assert_array_equal(ordered, keys[want])


@pytest.mark.parametrize("n_users,max_item", [(20, 1000), (100, 1 << 24)])  # packed keys; too wide to pack
@pytest.mark.parametrize("by_key", [True, False])
def test_place_ranked_orders_by_value_then_row_within_each_user(n_users, max_item, by_key):
    """Each user's entries by value descending, ties by the lower row, the first n (after what the user already
    has); values tie often, one is -0.0 beside 0.0's neighbours, -inf is no value (as in _topn), and lists run
    short."""
    from runtime.sparse_routes import _Placer, _place_ranked

    rng = np.random.default_rng(n_users)
    m = 3000
    users = np.sort(rng.integers(0, n_users, m))
    items = rng.integers(0, max_item, m)
    keys = np.unique(users * max_item + items)
    users, items = keys // max_item, keys % max_item
    values = rng.choice(np.array([3.5, 2.0, 1e-30, -1.0, -0.0, 7.25, -np.inf], np.float32), len(keys))
    select = rng.random(len(keys)) < 0.9
    if not by_key:
        shuffle = rng.permutation(len(keys))
        users, items, values, select = users[shuffle], items[shuffle], values[shuffle], select[shuffle]
    placer = _Placer(n_users, 12)
    placer.place(np.array([3, 3]), np.array([max_item + 1, max_item + 2]))  # user 3 has two already
    _place_ranked(placer, users, items, values, select, by_key=by_key)
    for u in range(n_users):
        mine = [(-float(v), int(i)) for uu, i, v, ok in zip(users, items, values, select) if uu == u and ok and v > -np.inf]
        want = [i for _, i in sorted(mine)][: 12 - (2 if u == 3 else 0)]
        got = placer.out[u][placer.out[u] >= 0].tolist()
        assert got == ([max_item + 1, max_item + 2] if u == 3 else []) + want, u


def test_topn_breaks_every_tie_by_the_lower_row():
    """_topn against a full sort by (score descending, row), blocked items never, ties at the n-th included."""
    from runtime.sparse_routes import _topn

    rng = np.random.default_rng(2)
    scores = rng.integers(-2, 3, size=(6, 40)).astype(np.float32)  # many ties
    blocked = rng.random((6, 40)) < 0.3
    for n in (0, 1, 7, 40):
        got = _topn(scores, blocked, n)
        for u in range(6):
            want = [r for r in sorted(range(40), key=lambda r: (-scores[u, r], r)) if not blocked[u, r]][:n]
            assert got[u].tolist() == want + [-1] * (min(n, 40) - len(want))


def test_round_robin_merge():
    a, b = np.array([[3, 1, -1], [5, 6, 7]]), np.array([[1, 2, 4], [7, 8, -1]])
    pad = [np.full_like(a, -1)] * (len(ROUTES) - 2)
    equal = np.r_[1.0, 1.0, np.zeros(len(ROUTES) - 2)]
    np.testing.assert_array_equal(_fuse([a, b, *pad], np.tile(equal, (2, 1)), 4), [[3, 1, 2, 4], [5, 7, 6, 8]])


def test_route_positions_of_the_candidates_on_small_and_catalog_sized_tables():
    """_position on a dense table (small catalogs) and user by user over a per-thread row (large ones): each
    candidate's place in each user's list, n where the list lacks it or the candidate is a pad; the row is left
    zeroed, so the next call (fewer items, other users) reads no stale rank."""
    rng = np.random.default_rng(3)
    for n_items in (50, 200_000, 40, 120_000):
        for users in (1, 3, 17):
            n = 12
            ranked = np.stack([rng.choice(n_items, n, replace=False) for _ in range(users)])
            ranked[rng.random(ranked.shape) < 0.3] = -1  # pads anywhere, as an empty route leaves them
            rows = np.stack([np.r_[rng.choice(ranked[i][ranked[i] >= 0], min(4, int((ranked[i] >= 0).sum())),
                                              replace=False), rng.choice(n_items, 3)] for i in range(users)])
            rows = np.pad(rows, ((0, 0), (0, n - rows.shape[1])), constant_values=-1)
            got = _position(rows, ranked, n)
            for i in range(users):
                place = {int(r): p for p, r in enumerate(ranked[i]) if r >= 0}
                assert got[i].tolist() == [place.get(int(r), n) if r >= 0 else n for r in rows[i]]
    assert (_position(np.array([[5, -1]]), np.full((1, 3), -1), 3) == 3).all()  # an empty route


def test_metrics_follow_the_referee_definitions():
    top = np.array([[1, 2, 3, 4], [9, 8, 7, 6]])
    truth = [{2, 5}, {6}]
    np.testing.assert_allclose(M.per_user_recall(top, truth, 2), [0.5, 0.0])
    np.testing.assert_allclose(M.per_user_ndcg(top, truth, 4), [(1 / np.log2(3)) / (1 + 1 / np.log2(3)), 1 / np.log2(5)])
    np.testing.assert_allclose(M.per_user_hit(top, truth, 4), [1.0, 1.0])
    mean, se = M.mean_se(np.array([0.0, 1.0]))
    assert mean == 0.5 and se == pytest.approx(0.5)


def test_short_training_learns_and_reports(artifacts):
    report = json.loads((artifacts / "models" / "train_report.json").read_text())
    stage_a = report["retrieval_stage_a"]
    # holdout Recall@50 of the two-tower alone, above the most-popular list on the same users
    assert stage_a["best_holdout_recall@50"] > 1.2 * stage_a["holdout_popularity_recall@50"], stage_a
    assert stage_a["history"][-1]["loss"] < stage_a["history"][0]["loss"]
    assert all(np.isfinite(h["loss"]) for h in stage_a["history"] + report["ranking"]["history"])
    assert report["ranking"]["candidate_recall"] > 0.5
    assert report["retrieval"]["epochs_run"] == max(1, stage_a["best_epoch"])  # the refit runs stage A's epochs


@pytest.mark.parametrize("latest, random, unit, message", [
    (0.0, 0.0, "session", "no train action fell in the holdout fold; need more actions per user, or raise "
                          "features.holdout_latest / holdout_random"),
    (0.0, 1.0, "action", "every train action fell in the holdout fold; lower features.holdout_random"),
])
def test_an_empty_fold_stops_train_with_the_settings_named(artifacts, cfg, tmp_path, latest, random, unit, message):
    from feature_workflows.pipeline import build_features
    from training.train import TrainingError, train_all

    bad = cfg.replace("features", holdout_latest=latest, holdout_random=random, holdout_unit=unit)
    build_features(artifacts / "data" / "raw", tmp_path / "features", bad.features, progress=False)
    with pytest.raises(TrainingError, match="^train: " + re.escape(message)):
        train_all(tmp_path / "features", tmp_path / "models", bad, "cpu", progress=False)
    assert not any((tmp_path / "models").iterdir())  # nothing a later export could pick up


def test_non_finite_input_stops_training_with_the_stage_named(artifacts, cfg):
    from training.data import FeatureData
    from training.train import TrainingError, train_two_tower

    data = FeatureData(artifacts / "features")
    bad = data.item_cont.copy()
    bad[:, 0] = np.nan
    with pytest.raises(TrainingError, match=r"retrieval: loss is nan in epoch 1; a model input is probably NaN"):
        train_two_tower(data, cfg.retrieval, (0,), bad, "cpu", 1, None, False, "retrieval")


def test_sparse_item_ids_move_only_the_rows_a_batch_touched():
    """From retrieval.sparse_from_rows item-id rows the two-tower trains the table with sparse gradients and
    SparseAdam; below it, the optimiser is AdamW over every parameter in order, as before."""
    from training.train import TrainingError, _check_finite, _Optimizers

    def step(sparse):
        torch.manual_seed(0)
        m = TwoTower([50, 7, 9, 9], [0, 1, 2, 2], [1, 2, 3], 2, [30, 6], [0, 1], 3, 5, out_dim=8, hidden=[16],
                     id_dim=4, field_dim=4, sparse_ids=sparse)
        before = m.item_ids.weight.detach().clone()
        opt = _Optimizers(m, 0.01, 1e-5)
        u = m.user_tower(torch.tensor([[3, 2, 5, 0], [9, 4, 0, 0]]), torch.randn(2, 2),
                         torch.tensor([[4, 7, 0, 0, 0], [0, 0, 0, 0, 0]]), torch.tensor([[2, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))
        rows = torch.tensor([11, 12])
        v = m.item_tower(torch.stack([rows, torch.tensor([3, 4])], 1), torch.randn(2, 3))
        loss = sampled_softmax_loss(u, v, rows, None, 0.05)
        opt.zero_grad()
        loss.backward()
        _check_finite("retrieval", 1, loss, m)
        opt.step()
        return m, before, opt

    m, before, opt = step(True)
    assert m.item_ids.weight.grad.is_sparse and len(opt.opts) == 2
    moved = np.flatnonzero((m.item_ids.weight.detach() != before).any(1).numpy())
    assert set(moved) == {4, 7, 11, 12}  # the sequence's items and the batch's items, nothing else
    m.item_ids.weight.grad = torch.sparse_coo_tensor([[5]], torch.full((1, 4), float("nan")), (30, 4), check_invariants=True)
    with pytest.raises(TrainingError, match="non-finite gradient in item_ids.weight"):
        _check_finite("retrieval", 1, torch.tensor(1.0), m)

    dense, before, opt = step(False)
    assert not dense.item_ids.weight.grad.is_sparse and len(opt.opts) == 1
    assert opt.opts[0].param_groups[0]["params"] == list(dense.parameters())  # AdamW over every parameter, in order


def test_training_with_a_sparse_item_table_learns(artifacts, cfg):
    from dataclasses import replace

    from training.data import FeatureData
    from training.train import train_two_tower

    data = FeatureData(artifacts / "features")
    model, report = train_two_tower(data, replace(cfg.retrieval, sparse_from_rows=1), (0,), data.item_cont, "cpu", 3,
                                    None, False, "retrieval")
    assert model.item_ids.sparse
    losses = [h["loss"] for h in report["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def _whole_history_applied(artifacts, **kwargs):
    """(data, batch, its arrays before, after WholeHistory(fit fold, **kwargs) gave every row the whole history,
    the user-id field, the fit fold's actions)."""
    from training.data import FeatureData
    from training.train import WholeHistory

    data = FeatureData(artifacts / "features")
    whole = WholeHistory(data, (0,), **kwargs)
    batch = next(data.train_batches(4096, (0,)))
    after = data.arrays(batch)
    before = [a.copy() for a in after]
    whole.apply(*after, batch["item_row"], 1.0, np.random.default_rng(0))
    fit = data.actions[(data.actions["split"] == 0) & (data.actions["fold"] == 0)]
    return data, whole, batch, before, after, data.user_cat_cols.index("user_id"), fit


def test_whole_history_rows_read_the_users_final_state_without_their_own_item(artifacts):
    data, whole, batch, before, (cat, cont, seq, kinds), uid, fit = _whole_history_applied(artifacts)
    users = np.unique(fit["user_id"].values)
    final = data.queries(users, data.action_log(fit))
    row = {int(c): i for i, c in enumerate(final["user_cat"][:, uid])}
    changed = 0
    for i in range(len(cat)):
        j = row[int(before[0][i, uid])]
        own = data.item_codes[batch["item_row"][i]]
        expect = np.where(final["seq"][j] == own, 0, final["seq"][j])
        np.testing.assert_array_equal(seq[i], expect)  # the user's last actions of the fold, the row's own item left out
        np.testing.assert_array_equal(kinds[i], np.where(final["seq"][j] == own, 0, final["seq_kinds"][j]))
        assert own not in seq[i]
        np.testing.assert_array_equal(cat[i, data.context_fields], before[0][i, data.context_fields])  # the row's context
        others = [c for c in range(cat.shape[1]) if c not in data.context_fields]
        np.testing.assert_array_equal(cat[i, others], final["user_cat"][j, others])
        np.testing.assert_allclose(cont[i], final["user_cont"][j])
        changed += not np.array_equal(seq[i], before[2][i])
    assert changed > len(cat) // 2  # most rows had later actions than their own
    cat2, cont2, seq2, kinds2 = [a.copy() for a in before]
    whole.apply(cat2, cont2, seq2, kinds2, batch["item_row"], 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(seq2, before[2])  # share 0: rows keep the actions before them


def test_whole_history_rows_left_out_of_the_state_read_the_users_other_actions(artifacts):
    """retrieval.whole_history_leave_out = "state": a row's inputs are exactly the state of the user's fold
    actions without those on its own item (the favourite category checked where it has no tie)."""
    data, whole, batch, before, (cat, cont, seq, kinds), uid, fit = _whole_history_applied(artifacts, leave_out="state")
    by_user = dict(tuple(fit.groupby("user_id")))
    users = np.unique(fit["user_id"].values)
    code_of = dict(zip(data.queries(users, data.action_log(fit))["user_cat"][:, uid].tolist(), users.tolist()))
    fav_at = data.user_cat_cols.index("fav_category")
    changed = checked_fav = 0
    for i in range(0, len(cat), 8):  # every 8th row: each one rebuilds its user's state from their actions
        user, own_row = code_of[int(before[0][i, uid])], int(batch["item_row"][i])
        acts = by_user[user]
        rest = acts[acts["item_row"] != own_row]  # the user's fold actions without those on the row's own item
        expect = data.queries(np.array([user]), data.action_log(rest))
        own = data.item_codes[own_row]
        assert own not in seq[i]
        np.testing.assert_array_equal(seq[i], expect["seq"][0])  # the older actions moved up
        np.testing.assert_array_equal(kinds[i], expect["seq_kinds"][0])
        np.testing.assert_array_equal(cat[i, data.context_fields], before[0][i, data.context_fields])  # the row's context
        others = [c for c in range(cat.shape[1]) if c not in data.context_fields and c != fav_at]
        np.testing.assert_array_equal(cat[i, others], expect["user_cat"][0, others])  # recent categories included
        np.testing.assert_allclose(cont[i], expect["user_cont"][0], rtol=1e-5, atol=1e-5)  # activity, price level
        cats = data.category[rest["item_row"].values]
        counts = np.sort(np.unique(cats[cats >= 0], return_counts=True)[1])[::-1]
        if len(counts) and (len(counts) == 1 or counts[0] > counts[1]):  # a favourite without a tie
            assert cat[i, fav_at] == expect["user_cat"][0, fav_at]
            checked_fav += 1
        changed += not np.array_equal(seq[i], before[2][i])
    n = len(range(0, len(cat), 8))
    assert changed > n // 2 and checked_fav > n // 2, (changed, checked_fav, n)  # most rows had later actions
    cat2, cont2, seq2, kinds2 = [a.copy() for a in before]
    whole.apply(cat2, cont2, seq2, kinds2, batch["item_row"], 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(seq2, before[2])  # share 0: rows keep the actions before them


def test_fold_states_rebuild_the_rows_inputs_from_the_folds_actions_only(artifacts):
    """retrieval.fold_states: with every train action, the rebuilt inputs are train.parquet's own (the features
    stage's state code and workflow, the same numbers); with the fit fold's only, no row's sequence holds an
    item of a holdout action of its user, and the history columns are the fold's state at the row's time."""
    from training.data import FeatureData
    from training.train import FoldStates

    data = FeatureData(artifacts / "features")
    extra = ("user_id_raw", "state_ts")
    assert data.has_row_columns(extra) and not data.has_row_columns(("no_such_column",))
    batch = next(data.train_batches(4096, (0, 1), extra_columns=extra))
    arrays = data.arrays(batch)
    rebuilt = [a.copy() for a in arrays]
    FoldStates(data, (0, 1)).apply(*rebuilt, batch)
    for a, b in zip(arrays[:1] + arrays[2:], rebuilt[:1] + rebuilt[2:]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(arrays[1], rebuilt[1], rtol=1e-6, atol=1e-6)

    batch = next(data.train_batches(4096, (0,), extra_columns=extra))
    cat, cont, seq, kinds = data.arrays(batch)
    before = cat.copy()
    FoldStates(data, (0,)).apply(cat, cont, seq, kinds, batch)
    acts = data.actions[data.actions["split"] == 0]
    fit = acts[acts["fold"] == 0]
    expect = data.queries(batch["user_id_raw"], data.action_log(fit), at_ts=batch["state_ts"])
    np.testing.assert_array_equal(seq, expect["seq"])
    np.testing.assert_array_equal(kinds, expect["seq_kinds"])
    user_cols = [c for c in range(cat.shape[1]) if c not in data.context_fields]
    np.testing.assert_array_equal(cat[:, user_cols], expect["user_cat"][:, user_cols])
    np.testing.assert_array_equal(cat[:, data.context_fields], before[:, data.context_fields])  # the row's context
    np.testing.assert_allclose(cont, expect["user_cont"], rtol=1e-5, atol=1e-5)
    hold = acts[acts["fold"] == 1]
    held = set(zip(hold["user_id"].tolist(), data.item_codes[hold["item_row"].values].tolist()))
    fit_pairs = set(zip(fit["user_id"].tolist(), data.item_codes[fit["item_row"].values].tolist()))
    only_held = held - fit_pairs
    before_seq = data.arrays(batch)[2]
    leaked = sum((u, c) in only_held for u, row in zip(batch["user_id_raw"].tolist(), before_seq.tolist()) for c in row if c)
    assert leaked > 0  # train.parquet's rows do hold holdout items: what this removes
    assert not any((u, c) in only_held for u, row in zip(batch["user_id_raw"].tolist(), seq.tolist()) for c in row if c)


def test_whole_history_refuses_an_unknown_leave_out(artifacts):
    from training.data import FeatureData
    from training.train import TrainingError, WholeHistory

    with pytest.raises(TrainingError, match=r"retrieval.whole_history_leave_out: 'items' must be one of \['sequence', 'state'\]"):
        WholeHistory(FeatureData(artifacts / "features"), (0,), leave_out="items")


def test_export_refuses_models_of_other_features(artifacts, cfg, tmp_path):
    from training.export import export_bundle

    copy = tmp_path / "a"
    for part in ("features", "models"):
        shutil.copytree(artifacts / part, copy / part)
    manifest = json.loads((copy / "features" / "manifest.json").read_text())
    manifest["created_unix"] += 1  # a re-run of the features stage: another manifest
    (copy / "features" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="trained from other features"):
        export_bundle(copy / "features", copy / "models", copy / "serving", cfg)
    assert not (copy / "serving").exists()


def test_onnx_parity_and_names(artifacts):
    import onnxruntime as ort

    from shoprec.contract import ONNX_MODELS

    manifest = verify_manifest(artifacts / "serving")
    diffs = manifest["report"]["onnx_max_abs_diff"]
    assert set(diffs) == {"user_tower", "item_tower", "ranker"} and max(diffs.values()) < 1e-4
    for name, (inputs, outputs) in ONNX_MODELS.items():
        s = ort.InferenceSession(str(artifacts / "serving" / f"{name}.onnx"))
        assert [i.name for i in s.get_inputs()] == [t.name for t in inputs]
        assert [o.name for o in s.get_outputs()] == [t.name for t in outputs]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_vs_exact(kind):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 16))
    emb = centers[rng.integers(0, 20, 4000)] + 0.3 * rng.normal(size=(4000, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    index, got = build_index(emb, IndexConfig(kind=kind, ivf_nprobe=16))
    assert got == kind
    assert recall_vs_exact(index, emb, emb[:200], 50) > 0.9


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_search_breadth_is_tuned_to_the_recall_target_and_stored_in_the_index(kind, tmp_path):
    import faiss

    from training.index import held_out_queries, tune_index

    rng = np.random.default_rng(2)
    centers = rng.normal(size=(60, 16))
    emb = centers[rng.integers(0, 60, 6000)] + 0.4 * rng.normal(size=(6000, 16))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    cfg = IndexConfig(kind=kind, target_recall=0.95)
    index, _ = build_index(emb, cfg)
    report = tune_index(index, kind, emb, cfg)
    name = "nprobe" if kind == "ivf" else "efSearch"
    tried = report["tried"]
    assert report["reached_target"] and report["recall@100_vs_exact"] >= 0.95
    assert all(t["recall"] < 0.95 for t in tried[:-1]) and tried[-1][name] == report[name]  # the smallest that reaches it
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    raw = faiss.read_index(str(tmp_path / "i.faiss"))
    loaded = faiss.downcast_index(raw)  # a view: `raw` owns the index
    assert (loaded.nprobe if kind == "ivf" else loaded.hnsw.efSearch) == report[name]  # the server searches as measured
    other = held_out_queries(emb, 300, seed=5)  # other queries agree within a few points
    assert recall_vs_exact(loaded, emb, other, 100, filled=False) > 0.9
    fixed = tune_index(index, kind, emb, IndexConfig(kind=kind, ivf_nprobe=1, hnsw_ef_search=100))
    assert len(fixed["tried"]) == 1 and fixed[name] == (1 if kind == "ivf" else 100)  # a configured breadth is kept


def test_export_tunes_the_index_on_the_queries_the_server_sends(artifacts, cfg, tmp_path):
    """The IVF breadth is measured on the store users' embeddings as the served user tower computes them, at the
    depth the ann route asks for: the recall export reports is the recall the server's users get."""
    import faiss

    from runtime.pipeline import Pipeline
    from training.export import export_bundle

    copy = tmp_path / "a"
    for part in ("features", "models"):
        shutil.copytree(artifacts / part, copy / part)
    report = export_bundle(copy / "features", copy / "models", copy / "serving", cfg.replace("index", kind="ivf"))
    idx = report["index"]
    k = contract.num_candidates(cfg.serve.num_candidates, idx["items"])
    assert idx["kind"] == "ivf" and idx["queries_from"] == "store users" and idx["reached_target"]
    bundle = copy / "serving"
    pipe = Pipeline(bundle, cfg=cfg.serve)
    train = pd.read_parquet(copy / "features" / "actions.parquet", columns=["user_id", "split"])
    users = np.unique(train["user_id"].values[train["split"].values == 0])
    assert idx["queries"] == len(users)  # the tiny shop: every user with a train action
    t = pipe.run(pipe.request(users, 10, exclude_seen=True), stop="retrieval")
    served = t["user_embedding"]
    # serve.mmap_index: the index memory-mapped (shared by the instances) serves the same candidates
    mapped = Pipeline(bundle, cfg=cfg.replace("serve", mmap_index=True).serve)
    np.testing.assert_array_equal(mapped.steps["retrieval"].candidates(t)[0], pipe.steps["retrieval"].candidates(t)[0])
    raw = faiss.read_index(str(bundle / contract.BUNDLE_FILES["faiss_index"]))
    index = faiss.downcast_index(raw)  # a view: `raw` owns the index
    emb = np.load(bundle / contract.BUNDLE_FILES["item_embeddings"])
    assert index.nprobe == idx["nprobe"] and index.d == emb.shape[1]  # no popularity bias column in this config
    got = recall_vs_exact(index, emb, served.astype(np.float32), k, filled=False)
    assert got == pytest.approx(idx[f"recall@{k}_vs_exact"], abs=1e-3) and got >= cfg.index.target_recall
    # benchmarks/index_queries measures the same on the served bundle: its store-user row at export's breadth
    from benchmarks.index_queries import main

    main(["--artifacts", str(copy), "--tag", "t", "--results", str(tmp_path), "--nprobe", "1", "2"])
    r = json.loads((tmp_path / "index_queries_t.json").read_text())
    assert r["chosen_nprobe"] == idx["nprobe"] and r["users"] == len(users)
    row = next(x for x in r["rows"] if x["queries"] == "store users" and x["k"] == k and x["nprobe"] == idx["nprobe"])
    assert row["recall"] == pytest.approx(got, abs=1e-3) and row["unfilled_share"] == 0.0
    assert {x["nprobe"] for x in r["rows"]} == {1, 2, idx["nprobe"]}
    with pytest.raises(SystemExit, match="not IVF"):
        main(["--artifacts", str(artifacts), "--tag", "t", "--results", str(tmp_path)])


def test_search_never_returns_padding():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    index, _ = build_index(emb, IndexConfig(kind="ivf", ivf_nprobe=1))
    scores, rows = search(index, emb[:5], 1000, emb)  # more than the catalog, one probed list
    assert rows.shape == (5, 300) and (rows >= 0).all()
    assert all(len(set(r)) == 300 for r in rows)
    # a list one probed cell cannot fill is exact search's top k, ties by the lower row as everywhere else
    tied = np.repeat(emb[:100], 3, axis=0)  # every score three times
    index, _ = build_index(tied, IndexConfig(kind="ivf", ivf_nprobe=1))
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    scores, rows = search(index, queries, 250, tied)
    want = np.argsort(-(queries @ tied.T), axis=1, kind="stable")[:, :250]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ tied.T, want, 1), rtol=1e-5)


def test_popularity_bias_puts_popular_items_first_in_the_ann_route_and_the_index_serves_it_exactly():
    import faiss

    rng = np.random.default_rng(4)
    n_items, d = 300, 8
    emb = rng.normal(size=(n_items, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    popularity = np.floor(rng.pareto(1.2, n_items) * 20)
    assert popularity_bias(popularity, 0.0) is None  # weight 0: the inner product alone
    bias = popularity_bias(popularity, 0.5)
    assert bias.max() == 0.0 and (bias <= 0).all() and bias[np.argmax(popularity)] == 0.0
    assert np.array_equal(np.argsort(-bias, kind="stable"), np.argsort(-popularity, kind="stable"))
    nb = to_neighbours(_top_abs_dense(np.zeros((n_items, n_items), np.float32), 1))
    flat = faiss.IndexFlatIP(d + 1)
    flat.add(augment(emb, bias))
    kw = dict(cf_all=nb, cf_pos=nb, popular_rows=np.argsort(-popularity), n_candidates=20, recent_window=2)
    exact = CandidateGenerator(emb, None, ann_bias=bias, **kw)
    served = CandidateGenerator(emb, flat, ann_bias=bias, **kw)
    plain = CandidateGenerator(emb, None, **kw)
    users = rng.normal(size=(6, d)).astype(np.float32)
    indptr = np.array([0, 0, 2, 3, 3, 5, 6])
    hist = rng.choice(n_items, 6, replace=False)
    args = (users, indptr, hist, np.full(6, 4))
    ctx = (np.array([0, 1, 1, 2, 2, 2, 2]), rng.choice(n_items, 2, replace=False))
    lists = [g(*args, context=ctx, weights=np.ones(len(ROUTES)))[2] for g in (exact, served, plain)]
    want = np.argsort(-(users @ emb.T + bias), axis=1, kind="stable")
    for u in range(len(users)):
        np.testing.assert_array_equal(lists[0]["ann"][u], [r for r in want[u] if r not in hist[indptr[u]:indptr[u + 1]]][:20])
    np.testing.assert_array_equal(lists[1]["ann"], lists[0]["ann"])  # the [embedding, bias] index: the same list
    assert not np.array_equal(lists[2]["ann"], lists[0]["ann"])
    assert popularity[lists[0]["ann"][:, :5]].mean() > popularity[lists[2]["ann"][:, :5]].mean()
    for g in (lists[0], lists[1]):  # items like the viewed one: similarity alone, without the bias
        np.testing.assert_array_equal(g["similar_ann"], lists[2]["similar_ann"])
    with pytest.raises(ValueError, match="9 dimensions"):
        CandidateGenerator(emb, flat, **kw)  # an index built with the bias, served without it
    # an approximate index that cannot fill a list falls back to exact search over the same biased scores
    ivf, _ = build_index(augment(emb, bias), IndexConfig(kind="ivf", ivf_nprobe=1))
    _, rows = search(ivf, augment(users, 1.0), n_items, emb, bias)
    np.testing.assert_array_equal(rows, want)


def test_manifest_refuses_tampered_and_unlisted_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    write_manifest(tmp_path)
    verify_tree(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(ArtifactError, match=r"a.bin: sha256 .* does not match the manifest"):
        verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="files not in the manifest"):
        verify_tree(tmp_path)


def test_evaluation_top_n_equals_a_stable_full_sort_without_seen_items():
    import scipy.sparse as sp

    from training.evaluate import top_n_unseen

    rng = np.random.default_rng(5)
    for t in range(24):
        users, items = int(rng.integers(1, 40)), int(rng.integers(1, 300))
        scores = rng.integers(0, 4, size=(users, items)).astype(np.float32) if t % 2 else rng.normal(size=(users, items))
        scores[rng.random(users) < 0.3] = 0.0  # users without history: every item ties
        if t % 4 == 3:
            scores[0] = np.inf
        seen = sp.random(users, items, density=[0.0, 0.2, 1.0][t % 3], format="csr", random_state=t)
        s = scores.astype(np.float64)
        s[seen.nonzero()] = -np.inf
        for n in (1, 10, 100):
            order = np.argsort(-s, axis=1, kind="stable")[:, :n]  # ties in column order
            want = np.where(np.take_along_axis(s, order, 1) > -np.inf, order, -1)
            np.testing.assert_array_equal(top_n_unseen(scores, seen, n), want)


def test_a_signed_manifest_refuses_a_rehashed_tampered_bundle(tmp_path, monkeypatch):
    """With a signing key, re-hashing a changed file into the manifest is not enough: the signature breaks."""
    import json

    from shoprec.manifest import signing_key

    key = "k" * 32
    monkeypatch.setenv("SHOPREC_SIGNING_KEY", key)
    (tmp_path / "a.bin").write_bytes(b"abc")
    write_manifest(tmp_path)
    verify_tree(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["signature"]["alg"] == "hmac-sha256" and key not in (tmp_path / "manifest.json").read_text()
    # the attacker changes the file and re-hashes it into the manifest
    (tmp_path / "a.bin").write_bytes(b"evil")
    manifest["files"]["a.bin"] = {"sha256": sha256_file(tmp_path / "a.bin"), "bytes": 4}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json: the signature does not match"):
        verify_tree(tmp_path)
    # ... or drops the signature
    del manifest["signature"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json: not signed, but a signing key is set"):
        verify_tree(tmp_path)
    # a bundle signed with another key
    monkeypatch.setenv("SHOPREC_SIGNING_KEY", "other-key-" + "x" * 20)
    write_manifest(tmp_path)
    monkeypatch.setenv("SHOPREC_SIGNING_KEY", key)
    with pytest.raises(ArtifactError, match="signed with key .* not the configured key"):
        verify_tree(tmp_path)
    # the key from a file (a Kubernetes Secret); too short a key is refused
    monkeypatch.delenv("SHOPREC_SIGNING_KEY")
    (tmp_path.parent / "key").write_text(key + "\n")
    monkeypatch.setenv("SHOPREC_SIGNING_KEY_FILE", str(tmp_path.parent / "key"))
    assert signing_key() == key.encode()
    monkeypatch.setenv("SHOPREC_SIGNING_KEY", "short")
    with pytest.raises(ArtifactError, match="shorter than 16 bytes"):
        signing_key()


def test_the_popularity_prior_is_chosen_on_later_data_and_reaches_the_bundle(artifacts, cfg):
    """`train` scores each weight of ranking.popularity_prior on the valid split (the tiny shop's features split
    by time) and on the ranker's holdout; export carries the chosen one into contract.json."""
    report = json.loads((artifacts / "models" / "train_report.json").read_text())["popularity_prior"]
    grid = [str(float(w)) for w in cfg.ranking.popularity_prior]
    assert report["chosen_on"] == "valid_split" and report["weight"] in cfg.ranking.popularity_prior
    for curve in ("valid_split_ndcg@10", "holdout_ndcg@10"):
        assert sorted(k for k in report[curve] if k != "users") == sorted(grid) and report[curve]["users"] > 0
    dims = json.loads((artifacts / "serving" / "contract.json").read_text())
    assert dims["popularity_prior"] == report["weight"]


def test_choose_prior_keeps_the_smallest_weight_unless_another_wins_clearly():
    from training.train import beats, choose_prior

    rng = np.random.default_rng(0)
    base = rng.random(400)
    assert choose_prior({0.0: base, 1.0: base + rng.normal(0, 0.05, 400)}) == 0.0  # noise: no clear win
    assert choose_prior({0.0: base, 1.0: base + 0.05, 2.0: base + 0.02}) == 1.0
    assert choose_prior({0.5: base}) == 0.5  # one value fixes the weight
    gain = rng.normal(0.0, 1.0, 400)
    gain = (gain - gain.mean()) / gain.std(ddof=1) * 0.05  # paired s.e. exactly 0.05 / sqrt(400) = 0.0025
    assert choose_prior({0.0: base, 1.0: base + gain + 0.004}) == 0.0  # 1.6 standard errors: not enough
    assert choose_prior({0.0: base, 1.0: base + gain + 0.006}) == 1.0  # 2.4 standard errors
    assert beats(base, base + gain + 0.006) and not beats(base + gain + 0.006, base) and not beats(base, base)


def test_the_whole_history_share_is_chosen_on_the_valid_split_and_refit_with(artifacts, cfg):
    """Stage A is fitted once per retrieval.whole_history_share; the valid split (the tiny shop's features
    split by time) scores each fit's two-tower alone, the best mean wins, and the stage-B refit and the
    ranker's lists use the chosen one."""
    report = json.loads((artifacts / "models" / "train_report.json").read_text())
    chosen = report["whole_history_share"]
    grid = [float(s) for s in cfg.retrieval.whole_history_share]
    assert len(grid) > 1 and chosen["chosen_on"] == "valid_split" and chosen["share"] in grid
    curve = chosen["valid_split_ndcg@10"]
    assert sorted(k for k in curve if k != "users") == sorted(str(s) for s in grid) and curve["users"] > 0
    assert all(curve[str(chosen["share"])]["mean"] >= curve[str(s)]["mean"] for s in grid)
    assert report["retrieval"]["whole_history"]["share"] == chosen["share"]  # the refit
    assert report["retrieval_stage_a"]["whole_history"]["share"] == chosen["share"]  # the fit behind the ranker's lists
    assert report["retrieval_stage_a"]["best_epoch"] == chosen["fits"][str(chosen["share"])]["best_epoch"]


def test_a_whole_history_share_outside_zero_to_one_is_refused(cfg):
    from dataclasses import replace

    from training.train import TrainingError, whole_history_shares

    assert whole_history_shares(replace(cfg.retrieval, whole_history_share=0.25)) == (0.25,)  # one number fixes it
    with pytest.raises(TrainingError, match=r"retrieval.whole_history_share: \[0.5, 1.5\] must be one or more shares in \[0, 1\]"):
        whole_history_shares(replace(cfg.retrieval, whole_history_share=(0.5, 1.5)))


def test_topk_multiplies_the_score_by_the_popularity_factor(artifacts, cfg, pipeline):
    """With a weight in the bundle, the served score is the ranker's times (popularity / top popularity)^w, and
    the order follows it; weight 0 leaves the ranker's score as it is."""
    from runtime.steps import Bundle, TopK, best_first, popularity_factor

    pop = pipeline.item_table["popularity"]
    np.testing.assert_array_equal(popularity_factor(pop, 0.0), np.ones(len(pop)))
    f = popularity_factor(pop, 2.0)
    assert f.max() == 1.0 and (np.diff(f[np.argsort(pop)]) >= 0).all()

    users = pipeline.steps["feature_transform"].store.user_id[:4]
    t = pipeline.rank(pipeline.request(users, 10))
    rows, scores = t["candidate_rows"], t["ranking_scores"]
    bundle = Bundle(artifacts / "serving")
    bundle.dims["popularity_prior"] = 2.0  # as if train had chosen 2 (the cached contract, not the file)
    step = TopK(contract.STEP_BY_NAME["topk"], bundle, cfg.serve)
    ids, served = step.run({**t, "k": np.array([[10]] * len(users), np.int32)})[:2]
    want = np.where(rows >= 0, scores * f.astype(np.float32)[np.maximum(rows, 0)], scores)
    for i in range(len(users)):
        order = best_first(rows[i], want[i], 10)
        np.testing.assert_array_equal(ids[i], step.item_ids[rows[i][order]])
        np.testing.assert_allclose(served[i], want[i][order], rtol=1e-6)


def test_train_chooses_the_ann_popularity_bias_and_export_and_the_retrieval_step_serve_it(artifacts, cfg, tmp_path):
    """With a grid in retrieval.popularity_prior, train scores it on the holdout and records its choice; export
    indexes [vector, bias] and writes the weight; the retrieval step's ann route is the exact biased order.
    With enough lists for the ranker's deep part (here ranking.deep_min_lists = 1), a wide-only and a deep ranker
    are both trained and the validation lists choose; the saved ranker is the chosen one."""
    from runtime.pipeline import Pipeline
    from runtime.steps import Bundle, Retrieval
    from training.export import export_bundle
    from training.train import train_all

    shutil.copytree(artifacts / "features", tmp_path / "features")  # the same bytes: the lineage check passes
    grid = cfg.replace("retrieval", popularity_prior=(1.0, 2.0)).replace("ranking", deep_min_lists=1)
    report = train_all(tmp_path / "features", tmp_path / "models", grid, "cpu", progress=False)
    ranking = report["ranking"]
    assert ranking["deep_chosen_on"] == "validation lists" and ranking["deep"] in (True, False)
    summary = ranking["deep_choice"]["valid_ndcg@10"]
    assert summary["users"] == ranking["lists"]["valid_users"] > 0
    assert summary["deep" if ranking["deep"] else "wide"]["mean"] == pytest.approx(ranking["valid_ndcg@10"], abs=1e-5)
    saved = torch.load(tmp_path / "models" / "ranker.pt", weights_only=True)
    assert bool(saved["deep_on"] > 0) == ranking["deep"]
    default = json.loads((artifacts / "models" / "train_report.json").read_text())["ranking"]
    assert default["deep_chosen_on"] == f"fewer than {cfg.ranking.deep_min_lists} lists" and not default["deep"]
    ann = report["ann_popularity_prior"]
    assert ann["chosen_on"] == "holdout" and ann["weight"] in (1.0, 2.0)
    assert {"1.0", "2.0"} <= set(ann["holdout_ndcg@10"]) and ann["bias_weight"] == grid.retrieval.temperature * ann["weight"]
    export_bundle(tmp_path / "features", tmp_path / "models", tmp_path / "serving", grid)
    dims = json.loads((tmp_path / "serving" / "contract.json").read_text())
    assert dims["ann_popularity_weight"] == pytest.approx(ann["bias_weight"])
    pipe = Pipeline(tmp_path / "serving", cfg=grid.serve)
    step = pipe.steps["retrieval"]
    gen = step.generator
    np.testing.assert_array_equal(gen.ann_bias, popularity_bias(pipe.item_table["popularity"], dims["ann_popularity_weight"]))
    assert gen.index.d == gen.emb.shape[1] + 1
    t = pipe.run(pipe.request(pipe.steps["feature_transform"].store.user_id[:6], 10, exclude_seen=True), stop="retrieval")
    served = step.candidates(t)[2]["ann"]
    gen.index = None  # the same request scored exactly: u.v + bias over the whole catalog
    np.testing.assert_array_equal(step.candidates(t)[2]["ann"], served)
    bundle = Bundle(tmp_path / "serving")
    bundle.dims["ann_popularity_weight"] = 0.0  # a contract that disagrees with its index: refused, naming the bundle
    with pytest.raises(ArtifactError, match="65 dimensions.*re-run `shoprec export`"):
        Retrieval(contract.STEP_BY_NAME["retrieval"], bundle, grid.serve)


def test_target_attention_scores_equal_the_mlp_over_the_concatenated_pairs():
    """DIN's score MLP reads (c, h, c*h, c-h) per candidate and action; the layer is computed without building
    that [B, N, L, 4D] input (TargetAttention.scores). Same weights, same scores, gradients included. In float64: the
    identity is what is checked, and a float32 weight gradient summed over 300 x 20 pairs differs in its last digits
    with the summation order, which the CPU's kernels choose (4e-5 on an Intel Xeon VM)."""
    torch.manual_seed(0)
    att = TargetAttention(8, hidden=6).double()
    for b, n, length in ((1, 300, 20), (3, 5, 7), (2, 1, 1)):
        c = torch.randn(b, n, 8, dtype=torch.float64, requires_grad=True)
        h = torch.randn(b, length, 8, dtype=torch.float64, requires_grad=True)
        cc, hh = c.unsqueeze(2).expand(b, n, length, 8), h.unsqueeze(1).expand(b, n, length, 8)
        want = att.score(torch.cat([cc, hh, cc * hh, cc - hh], dim=-1)).squeeze(-1)
        got = att.scores(c, h)
        assert got.shape == (b, n, length)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        g_want = torch.autograd.grad(want.sum(), (c, h, att.score[0].weight))
        g_got = torch.autograd.grad(got.sum(), (c, h, att.score[0].weight))
        for x, y in zip(g_got, g_want):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
        # the exported form: the first layer in one matmul (export's ranker graph)
        torch.testing.assert_close(att.folded_scores(c, h), want, rtol=1e-5, atol=1e-5)


def test_exported_ranker_graph_scores_like_the_trained_ranker(tmp_path):
    """export writes the ranker with the attention in its folded form and each set of categorical fields in one
    lookup (RankerServing(folded=True)) and checks the ONNX graph against the PyTorch model train fitted: the
    same scores, batches of several users included."""
    torch.manual_seed(0)
    ids = torch.nn.Embedding(30, 4)
    r = Ranker([50, 7], [0, 1], [1], 2, [30, 6], [0, 1], 3, 7, 5, dim=4, bottom=[8, 4], top=[8], id_table=ids).eval()
    torch.nn.init.normal_(r.over[-1].weight)  # the deep part's output layer starts at zero: make it count
    args = (torch.tensor([[3, 2], [1, 4], [2, 2]]), torch.randn(3, 2),
            torch.tensor([[4, 5, 9, 0, 0], [7, 0, 0, 0, 0], [0, 0, 0, 0, 0]]),
            torch.tensor([[2, 1, 3, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]),
            torch.randint(3, 6, (3, 11, 2)), torch.randn(3, 11, 3), torch.randn(3, 11, 7))
    from training.export import _export, parity

    path = tmp_path / "ranker.onnx"
    _export(RankerServing(r, 1.0, folded=True), args, path, "ranker")
    trained = RankerServing(r, 1.0)
    with torch.no_grad():
        assert not torch.allclose(trained(*args)[0], trained(*args[:4], 8 - args[4], *args[5:])[0])  # the items count
    assert parity(path, trained, args, "ranker") < 1e-5


def test_listwise_loss_is_the_softmax_cross_entropy_over_each_lists_clicks():
    """ListNet: padding (mask 0) takes no probability, clicks share the target evenly, lists without a click add
    nothing, and adding a constant to a list's logits changes nothing (only the order inside a list counts)."""
    from training.modules import listwise_loss

    logits = torch.tensor([[2.0, 0.0, 5.0], [1.0, 1.0, 1.0], [0.0, 3.0, 1.0]])
    clicks = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # the first list's third slot is padding
    first = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    second = -torch.log(torch.tensor(1 / 3))  # two clicks of three equal logits: each has probability 1/3
    assert float(listwise_loss(logits, clicks, mask)) == pytest.approx(float((first + second) / 2), rel=1e-6)
    shifted = logits + torch.tensor([[10.0], [-3.0], [7.0]])
    assert float(listwise_loss(shifted, clicks, mask)) == pytest.approx(float(listwise_loss(logits, clicks, mask)), rel=1e-5)
    assert float(listwise_loss(logits, torch.zeros_like(clicks), mask)) == 0.0
