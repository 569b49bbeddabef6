"""`shoprec evaluate`: offline quality on the time-based test split, baselines in the same harness.

The two-tower and ranker are evaluated through the *serving* code path (serving.pipeline steps
over the exported bundle), so the numbers describe what the server returns. Baselines: most
popular (train clicks) and implicit's ALS on the train click matrix. Writes
benchmarks/results/quality_<tag>.{json,md,png}.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from feature_workflows.history import context_from_ts
from shoprec.config import Config
from shoprec.faiss_search import search
from shoprec.manifest import verified_path

from .data import FeatureData

KS = (10, 50, 100, 500)


def recall_at(top: np.ndarray, truth: list[set], k: int) -> float:
    """Mean per-user Recall@k: hits in the top k over min(|truth|, k) (training's validation uses it too)."""
    return float(np.mean([len(set(t[:k]) & g) / min(len(g), k) for t, g in zip(top, truth)]))


def _ndcg_hr(top: np.ndarray, gains: list[dict], k: int = 10) -> tuple[float, float]:
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg, hr = [], []
    for t, g in zip(top, gains):
        got = np.array([g.get(int(i), 0.0) for i in t[:k]])
        ideal = np.sort(np.array(list(g.values())))[::-1][:k]
        ndcg.append(float((got * disc[: len(got)]).sum() / (ideal * disc[: len(ideal)]).sum()))
        hr.append(float((got > 0).any()))
    return float(np.mean(ndcg)), float(np.mean(hr))


def _als_top(data: FeatureData, users_raw: np.ndarray, k: int, seed: int) -> np.ndarray:
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    tr = data.read("train", ["user_id_raw", "item_row"], where=lambda b: b["click"] == 1)
    uniq, uidx = np.unique(tr["user_id_raw"], return_inverse=True)
    mat = sp.csr_matrix((np.ones(len(uidx), np.float32), (uidx, tr["item_row"])), shape=(len(uniq), data.n_items))
    mat.data[:] = 1.0
    model = AlternatingLeastSquares(factors=64, iterations=15, regularization=0.05, random_state=seed)
    model.fit(mat, show_progress=False)
    pos = np.searchsorted(uniq, users_raw)
    known = (pos < len(uniq)) & (uniq[np.minimum(pos, len(uniq) - 1)] == users_raw)
    top = np.tile(data.popular_rows[:k], (len(users_raw), 1))  # unknown users: popularity
    if known.any():
        ids, _ = model.recommend(pos[known], mat[pos[known]], N=k, filter_already_liked_items=False)
        top[known] = ids
    return top


def evaluate(features_dir: str | Path, bundle_dir: str | Path, results_dir: str | Path, cfg: Config, tag: str) -> dict:
    from serving.pipeline import Pipeline

    t0 = time.time()
    data = FeatureData(features_dir)
    pipe = Pipeline(bundle_dir)
    test = data.read("test", ["user_id_raw", "item_row", "click", "purchase", "ts", "device_raw"])
    clicked = test["click"] == 1
    users = np.unique(test["user_id_raw"][clicked])
    first = {}
    for u, ts, dev in zip(test["user_id_raw"], test["ts"], test["device_raw"]):
        first.setdefault(int(u), (int(ts), str(dev)))
    truth = {int(u): set() for u in users}
    gains = {int(u): {} for u in users}
    for u, r, c, p in zip(test["user_id_raw"][clicked], test["item_row"][clicked], test["click"][clicked], test["purchase"][clicked]):
        truth[int(u)].add(int(r))
        gains[int(u)][int(r)] = max(gains[int(u)].get(int(r), 0.0), float(c + p))
    ts = np.array([first[int(u)][0] for u in users])
    hour, weekday = context_from_ts(ts)
    device = np.array([first[int(u)][1] for u in users], dtype=object)
    t_list = [truth[int(u)] for u in users]
    g_list = [gains[int(u)] for u in users]

    kmax = min(max(KS), data.n_items)
    ucat, ucont, cold = pipe.transform(users, hour, weekday, device)
    emb = pipe.user_tower(ucat, ucont)
    _, tt_top = search(pipe.retrieval.index, emb, kmax, pipe.retrieval.embeddings)
    tt_top[cold] = data.popular_rows[:kmax]
    pop_top = np.tile(data.popular_rows[:kmax], (len(users), 1))
    als_top = _als_top(data, users, kmax, cfg.retrieval.seed)

    n = pipe.retrieval.n
    rows, _ = pipe.retrieval(emb, cold)
    ranked = np.empty((len(users), min(10, n)), dtype=np.int64)
    for s in range(0, len(users), 256):
        icat, icont = pipe.candidates(rows[s : s + 256])
        scores = pipe.ranker(ucat[s : s + 256], ucont[s : s + 256], icat, icont)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        ranked[s : s + 256] = np.take_along_axis(rows[s : s + 256], order, axis=1)

    methods = {"popularity": pop_top, "als": als_top, "two_tower": tt_top}
    retrieval = {m: {f"recall@{k}": recall_at(top, t_list, k) for k in KS if k <= kmax} for m, top in methods.items()}
    final = {}
    for name, top in (("popularity", pop_top), ("als", als_top), ("two_tower_retrieval_order", rows), ("two_tower_+_dlrm_ranking", ranked)):
        nd, hr = _ndcg_hr(top, g_list)
        final[name] = {"ndcg@10": nd, "hitrate@10": hr, "coverage@10": float(len(np.unique(top[:, :10])) / data.n_items)}
    train_report = json.loads(verified_path(Path(features_dir).parent / "models", "train_report.json").read_text())
    report = {
        "dataset": tag, "test_users": int(len(users)), "cold_start_users": int(cold.sum()), "items": int(data.n_items),
        "retrieval": retrieval, "final": final, "ranker_test_auc": train_report["ranking"]["test"],
        "num_candidates": int(n), "machine": f"{platform.machine()} {platform.node()}, CPU",
        "command": f"shoprec evaluate  (part of `make demo`, dataset {tag})", "seconds": round(time.time() - t0, 1),
    }
    report["summary"] = {
        "recall@100": {m: round(v.get("recall@100", float("nan")), 4) for m, v in retrieval.items()},
        "ndcg@10": {m: round(v["ndcg@10"], 4) for m, v in final.items()},
        "ranker_auc": {k: round(v, 4) for k, v in report["ranker_test_auc"].items()},
    }
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"quality_{tag}.md").write_text(_markdown(report))
    _plot(report, out / f"quality_{tag}.png")
    return report


def _markdown(r: dict) -> str:
    ks = [k for k in KS if f"recall@{k}" in r["retrieval"]["two_tower"]]
    lines = [f"# Offline quality — dataset `{r['dataset']}`", "",
             f"{r['test_users']} test users ({r['cold_start_users']} cold start), {r['items']} items, "
             f"time-based test split. Command: `{r['command']}`.", "",
             "| retrieval | " + " | ".join(f"Recall@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for m, v in r["retrieval"].items():
        lines.append(f"| {m} | " + " | ".join(f"{v[f'recall@{k}']:.4f}" for k in ks) + " |")
    lines += ["", "| final top-10 | NDCG@10 | HitRate@10 | coverage@10 |", "|---|---|---|---|"]
    for m, v in r["final"].items():
        lines.append(f"| {m} | {v['ndcg@10']:.4f} | {v['hitrate@10']:.4f} | {v['coverage@10']:.4f} |")
    a = r["ranker_test_auc"]
    lines += ["", f"Ranker test AUC: CTR {a['auc_ctr']:.4f}, CVR {a['auc_cvr']:.4f}.", ""]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for m, v in r["retrieval"].items():
        ks = [int(k.split("@")[1]) for k in v]
        a.plot(ks, list(v.values()), marker="o", label=m)
    a.set_xscale("log")
    a.set_xlabel("K")
    a.set_ylabel("Recall@K")
    a.set_title(f"retrieval ({r['dataset']})")
    a.legend()
    names = list(r["final"])
    b.barh(names, [r["final"][n]["ndcg@10"] for n in names])
    b.set_xlabel("NDCG@10")
    b.set_title("final top-10")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
