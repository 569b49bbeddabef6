"""The step graph's contracts on the tiny exported bundle (conftest), run on every compute device.

`DEVICES` is the one switch: "cuda" runs the same tests on a GPU machine. Without a usable GPU path
the cuda case checks the other half of the contract: asking a step for a GPU fails at load with a
message naming the missing piece, never a silent CPU fallback.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime.pipeline import Pipeline
from runtime.steps import Bundle, CandidateFeatures, check_outputs, load_step, merge_requests
from shoprec import contract
from shoprec.device import faiss_gpu_available, has_cuda
from shoprec.manifest import ArtifactError, write_manifest

DEVICES = ["cpu", "cuda"]


def _ort_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def gpu_path(step: contract.Step) -> bool:
    """Whether this machine can run the step on a GPU: what its class needs for a cuda instance."""
    if step.impl == "OnnxStep":
        return has_cuda() and _ort_cuda()
    if step.impl == "Retrieval":
        return faiss_gpu_available()
    return True  # light steps run on the host whatever the instance kind


def _request(pipeline, n=6):
    users = pipeline.steps["feature_transform"].store.user_id[:n]
    return pipeline.request(users, 10, hour=20, weekday=3, client_device="mobile")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", [s for s in contract.STEPS if s.gpu_kind == "KIND_GPU"], ids=lambda s: s.name)
def test_gpu_steps_match_cpu_or_refuse_clearly(step, device, artifacts, cfg, pipeline):
    """Outputs on `device` equal the cpu step's (within fp tolerance); a device without the GPU path refuses at load."""
    bundle = Bundle(artifacts / "serving")
    tensors = pipeline.rank(_request(pipeline))
    inputs = {t.name: tensors.get(t.name) for t in step.inputs}
    if device == "cuda" and not gpu_path(step):
        with pytest.raises(RuntimeError, match="GPU but (FAISS has no GPU support|ONNX Runtime has no CUDA provider)"):
            load_step(step, bundle, cfg.serve, device="cuda")
        return
    impl = load_step(step, bundle, cfg.serve, device=device)
    got = impl.run(dict(inputs))
    check_outputs(step, got, impl.sizes, len(inputs[step.inputs[0].name]))
    for t, out in zip(step.outputs, got):
        np.testing.assert_allclose(out, tensors[t.name], rtol=1e-3, atol=1e-4, err_msg=f"{step.name}.{t.name} on {device}")


@pytest.mark.parametrize("device", DEVICES)
def test_training_device_is_what_was_asked(device):
    from shoprec.device import torch_device

    if device == "cuda" and not has_cuda():
        with pytest.raises(RuntimeError, match="--device cuda was asked for but torch sees no CUDA device"):
            torch_device("cuda")
    else:
        assert torch_device(device) == device


def test_every_step_output_is_checked_against_the_graph(pipeline):
    tensors = pipeline.rank(_request(pipeline, 3))
    step = contract.STEP_BY_NAME["candidate_features"]
    outputs = (tensors["item_cat"], tensors["item_cont"])
    check_outputs(step, outputs, pipeline.sizes, 3)
    with pytest.raises(RuntimeError, match=r"candidate_features: output item_cont is float64\[3, \d+, \d+\]"):
        check_outputs(step, (outputs[0], outputs[1].astype(np.float64)), pipeline.sizes)
    with pytest.raises(RuntimeError, match=r"output item_cat is int64\[3, \d+, 1\], the graph declares INT64\[batch, \d+, \d+\]"):
        check_outputs(step, (outputs[0][..., :1], outputs[1]), pipeline.sizes)


@pytest.mark.parametrize("profile,models", [("cpu", ["pipeline"]), ("cpu-stages", ["user_features", "candidates", "ranking"])])
def test_fused_cpu_profiles_serve_what_the_graph_serves(artifacts, cfg, pipeline, profile, models):
    fused = Pipeline(artifacts / "serving", cfg=cfg.serve, profile=profile)
    assert [s.name for s in fused.graph] == models
    users = pipeline.steps["feature_transform"].store.user_id[:8]
    for a, b in zip(pipeline.recommend(users, 10, hour=9), fused.recommend(users, 10, hour=9)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
        assert a[2] == b[2]


def test_the_graph_declares_what_the_repository_and_pipeline_run(pipeline):
    assert [s.name for s in pipeline.graph] == [s.name for s in contract.STEPS]
    assert contract.STEPS[0].inputs[0] == contract.USER_ID
    # cold_start, degraded, the experiment arms and the bundle version come from the feature step, the lists from
    # the last step
    from_features = {contract.COLD_START, contract.DEGRADED, contract.EXPERIMENT, contract.SERVED_VERSION}
    assert set(contract.STEPS[-1].outputs) == set(contract.RESPONSE_OUTPUTS) - from_features
    assert from_features <= set(contract.STEPS[0].outputs)
    produced = {t.name for t in contract.REQUEST_INPUTS}
    for step in contract.STEPS:  # every input is a request input or an earlier step's output
        missing = [step.graph_name(t.name) for t in step.inputs if step.graph_name(t.name) not in produced]
        assert not missing, f"{step.name} reads {missing} before any step writes them"
        produced |= {step.graph_name(t.name) for t in step.outputs}
    assert {t.name for t in contract.RESPONSE_OUTPUTS} <= produced


def test_a_bundle_whose_dims_disagree_with_its_models_is_refused_at_load(artifacts, cfg, tmp_path):
    bundle = tmp_path / "serving"
    shutil.copytree(artifacts / "serving", bundle)
    dims = json.loads((bundle / "contract.json").read_text())
    dims["user_cont_dim"] += 1
    (bundle / "contract.json").write_text(json.dumps(dims))
    write_manifest(bundle)
    with pytest.raises(ArtifactError, match=r"user_tower.onnx: input user_cont has shape .*contract.json says"):
        Pipeline(bundle, cfg=cfg.serve)


def test_candidate_rows_outside_the_table_fail_the_batch(artifacts, cfg):
    step = CandidateFeatures(contract.STEP_BY_NAME["candidate_features"], Bundle(artifacts / "serving"), cfg.serve)
    n = len(step.item_cat)
    step.run({"candidate_rows": np.array([[0, -1]])})  # -1: documented padding
    for bad in (n, -2):
        with pytest.raises(ValueError, match=f"candidate row {bad} outside the item table"):
            step.run({"candidate_rows": np.array([[0, bad]])})


def test_requests_of_different_widths_batch_padded_with_the_same_answers(pipeline):
    """Triton batches retrieval's variable-width inputs (history, unavailable items, context) whatever their widths
    (allow_ragged_batch); the adapter pads them into one batch, and each user's candidates are what they are alone."""
    step = contract.profile_step("cpu-stages", "candidates")
    ragged = {t.name for t in step.inputs if t.pad is not None}
    assert ragged == {"history_rows", "history_kinds", "unavailable_rows", "context_rows"}
    store = pipeline.steps["feature_transform"].store
    users = store.user_id[store.arrays["activity"] > 0]
    impl = pipeline.steps["retrieval"]
    alone, widths = [], set()
    for u in users[:40]:
        t = pipeline.run(pipeline.request([int(u)], 10), stop="retrieval")
        inputs = impl.check({x.name: t.get(x.name) for x in contract.STEP_BY_NAME["retrieval"].inputs})
        if inputs["history_rows"].shape[1] in widths:
            continue
        widths.add(inputs["history_rows"].shape[1])
        alone.append((inputs, impl.run(inputs)))
    assert len(alone) >= 3  # histories of different lengths
    alone[1][0]["context_rows"] = np.array([[int(alone[0][1][0][0, 0]), -1, -1]])  # one request has context items
    alone[1] = (alone[1][0], impl.run(alone[1][0]))
    # another was read while two items were out of stock: they are unavailable to its user only
    gone = alone[2][1][0][0, :2]
    alone[2][0]["unavailable_rows"] = np.array([[int(gone[0]), -1, int(gone[1])]])
    alone[2] = (alone[2][0], impl.run(alone[2][0]))
    assert not set(gone.tolist()) & set(alone[2][1][0][0].tolist())
    batch = merge_requests(step, [a[0] for a in alone])
    assert batch["history_rows"].shape == (len(alone), max(widths)) and batch["unavailable_rows"].shape[1] == 3
    together = impl.run(batch)
    for i, (_, outputs) in enumerate(alone):
        for a, b in zip(outputs, together):
            np.testing.assert_array_equal(a[0], b[i])


def test_the_ranker_runs_a_large_batch_in_chunks_with_the_same_outputs(pipeline, monkeypatch):
    """On CPU the ranker step runs a batch a few users at a time (its declaration's cpu_chunk_rows candidate rows, to
    keep its attention tensors in cache): the outputs are those of one run over the whole batch, bit for bit."""
    assert contract.STEP_BY_NAME["ranker"].cpu_chunk_rows > 0 and contract.STEP_BY_NAME["user_tower"].cpu_chunk_rows == 0
    store = pipeline.steps["feature_transform"].store
    users = store.user_id[store.arrays["activity"] > 0][:7]
    t = pipeline.run(pipeline.request(users, 10), stop="ranker")
    impl = pipeline.steps["ranker"]
    inputs = impl.check({x.name: t.get(x.name) for x in contract.STEP_BY_NAME["ranker"].inputs})
    n = inputs["item_cat"].shape[1]
    whole = impl.session.run(None, {k: inputs[k] for k in impl.inputs})
    assert impl.chunk_rows == contract.STEP_BY_NAME["ranker"].cpu_chunk_rows
    monkeypatch.setattr(impl, "chunk_rows", 2 * n)  # 7 users: runs of 2, 2, 2 and 1
    calls = []
    run = impl.session.run
    monkeypatch.setattr(impl, "session", type("S", (), {"run": lambda self, o, f: calls.append(len(f["item_cat"])) or run(o, f)})())
    chunked = impl.run(inputs)
    assert calls == [2, 2, 2, 1]
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)


def test_unknown_step_class_is_refused(artifacts, cfg):
    step = contract.Step("nope", (), (), "NoSuchStep", "KIND_CPU")
    with pytest.raises(ValueError, match="impl 'NoSuchStep' is not a StepImpl"):
        load_step(step, Bundle(artifacts / "serving"), cfg.serve)


def test_adding_a_step_is_one_class_and_one_graph_entry(artifacts, cfg, pipeline, monkeypatch, tmp_path):
    """The README's claim, exercised: a step that reverses the ranking, added with a class and an entry,
    appears in both profiles' configs and the ensemble, and the in-process pipeline runs it."""
    import dataclasses

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    import runtime.steps as steps_module
    from serving import repository

    class Reverse(steps_module.StepImpl):
        def run(self, t):
            return (-t["ranking_scores"],)

    reversed_scores = contract.Tensor("reversed_scores", "FP32", ("num_candidates",))
    entry = contract.Step("reverse", (contract.RANKING_SCORES,), (reversed_scores,), "Reverse", "KIND_CPU")
    rewired = dataclasses.replace(contract.STEP_BY_NAME["topk"], wiring=(("ranking_scores", "reversed_scores"),))
    monkeypatch.setattr(steps_module, "Reverse", Reverse, raising=False)
    monkeypatch.setattr(contract, "STEPS", (*contract.STEPS[:-1], entry, rewired))
    with pytest.raises(ValueError, match="fusion 'ranking'.* are not adjacent steps of the cpu-stages graph"):
        contract.profile_steps("cpu-stages")  # the step lands inside a fused group: the profile says so, not silently
    monkeypatch.setitem(contract.FUSION, "cpu-stages",
                        (*contract.STAGE_FUSION[:-1], ("ranking", ("ranker", "reverse", "topk"))))
    assert contract.profile_steps("cpu")[0].parts[-2:] == ("reverse", "topk")  # the whole graph, whatever it holds

    repository.generate(tmp_path)
    cfg_text = (tmp_path / "gpu" / "reverse" / "config.pbtxt").read_text()
    assert text_format.Parse(cfg_text.split("\n", 1)[1], mc.ModelConfig()).output[0].name == "reversed_scores"
    for profile in contract.PROFILES:
        ens = text_format.Parse((tmp_path / profile / "recommender" / "config.pbtxt").read_text().split("\n", 1)[1],
                                mc.ModelConfig())
        if profile == "gpu":
            assert [s.model_name for s in ens.ensemble_scheduling.step][-2:] == ["reverse", "topk"]
            assert ens.ensemble_scheduling.step[-1].input_map["ranking_scores"] == "reversed_scores"
        else:  # fused: the new step runs inside the cpu profiles' last model
            assert [s.model_name for s in ens.ensemble_scheduling.step][-1] == ("pipeline" if profile == "cpu" else "ranking")

    users = pipeline.steps["feature_transform"].store.user_id[:4]
    normal = pipeline.recommend(users, pipeline.max_k)
    for profile in (None, "cpu", "cpu-stages"):  # the graph step by step, and the cpu profiles' fused models
        reversed_ = Pipeline(artifacts / "serving", cfg=cfg.serve, profile=profile).recommend(users, pipeline.max_k)
        _assert_reversed(normal, reversed_)


def _assert_reversed(normal, reversed_):
    for (ids, scores, _), (rev_ids, rev_scores, _) in zip(normal, reversed_):
        assert set(ids) == set(rev_ids) and len(ids) > 1
        np.testing.assert_allclose(np.sort(rev_scores), np.sort(-scores), rtol=1e-6)
        assert ids[-1] == rev_ids[0]  # the worst of the normal list leads the reversed one


def test_bundle_arrays_are_mapped_read_only_and_equal_what_numpy_reads(artifacts):
    """Instances of a model map the bundle's arrays from the page cache instead of each holding a copy; the
    arrays are the file's, read-only (a step that wrote into one would fail here, not corrupt a neighbour)."""
    bundle = Bundle(artifacts / "serving")
    for key in ("user_store", "item_table", "cf_all", "scene_routes"):
        mapped = bundle.npz(key)
        with np.load(artifacts / "serving" / contract.BUNDLE_FILES[key], allow_pickle=False) as z:
            assert sorted(mapped) == sorted(z.files)
            for name in z.files:
                want = z[name]
                got = mapped[name]
                assert type(got) is np.ndarray and got.dtype == want.dtype and got.shape == want.shape, (key, name)
                np.testing.assert_array_equal(got, want)
                assert not got.flags.writeable or got.size == 0, (key, name)
    embeddings = bundle.npy("item_embeddings")
    assert not embeddings.flags.writeable and isinstance(embeddings.base, np.memmap)
