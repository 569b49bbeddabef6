"""Former silent fallbacks, each now a clear error (or a documented one), tested to fail for the right reason."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from client import Recommendation
from client.cli import format_table
from runtime.request_transform import raw_rows
from shoprec.config import CFConfig
from training.cf import CFError, choose_lambda
from training.modules import sampled_softmax_loss


def test_recommend_table_never_shows_a_neighbours_details():
    details = {"ids": np.array([10, 20, 30]), "columns": {"category": np.array(["a", "b", "c"])}}
    out = format_table(Recommendation(1, np.array([20, 25, 99]), np.array([0.3, 0.2, 0.1]), False), details)
    lines = out.splitlines()[2:]
    assert lines[0].split()[-1] == "b"
    assert lines[1].endswith("(not in the local item table)") and lines[2].endswith("(not in the local item table)")


def test_store_category_codes_outside_the_item_table_are_refused():
    spec = {"user_cat": [], "user_num": [], "history_cat": ["recent_category_1"], "history_num": []}
    state = {"recent_categories": np.array([[0], [5]])}
    with pytest.raises(ValueError, match="category code 5 outside the item table's 2 categories"):
        raw_rows(spec, state, {"user_id": np.array([1, 2])}, np.array(["x", "y"], dtype=object))


def test_ease_lambda_choice_with_no_holdout_user_names_the_data():
    x = sp.csr_matrix(np.eye(4, dtype=np.float32))
    with pytest.raises(CFError, match=r"no holdout user has a positive in the fit fold \(4 positives in it\).* need "
                                      "more positive events"):
        # no held-out user at all: NDCG is undefined (NaN would be "chosen" at random), and the data is the cause
        choose_lambda(x, x[:0], [], sp.csr_matrix((0, 4)), CFConfig(method="ease", ease_lambdas=(1.0, 2.0)))


def test_ease_lambda_keeps_the_first_unless_another_wins_by_two_standard_errors(monkeypatch):
    """Every user has acted on item 0 only, so row 0 of B is every user's list: the first lambda's B ranks items
    1-10 first, the other's 11-20. Users whose held-out item lies in the other's block prefer the other."""
    import training.cf as cflib

    n = 21
    order = {300.0: np.r_[0.0, np.linspace(2, 1, 10), np.zeros(10)], 100.0: np.r_[0.0, np.zeros(10), np.linspace(2, 1, 10)]}
    monkeypatch.setattr(cflib, "ease_items", lambda x, max_items: np.arange(x.shape[1]))  # every item covered
    monkeypatch.setattr(cflib, "ease_block", lambda x, lam, items: np.vstack([order[lam], np.zeros((n - 1, n))]))
    users = 400
    x = sp.csr_matrix((np.ones(users, np.float32), (np.arange(users), np.zeros(users, int))), shape=(users, n))
    cfg = CFConfig(method="ease", ease_lambdas=(300.0, 100.0))

    def truth(share_other: float) -> list[np.ndarray]:  # each block's users hold its items in turn
        other = np.arange(users) < round(share_other * users)
        return [np.array([(11 if o else 1) + u % 10]) for u, o in enumerate(other)]

    lam, scores = choose_lambda(x, x, truth(0.53), x, cfg)  # the other is ahead by noise only
    assert scores["100.0"] > scores["300.0"] and lam == 300.0
    lam, scores = choose_lambda(x, x, truth(0.75), x, cfg)
    assert lam == 100.0
    assert choose_lambda(x, x, truth(0.9), x, CFConfig(method="ease", ease_lambdas=(100.0,)))[0] == 100.0  # one value fixes it


def test_mixed_negatives_equal_the_hand_computed_softmax():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    v = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    extra = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    ids, extra_ids = torch.tensor([5, 6, 7]), torch.tensor([6, 9])  # extra 0 is row 1's own positive
    got = sampled_softmax_loss(u, v, ids, None, 0.5, extra, extra_ids)
    rows = []
    for i in range(3):
        logits = [float(u[i] @ v[j]) / 0.5 for j in range(3)]
        logits += [float(u[i] @ extra[m]) / 0.5 for m in range(2) if int(extra_ids[m]) != int(ids[i])]
        rows.append(-logits[i] + float(torch.logsumexp(torch.tensor(logits), 0)))
    torch.testing.assert_close(got, torch.tensor(float(np.mean(rows))))
