"""The serving benchmark's load tools: perf_analyzer runs, Triton's per-step statistics, CPU time by
process role, the FastAPI comparison server, and the probe ensemble of identity python models."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from serving.launcher import process_group, wait_until_ready
from shoprec.config import REPO_ROOT


def _perf_analyzer() -> tuple[str, dict]:
    exe = Path(sys.executable).parent / "perf_analyzer"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: `make setup` installs tritonclient[all]==2.51.0, whose wheel ships it")
    import nvidia.cuda_runtime

    env = dict(os.environ)
    cudart = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"  # perf_analyzer links libcudart even on CPU
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    return str(exe), env


class LevelFailed(RuntimeError):
    """One perf_analyzer run gave no figures (it failed or hung): the message says which, and its last output."""


def run_perf_analyzer(url: str, protocol: str, concurrency: int, input_data: Path, requests: int,
                      model: str = "recommender", timeout_s: float = 600.0) -> dict:
    exe, env = _perf_analyzer()
    with tempfile.NamedTemporaryFile(suffix=".csv") as out:
        cmd = [exe, "-m", model, "-i", protocol, "-u", url, "--input-data", str(input_data),
               "--concurrency-range", str(concurrency), "--request-count", str(requests), "-f", out.name, "--verbose-csv"]
        if protocol == "http":
            cmd += ["--input-tensor-format", "json", "--output-tensor-format", "json"]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or b"")[-300:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise LevelFailed(f"perf_analyzer ({protocol}, concurrency {concurrency}, {requests} requests) gave no result "
                              f"in {timeout_s:.0f} s; its last output: {tail.strip()[-200:]!r}") from None
        if done.returncode != 0:
            raise LevelFailed(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
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


def stub_model(cmd: list[bytes]) -> str | None:
    """The model a python-backend stub process serves (from its command line), None for any other process."""
    return next((Path(c.decode()).parent.parent.name for c in cmd if c.endswith(b"/model.py")), None)


def stub_pids(pgid: int) -> dict[str, int]:
    """The python-backend stubs of a process group by model: `model`, then `model#2`, ... for a model's further
    instances (in pid order)."""
    out: dict[str, int] = {}
    for pid, _, cmd in sorted(process_group(pgid)):
        model = stub_model(cmd)
        if model:
            n = sum(1 for m in out if m == model or m.startswith(model + "#"))
            out[model if n == 0 else f"{model}#{n + 1}"] = pid
    return out


def process_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of every process in a process group, by role: the Triton
    core, each python-backend stub by its model, uvicorn workers."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for _, fields, cmd in process_group(pgid):
        model = stub_model(cmd)
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


class FastAPIServer:
    def __init__(self, artifacts: Path, workers: int, mode: str = "inline"):
        from serving.launcher import free_port

        self.port, self.artifacts, self.workers, self.mode = free_port(), artifacts, workers, mode
        self.url = f"127.0.0.1:{self.port}"

    def __enter__(self):
        env = dict(os.environ, SHOPREC_ARTIFACTS=str(self.artifacts), OMP_NUM_THREADS="1", SHOPREC_FASTAPI_MODE=self.mode)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.fastapi_app:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers), "--log-level", "warning", "--no-access-log"],
            env=env, cwd=REPO_ROOT, start_new_session=True)
        wait_until_ready(self.url, self.proc, 60)
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
