"""benchmarks/gpu_check on the CPU with tiny sizes: the same code paths the GPU run takes, so the script
is known to work before a device is lent (issue: GPU proof)."""

from __future__ import annotations

import json
import subprocess

import pytest

from benchmarks import gpu_check
from shoprec.config import REPO_ROOT
from shoprec.device import has_cuda


def test_every_part_runs_on_the_cpu_and_reports(artifacts, tmp_path):
    gpu_check.main(["--device", "cpu", "--size", "tiny", "--out", str(tmp_path), "--artifacts", str(artifacts)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert {k: v["status"] for k, v in parts.items()} == {"training": "ran", "retrieval": "ran", "serving": "ran"}
    for kind in ("two_tower", "ranker"):
        run = parts["training"][kind]
        assert run["cpu"]["samples_per_s"] > 0 and run["cpu"]["steps"] == gpu_check.SIZES["tiny"]["steps"]
        assert run["agreement"]["agree"] and run["agreement"]["max_relative_gap"] == 0.0  # same seed, same device
        assert run["cpu"]["loss_last"] < run["cpu"]["loss_first"]  # the planted data is learnable
    methods = parts["retrieval"]["methods"]
    assert set(methods) == {"torch-matmul-topk (cpu, not FAISS)", "faiss-flat (cpu)", "faiss-ivf (cpu)"}
    assert methods["faiss-flat (cpu)"]["recall@100"] == 1.0 and methods["faiss-ivf (cpu)"]["recall@100"] >= 0.8
    assert all(f"batch{b}_ms" in m for m in methods.values() for b in gpu_check.BATCHES)
    assert parts["serving"]["parity"]["ok"] and [lv["concurrency"] for lv in parts["serving"]["levels"]] == [1, 4]
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert report["summary"].endswith("ran training (curves agree); ran retrieval; ran serving (parity ok)")


def test_the_command_explains_itself():
    out = subprocess.run([str(REPO_ROOT / "benchmarks" / "gpu_check"), "--help"], capture_output=True, text=True, check=True)
    assert "--device" in out.stdout and "$OUT" in out.stdout


@pytest.mark.skipif(has_cuda(), reason="this machine has CUDA: the cuda run is the real check there")
def test_asking_for_cuda_without_one_fails_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="--device cuda was asked for but torch sees no CUDA device"):
        gpu_check.main(["--device", "cuda", "--out", str(tmp_path)])


def test_gpu_profile_serving_is_skipped_with_its_reason(tmp_path):
    with pytest.raises(gpu_check._Skip, match="TensorRT plans"):
        gpu_check.part_serving("cuda", gpu_check.SIZES["tiny"], tmp_path)


def test_curves_that_part_ways_do_not_agree():
    falling = [3.0 - 0.05 * i for i in range(40)]
    assert gpu_check.curves_agree(falling, [x * 1.02 for x in falling])["agree"]
    assert not gpu_check.curves_agree(falling, [3.0] * 40)["agree"]  # one curve never falls
    assert not gpu_check.curves_agree(falling, [x * 1.5 for x in falling])["agree"]  # 50 % apart
