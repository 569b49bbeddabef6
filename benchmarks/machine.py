"""What machine a benchmark ran on, in one place for every benchmark's results."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """e.g. 'x86_64, 2-core AMD EPYC' (a GPU, when used, is added by the benchmark that used it)."""
    return f"{platform.machine()}, {os.cpu_count()}-core {cpu_model()}"
