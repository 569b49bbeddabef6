"""The FastAPI baseline's best configuration: the pipeline inline in each worker's event loop, or in FastAPI's threadpool.

    .venv/bin/python -m benchmarks.fastapi_modes --artifacts MEDIUM --tag medium      # ~8 min on 2 cores

The serving benchmark compares Triton with FastAPI + uvicorn running the same pipeline, and the issue asks
for FastAPI at its best. A FastAPI endpoint can run blocking work two ways:
  - thread: `run_in_threadpool`, as FastAPI does for a plain `def` endpoint: the event loop stays free,
    and a worker's requests run in threads that share its GIL;
  - inline: the `async` endpoint calls the pipeline directly: one request at a time per worker, the others
    wait in the socket.
Both servers (one worker per core, as in serving_bench) are up together; perf_analyzer (HTTP/JSON, the
same 1,000 real user ids) sweeps each at concurrency 1 and 16, `--rounds` times, the order reversed each
round. Figures are medians over rounds, ratios the median of each round's ratio; CPU ms per request is the workers' CPU time over the requests.
Writes benchmarks/results/fastapi_modes[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT

from .machine import command_line, commit, describe, write_report
from .serving_bench import input_data
from .serving_load import FastAPIServer, _cpu_per_request, _request_count, process_cpu, run_perf_analyzer

MODES = ("inline", "thread")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts)
    runs: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in args.concurrency} for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.json"
        input_data(artifacts, data)
        with FastAPIServer(artifacts, args.workers, "inline") as inline, FastAPIServer(artifacts, args.workers, "thread") as thread:
            servers = {"inline": inline, "thread": thread}
            for r in range(args.rounds):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    server = servers[mode]
                    for c in args.concurrency:
                        before = process_cpu(server.proc.pid)
                        row = run_perf_analyzer(server.url, "http", c, data, _request_count(c))
                        row["cpu_ms_per_request"] = sum(_cpu_per_request(before, process_cpu(server.proc.pid),
                                                                         row["requests"]).values())
                        runs[mode][c].append(row)
                        print(f"round {r + 1} {mode:6s} c={c:<3d} {row['throughput_rps']:7.1f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                              f"CPU {row['cpu_ms_per_request']:.2f} ms/request", flush=True)
    table = {mode: {c: {k: round(float(np.median([row[k] for row in rows])), 3)
                        for k in ("throughput_rps", "p50_ms", "p99_ms", "cpu_ms_per_request")}
                    | {"rounds_throughput_rps": [row["throughput_rps"] for row in rows]}
                    for c, rows in per_c.items()} for mode, per_c in runs.items()}
    report = {"command": command_line("python -m benchmarks.fastapi_modes", argv), "date": time.strftime("%Y-%m-%d"),
              "machine": describe(), "commit": commit(), "workers": args.workers, "rounds": args.rounds, "modes": table,
              # within each round (this machine drifts by more than the difference), then the median of the rounds
              "inline_over_thread_throughput": {c: round(float(np.median([a["throughput_rps"] / b["throughput_rps"] for a, b in
                                                                          zip(runs["inline"][c], runs["thread"][c])])), 2)
                                                for c in args.concurrency}}
    md = [f"# FastAPI: the pipeline inline or in the threadpool — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. {args.workers} uvicorn workers each, perf_analyzer "
          f"HTTP/JSON, 1,000 real user ids; median of {args.rounds} alternated rounds.", "",
          "| mode | concurrency | req/s | p50 ms | p99 ms | CPU ms per request | req/s by round |", "|---|---|---|---|---|---|---|"]
    for mode, per_c in table.items():
        for c, row in per_c.items():
            md.append(f"| {mode} | {c} | {row['throughput_rps']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                      f"{row['cpu_ms_per_request']:.2f} | {row['rounds_throughput_rps']} |")
    md += ["", "Inline over threadpool, throughput (median of the rounds' ratios): " + ", ".join(f"concurrency {c}: {v}x"
                                                                  for c, v in report["inline_over_thread_throughput"].items()) + "."]
    write_report(args.out, "fastapi_modes", args.tag, report, md)
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
