"""What machine (and command, and commit) a benchmark ran on, in one place for every benchmark's results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
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


def commit() -> str:
    """The checkout's short commit, "+changes" when tracked files differ from it ("unknown" without git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def command_line(base: str, argv: list[str] | None) -> str:
    """The command that made a result: `base` and its arguments (the process's own when `argv` is None, i.e. when
    the benchmark runs from the shell)."""
    given = sys.argv[1:] if argv is None else argv
    return " ".join([base, *given])


def write_report(out: str | Path, name: str, tag: str, report: dict, md: list[str]) -> None:
    """benchmarks/results-style output: OUT/NAME[_TAG].json (the report) and .md (the lines)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{tag}" if tag else name
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")


def publish(out: str | Path, name: str, tag: str, report: dict, markdown, argv: list[str] | None) -> None:
    """Stamp `report` with its tag, the machine, the commit and the command (`python -m benchmarks.NAME ...`),
    write OUT/NAME_TAG.{json,md} (`markdown(report)`: the lines) and print the markdown."""
    report.update(tag=tag, machine=describe(), commit=commit(), command=command_line(f"python -m benchmarks.{name}", argv))
    md = markdown(report)
    write_report(out, name, tag, report, md)
    print("\n".join(md))
