"""What building a shop costs, stage by stage: wall time and peak memory (RSS) of each `shoprec` stage process.

    .venv/bin/python -m benchmarks.build_cost --size medium --artifacts /tmp/medium   # ~25 min on 2 cores

Runs `shoprec data --size SIZE`, `features`, `train` and `export` into ARTIFACTS (a folder of its own: the stages
replace what is there), each as its own process, and reads each one's peak RSS from the kernel when it exits
(wait4, as /usr/bin/time does). Stops at the first stage that fails, and records how it failed.
Writes benchmarks/results/build_cost_SIZE.json.
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

from .machine import describe

STAGES = ("data", "features", "train", "export")


def run_stage(artifacts: Path, stage: str, size: str, log) -> dict:
    cmd = [sys.executable, "-m", "app.cli", "--artifacts", str(artifacts), stage, *(["--size", size] if stage == "data" else [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"stage": stage, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "exit_code": proc.returncode}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="medium", choices=["tiny", "small", "medium", "large"])
    ap.add_argument("--artifacts", type=Path, required=True, help="a folder of its own (its stages' outputs are replaced)")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    report = {"size": args.size, "machine": describe(), "cores": os.cpu_count(),
              "command": f"python -m benchmarks.build_cost --size {args.size}", "stages": []}
    with open(args.artifacts / "build_cost.log", "w") as log:
        for stage in STAGES:
            row = run_stage(args.artifacts.resolve(), stage, args.size, log)
            report["stages"].append(row)
            print(json.dumps(row), flush=True)
            if row["exit_code"]:
                report["failed"] = f"{stage} exited {row['exit_code']}; log: {args.artifacts / 'build_cost.log'}"
                break
    report["total_wall_s"] = round(sum(r["wall_s"] for r in report["stages"]), 1)
    report["peak_rss_gb"] = max(r["peak_rss_gb"] for r in report["stages"])
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"build_cost_{args.size}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{out}: {report['total_wall_s']} s, peak RSS {report['peak_rss_gb']} GB" + (f"; {report['failed']}" if "failed" in report else ""))


if __name__ == "__main__":
    main()
