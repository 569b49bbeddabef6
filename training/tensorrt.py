"""TensorRT engine build (fp16, optimisation profiles for the server's batch sizes).

Runs when TensorRT is present (`tensorrt` Python module or `trtexec`); otherwise explains why it
was skipped. On these CPU machines no TensorRT builder exists (see README: engines are built in
the NGC container at start, docker/entrypoint.py, which uses the same shapes as `profile_shapes`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from shoprec import contract
from shoprec.tensorrt_shapes import profile_shapes, trtexec_command


def tensorrt_available() -> str | None:
    if shutil.which("trtexec"):
        return "trtexec"
    try:
        import tensorrt  # noqa: F401
        return "tensorrt"
    except ImportError:
        return None


def build_engines(bundle: Path, sizes: dict) -> dict:
    """Every engine step of the graph (contract.ENGINE_STEPS) as a plan; `sizes`: contract.json plus num_candidates."""
    tool = tensorrt_available()
    if tool is None:
        return {"built": False, "reason": "TensorRT not found (no `trtexec` on PATH, no `tensorrt` module). "
                "No TensorRT builder is installable from PyPI here; engines are built inside the NGC Triton "
                "container at start (docker/entrypoint.py). The ONNX files are the portable artifact."}
    if tool != "trtexec":
        return {"built": False, "reason": "only the `tensorrt` module was found; use trtexec (ships in the NGC container)"}
    built = {}
    for model in contract.ENGINE_STEPS:
        engine = bundle / f"{model}.plan"
        shapes = profile_shapes(model, sizes, contract.STEP_BY_NAME[model].max_batch_size)
        cmd = trtexec_command("trtexec", bundle / f"{model}.onnx", engine, shapes)
        subprocess.run(cmd, check=True)
        built[model] = str(engine)
    return {"built": True, "engines": built}
