"""Shared fixtures: one tiny pipeline run (data -> features -> train -> export) per test session,
and one real tritonserver over it for the integration tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from shoprec.config import load_config

warnings.filterwarnings("ignore")


def small_config(cfg):
    """The default config with training budgets cut for test-sized data (same code paths)."""
    cfg = cfg.replace("retrieval", epochs=4, patience=2, batch_size=256)
    return cfg.replace("ranking", steps=300)


# an A/A experiment layer: every response carries an arm and the metrics count by arm; the lists are unchanged
EXPERIMENT = """
[serve.experiments.ranking]
salt = "tests"
arms = { a = 0.5, b = 0.5 }
"""


@pytest.fixture(scope="session")
def config_file(tmp_path_factory) -> Path:
    """The default config plus the test experiment: the session server's steps read their settings from it."""
    from shoprec.config import DEFAULT_CONFIG

    path = tmp_path_factory.mktemp("config") / "config.toml"
    text = DEFAULT_CONFIG.read_text()
    assert text.count("\n[serve]\n") == 1 and "online_timeout_ms" not in text
    # a loaded 2-core CI machine can take longer than the default 50 ms to answer a Redis read; the request would be
    # served degraded (from the snapshot) and a test of live state would fail by chance. A dead Redis still fails at
    # once (connection refused), so the degraded tests are unchanged
    text = text.replace("\n[serve]\n", "\n[serve]\nonline_timeout_ms = 1000.0\n")
    path.write_text(text + EXPERIMENT)
    return path


@pytest.fixture(scope="session")
def cfg(config_file):
    return small_config(load_config(config_file))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, cfg) -> Path:
    from feature_workflows.pipeline import build_features
    from feature_workflows.synthetic import generate
    from training.export import export_bundle
    from training.train import train_all

    root = tmp_path_factory.mktemp("artifacts")
    generate(root / "data" / "raw", "tiny", seed=7, progress=False)
    build_features(root / "data" / "raw", root / "features", cfg.features, progress=False)
    train_all(root / "features", root / "models", cfg, "cpu", progress=False)
    export_bundle(root / "features", root / "models", root / "serving", cfg)
    return root


@pytest.fixture(scope="session")
def triton(artifacts, cfg, config_file):
    from serving.launcher import TritonServer

    # no step doctor here: its canary requests count in the steps' metrics like any request, and the metrics
    # tests assert exact deltas (tests/test_step_doctor.py runs a server with one). No response cache either: a
    # cached step does not run, so its counters would depend on what earlier tests asked
    # (test_the_response_cache_answers_a_repeated_request_and_never_the_canary runs a server with it)
    server = TritonServer.from_config(cfg.replace("serve", canary_interval_s=0.0, response_cache_mb=0).serve, artifacts,
                                      ephemeral_ports=True, config_path=config_file)
    with server:
        yield server


@pytest.fixture(scope="session")
def triton_stages(artifacts, cfg, config_file):
    """The cpu-stages profile (three python models), for the tests that call a stage model directly."""
    from serving.launcher import TritonServer

    server = TritonServer.from_config(cfg.replace("serve", canary_interval_s=0.0, response_cache_mb=0).serve, artifacts,
                                      profile="cpu-stages", ephemeral_ports=True, config_path=config_file)
    with server:
        yield server


@pytest.fixture(scope="session")
def pipeline(artifacts, cfg):
    from runtime.pipeline import Pipeline

    return Pipeline(artifacts / "serving", cfg=cfg.serve)
