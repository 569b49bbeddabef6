"""One frozen dataclass per stage, all loaded from one TOML file (configs/default.toml)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.toml"


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"
    movielens_dir: str = ""
    size: str = "small"
    seed: int = 7


@dataclass(frozen=True)
class FeatureConfig:
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    recent_items: int = 3
    recent_categories: int = 10
    age_buckets: tuple[int, ...] = (18, 25, 35, 45, 55, 65)


@dataclass(frozen=True)
class RetrievalConfig:
    embedding_dim: int = 64
    tower_hidden: tuple[int, ...] = (128,)
    temperature: float = 0.05
    logq_correction: bool = True
    ignore_user_features: tuple[str, ...] = ("user_id", "recent_item_*")
    batch_size: int = 1024
    epochs: int = 8
    learning_rate: float = 3e-3
    patience: int = 2
    seed: int = 7


@dataclass(frozen=True)
class RankingConfig:
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)
    top_mlp: tuple[int, ...] = (128, 64)
    cvr_loss_weight: float = 0.5
    ignore_user_features: tuple[str, ...] = ("user_id", "recent_item_*")
    random_negatives: int = 60
    hard_negatives: int = 10
    hard_negative_ranks: tuple[int, ...] = (100, 300)
    batch_size: int = 4096
    epochs: int = 3
    learning_rate: float = 3e-3
    patience: int = 1
    seed: int = 7


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"
    ivf_nprobe: int = 32
    hnsw_ef_search: int = 128


@dataclass(frozen=True)
class ServeConfig:
    num_candidates: int = 300
    max_k: int = 100
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    ready_timeout_s: float = 120.0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def replace(self, section: str, **changes) -> "Config":
        """A copy with some fields of one section changed (CLI overrides, tests)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def _build(cls, values: dict, where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**coerced)


def load_config(path: str | Path | None = None) -> Config:
    """Load the TOML config; missing sections/keys take the dataclass defaults."""
    path = Path(path) if path else DEFAULT_CONFIG
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: {sorted(sections)}")
    kwargs = {}
    for f in dataclasses.fields(Config):
        cls = f.default_factory().__class__
        kwargs[f.name] = _build(cls, raw.get(f.name, {}), f"{path} [{f.name}]")
    return Config(**kwargs)
