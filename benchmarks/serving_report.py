"""The serving benchmark's report: ratios, serving.{json,csv,md,png}."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np


# issue 15's targets: Triton gRPC throughput over FastAPI's at concurrency 16 (2x from a 100k-item catalog, where
# batching has real work to share; 1.3x below), and Triton's p50 at concurrency 1 over the in-process floor
LARGE_CATALOG = 100_000
LATENCY_TARGET = 1.5


def throughput_target(n_items: int) -> float:
    return 2.0 if n_items >= LARGE_CATALOG else 1.3


def summarise(report: dict) -> dict:
    """The target ratios. A level that failed (report["failed_levels"]) leaves the ratios that need it None, and
    its target counts as not met."""
    def at(target, c):
        return next((r for r in report["targets"].get(target, []) if r["concurrency"] == c), None)

    def ratio(a, b, key):
        return a[key] / b[key] if a and b else None

    c_hi = 16 if 16 in report["concurrency"] else report["concurrency"][-1]
    floor = report["in_process"]["p50_ms"]
    grpc_hi, http_hi, api_hi, grpc_1 = at("triton-grpc", c_hi), at("triton-http", c_hi), at("fastapi-http", c_hi), at("triton-grpc", 1)
    thr = ratio(grpc_hi, api_hi, "throughput_rps")
    lat = grpc_1["p50_ms"] / floor if grpc_1 else None
    paired = {}
    floors = report["in_process"].get("rounds_p50_ms", [])
    if len(floors) > 1 and grpc_1 and "rounds_p50_ms" in grpc_1:  # ratios within each round, then their median
        lat_r = [t / f for t, f in zip(grpc_1["rounds_p50_ms"], floors)]
        lat = float(np.median(lat_r))
        paired["rounds_triton_grpc_p50_c1_over_in_process_p50"] = [round(x, 2) for x in lat_r]
        if grpc_hi and api_hi:
            thr_r = [t / f for t, f in zip(grpc_hi["rounds_throughput_rps"], api_hi["rounds_throughput_rps"])]
            thr = float(np.median(thr_r))
            paired = {f"rounds_triton_grpc_over_fastapi_throughput_c{c_hi}": [round(x, 2) for x in thr_r], **paired}

    def rounded(x):
        return None if x is None else round(x, 2)

    return {
        **paired,
        f"triton_grpc_over_fastapi_throughput_c{c_hi}": rounded(thr),
        f"triton_http_over_fastapi_throughput_c{c_hi}": rounded(ratio(http_hi, api_hi, "throughput_rps")),
        "triton_grpc_p50_c1_over_in_process_p50": rounded(lat),
        "probe_p50_c1_over_in_process_p50": round(report["probe"]["c1"]["p50_ms"] / floor, 2),
        "probe_throughput_c16_over_fastapi": rounded(ratio(report["probe"]["c16"], api_hi, "throughput_rps")),
        f"fastapi_over_triton_grpc_cpu_per_request_c{c_hi}": _cpu_ratio(api_hi, grpc_hi) if api_hi and grpc_hi else None,
        "target_throughput": throughput_target(report["catalog_items"]),
        "target_throughput_met": thr is not None and thr >= throughput_target(report["catalog_items"]),
        "target_latency": LATENCY_TARGET,
        "target_latency_met": lat is not None and lat <= LATENCY_TARGET,
    }


def _cpu_ratio(a: dict, b: dict) -> float | None:
    """CPU per request of a over b (every process of each, the load generator included): on a machine whose cores
    are all busy, throughput follows it, and it moves less from run to run than req/s."""
    ca, cb = sum(a.get("cpu_ms_per_request", {}).values()), sum(b.get("cpu_ms_per_request", {}).values())
    return round(ca / cb, 2) if ca and cb else None


def write_outputs(report: dict, out_dir: Path, name: str = "serving") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "concurrency", "throughput_rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms"])
        for target, rows in report["targets"].items():
            for r in rows:
                w.writerow([target, r["concurrency"], r["throughput_rps"], r["p50_ms"], r["p90_ms"], r["p95_ms"], r["p99_ms"]])
        f_ = report["in_process"]
        w.writerow(["in-process", 1, f_["throughput_rps"], f_["p50_ms"], f_["p90_ms"], f_["p95_ms"], f_["p99_ms"]])
        for r in (report["probe"]["c1"], report["probe"]["c16"]):
            w.writerow([f"probe-{report['probe'].get('steps', 6)}-empty-python-steps", r["concurrency"], r["throughput_rps"], r["p50_ms"], r["p90_ms"],
                        r["p95_ms"], r["p99_ms"]])
    (out_dir / f"{name}.md").write_text(markdown(report))
    plot(report, out_dir / f"{name}.png")


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# Serving benchmark — {report['catalog_items']} items, {report['num_candidates']} candidates ranked per request", "",
             f"Command: `{report['command']}`. Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"no GPU. Load generator: perf_analyzer 2.51 on the same cores, {report['load']}. "
             "req/s = concurrency / mean latency (closed loop, Little's law).", "",
             "| target | concurrency | req/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for target, rows in report["targets"].items():
        for r in rows:
            lines.append(f"| {target} | {r['concurrency']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} |")
    f_ = report["in_process"]
    lines.append(f"| in-process floor | 1 | {f_['throughput_rps']:.0f} | {f_['p50_ms']:.2f} | {f_['p95_ms']:.2f} | {f_['p99_ms']:.2f} |")
    for level, r in (("1", report["probe"]["c1"]), ("16", report["probe"]["c16"])):
        lines.append(f"| probe: {report['probe'].get('steps', 6)} empty python steps | {level} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} |")
    for f in report.get("failed_levels", []):
        lines.append(f"| {f['target']} | {f['concurrency']} | round {f['round']}, attempt {f.get('attempt', 1)}: no result "
                     f"(perf_analyzer hung or failed) | | | |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for key, value in s.items():
        if not key.startswith("target_"):
            lines.append(f"| {key} | {value} | |")
    lines += ["", f"Targets ({report['catalog_items']} items): Triton gRPC throughput ≥ {s['target_throughput']}× FastAPI at "
              f"concurrency 16 → {'met' if s['target_throughput_met'] else 'NOT met'}; p50 at concurrency 1 ≤ "
              f"{s['target_latency']}× in-process → {'met' if s['target_latency_met'] else 'NOT met'}.", "",
              "Per-step time per request in the ensemble (triton-grpc; µs: queue / compute infer; avg batch):", "",
              "| concurrency | " + " | ".join(report["steps"]) + " |", "|---|" + "---|" * len(report["steps"])]
    for r in report["targets"]["triton-grpc"]:
        cells = [f"{r['steps'][n]['queue_us']:.0f} / {r['steps'][n]['compute_infer_us']:.0f}; {r['steps'][n]['avg_batch']}"
                 if n in r.get("steps", {}) else "" for n in report["steps"]]
        lines.append(f"| {r['concurrency']} | " + " | ".join(cells) + " |")
    c_hi = 16 if 16 in report["concurrency"] else report["concurrency"][-1]
    rows = {t: r for t in report["targets"] for r in report["targets"][t] if r["concurrency"] == c_hi}
    roles = sorted({k for r in rows.values() for k in r.get("cpu_ms_per_request", {})})
    lines += ["", f"CPU time per request at concurrency {c_hi} (ms, summed over both cores; where the cores go):", "",
              "| process | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(_ms(r.get("cpu_ms_per_request", {}).get(role)) for r in rows.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(r.get('cpu_ms_per_request', {}).values()):.3f}**" for r in rows.values()) + " |")
    ip = report["in_process"]
    sizes = sorted(int(k[5:-15]) for k in ip if k.startswith("batch") and k.endswith("_ms_per_request"))
    batched = " and ".join(f"{ip[f'batch{b}_ms_per_request']:.3f} at batch {b}" for b in sizes)
    # before 2026-12-07 the floor had batch 16 alone, one batch of the same users repeated
    lines += ["", f"In-process: {ip['p50_ms']:.3f} ms per request at batch 1, {batched} (ms per request; same steps, "
              "one process" + (", each batch its own users)" if len(sizes) > 1 else ")")
              + (f"; p50 by round {report['in_process']['rounds_p50_ms']}." if "rounds_p50_ms" in report["in_process"] else ".")]
    return "\n".join(lines) + "\n"


def _ms(value) -> str:
    return "—" if not value else f"{value:.3f}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for target, rows in report["targets"].items():
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["throughput_rps"] for r in rows], marker="o", label=target)
        line = b.plot(c, [r["p50_ms"] for r in rows], marker="o", label=f"{target} p50")[0]
        b.plot(c, [r["p99_ms"] for r in rows], ls="--", color=line.get_color(), alpha=0.6)
    b.axhline(report["in_process"]["p50_ms"], color="k", ls=":", label="in-process p50 (batch 1)")
    for ax, title, ylabel in ((a, "throughput", "requests/s"), (b, "latency (dashed: p99)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    b.set_yscale("log")
    fig.suptitle(f"recommender ensemble vs FastAPI vs in-process — {report['machine']['cores']}-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
