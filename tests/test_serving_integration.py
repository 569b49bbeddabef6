"""Against a real tritonserver (pip nvidia-pytriton wheel, python backend) serving the ensemble."""

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import AsyncRecommenderClient, RecommenderClient
from shoprec.manifest import ArtifactError

pytestmark = pytest.mark.integration


def _users(artifacts, n=12):
    with np.load(artifacts / "serving" / "user_store.npz", allow_pickle=False) as z:
        return [int(u) for u in z["user_id"][:: max(1, len(z["user_id"]) // n)][:n]]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_topk_equals_in_process_id_for_id(triton, pipeline, artifacts, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with RecommenderClient(url, protocol) as c:
        assert c.ready()
        for u in _users(artifacts):
            served = c.recommend(u, k=10, hour=20, weekday=4, device="mobile")
            ids, scores, cold = pipeline.recommend([u], 10, hour=20, weekday=4, device="mobile")[0]
            np.testing.assert_array_equal(served.item_ids, ids)
            np.testing.assert_allclose(served.scores, scores, rtol=1e-5, atol=1e-6)
            assert served.item_ids.dtype == np.int64 and served.scores.dtype == np.float32
            assert served.cold_start == cold


def test_unknown_user_gets_flagged_popular_fallback(triton, pipeline):
    with RecommenderClient(triton.grpc_url) as c:
        rec = c.recommend(424242, k=5)
    assert rec.cold_start and len(rec.item_ids) == 5
    popular_ids = set(pipeline.item_table["item_ids"][pipeline.item_table["popular_rows"][: pipeline.retrieval.n]])
    assert set(rec.item_ids) <= popular_ids


def test_k_is_validated_and_clamped(triton, pipeline, artifacts):
    u = _users(artifacts)[0]
    with RecommenderClient(triton.grpc_url) as c:
        with pytest.raises(InferenceServerException, match="k must be >= 1, got 0"):
            c.recommend(u, k=0)
        big = c.recommend(u, k=10**6, hour=1)
    assert len(big.item_ids) == pipeline.topk.max_k
    with pytest.raises(InferenceServerException, match=r"hour must be in 0..23, got 31"):
        RecommenderClient(triton.grpc_url).recommend(u, k=3, hour=31)


def test_wrong_dtype_shape_and_empty_batch_are_rejected(triton):
    c = grpcclient.InferenceServerClient(triton.grpc_url)
    uid = grpcclient.InferInput("user_id", [1, 1], "FP32")
    uid.set_data_from_numpy(np.ones((1, 1), np.float32))
    k = grpcclient.InferInput("k", [1, 1], "INT32")
    k.set_data_from_numpy(np.ones((1, 1), np.int32))
    with pytest.raises(InferenceServerException, match="input 'user_id' data-type is 'FP32', but model 'recommender' expects 'INT64'"):
        c.infer("recommender", [uid, k])
    uid = grpcclient.InferInput("user_id", [1, 2], "INT64")
    uid.set_data_from_numpy(np.ones((1, 2), np.int64))
    with pytest.raises(InferenceServerException, match="unexpected shape for input 'user_id' for model 'recommender'"):
        c.infer("recommender", [uid, k])
    uid = grpcclient.InferInput("user_id", [0, 1], "INT64")
    uid.set_data_from_numpy(np.ones((0, 1), np.int64))
    k0 = grpcclient.InferInput("k", [0, 1], "INT32")
    k0.set_data_from_numpy(np.ones((0, 1), np.int32))
    with pytest.raises(InferenceServerException):
        c.infer("recommender", [uid, k0])
    assert c.is_server_live() and c.is_server_ready()


def test_bad_requests_never_fail_good_ones_in_the_same_batch(triton, pipeline, artifacts):
    users = _users(artifacts, 8)

    async def run():
        async with AsyncRecommenderClient(triton.grpc_url) as c:
            calls = [c.recommend(u, k=0 if i % 2 else 5, hour=12) for i, u in enumerate(users * 4)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    for i, (u, r) in enumerate(zip(users * 4, results)):
        if i % 2:
            assert isinstance(r, InferenceServerException) and "k must be >= 1" in str(r)
        else:
            ids = pipeline.recommend([u], 5, hour=12)[0][0]
            np.testing.assert_array_equal(r.item_ids, ids)
    with RecommenderClient(triton.grpc_url) as c:
        assert c.ready()


def test_launcher_refuses_tampered_bundle(artifacts, cfg, tmp_path):
    import shutil

    from serving.launcher import TritonServer

    copy = tmp_path / "art"
    shutil.copytree(artifacts / "serving", copy / "serving")
    data = bytearray((copy / "serving" / "ranker.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "serving" / "ranker.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="ranker.onnx: sha256"):
        TritonServer.from_config(cfg.serve, copy, ephemeral_ports=True).start()
