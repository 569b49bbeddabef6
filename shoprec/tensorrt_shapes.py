"""TensorRT optimisation profiles and the trtexec command, derived from the step graph: one
definition for the export-time build (training/tensorrt.py) and the container's start-up build
(docker/entrypoint.py). Standard library only, so the entrypoint can import it in the serving image."""

from __future__ import annotations

from pathlib import Path

from . import contract

OPT_BATCH = 16


def profile_shapes(step: str, sizes: dict[str, int], max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape per input of an engine step: batch 1 / 16 / max_batch_size, the other dims
    resolved from `sizes` (the bundle's contract.json plus num_candidates).

    The candidate axis is fixed too: retrieval always returns num_candidates rows per user.
    """
    if step not in contract.ENGINE_STEPS:
        raise ValueError(f"{step!r} is not an engine step; engine steps: {contract.ENGINE_STEPS}")
    batches = (1, min(OPT_BATCH, max_batch), max_batch)
    missing = sorted({d for t in contract.STEP_BY_NAME[step].inputs for d in t.dims if isinstance(d, str)} - set(sizes))
    if missing:
        raise ValueError(f"{step}: sizes {missing} are not known (contract.json or serve.num_candidates)")
    return {t.name: tuple((b, *t.resolve(sizes)) for b in batches) for t in contract.STEP_BY_NAME[step].inputs}


def trtexec_command(trtexec: str, onnx: Path, engine: Path, shapes: dict) -> list[str]:
    def fmt(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in shapes.items())

    # --skipInference: the start path only needs the plan, not trtexec's benchmark run
    return [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}", "--fp16",
            f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}", "--skipInference"]
