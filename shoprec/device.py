"""The one place that decides CPU or GPU, for every stage.

Training asks `torch_device()`; FAISS asks `faiss_gpu_available()`; Triton models never ask:
they take the device Triton assigned (`model_instance_kind`, `model_instance_device_id`).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def torch_device(prefer: str = "auto") -> str:
    """'cuda' when available (or asked for and present), else 'cpu'."""
    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {prefer!r}")
    if prefer == "cpu":
        return "cpu"
    if prefer == "cuda" and not has_cuda():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
    return "cuda" if has_cuda() else "cpu"


@functools.lru_cache(maxsize=None)
def faiss_gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def triton_device(args: dict) -> tuple[str, int]:
    """(kind, device_id) from the args Triton passes to a python model's initialize()."""
    kind = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
    return kind, int(args.get("model_instance_device_id", 0) or 0)
