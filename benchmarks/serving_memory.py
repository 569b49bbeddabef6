"""Memory of a running server, per process: what each python-backend stub holds privately and what the
instances share (the bundle's memory-mapped arrays).

    python -m benchmarks.serving_memory                                  # after `make demo`; ~1 min
    python -m benchmarks.serving_memory --artifacts LARGE --tag large

A server as `shoprec serve` runs it (the step doctor off) on `--profile`, `--requests` requests for real
user ids with history over gRPC (so the steps touch the pages a request needs), then, per process, from
/proc/<pid>/smaps_rollup: RSS, PSS (shared pages split between the processes mapping them), shared clean
and private pages. Results: benchmarks/results/serving_memory[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config

from .machine import command_line, commit, describe, write_report
from .serving_bench import warm_users
from .serving_load import stub_pids

COMMAND = "python -m benchmarks.serving_memory"
FIELDS = {"Rss": "rss_mb", "Pss": "pss_mb", "Shared_Clean": "shared_clean_mb", "Private_Clean": "private_clean_mb",
          "Private_Dirty": "private_dirty_mb"}


def smaps_mb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if parts and parts[0].rstrip(":") in FIELDS:
                out[FIELDS[parts[0].rstrip(":")]] = int(parts[1]) // 1024
    return out


def main(argv=None) -> dict:
    from client import RecommenderClient
    from serving.launcher import TritonServer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--profile", default="cpu", choices=["cpu", "cpu-stages"])
    p.add_argument("--requests", type=int, default=500)
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts).resolve()
    cfg = dataclasses.replace(load_config().serve, canary_interval_s=0.0, response_cache_mb=0)
    users = warm_users(artifacts)[: args.requests]
    processes = {}
    with tempfile.TemporaryDirectory() as tmp, \
            TritonServer.from_config(cfg, artifacts, args.profile, ephemeral_ports=True, log_path=Path(tmp) / "triton.log") as server:
        with RecommenderClient(server.grpc_url) as c:
            for u in users:
                c.recommend(int(u), k=10)
        processes["tritonserver"] = smaps_mb(server.process.pid)
        for model, pid in stub_pids(server.process.pid).items():
            processes[f"stub:{model}"] = smaps_mb(pid)
    total = {k: sum(v.get(k, 0) for v in processes.values()) for k in FIELDS.values()}
    report = {"command": command_line(COMMAND, argv), "machine": describe(), "commit": commit(),
              "profile": args.profile, "requests": len(users), "processes": processes, "total": total,
              "bundle_mb": round(sum(f.stat().st_size for f in (artifacts / "serving").iterdir() if f.is_file()) / 2**20)}
    md = [f"# Server memory by process — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. Profile {args.profile}; after {len(users)} gRPC requests. "
          f"Bundle on disk: {report['bundle_mb']} MB. MB from /proc/<pid>/smaps_rollup.", "",
          "| process | RSS | PSS | shared clean | private |", "|---|---|---|---|---|"]
    for proc, m in [*processes.items(), ("**total**", total)]:
        md.append(f"| {proc} | {m['rss_mb']} | {m['pss_mb']} | {m['shared_clean_mb']} | "
                  f"{m['private_clean_mb'] + m['private_dirty_mb']} |")
    write_report(args.out, "serving_memory", args.tag, report, md)
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
