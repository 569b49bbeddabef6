"""Did an export change what users are served? Two bundle versions, the same users, their lists compared.

    python -m benchmarks.bundle_diff --artifacts A --old 4 --new 5 --tag medium_din

Both bundles run in-process (the cpu profile's fused graph, as the server runs it) for `--users` real user ids
with history, k = `--k`, no context. Per user: whether the two top-k lists are identical (same items in the
same order) and their overlap (shared items / k); and each bundle's time per request at batch 16, the bundles
alternated over `--rounds`. Results: benchmarks/results/bundle_diff[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT

from .machine import command_line, commit, describe, write_report
from .serving_bench import warm_users

COMMAND = "python -m benchmarks.bundle_diff"


def lists(pipe, users: np.ndarray, k: int) -> list[np.ndarray]:
    out = []
    for i in range(0, len(users), 16):
        out += [r[0] for r in pipe.recommend(users[i : i + 16], k)]
    return out


def main(argv=None) -> dict:
    from runtime.pipeline import Pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--old", type=int, required=True, help="bundle version (artifacts/bundles/N)")
    p.add_argument("--new", type=int, required=True)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts).resolve()
    users = np.random.default_rng(0).choice(warm_users(artifacts), size=args.users, replace=False)
    pipes = {v: Pipeline(artifacts / "bundles" / str(v), threads=1, profile="cpu") for v in (args.old, args.new)}
    served = {v: lists(pipe, users, args.k) for v, pipe in pipes.items()}
    identical = np.array([np.array_equal(a, b) for a, b in zip(served[args.old], served[args.new])])
    overlap = np.array([len(set(a.tolist()) & set(b.tolist())) / max(1, len(a)) for a, b in zip(served[args.old], served[args.new])])
    times: dict[int, list[float]] = {v: [] for v in pipes}
    sample = users[: 16 * 40]
    for r in range(args.rounds):
        for v in (list(pipes) if r % 2 == 0 else list(reversed(pipes))):
            t0 = time.perf_counter()
            lists(pipes[v], sample, args.k)
            times[v].append(round((time.perf_counter() - t0) / len(sample) * 1e3, 4))
    report = {"command": command_line(COMMAND, argv), "machine": describe(), "commit": commit(),
              "users": len(users), "k": args.k, "old": args.old, "new": args.new,
              "identical_lists": round(float(identical.mean()), 4), "mean_overlap": round(float(overlap.mean()), 4),
              "min_overlap": round(float(overlap.min()), 4),
              "ms_per_user_batch16": {str(v): float(np.median(t)) for v, t in times.items()},
              "rounds_ms_per_user_batch16": {str(v): t for v, t in times.items()}}
    md = [f"# Bundle {args.old} against bundle {args.new} — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. {len(users)} real users with history, k = {args.k}.", "",
          f"- identical top-{args.k} lists: {report['identical_lists']:.2%}",
          f"- mean overlap: {report['mean_overlap']:.4f} (lowest {report['min_overlap']:.2f})",
          f"- ms per user at batch 16 (median of {args.rounds} alternated rounds): "
          + ", ".join(f"bundle {v}: {t}" for v, t in report["ms_per_user_batch16"].items())]
    write_report(args.out, "bundle_diff", args.tag, report, md)
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
