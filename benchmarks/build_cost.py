"""What building a shop costs, stage by stage: wall time and peak memory (RSS) of each `shoprec` stage process.

    .venv/bin/python -m benchmarks.build_cost --size medium --artifacts /tmp/medium   # data -> export: ~20 min on 2 cores
    .venv/bin/python -m benchmarks.build_cost --size large --artifacts /tmp/large --stages evaluate serve

Runs `shoprec data --size SIZE`, `features`, `train`, `export`, `evaluate` and a serving probe into ARTIFACTS
(a folder of its own: the stages replace what is there), each as its own process, and reads each one's peak
RSS from the kernel when it exits (wait4, as /usr/bin/time does). Stops at the first stage that fails, and
records how it failed.
- `evaluate` writes quality_SIZE.{json,md,png} beside the cost report (replacing them).
- `serve` starts the server on the export (`shoprec serve`'s launcher: tritonserver, its python steps and the
  private Redis), and records the seconds until it is ready and the summed RSS of all its processes. It then
  asks it over gRPC for the top 10 of `--requests` random users with a history, one request at a time. Every
  list must be full and hold none of the user's seen items.
Writes benchmarks/results/build_cost_SIZE.json; `--stages` re-runs some stages and keeps the others' rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shoprec.config import REPO_ROOT

from .machine import commit, describe

STAGES = ("data", "features", "train", "export", "evaluate", "serve")


def stage_command(artifacts: Path, stage: str, size: str, results: Path, requests: int) -> list[str]:
    if stage == "serve":
        return [sys.executable, "-m", "benchmarks.build_cost", "--serve-probe", str(artifacts), "--requests", str(requests)]
    extra = {"data": ["--size", size], "evaluate": ["--tag", size, "--results", str(results), "--overwrite"]}.get(stage, [])
    return [sys.executable, "-m", "app.cli", "--artifacts", str(artifacts), stage, *extra]


def run_stage(artifacts: Path, stage: str, size: str, log, results: Path, requests: int = 200) -> dict:
    cmd = stage_command(artifacts, stage, size, results, requests)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"stage": stage, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "exit_code": proc.returncode, "commit": commit()}
    probe = artifacts / "serve_probe.json"
    if stage == "serve" and proc.returncode == 0 and probe.exists():
        row.update(json.loads(probe.read_text()))
    return row


def serve_probe(artifacts: Path, requests: int, seed: int = 0) -> dict:
    """Start the server on ARTIFACTS as `shoprec serve` does, time it to ready, sum its processes' RSS, and ask it
    for `requests` users' top 10 one at a time; writes ARTIFACTS/serve_probe.json."""
    import numpy as np
    import psutil

    from client import RecommenderClient
    from serving.launcher import TritonServer
    from shoprec.config import load_config
    from shoprec.manifest import verified_path

    cfg = load_config(None)
    with np.load(verified_path(artifacts / "serving", "user_store.npz"), allow_pickle=False) as z:
        ids, indptr, rows = z["user_id"], z["hist_indptr"], z["hist_rows"]
    with np.load(verified_path(artifacts / "serving", "item_table.npz"), allow_pickle=False) as z:
        item_ids = z["item_ids"]
    warm = np.flatnonzero(np.diff(indptr) > 0)
    pick = np.random.default_rng(seed).choice(warm, min(requests, len(warm)), replace=False)
    me = psutil.Process()

    def tree_rss() -> tuple[float, int]:
        procs = [p for p in me.children(recursive=True) if p.is_running()]
        return sum(p.memory_info().rss for p in procs) / 2**30, len(procs)

    t0 = time.perf_counter()
    with TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True) as server:
        ready_s = time.perf_counter() - t0
        rss_ready, n_procs = tree_rss()
        lat, full, seen_hits = [], 0, 0
        with RecommenderClient(server.grpc_url, "grpc") as c:
            for row in pick:
                t = time.perf_counter()
                rec = c.recommend(int(ids[row]), k=10)
                lat.append(time.perf_counter() - t)
                full += len(rec.item_ids) == 10
                seen_hits += int(np.isin(rec.item_ids, item_ids[rows[indptr[row] : indptr[row + 1]]]).sum())
        rss_served, _ = tree_rss()
    ms = np.array(lat) * 1000
    out = {"ready_s": round(ready_s, 1), "server_rss_gb_ready": round(rss_ready, 2), "server_rss_gb_after": round(rss_served, 2),
           "server_processes": n_procs,
           "requests": len(pick), "full_lists": full, "seen_items_served": seen_hits,
           "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}
    (artifacts / "serve_probe.json").write_text(json.dumps(out) + "\n")
    if full != len(pick) or seen_hits:
        raise SystemExit(f"serve probe: {len(pick) - full} short lists, {seen_hits} seen items served")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="medium", choices=["tiny", "small", "medium", "large"])
    ap.add_argument("--artifacts", type=Path, help="a folder of its own (its stages' outputs are replaced); required")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="the stages to run (default: all, in order); the report keeps the other stages' earlier rows")
    ap.add_argument("--requests", type=int, default=200, help="serve stage: users asked for their top 10 (default 200)")
    ap.add_argument("--serve-probe", type=Path, metavar="ARTIFACTS", help=argparse.SUPPRESS)  # the serve stage's process
    args = ap.parse_args(argv)
    if args.serve_probe:
        print(json.dumps(serve_probe(args.serve_probe.resolve(), args.requests)))
        return
    if args.artifacts is None:
        ap.error("--artifacts is required")
    args.artifacts.mkdir(parents=True, exist_ok=True)
    out = args.results / f"build_cost_{args.size}.json"
    earlier = {}
    if out.exists() and set(args.stages) != set(STAGES):
        earlier = {r["stage"]: r for r in json.loads(out.read_text()).get("stages", [])}
    report = {"size": args.size, "machine": describe(), "cores": os.cpu_count(),
              "command": f"python -m benchmarks.build_cost --size {args.size}", "stages": []}
    rows = dict(earlier)
    with open(args.artifacts / "build_cost.log", "a" if earlier else "w") as log:
        for stage in [s for s in STAGES if s in args.stages]:
            row = run_stage(args.artifacts.resolve(), stage, args.size, log, args.results, args.requests)
            rows[stage] = row
            print(json.dumps(row), flush=True)
            if row["exit_code"]:
                report["failed"] = f"{stage} exited {row['exit_code']}; log: {args.artifacts / 'build_cost.log'}"
                break
    report["stages"] = [rows[s] for s in STAGES if s in rows]
    report["total_wall_s"] = round(sum(r["wall_s"] for r in report["stages"]), 1)
    report["peak_rss_gb"] = max(r["peak_rss_gb"] for r in report["stages"])
    args.results.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{out}: {report['total_wall_s']} s, peak RSS {report['peak_rss_gb']} GB" + (f"; {report['failed']}" if "failed" in report else ""))


if __name__ == "__main__":
    main()
