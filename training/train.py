"""`shoprec train`: the two-tower retrieval model, then the DLRM ranker.

Both stream their training rows from the features stage's parquet in batches (training/data.py),
so memory does not grow with the dataset: the two-tower reads the clicked rows, the ranker reads
every impression in blocks and draws its negatives per block, afresh each epoch.

Device chosen once (shoprec.device); mixed precision (bf16 autocast) on CUDA; seeds fixed; tqdm
progress; one epoch loop (`_fit`) for both models: samples/s over the training steps, best
checkpoint by a validation metric, early stopping. The retrieval metric is the test protocol's:
per-user Recall@50 from the user's state when the period starts. Checkpoints are plain state_dicts
(loaded with weights_only=True) listed in the models/ manifest.
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
from .evaluate import recall_at
from .modules import DLRM, TwoTower, sampled_softmax_loss


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _t(x, device, dtype=None):
    return torch.as_tensor(x, dtype=dtype, device=device)


def build_two_tower(data: FeatureData, cfg: RetrievalConfig) -> TwoTower:
    return TwoTower(data.user_card, len(data.user_cont_cols), data.item_card, data.item_cont.shape[1],
                    cfg.embedding_dim, list(cfg.tower_hidden), user_tables=data.user_tables,
                    user_fields=data.user_fields(cfg.ignore_user_features))


def build_dlrm(data: FeatureData, cfg: RankingConfig) -> DLRM:
    n_user = len(data.user_card)
    fields = data.user_fields(cfg.ignore_user_features) + [n_user + i for i in range(len(data.item_card))]
    return DLRM(data.user_card + data.item_card, len(data.user_cont_cols) + data.item_cont.shape[1], cfg.embedding_dim,
                list(cfg.bottom_mlp), list(cfg.top_mlp), tables=data.user_tables + list(range(n_user, n_user + len(data.item_card))),
                fields=fields)


@torch.no_grad()
def item_embeddings(model: TwoTower, data: FeatureData, device: str, batch: int = 65_536) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, data.n_items, batch):
        out.append(model.item_tower(_t(data.item_cat[s : s + batch], device), _t(data.item_cont[s : s + batch], device)).float())
    return torch.cat(out)


def _split_queries(data: FeatureData, split: str, max_users: int) -> tuple[dict, list[set]]:
    """Each user's first row in `split` (their state when the period starts) and the items they click
    in it, for up to `max_users` users with a click: the query/truth pairs training/evaluate.py
    scores on the test split. Streamed, so memory is bounded by `max_users`."""
    cols = data.user_cat_cols + data.user_cont_cols
    first: dict[int, int] = {}
    rows: dict[str, list] = {c: [] for c in cols}
    truth: list[set] = []
    for b in data.batches(split, 65_536, cols + ["user_id_raw", "item_row", "click"]):
        users = b["user_id_raw"]
        _, at = np.unique(users, return_index=True)
        for i in np.sort(at):
            u = int(users[i])
            if u not in first and len(first) < max_users:
                first[u] = len(first)
                truth.append(set())
                for c in cols:
                    rows[c].append(b[c][i])
        for u, r in zip(users[b["click"] == 1], b["item_row"][b["click"] == 1]):
            j = first.get(int(u))
            if j is not None:
                truth[j].add(int(r))
    keep = [j for j, t in enumerate(truth) if t]
    return {c: np.asarray(v)[keep] for c, v in rows.items()}, [truth[j] for j in keep]


@torch.no_grad()
def user_recall_at(model: TwoTower, data: FeatureData, device: str, queries: tuple[dict, list[set]], k: int = 50) -> float:
    """Mean per-user Recall@k over `_split_queries` output: one query per user from their state at the
    start of the split, scored against everything they click in it (as the test evaluation does). A
    per-click metric would reward what predicts the next click of the same session, which the test
    does not ask for."""
    model.eval()
    rows, truth = queries
    if not truth:
        return 0.0
    items = item_embeddings(model, data, device)
    cat, cont = data.user_arrays(rows)
    top = []
    for s in range(0, len(truth), 256):
        u = model.user_tower(_t(cat[s : s + 256], device), _t(cont[s : s + 256], device)).float()
        top.append((u @ items.T).topk(min(k, data.n_items), dim=1).indices.cpu().numpy())
    return recall_at(np.concatenate(top), truth, k)


def popularity_recall_at(data: FeatureData, queries: tuple[dict, list[set]], k: int = 50) -> float:
    """`user_recall_at` of the most-popular list (train clicks): the baseline on the same queries."""
    truth = queries[1]
    return recall_at(np.tile(data.popular_rows[:k], (len(truth), 1)), truth, k) if truth else 0.0


def _fit(model: torch.nn.Module, cfg: RetrievalConfig | RankingConfig, epoch_batches, step, validate, metric: str,
         checkpoint: Path, device: str, name: str, progress: bool) -> dict:
    """The epoch loop both models share: `step(batch) -> (loss, samples)` over `epoch_batches(epoch)`,
    timed (device synced) for samples/s, `validate() -> dict` after each epoch, best checkpoint by
    `metric` (higher is better), early stop after `cfg.patience` epochs without a new best. Ends with
    the best weights loaded."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    best, best_epoch, history, samples, t_train = -float("inf"), -1, [], 0, 0.0
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        losses = []
        for b in tqdm(epoch_batches(epoch), desc=f"{name} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                      disable=not progress, leave=False):
            loss, n = step(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            samples += n
        if device == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t0
        scores = validate()
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), **scores})
        if progress:
            print(f"{name} epoch {epoch + 1}: loss {np.mean(losses):.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if scores[metric] > best:
            best, best_epoch = scores[metric], epoch
            torch.save(model.state_dict(), checkpoint)
        elif epoch - best_epoch >= cfg.patience:
            break
    model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True))
    return {"best": best, "epochs_run": len(history), "history": history, "train_samples": samples,
            "train_seconds": round(t_train, 2), "train_samples_per_s": round(samples / max(t_train, 1e-9), 1)}


def train_retrieval(features_dir: str | Path, out_dir: str | Path, cfg: RetrievalConfig, device: str = "auto",
                    progress: bool = True) -> dict:
    device = torch_device(device)
    torch.manual_seed(cfg.seed)
    data = FeatureData(features_dir)
    model = build_two_tower(data, cfg).to(device)
    is_pos = lambda b: b["click"] == 1  # noqa: E731
    counts = np.zeros(data.n_items)
    for b in data.batches("train", 1 << 20, ["item_row", "click"], where=is_pos):
        counts += np.bincount(b["item_row"], minlength=data.n_items)
    log_q_all = _t(np.log((counts + 1) / (counts + 1).sum()), device, torch.float32)
    item_cat, item_cont = _t(data.item_cat, device), _t(data.item_cont, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = data.user_cat_cols + data.user_cont_cols + ["item_row", "click"]

    def step(b):
        cat, cont = data.user_arrays(b)
        rows = _t(b["item_row"], device)
        with _autocast(device):
            u = model.user_tower(_t(cat, device), _t(cont, device))
            v = model.item_tower(item_cat[rows], item_cont[rows])
            loss = sampled_softmax_loss(u.float(), v.float(), rows, log_q_all[rows] if cfg.logq_correction else None,
                                        cfg.temperature)
        return loss, len(rows)

    valid = _split_queries(data, "valid", max_users=5000)  # read once, scored after every epoch
    fit = _fit(model, cfg, lambda epoch: data.batches("train", cfg.batch_size, cols, where=is_pos, shuffle_seed=cfg.seed + epoch),
               step, lambda: {"valid_recall@50": user_recall_at(model, data, device, valid)}, "valid_recall@50",
               out / "retrieval.pt", device, "retrieval", progress)
    return {"device": device, "best_valid_recall@50": fit.pop("best"),
            "valid_popularity_recall@50": popularity_recall_at(data, valid), **fit}


def load_two_tower(models_dir: str | Path, data: FeatureData, cfg: RetrievalConfig, device: str = "cpu") -> TwoTower:
    model = build_two_tower(data, cfg)
    state = torch.load(verified_path(models_dir, "retrieval.pt"), map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def sampled_negatives(two_tower: TwoTower | None, item_emb: torch.Tensor | None, data: FeatureData, batch: dict, cfg: RankingConfig,
                      rng: np.random.Generator, device: str) -> dict:
    """Negatives for the clicked rows of one batch of impressions, labelled 0: `hard_negatives` drawn
    from the retrieval model's ranks [lo, hi) for that row's user state, plus `random_negatives`
    uniform items (never the clicked item). Each carries its clicked row's user features."""
    clicked = np.flatnonzero(batch["click"] == 1)
    user_cols = data.user_cat_cols + data.user_cont_cols
    cand = [rng.integers(0, data.n_items, size=(len(clicked), cfg.random_negatives))]
    lo, hi = (min(r, data.n_items) for r in cfg.hard_negative_ranks)
    if cfg.hard_negatives and len(clicked) and lo < hi:
        cat, cont = data.user_arrays({c: batch[c][clicked] for c in user_cols})
        u = two_tower.user_tower(_t(cat, device), _t(cont, device)).float()
        top = (u @ item_emb.T).topk(hi, dim=1).indices.cpu().numpy()
        cand.append(np.take_along_axis(top, rng.integers(lo, hi, size=(len(clicked), cfg.hard_negatives)), axis=1))
    cand = np.concatenate(cand, axis=1)
    ok = (cand != batch["item_row"][clicked, None]).ravel()
    src = np.repeat(clicked, cand.shape[1])[ok]
    neg = {c: batch[c][src] for c in user_cols}
    neg["item_row"] = cand.ravel()[ok].astype(np.int64)
    neg["click"] = neg["purchase"] = np.zeros(len(src), np.int8)
    return neg


def ranking_batches(two_tower: TwoTower | None, data: FeatureData, cfg: RankingConfig, epoch: int, device: str,
                    block_rows: int = 16_384, buffer_rows: int = 262_144):
    """One epoch of ranker training batches, streamed: train impressions are read in blocks of
    `block_rows` (shuffled within a `buffer_rows` window), each block gets fresh negatives for its
    clicks, and the block plus its negatives is shuffled into batches. Memory is bounded by the
    window and one block, whatever the size of the split."""
    rng = np.random.default_rng([cfg.seed, epoch])
    item_emb = item_embeddings(two_tower, data, device) if cfg.hard_negatives else None
    cols = data.user_cat_cols + data.user_cont_cols + ["item_row", "click", "purchase"]
    for block in data.batches("train", block_rows, cols, shuffle_seed=cfg.seed + epoch, buffer_rows=buffer_rows):
        neg = sampled_negatives(two_tower, item_emb, data, block, cfg, rng, device)
        rows = {c: np.concatenate([block[c], neg[c]]) for c in cols}
        order = rng.permutation(len(rows["item_row"]))
        for s in range(0, len(order), cfg.batch_size):
            yield {c: v[order[s : s + cfg.batch_size]] for c, v in rows.items()}


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
    """DLRM on every train impression (labelled click / purchase) plus sampled negatives of the
    clicked ones (see `ranking_batches`), streamed from disk."""
    device = torch_device(device)
    torch.manual_seed(cfg.seed)
    data = FeatureData(features_dir)
    two_tower = load_two_tower(models_dir, data, retrieval_cfg, device) if cfg.hard_negatives else None
    model = build_dlrm(data, cfg).to(device)
    bce = torch.nn.BCEWithLogitsLoss()

    def step(b):
        cat, cont = data.user_arrays(b)
        r = b["item_row"]
        y = _t(np.stack([b["click"], b["purchase"]], 1), device, torch.float32)
        with _autocast(device):
            logits = model(_t(np.concatenate([cat, data.item_cat[r]], 1), device),
                           _t(np.concatenate([cont, data.item_cont[r]], 1), device)).float()
        return bce(logits[:, 0], y[:, 0]) + cfg.cvr_loss_weight * bce(logits[:, 1], y[:, 1]), len(r)

    def validate():
        return {f"valid_{k}": v for k, v in ranker_auc(model, data, "valid", device).items()}

    fit = _fit(model, cfg, lambda epoch: ranking_batches(two_tower, data, cfg, epoch, device), step, validate,
               "valid_auc_ctr", Path(models_dir) / "ranker.pt", device, "ranking", progress)
    fit.pop("best")
    return {"device": device, **fit, "test": ranker_auc(model, data, "test", device)}


def train_all(features_dir, models_dir, retrieval_cfg, ranking_cfg, device="auto", progress=True) -> dict:
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    report = {"retrieval": train_retrieval(features_dir, models_dir, retrieval_cfg, device, progress)}
    write_manifest(models_dir, extra={"stage": "train"})  # ranking reads retrieval.pt through the manifest
    report["ranking"] = train_ranking(features_dir, models_dir, retrieval_cfg, ranking_cfg, device, progress)
    (models_dir / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_manifest(models_dir, extra={"stage": "train"})
    return report
