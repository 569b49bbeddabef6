"""Training throughput (samples/s) of both models, from the features on disk.

    .venv/bin/python -m benchmarks.train_throughput [--artifacts artifacts] [--device cpu]

Runs `shoprec train` with the configured epochs into a scratch folder (artifacts/models is left
alone) and writes benchmarks/results/train_throughput.json. A sample is one labelled training row
through forward, backward and optimizer step: a clicked (user, item) pair for the two-tower (its
in-batch negatives come free), an impression or a sampled negative for the DLRM. Time is the
training loop only (batches streamed from parquet included; validation excluded). The load
average before and after is recorded because these machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config
from shoprec.manifest import verify_manifest

from .machine import describe


def main(argv=None) -> dict:
    warnings.filterwarnings("ignore")
    import torch

    from training.train import train_all

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--config", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dataset", default=None, help="label for the features' dataset (default: as configured)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    features = Path(args.artifacts) / "features"
    verify_manifest(features, ["schema.json"])
    schema = json.loads((features / "schema.json").read_text())
    load_before = os.getloadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        report = train_all(features, scratch, cfg, args.device, progress=False)
    device = report["device"]
    machine = describe()
    if device == "cuda":
        machine += f", {torch.cuda.get_device_name(0)}"
    result = {
        "command": "python -m benchmarks.train_throughput" + (f" --device {args.device}" if args.device != "auto" else ""),
        "machine": machine,
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "dataset": {"name": args.dataset or f"{cfg.data.source} {cfg.data.size}", "users": schema["users"],
                    "items": schema["items"], "actions": schema["actions"], "two_tower_rows": schema["train_rows"]},
        "wall_seconds": round(time.time() - t0, 1),
    }
    for stage, part in (("retrieval (stage A, fit fold)", "retrieval_stage_a"), ("retrieval (refit, all of train)", "retrieval"),
                        ("ranking", "ranking")):
        r = report[part]
        result[stage] = {k: r[k] for k in ("train_samples_per_s", "train_samples", "train_seconds", "epochs_run")}
    result["retrieval (stage A, fit fold)"]["batch_size"] = cfg.retrieval.batch_size
    result["ranking"]["users_per_batch"] = cfg.ranking.users_per_batch
    result["sample"] = {"retrieval": "positive (user, item) action; softmax over the batch's items plus "
                                     f"{cfg.retrieval.mixed_negatives} uniform random items",
                        "ranking": f"one candidate of a held-out user's list ({cfg.serve.num_candidates} per user)"}
    result["total_train_seconds"] = report["seconds"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
