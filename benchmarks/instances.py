"""The cpu profiles and their instance counts (`serve.instances`), measured side by side: how many python models
per request, and how many stubs of each, buy throughput at concurrency 16 without costing concurrency 1?

    python -m benchmarks.instances                             # after `make demo`; ~6 min on 2 cores
    python -m benchmarks.instances --artifacts A --tag medium

Each variant serves the same bundle from a fresh server: the cpu profile (one model runs the whole graph) with
its default of one instance per core, the same instances taking turns (`serve.prefer_first_instance` off: no rate
limiter), one instance, and its dynamic batcher without preferred batch sizes or with a queue delay
(`serve.batching`); the cpu-stages profile (three models) with one instance each and with two of
`candidates`, its busiest stub. `--variants` runs some of them (by their names in the table). The response cache is off
(the load repeats its users) and the step doctor off. perf_analyzer drives it over gRPC with the same 1,000
real user ids at each `--concurrency` level (k = 10). The variants are run `--rounds` times, the order
reversed each round, because this machine's speed drifts within minutes; each figure is the median of
its rounds. Per level: throughput, p50/p99, CPU ms per request by process, and the batch size each
step saw (Triton's statistics). Results: benchmarks/results/instances[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import command_line, commit, describe
from .serving_bench import input_data, sweep

COMMAND = "python -m benchmarks.instances"
# name: (profile, serve.instances, other serve settings)
VARIANTS = {"cpu (default: pipeline x cores)": ("cpu", {}, {}),
            "cpu, pipeline x cores taking turns": ("cpu", {}, {"prefer_first_instance": False}),
            "cpu, pipeline x1": ("cpu", {"pipeline": 1}, {}),
            "cpu, no preferred batch sizes": ("cpu", {}, {"batching": {"pipeline": {"preferred_batch_sizes": []}}}),
            "cpu, queue delay 200 us": ("cpu", {}, {"batching": {"pipeline": {"max_queue_delay_us": 200}}}),
            "cpu-stages, 1 each": ("cpu-stages", {}, {}), "cpu-stages, candidates x2": ("cpu-stages", {"candidates": 2}, {})}


def run_variant(artifacts: Path, variant: tuple[str, dict, dict], levels: list[int], data: Path, tmp: Path) -> list[dict]:
    from serving.launcher import TritonServer

    cfg = load_config().serve
    profile, instances, settings = variant
    serve = dataclasses.replace(cfg, response_cache_mb=0, canary_interval_s=0.0, instances=dict(instances), **settings)
    results: dict = {}
    with TritonServer.from_config(serve, artifacts, profile, ephemeral_ports=True, log_path=tmp / "triton.log") as server:
        sweep(results, "triton-grpc", server.grpc_url, "grpc", levels, data, server.process.pid, server.grpc_url)
    return results["triton-grpc"]


def _median(rows: list[dict], key: str) -> float:
    return round(float(np.median([r[key] for r in rows])), 3)


def summarise(runs: dict[str, list[list[dict]]], levels: list[int]) -> dict:
    out = {}
    for name, rounds in runs.items():
        per_level = {}
        for i, c in enumerate(levels):
            rows = [r[i] for r in rounds]
            cpu = {k: round(float(np.median([r["cpu_ms_per_request"].get(k, 0.0) for r in rows])), 3)
                   for k in rows[0]["cpu_ms_per_request"]}
            batch = {step: round(float(np.median([r["steps"][step]["avg_batch"] for r in rows])), 2)
                     for step in rows[0].get("steps", {})
                     if all(r.get("steps", {}).get(step, {}).get("avg_batch") is not None for r in rows)}
            per_level[str(c)] = {"throughput_rps": _median(rows, "throughput_rps"), "p50_ms": _median(rows, "p50_ms"),
                                 "p99_ms": _median(rows, "p99_ms"), "cpu_ms_per_request": cpu, "avg_batch": batch,
                                 "rounds_rps": [r["throughput_rps"] for r in rows]}
        out[name] = per_level
    return out


def write_outputs(report: dict, out: Path, tag: str) -> None:
    name = f"instances_{tag}" if tag else "instances"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    s, levels = report["summary"], report["concurrency"]
    base = s[next(iter(s))]
    md = [f"# Instances per model — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. Bundle: {report['items']} items. gRPC, k = 10, "
          f"1,000 real user ids, response cache off; median of {report['rounds']} rounds (order reversed each round).", "",
          "| profile, instances | " + " | ".join(f"c{c} req/s | c{c} p50 ms | c{c} p99 ms" for c in levels) + " | c"
          + f"{levels[-1]} vs the first |",
          "|---|" + "---|---|---|" * len(levels) + "---|"]
    for variant, per in s.items():
        cells = " | ".join(f"{per[str(c)]['throughput_rps']} | {per[str(c)]['p50_ms']} | {per[str(c)]['p99_ms']}" for c in levels)
        ratio = per[str(levels[-1])]["throughput_rps"] / base[str(levels[-1])]["throughput_rps"]
        md.append(f"| {variant} | {cells} | {ratio:.2f}x |")
    md += ["", f"CPU ms per request and average batch per step at c{levels[-1]}:", ""]
    for variant, per in s.items():
        row = per[str(levels[-1])]
        md.append(f"- {variant}: CPU {json.dumps(row['cpu_ms_per_request'])}; batch {json.dumps(row['avg_batch'])}; "
                  f"req/s by round {row['rounds_rps']}")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. medium)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME", default=list(VARIANTS),
                   help="the variants to run, by name (default: all): " + "; ".join(VARIANTS))
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts).resolve()
    variants = {name: VARIANTS[name] for name in VARIANTS if name in args.variants}  # the table's order
    runs: dict[str, list] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "input.json"
        input_data(artifacts, data)
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                print(f"round {r + 1}/{args.rounds}: {name}", flush=True)
                runs[name].append(run_variant(artifacts, variants[name], args.concurrency, data, tmp))
    report = {"command": command_line(COMMAND, argv), "machine": describe(), "commit": commit(),
              "items": json.loads((artifacts / "serving" / "contract.json").read_text())["n_items"],
              "concurrency": args.concurrency, "rounds": args.rounds, "variants": variants,
              "summary": summarise(runs, args.concurrency), "runs": runs}
    write_outputs(report, Path(args.out), args.tag)
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main()
