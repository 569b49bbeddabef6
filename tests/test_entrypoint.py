"""docker/entrypoint.py without Docker, GPU or TensorRT: nvidia-smi, trtexec and exec are faked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from shoprec import contract
from shoprec.config import REPO_ROOT
from shoprec.manifest import write_manifest

ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.py"
GPU_PROFILE = REPO_ROOT / "model_repository" / "gpu"
EXPORTED = {"user_cat_dim": 7, "user_cont_dim": 3, "seq_len": 6, "item_cat_dim": 5, "item_cont_dim": 2, "dense_dim": 7,
            "embedding_dim": 32, "n_items": 2000}  # contract.json as the exporter writes it
DIMS = {**EXPORTED, "num_candidates": 50}  # plus the serve config's candidate count (the env's config file)
GPU = "NVIDIA H100 80GB HBM3"


def _load_entrypoint():
    # docker/ is not a package (a `docker` package would shadow the Docker SDK): load by path
    spec = importlib.util.spec_from_file_location("shoprec_entrypoint", ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ep = _load_entrypoint()


class FakeMachine:
    """Stands in for subprocess.run: nvidia-smi, `trtexec --help` and engine builds."""

    def __init__(self, gpu: str = GPU, trt_banner: str = "&&&& RUNNING TensorRT.trtexec [TensorRT v101303] [b9]",
                 build_rc: int = 0):
        self.gpu, self.trt_banner, self.build_rc = gpu, trt_banner, build_rc
        self.calls: list[list[str]] = []

    @property
    def builds(self) -> list[list[str]]:
        return [c for c in self.calls if any(a.startswith("--saveEngine=") for a in c)]

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        if cmd[0] == "nvidia-smi":
            return SimpleNamespace(returncode=0, stdout=self.gpu + "\n", stderr="")
        if cmd[1:] == ["--help"]:
            return SimpleNamespace(returncode=0, stdout=self.trt_banner + "\n=== Model Options ===\n", stderr="")
        if self.build_rc == 0:
            out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--saveEngine="))
            Path(out).write_bytes(b"plan:" + " ".join(cmd).encode())
        return SimpleNamespace(returncode=self.build_rc, stdout="", stderr="")


@pytest.fixture
def env(tmp_path):
    """A tiny signed bundle, an empty engine cache, the committed gpu profile, a fake trtexec."""
    bundle = tmp_path / "artifacts" / "serving"
    bundle.mkdir(parents=True)
    (bundle / "user_tower.onnx").write_bytes(b"fake user tower onnx")
    (bundle / "ranker.onnx").write_bytes(b"fake ranker onnx")
    (bundle / "contract.json").write_text(json.dumps(EXPORTED))
    write_manifest(bundle, packages=())
    config = tmp_path / "serve.toml"
    config.write_text("[serve]\nnum_candidates = 50\n")
    trtexec = tmp_path / "bin" / "trtexec"
    trtexec.parent.mkdir()
    trtexec.write_text("#!/bin/sh\nexit 0\n")
    trtexec.chmod(0o755)
    return {
        "SHOPREC_ARTIFACTS": str(tmp_path / "artifacts"),
        "SHOPREC_ENGINE_CACHE": str(tmp_path / "engines"),
        "SHOPREC_MODEL_PROFILE": str(GPU_PROFILE),
        "SHOPREC_RUNTIME_REPO": str(tmp_path / "runtime" / "model_repository"),
        "SHOPREC_TRTEXEC": str(trtexec),
        "SHOPREC_CONFIG": str(config),
    }


def start(env: dict, machine: FakeMachine, *argv: str):
    execs, envs = [], []
    code = ep.main(list(argv), env=env, run=machine, execvpe=lambda f, a, e: (execs.append(a), envs.append(e)))
    if envs:  # the steps load the bundle folder the entrypoint verified, not whatever the link says later
        assert envs[0]["SHOPREC_BUNDLE"] == str(bundle_of(env).resolve())
    return code, execs


def bundle_of(env: dict) -> Path:
    return Path(env["SHOPREC_ARTIFACTS"]) / "serving"


# --- cache key -------------------------------------------------------------------------------

def test_cache_key_changes_with_gpu_onnx_and_tensorrt():
    shapes = ep.profile_shapes("user_tower", DIMS, 256)
    base = ep.cache_key(GPU, "a" * 64, "10.13.3", shapes)
    assert base == ep.cache_key(GPU, "a" * 64, "10.13.3", shapes)
    assert len(base) == 64
    assert base != ep.cache_key("NVIDIA L4", "a" * 64, "10.13.3", shapes)
    assert base != ep.cache_key(GPU, "b" * 64, "10.13.3", shapes)
    assert base != ep.cache_key(GPU, "a" * 64, "10.14.1", shapes)
    assert base != ep.cache_key(GPU, "a" * 64, "10.13.3", ep.profile_shapes("user_tower", DIMS, 128))


def test_new_onnx_bytes_give_a_new_engine_key(env):
    machine = FakeMachine()
    first = ep.plan_start(ep.Settings.from_env(env), env, machine)
    (bundle_of(env) / "ranker.onnx").write_bytes(b"retrained ranker onnx")
    write_manifest(bundle_of(env), packages=())
    second = ep.plan_start(ep.Settings.from_env(env), env, machine)
    keys = lambda plan: {e.model: e.key for e in plan.engines}  # noqa: E731
    assert keys(first)["user_tower"] == keys(second)["user_tower"]
    assert keys(first)["ranker"] != keys(second)["ranker"]


def test_new_gpu_type_gives_new_engine_keys(env):
    h100 = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine(gpu=GPU))
    l4 = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine(gpu="NVIDIA L4"))
    assert {e.key for e in h100.engines}.isdisjoint({e.key for e in l4.engines})


# --- build, reuse, rebuild -------------------------------------------------------------------

def test_first_start_builds_then_restart_reuses(env):
    machine = FakeMachine()
    code, execs = start(env, machine)
    assert code == 0
    assert [b[0] for b in machine.builds] == [env["SHOPREC_TRTEXEC"]] * 2
    runtime = Path(env["SHOPREC_RUNTIME_REPO"])
    for model in ("user_tower", "ranker"):
        link = runtime / model / "1" / "model.plan"
        assert link.is_symlink()
        assert link.resolve().parent.parent == Path(env["SHOPREC_ENGINE_CACHE"]).resolve()
        assert link.read_bytes().startswith(b"plan:")
        assert (runtime / model / "config.pbtxt").read_text() == (GPU_PROFILE / model / "config.pbtxt").read_text()
    assert execs and execs[0][0] == "tritonserver"
    assert f"--model-repository={runtime}" in execs[0]

    again = FakeMachine()
    code, execs = start(env, again)
    assert code == 0
    assert again.builds == []  # same GPU, ONNX and TensorRT: both engines reused
    assert execs


def test_corrupted_cached_engine_is_rebuilt(env):
    start(env, FakeMachine())
    plan = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine())
    ranker = next(e for e in plan.engines if e.model == "ranker")
    ranker.engine.write_bytes(b"truncated")
    machine = FakeMachine()
    assert start(env, machine)[0] == 0
    assert len(machine.builds) == 1 and "--onnx=" + str(bundle_of(env) / "ranker.onnx") in machine.builds[0]


def test_failed_build_stops_start_and_leaves_no_plan(env, capsys):
    code, execs = start(env, FakeMachine(build_rc=1))
    assert code == ep.EXIT_BUILD_FAILED and execs == []
    assert "trtexec failed for user_tower" in capsys.readouterr().err
    assert not list(Path(env["SHOPREC_ENGINE_CACHE"]).rglob("model.plan*"))


# --- trtexec command -------------------------------------------------------------------------

def test_trtexec_commands_are_fp16_with_contract_shapes(env):
    plan = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine())
    commands = {e.model: e.command() for e in plan.engines}
    assert plan.trt_version == "10.13.3"
    user = commands["user_tower"]
    assert "--fp16" in user
    assert f"--onnx={bundle_of(env) / 'user_tower.onnx'}" in user
    seq = "seq_items:{b}x6,seq_kinds:{b}x6"
    for flag, b in (("min", 1), ("opt", 16), ("max", 256)):  # user_tower max_batch_size 256
        assert f"--{flag}Shapes=user_cat:{b}x7,user_cont:{b}x3,{seq.format(b=b)}" in user
    ranker = commands["ranker"]
    assert "--fp16" in ranker
    for flag, b in (("min", 1), ("opt", 16), ("max", 64)):  # ranker max_batch_size 64
        assert (f"--{flag}Shapes=user_cat:{b}x7,user_cont:{b}x3,{seq.format(b=b)},item_cat:{b}x50x5,item_cont:{b}x50x2,"
                f"candidate_dense:{b}x50x7") in ranker
    for e in plan.engines:
        assert f"--saveEngine={Path(env['SHOPREC_ENGINE_CACHE']) / e.key / 'model.plan'}" in e.command()


def test_profile_max_batch_matches_contract_and_export_shapes():
    for model in ep.ENGINE_MODELS:
        max_batch = ep.config_max_batch_size(GPU_PROFILE / model / "config.pbtxt")
        assert max_batch == contract.STEP_BY_NAME[model].max_batch_size
        onnx_inputs = [t.name for t in contract.ONNX_MODELS[model][0]]
        assert list(ep.profile_shapes(model, DIMS, max_batch)) == onnx_inputs


def test_tensorrt_version_from_trtexec_banner():
    assert ep.tensorrt_version("trtexec", FakeMachine(trt_banner="[TensorRT v100100] [b7]")) == "10.1.0"
    assert ep.tensorrt_version("trtexec", FakeMachine(trt_banner="[TensorRT v10.16.0] [b7]")) == "10.16.0"
    with pytest.raises(ep.StartupError, match="TensorRT version"):
        ep.tensorrt_version("trtexec", FakeMachine(trt_banner="no banner"))


# --- refusing to start -----------------------------------------------------------------------

def test_tampered_bundle_refuses_to_start(env, capsys):
    onnx = bundle_of(env) / "user_tower.onnx"
    data = bytearray(onnx.read_bytes())
    data[0] ^= 0xFF
    onnx.write_bytes(bytes(data))
    machine = FakeMachine()
    code, execs = start(env, machine)
    assert code == ep.EXIT_BAD_BUNDLE
    err = capsys.readouterr().err
    assert "refusing to start" in err and "user_tower.onnx" in err and "does not match the manifest" in err
    assert machine.calls == [] and execs == []  # nothing probed, built or started


def test_bundle_without_manifest_or_engine_files_refuses(env, capsys):
    bundle = bundle_of(env)
    (bundle / "ranker.onnx").unlink()
    write_manifest(bundle, packages=())  # a consistent manifest, but the ranker is missing
    assert start(env, FakeMachine())[0] == ep.EXIT_BAD_BUNDLE
    assert "does not list ['ranker.onnx']" in capsys.readouterr().err
    (bundle / "manifest.json").unlink()
    assert start(env, FakeMachine())[0] == ep.EXIT_BAD_BUNDLE
    assert "no manifest" in capsys.readouterr().err


def test_contract_without_dims_refuses(env, capsys):
    (bundle_of(env) / "contract.json").write_text(json.dumps({**EXPORTED, "seq_len": "6"}))
    write_manifest(bundle_of(env), packages=())
    assert start(env, FakeMachine())[0] == ep.EXIT_BAD_BUNDLE
    assert "['seq_len'] must be positive integers" in capsys.readouterr().err


def test_candidate_count_and_ports_come_from_the_serve_config(env):
    """The serve config the steps read also sizes the engines' candidate axis and sets the ports; the
    catalog caps the candidates."""
    plan = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine())
    assert all(shape[-1][1] == 50 for e in plan.engines if e.model == "ranker" for n, shape in e.shapes.items()
               if n.startswith("item_"))
    assert "--grpc-port=8001" in plan.server_command and "--http-port=8000" in plan.server_command
    Path(env["SHOPREC_CONFIG"]).write_text("[serve]\nnum_candidates = 5000\ngrpc_port = 9001\n")
    plan = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine())
    assert next(e for e in plan.engines if e.model == "ranker").shapes["item_cat"][2] == (64, 2000, 5)
    assert "--grpc-port=9001" in plan.server_command


def test_bad_serve_config_refuses(env, capsys):
    Path(env["SHOPREC_CONFIG"]).write_text("[serve]\nnum_candidate = 50\n")
    assert start(env, FakeMachine())[0] == ep.EXIT_BAD_BUNDLE
    assert "unknown key(s) ['num_candidate']" in capsys.readouterr().err


def test_admin_apis_are_restricted_and_the_key_never_printed(env, capsys):
    code, execs = start({**env, "SHOPREC_ADMIN_KEY": "s3cret-key"}, FakeMachine())
    assert code == 0
    restricted = [a for a in execs[0] if a.startswith(("--grpc-restricted-protocol=", "--http-restricted-api="))]
    assert restricted == ["--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:"
                          "shoprec-admin-key=s3cret-key",
                          "--http-restricted-api=model-repository,shared-memory,trace,logging:"
                          "shoprec-admin-key=s3cret-key"]
    out = capsys.readouterr().out
    assert "s3cret-key" not in out and "shoprec-admin-key=***" in out
    _, execs = start(env, FakeMachine())  # no key given: a random one, so the admin APIs are closed to everyone
    assert any(a.startswith("--grpc-restricted-protocol=") and not a.endswith("=s3cret-key") for a in execs[0])


def test_online_store_comes_from_the_environment(env, capsys):
    assert start({**env, "SHOPREC_ONLINE_STORE": "localhost:6379"}, FakeMachine())[0] == ep.EXIT_BAD_BUNDLE
    assert "SHOPREC_ONLINE_STORE must be redis://HOST:PORT/DB (or none), got 'localhost:6379'" in capsys.readouterr().err
    assert ep.online_store({"SHOPREC_ONLINE_STORE": "redis://shoprec-redis:6379/0"}) == "redis://shoprec-redis:6379/0"
    assert ep.online_store({}) is None and ep.online_store({"SHOPREC_ONLINE_STORE": "none"}) is None


def test_no_gpu_refuses_with_a_clear_message(env, capsys):
    def no_nvidia_smi(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    assert start(env, no_nvidia_smi)[0] == ep.EXIT_NO_TOOL
    assert "cannot detect the GPU" in capsys.readouterr().err


def test_check_tools_fails_on_unresolved_trtexec_libraries(env, monkeypatch):
    monkeypatch.setattr(ep.shutil, "which", lambda name: "/opt/tritonserver/bin/tritonserver")
    ldd = lambda cmd, **kw: SimpleNamespace(returncode=0, stdout="\tlibnvonnxparser.so.10 => not found\n", stderr="")  # noqa: E731
    with pytest.raises(ep.StartupError, match="libnvonnxparser.so.10 => not found"):
        ep.check_tools(env, ldd)
    ok = lambda cmd, **kw: SimpleNamespace(returncode=0, stdout="\tlibnvinfer.so.10 => /usr/lib/x\n", stderr="")  # noqa: E731
    assert ep.check_tools(env, ok)[0] == env["SHOPREC_TRTEXEC"]


# --- the server command ----------------------------------------------------------------------

def test_http_is_loopback_unless_opted_in(env):
    _, execs = start(env, FakeMachine())
    cmd = execs[0]
    assert "--http-address=127.0.0.1" in cmd
    assert "--grpc-address=0.0.0.0" in cmd and "--grpc-port=8001" in cmd
    assert "--metrics-address=0.0.0.0" in cmd and "--metrics-port=8002" in cmd
    _, execs = start({**env, "SHOPREC_HTTP_PUBLIC": "1"}, FakeMachine())
    assert "--http-address=0.0.0.0" in execs[0]


def test_extra_server_args_pass_through(env):
    _, execs = start(env, FakeMachine(), "--", "--log-verbose=1")
    assert execs[0][-1] == "--log-verbose=1"


def test_dry_run_script_prints_plan_and_builds_nothing(env, tmp_path):
    # the real script, as the image runs it (shoprec importable via PYTHONPATH instead of the wheel)
    proc = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "--dry-run", "--gpu-name", GPU, "--trt-version", "10.13.3"],
        env={**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["gpu_name"] == GPU and plan["tensorrt_version"] == "10.13.3"
    assert [e["model"] for e in plan["engines"]] == ["user_tower", "ranker"]
    assert all(not e["cached"] and "--fp16" in e["command"] for e in plan["engines"])
    assert plan["server_command"][0] == "tritonserver"
    assert not Path(env["SHOPREC_ENGINE_CACHE"]).exists()
    assert not Path(env["SHOPREC_RUNTIME_REPO"]).exists()


# --- the gpu profile matches the contract ----------------------------------------------------

def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _io(tensors) -> list[tuple]:
    return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


@pytest.mark.parametrize("step", contract.STEPS, ids=lambda s: s.name)
def test_gpu_profile_config_parses_and_matches_contract(step):
    cfg = _parse(GPU_PROFILE / step.name / "config.pbtxt")
    assert cfg.name == step.name
    assert cfg.max_batch_size == step.max_batch_size
    assert ep.config_max_batch_size(GPU_PROFILE / step.name / "config.pbtxt") == cfg.max_batch_size
    assert _io(cfg.input) == [(t.name, f"TYPE_{t.dtype}", t.config_dims) for t in step.inputs]
    assert [i.name for i in cfg.input if i.optional] == [t.name for t in step.inputs if t.optional]
    assert _io(cfg.output) == [(t.name, f"TYPE_{t.dtype}", t.config_dims) for t in step.outputs]
    assert [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == [step.kind("gpu")]
    if step.name in ep.ENGINE_MODELS:
        assert (cfg.platform, cfg.default_model_filename, cfg.backend) == ("tensorrt_plan", "model.plan", "")
        assert not (GPU_PROFILE / step.name / "1" / "model.plan").exists()  # built at start, never committed
    else:
        assert cfg.backend == "python"
        assert (GPU_PROFILE / step.name / "1" / "model.py").is_file()


def test_gpu_profile_ensemble_wires_every_step():
    cfg = _parse(GPU_PROFILE / contract.ENSEMBLE / "config.pbtxt")
    assert cfg.platform == "ensemble"
    assert [s.model_name for s in cfg.ensemble_scheduling.step] == [s.name for s in contract.STEPS]
    assert [i.name for i in cfg.input] == [t.name for t in contract.REQUEST_INPUTS]
    assert [o.name for o in cfg.output] == [t.name for t in contract.RESPONSE_OUTPUTS]
    assert set(ep.ENGINE_MODELS) == {s.name for s in contract.STEPS if s.engine} == {"user_tower", "ranker"}


@pytest.mark.slow
def test_real_exported_bundle_gives_profiles_the_onnx_graphs_accept(artifacts, tmp_path):
    """The exporter's bundle (conftest: tiny pipeline) against the entrypoint: the manifest
    verifies, contract.json has the dims, and every trtexec shape fits the ONNX graph's inputs."""
    import onnx

    env = {"SHOPREC_ARTIFACTS": str(artifacts), "SHOPREC_ENGINE_CACHE": str(tmp_path / "engines"),
           "SHOPREC_MODEL_PROFILE": str(GPU_PROFILE), "SHOPREC_RUNTIME_REPO": str(tmp_path / "repo")}
    plan = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine(), gpu_name=GPU, trt_version="10.13.3")
    for engine in plan.engines:
        graph = onnx.load(str(engine.onnx), load_external_data=False).graph
        inputs = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert list(inputs) == list(engine.shapes), engine.model
        for name, (lo, opt, hi) in engine.shapes.items():
            assert len(inputs[name]) == len(hi), name
            for axis, static in enumerate(inputs[name]):
                if static is not None:  # a fixed ONNX axis must get exactly that size
                    assert lo[axis] == opt[axis] == hi[axis] == static, (engine.model, name, axis)


def test_grpc_tls_comes_from_the_serve_config_and_missing_files_refuse(env, tmp_path, capsys):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    Path(env["SHOPREC_CONFIG"]).write_text(f'[serve]\ngrpc_tls_cert = "{cert}"\ngrpc_tls_key = "{key}"\n')
    plan = ep.plan_start(ep.Settings.from_env(env), env, FakeMachine())
    assert "--grpc-use-ssl=true" in plan.server_command and f"--grpc-server-cert={cert}" in plan.server_command
    assert not any(a.startswith("--grpc-use-ssl-mutual") for a in plan.server_command)
    Path(env["SHOPREC_CONFIG"]).write_text(f'[serve]\ngrpc_tls_cert = "{cert}"\ngrpc_tls_key = "{tmp_path}/gone.key"\n')
    assert start(env, FakeMachine())[0] == ep.EXIT_BAD_BUNDLE
    assert "serve.grpc_tls_key: cannot read" in capsys.readouterr().err
