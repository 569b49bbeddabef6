"""Modules, losses, a short training run on planted data, ONNX parity, FAISS, manifests."""

import json

import numpy as np
import pytest
import torch

from shoprec.manifest import ArtifactError, verify_manifest, verify_tree, write_manifest
from training.index import build_index, recall_vs_exact, search
from training.modules import DLRM, InteractionArch, RankerServing, TwoTower, sampled_softmax_loss
from shoprec.config import IndexConfig


def test_tower_shapes_and_normalisation():
    torch.manual_seed(0)
    m = TwoTower([10, 5], 1, [7, 3], 2, out_dim=8, hidden=[16])
    u = m.user_tower(torch.randint(0, 5, (4, 2)), torch.randn(4, 1))
    v = m.item_tower(torch.randint(0, 3, (4, 2)), torch.randn(4, 2))
    assert u.shape == (4, 8) and v.shape == (4, 8)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(4))


def test_sampled_softmax_prefers_aligned_pairs_and_masks_duplicates():
    e = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    ids = torch.arange(6)
    aligned = sampled_softmax_loss(e, e, ids, None, 0.1)
    shuffled = sampled_softmax_loss(e, e[torch.randperm(6)], ids, None, 0.1)
    assert aligned < shuffled
    # a duplicated item is not its own negative: loss with duplicates masked is finite and <= unmasked
    dup = torch.tensor([0, 0, 1, 2, 3, 4])
    assert torch.isfinite(sampled_softmax_loss(e, e, dup, torch.zeros(6), 0.1))


def test_logq_correction_lowers_popular_logits():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    ids = torch.arange(4)
    log_q = torch.tensor([0.0, -5.0, -5.0, -5.0])  # item 0 is very popular
    assert sampled_softmax_loss(e, e, ids, log_q, 1.0) != sampled_softmax_loss(e, e, ids, None, 1.0)


def test_dlrm_shapes_and_interaction():
    assert InteractionArch(4)(torch.randn(2, 4, 3)).shape == (2, 6)
    m = DLRM([5, 6, 7], 3, dim=4, bottom=[8, 4], top=[8])
    assert m(torch.randint(0, 5, (10, 3)), torch.randn(10, 3)).shape == (10, 2)
    r = RankerServing(m, 1)(torch.randint(0, 5, (2, 1)), torch.randn(2, 1), torch.randint(0, 5, (2, 7, 2)), torch.randn(2, 7, 2))
    assert r.shape == (2, 7) and (r >= 0).all() and (r <= 2).all()
    with pytest.raises(ValueError, match="bottom MLP must end in the embedding dim"):
        DLRM([5], 3, dim=4, bottom=[8], top=[8])


@pytest.mark.parametrize("fu,fi", [(1, 1), (3, 2), (4, 3)])
def test_factorised_serving_ranker_equals_dlrm_on_broadcast_rows(fu, fi):
    torch.manual_seed(fu * 10 + fi)
    m = DLRM([9] * (fu + fi), 5, dim=4, bottom=[8, 4], top=[16, 8]).eval()
    b, n = 3, 11
    ucat, ucont = torch.randint(0, 12, (b, fu)), torch.randn(b, 2)  # codes past a table are clamped by both
    icat, icont = torch.randint(0, 9, (b, n, fi)), torch.randn(b, n, 3)
    cat = torch.cat([ucat[:, None].expand(b, n, fu), icat], 2).reshape(b * n, -1)
    dense = torch.cat([ucont[:, None].expand(b, n, 2), icont], 2).reshape(b * n, -1)
    with torch.no_grad():
        naive = torch.sigmoid(m(cat, dense)).sum(1).reshape(b, n)
        factorised = RankerServing(m, fu)(ucat, ucont, icat, icont)
    torch.testing.assert_close(factorised, naive, rtol=1e-5, atol=1e-6)


def test_short_training_learns_planted_structure(artifacts):
    report = json.loads((artifacts / "models" / "train_report.json").read_text())
    schema = json.loads((artifacts / "features" / "schema.json").read_text())
    chance = 50 / schema["items"]
    recall = report["retrieval"]["best_valid_recall@50"]
    assert recall > 3 * chance, f"valid Recall@50 {recall:.3f} vs chance {chance:.3f}"
    hist = report["retrieval"]["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert report["ranking"]["test"]["auc_ctr"] > 0.6


def test_onnx_parity_recorded_in_manifest(artifacts):
    manifest = verify_manifest(artifacts / "serving")
    diffs = manifest["report"]["onnx_max_abs_diff"]
    assert set(diffs) == {"user_tower", "item_tower", "ranker"}
    assert max(diffs.values()) < 1e-4


def test_onnx_names_follow_the_contract(artifacts):
    import onnxruntime as ort

    from shoprec.contract import ONNX_MODELS

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


def test_search_never_returns_padding():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(300, 8)).astype(np.float32)
    index, _ = build_index(emb, IndexConfig(kind="ivf", ivf_nprobe=1))
    scores, rows = search(index, emb[:5], 1000, emb)  # more than the catalog, one probed list
    assert rows.shape == (5, 300) and (rows >= 0).all()
    assert all(len(set(r)) == 300 for r in rows)


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
