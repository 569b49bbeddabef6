"""What a pause between requests costs the same steps: the in-process pipeline at batch 1, with and without
a sleep between requests.

    python -m benchmarks.idle_gap                                   # after `make demo`; ~1 min
    python -m benchmarks.idle_gap --artifacts MEDIUM --tag medium

A python-backend stub at concurrency 1 is idle between its requests: for the rest of the request's path,
and, with several instances of the model, for the other instances' turns. This runs the served graph
in one process (the cpu profile's fused model, as `pipeline` runs it, one thread) over the same real user
ids, one request at a time: back to back, and with `--gaps-ms` of sleep after each request. The settings
alternate over `--rounds` (this machine's speed drifts), and each figure is the median p50 of the rounds.
Results: benchmarks/results/idle_gap[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT

from .machine import command_line, commit, describe, write_report
from .serving_bench import warm_users

COMMAND = "python -m benchmarks.idle_gap"


def p50_ms(pipe, users: np.ndarray, gap_s: float) -> float:
    times = []
    for u in users:
        t0 = time.perf_counter()
        pipe.recommend([u], 10)
        times.append(time.perf_counter() - t0)
        if gap_s:
            time.sleep(gap_s)
    return float(np.median(times) * 1e3)


def main(argv=None) -> dict:
    from runtime.pipeline import Pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--gaps-ms", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    p.add_argument("--requests", type=int, default=400, help="requests per setting and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts).resolve()
    users = np.random.default_rng(0).choice(warm_users(artifacts), size=args.requests)
    pipe = Pipeline(artifacts / "serving", threads=1, profile="cpu")
    p50_ms(pipe, users[:100], 0.0)  # warm
    rounds: dict[str, list[float]] = {str(g): [] for g in args.gaps_ms}
    for r in range(args.rounds):
        for g in (args.gaps_ms if r % 2 == 0 else list(reversed(args.gaps_ms))):
            rounds[str(g)].append(round(p50_ms(pipe, users, g / 1e3), 3))
    p50 = {g: round(float(np.median(v)), 3) for g, v in rounds.items()}
    base = p50[str(args.gaps_ms[0])]
    report = {"command": command_line(COMMAND, argv), "machine": describe(), "commit": commit(),
              "requests": args.requests, "rounds": args.rounds, "p50_ms_by_gap_ms": p50, "rounds_p50_ms": rounds,
              "extra_ms_by_gap_ms": {g: round(v - base, 3) for g, v in p50.items()}}
    md = [f"# A pause between requests — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. The cpu profile's fused graph in one process, batch 1, "
          f"{args.requests} real user ids per setting; median p50 of {args.rounds} alternated rounds.", "",
          "| sleep between requests (ms) | p50 ms | extra ms | p50 by round |", "|---|---|---|---|"]
    md += [f"| {g} | {p50[g]} | {report['extra_ms_by_gap_ms'][g]} | {rounds[g]} |" for g in p50]
    write_report(args.out, "idle_gap", args.tag, report, md)
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
