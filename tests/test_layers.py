"""Stages import downward only: every import in the code (lazy ones inside functions included) is
checked against the layer table below, the one the README's layout section describes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shoprec.config import REPO_ROOT

# package -> the project packages it may import (itself included)
ALLOWED = {
    "shoprec": {"shoprec"},  # the core: config, contract, device, manifest, progress, errors
    "runtime": {"shoprec", "runtime"},  # request-time code: what the server runs, offline stages reuse
    "feature_workflows": {"shoprec", "runtime", "feature_workflows"},
    "training": {"shoprec", "runtime", "feature_workflows", "training"},
    "serving": {"shoprec", "runtime", "serving"},  # Triton: never training or feature fitting
    "client": {"shoprec", "client"},
    "benchmarks": {"shoprec", "runtime", "feature_workflows", "training", "serving", "client", "benchmarks"},
    "app": set(),  # the application layer: the only place that may import every stage (filled below)
    "docker": {"shoprec", "serving"},  # the container entrypoint: the core and the server command line
}
PROJECT = set(ALLOWED) - {"docker"}
ALLOWED["app"] = PROJECT


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _files(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_downward(package):
    files = _files(package)
    assert files, f"{package}/ has no python files"
    bad = [f"{p.relative_to(REPO_ROOT)}:{line} imports {mod}" for p in files for line, mod in _imports(p)
           if mod in PROJECT and mod not in ALLOWED[package]]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_top_level_package_has_a_layer():
    packages = {p.parent.name for p in REPO_ROOT.glob("*/__init__.py")}
    assert packages <= set(ALLOWED), f"packages without a layer in tests/test_layers.py: {sorted(packages - set(ALLOWED))}"


def test_the_table_catches_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from training.train import train_all\n")
    assert [m for _, m in _imports(bad) if m not in ALLOWED["serving"] and m in PROJECT] == ["training"]
