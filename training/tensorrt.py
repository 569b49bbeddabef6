"""TensorRT engine build (fp16, optimisation profiles for the server's batch sizes).

Runs when TensorRT is present (`tensorrt` Python module or `trtexec`); otherwise explains why it
was skipped. On these CPU machines no TensorRT builder exists (see README: engines are built in
the NGC container at start, docker/entrypoint.py, which uses the same shapes as `profile_shapes`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from shoprec.tensorrt_shapes import profile_shapes, trtexec_command


def tensorrt_available() -> str | None:
    if shutil.which("trtexec"):
        return "trtexec"
    try:
        import tensorrt  # noqa: F401
        return "tensorrt"
    except ImportError:
        return None


def build_engines(bundle: Path, dims: dict, max_batches: dict[str, int]) -> dict:
    tool = tensorrt_available()
    if tool is None:
        return {"built": False, "reason": "TensorRT not found (no `trtexec` on PATH, no `tensorrt` module). "
                "No TensorRT builder is installable from PyPI here; engines are built inside the NGC Triton "
                "container at start (docker/entrypoint.py). The ONNX files are the portable artifact."}
    if tool != "trtexec":
        return {"built": False, "reason": "only the `tensorrt` module was found; use trtexec (ships in the NGC container)"}
    built = {}
    for model, max_batch in max_batches.items():
        engine = bundle / f"{model}.plan"
        cmd = trtexec_command("trtexec", bundle / f"{model}.onnx", engine, profile_shapes(model, dims, max_batch))
        subprocess.run(cmd, check=True)
        built[model] = str(engine)
    return {"built": True, "engines": built}
