"""Against a real tritonserver (pip nvidia-pytriton wheel, python backend) serving the ensemble."""

import asyncio
import os
import re
import secrets

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import AsyncRecommenderClient, RecommenderClient
from runtime.request_transform import UserStore
from shoprec import contract
from shoprec.manifest import ArtifactError, verified_path

pytestmark = pytest.mark.integration


def _store(artifacts) -> UserStore:
    return UserStore.load(artifacts / "serving" / "user_store.npz")


def _users(artifacts, n=12):
    store = _store(artifacts)
    warm = store.user_id[store.arrays["activity"] > 0]
    return [int(u) for u in warm[:: max(1, len(warm) // n)][:n]]


def _seen(store: UserStore, user: int) -> set:
    return set(store.history(int(store.lookup(np.array([user]))[0]))[0].tolist())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_topk_equals_in_process_id_for_id(triton, pipeline, artifacts, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with RecommenderClient(url, protocol) as c:
        assert c.ready()
        for u in _users(artifacts):
            for context in ({}, {"hour": 20, "weekday": 4, "client_device": "mobile"}):
                served = c.recommend(u, k=10, **context)
                ids, scores, cold = pipeline.recommend([u], 10, **context)[0]
                np.testing.assert_array_equal(served.item_ids, ids)
                np.testing.assert_allclose(served.scores, scores, rtol=1e-5, atol=1e-6)
                assert served.item_ids.dtype == np.int64 and served.scores.dtype == np.float32
                assert served.cold_start == cold is False


def test_no_seen_item_is_served_unless_asked(triton, pipeline, artifacts):
    store = _store(artifacts)
    item_ids = pipeline.item_table["item_ids"]
    repeats = 0
    with RecommenderClient(triton.grpc_url) as c:
        for u in _users(artifacts, 30):
            seen_ids = set(item_ids[list(_seen(store, u))].tolist())
            served = c.recommend(u, k=50)
            assert not seen_ids & set(served.item_ids.tolist()), u
            unfiltered = c.recommend(u, k=50, exclude_seen=False)
            np.testing.assert_array_equal(unfiltered.item_ids, pipeline.recommend([u], 50, exclude_seen=False)[0][0])
            repeats += len(seen_ids & set(unfiltered.item_ids.tolist()))
    assert repeats > 0  # with the filter off, items the users acted on do come back


def test_cold_means_no_history_in_the_store(triton, artifacts):
    store = _store(artifacts)
    without = store.user_id[store.arrays["activity"] == 0]
    with RecommenderClient(triton.grpc_url) as c:
        unknown = c.recommend(424242, k=5)
        assert unknown.cold_start and len(unknown.item_ids) == 5
        assert not c.recommend(_users(artifacts)[0], k=5).cold_start
        if len(without):  # known to the store (a registered user) but no action yet: cold too
            assert c.recommend(int(without[0]), k=5).cold_start


def test_k_is_validated_against_the_served_candidates(triton, pipeline, artifacts):
    u = _users(artifacts)[0]
    n = pipeline.max_k
    with RecommenderClient(triton.grpc_url) as c:
        with pytest.raises(InferenceServerException, match="k must be >= 1, got 0"):
            c.recommend(u, k=0)
        with pytest.raises(InferenceServerException, match=rf"k must be <= {n} \(the candidates ranked per request: "
                                                           rf"serve.num_candidates, at most the catalog's items\), got {n + 1}"):
            c.recommend(u, k=n + 1)
        assert len(c.recommend(u, k=n).item_ids) <= n
        with pytest.raises(InferenceServerException, match=r"hour must be in 0..23, got 31"):
            c.recommend(u, k=3, hour=31)


def test_missing_context_is_unknown_not_the_clock(pipeline, artifacts, monkeypatch):
    import time

    u = _users(artifacts)[0]
    first = pipeline.recommend([u], 10)[0][0]
    monkeypatch.setattr(time, "gmtime", lambda *a: time.struct_time((2030, 1, 1, 3, 0, 0, 1, 1, 0)))
    np.testing.assert_array_equal(pipeline.recommend([u], 10)[0][0], first)
    ucat = pipeline.run(pipeline.request([u], 10), stop="user_tower")["user_cat"]
    plan_cols = pipeline.steps["feature_transform"].plan.cat_names
    assert all(ucat[0, plan_cols.index(c)] == 1 for c in ("hour", "weekday", "device"))  # the null code


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


def test_requests_with_histories_of_different_lengths_batch_together(triton_stages, pipeline, artifacts):
    """The candidates step's history, unavailable-item and context inputs vary in width per request. Triton batches
    them anyway (allow_ragged_batch; the adapter pads them), and each request gets what it gets alone. Called
    directly with one width per request: without ragged batching no two of them could share a batch."""
    import tritonclient.grpc.aio as grpcaio

    store = _store(artifacts)
    step = contract.profile_step("cpu-stages", "candidates")
    requests, expected, widths = [], [], set()
    for u in store.user_id[store.arrays["activity"] > 0][:300]:
        t = pipeline.run(pipeline.request([int(u)], 10), stop="retrieval")
        width = int((t["history_rows"] >= 0).sum())  # the user's actions
        if width in widths:
            continue
        widths.add(width)
        t["history_rows"], t["history_kinds"] = t["history_rows"][:, :width], t["history_kinds"][:, :width]
        requests.append({x.name: (np.ascontiguousarray(t[x.name]), x.dtype) for x in step.inputs if t.get(x.name) is not None})
        # a fresh salt: earlier tests asked for these users, and the response cache would answer them unbatched
        requests[-1]["cache_salt"] = (np.array([[secrets.randbits(62)]], np.int64), "INT64")
        expected.append(pipeline.run(t, start="retrieval", stop="ranker"))
        if len(requests) == 16:
            break
    assert len(requests) >= 8  # one history width per request

    async def run():
        g = grpcaio.InferenceServerClient(triton_stages.grpc_url)
        try:
            before = (await g.get_inference_statistics("candidates")).model_stats[0]
            results = await asyncio.gather(*(g.infer("candidates", _tensors(grpcaio, r)) for r in requests))
            # a batch's statistics can be recorded after its responses reached the client (a fresh-clone CI run read
            # 11 of 16 right after the last response): wait for them
            for _ in range(100):
                after = (await g.get_inference_statistics("candidates")).model_stats[0]
                if after.inference_count - before.inference_count >= len(requests):
                    break
                await asyncio.sleep(0.05)
            return results, after.inference_count - before.inference_count, after.execution_count - before.execution_count
        finally:
            await g.close()

    results, inferences, runs = asyncio.run(run())
    for want, got in zip(expected, results):
        for name in ("candidate_rows", "candidate_dense", "candidate_routes"):
            np.testing.assert_array_equal(got.as_numpy(name), want[name])
    assert inferences == len(requests) and runs < inferences  # batches held requests of different widths


def test_launcher_refuses_tampered_bundle(artifacts, cfg, tmp_path):
    import shutil

    from serving.launcher import TritonServer

    copy = tmp_path / "art"
    shutil.copytree(artifacts / "bundles", copy / "bundles")
    (copy / "serving").symlink_to(os.readlink(artifacts / "serving"))  # the same numbered layout
    data = bytearray((copy / "serving" / "ranker.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "serving" / "ranker.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="ranker.onnx: sha256"):
        TritonServer.from_config(cfg.serve, copy, ephemeral_ports=True).start()


def test_signed_bundle_serves_and_a_rehashed_tampered_one_is_refused(artifacts, cfg, tmp_path, monkeypatch):
    """With SHOPREC_SIGNING_KEY set, the launcher and every step (they inherit it) check the signature."""
    import json
    import shutil

    from serving.launcher import TritonServer
    from shoprec.manifest import SIGNATURE_ALG, _key_id, _signature, sha256_file

    key = b"test-signing-key-0123456789"
    copy = tmp_path / "art"
    shutil.copytree(artifacts / "bundles", copy / "bundles")
    (copy / "serving").symlink_to(os.readlink(artifacts / "serving"))  # the same numbered layout
    path = copy / "serving" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["signature"] = {"alg": SIGNATURE_ALG, "key_id": _key_id(key), "value": _signature(manifest, key)}
    path.write_text(json.dumps(manifest))
    monkeypatch.setenv("SHOPREC_SIGNING_KEY", key.decode())
    with TritonServer.from_config(cfg.replace("serve", online_store="none", canary_interval_s=0.0).serve, copy,
                                  ephemeral_ports=True) as server, RecommenderClient(server.grpc_url) as c:
        assert len(c.recommend(_users(artifacts)[0], k=5).item_ids) == 5
    onnx = copy / "serving" / "ranker.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    manifest["files"]["ranker.onnx"]["sha256"] = sha256_file(onnx)  # re-hashed: the checksums agree again
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="the signature does not match"):
        TritonServer.from_config(cfg.serve, copy, ephemeral_ports=True).start()


def test_demo_serves_a_known_and_an_unknown_user_over_both_protocols(artifacts, cfg, capsys):
    """The last step of `make demo` (app/cli.py demo_served): a fresh server, HTTP and gRPC answers, a cold user."""
    from app.cli import demo_served

    demo_served(artifacts, cfg)
    out = capsys.readouterr().out
    assert out.count("[http] user ") == 1 and out.count("[grpc] user ") == 2
    assert "[grpc] user -1: 5 items  (cold start: no history)" in out
    assert len(re.findall(r"^   1 +\d+ +[\d.]+ ", out, re.MULTILINE)) == 3  # every list has a first rank with a score


def test_a_port_in_use_is_refused_naming_it(artifacts, cfg):
    import socket

    from serving.launcher import LaunchError, TritonServer

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True)
        server.grpc_port = port
        with pytest.raises(LaunchError, match=f"grpc port {port} on 127.0.0.1 is in use .*pass --grpc-port"):
            server.start()
        assert server.process is None  # refused before anything started


def _serve(artifacts):
    """`shoprec serve` as an operator starts it, on free ports; returns the process and its gRPC port."""
    import subprocess
    import sys

    from serving.launcher import free_port

    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "--artifacts", str(artifacts), "serve", "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("tritonserver ready:") and f":{ports[1]}" in line, line + proc.stderr.read()
    return proc, ports[1]


def _server_pids(grpc_port: int) -> list[int]:
    from pathlib import Path

    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"tritonserver") and f"--grpc-port={grpc_port}".encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


def test_sigterm_stops_the_server_it_started(artifacts):
    import os
    import signal

    proc, grpc_port = _serve(artifacts)
    pids = _server_pids(grpc_port)
    assert len(pids) == 1 and len(_group_members(pids[0])) > 1  # the server and its stubs
    key_file = artifacts / "triton" / f"admin_key.{grpc_port}"
    assert key_file.is_file()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0
    assert _server_pids(grpc_port) == [] and not os.path.exists(f"/proc/{pids[0]}/stat")
    assert not key_file.exists()  # the admin key dies with the server: no secret left behind per start
    assert _group_members(pids[0]) == []  # the python-backend stubs went with it (they share its process group)


def _group_members(pgid: int) -> list[int]:
    from serving.launcher import process_group

    return [pid for pid, _, _ in process_group(pgid)]


def test_a_server_that_dies_is_reported_not_a_clean_exit(artifacts):
    import os
    import signal

    proc, grpc_port = _serve(artifacts)
    os.kill(_server_pids(grpc_port)[0], signal.SIGKILL)
    assert proc.wait(60) == 2
    assert "tritonserver stopped on its own with exit code -9" in proc.stderr.read()


def test_a_server_left_by_a_killed_serve_is_stopped_by_the_next_one(artifacts):
    """`shoprec serve` killed with SIGKILL cannot stop its tritonserver, which keeps its ports and memory. The next
    serve on the same artifacts finds it by its record and stops it, stubs and all, and says so."""
    import os
    import signal

    proc, grpc_port = _serve(artifacts)
    pids = _server_pids(grpc_port)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert _server_pids(grpc_port) == pids and len(_group_members(pids[0])) > 1  # left running, stubs and all
    record = artifacts / "triton" / "servers" / f"{grpc_port}.json"
    assert record.is_file()
    second, _ = _serve(artifacts)
    try:
        from serving.launcher import process_group

        assert _server_pids(grpc_port) == []
        assert [pid for pid, fields, _ in process_group(pids[0]) if fields[0] != "Z"] == []  # zombies: init reaps them
        assert not record.exists() and not (artifacts / "triton" / f"repository.{grpc_port}").exists()
        assert not (artifacts / "triton" / f"admin_key.{grpc_port}").exists()
    finally:
        os.kill(second.pid, signal.SIGTERM)
        assert second.wait(60) == 0
    assert f"stopped tritonserver pid {pids[0]} (gRPC 127.0.0.1:{grpc_port}), left running by a `shoprec serve` that " \
           f"is gone (pid {proc.pid})" in second.stderr.read()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_bad_request_is_the_clients_error_not_the_servers(triton, artifacts, protocol):
    """Validation errors carry INVALID_ARG through the ensemble: gRPC INVALID_ARGUMENT, HTTP 400 (not INTERNAL/500)."""
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with RecommenderClient(url, protocol) as c:
        with pytest.raises(InferenceServerException, match="k must be >= 1") as info:
            c.recommend(_users(artifacts)[0], k=0)
    assert str(info.value.status()) in ("StatusCode.INVALID_ARGUMENT", "400")


def test_diversity_per_request_served_as_in_process(triton, pipeline, artifacts):
    users = _users(artifacts, 6)
    with RecommenderClient(triton.grpc_url) as c:
        for u in users:
            served = c.recommend(u, k=10, diversity=0.4)
            np.testing.assert_array_equal(served.item_ids, pipeline.recommend([u], 10, diversity=0.4)[0][0])
        with pytest.raises(InferenceServerException, match=r"diversity must be in \[0, 1\] \(0 = the ranker's order\), got 2"):
            c.recommend(users[0], k=10, diversity=2.0)


def _scrape(server) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("shoprec_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _settled(server) -> dict[str, float]:
    import time

    last, deadline = _scrape(server), time.time() + 10
    while time.time() < deadline:
        time.sleep(1.0)
        now = _scrape(server)
        if now == last:
            return now
        last = now
    return last


def test_step_counters_on_the_metrics_port(triton, artifacts):
    """Known requests in, the steps' own counters out, beside Triton's: requests, cold starts, route sizes, list diversity."""

    warm = _users(artifacts, 3)
    before = _settled(triton)  # earlier tests' counts are published within half a second: wait them out
    with RecommenderClient(triton.grpc_url) as c:
        for u in warm:
            assert len(c.recommend(u, k=5).item_ids) == 5
        for u in (-1, -2):  # unknown users: cold, so the item-to-item routes have nothing to start from
            assert c.recommend(u, k=5).cold_start
    after = _settled(triton)  # published within half a second

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("shoprec_requests_total") == 5 and delta("shoprec_cold_start_total") == 2
    # these users sent no event since the export, and Redis is up: snapshot state, not degraded
    assert delta("shoprec_live_state_total") == 0 and delta("shoprec_degraded_total") == 0
    assert delta("shoprec_served_items_total") == 25 and delta("shoprec_list_pairs_total") == 50
    assert 0 <= delta("shoprec_list_pairs_diverse_total") <= 50
    assert delta('shoprec_route_empty_total{route="cf_all"}') >= 2  # the two cold users at least
    assert delta('shoprec_route_candidates_total{route="popular"}') > 0
    assert delta("shoprec_candidates_total") == 5 * triton_candidates(artifacts)
    # the feature step's gauges: the private Redis's memory, beside the counters
    limit = after["shoprec_online_store_max_bytes"]
    assert limit == triton.online_max_memory_mb * 2**20 and 0 < after["shoprec_online_store_used_bytes"] < limit


def test_the_response_cache_answers_a_repeated_request_and_never_the_canary(artifacts, cfg):
    """With serve.response_cache_mb set, the candidates step (retrieval + candidate features: a function of its
    inputs and the bundle) is answered from Triton's cache when a request repeats one it ran, with the same
    lists; the canary's fresh salt runs it every time."""
    from serving.canary import canary
    from serving.launcher import TritonServer

    # and two instances of the step, and its dynamic batcher set (serve.batching)
    serve = cfg.replace("serve", canary_interval_s=0.0, response_cache_mb=64, instances={"candidates": 2},
                        batching={"candidates": {"preferred_batch_sizes": [2, 4], "max_queue_delay_us": 50}}).serve
    users = _users(artifacts, 4) + [-1, -2]  # and two unknown users: their requests differ at most in the arm
    with TritonServer.from_config(serve, artifacts, profile="cpu-stages", ephemeral_ports=True) as server, \
            RecommenderClient(server.grpc_url) as c, grpcclient.InferenceServerClient(server.grpc_url) as g:
        groups = g.get_model_config("candidates").config.instance_group  # one group each, the first preferred
        assert [(i.count, i.rate_limiter.priority) for i in groups] == [(1, 1), (1, 1000)]
        assert [i.count for i in g.get_model_config("ranking").config.instance_group] == [1]
        batcher = g.get_model_config("candidates").config.dynamic_batching
        assert list(batcher.preferred_batch_size) == [2, 4] and batcher.max_queue_delay_microseconds == 50

        def counts():
            s = g.get_inference_statistics("candidates").model_stats[0].inference_stats
            return s.cache_hit.count, s.cache_miss.count

        first = [c.recommend(u, k=10) for u in users]
        hits, misses = counts()
        assert hits + misses == len(users) and misses >= len(users) - 1
        again = [c.recommend(u, k=10) for u in users]
        assert counts() == (hits + len(users), misses)  # every repeat is a hit
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a.item_ids, b.item_ids)
            np.testing.assert_array_equal(a.scores, b.scores)
            assert a.routes == b.routes
        for _ in range(3):
            assert canary(server.triton_http_url) is None
        assert counts() == (hits + len(users), misses + 3)  # each canary ran the step


def triton_candidates(artifacts) -> int:
    import json

    from shoprec import contract
    from shoprec.config import load_config

    n_items = json.loads((artifacts / "serving" / "contract.json").read_text())["n_items"]
    return contract.num_candidates(load_config().serve.num_candidates, n_items)


def test_every_served_item_says_which_recall_routes_proposed_it(triton, pipeline, artifacts):
    from runtime.candidates import ROUTES

    with RecommenderClient(triton.grpc_url) as c:
        for u in _users(artifacts, 5):
            served = c.recommend(u, k=10)
            ids, _, _, masks = pipeline.recommend([u], 10, with_routes=True)[0]
            np.testing.assert_array_equal(served.item_ids, ids)
            assert served.routes == [[r for b, r in enumerate(ROUTES) if int(m) >> b & 1] for m in masks]
            assert all(served.routes)  # every item came from at least one route
        cold = c.recommend(-7, k=10)
        # no history, no item-to-item; no context, no similar items
        assert cold.cold_start and all(set(r) <= {"ann", "popular", "trending"} for r in cold.routes)


def test_admin_apis_need_the_admin_key_and_inference_does_not(triton):
    """Model repository (load, unload, index) and shared memory: only with the key in the admin header (gRPC: Triton
    prefixes it with triton-grpc-protocol-); inference, health, metadata, statistics and configs stay open."""
    import tritonclient.http as httpclient

    key = triton.admin_key_path.read_text().strip()
    assert key == triton.admin_key and oct(triton.admin_key_path.stat().st_mode & 0o777) == "0o600"
    g = grpcclient.InferenceServerClient(triton.grpc_url)
    h = httpclient.InferenceServerClient(triton.http_url)
    for call in (lambda: g.get_model_repository_index(), lambda: g.get_system_shared_memory_status(),
                 lambda: g.unload_model("pipeline")):
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            call()
    with pytest.raises(InferenceServerException, match="This API is restricted"):
        h.get_model_repository_index()
    index = g.get_model_repository_index(headers={"triton-grpc-protocol-shoprec-admin-key": key}).models
    assert {m.name for m in index} == {"pipeline", "recommender"}  # the cpu profile
    assert {m["name"] for m in h.get_model_repository_index(headers={"shoprec-admin-key": key})} == {"pipeline", "recommender"}
    assert g.is_server_ready() and g.get_model_metadata("recommender").name == "recommender"
    assert g.get_inference_statistics("recommender") is not None and g.get_model_config("recommender") is not None
    with RecommenderClient(triton.grpc_url) as c:  # and the ensemble still answers, after the refused unload
        assert len(c.recommend(-1, k=3).item_ids) == 3


def _ranking_inputs(triton, pipeline, artifacts, mod):
    """Valid inputs of the internal `ranking` model (cpu-stages profile: ranker + top-k) for one user, from the
    in-process pipeline up to it."""
    import json
    import urllib.request

    config = json.loads(urllib.request.urlopen(f"http://{triton.http_url}/v2/models/ranking/config").read())
    t = pipeline.run(pipeline.request(_users(artifacts)[:1], 5), stop="ranker")
    inputs = {}
    for spec in config["input"]:
        if spec["name"] in t and t[spec["name"]] is not None:
            inputs[spec["name"]] = (np.ascontiguousarray(t[spec["name"]]), spec["data_type"].replace("TYPE_", ""))
    return inputs


def _tensors(mod, inputs: dict) -> list:
    out = []
    for name, (value, dtype) in inputs.items():
        x = mod.InferInput(name, list(value.shape), dtype)
        x.set_data_from_numpy(value)
        out.append(x)
    return out


def test_internal_steps_check_what_a_direct_caller_sends(triton_stages, pipeline, artifacts):
    """Triton cannot hide the internal step models: a client may call them. Their inputs are checked as the
    ensemble's are (item rows inside the catalog, floats finite), answered INVALID_ARGUMENT naming the input."""
    import tritonclient.grpc as grpcclient

    g = grpcclient.InferenceServerClient(triton_stages.grpc_url)
    good = _ranking_inputs(triton_stages, pipeline, artifacts, grpcclient)
    assert g.infer("ranking", _tensors(grpcclient, good)).as_numpy("item_ids").shape == (1, 5)
    for name, bad in (("candidate_rows", 10**9), ("candidate_dense", np.nan), ("user_cont", np.inf)):
        value, dtype = good[name]
        broken = {**good, name: (np.full_like(value, bad), dtype)}
        with pytest.raises(InferenceServerException, match=name) as info:
            g.infer("ranking", _tensors(grpcclient, broken))
        assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"


def test_scenes_and_experiments_through_the_ensemble(triton, pipeline, artifacts, cfg):
    """Scenes and the A/A layer of the test config through the real server: the lists equal the in-process ones, the
    response carries the hashed (or forced) arm, bad scene / context / arm requests get an error naming the field,
    and the scene, arm and context counters move by exactly the requests sent."""
    from runtime.strategy import Strategy

    st = Strategy(cfg.serve)
    table = np.load(verified_path(artifacts / "serving", "item_table.npz"))
    context = [int(table["item_ids"][r]) for r in table["popular_rows"][:2]]
    users = _users(artifacts, 4)
    before = _settled(triton)
    with RecommenderClient(triton.grpc_url) as c:
        for u in users:
            home = c.recommend(u, k=5)
            assert home.experiment == {"ranking": st.label(int(st.assign(np.array([u]))[0])).split("=")[1]}
            for scene in ("item_detail", "cart"):
                served = c.recommend(u, k=5, scene=scene, context_item_ids=context)
                np.testing.assert_array_equal(served.item_ids,
                                              pipeline.recommend([u], 5, scene=scene, context_item_ids=context)[0][0])
                assert not set(served.item_ids.tolist()) & set(context)
        assert c.recommend(users[0], k=5, force_arms={"ranking": "b"}).experiment == {"ranking": "b"}
        revenue = c.recommend(users[0], k=5, blend=[0.0, 0.0, 1.0])  # expected revenue: pCTR * pCVR * price
        np.testing.assert_array_equal(revenue.item_ids, pipeline.recommend([users[0]], 5, blend=[0.0, 0.0, 1.0])[0][0])
        assert len(c.recommend(users[0], k=5, scene="item_detail", context_item_ids=[-5]).item_ids) == 5  # unknown: ignored
        for kwargs, message in (({"scene": "checkout"}, r"scene must be one of \['home', 'item_detail', 'cart'\]"),
                                ({"scene": "cart", "context_item_ids": list(range(1, 52))}, "context_item_ids: at most 50"),
                                ({"force_arms": "ranking=c"}, "force_arms: layer 'ranking' has no arm 'c'"),
                                ({"blend": [50.0, 0.0, 0.0]}, r"blend must be 3 weights .* each in \[0, 10\]")):
            with pytest.raises(InferenceServerException, match=message) as err:
                c.recommend(users[0], k=5, **kwargs)
            assert "INVALID_ARG" in str(err.value.status())
        assert len(c.recommend(users[0], k=5).item_ids) == 5  # the server stays up
    after = _settled(triton)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    n = len(users)
    # the cpu profile's one model checks every step's inputs before any step runs, so the requests refused (the bad
    # blend included, which top-k reads) count nowhere: home = n + the forced arm, the revenue blend and the last one
    assert delta('shoprec_scene_requests_total{scene="home"}') == n + 3
    assert delta('shoprec_scene_requests_total{scene="item_detail"}') == n + 1
    assert delta('shoprec_scene_requests_total{scene="cart"}') == n
    assert delta('shoprec_arm_requests_total{arm="a",layer="ranking"}') + delta(
        'shoprec_arm_requests_total{arm="b",layer="ranking"}') == 3 * n + 4
    assert delta("shoprec_context_items_total") == 2 * 2 * n + 1 and delta("shoprec_context_items_unknown_total") == 1
    assert delta('shoprec_route_candidates_total{route="similar"}') > 0
    assert delta('shoprec_route_candidates_total{route="copurchase"}') >= 0
    assert delta('shoprec_served_route_items_total{route="similar"}') > 0
