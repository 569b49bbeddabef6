#!/usr/bin/env python3
"""Container entrypoint: verify the serving bundle, build or reuse TensorRT engines, exec Triton.

    entrypoint.py [--dry-run] [-- extra tritonserver args]

1. The bundle ($SHOPREC_ARTIFACTS/serving) is checked against its manifest; any mismatch stops
   the container with exit code 2 before a byte of it is loaded.
2. A TensorRT plan is tied to the GPU model, the ONNX bytes and the TensorRT version, so each
   engine is cached under $SHOPREC_ENGINE_CACHE/<sha256 of those + the shape profile>/model.plan
   and rebuilt (trtexec, fp16) only when one of them changes. A new GPU type, bundle or image
   gets fresh engines; a pod restart on the same node type reuses them.
3. The gpu profile is copied to a writable runtime repository, the engines are linked in at
   <model>/1/model.plan, and the process becomes `tritonserver`.

gRPC (0.0.0.0:8001) is the exposed protocol and metrics listen on 0.0.0.0:8002; HTTP stays on
127.0.0.1:8000 for health checks inside the pod, because a ~100-byte HTTP/JSON request declaring
a huge shape aborted a whole Triton (2.51) in our fuzzing while gRPC survived every malformed case.
SHOPREC_HTTP_PUBLIC=1 opts HTTP in to 0.0.0.0.

Only the standard library and shoprec (manifest, tensorrt_shapes) are imported, so the unit tests run every step
without Docker, a GPU or TensorRT (`run` and `execvpe` are injectable, --dry-run prints the plan).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from serving.command import apply_batching, apply_instance_counts, check_tls_files, tritonserver_command
from shoprec import contract
from shoprec.config import ServeConfig, load_config
from shoprec.manifest import ArtifactError, sha256_file, verify_manifest
from shoprec.tensorrt_shapes import profile_shapes, trtexec_command

ENGINE_MODELS = contract.ENGINE_STEPS  # the steps the gpu profile serves as tensorrt_plan
# the sizes the engine steps' inputs name, as the exporter recorded them (num_candidates comes from the serve config)
CONTRACT_KEYS = tuple(sorted({d for s in ENGINE_MODELS for t in contract.STEP_BY_NAME[s].inputs for d in t.dims
                              if isinstance(d, str)} - {"num_candidates"} | {"n_items"}))
TRTEXEC_CANDIDATES = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")
EXIT_BAD_BUNDLE = 2
EXIT_NO_TOOL = 3
EXIT_BUILD_FAILED = 4


class StartupError(RuntimeError):
    """Something the operator must fix before the server can start; carries the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Settings:
    bundle: Path
    engine_cache: Path
    profile: Path
    runtime_repo: Path
    serve: ServeConfig = ServeConfig()
    http_public: bool = False
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    grpc_tls: tuple[str, str, str] | None = None  # from the serve config: gRPC over TLS (mutual with a client CA)

    @classmethod
    def from_env(cls, env: dict) -> "Settings":
        """Paths from the environment; ports and candidate counts from the serve config ($SHOPREC_CONFIG, else the
        defaults), the same file the steps read."""
        try:
            serve = load_config(env.get("SHOPREC_CONFIG") or None).serve
        except (OSError, ValueError) as err:
            raise StartupError(f"serve config: {err}", EXIT_BAD_BUNDLE) from err
        try:
            grpc_tls = check_tls_files(serve.grpc_tls_cert, serve.grpc_tls_key, serve.grpc_tls_client_ca)
        except ValueError as err:
            raise StartupError(str(err), EXIT_BAD_BUNDLE) from err
        return cls(
            # the link to the newest export, resolved once: what is verified is what every step loads, whatever
            # an export on the shared volume does meanwhile (shoprec/bundles.py)
            bundle=(Path(env.get("SHOPREC_ARTIFACTS", "/models/artifacts")) / "serving").resolve(),
            engine_cache=Path(env.get("SHOPREC_ENGINE_CACHE", "/engines")),
            profile=Path(env.get("SHOPREC_MODEL_PROFILE", "/opt/shoprec/model_repository/gpu")),
            runtime_repo=Path(env.get("SHOPREC_RUNTIME_REPO", "/tmp/shoprec/model_repository")),
            serve=serve,
            http_public=env.get("SHOPREC_HTTP_PUBLIC", "0").lower() in ("1", "true", "yes"),
            admin_key=env.get("SHOPREC_ADMIN_KEY") or secrets.token_urlsafe(24),
            grpc_tls=grpc_tls,
        )


@dataclass(frozen=True)
class EnginePlan:
    model: str
    onnx: Path
    key: str
    engine: Path
    shapes: dict
    trtexec: str = "trtexec"
    cached: bool = False

    def command(self, save_to: Path | None = None) -> list[str]:
        return trtexec_command(self.trtexec, self.onnx, save_to or self.engine, self.shapes)


@dataclass
class StartPlan:
    gpu_name: str
    trt_version: str
    engines: list[EnginePlan] = field(default_factory=list)
    server_command: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({
            "gpu_name": self.gpu_name,
            "tensorrt_version": self.trt_version,
            "engines": [{"model": e.model, "key": e.key, "engine": str(e.engine), "cached": e.cached,
                         "command": e.command()} for e in self.engines],
            "server_command": redacted(self.server_command),
        }, indent=2)


# --- the bundle ------------------------------------------------------------------------------

def verify_bundle(bundle: Path) -> dict:
    """Check every file against manifest.json and that the files the GPU path needs are listed."""
    try:
        manifest = verify_manifest(bundle)
    except ArtifactError as err:
        raise StartupError(f"serving bundle rejected: {err}", EXIT_BAD_BUNDLE) from err
    needed = [f"{m}.onnx" for m in ENGINE_MODELS] + ["contract.json"]
    missing = [name for name in needed if name not in manifest["files"]]
    if missing:
        raise StartupError(f"serving bundle rejected: {bundle}/manifest.json does not list {missing}", EXIT_BAD_BUNDLE)
    return manifest


def load_contract(bundle: Path, serve: ServeConfig) -> dict[str, int]:
    """The sizes the engine steps' inputs name: the dims the exporter recorded (call only after verify_bundle, the
    file is then trusted) plus num_candidates from the serve config."""
    try:
        raw = json.loads((bundle / "contract.json").read_text())
    except ValueError as err:
        raise StartupError(f"{bundle}/contract.json: not JSON ({err})", EXIT_BAD_BUNDLE) from err
    bad = [k for k in CONTRACT_KEYS if not isinstance(raw.get(k), int) or isinstance(raw.get(k), bool) or raw[k] < 1]
    if bad:
        raise StartupError(f"{bundle}/contract.json: keys {bad} must be positive integers", EXIT_BAD_BUNDLE)
    sizes = {k: raw[k] for k in CONTRACT_KEYS}
    sizes["num_candidates"] = contract.num_candidates(serve.num_candidates, sizes["n_items"])
    return sizes


# --- the machine -----------------------------------------------------------------------------

def detect_gpu_name(run=subprocess.run) -> str:
    """The visible GPUs' names, comma-joined (one name when the pod asks for one GPU)."""
    cmd = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    try:
        out = run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise StartupError(f"cannot detect the GPU ({' '.join(cmd)}: {err}); start the container with "
                           "--gpus / a nvidia.com/gpu limit", EXIT_NO_TOOL) from err
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if not names:
        raise StartupError("nvidia-smi lists no GPU; the gpu profile needs one", EXIT_NO_TOOL)
    return ",".join(names)


def find_trtexec(env: dict) -> str:
    for candidate in (env.get("SHOPREC_TRTEXEC"), shutil.which("trtexec"), *TRTEXEC_CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StartupError(f"trtexec not found (SHOPREC_TRTEXEC, PATH, {', '.join(TRTEXEC_CANDIDATES)})", EXIT_NO_TOOL)


def check_tools(env: dict, run=subprocess.run) -> list[str]:
    """Image build-time check (no GPU there): trtexec and tritonserver exist and trtexec's shared
    libraries resolve, so a missing tool fails `docker build`, not the first pod on a GPU node."""
    trtexec = find_trtexec(env)
    if not shutil.which("tritonserver"):
        raise StartupError("tritonserver not on PATH", EXIT_NO_TOOL)
    ldd = run(["ldd", trtexec], capture_output=True, text=True)
    unresolved = [line.strip() for line in ldd.stdout.splitlines() if "not found" in line]
    if ldd.returncode != 0 or unresolved:
        raise StartupError(f"{trtexec}: unresolved libraries {unresolved or ldd.stderr.strip()}", EXIT_NO_TOOL)
    return [trtexec, shutil.which("tritonserver")]


def tensorrt_version(trtexec: str, run=subprocess.run) -> str:
    """The version the engine builder itself reports: banner '[TensorRT v101303]' -> '10.13.3'."""
    proc = run([trtexec, "--help"], capture_output=True, text=True, timeout=120)
    match = re.search(r"\[TensorRT v([\d.]+)\]", (proc.stdout or "") + (proc.stderr or ""))
    if not match:
        raise StartupError(f"cannot read the TensorRT version from `{trtexec} --help`", EXIT_NO_TOOL)
    if "." in match.group(1):  # some builds print it dotted already
        return match.group(1)
    n = int(match.group(1))
    return f"{n // 10000}.{n // 100 % 100}.{n % 100}"


# --- the engines -----------------------------------------------------------------------------

def config_max_batch_size(config_pbtxt: Path) -> int:
    """max_batch_size as Triton will enforce it: from the generated config, not a second copy."""
    match = re.search(r"^max_batch_size:\s*(\d+)\s*$", config_pbtxt.read_text(), re.MULTILINE)
    if not match:
        raise StartupError(f"{config_pbtxt}: no max_batch_size", EXIT_BAD_BUNDLE)
    return int(match.group(1))


def cache_key(gpu_name: str, onnx_sha256: str, trt_version: str, shapes: dict) -> str:
    """A plan is only valid for this GPU, these ONNX bytes, this TensorRT and this shape profile
    (max_batch_size lives in the config, not in the ONNX file, so the profile is part of the key)."""
    payload = json.dumps({"gpu": gpu_name, "onnx_sha256": onnx_sha256, "tensorrt": trt_version,
                          "fp16": True, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()}},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_engine_ok(engine: Path) -> bool:
    """A plan counts as cached only with its build record and matching bytes: a half-written or
    swapped file on the shared volume is rebuilt, never handed to Triton."""
    record = engine.with_name("build.json")
    if not (engine.is_file() and record.is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("plan_sha256") == sha256_file(engine)
    except (OSError, ValueError):
        return False


def plan_engines(settings: Settings, manifest: dict, dims: dict, gpu_name: str, trt_version: str, trtexec: str) -> list[EnginePlan]:
    plans = []
    for model in ENGINE_MODELS:
        onnx = settings.bundle / f"{model}.onnx"
        max_batch = config_max_batch_size(settings.profile / model / "config.pbtxt")
        shapes = profile_shapes(model, dims, max_batch)
        key = cache_key(gpu_name, manifest["files"][onnx.name]["sha256"], trt_version, shapes)
        engine = settings.engine_cache / key / "model.plan"
        plans.append(EnginePlan(model, onnx, key, engine, shapes, trtexec, cached=cached_engine_ok(engine)))
    return plans


def build_engine(plan: EnginePlan, gpu_name: str, trt_version: str, run=subprocess.run) -> Path:
    """Build into a temp file, then rename: a crash mid-build never leaves a plan that looks done,
    and two pods building the same key on a shared volume both end with a whole file."""
    plan.engine.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.engine.with_name(f"model.plan.tmp-{os.getpid()}")
    cmd = plan.command(save_to=tmp)
    print(f"[entrypoint] building {plan.model} engine: {' '.join(cmd)}", flush=True)
    proc = run(cmd)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise StartupError(f"trtexec failed for {plan.model} (exit {proc.returncode}); see its log above", EXIT_BUILD_FAILED)
    record = {"model": plan.model, "gpu": gpu_name, "tensorrt": trt_version, "onnx": str(plan.onnx),
              "plan_sha256": sha256_file(tmp), "command": cmd}
    os.replace(tmp, plan.engine)
    plan.engine.with_name("build.json").write_text(json.dumps(record, indent=2) + "\n")
    return plan.engine


# --- the server ------------------------------------------------------------------------------

def prepare_runtime_repo(settings: Settings, engines: list[EnginePlan]) -> Path:
    """Copy the (read-only, generated) gpu profile and link each engine in as <model>/1/model.plan."""
    repo = settings.runtime_repo
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(settings.profile, repo)
    for plan in engines:
        target = repo / plan.model / "1" / "model.plan"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(plan.engine)
    try:
        apply_instance_counts(repo, dict(settings.serve.instances), settings.serve.prefer_first_instance)
        apply_batching(repo, dict(settings.serve.batching))
    except ValueError as exc:
        raise StartupError(f"serve config: {exc}", EXIT_BAD_BUNDLE) from None
    return repo


def server_command(settings: Settings, repo: Path) -> list[str]:
    """Triton's command line. The admin APIs (model repository, shared memory, trace, logging) answer only
    requests carrying the `shoprec-admin-key` header with $SHOPREC_ADMIN_KEY (a Kubernetes Secret); without it a
    random key nobody knows, so they are closed."""
    http_address = "0.0.0.0" if settings.http_public else "127.0.0.1"
    return tritonserver_command("tritonserver", repo, http_address=http_address, http_port=settings.serve.http_port,
                                grpc_address="0.0.0.0", grpc_port=settings.serve.grpc_port, metrics_address="0.0.0.0",
                                metrics_port=settings.serve.metrics_port, admin_key=settings.admin_key,
                                grpc_tls=settings.grpc_tls, response_cache_mb=settings.serve.response_cache_mb,
                                rate_limit=settings.serve.prefer_first_instance)


def redacted(command: list[str]) -> list[str]:
    """The command as it may be printed: admin keys replaced."""
    flags = ("--grpc-restricted-protocol=", "--http-restricted-api=")
    return [re.sub(r"(:[\w-]+)=[\w-]+$", r"\1=***", a) if a.startswith(flags) else a for a in command]


def plan_start(settings: Settings, env: dict, run=subprocess.run, gpu_name: str | None = None,
               trt_version: str | None = None) -> StartPlan:
    manifest = verify_bundle(settings.bundle)
    dims = load_contract(settings.bundle, settings.serve)
    if not (settings.profile / "recommender" / "config.pbtxt").is_file():
        raise StartupError(f"{settings.profile}: not a generated model repository profile", EXIT_BAD_BUNDLE)
    gpu = gpu_name or detect_gpu_name(run)
    if trt_version is None:
        trtexec = find_trtexec(env)
        trt_version = tensorrt_version(trtexec, run)
    else:  # a dry run told the version: trtexec need not exist here
        trtexec = env.get("SHOPREC_TRTEXEC", "trtexec")
    plan = StartPlan(gpu, trt_version, plan_engines(settings, manifest, dims, gpu, trt_version, trtexec))
    plan.server_command = server_command(settings, settings.runtime_repo)
    return plan


def online_store(env: dict) -> str | None:
    """The Redis the steps read live user state from ($SHOPREC_ONLINE_STORE, e.g. the StatefulSet of
    deploy/k8s/redis.yaml); unset or "none": the export's snapshot only. A malformed value stops the start."""
    value = env.get("SHOPREC_ONLINE_STORE", "").strip()
    if value in ("", "none"):
        return None
    if not re.match(r"^(redis|rediss|unix)://\S+$", value):
        raise StartupError(f"SHOPREC_ONLINE_STORE must be redis://HOST:PORT/DB (or none), got {value!r}", EXIT_BAD_BUNDLE)
    return value


def main(argv: list[str] | None = None, env: dict | None = None, run=subprocess.run, execvpe=os.execvpe) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="verify and print the plan as JSON; build and start nothing")
    parser.add_argument("--gpu-name", help="skip nvidia-smi (dry runs on machines without a GPU)")
    parser.add_argument("--trt-version", help="skip the TensorRT version probe (dry runs without TensorRT)")
    parser.add_argument("--check-tools", action="store_true", help="check trtexec/tritonserver are usable, then exit")
    parser.add_argument("server_args", nargs="*", help="after --: passed to tritonserver unchanged")
    args = parser.parse_args(argv)
    env = dict(os.environ if env is None else env)
    try:
        settings = Settings.from_env(env)
        online = online_store(env)
        if args.check_tools:
            print("[entrypoint] tools ok: " + ", ".join(check_tools(env, run)))
            return 0
        plan = plan_start(settings, env, run, args.gpu_name, args.trt_version)
        plan.server_command += args.server_args
        if args.dry_run:
            print(plan.to_json())
            return 0
        for engine in plan.engines:
            if engine.cached:
                print(f"[entrypoint] reusing {engine.model} engine {engine.engine}", flush=True)
            else:
                build_engine(engine, plan.gpu_name, plan.trt_version, run)
        prepare_runtime_repo(settings, plan.engines)
    except StartupError as err:
        print(f"[entrypoint] refusing to start: {err}", file=sys.stderr, flush=True)
        return err.code
    print(f"[entrypoint] online store: {online or 'none (the export snapshot only)'}", flush=True)
    print(f"[entrypoint] exec {' '.join(redacted(plan.server_command))}", flush=True)
    # exec, not a child: Triton becomes PID 1 and gets the pod's SIGTERM for a graceful drain. The steps inherit
    # the bundle folder verified above (runtime/steps.py bundle_dir), whatever the link says by the time they load.
    execvpe(plan.server_command[0], plan.server_command, {**env, "SHOPREC_BUNDLE": str(settings.bundle)})
    return 0  # reached only when execvpe is replaced (tests)


if __name__ == "__main__":
    sys.exit(main())
