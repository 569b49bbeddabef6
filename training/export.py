"""`shoprec export`: checkpoints on disk -> the serving bundle (artifacts/serving).

ONNX for the user tower, item tower and ranker (dynamic batch, names from shoprec.contract),
each checked against PyTorch with ONNX Runtime; the catalog's item embeddings and the FAISS
index; the request-time feature files copied from the features stage; contract.json with the
exact dims; a TensorRT build where TensorRT exists; manifest.json over everything.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from shoprec import contract
from shoprec.config import Config
from shoprec.faiss_search import recall_vs_exact
from shoprec.manifest import verified_path, verify_manifest, write_manifest

from .data import FeatureData
from .index import build_index
from .modules import RankerServing
from .tensorrt import build_engines
from .train import build_dlrm, item_embeddings, load_two_tower

OPSET = 17


def _export(module: torch.nn.Module, args: tuple, path: Path, name: str) -> None:
    inputs, outputs = contract.ONNX_MODELS[name]
    dynamic = {t.name: {0: "batch"} for t in (*inputs, *outputs)}
    if name == "ranker":  # one user against a variable number of candidates
        for t in ("item_cat", "item_cont", "ranking_scores"):
            dynamic[t][1] = "candidates"
    torch.onnx.export(module, args, str(path), input_names=[t.name for t in inputs],
                      output_names=[t.name for t in outputs], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def parity(path: Path, module: torch.nn.Module, args: tuple, name: str, atol: float = 1e-5) -> float:
    """Max |ORT - torch| on `args`; raises if not allclose."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: a.numpy() for t, a in zip(contract.ONNX_MODELS[name][0], args)}
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        want = module(*args).numpy()
    err = float(np.abs(got - want).max())
    if not np.allclose(got, want, atol=atol, rtol=1e-4):
        raise AssertionError(f"{name}: ONNX Runtime differs from PyTorch by {err}")
    return err


def sample_inputs(data: FeatureData, batch: int, n_cand: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ucat = np.stack([rng.integers(0, c, batch) for c in data.user_card], 1)
    ucont = rng.normal(size=(batch, len(data.user_cont_cols))).astype(np.float32)
    rows = rng.integers(0, data.n_items, (batch, n_cand))
    return (torch.as_tensor(ucat), torch.as_tensor(ucont), torch.as_tensor(data.item_cat[rows]),
            torch.as_tensor(data.item_cont[rows]))


def export_bundle(features_dir: str | Path, models_dir: str | Path, out_dir: str | Path, cfg: Config) -> dict:
    t0 = time.time()
    features_dir, models_dir, out = Path(features_dir), Path(models_dir), Path(out_dir)
    verify_manifest(models_dir)
    data = FeatureData(features_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    two_tower = load_two_tower(models_dir, data, cfg.retrieval, "cpu")
    dlrm = build_dlrm(data, cfg.ranking)
    dlrm.load_state_dict(torch.load(verified_path(models_dir, "ranker.pt"), map_location="cpu", weights_only=True))
    ranker = RankerServing(dlrm.eval(), len(data.user_card)).eval()
    ucat, ucont, icat, icont = sample_inputs(data, 4, 7)
    report = {"onnx_max_abs_diff": {}}
    files = contract.BUNDLE_FILES
    _export(two_tower.user_tower, (ucat, ucont), out / files["user_tower"], "user_tower")
    _export(two_tower.item_tower, (icat[:, 0], icont[:, 0]), out / files["item_tower"], "item_tower")
    _export(ranker, (ucat, ucont, icat, icont), out / files["ranker"], "ranker")
    # parity on a different batch size than the export trace, so the dynamic axis is exercised
    pu, pc, pi, pic = sample_inputs(data, 9, 11, seed=1)
    report["onnx_max_abs_diff"]["user_tower"] = parity(out / files["user_tower"], two_tower.user_tower, (pu, pc), "user_tower")
    report["onnx_max_abs_diff"]["item_tower"] = parity(out / files["item_tower"], two_tower.item_tower, (pi[:, 0], pic[:, 0]), "item_tower")
    report["onnx_max_abs_diff"]["ranker"] = parity(out / files["ranker"], ranker, (pu, pc, pi, pic), "ranker")

    emb = item_embeddings(two_tower, data, "cpu").numpy().astype(np.float32)
    np.save(out / files["item_embeddings"], emb)
    index, kind = build_index(emb, cfg.index)
    import faiss

    faiss.write_index(index, str(out / files["faiss_index"]))
    queries = emb[np.random.default_rng(0).choice(len(emb), min(500, len(emb)), replace=False)]
    report["index"] = {"kind": kind, "items": int(len(emb)),
                       "recall@100_vs_exact": recall_vs_exact(index, emb, queries, min(100, len(emb)))}

    for key in ("query_plan", "query_vocab", "user_store", "item_table"):
        src = verified_path(features_dir, f"serving/{files[key]}")
        shutil.copy2(src, out / files[key])
    dims = {
        "user_cat_dim": len(data.user_cat_cols), "user_cont_dim": len(data.user_cont_cols),
        "item_cat_dim": int(data.item_cat.shape[1]), "item_cont_dim": int(data.item_cont.shape[1]),
        "embedding_dim": int(emb.shape[1]), "num_candidates": int(min(cfg.serve.num_candidates, len(emb))),
        "max_k": int(cfg.serve.max_k), "n_items": int(len(emb)),
        "user_cat_columns": data.user_cat_cols, "user_cont_columns": data.user_cont_cols,
        "onnx_opset": OPSET,
    }
    (out / files["contract"]).write_text(json.dumps(dims, indent=1) + "\n")
    report["tensorrt"] = build_engines(out, dims, {s: contract.STEP_BY_NAME[s].max_batch_size for s in ("user_tower", "ranker")})
    write_manifest(out, extra={"stage": "export", "report": report})
    report["seconds"] = round(time.time() - t0, 1)
    return report
