"""The size-capping gRPC front (serving/grpc_front.py) before a real tritonserver: a 64 MiB request is refused
before it is buffered, memory stays flat, and everything else passes through unchanged (answers, error codes,
the admin key)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import RecommenderClient
from serving.launcher import TritonServer, process_group
from shoprec.contract import ENSEMBLE

pytestmark = pytest.mark.integration


def _rss_mb(pids) -> float:
    return sum(int(open(f"/proc/{p}/statm").read().split()[1]) for p in pids) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def fronted(artifacts, cfg):
    serve = cfg.replace("serve", online_store="none", canary_interval_s=0.0, grpc_front="true", grpc_max_message_mb=1.0).serve
    with TritonServer.from_config(serve, artifacts, ephemeral_ports=True) as server:
        yield server


SENDER = """
import sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
g = grpcclient.InferenceServerClient(sys.argv[1])
ids = np.zeros((8 << 20, 1), dtype=np.int64)  # 64 MiB
for _ in range(3):
    big = grpcclient.InferInput("user_id", list(ids.shape), "INT64")
    big.set_data_from_numpy(ids)
    k = grpcclient.InferInput("k", [1, 1], "INT32")  # the batch sizes disagree: only the size check can answer first
    k.set_data_from_numpy(np.ones((1, 1), np.int32))
    try:
        g.infer("recommender", [big, k])
        print("ANSWERED")
    except InferenceServerException as exc:
        print(exc.status(), str(exc)[:120])
"""


def test_a_64_mib_request_is_refused_before_it_is_buffered(fronted, artifacts):
    """The client runs in its own process: this one holds the front, whose memory is measured with the server's."""
    pids = [os.getpid()] + [pid for pid, _, _ in process_group(fronted.process.pid)]
    before = _rss_mb(pids)
    out = subprocess.run([sys.executable, "-c", SENDER, fronted.grpc_url], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all("RESOURCE_EXHAUSTED" in x and "larger than max" in x for x in lines), out
    grown = _rss_mb(pids) - before
    assert grown < 32, f"RSS of the front and tritonserver grew by {grown:.0f} MB"  # 3 x 64 MiB never held
    user = int(np.load(artifacts / "serving" / "user_store.npz")["user_id"][0])
    with RecommenderClient(fronted.grpc_url) as c:
        assert len(c.recommend(user, k=5).item_ids) == 5  # still serving


def test_answers_error_codes_and_the_admin_key_pass_through(fronted, artifacts):
    user = int(np.load(artifacts / "serving" / "user_store.npz")["user_id"][0])
    with RecommenderClient(fronted.grpc_url) as c:
        rec = c.recommend(user, k=7)
        assert len(rec.item_ids) == 7 and rec.version == fronted.served_version()
        with pytest.raises(InferenceServerException) as err:
            c.recommend(user, k=0)
        assert "INVALID_ARGUMENT" in str(err.value.status()) and "k must be >= 1" in str(err.value)
    g = grpcclient.InferenceServerClient(fronted.grpc_url)
    assert g.is_server_ready() and g.get_model_metadata(ENSEMBLE).name == ENSEMBLE
    with pytest.raises(InferenceServerException, match="restricted"):
        g.get_model_repository_index()
    key = fronted.admin_key_path.read_text().strip()
    assert len(g.get_model_repository_index(headers={"triton-grpc-protocol-shoprec-admin-key": key}).models) >= 4


def test_streaming_passes_through(fronted, artifacts):
    """ModelStreamInfer (perf_analyzer --streaming, streaming clients) is forwarded as a stream."""
    import queue

    user = int(np.load(artifacts / "serving" / "user_store.npz")["user_id"][0])
    answers: queue.Queue = queue.Queue()
    g = grpcclient.InferenceServerClient(fronted.grpc_url)
    g.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for k in (3, 4, 0):
            inputs = [grpcclient.InferInput("user_id", [1, 1], "INT64"), grpcclient.InferInput("k", [1, 1], "INT32")]
            inputs[0].set_data_from_numpy(np.array([[user]], np.int64))
            inputs[1].set_data_from_numpy(np.array([[k]], np.int32))
            g.async_stream_infer(ENSEMBLE, inputs)
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        g.stop_stream()
    assert [len(r.as_numpy("item_ids")[0]) for r, e in got[:2] if e is None] == [3, 4]
    assert got[2][1] is not None and "k must be >= 1" in str(got[2][1])  # a bad request in the stream: its own error
