"""The SERVING environment (`make serving-env`: requirements/serving.in, ~0.5 GB against the offline
environment's ~2.5 GB) serves on its own: `shoprec serve` from it starts tritonserver, whose python-backend
steps then import that environment's packages, and `shoprec recommend` from it gets a list. Nothing of the
offline stack is installed there, so nothing on the serving path can need it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from shoprec.config import REPO_ROOT

pytestmark = pytest.mark.integration

SERVING_VENV = REPO_ROOT / ".venv-serving"
OFFLINE_ONLY = ("torch", "nvtabular", "merlin", "pandas", "dask", "scipy", "implicit", "sklearn", "pyarrow")


def _bin(name: str) -> str:
    path = SERVING_VENV / "bin" / name
    assert path.exists(), f"{path} is missing: `make serving-env` builds the serving environment (`make test` does)"
    return str(path)


def test_the_serving_environment_has_none_of_the_offline_stack():
    found = subprocess.run([_bin("python"), "-c", "import importlib.util as u, sys; "
                            f"print(','.join(m for m in {OFFLINE_ONLY!r} if u.find_spec(m)))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == ""


def test_the_serving_environment_serves_a_list(artifacts, config_file, tmp_path):
    from runtime.request_transform import UserStore
    from serving.launcher import free_ports
    from shoprec.manifest import verified_path

    store = UserStore.load(verified_path(artifacts / "serving", "user_store.npz"))
    user = int(store.user_id[store.arrays["activity"] > 0][0])
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "serve.log"
    base = [_bin("shoprec"), "--config", str(config_file), "--artifacts", str(artifacts)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    server = subprocess.Popen([*base, "serve", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                               str(metrics), "--online-store", "none"], env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, f"shoprec serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the serving environment's server was not ready after 180 s"
            time.sleep(0.5)
        done = subprocess.run([*base, "recommend", "--user", str(user), "-k", "5", "--url", f"127.0.0.1:{grpc}"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"user {user}: 5 items" in done.stdout.lower()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
