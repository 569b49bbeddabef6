"""Shared fixtures: one tiny pipeline run (data -> features -> train -> export) per test session,
and one real tritonserver over it for the integration tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from shoprec.config import load_config

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def cfg():
    c = load_config()
    c = c.replace("retrieval", epochs=4, patience=4, batch_size=256)  # tiny has few clicks: more, smaller steps
    return c.replace("ranking", epochs=2, patience=2)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, cfg) -> Path:
    from feature_workflows.pipeline import build_features
    from feature_workflows.synthetic import generate
    from training.export import export_bundle
    from training.train import train_all

    root = tmp_path_factory.mktemp("artifacts")
    generate(root / "data" / "raw", "tiny", seed=7, progress=False)
    build_features(root / "data" / "raw", root / "features", cfg.features, progress=False)
    train_all(root / "features", root / "models", cfg.retrieval, cfg.ranking, "cpu", progress=False)
    export_bundle(root / "features", root / "models", root / "serving", cfg)
    return root


@pytest.fixture(scope="session")
def triton(artifacts, cfg):
    from serving.launcher import TritonServer

    server = TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True)
    with server:
        yield server


@pytest.fixture(scope="session")
def pipeline(artifacts):
    from serving.pipeline import Pipeline

    return Pipeline(artifacts / "serving")
