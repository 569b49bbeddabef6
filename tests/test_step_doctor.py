"""Health that tells the truth (serving/canary.py): a dead or hung step is found by a real inference
through the ensemble and healed without a person, on a real tritonserver."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks.step_faults import Load, inject
from serving.canary import canary, dead_steps
from tests.test_deploy import probe_command

pytestmark = pytest.mark.integration


def test_dead_steps_are_read_from_the_error():
    assert dead_steps("in ensemble 'recommender', Stub process 'ranking_0_0' is not healthy.") == ["ranking"]
    assert dead_steps("Stub process 'user_features_1_0' is not healthy; Stub process 'ranking_0_0' is not healthy") == [
        "ranking", "user_features"]
    assert dead_steps("no answer within 5s (TimeoutError: timed out)") == []


STEPS = ("user_features", "candidates", "ranking")  # the cpu-stages profile's models


def _server(artifacts, cfg, profile, **serve):
    from serving.launcher import TritonServer

    # no response cache: the load asks for one user, whose cached candidates would hide a dead candidates stub from
    # it (the canary itself never hits the cache: test_serving_integration checks that)
    serve = cfg.replace("serve", canary_interval_s=1.0, canary_timeout_s=3.0, online_store="none", response_cache_mb=0,
                        **serve).serve
    return TritonServer.from_config(serve, artifacts, profile=profile, ephemeral_ports=True)


@pytest.fixture(scope="module")
def server(artifacts, cfg):
    with _server(artifacts, cfg, "cpu-stages") as s:
        yield s


@pytest.fixture(scope="module")
def two_instances(artifacts, cfg):
    with _server(artifacts, cfg, "cpu", instances={"pipeline": 2}) as s:
        yield s


def test_the_probe_command_answers_for_a_serving_server_and_fails_for_none(server):
    cmd = [sys.executable if a == "python3" else a for a in probe_command("readinessProbe")]
    ok = subprocess.run([a.replace("127.0.0.1:8000", server.http_url) for a in cmd], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    closed = subprocess.run([a.replace("127.0.0.1:8000", "127.0.0.1:9") for a in cmd], capture_output=True, text=True, check=False)
    assert closed.returncode == 1 and closed.stderr.startswith("canary: no answer within 2s")


@pytest.mark.parametrize("step,sig", [(s, signal.SIGKILL) for s in STEPS] + [("candidates", signal.SIGSTOP)],
                         ids=[f"kill-{s}" for s in STEPS] + ["hang-candidates"])
def test_a_dead_or_hung_step_is_healed_within_ten_seconds(server, artifacts, step, sig):
    """The benchmark's own fault injection (benchmarks/step_faults.py), one fault per case."""
    user = int(np.load(artifacts / "serving" / "user_store.npz")["user_id"][0])
    with Load(server.grpc_url, user) as load:
        time.sleep(0.5)
        row = inject(server, load, step, sig, settle_s=1.5)
        answered = load.ok
        time.sleep(0.5)
        assert load.ok > answered, "requests are answered again"
    assert row["healed"] and row["actions"] == [f"reloaded {step}"], row
    assert row["stubs_after"] == 1, "the replaced stub is gone, hung or not"
    assert row["last_failure_s"] is None or row["last_failure_s"] < 10, row
    assert canary(server.http_url) is None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "hang"])
def test_one_dead_instance_of_two_is_found_and_healed(two_instances, artifacts, sig):
    """The cpu profile's model runs several instances: with one stub dead or hung, the other answers the canary, so
    the doctor counts the stubs. The model is reloaded, both instances run again, and requests are answered."""
    server = two_instances
    assert server.doctor.stubs == {"pipeline": 2} and len(server.stub_pids("pipeline")) == 2
    user = int(np.load(artifacts / "serving" / "user_store.npz")["user_id"][0])
    with Load(server.grpc_url, user) as load:
        time.sleep(0.5)
        row = inject(server, load, "pipeline", sig, settle_s=1.5)
        answered = load.ok
        time.sleep(0.5)
        assert load.ok > answered, "requests are answered again"
    assert row["healed"] and row["actions"] == ["reloaded pipeline"], row
    assert row["stubs_after"] == 2 and server.doctor.short_of_stubs() == []
    assert row["last_failure_s"] is None or row["last_failure_s"] < 10, row
    assert canary(server.http_url) is None
