"""Faults in the served steps under load: a stub of each python model killed (SIGKILL) or hung (SIGSTOP) in
turn, with the step doctor on (serving/canary.py); failed requests and time until requests are answered again.

    .venv/bin/python -m benchmarks.step_faults                         # on ARTIFACTS (`make demo` built them)
    .venv/bin/python -m benchmarks.step_faults --profile cpu-stages    # the three-model cpu profile

A real tritonserver on the bundle (online store off), 4 gRPC clients sending requests for one warm user
without pause. The cpu profile's one model runs one instance per core: the fault hits its first stub, and
the others keep answering until the doctor's stub census finds it. For each fault: requests answered and
failed, and the seconds from the fault to the last failed request. Writes
benchmarks/results/step_faults[_PROFILE].{json,md} (no suffix for cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config

from .machine import describe
from .serving_bench import warm_users

def faults(profile: str) -> list[tuple[str, signal.Signals]]:
    """Every python model of the profile killed, then every one hung."""
    from shoprec.contract import profile_steps

    models = [s.name for s in profile_steps(profile)]
    return [(m, signal.SIGKILL) for m in models] + [(m, signal.SIGSTOP) for m in models]


def stub_pid(server, step: str) -> int:
    """The first stub of the model (its first instance)."""
    pids = sorted(server.stub_pids(step))
    if not pids:
        raise RuntimeError(f"no stub for {step} in the server's process group")
    return pids[0]


class Load:
    """`clients` gRPC clients sending requests until stopped; counts answers and failures."""

    def __init__(self, url: str, user: int, clients: int = 2):
        self.url, self.user, self.ok, self.failed, self.last_failure = url, user, 0, 0, 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self):
        from tritonclient.utils import InferenceServerException

        from client import RecommenderClient

        with RecommenderClient(self.url) as c:
            while not self._stop.is_set():
                try:
                    c.recommend(self.user, k=10)
                    with self._lock:
                        self.ok += 1
                except InferenceServerException:
                    with self._lock:
                        self.failed, self.last_failure = self.failed + 1, time.time()
                    time.sleep(0.05)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(10)


def inject(server, load: Load, step: str, sig: signal.Signals, settle_s: float = 3.0, limit_s: float = 10.0) -> dict:
    """One fault under `load`: counts from the fault until the doctor reports recovery plus settle_s."""
    n_incidents = len(server.doctor.incidents)
    ok0, failed0 = load.ok, load.failed
    at = time.time()
    os.kill(stub_pid(server, step), sig)
    while time.time() < at + limit_s and not (len(server.doctor.incidents) > n_incidents and server.doctor.ready):
        time.sleep(0.1)
    time.sleep(settle_s)
    incident = server.doctor.incidents[-1] if len(server.doctor.incidents) > n_incidents else {}
    return {"step": step, "fault": sig.name, "answered": load.ok - ok0, "failed": load.failed - failed0,
            "last_failure_s": round(load.last_failure - at, 2) if load.last_failure >= at else None,
            "healed": "recovered_s" in incident and server.doctor.ready, "actions": incident.get("actions", []),
            "detected_error": incident.get("error"), "stubs_after": len(server.stub_pids(step))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--profile", default="cpu", choices=["cpu", "cpu-stages"])
    args = ap.parse_args(argv)
    from serving.launcher import TritonServer

    cfg = load_config()
    # no response cache: the load repeats one user, whose cached candidates would hide a dead candidates stub
    serve = cfg.replace("serve", online_store="none", response_cache_mb=0).serve
    user = int(warm_users(args.artifacts)[0])
    rows = []
    with TritonServer.from_config(serve, args.artifacts, profile=args.profile, ephemeral_ports=True) as server:
        instances = {m: len(server.stub_pids(m)) for m, _ in faults(args.profile)}
        with Load(server.grpc_url, user, args.clients) as load:
            time.sleep(2.0)
            for step, sig in faults(args.profile):
                rows.append(inject(server, load, step, sig))
                print(json.dumps(rows[-1]), flush=True)
        t0 = time.time()
    stop_s = round(time.time() - t0, 2)
    report = {"rows": rows, "canary_interval_s": serve.canary_interval_s, "canary_timeout_s": serve.canary_timeout_s,
              "clients": args.clients, "stop_after_faults_s": stop_s, "machine": describe(), "profile": args.profile,
              "instances": instances,
              "command": "python -m benchmarks.step_faults" + (f" --profile {args.profile}" if args.profile != "cpu" else "")}
    args.results.mkdir(parents=True, exist_ok=True)
    name = "step_faults" if args.profile == "cpu" else f"step_faults_{args.profile.replace('-', '_')}"
    (args.results / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# Step faults under load (the step doctor on)", "",
             (f"{args.clients} gRPC clients without pause; canary every {serve.canary_interval_s:g} s, "
             f"timeout {serve.canary_timeout_s:g} s. Profile {args.profile}, stubs per model {instances}. "
             f"Command: `{report['command']}`. Machine: {report['machine']}."), "",
             "| step | fault | failed | answered | last failure after (s) | healed by |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['fault']} | {r['failed']} | {r['answered']} | {r['last_failure_s']} | "
              f"{'; '.join(r['actions']) if r['healed'] else 'NOT HEALED'} |" for r in rows]
    lines += ["", f"`shoprec serve`'s stop after the faults: {stop_s} s.", ""]
    (args.results / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
