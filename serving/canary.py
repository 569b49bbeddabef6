"""Health that tells the truth: a real inference through the ensemble, and the step doctor that acts on it.

Triton 2.51 keeps every health endpoint green when a python step's stub process dies or hangs, while
every request fails ("Stub process 'ranking_0_0' is not healthy"), and it never restarts the stub.
So health here is a canary: one small request through the whole ensemble (a user id no store holds,
k = 1: the cold-start path through every step), over loopback HTTP, with a deadline.

- `python -m serving.canary` is the Kubernetes readiness and liveness probe (exit 0: served; 1: the
  reason, in one line). A failing liveness probe makes kubelet restart the container.
- `StepDoctor` (the local launcher runs it) sends the canary every `serve.canary_interval_s`. On a
  failure it reloads the step the error names, or every step when none is named (a hang, a timeout),
  through Triton's explicit model control: a load request whose config carries a fresh
  `shoprec_reload` parameter, which makes Triton start new stubs. A load of an unchanged model
  is a no-op and leaves the dead stub in place (tried on 2.51). When reloads do not bring the canary
  back, it asks its owner to restart the server.

Canary requests count in Triton's and the steps' metrics like any request: one per interval and
server (0.5 requests/s at the default 2 s). The `shoprec serve` launcher runs the doctor; the
container relies on kubelet (deploy/k8s/deployment.yaml) to act on the probe.

Standard library and the project's core only (shoprec.contract, itself standard library): the container's
probe runs it without NumPy or the serving dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from shoprec.contract import (
    ENSEMBLE,  # the core is standard library only, as this module must be
)

from .command import ADMIN_HEADER

log = logging.getLogger("shoprec.serve")

CANARY_USER = -1  # no store holds it: the cold-start path, which still runs every step
_DEAD_STUB = re.compile(r"Stub process '([A-Za-z0-9_\-]+?)_\d+_\d+' is not healthy")


def canary_body() -> bytes:
    """The canary request: a fresh `cache_salt` each time, so no step answers it from the response cache (a
    dead stub behind a cached step would go unseen: every cold user's request is the same)."""
    return json.dumps({"inputs": [
        {"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [CANARY_USER]},
        {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [1]},
        {"name": "cache_salt", "shape": [1, 1], "datatype": "INT64", "data": [secrets.randbits(63)]},
    ]}).encode()


def canary(http_url: str, timeout_s: float = 5.0) -> str | None:
    """None when the ensemble answered with a list; else why not, in one line."""
    req = urllib.request.Request(f"http://{http_url}/v2/models/{ENSEMBLE}/infer", data=canary_body(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            reply = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except ValueError:
            detail = ""
        return f"HTTP {exc.code}: {detail or exc.reason}"
    except (OSError, ValueError) as exc:  # refused, reset, timed out, not JSON
        return f"no answer within {timeout_s:g}s ({exc.__class__.__name__}: {exc})"
    if not any(o.get("name") == "item_ids" for o in reply.get("outputs", [])):
        return "the reply has no item_ids"
    return None


def _stopped(pid: int) -> bool:
    """A process that is gone, a zombie, or stopped (SIGSTOP: a hung stub)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"T", b"t", b"Z", b"X")


def dead_steps(error: str) -> list[str]:
    """The models whose stub the error names as dead."""
    return sorted(set(_DEAD_STUB.findall(error)))


def triton_request(http_url: str, path: str, admin_key: str | None = None, body: dict | None = None,
                   timeout_s: float = 60.0):
    """One request to Triton's HTTP API (POST with a JSON body, GET without), the admin key in its header; the
    parsed JSON answer. RuntimeError naming the path and Triton's error, OSError when nothing answers."""
    headers = {"Content-Type": "application/json"}
    if admin_key:
        headers[ADMIN_HEADER] = admin_key
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{http_url}{path}", data=data, method="GET" if data is None else "POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except ValueError:
            detail = ""
        raise RuntimeError(f"{path}: HTTP {exc.code} {detail or exc.reason}".strip()) from None
    return json.loads(raw) if raw else {}


def reload_model(http_url: str, model: str, admin_key: str | None, timeout_s: float = 60.0) -> None:
    """Make Triton start the model's instances anew (new stubs), through explicit model control."""
    config = triton_request(http_url, f"/v2/models/{model}/config", timeout_s=timeout_s)
    config.setdefault("parameters", {})["shoprec_reload"] = {"string_value": f"{time.time():.6f}"}
    triton_request(http_url, f"/v2/repository/models/{model}/load", admin_key,
                   {"parameters": {"config": json.dumps(config)}}, timeout_s)


class StepDoctor:
    """A thread that sends the canary every `interval_s` and heals what it finds (see the module doc).

    `ready` is the truth a probe should report: False from a failed canary until one succeeds again.
    `incidents` keeps one record per failure: what failed, what was done, seconds to recovery."""

    def __init__(self, http_url: str, steps: list[str], admin_key: str | None, interval_s: float = 2.0,
                 timeout_s: float = 5.0, reloads_before_restart: int = 2, restart=None, alive=None, stub_pids=None,
                 lock=None, stubs: dict | None = None):
        """restart: called when reloads do not help; alive: False once the server process has exited,
        which is not the doctor's to heal (its owner reports the exit); stub_pids(model): the pids of the
        model's stubs, which get SIGKILL once the reload has replaced them (a hung stub would stay); lock(): a
        context manager held while reloading (a version switch, serving/versions.py, takes it too);
        stubs: {model: instances} of the python models. A model with several instances can lose one while the
        canary, answered by another, still passes: after each good canary the doctor counts the model's live,
        running stubs, and heals the model when fewer than its instances are left (the stub census)."""
        self.http_url, self.steps, self.admin_key = http_url, list(steps), admin_key
        self.stubs = dict(stubs or {})
        self.alive = alive or (lambda: True)
        self.stub_pids = stub_pids or (lambda model: [])
        self.lock = lock or contextlib.nullcontext
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.reloads_before_restart, self.restart = reloads_before_restart, restart
        self.ready = True
        self.incidents: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StepDoctor:
        self._thread = threading.Thread(target=self._run, name="step-doctor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)  # a daemon thread: a reload in flight must not hold up the shutdown

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            error, models = canary(self.http_url, self.timeout_s), None
            if error is None:
                models = self.short_of_stubs()
                error = "; ".join(f"{m}: fewer running stubs than its {self.stubs[m]} instances" for m in models) or None
            if error is not None and not self._stop.is_set() and self.alive():
                try:
                    self._heal(error, models)
                except Exception as exc:  # noqa: BLE001 - the doctor must outlive any one incident
                    log.error("step doctor: healing failed (%s); trying again on the next canary", exc)

    def short_of_stubs(self) -> list[str]:
        """The python models with fewer live, running (not stopped) stubs than instances."""
        return sorted(m for m, n in self.stubs.items() if sum(not _stopped(pid) for pid in self.stub_pids(m)) < n)

    def _heal(self, error: str, models: list[str] | None = None) -> None:
        waited = time.time()
        with self.lock():  # not while a version switch loads and unloads steps
            if models:
                models = self.short_of_stubs()  # counted again under the lock: a switch replaces stubs
                if not models:
                    return
            elif time.time() - waited > 0.1 and canary(self.http_url, self.timeout_s) is None:
                return  # a switch was in flight, and it is over
            self._heal_locked(error, models)

    def _heal_locked(self, error: str, models: list[str] | None = None) -> None:
        t0 = time.time()
        self.ready = False
        incident = {"at": t0, "error": error[:300], "actions": []}
        self.incidents.append(incident)
        log.warning("canary failed: %s", error[:300])
        for attempt in range(self.reloads_before_restart):
            if self._stop.is_set():
                return
            named = models or [m for m in dead_steps(error) if m in self.steps]
            for model in named or self.steps:  # a hang names nothing: every step is reloaded
                old = self.stub_pids(model)
                try:
                    reload_model(self.http_url, model, self.admin_key)
                    incident["actions"].append(f"reloaded {model}")
                except (OSError, RuntimeError) as exc:
                    incident["actions"].append(f"reload of {model} failed: {exc}")
                    continue
                for pid in old:  # Triton left them behind: a hung stub never exits by itself
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            error = canary(self.http_url, self.timeout_s)
            if error is None:
                break
            time.sleep(min(1.0, self.interval_s))
        else:
            if self.restart is None or self._stop.is_set():
                log.error("canary still failing after %d reloads: %s", self.reloads_before_restart, error[:300])
                return
            log.error("canary still failing after %d reloads; restarting the server", self.reloads_before_restart)
            incident["actions"].append("restarted the server")
            self.restart()
            error = canary(self.http_url, self.timeout_s)
        if error is None:
            self.ready = True
            incident["recovered_s"] = round(time.time() - t0, 2)
            log.warning("serving again after %.1fs (%s)", incident["recovered_s"], "; ".join(incident["actions"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="One inference through the recommender ensemble (a probe): exit 0 when "
                                             "it answers, 1 with the reason otherwise.")
    ap.add_argument("--http", default="127.0.0.1:8000", help="Triton's HTTP address (default 127.0.0.1:8000)")
    ap.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    args = ap.parse_args(argv)
    error = canary(args.http, args.timeout)
    if error is not None:
        print(f"canary: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
