"""Serving benchmark: the Triton ensemble vs FastAPI + uvicorn vs the in-process floor.

    .venv/bin/python -m benchmarks.serving_bench [--artifacts artifacts] [--concurrency 1 2 4 8 16 32]

One load generator, one run: perf_analyzer (the tritonclient 2.51.0 wheel's binary) drives
  - triton-grpc  the ensemble over gRPC (the documented remote protocol), with Triton's per-step
                 statistics (queue, compute, average batch) diffed around every measurement;
  - triton-http  the ensemble over HTTP/JSON;
  - fastapi-http the same steps (runtime/pipeline.py) behind FastAPI + uvicorn, one worker per
                 core, speaking the same KServe v2 JSON (benchmarks/fastapi_app.py); each worker runs
                 the pipeline inline in its event loop, one request at a time (`--fastapi-mode inline`,
                 its best configuration here: on the medium shop 1.09x the throughput at concurrency 16
                 of FastAPI's threadpool, the same at concurrency 1; `python -m benchmarks.fastapi_modes`);
with the same real user ids as input data, a fixed request count per concurrency level.
The in-process floor is the same pipeline called directly, one request at a time, same users, measured
in every round just before the Triton gRPC sweep. With `--rounds`, each ratio is taken within a round
(Triton against FastAPI, Triton's concurrency-1 p50 against that round's floor) and the median of the
rounds' ratios is reported: this machine drifts by more than the differences measured.
A probe ensemble of as many identity python models as the cpu profile has steps measures what the ensemble and the python
backend cost by themselves (no model work), to explain the gap between Triton and the floor.

The load generator runs on the same cores as the servers; every target pays that equally.
`--rounds N` keeps Triton and FastAPI up together and sweeps each N times, the order reversed each
round, because this machine's speed drifts by more than the differences measured: each figure is
then the median of the rounds, and every round's throughput is kept (`rounds_throughput_rps`).
Writes benchmarks/results/serving.{json,csv,md,png} (serving_TAG.* with --tag).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shoprec import contract as shoprec_contract
from shoprec.config import REPO_ROOT, load_config
from shoprec.manifest import verify_manifest

from .machine import cpu_model
from .serving_load import (
    FastAPIServer,
    LevelFailed,
    _cpu_per_request,
    _model_stats,
    _request_count,
    _step_times,
    probe_repository,
    process_cpu,
    run_perf_analyzer,
)
from .serving_report import summarise, write_outputs

TARGETS = ("triton-grpc", "triton-http", "fastapi-http")
COMMAND = "python -m benchmarks.serving_bench"


def warm_users(artifacts: Path) -> np.ndarray:
    """User ids with history in the serving user store (the personalised path), checked against the manifest."""
    verify_manifest(artifacts / "serving", ["user_store.npz"])
    with np.load(artifacts / "serving" / "user_store.npz", allow_pickle=False) as z:
        return z["user_id"][z["activity"] > 0]


def input_data(artifacts: Path, path: Path, n: int = 1000, k: int = 10, seed: int = 0) -> np.ndarray:
    """Real user ids from the serving user store (users with history: the personalised path)."""
    ids = warm_users(artifacts)
    users = np.random.default_rng(seed).choice(ids, size=n, replace=len(ids) < n)
    path.write_text(json.dumps({"data": [{"user_id": [int(u)], "k": [k]} for u in users]}))
    return users


BATCHES = (6, 16)  # the in-process floor's batch sizes, besides one request at a time


def in_process_floor(artifacts: Path, users: np.ndarray, k: int = 10) -> dict:
    """The same steps called directly, no server: one request at a time (batch 1), then in batches of BATCHES one-user
    requests over the same users (ms per request)."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline(artifacts / "serving", threads=1)
    for u in users[:100]:
        pipe.recommend([u], k)
    times = []
    pool = np.concatenate([users, users])[:2000]
    t_all = time.perf_counter()
    for u in pool:
        t0 = time.perf_counter()
        pipe.recommend([u], k)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    ms = np.array(times) * 1e3
    out = {"requests": len(times), "throughput_rps": round(len(times) / wall, 1),
           **{f"p{p}_ms": round(float(np.percentile(ms, p)), 3) for p in (50, 90, 95, 99)}}
    # batches as Triton's batcher forms them under load (about 5-6 requests per instance at concurrency 16 on two
    # cores, up to 16), each batch its own users, so the steps' data is not all in the caches from the batch before
    for size in BATCHES:
        many = np.resize(pool, max(size, len(pool) // size * size)).reshape(-1, size)
        t0 = time.perf_counter()
        for batch in many:
            pipe.recommend(batch, k)
        out[f"batch{size}_ms_per_request"] = round((time.perf_counter() - t0) / many.size * 1e3, 3)
    return out


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "os": platform.platform(),
            "python": platform.python_version()}


def sweep(results: dict, target: str, url: str, protocol: str, levels, data: Path, pgid: int,
          grpc_stats_url: str | None = None):
    rows = []
    for c in levels:
        before = _model_stats(grpc_stats_url) if grpc_stats_url else None
        cpu0, gen0 = process_cpu(pgid), resource.getrusage(resource.RUSAGE_CHILDREN)
        # perf_analyzer 2.51 in request-count mode now and then never finishes a level (its workers gone, the
        # server's connections closed, the main thread waiting for a count it cannot reach): a level gets five
        # times what the last one's rate says it needs (at least two minutes), and one more try
        expected = _request_count(c) / rows[-1]["throughput_rps"] if rows else 60.0
        timeout_s = min(600.0, max(120.0, 5 * expected))
        row = None
        for attempt in (1, 2):
            try:
                row = run_perf_analyzer(url, protocol, c, data, _request_count(c), timeout_s=timeout_s)
                break
            except LevelFailed as exc:
                results.setdefault("failed", []).append({"target": target, "concurrency": c, "attempt": attempt,
                                                         "error": str(exc)})
                print(f"{target:13s} c={c:<3d} attempt {attempt} FAILED: {exc}", flush=True)
        if row is None:  # the levels measured so far are kept; this target's higher ones are skipped
            break
        cpu1, gen1 = process_cpu(pgid), resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU ms per request: where the cores went (server processes by role, and the load generator)
        row["cpu_ms_per_request"] = _cpu_per_request(cpu0, cpu1, row["requests"])
        row["cpu_ms_per_request"]["load_generator"] = round(
            ((gen1.ru_utime + gen1.ru_stime) - (gen0.ru_utime + gen0.ru_stime)) / row["requests"] * 1e3, 3)
        if grpc_stats_url:
            row["steps"] = _step_times(before, _model_stats(grpc_stats_url))
        rows.append(row)
        print(f"{target:13s} c={c:<3d} {row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
              f"p99 {row['p99_ms']:7.2f} ms", flush=True)
    results[target] = rows


def median_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per concurrency level, the median of the rounds' figures (each field on its own), with every round's
    throughput kept beside it."""
    out = []
    for rows in zip(*rounds):
        row = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, float | int) and key not in ("concurrency", "requests"):
                row[key] = round(float(np.median([r[key] for r in rows])), 3)
            elif isinstance(value, dict):
                row[key] = {k: (round(float(np.median([r[key].get(k, 0.0) for r in rows])), 3) if isinstance(v, float | int)
                                else {f: round(float(np.median([r[key][k][f] for r in rows if k in r[key]])), 3)
                                      if isinstance(x, float | int) else x for f, x in v.items()} if isinstance(v, dict) else v)
                            for k, v in value.items()}
        row["rounds_throughput_rps"] = [r["throughput_rps"] for r in rows]
        row["rounds_p50_ms"] = [r["p50_ms"] for r in rows]
        out.append(row)
    return out


def main(argv=None) -> dict:
    from serving.launcher import TritonServer, free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--fastapi-workers", type=int, default=os.cpu_count(), help="uvicorn workers (default: one per core)")
    p.add_argument("--fastapi-mode", choices=["inline", "thread"], default="inline",
                   help="how a FastAPI worker runs the pipeline: inline in its event loop, one request at a time (default: "
                        "its best here), or in FastAPI's threadpool, as a plain sync endpoint would")
    p.add_argument("--tag", help="write serving_TAG.* (e.g. medium) instead of serving.*")
    p.add_argument("--rounds", type=int, default=1,
                   help="sweeps per system, the order reversed each round; each figure is the median of the rounds")
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts)
    cfg = load_config()
    verify_manifest(artifacts / "serving", ["contract.json"])
    n_items = json.loads((artifacts / "serving" / "contract.json").read_text())["n_items"]
    given = sys.argv[1:] if argv is None else argv
    report = {"command": COMMAND + (" " + " ".join(given) if given else ""), "machine": machine(),
              "catalog_items": n_items, "num_candidates": shoprec_contract.num_candidates(cfg.serve.num_candidates, n_items),
              "concurrency": args.concurrency, "fastapi_workers": args.fastapi_workers,
              "fastapi_mode": args.fastapi_mode,
              "load": "gRPC for triton-grpc, HTTP/JSON (KServe v2) for the others; k=10; "
                      "request count per level max(1500, 400*c); 1000 real user ids", "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.json"
        users = input_data(artifacts, data)
        floors: list[dict] = []

        def floor() -> None:
            floors.append(in_process_floor(artifacts, users))
            print(f"in-process    c=1   {floors[-1]['throughput_rps']:8.1f} req/s  p50 {floors[-1]['p50_ms']:7.2f} ms",
                  flush=True)
        # the response cache off: the load cycles the same users, so the cache would answer most requests after the
        # first round, and FastAPI and the in-process floor have none (benchmarks/response_cache.py measures it)
        serve = dataclasses.replace(cfg.serve, response_cache_mb=0)
        rounds: dict[str, list[list[dict]]] = {"triton-grpc": [], "triton-http": [], "fastapi-http": []}
        failed: list[dict] = []
        with TritonServer.from_config(serve, artifacts, ephemeral_ports=True, log_path=Path(tmp) / "triton.log") as server, \
                FastAPIServer(artifacts, args.fastapi_workers, args.fastapi_mode) as api:
            pgid = server.process.pid  # started in its own session: the stubs share its process group
            plan = [("triton-grpc", server.grpc_url, "grpc", pgid, server.grpc_url), ("triton-http", server.http_url, "http", pgid, None),
                    ("fastapi-http", api.url, "http", api.proc.pid, None)]
            for r in range(args.rounds):  # both servers up; the order reversed each round (the machine's speed drifts)
                if args.rounds > 1:
                    print(f"round {r + 1}/{args.rounds}", flush=True)
                for target, url, protocol, group, stats_url in (plan if r % 2 == 0 else plan[::-1]):
                    if target == "triton-grpc":  # the floor in every round, just before the sweep it is compared with
                        floor()
                    one: dict = {}
                    sweep(one, target, url, protocol, args.concurrency, data, group, stats_url)
                    rounds[target].append(one[target])
                    failed += [{**f, "round": r + 1} for f in one.get("failed", [])]
        report["targets"] = {t: median_rows(rs) for t, rs in rounds.items()}  # the levels every round measured
        report["failed_levels"] = failed
        report["in_process"] = {k: float(np.median([f[k] for f in floors])) for k in floors[0]}
        report["in_process"]["rounds_p50_ms"] = [f["p50_ms"] for f in floors]
        report["rounds"] = args.rounds
        hops = len(shoprec_contract.profile_steps("cpu"))
        probe_root = probe_repository(Path(tmp) / "probe", steps=hops)
        with TritonServer(probe_root, artifacts, free_port(), free_port(), free_port(), log_path=Path(tmp) / "probe.log") as probe:
            report["probe"] = {"what": f"ensemble of {hops} identity python-backend models (no model work), gRPC", "steps": hops,
                               "c1": run_perf_analyzer(probe.grpc_url, "grpc", 1, data, _request_count(1), model="probe"),
                               "c16": run_perf_analyzer(probe.grpc_url, "grpc", 16, data, _request_count(16), model="probe")}
            print(f"probe         c=1   p50 {report['probe']['c1']['p50_ms']:.2f} ms; "
                  f"c=16 {report['probe']['c16']['throughput_rps']:.0f} req/s", flush=True)
    report["steps"] = [s.name for s in shoprec_contract.profile_steps("cpu")]
    report["summary"] = summarise(report)
    write_outputs(report, Path(args.out), f"serving_{args.tag}" if args.tag else "serving")
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main()
