"""What the whole graph costs per user, run as the cpu profile's stub runs it, at each batch size, alone and with
other processes running it beside it: the floor under Triton's throughput on this machine.

    .venv/bin/python -m benchmarks.graph_cost --artifacts MEDIUM --tag medium     # ~5 min on 2 cores

`benchmarks.step_cost` times each step on its own, looping one step over every batch: each step's code and data
stay in the caches, which a server never sees. Here every batch runs the cpu profile's one model (`pipeline`: the
whole graph, top-k answering the batch's requests in one call, `Fused.run_requests`) from the same merged request
tensors Triton's batcher hands the stub, so the steps take turns in the caches as they do in the server. At
concurrency 16 on two cores the batcher forms batches of about 5.5 requests over two instances (serving results,
`requests per batch`), and each instance shares the cores with the other, tritonserver and the load generator:
`--processes 1 2` runs one process alone, then two side by side (each its own pipeline, as each instance is).

Each (batch, processes) point runs `--seconds` of back-to-back batches in every process, over `--users` warm
users; the points are alternated round by round (`--rounds`, order reversed each round) and the median of the
rounds is reported: CPU ms per user (the process's own CPU time over the users it answered), and wall ms per
user summed over the processes (what the machine gives each user). Writes benchmarks/results/graph_cost[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from pathlib import Path


from shoprec.config import REPO_ROOT

from .machine import publish


def fused_batches(artifacts: Path, ids: list[int], batch: int):
    """The cpu profile's fused model (online store off) and the merged request tensors of the users `ids`, `batch`
    one-user requests per batch, as Triton's batcher merges them (a last partial batch left out)."""
    from runtime.pipeline import Pipeline
    from runtime.steps import merge_requests
    from shoprec.config import load_config

    cfg = load_config().replace("serve", online_store="none").serve
    p = Pipeline(artifacts / "serving", cfg=cfg, profile="cpu")
    step = p.graph[-1]
    model = p.steps[step.name]
    one = [model.check({t.name: r.get(t.name) for t in step.inputs}) for r in (p.request([u], 10) for u in ids)]
    return model, [merge_requests(step, one[i : i + batch]) for i in range(0, len(one) - batch + 1, batch)]


def _worker(artifacts: Path, users: int, batch: int, seconds: float, barrier, results) -> None:
    from .serving_bench import warm_users

    model, batches = fused_batches(artifacts, [int(u) for u in warm_users(artifacts)[:users]], batch)
    for b in batches[:5]:  # warm: first calls build the sessions' and the routes' caches
        model.run_requests(b, [1] * batch)
    barrier.wait()
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - t0 < seconds:
        for b in batches:
            model.run_requests(b, [1] * batch)
            n += batch
    results.put((time.perf_counter() - t0, time.process_time() - c0, n))


def point(artifacts: Path, users: int, batch: int, processes: int, seconds: float) -> dict:
    """One (batch, processes) point: `processes` workers started together; ms per user."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(artifacts, users, batch, seconds, barrier, results))
               for _ in range(processes)]
    for w in workers:
        w.start()
    got = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode:
            raise SystemExit(f"graph_cost: a worker (batch {batch}, {processes} processes) exited with {w.exitcode}")
    cpu = statistics.fmean(c / n for _, c, n in got) * 1e3
    wall = statistics.fmean(s / n for s, _, n in got) * 1e3
    return {"cpu_ms_per_user": cpu, "wall_ms_per_user_per_process": wall,
            "machine_ms_per_user": wall / processes, "users_answered": sum(n for *_, n in got)}


def run(artifacts: Path, users: int, batches: list[int], processes: list[int], rounds: int, seconds: float) -> dict:
    points = [(b, p) for p in processes for b in batches]
    per: dict[tuple[int, int], list[dict]] = {pt: [] for pt in points}
    for r in range(rounds):
        for b, p in (points if r % 2 == 0 else points[::-1]):
            per[(b, p)].append(point(artifacts, users, b, p, seconds))
            print(f"graph_cost: round {r + 1}, batch {b}, {p} process(es): "
                  f"{per[(b, p)][-1]['cpu_ms_per_user']:.3f} CPU ms per user", flush=True)
    rows = []
    for (b, p), got in per.items():
        rows.append({"batch": b, "processes": p,
                     **{k: round(statistics.median(g[k] for g in got), 4)
                        for k in ("cpu_ms_per_user", "wall_ms_per_user_per_process", "machine_ms_per_user")},
                     "cpu_ms_per_user_by_round": [round(g["cpu_ms_per_user"], 4) for g in got]})
    return {"artifacts": str(artifacts), "users": users, "rounds": rounds, "seconds": seconds, "rows": rows}


def markdown(r: dict) -> list[str]:
    lines = [f"# The whole graph per user, as the cpu profile's stub runs it ({r['tag'] or 'default'})", "",
             f"Command: `{r['command']}`. Machine: {r['machine']}; commit {r['commit']}. {r['users']} warm users, "
             f"{r['seconds']} s per point, median of {r['rounds']} alternated rounds.", "",
             "| requests per batch | processes side by side | CPU ms per user | wall ms per user, per process | "
             "machine ms per user | CPU ms by round |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['batch']} | {row['processes']} | {row['cpu_ms_per_user']:.3f} | "
                     f"{row['wall_ms_per_user_per_process']:.3f} | {row['machine_ms_per_user']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in row['cpu_ms_per_user_by_round'])} |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts", help="built artifacts (default: ARTIFACTS)")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="", help="writes graph_cost_TAG.{json,md}")
    ap.add_argument("--users", type=int, default=480, help="warm users (default 480)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 6, 16], metavar="B",
                    help="requests per batch (default 1 6 16)")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], metavar="P",
                    help="processes side by side (default 1 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="per point and process (default 8)")
    args = ap.parse_args(argv)
    if min(args.batches) < 1 or min(args.processes) < 1 or args.users < max(args.batches):
        ap.error("--batches and --processes must be >= 1, and --users at least the largest batch")
    artifacts = args.artifacts.resolve()
    if not (artifacts / "serving").is_dir():
        ap.error(f"{artifacts}/serving: no exported bundle; run `shoprec export` first")
    r = run(artifacts, args.users, args.batches, args.processes, args.rounds, args.seconds)
    publish(args.results, "graph_cost", args.tag, r, markdown, argv)
    return r


if __name__ == "__main__":
    main()
