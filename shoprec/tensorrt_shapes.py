"""TensorRT optimisation profiles and the trtexec command: one definition for the export-time
build (training/tensorrt.py) and the container's start-up build (docker/entrypoint.py).
Standard library only, so the entrypoint can import it in the serving image."""

from __future__ import annotations

from pathlib import Path

OPT_BATCH = 16


def profile_shapes(model: str, dims: dict[str, int], max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape per ONNX input: batch 1 / 16 / max_batch_size, feature dims fixed.

    The candidate axis N is fixed too: retrieval always returns num_candidates rows per user.
    """
    per_row = {
        "user_cat": (dims["user_cat_dim"],),
        "user_cont": (dims["user_cont_dim"],),
        "seq_items": (dims["seq_len"],),
        "seq_kinds": (dims["seq_len"],),
        "item_cat": (dims["num_candidates"], dims["item_cat_dim"]),
        "item_cont": (dims["num_candidates"], dims["item_cont_dim"]),
        "candidate_dense": (dims["num_candidates"], dims["dense_dim"]),
    }
    user = ("user_cat", "user_cont", "seq_items", "seq_kinds")
    names = {"user_tower": user, "ranker": (*user, "item_cat", "item_cont", "candidate_dense")}[model]
    batches = (1, min(OPT_BATCH, max_batch), max_batch)
    return {n: tuple((b, *per_row[n]) for b in batches) for n in names}


def trtexec_command(trtexec: str, onnx: Path, engine: Path, shapes: dict) -> list[str]:
    def fmt(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in shapes.items())

    # --skipInference: the start path only needs the plan, not trtexec's benchmark run
    return [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}", "--fp16",
            f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}", "--skipInference"]
