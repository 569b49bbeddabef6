"""What a pause between requests costs the same steps: the in-process pipeline at batch 1, with and without
a sleep, or other work over memory, between requests.

    python -m benchmarks.idle_gap                                   # after `make demo`; ~1 min
    python -m benchmarks.idle_gap --artifacts MEDIUM --tag medium
    python -m benchmarks.idle_gap --artifacts MEDIUM --gaps-ms 0 --touch-mb 1 4 32 --tag medium_touch

A python-backend stub at concurrency 1 is idle between its requests: for the rest of the request's path,
and, with several instances of the model, for the other instances' turns. This runs the served graph
in one process (the cpu profile's fused model, as `pipeline` runs it, one thread) over the same real user
ids, one request at a time: back to back, and with `--gaps-ms` of sleep after each request. A stub also finds
its caches used by the other processes (tritonserver, the load generator) when its next request comes:
`--touch-mb` settings write over that many MB of another buffer after each request instead (not timed), and
time the request that follows. The settings alternate over `--rounds` (this machine's speed drifts), and each
figure is the median p50 of the rounds.
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


def p50_ms(pipe, users: np.ndarray, gap_s: float, touch: np.ndarray | None = None) -> float:
    times = []
    for u in users:
        t0 = time.perf_counter()
        pipe.recommend([u], 10)
        times.append(time.perf_counter() - t0)
        if gap_s:
            time.sleep(gap_s)
        if touch is not None:
            touch += 1  # reads and writes every cache line of it
    return float(np.median(times) * 1e3)


def main(argv=None) -> dict:
    from runtime.pipeline import Pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--gaps-ms", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    p.add_argument("--touch-mb", type=float, nargs="*", default=[],
                   help="also: this many MB of memory written between requests (no sleep), one setting each")
    p.add_argument("--requests", type=int, default=400, help="requests per setting and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts).resolve()
    users = np.random.default_rng(0).choice(warm_users(artifacts), size=args.requests)
    pipe = Pipeline(artifacts / "serving", threads=1, profile="cpu")
    p50_ms(pipe, users[:100], 0.0)  # warm
    buffers = {mb: np.zeros(max(1, int(mb * 2**20) // 8)) for mb in args.touch_mb}
    settings = [(str(g), g, None) for g in args.gaps_ms] + [(f"touch {mb:g} MB", 0.0, mb) for mb in args.touch_mb]
    rounds: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    for r in range(args.rounds):
        for name, g, mb in (settings if r % 2 == 0 else list(reversed(settings))):
            rounds[name].append(round(p50_ms(pipe, users, g / 1e3, None if mb is None else buffers[mb]), 3))
    p50 = {name: round(float(np.median(v)), 3) for name, v in rounds.items()}
    base = p50[str(args.gaps_ms[0])]
    extra = {g: round(v - base, 3) for g, v in p50.items()}
    touched = [name for name, _, mb in settings if mb is not None]
    report = {"command": command_line(COMMAND, argv), "machine": describe(), "commit": commit(),
              "requests": args.requests, "rounds": args.rounds,
              "p50_ms_by_gap_ms": {g: p50[g] for g in p50 if g not in touched}, "rounds_p50_ms": rounds,
              "extra_ms_by_gap_ms": {g: extra[g] for g in extra if g not in touched}}
    if touched:
        report["p50_ms_by_touch"] = {g: p50[g] for g in touched}
        report["extra_ms_by_touch"] = {g: extra[g] for g in touched}
    md = [f"# A pause between requests — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. The cpu profile's fused graph in one process, batch 1, "
          f"{args.requests} real user ids per setting; median p50 of {args.rounds} alternated rounds; extra ms against "
          f"the first sleep setting.", "",
          "| between requests (sleep ms, or memory written) | p50 ms | extra ms | p50 by round |", "|---|---|---|---|"]
    md += [f"| {g} | {p50[g]} | {extra[g]} | {rounds[g]} |" for g in p50]
    write_report(args.out, "idle_gap", args.tag, report, md)
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
