"""The committed model repository is exactly what the contract generates, and parses as Triton config."""

import filecmp
import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.repository import PROFILES, generate
from shoprec import contract
from shoprec.config import REPO_ROOT


def test_committed_repository_matches_contract(tmp_path):
    generate(tmp_path)
    committed = REPO_ROOT / "model_repository"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            rel = path.relative_to(tmp_path)
            assert (committed / rel).is_file(), f"{rel} missing: run `make repository`"
            assert filecmp.cmp(path, committed / rel, shallow=False), f"{rel} differs: run `make repository`"
    extra = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert extra == {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}


def _load(profile, name):
    cfg = mc.ModelConfig()
    text_format.Parse((REPO_ROOT / "model_repository" / profile / name / "config.pbtxt").read_text(), cfg)
    return cfg


def test_configs_parse_and_follow_contract():
    for profile in PROFILES:
        ens = _load(profile, contract.ENSEMBLE)
        assert ens.platform == "ensemble"
        steps = contract.profile_steps(profile)
        assert [s.model_name for s in ens.ensemble_scheduling.step] == [s.name for s in steps]
        assert {i.name for i in ens.input if i.optional} == {"hour", "weekday", "client_device", "exclude_seen", "diversity",
                                                                   "scene", "context_item_ids", "force_arms", "blend",
                                                                   "cache_salt"}
        for step in steps:
            cfg = _load(profile, step.name)
            assert [i.name for i in cfg.input] == [t.name for t in step.inputs]
            assert [o.name for o in cfg.output] == [t.name for t in step.outputs]
            delay = step.gpu_queue_delay_us if profile == "gpu" else step.cpu_queue_delay_us
            assert cfg.dynamic_batching.max_queue_delay_microseconds == delay
    gpu = _load("gpu", "ranker")
    assert gpu.platform == "tensorrt_plan" and gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert _load("gpu", "topk").instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    # cpu: one python hop per request, as many instances as cores; cpu-stages: three hops
    assert [(s.name, s.parts, s.instances) for s in contract.profile_steps("cpu")] == [
        ("pipeline", tuple(s.name for s in contract.STEPS), "cores")]
    assert [s.name for s in contract.profile_steps("cpu-stages")] == ["user_features", "candidates", "ranking"]
    assert contract.default_instances("cpu", 2) == {"pipeline": 2} and contract.default_instances("cpu", 64) == {"pipeline": 8}
    assert contract.default_instances("cpu-stages", 2) == {} == contract.default_instances("gpu", 2)
    # Triton's response cache: only on the steps that compute from their inputs alone and read the canary's salt
    # (the feature step reads live state, the ranking step the blocked-items file)
    cached = {(p, s.name) for p in PROFILES for s in contract.profile_steps(p) if _load(p, s.name).response_cache.enable}
    assert cached == {("cpu-stages", "candidates"), ("gpu", "retrieval")}
    assert _load("cpu-stages", "ranking").backend == "python" and _load("cpu-stages", "ranking").max_batch_size == 64
    assert _load("cpu", "pipeline").backend == "python" and _load("cpu", "pipeline").max_batch_size == 64


def test_serving_imports_without_the_offline_stack():
    # the serving image has NumPy, ONNX Runtime and FAISS only: no training package, no NVTabular,
    # pandas or torch, and nothing that unpickles
    blocked = ("training", "nvtabular", "merlin", "pandas", "torch", "dask", "cloudpickle")
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
            + "import runtime.steps, runtime.pipeline, serving.repository\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_batching_is_set_in_a_copy_and_bad_settings_are_named(tmp_path):
    """serve.batching: a model's preferred batch sizes and queue delay in the served copy (a key left out keeps the
    declaration's), the rest of its config untouched; bad settings are one line naming the setting."""
    import shutil

    from serving.command import apply_batching, apply_instance_counts

    repo = tmp_path / "cpu"
    shutil.copytree(REPO_ROOT / "model_repository" / "cpu", repo)
    before = _load("cpu", "pipeline")
    assert list(before.dynamic_batching.preferred_batch_size) and before.dynamic_batching.max_queue_delay_microseconds == 0
    apply_instance_counts(repo, {"pipeline": 2})
    assert apply_batching(repo, {"pipeline": {"max_queue_delay_us": 300}}) == {"pipeline": {"max_queue_delay_us": 300}}
    cfg = text_format.Parse((repo / "pipeline" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert list(cfg.dynamic_batching.preferred_batch_size) == list(before.dynamic_batching.preferred_batch_size)
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 300
    apply_batching(repo, {"pipeline": {"preferred_batch_sizes": [], "max_queue_delay_us": 0}})
    cfg = text_format.Parse((repo / "pipeline" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert not cfg.dynamic_batching.preferred_batch_size and cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert cfg.HasField("dynamic_batching") and len(cfg.instance_group) == 2  # still batching; the instances kept
    apply_batching(repo, {"pipeline": {"preferred_batch_sizes": [4, 16]}})
    cfg = text_format.Parse((repo / "pipeline" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    cfg.ClearField("dynamic_batching"), before.ClearField("dynamic_batching"), cfg.ClearField("instance_group")
    before.ClearField("instance_group")
    assert cfg == before  # nothing else changed
    for setting, message in (({"pipelin": {"max_queue_delay_us": 1}}, "serve.batching.pipelin: no model 'pipelin'"),
                             ({contract.ENSEMBLE: {"max_queue_delay_us": 1}}, f"serve.batching.{contract.ENSEMBLE}: no model"),
                             ({"pipeline": {"delay": 1}}, "serve.batching.pipeline must be a table of"),
                             ({"pipeline": {"preferred_batch_sizes": [16, 4]}},
                              "serve.batching.pipeline.preferred_batch_sizes must be ascending integers in 1..64"),
                             ({"pipeline": {"preferred_batch_sizes": [128]}}, "serve.batching.pipeline.preferred_batch_sizes"),
                             ({"pipeline": {"max_queue_delay_us": -1}},
                              "serve.batching.pipeline.max_queue_delay_us must be an integer in 0..1000000, got -1")):
        with pytest.raises(ValueError) as err:
            apply_batching(repo, setting)
        assert str(err.value).startswith(message), err.value


def test_instance_counts_are_set_in_a_copy_and_bad_ones_are_named(tmp_path):
    import shutil

    from serving.command import apply_instance_counts, instance_priorities, python_stub_counts, tritonserver_command

    repo = tmp_path / "cpu-stages"
    shutil.copytree(REPO_ROOT / "model_repository" / "cpu-stages", repo)
    assert apply_instance_counts(repo, {"candidates": 3}) == {"candidates": 3}
    cfg = text_format.Parse((repo / "candidates" / "config.pbtxt").read_text(), mc.ModelConfig())
    # one group per CPU instance, each preferred over the next while free (the server runs its rate limiter)
    assert [(g.count, g.kind, g.rate_limiter.priority) for g in cfg.instance_group] == \
        [(1, mc.ModelInstanceGroup.KIND_CPU, 1), (1, mc.ModelInstanceGroup.KIND_CPU, 1000),
         (1, mc.ModelInstanceGroup.KIND_CPU, 1000000)]
    assert python_stub_counts(repo)["candidates"] == 3
    assert apply_instance_counts(repo, {"candidates": 1}) == {"candidates": 1}  # set again: the groups replaced
    cfg = text_format.Parse((repo / "candidates" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [(g.count, g.rate_limiter.priority) for g in cfg.instance_group] == [(1, 0)]
    assert _load("cpu-stages", "candidates").instance_group[0].count == 1  # the generated repository is untouched
    gpu = tmp_path / "gpu"
    shutil.copytree(REPO_ROOT / "model_repository" / "gpu", gpu)
    gpu_model = next(p.parent.name for p in sorted(gpu.glob("*/config.pbtxt")) if "KIND_GPU" in p.read_text())
    apply_instance_counts(gpu, {gpu_model: 2})  # a GPU group's count is per GPU: it stays one group
    cfg = text_format.Parse((gpu / gpu_model / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    for n in range(2, 9):  # rising priorities that fit Triton's uint32, for every allowed count
        priorities = instance_priorities(n)
        assert priorities[0] == 1 and all(a < b for a, b in zip(priorities, priorities[1:])) and priorities[-1] < 2**32
    command = tritonserver_command("tritonserver", repo, http_address="127.0.0.1", http_port=1, grpc_address="127.0.0.1",
                                   grpc_port=2, metrics_address="127.0.0.1", metrics_port=3)
    assert "--rate-limit=execution_count" in command
    for counts, message in (({"rankr": 2}, "serve.instances.rankr: no model 'rankr'"),
                            ({contract.ENSEMBLE: 2}, f"serve.instances.{contract.ENSEMBLE}: no model"),
                            ({"ranking": 0}, "serve.instances.ranking must be an integer in 1..8, got 0"),
                            ({"ranking": "2"}, "serve.instances.ranking must be an integer in 1..8, got '2'")):
        with pytest.raises(ValueError) as err:
            apply_instance_counts(repo, counts)
        assert str(err.value).startswith(message), err.value
