"""Where the python-backend stubs spend their time under load: py-spy samples of each stub of a cpu profile.

    python -m benchmarks.stub_profile                                   # after `make demo`; ~1 min
    python -m benchmarks.stub_profile --artifacts MEDIUM --tag medium
    python -m benchmarks.stub_profile --profile cpu-stages --concurrency 1   # the three-model profile, unloaded

A server as `shoprec serve` runs it (response cache and step doctor off), perf_analyzer over gRPC at
`--concurrency` with 1,000 real user ids, and `py-spy record` (in the venv) on every stub for `--seconds`
at 200 samples/s, all at once. Each sample of a stub's main thread is put in one bucket:
  - step code: under `Fused.run_requests` (the parts batched under `Fused._run`, then top-k over the whole
    batch), i.e. the graph's step classes (runtime/) and the libraries they call (ONNX Runtime, FAISS,
    NumPy); split further by step class;
  - adapter: everything else the stub does for a request (serving/triton_models.py: reading and checking
    inputs, merging and padding a batch, building output tensors, the python backend's own utilities);
idle samples (the stub waiting for work, the metrics publisher's thread) are counted apart. Each bucket is also
given in ms per request served while py-spy recorded (5 ms a sample; a model with several instances: add its
stubs). py-spy pauses a process to sample it, so these are upper bounds. Results:
benchmarks/results/stub_profile[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config

from .machine import command_line, commit, describe, write_report
from .serving_bench import input_data
from .serving_load import run_perf_analyzer, stub_pids

COMMAND = "python -m benchmarks.stub_profile"
PY_SPY = Path(sys.executable).parent / "py-spy"
_STEP_CLASS = re.compile(r"^(\w+)\.run(?:_requests)? \(runtime/steps\.py")


def bucket(frames: list[str]) -> str:
    """'idle', 'adapter' or 'step:<class>' for one sample's stack (outermost frame first)."""
    if not frames or frames == [""] or any("_publish_loop" in f for f in frames):
        return "idle"
    if not any(f.startswith("StepModel.execute ") for f in frames):
        return "idle"  # the stub's own loop between requests
    # the batched parts run under Fused._run, and the per-request part (top-k) answers the whole batch from
    # Fused.run_requests itself: both are the fused model's step code
    inside = next((i for i, f in enumerate(frames) if f.startswith(("Fused._run ", "Fused.run_requests "))), None)
    if inside is None:
        return "adapter"
    part = next((m.group(1) for f in frames[inside + 1:] if (m := _STEP_CLASS.match(f)) and m.group(1) != "Fused"), "other")
    return f"step:{part}"


def summarise(path: Path) -> dict:
    counts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[bucket(stack.split(";"))] += int(n)
    busy = sum(v for k, v in counts.items() if k != "idle")
    steps = sum(v for k, v in counts.items() if k.startswith("step:"))
    return {"samples": sum(counts.values()), "busy_samples": busy,
            "step_share_of_busy": round(steps / busy, 3) if busy else None,
            "adapter_share_of_busy": round(counts["adapter"] / busy, 3) if busy else None,
            "by_step_class": {k[5:]: round(v / busy, 3) for k, v in counts.most_common() if k.startswith("step:")}}


def main(argv=None) -> dict:
    from serving.launcher import TritonServer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--profile", default="cpu", choices=["cpu", "cpu-stages"])
    args = p.parse_args(argv)
    if not PY_SPY.is_file():
        p.error(f"py-spy is not installed beside this Python ({PY_SPY}); `make setup` installs it (requirements/dev-tools.txt)")
    artifacts = Path(args.artifacts).resolve()
    cfg = dataclasses.replace(load_config().serve, response_cache_mb=0, canary_interval_s=0.0)
    stubs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "input.json"
        input_data(artifacts, data)
        with TritonServer.from_config(cfg, artifacts, args.profile, ephemeral_ports=True, log_path=tmp / "triton.log") as server:
            run_perf_analyzer(server.grpc_url, "grpc", args.concurrency, data, 1500)  # warm
            pids = stub_pids(server.process.pid)  # several instances of a model: each stub apart
            load: dict = {}
            requests = max(2000, int(300 * (args.seconds + 10)))  # outlasts the recording on this machine
            t = threading.Thread(target=lambda: load.update(run_perf_analyzer(server.grpc_url, "grpc", args.concurrency,
                                                                              data, requests)))
            t.start()
            procs = {m: subprocess.Popen([str(PY_SPY), "record", "-p", str(pid), "-d", str(args.seconds), "-r", "200",
                                          "--format", "raw", "-o", str(tmp / f"{m}.txt")],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for m, pid in pids.items()}
            for m, proc in procs.items():
                if proc.wait() != 0:
                    raise RuntimeError(f"py-spy on the {m} stub failed: {proc.stderr.read().decode()[-500:]}")
            t.join()
        served = (load.get("throughput_rps") or 0) * args.seconds  # requests answered while py-spy recorded
        for m in pids:
            stubs[m] = summarise(tmp / f"{m}.txt")
            for part in ("step", "adapter"):  # sampled at 200 Hz: 5 ms a sample
                share = stubs[m][f"{part}_share_of_busy"]
                stubs[m][f"{part}_ms_per_request"] = (round(stubs[m]["busy_samples"] * share * 5.0 / served, 3)
                                                      if served and share is not None else None)
    report = {"command": command_line(COMMAND, argv), "machine": describe(), "commit": commit(),
              "profile": args.profile, "concurrency": args.concurrency, "seconds": args.seconds, "load": load, "stubs": stubs}
    md = [f"# Where the stubs spend their time — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. Profile {args.profile}. perf_analyzer gRPC at concurrency {args.concurrency} "
          f"({load.get('throughput_rps')} req/s), py-spy {args.seconds} s at 200 Hz on each stub.", "",
          "| stub | busy samples | step code | adapter | ms per request: step code / adapter | step code by class |",
          "|---|---|---|---|---|---|"]
    for m, s in sorted(stubs.items()):
        md.append(f"| {m} | {s['busy_samples']} | {s['step_share_of_busy']:.1%} | {s['adapter_share_of_busy']:.1%} | "
                  f"{s['step_ms_per_request']} / {s['adapter_ms_per_request']} | "
                  + ", ".join(f"{k} {v:.1%}" for k, v in s["by_step_class"].items()) + " |")
    write_report(args.out, "stub_profile", args.tag, report, md)
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
