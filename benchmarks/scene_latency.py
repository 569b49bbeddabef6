"""What the strategy layer costs per request: the ensemble before it (a git ref) against this checkout's, with
every scene, side by side on one machine in one run.

    .venv/bin/python -m benchmarks.scene_latency                   # baseline: 3de7a07, the graph before scenes
    .venv/bin/python -m benchmarks.scene_latency --baseline-ref HEAD~3 --rounds 5

Both servers run `shoprec serve` (cpu profile, online store off, defaults otherwise) on the same trained
models of ARTIFACTS; the baseline from a temporary `git worktree` of the ref, over a bundle its own code
exports. Each round sends `--requests` sequential gRPC requests (concurrency 1, k = 10, warm users) to each
target in turn: the baseline (home, its only scene) and the checkout's home, item_detail and cart (context:
the user's latest item). p50 per target and round; the report gives the median over rounds and its ratio to
the baseline's. Writes benchmarks/results/scene_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT

from serving.launcher import LaunchError, free_ports, wait_until_ready

from .machine import describe
from .serving_bench import warm_users

BASELINE_REF = "3de7a07"  # main before the strategy layer (scenes, fusion weights, experiments)


def start(root: Path, artifacts: Path, log: Path) -> tuple[subprocess.Popen, str]:
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "app.cli", "--artifacts", str(artifacts), "serve", "--http-port", str(http), "--grpc-port",
           str(grpc), "--metrics-port", str(metrics), "--online-store", "none"]
    process = subprocess.Popen(cmd, cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(f"127.0.0.1:{http}", process, 180)
    except LaunchError as exc:
        raise RuntimeError(f"the server in {root} {exc}; see {log}") from None
    return process, f"127.0.0.1:{grpc}"


def stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def p50_ms(url: str, users: list[int], n: int, scene: str | None, context: dict[int, int]) -> float:
    from client import RecommenderClient

    times = []
    with RecommenderClient(url) as c:
        for i in range(n):
            u = users[i % len(users)]
            kwargs = {} if scene is None else {"scene": scene, "context_item_ids": [context[u]]}
            t = time.perf_counter()
            c.recommend(u, 10, **kwargs)
            times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--baseline-ref", default=BASELINE_REF)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts).resolve()
    warm = warm_users(artifacts)
    users = [int(u) for u in warm[:: max(1, len(warm) // 200)][:200]]
    from runtime.request_transform import UserStore
    from shoprec.manifest import verified_path

    store = UserStore.load(verified_path(artifacts / "serving", "user_store.npz"))
    with np.load(verified_path(artifacts / "serving", "item_table.npz"), allow_pickle=False) as z:
        item_ids = z["item_ids"]
    context = {u: int(item_ids[store.history(int(store.lookup(np.array([u]))[0]))[0][-1]]) for u in users}
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.baseline_ref], cwd=REPO_ROOT, check=True,
                       capture_output=True)
        # the baseline's own bundle: its code exports the same trained models (the ranker graph differs)
        base_art = Path(tmp) / "baseline_artifacts"
        base_art.mkdir()
        for part in ("data", "features", "models"):
            (base_art / part).symlink_to(artifacts / part)
        subprocess.run([sys.executable, "-m", "app.cli", "--artifacts", str(base_art), "--quiet", "export"], cwd=worktree,
                       env={**os.environ, "PYTHONPATH": str(worktree)}, check=True, capture_output=True)
        servers = []
        try:
            base, base_url = start(worktree, base_art, Path(tmp) / "baseline.log")
            servers.append(base)
            new, new_url = start(REPO_ROOT, artifacts, Path(tmp) / "new.log")
            servers.append(new)
            targets = {"baseline home": (base_url, None), "home": (new_url, "home"), "item_detail": (new_url, "item_detail"),
                       "cart": (new_url, "cart")}
            for url, scene in targets.values():  # warm-up
                p50_ms(url, users, 50, scene, context)
            for r in range(args.rounds):
                for name, (url, scene) in targets.items():
                    results.setdefault(name, []).append(p50_ms(url, users, args.requests, scene, context))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in results.items()), flush=True)
        finally:
            for s in servers:
                stop(s)
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO_ROOT, capture_output=True)
    base_p50 = float(np.median(results["baseline home"]))
    summary = {name: {"p50_ms_median": float(np.median(v)), "p50_ms_rounds": [round(x, 3) for x in v],
                      "ratio_to_baseline": float(np.median(v)) / base_p50} for name, v in results.items()}
    command = f"python -m benchmarks.scene_latency --baseline-ref {args.baseline_ref} --rounds {args.rounds} " \
              f"--requests {args.requests}"
    report = {"command": command, "machine": describe(), "baseline_ref": args.baseline_ref, "targets": summary}
    out = Path(args.out)
    (out / "scene_latency.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Strategy layer cost: p50 at concurrency 1, gRPC, k = 10\n", f"`{command}` on {describe()}; online store "
             f"off, {args.requests} sequential requests per target and round, targets alternated.\n",
             "| target | p50 ms (median of rounds) | ratio to baseline | rounds |", "|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['p50_ms_median']:.2f} | {s['ratio_to_baseline']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in s['p50_ms_rounds'])} |")
    (out / "scene_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
