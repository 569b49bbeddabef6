"""What MMR diversity costs in accuracy and gains in list diversity, as a curve over lambda.

    .venv/bin/python -m benchmarks.diversity_curve --tag small                    # ARTIFACTS' held-out test users
    .venv/bin/python -m benchmarks.diversity_curve --tag mlls-random --referee-work artifacts/referee/random-8-1-1

The lists are the served pipeline's (runtime.pipeline, equal to the server's id for id, tests) with
the request's `diversity` set to each lambda; only the top-k step's order changes.
- Synthetic shop (features split time|user-time|random): the features' test part is the truth,
  seen items excluded, the same users and metrics as `shoprec evaluate`.
- Public development set: the referee's own split and scorer (`benchmarks.referee_bench` built
  the artifacts under --referee-work); the referee scores every lambda's lists.
Diversity per list: `category`, the share of item pairs from different categories; `embedding`,
1 - the mean pairwise cosine of the two-tower item vectors. Coverage@10: share of the catalog in
any list. Writes benchmarks/results/diversity_<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import describe

LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
K = 10


def ranked_candidates(pipe, users: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Every step before top-k, for all users: candidate rows and ranker scores [U, N]."""
    rows, scores = [], []
    for s in range(0, len(users), batch):
        t = pipe.rank(pipe.request(users[s : s + batch], K))
        rows.append(t["candidate_rows"])
        scores.append(pipe.steps["topk"].with_prior(t["candidate_rows"], t["ranking_scores"]))  # what top-k orders by
    return np.concatenate(rows), np.concatenate(scores)


def lists_for(rows: np.ndarray, scores: np.ndarray, lam: float, emb: np.ndarray, pool: int) -> np.ndarray:
    """Top-K store rows per user as the top-k step orders them at this lambda (-1 pads)."""
    from runtime.steps import mmr_order

    out = np.full((len(rows), K), -1, np.int64)
    for i in range(len(rows)):
        order = mmr_order(rows[i], scores[i], K, lam, emb, pool)
        out[i, : len(order)] = rows[i][order]
    return out


def embedding_diversity(top: np.ndarray, emb: np.ndarray) -> np.ndarray:
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = np.zeros(len(top))
    for i, t in enumerate(top):
        e = unit[t[t >= 0]]
        n = len(e)
        if n > 1:
            out[i] = 1.0 - (float((e @ e.T).sum()) - n) / (n * (n - 1))
    return out


def curve_synthetic(artifacts: Path, cfg, max_users: int) -> dict:
    from runtime.pipeline import Pipeline
    from training import metrics as M
    from training.data import FeatureData
    from training.evaluate import split_truth

    data = FeatureData(artifacts / "features")
    acts = data.actions
    users, truth = split_truth(data, 2, acts[acts["split"] == 0])
    keep = np.random.default_rng(0).permutation(len(users))[:max_users]
    users, truth = users[np.sort(keep)], [truth[i] for i in np.sort(keep)]
    pipe = Pipeline(artifacts / "serving", cfg=cfg.serve)
    emb = pipe.steps["topk"].embeddings
    rows, scores = ranked_candidates(pipe, users)
    points = []
    for lam in LAMBDAS:
        top = lists_for(rows, scores, lam, emb, cfg.serve.diversity_pool)
        points.append({"lambda": lam, "ndcg@10": M.mean_se(M.per_user_ndcg(top, truth, K)),
                       "recall@10": M.mean_se(M.per_user_recall(top, truth, K)),
                       "category_diversity@10": M.mean_se(M.per_user_diversity(top, data.category, K)),
                       "embedding_diversity@10": M.mean_se(embedding_diversity(top, emb)),
                       "coverage@10": (M.coverage(top, data.n_items, K), None)})
    return {"users": len(users), "truth": "the features' test part, seen items excluded", "points": points}


def curve_referee(work: Path, cfg, referee: Path, data_dir: Path, protocol: str) -> dict:
    from runtime.pipeline import Pipeline
    from training import metrics as M

    from .referee_bench import _users, _write_lists

    pipe = Pipeline(work / "artifacts" / "serving", cfg=cfg.serve)
    emb = pipe.steps["topk"].embeddings
    ids = pipe.item_table["item_ids"]
    category = pipe.item_table["category_code"]
    users = np.array(sorted(_users(work / "split" / "eval_users_test.csv")), dtype=np.int64)
    rows, scores = ranked_candidates(pipe, users)
    env = {**os.environ, "REFEREE_DATA": str(data_dir.parent)}
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for lam in LAMBDAS:
            top = lists_for(rows, scores, lam, emb, cfg.serve.diversity_pool)
            ranked, scored = Path(tmp) / f"lists_{lam}.csv", Path(tmp) / f"score_{lam}.json"
            _write_lists(ranked, {int(u): ids[t[t >= 0]] for u, t in zip(users, top)})
            subprocess.run([sys.executable, str(referee), "score", "--dataset", "mlls", "--protocol", protocol, "--part",
                            "test", "--ranked", str(ranked), "--json", str(scored)], env=env, check=True, capture_output=True)
            m = json.loads(scored.read_text())["metrics"]
            se = m.get("stderr", {})
            points.append({"lambda": lam, "ndcg@10": (m["NDCG@10"], se.get("NDCG@10")),
                           "recall@10": (m["Recall@10"], se.get("Recall@10")),
                           "category_diversity@10": M.mean_se(M.per_user_diversity(top, category, K)),
                           "embedding_diversity@10": M.mean_se(embedding_diversity(top, emb)),
                           "coverage@10": (m["Coverage@10"], None)})
    return {"users": len(users), "truth": f"the referee's {protocol} test part, scored by the referee", "points": points}


def markdown(report: dict) -> str:
    lines = [f"# Diversity (MMR) over lambda — {report['tag']}", "",
             f"Command: `{report['command']}`. {report['users']} users; truth: {report['truth']}. Machine: {report['machine']}. "
             f"k = {K}; MMR over the best max({report['pool']}, k) candidates; lambda 0 = the ranker's order (the default).", "",
             "| lambda | NDCG@10 | Recall@10 | category diversity@10 | embedding diversity@10 | coverage@10 |",
             "|---|---|---|---|---|---|"]

    def cell(v):
        mean, se = v
        return f"{mean:.4f}" + (f" ± {se:.4f}" if se else "")

    for p in report["points"]:
        lines.append(f"| {p['lambda']:.1f} | {cell(p['ndcg@10'])} | {cell(p['recall@10'])} | "
                     f"{cell(p['category_diversity@10'])} | {cell(p['embedding_diversity@10'])} | {cell(p['coverage@10'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [p["lambda"] for p in report["points"]]
    base = report["points"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ndcg@10", "NDCG@10"), ("category_diversity@10", "category diversity@10"),
                       ("embedding_diversity@10", "embedding diversity@10"), ("coverage@10", "coverage@10")):
        ax.plot(lam, [p[key][0] / base[key][0] for p in report["points"]], marker="o", label=label)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xlabel("diversity (MMR lambda)")
    ax.set_ylabel("relative to lambda = 0")
    ax.set_title(f"MMR diversity — {report['tag']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="report name: diversity_<tag>.*")
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"), help="synthetic shop: features + serving bundle")
    p.add_argument("--referee-work", help="a referee_bench protocol folder (split/, artifacts/): score with the referee")
    p.add_argument("--protocol", default="random-8-1-1")
    p.add_argument("--referee", default=str(REPO_ROOT.parent / "shared" / "quality" / "referee.py"))
    p.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data" / "ml-latest-small"))
    p.add_argument("--max-users", type=int, default=3000)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    cfg = load_config()
    t0 = time.time()
    if args.referee_work:
        result = curve_referee(Path(args.referee_work), cfg, Path(args.referee), Path(args.data), args.protocol)
    else:
        result = curve_synthetic(Path(args.artifacts), cfg, args.max_users)
    report = {"tag": args.tag, "command": "python -m benchmarks.diversity_curve " + " ".join(argv or sys.argv[1:]),
              "machine": describe(), "pool": cfg.serve.diversity_pool, **result, "seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"diversity_{args.tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"diversity_{args.tag}.md").write_text(markdown(report))
    plot(report, out / f"diversity_{args.tag}.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
