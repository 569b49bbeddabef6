"""The serving benchmark's parts against real components: perf_analyzer (the 2.51 wheel's binary)
driving the real tritonserver, the FastAPI baseline answering what the pipeline answers, and the
probe ensemble loading and serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.serving_bench import input_data
from benchmarks.serving_load import probe_repository, run_perf_analyzer


@pytest.fixture(scope="module")
def requests_file(artifacts, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "input.json"
    users = input_data(artifacts, path, n=40)
    return path, users


def _recommender_successes(server) -> int:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("recommender", as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_drives_the_ensemble(triton, requests_file, protocol):
    path, users = requests_file
    assert json.loads(path.read_text())["data"][0] == {"user_id": [int(users[0])], "k": [10]}
    before = _recommender_successes(triton)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    row = run_perf_analyzer(url, protocol, 2, path, 60)
    assert row["throughput_rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    for _ in range(100):  # a request's statistics can be recorded after its response reached the client
        if _recommender_successes(triton) - before >= 60:
            break
        time.sleep(0.05)
    assert _recommender_successes(triton) - before >= 60  # the requests really reached the ensemble


def test_fastapi_baseline_answers_like_the_pipeline(artifacts, pipeline, requests_file, monkeypatch):
    from fastapi.testclient import TestClient

    import benchmarks.fastapi_app as app_module

    monkeypatch.setenv("SHOPREC_ARTIFACTS", str(artifacts))
    monkeypatch.setattr(app_module, "_pipeline", None)
    _, users = requests_file
    with TestClient(app_module.app) as client:
        assert client.get("/v2/models/recommender").json()["inputs"][0]["name"] == "user_id"
        assert client.get("/v2/models/recommender/config").json()["max_batch_size"] == 64
        for user in users[:5]:
            body = {"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [int(user)]},
                               {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [7]}]}
            out = {o["name"]: o for o in client.post("/v2/models/recommender/infer", json=body).json()["outputs"]}
            ids, scores, cold = pipeline.recommend([user], 7)[0]
            assert out["item_ids"]["data"] == ids.tolist()
            np.testing.assert_allclose(out["scores"]["data"], scores, rtol=1e-6)
            assert out["cold_start"]["data"] == [cold]
        bad_k = {"inputs": [{"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [1]},
                            {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [0]}]}
        r = client.post("/v2/models/recommender/infer", json=bad_k)
        assert r.status_code == 400 and "k must be >= 1" in r.json()["detail"]
        r = client.post("/v2/models/recommender/infer", json={"inputs": bad_k["inputs"][1:]})
        assert r.status_code == 400 and "missing input 'user_id'" in r.json()["detail"]
        r = client.post("/v2/models/recommender/infer", content=b"{not json")
        assert r.status_code == 400


def test_probe_ensemble_serves(artifacts, cfg, requests_file, tmp_path):
    from serving.launcher import TritonServer, free_port

    path, _ = requests_file
    with TritonServer(probe_repository(tmp_path / "probe"), artifacts, free_port(), free_port(), free_port(),
                      log_path=tmp_path / "probe.log") as probe:
        row = run_perf_analyzer(probe.grpc_url, "grpc", 1, path, 30, model="probe")
    assert row["throughput_rps"] > 0 and row["p50_ms"] > 0


def test_online_bench_ingestion_replays_the_held_out_events(artifacts, tmp_path):
    """The ingestion part of benchmarks/online_bench.py on the test artifacts: every event accepted through
    the Python API and through `shoprec events`, the same ids again all skipped."""
    from benchmarks.online_bench import part_ingest, replay_events
    from serving.online import RedisServer

    events = replay_events(artifacts)[:1500]
    server = RedisServer(tmp_path / "redis").start()
    try:
        out = part_ingest(artifacts, server.url, events, tmp_path)
    finally:
        server.stop()
    assert out["accepted"] == len(events) and out["duplicates_on_replay"] == 1000
    assert (out["cli_summary"]["accepted"], out["cli_summary"]["rejected"]) == (len(events), 0)
    assert out["api_events_per_s"] > 0 and out["bytes_per_live_user"] > 0


def test_synthetic_ceiling_redraws_the_generators_truth(artifacts):
    """The oracle reads the latent preferences `generate` drew (redrawn from the seed): if the redraw were
    wrong it would not beat popularity. The estimate rows read the same users' train positives."""
    from benchmarks.synthetic_ceiling import CLICK_MODEL_SMOOTH, ESTIMATES, measure

    r = measure(artifacts)["results"]
    ndcg = {k: v["ndcg@10"]["mean"] for k, v in r.items()}
    assert ndcg["oracle"] > 1.5 * ndcg["popularity"] and ndcg["oracle_category"] > ndcg["popularity"]
    click_model = {f"history_click_model{cells}_smooth{a}" for a in CLICK_MODEL_SMOOTH for cells in ("", "_cells")}
    assert all(ndcg[k] > ndcg["popularity"] for k in click_model)
    assert set(ESTIMATES) | click_model <= set(r)
    assert r["best_history"]["which"] in set(ESTIMATES) | click_model  # the told-the-shift rows are not in it
    told = {k for k in r if k.startswith("history_after_shift")}
    assert len(told) == 5 and "oracle_revealed" in r  # one per smoothing of the grid
    only = measure(artifacts, only=("oracle_revealed",))["results"]
    assert set(only) == {"popularity", "oracle_revealed"} and only["oracle_revealed"] == r["oracle_revealed"]
    with pytest.raises(SystemExit, match="--only oracle_reveald: no such system"):
        measure(artifacts, only=("oracle_reveald",))


def test_synthetic_ceiling_reads_price_tier_and_brands_from_the_positives():
    import pandas as pd

    from benchmarks.synthetic_ceiling import _price_and_brands

    items = {"rel_price": np.array([1.0, -1.0, 2.0, 0.5]), "brand": np.array([7, 3, 3, 9])}
    pos = pd.DataFrame({"user_id": [10, 10, 10, 20, 99], "item_row": [1, 2, 2, 3, 0]})
    got = _price_and_brands(pos, np.array([10, 20, 30]), items)
    np.testing.assert_allclose(got.tier, [(-1 + 2 + 2) / 4, 0.5 / 2, 0.0])  # one pseudo-click at 0; 99 not evaluated
    np.testing.assert_array_equal(got.fav_brands, [[3, 3], [9, 9], [-1, -1]])  # brand 3 clicked 3 times: both slots


def test_synthetic_ceiling_cell_prior_is_the_mean_taste_of_users_alike():
    import pandas as pd

    from benchmarks.synthetic_ceiling import _cell_prior

    cat = np.array([0, 1, 2])
    pos = pd.DataFrame({"user_id": [1, 1, 2, 3], "item_row": [0, 1, 1, 2], "session_id": [5, 5, 6, 7],
                        "ts": [10, 11, 12, 13]})
    users = pd.DataFrame({"user_id": [1, 2, 3, 4, 5], "age": [30, 30, 40, 30, 50], "region": ["a", "a", "a", "a", "b"]})
    got = _cell_prior(pos, np.array([4, 3, 5]), users, cat, 3)
    np.testing.assert_allclose(got, [[0.25, 0.75, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])  # 5's cell: nobody, uniform


def test_reliability_short_form_fuzz_and_soak(artifacts):
    """The CI form of benchmarks/reliability.py: malformed requests over both protocols and a short soak on a
    real server. gRPC answers every malformation with a client error (or a list, for extreme but valid ids),
    valid requests in between are all answered, and the server is up at the end."""
    from benchmarks.reliability import markdown, run

    r = run(artifacts, n_fuzz=100, soak_s=10, concurrency=8)
    assert r["alive_after_fuzz"] and r["alive_after_soak"]
    for proto in ("grpc_fuzz", "http_fuzz"):
        assert r[proto]["valid_failed"] == 0 and r[proto]["valid_answered"] == 10
        assert not any("no answer" in o for o in r[proto]["cases"].values())
    grpc = r["grpc_fuzz"]["cases"]
    assert all(set(o) == {"client error"} for name, o in grpc.items() if not name.startswith("user_id int64")), grpc
    http = r["http_fuzz"]["cases"]  # through the validating front: every malformation is the client's error
    assert all(set(o) == {"client error"} for o in http.values()), http
    assert r["soak"]["failed"] == 0 and r["soak"]["answered"] > 0
    # answers without outputs (asked again by the client): one in a CI run's 10 s soak, none in the committed 600 s one
    assert r["soak"]["incomplete_answers"] <= r["soak"]["answered"] // 100, r["soak"]
    text = markdown({**r, "command": "python -m benchmarks.reliability --fuzz 100 --soak-s 10", "machine": "CI"})
    assert "{" not in text and f"{r['soak']['incomplete_answers']} answers without outputs" in text


def test_build_cost_serve_probe_serves_full_unseen_lists(artifacts, tmp_path):
    """The build-cost report's serve stage: the real server started on the export, its processes' memory summed,
    every user's list full and free of their seen items."""
    import shutil

    from benchmarks.build_cost import serve_probe

    probe = tmp_path / "artifacts"
    shutil.copytree(artifacts, probe, symlinks=True, ignore=shutil.ignore_patterns("triton", "online"))  # not the live server state
    out = serve_probe(probe, requests=8)
    assert out["requests"] == out["full_lists"] == 8 and out["seen_items_served"] == 0
    assert out["server_processes"] >= 3 and out["server_rss_gb_ready"] > 0 and out["p99_ms"] >= out["p50_ms"] > 0
    assert json.loads((probe / "serve_probe.json").read_text()) == out


def test_build_cost_reruns_some_stages_and_keeps_the_other_rows(tmp_path):
    from benchmarks.build_cost import main

    results = tmp_path / "results"
    results.mkdir()
    earlier = {"stage": "train", "wall_s": 1.0, "peak_rss_gb": 1.0, "cpu_s": 1.0, "exit_code": 0}
    (results / "build_cost_tiny.json").write_text(json.dumps({"stages": [earlier]}))
    main(["--size", "tiny", "--artifacts", str(tmp_path / "a"), "--results", str(results), "--stages", "data"])
    report = json.loads((results / "build_cost_tiny.json").read_text())
    assert [r["stage"] for r in report["stages"]] == ["data", "train"] and report["stages"][1] == earlier
    assert report["stages"][0]["exit_code"] == 0 and report["stages"][0]["peak_rss_gb"] > 0
    assert (tmp_path / "a" / "data" / "raw" / "items.parquet").exists()


def test_two_tower_step_times_the_dense_and_the_sparse_item_table(artifacts, tmp_path):
    from benchmarks.two_tower_step import main

    report = main(["--artifacts", str(artifacts), "--tag", "t", "--steps", "2", "--rounds", "1", "--results", str(tmp_path)])
    assert [r["item_ids"] for r in report["runs"]] == ["dense", "sparse"]
    assert all(r["ms_per_step"] > 0 and np.isfinite(r["loss"]) for r in report["runs"])
    assert json.loads((tmp_path / "two_tower_step_t.json").read_text()) == report


def test_step_cost_times_the_fused_model_with_top_k_both_ways(artifacts):
    from benchmarks import step_cost

    report = step_cost.run(artifacts, users=40, rounds=2, batches=(1,), fused=True)
    fused = report["fused_ms_per_request_batch16"]
    assert set(fused) == {"top-k in one call", "top-k request by request"} and all(v > 0 for v in fused.values())
    assert report["total_ms"] > 0


def test_in_process_floor_times_batches_of_distinct_users(artifacts):
    from benchmarks.serving_bench import BATCHES, in_process_floor, warm_users

    floor = in_process_floor(artifacts, np.asarray(warm_users(artifacts)[:20]))
    assert floor["requests"] == 40 and floor["p50_ms"] > 0
    assert all(floor[f"batch{b}_ms_per_request"] > 0 for b in BATCHES) and max(BATCHES) == 16  # 20 users: 2 batches


def test_graph_cost_runs_the_fused_graph_at_each_batch_alone_and_side_by_side(artifacts, tmp_path):
    from benchmarks.graph_cost import main

    report = main(["--artifacts", str(artifacts), "--users", "24", "--batches", "1", "4", "--processes", "1", "2",
                   "--rounds", "1", "--seconds", "0.2", "--results", str(tmp_path), "--tag", "t"])
    assert [(r["batch"], r["processes"]) for r in report["rows"]] == [(1, 1), (4, 1), (1, 2), (4, 2)]
    for r in report["rows"]:
        assert r["cpu_ms_per_user"] > 0 and r["machine_ms_per_user"] == pytest.approx(
            r["wall_ms_per_user_per_process"] / r["processes"], rel=1e-3)
    assert json.loads((tmp_path / "graph_cost_t.json").read_text()) == report
    assert "| 4 | 2 |" in (tmp_path / "graph_cost_t.md").read_text()


def test_retrieval_tail_reports_each_users_time_against_their_history(artifacts, tmp_path):
    from benchmarks.retrieval_tail import main

    report = main(["--artifacts", str(artifacts), "--users", "30", "--repeats", "1", "--tag", "t", "--out", str(tmp_path),
                   "--power-users", "40"])
    ms = [report["ms"][p] for p in ("p50", "p90", "p99", "p100")]
    assert report["users"] == 30 and 0 < ms[0] <= ms[1] <= ms[2] <= ms[3]
    assert report["slowest"][0]["ms"] == ms[3] and sum(b["users"] for b in report["by_history"]) == 30
    assert json.loads((tmp_path / "retrieval_tail_t.json").read_text()) == report
    assert "| retrieval ms |" in (tmp_path / "retrieval_tail_t.md").read_text()
    power = report["power_users"]
    assert [p["history"] for p in power] == [40] and power[0]["users"] == 20 and 0 < power[0]["median_ms"] <= power[0]["max_ms"]
    assert 0 < power[0]["by_category_median_ms"] <= power[0]["by_category_max_ms"]


def test_serving_rounds_are_summarised_by_their_median():
    from benchmarks.serving_bench import median_rows

    def row(rps, p50, cpu, batch):
        return {"concurrency": 16, "requests": 6400, "throughput_rps": rps, "p50_ms": p50,
                "cpu_ms_per_request": {"tritonserver": cpu}, "steps": {"ranking": {"queue_us": cpu, "avg_batch": batch}}}

    got = median_rows([[row(300.0, 50.0, 1.0, 3.0)], [row(200.0, 70.0, 3.0, 5.0)], [row(250.0, 60.0, 2.0, 4.0)]])
    assert got == [{"concurrency": 16, "requests": 6400, "throughput_rps": 250.0, "p50_ms": 60.0,
                    "cpu_ms_per_request": {"tritonserver": 2.0}, "steps": {"ranking": {"queue_us": 2.0, "avg_batch": 4.0}},
                    "rounds_throughput_rps": [300.0, 200.0, 250.0], "rounds_p50_ms": [50.0, 70.0, 60.0]}]


def test_serving_targets_compare_within_each_round():
    """The machine drifts between rounds: each round's Triton figure is compared with the same round's FastAPI and
    in-process ones, and the target is judged on the median of those ratios, not on a ratio of medians."""
    from benchmarks.serving_report import summarise

    def level(c, rps, p50):
        return {"concurrency": c, "throughput_rps": float(np.median(rps)), "p50_ms": float(np.median(p50)),
                "rounds_throughput_rps": rps, "rounds_p50_ms": p50, "cpu_ms_per_request": {}}

    report = {"catalog_items": 100_000, "concurrency": [1, 16],
              "in_process": {"p50_ms": 5.0, "rounds_p50_ms": [5.1, 5.0, 4.3]},
              "probe": {"c1": {"p50_ms": 0.5}, "c16": {"throughput_rps": 6000.0}},
              "targets": {"triton-grpc": [level(1, [110.0, 130.0, 150.0], [9.2, 7.3, 6.6]),
                                          level(16, [460.0, 480.0, 530.0], [33.0, 32.0, 30.0])],
                          "triton-http": [level(1, [1.0] * 3, [9.0] * 3), level(16, [450.0] * 3, [35.0] * 3)],
                          "fastapi-http": [level(1, [150.0] * 3, [6.3] * 3), level(16, [300.0, 310.0, 275.0], [51.0] * 3)]}}
    got = summarise(report)
    assert got["rounds_triton_grpc_p50_c1_over_in_process_p50"] == [1.8, 1.46, 1.53]
    assert got["triton_grpc_p50_c1_over_in_process_p50"] == 1.53  # 7.3 / 5.0 = 1.46 as a ratio of medians
    assert got["target_latency_met"] is False
    assert got["rounds_triton_grpc_over_fastapi_throughput_c16"] == [1.53, 1.55, 1.93]
    assert got["triton_grpc_over_fastapi_throughput_c16"] == 1.55


def test_a_level_that_hangs_is_reported_and_the_rest_of_the_sweep_kept(monkeypatch):
    """A perf_analyzer run that gives no result (a hung connection at one level) costs that target its higher
    levels, not the run: the levels measured are kept, the failure is in the report, and a ratio that needs the
    missing level is None with its target not met."""
    import subprocess

    from benchmarks import serving_bench, serving_load
    from benchmarks.serving_report import markdown, summarise

    tries = {}

    def fake_run(cmd, **kw):
        c = int(cmd[cmd.index("--concurrency-range") + 1])
        tries[c] = tries.get(c, 0) + 1
        if c == 16 or (c == 4 and tries[c] == 1):  # 4 hangs once, 16 twice
            raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=b"Request concurrency: 16")
        Path(cmd[cmd.index("-f") + 1]).write_text(
            "Concurrency,Inferences/Second,Avg latency,p50 latency,p90 latency,p95 latency,p99 latency\n"
            f"{c},100,{5000 * c},{5000 * c},6000,7000,8000\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(serving_load.subprocess, "run", fake_run)
    monkeypatch.setattr(serving_load, "_perf_analyzer", lambda: ("perf_analyzer", {}))
    monkeypatch.setattr(serving_bench, "process_cpu", lambda pgid: {})
    monkeypatch.setattr(serving_bench, "_cpu_per_request", lambda a, b, n: {})
    one: dict = {}
    serving_bench.sweep(one, "fastapi-http", "127.0.0.1:1", "http", [1, 4, 16, 32], Path("in.json"), 0)
    assert [r["concurrency"] for r in one["fastapi-http"]] == [1, 4]  # 4 on its second try
    assert [(f["concurrency"], f["attempt"]) for f in one["failed"]] == [(4, 1), (16, 1), (16, 2)]
    assert tries == {1: 1, 4: 2, 16: 2}  # 32 not tried
    assert "no result in 120 s" in one["failed"][0]["error"]  # 5x what the last level's rate says, at least 120 s

    def level(c, rps):
        return {"concurrency": c, "throughput_rps": rps, "p50_ms": 6.0, "p95_ms": 7.0, "p99_ms": 8.0, "cpu_ms_per_request": {}}

    report = {"catalog_items": 100_000, "num_candidates": 300, "concurrency": [1, 16], "command": "c", "load": "l",
              "machine": {"cpu": "x", "cores": 2}, "in_process": {"p50_ms": 5.0, "p95_ms": 6.0, "p99_ms": 7.0,
                                                                  "throughput_rps": 200.0, "batch16_ms_per_request": 2.0},
              "probe": {"c1": level(1, 2000.0), "c16": level(16, 6000.0)}, "steps": [],
              "targets": {"triton-grpc": [level(1, 150.0), level(16, 500.0)], "triton-http": [level(1, 140.0), level(16, 450.0)],
                          "fastapi-http": [level(1, 180.0)]},
              "failed_levels": [{"target": "fastapi-http", "concurrency": 16, "round": 1, "error": "hung"}]}
    got = summarise(report)
    assert got["triton_grpc_over_fastapi_throughput_c16"] is None and got["target_throughput_met"] is False
    assert got["triton_grpc_p50_c1_over_in_process_p50"] == 1.2 and got["target_latency_met"] is True
    report["summary"] = got
    assert "| fastapi-http | 16 | round 1, attempt 1: no result" in markdown(report)


def test_stub_profile_puts_each_sample_in_one_bucket():
    from benchmarks.stub_profile import bucket

    execute = "StepModel.execute (serving/triton_models.py:96)"
    run = "Fused._run (runtime/steps.py:271)"
    assert bucket([""]) == "idle"
    assert bucket(["Thread.run (threading.py:982)", "StepModel._publish_loop (serving/triton_models.py:68)"]) == "idle"
    assert bucket([execute, "StepModel.parse (serving/triton_models.py:86)"]) == "adapter"
    assert bucket([execute, "StepModel._execute (serving/triton_models.py:117)", run,
                   "Retrieval.run (runtime/steps.py:585)", "unique (numpy/lib/arraysetops.py:274)"]) == "step:Retrieval"
    assert bucket([execute, run, "OnnxStep.run (runtime/steps.py:518)", "Session.run (onnxruntime/x.py:1)"]) == "step:OnnxStep"
    # top-k answers the whole batch from Fused.run_requests, outside Fused._run: still step code
    requests = "Fused.run_requests (runtime/steps.py:317)"
    assert bucket([execute, "StepModel._execute (serving/triton_models.py:117)", requests,
                   "TopK.run_requests (runtime/steps.py:930)", "argsort (numpy/core/fromnumeric.py:1025)"]) == "step:TopK"
    assert bucket([execute, "StepModel._execute (serving/triton_models.py:117)", requests,
                   "check_outputs (runtime/steps.py:140)"]) == "step:other"


def test_a_result_names_the_command_that_made_it(tmp_path, monkeypatch):
    """Run from the shell, a benchmark records its own arguments (a tagged medium run must not read as the
    default one); called with argv, those."""
    from benchmarks.machine import command_line, write_report

    monkeypatch.setattr("sys.argv", ["idle_gap.py", "--artifacts", "/m", "--tag", "medium"])
    assert command_line("python -m benchmarks.idle_gap", None) == "python -m benchmarks.idle_gap --artifacts /m --tag medium"
    assert command_line("python -m benchmarks.idle_gap", []) == "python -m benchmarks.idle_gap"
    report = {"command": command_line("python -m benchmarks.idle_gap", None), "p50_ms": 1.5}
    write_report(tmp_path / "out", "idle_gap", "medium", report, ["# t", "| a |"])
    write_report(tmp_path / "out", "idle_gap", "", report, ["# u"])
    assert json.loads((tmp_path / "out" / "idle_gap_medium.json").read_text()) == report
    assert (tmp_path / "out" / "idle_gap_medium.md").read_text() == "# t\n| a |\n"
    assert (tmp_path / "out" / "idle_gap.md").read_text() == "# u\n"


def test_referee_variants_reshape_the_ratings_as_documented(tmp_path):
    import pandas as pd

    from benchmarks.referee_variants import make_variant

    rng = np.random.default_rng(0)
    data = tmp_path / "ml-latest-small"
    data.mkdir()
    ratings = pd.DataFrame({"userId": rng.integers(1, 41, 3000), "movieId": rng.zipf(1.6, 3000) % 200,
                            "rating": rng.integers(1, 11, 3000) / 2, "timestamp": rng.integers(10**9, 2 * 10**9, 3000)})
    ratings.to_csv(data / "ratings.csv", index=False)
    (data / "movies.csv").write_text("movieId,title,genres\n1,A (1995),Drama\n")

    dense = pd.read_csv(make_variant("whole-stars-dense", data, tmp_path / "v") / "ratings.csv")
    raters = ratings["movieId"].value_counts()
    assert set(dense["movieId"]) == set(raters[raters >= 10].index)
    assert (dense["rating"] == np.ceil(dense["rating"])).all() and dense["rating"].between(1, 5).all()
    assert len(dense) == int(ratings["movieId"].map(raters).ge(10).sum())

    whole = pd.read_csv(make_variant("whole-stars", data, tmp_path / "v") / "ratings.csv")
    pd.testing.assert_frame_equal(whole.drop(columns="rating"), ratings.drop(columns="rating"))
    assert (whole["rating"] == np.ceil(ratings["rating"])).all()

    half = make_variant("half-users", data, tmp_path / "v")
    assert half.name == "ml-latest-small" and (half / "movies.csv").exists()  # the folder the referee reads
    kept = pd.read_csv(half / "ratings.csv")
    assert kept["userId"].nunique() == ratings["userId"].nunique() // 2
    pd.testing.assert_frame_equal(kept.reset_index(drop=True),
                                  ratings[ratings["userId"].isin(kept["userId"])].reset_index(drop=True))

    copies = pd.read_csv(make_variant("users-x6", data, tmp_path / "v") / "ratings.csv")
    assert copies["userId"].nunique() == 6 * ratings["userId"].nunique()  # ids u, u + 100, ..., u + 500 (max id 40)
    original = copies[copies["userId"] % 100 == copies["userId"]]
    assert 0.75 * len(ratings) < len(original) < 0.85 * len(ratings)
    for copy_id, rows in copies.groupby(copies["userId"] // 100):  # each copy's rows: a subset of the original rows
        back = rows.assign(userId=rows["userId"] % 100)
        assert len(back.merge(ratings, how="inner")) == len(rows)
    assert not copies.duplicated(["userId", "movieId", "timestamp"]).any()

    few = ratings[ratings["userId"] <= 3].groupby("userId").head(3)  # fewer than 5 ratings: all kept
    ratings = pd.concat([ratings[ratings["userId"] > 3], few])
    ratings.to_csv(data / "ratings.csv", index=False)
    sparse = pd.read_csv(make_variant("sparse-users", data, tmp_path / "v") / "ratings.csv")
    assert len(sparse.merge(ratings, how="inner")) == len(sparse)  # a subset of the rows, ratings unchanged
    before, after = ratings.groupby("userId").size(), sparse.groupby("userId").size()
    assert (after == np.maximum(np.round(0.2 * before), np.minimum(before, 5))).all() and after.min() == 3


@pytest.mark.parametrize("variant,flavour", [("ml100k-files", "movielens-100k"), ("ml1m-files", "movielens-1m")])
def test_release_file_variants_hand_over_whole_stars_with_random_user_attributes(tmp_path, variant, flavour):
    """The ml100k/ml1m-files variants: the referee reads whole stars in ml-latest-small's ratings.csv; the product
    gets the referee's train split in the release's own files, with every film's genres and a user file whose
    attributes are drawn at random (one row per user)."""
    import pandas as pd

    from benchmarks.referee_bench import _ml_layout
    from benchmarks.referee_variants import HANDED_AS, handed_over, make_variant
    from feature_workflows.movielens import load_movielens

    data = tmp_path / "ml-latest-small"
    data.mkdir()
    rng = np.random.default_rng(1)
    ratings = pd.DataFrame({"userId": rng.integers(1, 31, 800), "movieId": rng.integers(1, 4, 800),
                            "rating": rng.integers(1, 11, 800) / 2, "timestamp": rng.integers(10**9, 2 * 10**9, 800)})
    ratings = ratings.drop_duplicates(["userId", "movieId"]).reset_index(drop=True)
    ratings.to_csv(data / "ratings.csv", index=False)
    (data / "movies.csv").write_text('movieId,title,genres\n1,"Toy Story, The (1995)",Animation|Children\n'
                                     "2,Señor|Pixel (2001),(no genres listed)\n3,Heat (1995),Action|Crime|IMAX\n")

    folder = make_variant(variant, data, tmp_path / "v")
    whole = pd.read_csv(folder / "ratings.csv")
    assert folder.name == "ml-latest-small" and (whole["rating"] == np.ceil(ratings["rating"])).all()
    split = tmp_path / "split"
    split.mkdir()
    whole.rename(columns={"userId": "user", "movieId": "item", "timestamp": "ts"})[["user", "item", "rating", "ts"]] \
        .astype({"rating": float}).to_csv(split / "train.csv", index=False)  # the referee writes ratings as floats

    handed = tmp_path / "handed"
    assert _ml_layout(HANDED_AS[variant], split, handed_over(variant, folder), handed) == flavour
    tables, _ = load_movielens(handed, flavour)
    assert len(tables["interactions"].drop_duplicates(["user_id", "item_id"])) == len(whole)
    genres = dict(zip(tables["items"]["item_id"], tables["items"]["genres"]))
    children = "Children's" if variant == "ml100k-files" else "Children"
    assert genres[1] == f"Animation|{children}" and pd.isna(genres[2])
    assert genres[3] == ("Action|Crime" if variant == "ml100k-files" else "Action|Crime|IMAX")
    users, raters = tables["users"], np.sort(whole["userId"].unique())
    extra = 0 if variant == "ml100k-files" else len(raters)  # 1M-partial's users.dat also lists users who rated nothing
    assert sorted(users["user_id"]) == [*raters, *range(raters.max() + 1, raters.max() + 1 + extra)]
    assert users[["age", "gender", "occupation", "region"]].notna().all().all()
    assert users["occupation"].nunique() > 1 and users["region"].str.fullmatch(r"zip_\d").all()


def test_paired_lists_scores_each_user_as_the_referee_does_and_refuses_two_splits(tmp_path):
    """benchmarks.paired_lists: per test user, train positives, items outside the catalog and repeats are dropped
    before the top 10; Recall@10 = hits / |test positives in the catalog|, NDCG@10 over min(10, |G|) ideal hits.
    `part="valid"` reads the valid users, their truth and their lists instead."""
    import pandas as pd

    from benchmarks.paired_lists import compare

    def run(name: str, lists: dict, users=(1, 2)):
        split = tmp_path / name / "split"
        split.mkdir(parents=True)
        pd.DataFrame({"user": [1, 1, 2], "item": [10, 11, 10], "rating": [5.0, 2.0, 4.0], "ts": 0}) \
            .to_csv(split / "train.csv", index=False)
        pd.DataFrame({"user": [1, 1, 1, 2], "item": [12, 13, 99, 14], "rating": [4.0, 5.0, 5.0, 4.0], "ts": 1}) \
            .to_csv(split / "test.csv", index=False)
        pd.DataFrame({"item": [10, 11, 12, 13, 14]}).to_csv(split / "catalog.csv", index=False)
        pd.DataFrame({"user": list(users)}).to_csv(split / "eval_users_test.csv", index=False)
        rows = [(u, item, r) for u, items in lists.items() for r, item in enumerate(items, 1)]
        pd.DataFrame(rows, columns=["user", "item", "rank"]).to_csv(tmp_path / name / "lists_test.csv", index=False)
        # valid: user 2 alone, truth {12, 13}; A lists 13 first, B lists 11 (not a positive there)
        pd.DataFrame({"user": [2, 2], "item": [12, 13], "rating": [4.0, 4.5], "ts": 1}).to_csv(split / "valid.csv", index=False)
        pd.DataFrame({"user": [2]}).to_csv(split / "eval_users_valid.csv", index=False)
        pd.DataFrame({"user": [2], "item": [13 if name == "a" else 11], "rank": [1]}) \
            .to_csv(tmp_path / name / "lists_valid.csv", index=False)
        return tmp_path / name

    # user 1: truth {12, 13} (99 is outside the catalog); 10 is a train positive, 77 not in the catalog, 13 repeated;
    # user 2: truth {14}, no list from A (scored 0)
    a = run("a", {1: [10, 77, 13, 13, 12]})
    b = run("b", {1: [12, 14], 2: [14]})
    out = compare(a, b)
    ndcg_b1 = 1 / (1 + 1 / np.log2(3))  # one hit at rank 1 of two ideal hits
    assert out["users"] == 2
    assert out["Recall@10"]["a"] == pytest.approx(0.5) and out["Recall@10"]["b"] == pytest.approx(0.75)
    assert out["NDCG@10"]["a"] == pytest.approx(0.5) and out["NDCG@10"]["b"] == pytest.approx((ndcg_b1 + 1) / 2)
    assert out["NDCG@10"]["diff"] == pytest.approx((1 - ndcg_b1 - 1) / 2)
    valid = compare(a, b, "valid")
    assert valid["part"] == "valid" and valid["users"] == 1
    assert valid["Recall@10"]["a"] == pytest.approx(0.5) and valid["Recall@10"]["b"] == 0.0
    assert valid["NDCG@10"]["a"] == pytest.approx(ndcg_b1) and valid["NDCG@10"]["diff"] == pytest.approx(ndcg_b1)
    with pytest.raises(SystemExit, match="do not hold the same split"):
        compare(a, run("c", {1: [12]}, users=(1,)))


def test_referee_bench_reads_which_data_sets_the_referee_splits(tmp_path):
    """A referee whose copy splits ml-latest-small only gets a one-line refusal for another release, before any work."""
    from benchmarks.referee_bench import main, referee_datasets

    referee = tmp_path / "referee.py"
    referee.write_text("import argparse\np = argparse.ArgumentParser()\nsub = p.add_subparsers(dest='cmd')\n"
                       "s = sub.add_parser('split')\ns.add_argument('--dataset', required=True, choices=('mlls', 'ml100k'))\n"
                       "p.parse_args()\n")
    assert referee_datasets(referee) == ["mlls", "ml100k"]
    referee.write_text(referee.read_text().replace("('mlls', 'ml100k')", "('mlls',)"))
    data = tmp_path / "movielens-100k"
    data.mkdir()
    (data / "u.data").write_text("1\t1\t5\t0\n")
    with pytest.raises(SystemExit, match=f"referee_bench: {referee} splits only mlls, not ml100k"):
        main(["--dataset", "ml100k", "--data", str(data), "--referee", str(referee), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("dataset,ratings_name,sep", [("ml100k", "u.data", "\t"),
                                                     ("ml1m-partial", "ratings_users1-2999.dat", "::")])
def test_referee_rehearsal_lays_out_a_release_as_the_referee_reads_it(tmp_path, dataset, ratings_name, sep):
    """benchmarks.referee_rehearsal: ml-latest-small's whole stars in the release's ratings file (user, item,
    integer rating, timestamp), beside the variant's item and user files, in the folder the referee names; the
    referee copy lists the release, and a referee without the known DATASETS line gets a one-line stop."""
    import pandas as pd

    from benchmarks.referee_rehearsal import referee_copy, release_folder

    data = tmp_path / "ml-latest-small"
    data.mkdir()
    rng = np.random.default_rng(2)
    ratings = pd.DataFrame({"userId": rng.integers(1, 21, 300), "movieId": rng.integers(1, 3, 300),
                            "rating": rng.integers(1, 11, 300) / 2, "timestamp": rng.integers(10**9, 2 * 10**9, 300)})
    ratings.drop_duplicates(["userId", "movieId"]).to_csv(data / "ratings.csv", index=False)
    (data / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Action|Crime\n2,Up (2009),Animation\n")
    kept = pd.read_csv(data / "ratings.csv")

    folder = release_folder(dataset, data, tmp_path / "work")
    assert folder.name == ("movielens-100k" if dataset == "ml100k" else "movielens-1m-partial")
    rows = [line.split(sep) for line in (folder / ratings_name).read_text().splitlines()]
    got = pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).astype(np.int64)
    assert got.equals(kept.assign(rating=np.ceil(kept["rating"]).astype(np.int64)).astype(np.int64))
    assert {p.name for p in folder.iterdir()} >= ({"u.item", "u.user"} if dataset == "ml100k" else {"movies.dat", "users.dat"})

    referee = tmp_path / "referee.py"
    referee.write_text('DATASETS = ("mlls",)\nPROTOCOLS = ("temporal",)\n')
    copy = referee_copy(referee, [dataset], tmp_path / "copy")
    assert copy.read_text().splitlines()[0] == f'DATASETS = ("{dataset}", "mlls")'
    with pytest.raises(SystemExit, match=f"referee_rehearsal: {copy} has no line"):
        referee_copy(copy, [dataset], tmp_path / "again")


def test_holdout_units_thins_to_whole_visits_and_switches_only_the_unit(artifacts, tmp_path):
    import pandas as pd

    from benchmarks.holdout_units import config_for, thin
    from shoprec.config import load_config

    raw = artifacts / "data" / "raw"
    info = thin(raw, tmp_path / "raw", visits=2, seed=1)
    every, kept = pd.read_parquet(raw / "interactions"), pd.read_parquet(tmp_path / "raw" / "interactions")
    per_user = kept.groupby("user_id")["session_id"].nunique()
    assert per_user.max() == 2 and info["events"] == len(kept) < len(every)
    visit = ["user_id", "session_id"]
    assert kept.groupby(visit).size().equals(every.merge(kept[visit].drop_duplicates(), on=visit).groupby(visit).size())
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(p.name for p in raw.iterdir())
    default = load_config(None)
    action = load_config(config_for("action", tmp_path / "action.toml"))
    assert (default.features.holdout_unit, action.features.holdout_unit) == ("session", "action")
    assert action.replace("features", holdout_unit="session") == default


def test_prior_periods_scores_popularity_on_the_users_train_chose_the_prior_on(artifacts, tmp_path):
    """Popularity's order on the valid-split users of `train`'s prior curve: the same users (the count is
    checked against train_report.json), the curve copied beside it, and a report written."""
    from benchmarks.prior_periods import main

    main(["--artifacts", str(artifacts), "--tag", "t", "--results", str(tmp_path), "--served"])
    r = json.loads((tmp_path / "prior_periods_t.json").read_text())
    curve = json.loads((artifacts / "models" / "train_report.json").read_text())["popularity_prior"]["valid_split_ndcg@10"]
    assert r["users"] == curve["users"] > 0
    got = r["valid_split_ndcg@10"]
    pop = got["popularity"]
    assert 0.0 <= pop["mean"] <= 1.0 and pop["se"] >= 0.0
    weights = [w for w in curve if w != "users"]
    assert set(got) == {"popularity", *(f"train's lists, w = {w}" for w in weights), *(f"served, w = {w}" for w in weights)}
    # the tiny shop's index is exact: the served pipeline scores what `train` measured on the same users
    for w in weights:
        assert got[f"served, w = {w}"]["mean"] == pytest.approx(curve[w]["mean"], abs=1e-4), w
    assert r["bundle"]["index"]["kind"] == "flat"
    assert "| popularity |" in (tmp_path / "prior_periods_t.md").read_text()
    with pytest.raises(SystemExit):
        main(["--artifacts", str(artifacts), "--tag", "t", "--results", str(tmp_path), "--bundle", str(tmp_path)])


def test_referee_bench_reads_where_trains_time_went():
    from benchmarks.referee_bench import train_seconds

    report = {"cf": {"seconds": 21.2}, "seconds": 860.8, "ranking": {"train_seconds": 3.5},
              "retrieval": {"train_seconds": 380.0}, "retrieval_stage_a": {"train_seconds": 340.8},
              "whole_history_share": {"fits": {"0.0": {"train_seconds": 76.8}, "0.5": {"train_seconds": 340.8}}}}
    assert train_seconds(report) == {"cf": 21.2, "two_tower_share_0.0": 76.8, "two_tower_share_0.5": 340.8,
                                     "two_tower_final": 380.0, "ranker": 3.5, "total": 860.8}
    assert train_seconds({"seconds": 5.0, "cf": None, "ranking": {}}) == {  # a bundle without a share choice
        "cf": None, "two_tower_final": None, "ranker": None, "total": 5.0}


def test_ranker_variants_pair_every_variant_with_the_reference_on_the_same_candidates(artifacts, cfg):
    """benchmarks.ranker_variants: stage A's lists train each variant, which re-orders the bundle's candidates for the
    evaluated users; every row is paired with the reference user by user."""
    from benchmarks.ablation import shop_evaluator
    from benchmarks.ranker_variants import CROSS, REFERENCE, SEGMENT, SERVED, TRENDING, run, with_columns
    from runtime.candidates import trending_scores

    report = run(artifacts, cfg.replace("ranking", steps=200), {"test": shop_evaluator(artifacts, per_user=True)})
    rows = report["variants"]
    assert list(rows) == [REFERENCE, "+ listwise loss", "+ deep part", "+ list-relative scores", "+ ALS score",
                          SERVED, TRENDING, CROSS, SEGMENT, "no ranker (merged candidate order)"]
    for paired in (TRENDING, SEGMENT, CROSS):
        assert rows[paired]["test"]["NDCG@10 - served"][0] == pytest.approx(
            rows[paired]["test"]["NDCG@10"][0] - rows[SERVED]["test"]["NDCG@10"][0])
    only = run(artifacts, cfg.replace("ranking", steps=50), {"test": shop_evaluator(artifacts, per_user=True)}, (SEGMENT,))
    assert list(only["variants"]) == [REFERENCE, SEGMENT, "no ranker (merged candidate order)"]
    with pytest.raises(SystemExit, match="--only served: no such variant"):
        run(artifacts, cfg, {"test": shop_evaluator(artifacts, per_user=True)}, ("served",))
    assert "NDCG@10 - reference" not in rows[REFERENCE]["test"]
    for name, row in rows.items():
        m = row["test"]
        assert 0.0 <= m["NDCG@10"][0] <= 1.0 and "per_user_ndcg@10" not in m
        if name != REFERENCE:  # the mean of the per-user differences is the difference of the means
            assert m["NDCG@10 - reference"][0] == pytest.approx(m["NDCG@10"][0] - rows[REFERENCE]["test"]["NDCG@10"][0])
    # the list-relative scores: each score feature over its largest magnitude in the list, padding left out
    from runtime.candidates import DENSE_FEATURES

    dense = np.zeros((1, 3, len(DENSE_FEATURES)), np.float32)
    dense[0, :, DENSE_FEATURES.index("cf_pos")] = [2.0, -4.0, 100.0]
    lists = {"rows": np.array([[0, 1, -1]]), "dense": dense}
    x = with_columns(lists, np.array([[7.0, 8.0, 9.0]], np.float32), relative=True)["dense"]
    assert x.shape == (1, 3, len(DENSE_FEATURES) + 4 + 1)
    np.testing.assert_allclose(x[0, :2, -4], [0.5, -1.0])  # cf_pos, the second score column
    np.testing.assert_allclose(x[0, :, -1], [7.0, 8.0, 9.0])  # the extra column last
    # the trending score at a given end: positives (kind >= 2) only, each halved per half-life of age at t_end
    score = trending_scores(np.array([0, 0, 1, 2]), np.array([7, 0, 7, 7]) * 86400, np.array([2, 3, 2, 1]), 4, 7.0, 14 * 86400)
    np.testing.assert_allclose(score, [0.75, 0.5, 0.0, 0.0])


def test_segment_affinity_is_the_category_lift_among_users_with_the_same_attributes():
    from types import SimpleNamespace

    import pandas as pd

    from benchmarks.ranker_variants import SEGMENT_PRIOR, segment_affinity

    data = SimpleNamespace(items={"category_code": np.array([0, 0, 1])})
    # two segments: users 1, 2, 5 (age 20, region a) and 3, 4, 6 (age 60, region a; two ages: not binned); 9 unknown
    table = pd.DataFrame({"user_id": [1, 2, 3, 4, 5, 6], "age": [20, 20, 60, 60, 20, 60], "region": ["a"] * 6})
    actions = pd.DataFrame({"user_id": [1, 2, 3, 9, 1], "item_row": [0, 1, 2, 2, 2], "kind": [2, 2, 2, 2, 0]})
    got = segment_affinity(data, actions, np.array([2, 4, 9]), np.array([[0, 2, -1], [2, 0, 1], [0, 1, 2]]), table)
    overall = (np.array([2, 1]) + 1) / (3 + 2)  # the segments' positives by category (not 9's, not a view), plus one
    young = (np.array([2, 0]) + SEGMENT_PRIOR * overall) / (2 + SEGMENT_PRIOR) / overall
    old = (np.array([0, 1]) + SEGMENT_PRIOR * overall) / (1 + SEGMENT_PRIOR) / overall
    np.testing.assert_allclose(got, np.log([[young[0], young[1], 1.0], [old[1], old[0], old[0]], [1.0, 1.0, 1.0]]),
                               rtol=1e-6)  # padding and unknown users: 0


def test_category_smoothing_retrains_the_ranker_per_alpha_and_pairs_it_with_the_raw_route(artifacts, cfg):
    """benchmarks.category_smoothing: per alpha the route alone, the merged candidates and a ranker retrained on lists
    built with that route; alpha 0 is the served route (the same lists and ranker as ranker_variants' served row)."""
    from benchmarks.ablation import shop_evaluator
    from benchmarks.category_smoothing import markdown, route_alone, run
    from training.data import FeatureData

    ev = shop_evaluator(artifacts, per_user=True)
    report = run(artifacts, cfg.replace("ranking", steps=200), {"test": ev}, [0.0, 10.0])
    raw, smooth = report["alphas"]["0.0"]["test"], report["alphas"]["10.0"]["test"]
    assert "NDCG@10 - alpha 0" not in raw["served"]
    assert smooth["served"]["NDCG@10 - alpha 0"][0] == pytest.approx(smooth["served"]["NDCG@10"][0] - raw["served"]["NDCG@10"][0])
    assert all("per_user_ndcg@10" not in m for m in (*raw.values(), *smooth.values()))
    assert "| 10.0 | test |" in markdown(report, {"tag": "t", "command": "c", "date": "d", "machine": "m"})
    # the route alone: 100 distinct unseen items a user; smoothing reaches outside the user's categories
    data = FeatureData(artifacts / "features")
    users = ev.users[:50]
    tops = {a: route_alone(data, users, a) for a in (0.0, 1e9)}
    train = data.actions[data.actions["split"] == 0]
    for u, t0, t1 in zip(users, tops[0.0], tops[1e9]):
        seen = set(train.loc[train["user_id"] == u, "item_row"])
        assert len(set(t1)) == 100 and not seen & set(t1)
    popular = [r for r in np.argsort(-np.asarray(data.items["popularity"], float), kind="stable")]
    first = [r for r in popular if r not in set(train.loc[train["user_id"] == users[0], "item_row"])][:10]
    assert set(tops[1e9][0][:10]) == set(first)  # all smoothing and no user: popularity


def test_referee_ndcg_per_user_drops_what_the_referee_drops():
    """Each user's NDCG@10 as referee.py scores it: items outside the catalog, train positives and repeats leave
    the list first; the ideal is min(10, |truth|) hits."""
    from types import SimpleNamespace

    import scipy.sparse as sp

    from benchmarks.ablation import _referee_ndcgs

    ids = np.array([100, 101, 102, 103, 999])  # item rows -> raw ids; 999 is outside the referee's catalog
    split = SimpleNamespace(user_index={7: 0, 8: 1}, item_index={100: 0, 101: 1, 102: 2, 103: 3},
                            X=sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0]])),  # user 7 liked item 100 in train
                            gt={"test": {0: np.array([2, 3]), 1: np.array([1])}})
    top = np.array([[0, 4, 2, 2, 3, -1], [3, 1, -1, -1, -1, -1]])
    got = _referee_ndcgs(None, split, "test", np.array([7, 8]), top, ids)
    d = 1 / np.log2(np.arange(2, 4))
    assert got == pytest.approx([1.0, d[1] / d[0]])  # user 7: 102, 103 at ranks 1-2; user 8: 101 at rank 2 of 1 ideal
