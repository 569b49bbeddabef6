"""Model updates under load: a live server switched to a new bundle version and back, no request lost.

    .venv/bin/python -m benchmarks.model_swap             # on ARTIFACTS (`make demo` built them)

A real tritonserver (CPU profile, online store off, step doctor on) serves the newest bundle
version A. The benchmark exports version B from the same checkpoints (a new numbered bundle,
as `shoprec export` writes it), then, under gRPC load (`--concurrency` clients without pause,
warm users in turn), switches to B (`shoprec deploy`'s code path, serving/versions.py) and back
(`rollback`), `--swaps` times. Every request is recorded: when it was sent, its latency, whether it
was answered, and the bundle version that answered (response output `served_version`). Reports
failed requests, latency percentiles inside the switch windows (start of a switch until it
returned) and outside them, each switch's phases, and a plot of latency over time. Writes
benchmarks/results/model_swap.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import describe
from .serving_bench import warm_users


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def run(artifacts: Path, concurrency: int = 16, swaps: int = 2, settle_s: float = 10.0, cfg=None) -> dict:
    """Serve the newest version A, export B, switch A -> B -> A `swaps` times under load."""
    from tritonclient.utils import InferenceServerException

    from client import AsyncRecommenderClient
    from serving.launcher import TritonServer
    from training.export import export_bundle

    cfg = cfg or load_config()
    users = [int(u) for u in warm_users(artifacts)[:200]]
    records: list[tuple[float, float, bool, int]] = []  # (sent, latency ms, answered, version or -1)
    errors: list[str] = []
    switches: list[dict] = []
    with TritonServer.from_config(cfg.replace("serve", online_store="none").serve, artifacts, ephemeral_ports=True) as server:
        a = server.served_version()
        b = export_bundle(artifacts / "features", artifacts / "models", artifacts / "serving", cfg)["version"]
        t0 = time.time()
        done = threading.Event()

        def driver():  # the switches, from another thread while the load runs
            try:
                time.sleep(settle_s)
                for _ in range(swaps):
                    for target, rollback in ((b, False), (a, True)):
                        start = time.time()
                        r = server.deploy(target if not rollback else None, rollback=rollback)
                        switches.append({**r, "kind": "rollback" if rollback else "deploy",
                                         "start_s": round(start - t0, 3), "end_s": round(time.time() - t0, 3)})
                        time.sleep(settle_s)
            finally:
                done.set()

        async def worker(c, offset):
            i = offset
            while not done.is_set():
                sent = time.time()
                try:
                    rec = await c.recommend(users[i % len(users)], k=10)
                    records.append((sent - t0, (time.time() - sent) * 1e3, True, rec.version))
                except InferenceServerException as exc:
                    records.append((sent - t0, (time.time() - sent) * 1e3, False, -1))
                    errors.append(str(exc)[:300])
                i += concurrency

        async def main():
            async with AsyncRecommenderClient(server.grpc_url) as c:
                await asyncio.gather(*(worker(c, j) for j in range(concurrency)))

        thread = threading.Thread(target=driver, daemon=True)
        thread.start()
        asyncio.run(main())
        thread.join()
        served_at_end = server.served_version()
        incidents = len(server.doctor.incidents) if server.doctor else None
    windows = [(s["start_s"], s["end_s"]) for s in switches]
    inside = [lat for t, lat, ok, _ in records if ok and any(lo <= t <= hi for lo, hi in windows)]
    outside = [lat for t, lat, ok, _ in records if ok and not any(lo <= t <= hi for lo, hi in windows)]
    versions: dict[str, int] = {}
    for _, _, ok, v in records:
        if ok:
            versions[str(v)] = versions.get(str(v), 0) + 1
    return {"concurrency": concurrency, "swaps": swaps, "settle_s": settle_s, "version_a": a, "version_b": b,
            "served_at_end": served_at_end, "requests": len(records), "answered": sum(r[2] for r in records),
            "failed": sum(not r[2] for r in records), "errors": errors[:5], "answered_by_version": versions,
            "latency_ms": {"outside_switches": {"n": len(outside), "p50": _pct(outside, 50), "p99": _pct(outside, 99)},
                           "during_switches": {"n": len(inside), "p50": _pct(inside, 50), "p99": _pct(inside, 99),
                                               "max": _pct(inside, 100)}},
            "switches": switches, "doctor_incidents": incidents, "drain_s": cfg.serve.swap_drain_s,
            "timeline": [(round(t, 3), round(lat, 2), ok, v) for t, lat, ok, v in records]}


def markdown(r: dict) -> str:
    lat = r["latency_ms"]
    lines = ["# Model updates under load: deploy and rollback on a live server", "",
             (f"Command: `{r['command']}`. Machine: {r['machine']}. {r['concurrency']} gRPC clients without pause; bundle "
              f"version {r['version_a']} served, version {r['version_b']} exported beside it, then {r['swaps']} x (deploy "
              f"{r['version_b']}, rollback to {r['version_a']}), {r['settle_s']:g} s apart."), "",
             f"**{r['answered']} answered, {r['failed']} failed** of {r['requests']} requests. Answered by version: "
             + ", ".join(f"{v}: {n}" for v, n in sorted(r["answered_by_version"].items())) + f". Served at the end: "
             f"version {r['served_at_end']}. Step doctor incidents: {r['doctor_incidents']}.", "",
             "| requests sent | n | p50 ms | p99 ms |", "|---|---|---|---|",
             f"| outside switches | {lat['outside_switches']['n']} | {lat['outside_switches']['p50']} | {lat['outside_switches']['p99']} |",
             f"| during switches | {lat['during_switches']['n']} | {lat['during_switches']['p50']} | {lat['during_switches']['p99']} |",
             "", "| switch | from → to | new version loaded (s) | ensemble switched (s) | old unloaded (s) | total (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['kind']} | {s['from']} → {s['to']} | {s['load_new_s']} | {s['pin_s']} | {s['unload_old_s']} | "
              f"{s['seconds']} |" for s in r["switches"]]
    lines += ["", (f"A switch: the new version's step instances start beside the old ones (both loaded), the ensemble is "
              f"pinned to the new version, then after {r['drain_s']:g} s the old instances unload (serving/versions.py). "
              "The latency of requests sent during a switch rises because the new instances start on the same 2 cores."),
              "", "![latency over time](model_swap.png)", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    tl = r["timeline"]
    for version in sorted({v for _, _, ok, v in tl if ok}):
        pts = [(t, lat) for t, lat, ok, v in tl if ok and v == version]
        ax.scatter(*zip(*pts), s=2, label=f"answered by version {version}")
    fails = [(t, lat) for t, lat, ok, _ in tl if not ok]
    if fails:
        ax.scatter(*zip(*fails), s=12, c="red", marker="x", label="failed")
    for s in r["switches"]:
        ax.axvspan(s["start_s"], s["end_s"], color="grey", alpha=0.2)
    ax.set_xlabel("seconds (grey: a switch in progress)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{r['concurrency']} gRPC clients; deploy / rollback: {r['failed']} failed of {r['requests']}")
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--swaps", type=int, default=2, help="deploy + rollback pairs (default 2)")
    ap.add_argument("--settle-s", type=float, default=10.0, help="seconds of load before and between switches")
    args = ap.parse_args(argv)
    r = run(args.artifacts.resolve(), args.concurrency, args.swaps, args.settle_s)
    r.update(machine=describe(), command="python -m benchmarks.model_swap"
             + ("" if (args.concurrency, args.swaps, args.settle_s) == (16, 2, 10.0)
                else f" --concurrency {args.concurrency} --swaps {args.swaps} --settle-s {args.settle_s:g}"))
    args.results.mkdir(parents=True, exist_ok=True)
    plot(r, args.results / "model_swap.png")
    (args.results / "model_swap.json").write_text(json.dumps({k: v for k, v in r.items() if k != "timeline"}, indent=1) + "\n")
    (args.results / "model_swap.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
