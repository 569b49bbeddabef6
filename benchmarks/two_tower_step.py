"""What one two-tower training step costs with the item-id table dense (AdamW) or sparse (SparseAdam).

    .venv/bin/python -m benchmarks.two_tower_step --artifacts /tmp/large --tag large   # ~3 min at 1M items

Builds the two-tower of the features at ARTIFACTS both ways (`retrieval.sparse_from_rows` forced to 0 or 1),
and times `--steps` steps of the training loop's work (forward with mixed negatives, backward, the
non-finite check, the optimizer step) on the same batches, read beforehand. The two run alternately,
`--rounds` times, after a few warm-up steps each. Writes benchmarks/results/two_tower_step_TAG.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import describe

WARMUP = 5


def time_steps(data, cfg, batches: list[dict], sparse: bool) -> tuple[float, float]:
    """Mean ms per step over `batches` (after WARMUP steps), and the last loss."""
    import torch

    from training import train as T

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = T.build_two_tower(data, replace(cfg, sparse_from_rows=1 if sparse else 0))
    opt = T._Optimizers(model, cfg.learning_rate, cfg.weight_decay)
    item_cat, item_cont = T._t(data.item_cat, "cpu"), T._t(data.item_cont, "cpu")
    t0 = None
    for i, b in enumerate(batches):
        if i == WARMUP:
            t0 = time.perf_counter()
        cat, cont, seq, kinds = data.arrays(b)
        rows = b["item_row"]
        extra = rng.integers(0, data.n_items, cfg.mixed_negatives)
        u = model.user_tower(T._t(cat, "cpu"), T._t(cont, "cpu"), T._t(seq, "cpu"), T._t(kinds, "cpu"))
        v = model.item_tower(item_cat[rows], item_cont[rows])
        e = model.item_tower(item_cat[extra], item_cont[extra])
        loss = T.sampled_softmax_loss(u, v, T._t(rows, "cpu"), None, cfg.temperature, e, T._t(extra, "cpu"), None)
        opt.zero_grad()
        loss.backward()
        T._check_finite("retrieval", 1, loss, model)
        opt.step()
    return (time.perf_counter() - t0) / (len(batches) - WARMUP) * 1000, float(loss.detach())


def main(argv=None) -> dict:
    from training.data import FeatureData

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--tag", default="small")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run (default 40)")
    ap.add_argument("--rounds", type=int, default=2, help="dense/sparse alternations (default 2)")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    cfg = load_config(None).retrieval
    data = FeatureData(args.artifacts / "features")
    batches = []
    for b in data.train_batches(cfg.batch_size, (0,), shuffle_seed=cfg.seed):
        batches.append(b)
        if len(batches) == WARMUP + args.steps:
            break
    runs = []
    for r in range(args.rounds):
        for sparse in (False, True):
            ms, loss = time_steps(data, cfg, batches, sparse)
            runs.append({"round": r, "item_ids": "sparse" if sparse else "dense", "ms_per_step": round(ms, 1), "loss": round(loss, 4)})
            print(json.dumps(runs[-1]), flush=True)
    mean = {k: float(np.mean([x["ms_per_step"] for x in runs if x["item_ids"] == k])) for k in ("dense", "sparse")}
    report = {"tag": args.tag, "items": int(data.n_items), "batch_size": cfg.batch_size, "mixed_negatives": cfg.mixed_negatives,
              "steps": args.steps, "machine": describe(),
              "command": f"python -m benchmarks.two_tower_step --artifacts ARTIFACTS --tag {args.tag}", "runs": runs,
              "ms_per_step": {k: round(v, 1) for k, v in mean.items()}, "dense_over_sparse": round(mean["dense"] / mean["sparse"], 2)}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"two_tower_step_{args.tag}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{out}: dense {report['ms_per_step']['dense']} ms, sparse {report['ms_per_step']['sparse']} ms per step "
          f"({report['dense_over_sparse']}x)")
    return report


if __name__ == "__main__":
    main()
