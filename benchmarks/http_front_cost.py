"""What the validating HTTP front costs per request: the same requests through the front and straight to
tritonserver's private HTTP port, alternated in rounds on one server.

    .venv/bin/python -m benchmarks.http_front_cost            # 5 rounds x 300 requests each way

Sequential requests (concurrency 1) with tritonclient's HTTP client (binary tensors, as perf_analyzer
sends), one warm user, k = 10. Writes benchmarks/results/http_front_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config

from .machine import describe
from .serving_bench import warm_users


def _p50_ms(url: str, user: int, n: int) -> float:
    from client import RecommenderClient

    times = []
    with RecommenderClient(url, "http") as c:
        c.recommend(user, k=10)  # connection set up outside the timing
        for _ in range(n):
            t = time.perf_counter()
            c.recommend(user, k=10)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args(argv)
    from serving.launcher import TritonServer

    serve = load_config().replace("serve", online_store="none", canary_interval_s=0.0).serve
    user = int(warm_users(args.artifacts)[0])
    rounds = []
    with TritonServer.from_config(serve, args.artifacts, ephemeral_ports=True) as server:
        for r in range(args.rounds):
            order = [("front", server.http_url), ("direct", server.triton_http_url)]
            got = {name: _p50_ms(url, user, args.requests) for name, url in (order if r % 2 == 0 else order[::-1])}
            rounds.append({k: round(v, 3) for k, v in got.items()} | {"added_ms": round(got["front"] - got["direct"], 3)})
            print(json.dumps(rounds[-1]), flush=True)
    added = statistics.median(r["added_ms"] for r in rounds)
    report = {"rounds": rounds, "median_added_ms": round(added, 3), "requests_per_round": args.requests,
              "machine": describe(), "command": "python -m benchmarks.http_front_cost"}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "http_front_cost.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# The HTTP front's cost per request", "",
             f"Command: `{report['command']}`. Machine: {report['machine']}. p50 of {args.requests} sequential requests "
             "per round, tritonclient HTTP (binary tensors), the front and the direct port alternated.", "",
             "| round | through the front (ms) | direct (ms) | added (ms) |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['front']} | {r['direct']} | {r['added_ms']} |" for i, r in enumerate(rounds)]
    lines += ["", f"Median added: {report['median_added_ms']} ms per request.", ""]
    (args.results / "http_front_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
