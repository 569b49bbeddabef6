"""The size-capping gRPC front (serving/grpc_front.py): what it stops, and what it costs.

    .venv/bin/python -m benchmarks.grpc_front             # on ARTIFACTS (`make demo` built them)

One real tritonserver (CPU profile, online store off, step doctor off) with the front on: its public
gRPC port is the front, Triton's own gRPC listens on a private loopback port, reached directly here
for the comparison.
- Size: a client process sends three 64 MiB inference requests, first through the front, then
  straight to Triton. Reported: the answers, and the RSS growth of tritonserver and its stubs and
  of this process (which runs the front).
- Cost: perf_analyzer through the front and straight to Triton, alternated, `--rounds` times, at
  concurrency 1 and 16; the medians of the rounds and their ratio.
Writes benchmarks/results/grpc_front.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config

from .machine import describe

SENDER = """
import sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
g = grpcclient.InferenceServerClient(sys.argv[1])
ids = np.zeros((8 << 20, 1), dtype=np.int64)  # 64 MiB
for _ in range(3):
    big = grpcclient.InferInput("user_id", list(ids.shape), "INT64")
    big.set_data_from_numpy(ids)
    k = grpcclient.InferInput("k", [1, 1], "INT32")
    k.set_data_from_numpy(np.ones((1, 1), np.int32))
    try:
        g.infer("recommender", [big, k])
        print("answered")
    except InferenceServerException as exc:
        print(str(exc.status()).replace("StatusCode.", ""), str(exc)[:100].replace(chr(10), " "))
"""


def _rss_mb(pids) -> float:
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            pass
    return round(total * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def size_check(url: str, server) -> dict:
    from serving.launcher import process_group

    triton = [pid for pid, _, _ in process_group(server.process.pid)]
    before = {"tritonserver_and_stubs": _rss_mb(triton), "front_process": _rss_mb([os.getpid()])}
    out = subprocess.run([sys.executable, "-c", SENDER, url], capture_output=True, text=True, timeout=300)
    after = {"tritonserver_and_stubs": _rss_mb(triton), "front_process": _rss_mb([os.getpid()])}
    return {"answers": out.stdout.splitlines() or [out.stderr[-300:]], "rss_before_mb": before, "rss_after_mb": after,
            "rss_growth_mb": {k: round(after[k] - before[k], 1) for k in before}}


def run(artifacts: Path, rounds: int = 3) -> dict:
    from benchmarks.serving_bench import input_data
    from benchmarks.serving_load import run_perf_analyzer
    from serving.launcher import TritonServer

    cfg = load_config()
    serve = cfg.replace("serve", online_store="none", canary_interval_s=0.0, grpc_front="true").serve
    data = artifacts / "triton" / "grpc_front_input.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    input_data(artifacts, data)
    with TritonServer.from_config(serve, artifacts, ephemeral_ports=True) as server:
        urls = {"front": server.grpc_url, "direct": f"127.0.0.1:{server.triton_grpc_port}"}
        cost: dict = {}
        for c in (1, 16):
            runs: dict = {name: [] for name in urls}
            for _ in range(rounds):
                for name, url in urls.items():
                    runs[name].append(run_perf_analyzer(url, "grpc", c, data, 1500 if c == 1 else 3000))
            med = {name: {m: round(statistics.median(r[m] for r in rs), 3) for m in ("p50_ms", "p99_ms", "throughput_rps")}
                   for name, rs in runs.items()}
            cost[f"c{c}"] = {**med, "p50_added_ms": round(med["front"]["p50_ms"] - med["direct"]["p50_ms"], 3),
                             "throughput_ratio": round(med["front"]["throughput_rps"] / med["direct"]["throughput_rps"], 3),
                             "rounds": runs}
        size = {"through_front": size_check(urls["front"], server), "straight_to_triton": size_check(urls["direct"], server)}
    return {"max_message_mb": serve.grpc_max_message_mb, "size": size, "cost": cost, "rounds": rounds}


def markdown(r: dict) -> str:
    s, c = r["size"], r["cost"]
    lines = ["# The size-capping gRPC front", "", f"Command: `{r['command']}`. Machine: {r['machine']}.", "",
             f"## Three 64 MiB requests (limit {r['max_message_mb']:g} MiB)", "",
             "| sent | answers | RSS growth: tritonserver + stubs | RSS growth: the front's process |", "|---|---|---|---|"]
    for name, x in (("through the front", s["through_front"]), ("straight to Triton", s["straight_to_triton"])):
        answers = "; ".join(sorted(set(a.split(" ")[0] for a in x["answers"])))
        lines.append(f"| {name} | {answers} | {x['rss_growth_mb']['tritonserver_and_stubs']} MB | "
                     f"{x['rss_growth_mb']['front_process']} MB |")
    lines += ["", f"## Cost (perf_analyzer, medians of {r['rounds']} alternated rounds)", "",
              "| concurrency | p50 direct | p50 front | added | req/s direct | req/s front | ratio |", "|---|---|---|---|---|---|---|"]
    for key, x in c.items():
        lines.append(f"| {key[1:]} | {x['direct']['p50_ms']} ms | {x['front']['p50_ms']} ms | {x['p50_added_ms']} ms | "
                     f"{x['direct']['throughput_rps']} | {x['front']['throughput_rps']} | {x['throughput_ratio']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    r = run(args.artifacts.resolve(), args.rounds)
    r.update(machine=describe(), command="python -m benchmarks.grpc_front" + ("" if args.rounds == 3 else f" --rounds {args.rounds}"))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "grpc_front.json").write_text(json.dumps(r, indent=1) + "\n")
    (args.results / "grpc_front.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
