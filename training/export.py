"""`shoprec export`: checkpoints on disk -> a new numbered serving bundle (artifacts/bundles/<N>, linked
from artifacts/serving; shoprec/bundles.py).

ONNX for the user tower, item tower and ranker (dynamic batch, names from shoprec.contract),
each checked against PyTorch with ONNX Runtime; the catalog's item embeddings and the FAISS
index; the item-to-item routes; the request-time feature files copied from the features stage;
contract.json with the exact dims; a TensorRT build where TensorRT exists; manifest.json over
everything. The bundle is written to a temporary folder and renamed into place when complete, so
a failed export never leaves a half-written bundle behind, and a live server's bundle is never
written: `shoprec deploy` switches a server to the new version.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from runtime.candidates import DENSE_FEATURES, copurchase_neighbours, popularity_bias, trending_order
from runtime.faiss_search import augment
from runtime.request_transform import encode_users
from shoprec import bundles, contract
from shoprec.config import Config
from shoprec.errors import UserError
from shoprec.manifest import verified_path, verify_manifest, write_manifest

from .data import FeatureData
from .index import build_index, held_out_queries, tune_index
from .modules import RankerServing
from .tensorrt import build_engines
from .train import ann_bias_weight, check_lineage, item_embeddings, load_ranker, load_two_tower, user_embeddings

OPSET = 17


class ExportError(UserError, RuntimeError):
    """The exported graph does not compute what the PyTorch model does."""


def _export(module: torch.nn.Module, args: tuple, path: Path, name: str) -> None:
    import warnings

    # the ranker's wide-only switch is a python branch on a buffer: traced as the constant it is
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    inputs, outputs = contract.ONNX_MODELS[name]
    dynamic = {t.name: {0: "batch"} for t in (*inputs, *outputs)}
    if name == "ranker":  # one user against a variable number of candidates
        for t in ("item_cat", "item_cont", "candidate_dense", "ranking_scores", "ranking_probs"):
            dynamic[t][1] = "candidates"
    torch.onnx.export(module, args, str(path), input_names=[t.name for t in inputs],
                      output_names=[t.name for t in outputs], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def parity(path: Path, module: torch.nn.Module, args: tuple, name: str, atol: float = 1e-5) -> float:
    """Max |ORT - torch| on `args`; raises ExportError naming the model and the likely cause."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: a.numpy() for t, a in zip(contract.ONNX_MODELS[name][0], args)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = module(*args)
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    if len(got) != len(want):
        raise ExportError(f"{name}: the ONNX graph has {len(got)} outputs, the PyTorch module {len(want)}")
    err = 0.0
    for g, w in zip(got, want):
        if not np.isfinite(w).all():
            raise ExportError(f"{name}: the PyTorch model itself outputs NaN/inf on sample inputs; the checkpoint is broken "
                              "(re-run `shoprec train`, which stops on a non-finite loss)")
        err = max(err, float(np.abs(g - w).max()))
        if not np.allclose(g, w, atol=atol, rtol=1e-4):
            raise ExportError(f"{name}: ONNX Runtime differs from PyTorch by {err} (opset {OPSET})")
    return err


def sample_inputs(data: FeatureData, batch: int, n_cand: int, seed: int = 0):
    """Random but valid model inputs: codes inside every vocabulary, sequences partly padded."""
    rng = np.random.default_rng(seed)
    ucat = np.stack([rng.integers(0, c, batch) for c in data.user_card], 1) if data.user_card else np.zeros((batch, 0), np.int64)
    ucont = rng.normal(size=(batch, len(data.user_cont_cols))).astype(np.float32)
    seq = rng.integers(3, max(int(data.item_card[0]), 4), (batch, data.seq_len))
    seq[:, rng.integers(0, data.seq_len):] = 0
    kinds = np.where(seq > 0, rng.integers(1, 5, seq.shape), 0)
    rows = rng.integers(0, data.n_items, (batch, n_cand))
    dense = rng.normal(size=(batch, n_cand, len(DENSE_FEATURES))).astype(np.float32)
    return (torch.as_tensor(ucat), torch.as_tensor(ucont), torch.as_tensor(seq), torch.as_tensor(kinds),
            torch.as_tensor(data.item_cat[rows]), torch.as_tensor(data.item_cont[rows]), torch.as_tensor(dense))


INDEX_QUERY_USERS = 1000


def index_queries(data: FeatureData, two_tower, emb: np.ndarray, n: int = INDEX_QUERY_USERS, seed: int = 0) -> tuple[np.ndarray, str]:
    """The queries the index's search breadth is tuned on: the user tower's embeddings of up to n users of the
    served store who have a history, each from the state the server holds (the train split's actions), so the
    recall is measured on what the ann route searches. Users' embeddings gather where the popular items are,
    and there IVF's lists are crowded: at the large shop's 1M items, nprobe 8 gave recall@100 .976 on the
    held-out queries of `held_out_queries` and .42 on users'. A store with fewer than 50 such users (a tiny
    catalog, a cold start) falls back to the held-out queries. -> (queries, "store users" | "held-out")."""
    acts = data.actions[data.actions["split"] == 0]
    users = np.unique(acts["user_id"].values)
    if len(users) < 50:
        return held_out_queries(emb), "held-out"
    if len(users) > n:
        users = np.sort(np.random.default_rng(seed).choice(users, n, replace=False))
    q = data.queries(users, data.action_log(acts[acts["user_id"].isin(users)]))
    return np.ascontiguousarray(user_embeddings(two_tower, q, "cpu"), dtype=np.float32), "store users"


def write_scene_routes(data: FeatureData, serve, path: Path) -> dict:
    """scene_routes.npz: the trending order and the co-purchase neighbours, from the actions the served user
    state holds (the train split; everything with `features.split = "none"`)."""
    acts = data.actions[data.actions["split"] == 0]
    cols = {c: acts[c].values for c in ("user_id", "session_id", "ts", "item_row", "kind")}
    trending = trending_order(cols["item_row"], cols["ts"], cols["kind"], data.n_items, serve.trending_half_life_days)
    co = copurchase_neighbours(cols["user_id"], cols["session_id"], cols["ts"], cols["item_row"], cols["kind"], data.n_items,
                               serve.copurchase_window, serve.copurchase_neighbours)
    np.savez(path, trending_rows=trending, **{f"copurchase_{k}": v for k, v in co.items()})
    return {"trending_items": int(len(trending)), "copurchase_pairs": int(len(co["indices"])),
            "items_with_copurchase": int((np.diff(co["indptr"]) > 0).sum())}


def export_bundle(features_dir: str | Path, models_dir: str | Path, out_dir: str | Path, cfg: Config) -> dict:
    t0 = time.time()
    features_dir, models_dir, out = Path(features_dir), Path(models_dir), Path(out_dir)
    verify_manifest(models_dir)
    check_lineage(features_dir, models_dir)
    data = FeatureData(features_dir)
    version, tmp = bundles.reserve(out)  # a new numbered version: a live server's bundle is never written
    try:
        report = _write_bundle(features_dir, models_dir, tmp, cfg, data)
        write_manifest(tmp, extra={"stage": "export", "bundle_version": version, "report": report})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bundles.publish(tmp, out, version, cfg.serve.keep_versions)
    report["version"] = version
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _write_bundle(features_dir: Path, models_dir: Path, tmp: Path, cfg: Config, data: FeatureData) -> dict:
    two_tower = load_two_tower(models_dir, data, cfg.retrieval, "cpu")
    trained = load_ranker(models_dir, data, cfg.ranking, "cpu")
    ranker = RankerServing(trained, cfg.ranking.cvr_weight).eval()  # the function train fitted: the parity reference
    exported = RankerServing(trained, cfg.ranking.cvr_weight, folded=True).eval()  # the same, faster on CPU
    files = contract.BUNDLE_FILES
    ucat, ucont, seq, kinds, icat, icont, dense = sample_inputs(data, 4, 7)
    _export(two_tower.user_tower, (ucat, ucont, seq, kinds), tmp / files["user_tower"], "user_tower")
    _export(two_tower.item_tower, (icat[:, 0], icont[:, 0]), tmp / files["item_tower"], "item_tower")
    _export(exported, (ucat, ucont, seq, kinds, icat, icont, dense), tmp / files["ranker"], "ranker")
    # parity on other batch and candidate counts than the export trace, so the dynamic axes are exercised
    p = sample_inputs(data, 9, 11, seed=1)
    report = {"onnx_max_abs_diff": {
        "user_tower": parity(tmp / files["user_tower"], two_tower.user_tower, p[:4], "user_tower"),
        "item_tower": parity(tmp / files["item_tower"], two_tower.item_tower, (p[4][:, 0], p[5][:, 0]), "item_tower"),
        "ranker": parity(tmp / files["ranker"], ranker, p, "ranker"),
    }}

    emb = item_embeddings(two_tower, data.item_cat, data.item_cont, "cpu").astype(np.float32)
    np.save(tmp / files["item_embeddings"], emb)
    # the ann route's popularity bias (train's choice): the index holds [embedding, bias], a query [u, 1]
    ann_weight = ann_bias_weight(models_dir)
    bias = popularity_bias(data.items["popularity"], ann_weight)
    vectors = emb if bias is None else augment(emb, bias)
    t_index = time.time()
    index, kind = build_index(vectors, cfg.index)
    queries, source = index_queries(data, two_tower, emb) if kind != "flat" else (None, None)  # exact: nothing to tune
    if queries is not None and bias is not None:
        queries = augment(queries, 1.0)
    # tuned at the depth the ann route asks for; the breadth is stored in the index file
    report["index"] = tune_index(index, kind, vectors, cfg.index, contract.num_candidates(cfg.serve.num_candidates, len(emb)),
                                 queries)
    if source:
        report["index"]["queries_from"] = source
    report["index"]["build_seconds"] = round(time.time() - t_index, 2)
    import faiss

    faiss.write_index(index, str(tmp / files["faiss_index"]))
    for key in ("cf_all", "cf_pos"):
        shutil.copy2(verified_path(models_dir, files[key]), tmp / files[key])
    report["scene_routes"] = write_scene_routes(data, cfg.serve, tmp / files["scene_routes"])
    for key in ("query_plan", "query_vocab", "item_table"):
        shutil.copy2(verified_path(features_dir, f"serving/{files[key]}"), tmp / files[key])
    # the snapshot's users with their attribute and history columns encoded once, by the plan the feature step
    # runs (runtime/request_transform.encode_users): a request then encodes only its context
    t_enc = time.time()
    store = {k: v for k, v in data.store.arrays.items() if not k.startswith("enc__")}
    store.update(encode_users(data.plan, data.schema["query_spec"], data.store, data.category_names, data.seq_len))
    np.savez(tmp / files["user_store"], **store)
    report["encoded_users"] = {"users": int(len(data.store.user_id)), "seconds": round(time.time() - t_enc, 1)}
    dims = {
        "user_cat_dim": len(data.user_cat_cols), "user_cont_dim": len(data.user_cont_cols), "seq_len": data.seq_len,
        "item_cat_dim": int(data.item_cat.shape[1]), "item_cont_dim": int(data.item_cont.shape[1]),
        "dense_dim": len(DENSE_FEATURES), "embedding_dim": int(emb.shape[1]),
        "n_items": int(len(emb)),
        "user_cat_columns": data.user_cat_cols, "user_cont_columns": data.user_cont_cols,
        "dense_features": list(DENSE_FEATURES), "query_spec": data.schema["query_spec"],
        "recent_categories": int(data.schema["recent_categories"]), "onnx_opset": OPSET,
        # the served score's popularity exponent (runtime.steps.popularity_factor), train's choice
        "popularity_prior": float(json.loads(verified_path(models_dir, "train_report.json").read_text())
                                  .get("popularity_prior", {}).get("weight", 0.0)),
        # the ann route's popularity bias weight (runtime.candidates.popularity_bias), train's choice
        "ann_popularity_weight": ann_weight,
    }
    (tmp / files["contract"]).write_text(json.dumps(dims, indent=1) + "\n")
    sizes = {**dims, "num_candidates": contract.num_candidates(cfg.serve.num_candidates, len(emb))}
    report["tensorrt"] = build_engines(tmp, sizes)
    return report
