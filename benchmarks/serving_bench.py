"""Serving benchmark: the Triton ensemble vs FastAPI + uvicorn vs the in-process floor.

    .venv/bin/python -m benchmarks.serving_bench [--artifacts artifacts] [--concurrency 1 2 4 8 16 32]

One load generator, one run: perf_analyzer (the tritonclient 2.51.0 wheel's binary) drives
  - triton-grpc  the ensemble over gRPC (the documented remote protocol), with Triton's per-step
                 statistics (queue, compute, average batch) diffed around every measurement;
  - triton-http  the ensemble over HTTP/JSON;
  - fastapi-http the same steps (runtime/pipeline.py) behind FastAPI + uvicorn, one worker per
                 core, speaking the same KServe v2 JSON (benchmarks/fastapi_app.py);
with the same real user ids as input data, a fixed request count per concurrency level.
The in-process floor is the same pipeline called directly, one request at a time, same users.
A probe ensemble of six identity python models measures what the ensemble and the python
backend cost by themselves (no model work), to explain the gap between Triton and the floor.

The load generator runs on the same cores as the servers; every target pays that equally.
Writes benchmarks/results/serving.{json,csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from shoprec import contract as shoprec_contract
from shoprec.config import REPO_ROOT, load_config
from shoprec.manifest import verify_manifest

from .machine import cpu_model

TARGETS = ("triton-grpc", "triton-http", "fastapi-http")
COMMAND = "python -m benchmarks.serving_bench"


def _perf_analyzer() -> tuple[str, dict]:
    exe = Path(sys.executable).parent / "perf_analyzer"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: `make setup` installs tritonclient[all]==2.51.0, whose wheel ships it")
    import nvidia.cuda_runtime

    env = dict(os.environ)
    cudart = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"  # perf_analyzer links libcudart even on CPU
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    return str(exe), env


def run_perf_analyzer(url: str, protocol: str, concurrency: int, input_data: Path, requests: int,
                      model: str = "recommender") -> dict:
    exe, env = _perf_analyzer()
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        cmd = [exe, "-m", model, "-i", protocol, "-u", url, "--input-data", str(input_data),
               "--concurrency-range", str(concurrency), "--request-count", str(requests), "-f", out.name, "--verbose-csv"]
        if protocol == "http":
            cmd += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        row = next(csv.DictReader(io.StringIO(Path(out.name).read_text())))
    # A closed loop keeps `concurrency` requests in flight, so throughput = concurrency / mean
    # latency (Little's law). perf_analyzer's own figure divides by whole seconds in request-count
    # mode (1500 requests in 9.1 s read 150.0/s); it is kept for reference.
    mean_us = int(row["Avg latency"])
    return {"concurrency": concurrency, "requests": requests,
            "throughput_rps": round(concurrency / (mean_us / 1e6), 1),
            "perf_analyzer_rps": round(float(row["Inferences/Second"]), 1), "mean_ms": round(mean_us / 1e3, 3),
            **{f"p{p}_ms": round(int(row[f"p{p} latency"]) / 1e3, 3) for p in (50, 90, 95, 99)}}


def _request_count(concurrency: int) -> int:
    return max(1500, 400 * concurrency)


def input_data(artifacts: Path, path: Path, n: int = 1000, k: int = 10, seed: int = 0) -> np.ndarray:
    """Real user ids from the serving user store (users with history: the personalised path)."""
    verify_manifest(artifacts / "serving", ["user_store.npz"])
    with np.load(artifacts / "serving" / "user_store.npz", allow_pickle=False) as z:
        ids = z["user_id"][z["activity"] > 0]
    users = np.random.default_rng(seed).choice(ids, size=n, replace=len(ids) < n)
    path.write_text(json.dumps({"data": [{"user_id": [int(u)], "k": [k]} for u in users]}))
    return users


def in_process_floor(artifacts: Path, users: np.ndarray, k: int = 10) -> dict:
    """The same steps called directly, one request at a time (batch 1), no server."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline(artifacts / "serving", threads=1)
    for u in users[:100]:
        pipe.recommend([u], k)
    times = []
    t_all = time.perf_counter()
    for u in np.concatenate([users, users])[:2000]:
        t0 = time.perf_counter()
        pipe.recommend([u], k)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    ms = np.array(times) * 1e3
    batch = users[:16]
    t0 = time.perf_counter()
    for _ in range(50):
        pipe.recommend(batch, k)
    batch16 = (time.perf_counter() - t0) / 50
    return {"requests": len(times), "throughput_rps": round(len(times) / wall, 1),
            **{f"p{p}_ms": round(float(np.percentile(ms, p)), 3) for p in (50, 90, 95, 99)},
            "batch16_ms_per_request": round(batch16 / 16 * 1e3, 3)}


def _model_stats(grpc_url: str) -> dict:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(grpc_url).get_inference_statistics(as_json=True)
    out = {}
    for m in stats["model_stats"]:
        s = m["inference_stats"]
        out[m["name"]] = {"requests": int(s["success"].get("count", 0)), "executions": int(m.get("execution_count", 0)),
                          **{key: int(s[key].get("ns", 0)) for key in ("queue", "compute_input", "compute_infer", "compute_output")}}
    return out


def _step_times(before: dict, after: dict) -> dict:
    """Per model: average queue and compute per request (us) and average batch, over one measurement."""
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        n = a["requests"] - b.get("requests", 0)
        e = a["executions"] - b.get("executions", 0)
        if n <= 0:
            continue
        row = {f"{key}_us": round((a[key] - b.get(key, 0)) / n / 1e3, 1)
               for key in ("queue", "compute_input", "compute_infer", "compute_output")}
        row["avg_batch"] = round(n / e, 2) if e else None
        out[name] = row
    return out


def process_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process in a process group, by role: the Triton
    core, each python-backend stub by its model, uvicorn workers."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:
                continue
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        model = next((Path(c.decode()).parent.parent.name for c in cmd if c.endswith(b"/model.py")), None)
        if model:
            role = f"stub:{model}"
        elif any(b"uvicorn" in c or b"multiprocessing" in c for c in cmd):
            role = "uvicorn (FastAPI workers)"
        else:
            role = Path(cmd[0].decode()).name or "?"
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    return {k: round((after[k] - before.get(k, 0.0)) / requests * 1e3, 3) for k in sorted(after)
            if after[k] - before.get(k, 0.0) > 0}


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server at {url} not ready after {timeout_s}s")


class FastAPIServer:
    def __init__(self, artifacts: Path, workers: int):
        from serving.launcher import free_port

        self.port, self.artifacts, self.workers = free_port(), artifacts, workers
        self.url = f"127.0.0.1:{self.port}"

    def __enter__(self):
        env = dict(os.environ, SHOPREC_ARTIFACTS=str(self.artifacts), OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.fastapi_app:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers), "--log-level", "warning", "--no-access-log"],
            env=env, cwd=REPO_ROOT, start_new_session=True)
        _wait_ready(self.url, self.proc)
        return self

    def __exit__(self, *exc):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def probe_repository(root: Path, steps: int = 6) -> Path:
    """An ensemble of `steps` identity python models with the recommender's request inputs."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    names = [f"identity_{i}" for i in range(steps)]
    code = ("import triton_python_backend_utils as pb_utils\n\n\nclass TritonPythonModel:\n"
            "    def execute(self, requests):\n"
            "        return [pb_utils.InferenceResponse([pb_utils.Tensor('y', pb_utils.get_input_tensor_by_name(r, 'x')"
            ".as_numpy())]) for r in requests]\n")
    for name in names:
        cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=64)
        cfg.input.add(name="x", data_type=mc.TYPE_INT64, dims=[1])
        if name == names[0]:
            cfg.input.add(name="k", data_type=mc.TYPE_INT32, dims=[1])  # read by nothing, as ensembles require
        cfg.output.add(name="y", data_type=mc.TYPE_INT64, dims=[1])
        cfg.dynamic_batching.max_queue_delay_microseconds = 0
        cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        (root / name / "1" / "model.py").write_text(code)
    ens = mc.ModelConfig(name="probe", platform="ensemble", max_batch_size=64)
    ens.input.add(name="user_id", data_type=mc.TYPE_INT64, dims=[1])
    ens.input.add(name="k", data_type=mc.TYPE_INT32, dims=[1])
    ens.output.add(name="item_ids", data_type=mc.TYPE_INT64, dims=[1])
    tensors = ["user_id", *[f"t{i}" for i in range(1, steps)], "item_ids"]
    for i, name in enumerate(names):
        s = ens.ensemble_scheduling.step.add(model_name=name, model_version=-1)
        s.input_map["x"] = tensors[i]
        if i == 0:
            s.input_map["k"] = "k"
        s.output_map["y"] = tensors[i + 1]
    (root / "probe" / "1").mkdir(parents=True)
    (root / "probe" / "config.pbtxt").write_text(text_format.MessageToString(ens))
    return root


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None, "os": platform.platform(),
            "python": platform.python_version()}


def sweep(results: dict, target: str, url: str, protocol: str, levels, data: Path, pgid: int,
          grpc_stats_url: str | None = None):
    rows = []
    for c in levels:
        before = _model_stats(grpc_stats_url) if grpc_stats_url else None
        cpu0, gen0 = process_cpu(pgid), resource.getrusage(resource.RUSAGE_CHILDREN)
        row = run_perf_analyzer(url, protocol, c, data, _request_count(c))
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


def summarise(report: dict) -> dict:
    def at(target, c):
        return next(r for r in report["targets"][target] if r["concurrency"] == c)

    c_hi = 16 if any(r["concurrency"] == 16 for r in report["targets"]["triton-grpc"]) else report["concurrency"][-1]
    floor = report["in_process"]["p50_ms"]
    thr = at("triton-grpc", c_hi)["throughput_rps"] / at("fastapi-http", c_hi)["throughput_rps"]
    lat = at("triton-grpc", 1)["p50_ms"] / floor
    return {
        f"triton_grpc_over_fastapi_throughput_c{c_hi}": round(thr, 2),
        f"triton_http_over_fastapi_throughput_c{c_hi}": round(
            at("triton-http", c_hi)["throughput_rps"] / at("fastapi-http", c_hi)["throughput_rps"], 2),
        "triton_grpc_p50_c1_over_in_process_p50": round(lat, 2),
        "probe_p50_c1_over_in_process_p50": round(report["probe"]["c1"]["p50_ms"] / floor, 2),
        "probe_throughput_c16_over_fastapi": round(
            report["probe"]["c16"]["throughput_rps"] / at("fastapi-http", c_hi)["throughput_rps"], 2),
        "target_throughput_3x_met": thr >= 3.0,
        "target_latency_1.5x_met": lat <= 1.5,
    }


def write_outputs(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(report, indent=1) + "\n")
    with open(out_dir / "serving.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["target", "concurrency", "throughput_rps", "p50_ms", "p90_ms", "p95_ms", "p99_ms"])
        for target, rows in report["targets"].items():
            for r in rows:
                w.writerow([target, r["concurrency"], r["throughput_rps"], r["p50_ms"], r["p90_ms"], r["p95_ms"], r["p99_ms"]])
        f_ = report["in_process"]
        w.writerow(["in-process", 1, f_["throughput_rps"], f_["p50_ms"], f_["p90_ms"], f_["p95_ms"], f_["p99_ms"]])
        for r in (report["probe"]["c1"], report["probe"]["c16"]):
            w.writerow(["probe-6-empty-python-steps", r["concurrency"], r["throughput_rps"], r["p50_ms"], r["p90_ms"],
                        r["p95_ms"], r["p99_ms"]])
    (out_dir / "serving.md").write_text(markdown(report))
    plot(report, out_dir / "serving.png")


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
        lines.append(f"| probe: 6 empty python steps | {level} | {r['throughput_rps']:.0f} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for key, value in s.items():
        if not key.startswith("target_"):
            lines.append(f"| {key} | {value} | |")
    lines += ["", f"Targets: throughput ≥ 3× FastAPI → {'met' if s['target_throughput_3x_met'] else 'NOT met'}; "
              f"p50 at concurrency 1 ≤ 1.5× in-process → {'met' if s['target_latency_1.5x_met'] else 'NOT met'}.", "",
              "Per-step time per request in the ensemble (triton-grpc; µs: queue / compute infer; avg batch):", "",
              "| concurrency | " + " | ".join(report["steps"]) + " |", "|---|" + "---|" * len(report["steps"])]
    for r in report["targets"]["triton-grpc"]:
        cells = [f"{r['steps'][n]['queue_us']:.0f} / {r['steps'][n]['compute_infer_us']:.0f}; {r['steps'][n]['avg_batch']}"
                 if n in r.get("steps", {}) else "" for n in report["steps"]]
        lines.append(f"| {r['concurrency']} | " + " | ".join(cells) + " |")
    c_hi = 16 if 16 in report["concurrency"] else report["concurrency"][-1]
    rows = {t: next(r for r in report["targets"][t] if r["concurrency"] == c_hi) for t in report["targets"]}
    roles = sorted({k for r in rows.values() for k in r.get("cpu_ms_per_request", {})})
    lines += ["", f"CPU time per request at concurrency {c_hi} (ms, summed over both cores; where the cores go):", "",
              "| process | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(_ms(r.get("cpu_ms_per_request", {}).get(role)) for r in rows.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(r.get('cpu_ms_per_request', {}).values()):.3f}**" for r in rows.values()) + " |")
    lines += ["", f"In-process: {report['in_process']['p50_ms']:.3f} ms per request at batch 1, "
              f"{report['in_process']['batch16_ms_per_request']:.3f} ms per request at batch 16 (same steps, one process)."]
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


def main(argv=None) -> dict:
    from serving.launcher import TritonServer, free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--fastapi-workers", type=int, default=os.cpu_count(), help="uvicorn workers (default: one per core)")
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts)
    cfg = load_config()
    verify_manifest(artifacts / "serving", ["contract.json"])
    contract = json.loads((artifacts / "serving" / "contract.json").read_text())
    report = {"command": COMMAND + (" " + " ".join(argv) if argv else ""), "machine": machine(),
              "catalog_items": contract["n_items"], "num_candidates": contract["num_candidates"],
              "concurrency": args.concurrency, "fastapi_workers": args.fastapi_workers,
              "load": "gRPC for triton-grpc, HTTP/JSON (KServe v2) for the others; k=10; "
                      "request count per level max(1500, 400*c); 1000 real user ids", "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.json"
        users = input_data(artifacts, data)
        print("in-process floor ...", flush=True)
        report["in_process"] = in_process_floor(artifacts, users)
        print(f"in-process    c=1   {report['in_process']['throughput_rps']:8.1f} req/s  "
              f"p50 {report['in_process']['p50_ms']:7.2f} ms", flush=True)
        with TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True, log_path=Path(tmp) / "triton.log") as server:
            pgid = server.process.pid  # started in its own session: the stubs share its process group
            sweep(report["targets"], "triton-grpc", server.grpc_url, "grpc", args.concurrency, data, pgid, server.grpc_url)
            sweep(report["targets"], "triton-http", server.http_url, "http", args.concurrency, data, pgid)
        with FastAPIServer(artifacts, args.fastapi_workers) as api:
            sweep(report["targets"], "fastapi-http", api.url, "http", args.concurrency, data, api.proc.pid)
        probe_root = probe_repository(Path(tmp) / "probe")
        with TritonServer(probe_root, artifacts, free_port(), free_port(), free_port(), log_path=Path(tmp) / "probe.log") as probe:
            report["probe"] = {"what": "ensemble of 6 identity python-backend models (no model work), gRPC",
                               "c1": run_perf_analyzer(probe.grpc_url, "grpc", 1, data, _request_count(1), model="probe"),
                               "c16": run_perf_analyzer(probe.grpc_url, "grpc", 16, data, _request_count(16), model="probe")}
            print(f"probe         c=1   p50 {report['probe']['c1']['p50_ms']:.2f} ms; "
                  f"c=16 {report['probe']['c16']['throughput_rps']:.0f} req/s", flush=True)
    report["steps"] = [s.name for s in shoprec_contract.STEPS]
    report["summary"] = summarise(report)
    write_outputs(report, Path(args.out))
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main()
