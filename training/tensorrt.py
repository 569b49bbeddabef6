"""TensorRT engine build (fp16, optimisation profiles for the server's batch sizes).

Runs when TensorRT is present (`tensorrt` Python module or `trtexec`); otherwise explains why it
was skipped. On these CPU machines no TensorRT builder exists (see README: engines are built in
the NGC container at start, docker/entrypoint.py, which uses the same shapes as `profile_shapes`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def profile_shapes(model: str, dims: dict, max_batch: int, opt_batch: int = 16) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per input; dims from the bundle's contract.json."""
    def per_row(name):
        n = dims["num_candidates"]
        return {"user_cat": (dims["user_cat_dim"],), "user_cont": (dims["user_cont_dim"],),
                "item_cat": (n, dims["item_cat_dim"]), "item_cont": (n, dims["item_cont_dim"])}[name]
    names = ["user_cat", "user_cont"] + (["item_cat", "item_cont"] if model == "ranker" else [])
    return {n: ((1, *per_row(n)), (min(opt_batch, max_batch), *per_row(n)), (max_batch, *per_row(n))) for n in names}


def trtexec_command(onnx: Path, engine: Path, shapes: dict) -> list[str]:
    fmt = lambda i: ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())  # noqa: E731
    return ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", "--fp16",
            f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]


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
        cmd = trtexec_command(bundle / f"{model}.onnx", engine, profile_shapes(model, dims, max_batch))
        subprocess.run(cmd, check=True)
        built[model] = str(engine)
    return {"built": True, "engines": built}
