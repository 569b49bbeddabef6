"""`shoprec train`: the two-tower retrieval model, then the DLRM ranker on its candidates.

Device chosen once (shoprec.device); mixed precision (bf16 autocast) on CUDA; seeds fixed; tqdm
progress; best checkpoint by validation metric with early stopping. Checkpoints are plain
state_dicts (loaded with weights_only=True) listed in the models/ manifest.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shoprec.config import RankingConfig, RetrievalConfig
from shoprec.device import torch_device
from shoprec.manifest import verified_path, write_manifest

from .data import FeatureData
from .modules import DLRM, TwoTower, sampled_softmax_loss


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _t(x, device, dtype=None):
    return torch.as_tensor(x, dtype=dtype, device=device)


def build_two_tower(data: FeatureData, cfg: RetrievalConfig) -> TwoTower:
    return TwoTower(data.user_card, len(data.user_cont_cols), data.item_card, data.item_cont.shape[1],
                    cfg.embedding_dim, list(cfg.tower_hidden))


def build_dlrm(data: FeatureData, cfg: RankingConfig) -> DLRM:
    return DLRM(data.user_card + data.item_card, len(data.user_cont_cols) + data.item_cont.shape[1], cfg.embedding_dim,
                list(cfg.bottom_mlp), list(cfg.top_mlp))


@torch.no_grad()
def item_embeddings(model: TwoTower, data: FeatureData, device: str, batch: int = 65_536) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, data.n_items, batch):
        out.append(model.item_tower(_t(data.item_cat[s : s + batch], device), _t(data.item_cont[s : s + batch], device)).float())
    return torch.cat(out)


@torch.no_grad()
def _recall_at(model, data, device, split="valid", k=50, max_rows=5000) -> float:
    rows = data.read(split, data.user_cat_cols + data.user_cont_cols + ["item_row"], where=lambda b: b["click"] == 1)
    n = min(len(rows["item_row"]), max_rows)
    if n == 0:
        return 0.0
    items = item_embeddings(model, data, device)
    cat, cont = data.user_arrays({c: v[:n] for c, v in rows.items()})
    users = model.user_tower(_t(cat, device), _t(cont, device)).float()
    top = (users @ items.T).topk(min(k, data.n_items), dim=1).indices.cpu().numpy()
    return float((top == rows["item_row"][:n, None]).any(1).mean())


def train_retrieval(features_dir: str | Path, out_dir: str | Path, cfg: RetrievalConfig, device: str = "auto",
                    progress: bool = True) -> dict:
    device = torch_device(device)
    torch.manual_seed(cfg.seed)
    data = FeatureData(features_dir)
    model = build_two_tower(data, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    is_pos = lambda b: b["click"] == 1  # noqa: E731
    counts = np.zeros(data.n_items)
    for b in data.batches("train", 1 << 20, ["item_row", "click"], where=is_pos):
        counts += np.bincount(b["item_row"], minlength=data.n_items)
    log_q_all = _t(np.log((counts + 1) / (counts + 1).sum()), device, torch.float32)
    item_cat, item_cont = _t(data.item_cat, device), _t(data.item_cont, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best, best_epoch, history, samples, t_train = -1.0, -1, [], 0, 0.0
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        losses = []
        batches = data.batches("train", cfg.batch_size, data.user_cat_cols + data.user_cont_cols + ["item_row", "click"],
                               where=is_pos, shuffle_seed=cfg.seed + epoch)
        for b in tqdm(batches, desc=f"retrieval epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False):
            cat, cont = data.user_arrays(b)
            rows = _t(b["item_row"], device)
            with _autocast(device):
                u = model.user_tower(_t(cat, device), _t(cont, device))
                v = model.item_tower(item_cat[rows], item_cont[rows])
                loss = sampled_softmax_loss(u.float(), v.float(), rows, log_q_all[rows] if cfg.logq_correction else None,
                                            cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            samples += len(rows)
        if device == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        recall = _recall_at(model, data, device)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "valid_recall@50": recall})
        if progress:
            print(f"retrieval epoch {epoch + 1}: loss {np.mean(losses):.4f}  valid Recall@50 {recall:.4f}")
        if recall > best:
            best, best_epoch = recall, epoch
            torch.save(model.state_dict(), out / "retrieval.pt")
        elif epoch - best_epoch >= cfg.patience:
            break
    return {"device": device, "best_valid_recall@50": best, "epochs_run": len(history), "history": history,
            "train_samples_per_s": round(samples / max(t_train, 1e-9), 1)}


def load_two_tower(models_dir: str | Path, data: FeatureData, cfg: RetrievalConfig, device: str = "cpu") -> TwoTower:
    model = build_two_tower(data, cfg)
    state = torch.load(verified_path(models_dir, "retrieval.pt"), map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def ranking_negatives(model: TwoTower, data: FeatureData, cfg: RankingConfig, device: str, max_queries: int = 200_000):
    """For clicked train rows: hard negatives from the retrieval model's own top candidates (not the
    clicked item) plus random items. Returned as (row index into the positives, item_row) pairs."""
    rng = np.random.default_rng(cfg.seed)
    pos = data.read("train", data.user_cat_cols + data.user_cont_cols + ["item_row"], where=lambda b: b["click"] == 1)
    n = len(pos["item_row"])
    take = np.sort(rng.choice(n, size=min(n, max_queries), replace=False))
    items = item_embeddings(model, data, device)
    pool = min(100, data.n_items)
    q_idx, i_idx = [], []
    for s in range(0, len(take), 4096):
        sel = take[s : s + 4096]
        cat, cont = data.user_arrays({c: v[sel] for c, v in pos.items()})
        top = (model.user_tower(_t(cat, device), _t(cont, device)).float() @ items.T).topk(pool, dim=1).indices.cpu().numpy()
        pick = rng.integers(0, pool, size=(len(sel), cfg.hard_negatives))
        hard = np.take_along_axis(top, pick, axis=1)
        rand = rng.integers(0, data.n_items, size=(len(sel), cfg.random_negatives))
        cand = np.concatenate([hard, rand], axis=1)
        ok = cand != pos["item_row"][sel, None]
        q_idx.append(np.repeat(sel, cand.shape[1])[ok.ravel()])
        i_idx.append(cand.ravel()[ok.ravel()])
    return pos, np.concatenate(q_idx), np.concatenate(i_idx)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = labels.astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def ranker_auc(model: DLRM, data: FeatureData, split: str, device: str) -> dict:
    model.eval()
    cols = data.user_cat_cols + data.user_cont_cols + ["item_row", "click", "purchase"]
    labels, scores = {"click": [], "purchase": []}, []
    for b in data.batches(split, 65_536, cols):
        cat, cont = data.user_arrays(b)
        rows = b["item_row"]
        logits = model(_t(np.concatenate([cat, data.item_cat[rows]], 1), device),
                       _t(np.concatenate([cont, data.item_cont[rows]], 1), device)).float().cpu().numpy()
        scores.append(logits)
        labels["click"].append(b["click"])
        labels["purchase"].append(b["purchase"])
    s = np.concatenate(scores)
    return {"auc_ctr": _auc(np.concatenate(labels["click"]), s[:, 0]),
            "auc_cvr": _auc(np.concatenate(labels["purchase"]), s[:, 1])}


def train_ranking(features_dir: str | Path, models_dir: str | Path, retrieval_cfg: RetrievalConfig, cfg: RankingConfig,
                  device: str = "auto", progress: bool = True) -> dict:
    device = torch_device(device)
    torch.manual_seed(cfg.seed)
    data = FeatureData(features_dir)
    two_tower = load_two_tower(models_dir, data, retrieval_cfg, device)
    pos, q_idx, i_idx = ranking_negatives(two_tower, data, cfg, device)
    # training rows: every train impression (labelled) + the sampled negatives of clicked rows
    cols = data.user_cat_cols + data.user_cont_cols + ["item_row", "click", "purchase"]
    imp = data.read("train", cols)
    neg = {c: pos[c][q_idx] for c in data.user_cat_cols + data.user_cont_cols}
    neg.update(item_row=i_idx, click=np.zeros(len(i_idx), np.int8), purchase=np.zeros(len(i_idx), np.int8))
    rows = {c: np.concatenate([imp[c], neg[c]]) for c in cols}
    n = len(rows["item_row"])
    model = build_dlrm(data, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    bce = torch.nn.BCEWithLogitsLoss()
    out = Path(models_dir)
    best, best_epoch, history, samples, t_train = -1.0, -1, [], 0, 0.0
    rng = np.random.default_rng(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        order = rng.permutation(n)
        losses = []
        for s in tqdm(range(0, n, cfg.batch_size), desc=f"ranking epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                      disable=not progress, leave=False):
            idx = order[s : s + cfg.batch_size]
            b = {c: v[idx] for c, v in rows.items()}
            cat, cont = data.user_arrays(b)
            r = b["item_row"]
            y = _t(np.stack([b["click"], b["purchase"]], 1), device, torch.float32)
            with _autocast(device):
                logits = model(_t(np.concatenate([cat, data.item_cat[r]], 1), device),
                               _t(np.concatenate([cont, data.item_cont[r]], 1), device)).float()
            loss = bce(logits[:, 0], y[:, 0]) + cfg.cvr_loss_weight * bce(logits[:, 1], y[:, 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            samples += len(idx)
        if device == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        auc = ranker_auc(model, data, "valid", device)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **{f"valid_{k}": v for k, v in auc.items()}})
        if progress:
            print(f"ranking epoch {epoch + 1}: loss {np.mean(losses):.4f}  valid AUC ctr {auc['auc_ctr']:.4f} cvr {auc['auc_cvr']:.4f}")
        if auc["auc_ctr"] > best:
            best, best_epoch = auc["auc_ctr"], epoch
            torch.save(model.state_dict(), out / "ranker.pt")
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(torch.load(out / "ranker.pt", weights_only=True))
    test_auc = ranker_auc(model, data, "test", device)
    return {"device": device, "rows": int(n), "hard_and_random_negatives": int(len(i_idx)), "history": history,
            "test": test_auc, "train_samples_per_s": round(samples / max(t_train, 1e-9), 1)}


def train_all(features_dir, models_dir, retrieval_cfg, ranking_cfg, device="auto", progress=True) -> dict:
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    report = {"retrieval": train_retrieval(features_dir, models_dir, retrieval_cfg, device, progress)}
    write_manifest(models_dir, extra={"stage": "train"})  # ranking reads retrieval.pt through the manifest
    report["ranking"] = train_ranking(features_dir, models_dir, retrieval_cfg, ranking_cfg, device, progress)
    (models_dir / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_manifest(models_dir, extra={"stage": "train"})
    return report
