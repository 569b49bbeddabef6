"""One frozen dataclass per stage, all loaded from one TOML file (configs/default.toml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.toml"


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # synthetic | interactions | movielens-100k | movielens-1m | movielens-latest-small
    movielens_dir: str = ""
    size: str = "small"
    seed: int = 7
    positive_threshold: float = 4.0  # rating data: rating >= this is a positive
    strong_threshold: float = 5.0  # rating data: rating >= this is also a "purchase" (the CVR target)
    rating_range: tuple[float, float] = (0.5, 5.0)


@dataclass(frozen=True)
class FeatureConfig:
    split: str = "time"  # time | user-time | random | none (deployment: everything trains)
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 2026
    holdout_latest: float = 0.1  # of each user's latest train actions: what the ranker learns to rank
    holdout_random: float = 0.1  # plus this share of the other train actions, at random
    holdout_unit: str = "session"  # session: whole sessions held out (never the rest of a visit) | action
    sequence_length: int = 50  # the last N actions the towers and the ranker read
    recent_categories: int = 10


@dataclass(frozen=True)
class RetrievalConfig:
    embedding_dim: int = 64
    id_dim: int = 32
    field_dim: int = 16
    tower_hidden: tuple[int, ...] = (128,)
    temperature: float = 0.05
    logq_correction: bool = True
    mixed_negatives: int = 256  # uniform random items added to each batch's in-batch negatives
    use_user_id: bool = False
    # share of training rows whose user input is the user's state after all their training actions (the
    # row's item left out) instead of the actions before the row: served users are asked about items from
    # anywhere in their past as well as what comes next (README, How it recommends). Several values: `train`
    # fits stage A with each and keeps the one whose two-tower alone scores the best NDCG@10 on the valid
    # split; one value fixes it
    whole_history_share: tuple[float, ...] = (0.0, 0.5)
    # where such a row's own item is left out: "sequence" (its slots of the sequence; the state's aggregates
    # still count it, as the server's state of the user does) or "state" (the whole state, aggregates too)
    whole_history_leave_out: str = "sequence"
    # stage A's rows (fit fold) read states built from the fit fold's actions only, not from every train action
    # (the holdout's included): training.train.FoldStates
    fold_states: bool = False
    id_dropout: float = 0.1  # item-id dropout in the item tower: attributes carry unseen items
    context_dropout: float = 0.25  # rows trained with the "unknown" context the server gets without one
    dropout: float = 0.1
    weight_decay: float = 1e-5
    batch_size: int = 512
    max_rows_per_epoch: int = 400_000  # bigger training sets: each epoch is a random sample of this many rows
    epochs: int = 30
    learning_rate: float = 2e-3
    patience: int = 3
    max_valid_users: int = 5000
    sparse_from_rows: int = 250_000  # an item-id table this big trains with sparse gradients (lazy Adam); 0: never
    # the ann route ranks by u.v / temperature + b * log(popularity share); train picks b on the holdout.
    # Off by default: it lifts the route alone but lowered the served lists on real data (README)
    popularity_prior: tuple[float, ...] = (0.0,)
    seed: int = 7


@dataclass(frozen=True)
class CFConfig:
    method: str = "auto"  # auto (EASE up to ease_max_items items, else item-kNN) | ease | knn | none
    ease_lambdas: tuple[float, ...] = (300.0, 100.0, 1000.0)  # the first, unless another wins on the holdout by 2 s.e.
    ease_max_items: int = 12_000
    neighbours: int = 500  # strongest |weights| kept per item: the exported route is sparse
    max_entries: int = 20_000_000  # at most this many weights in all (fewer neighbours per item in big catalogs)


@dataclass(frozen=True)
class RankingConfig:
    embedding_dim: int = 16
    bottom_mlp: tuple[int, ...] = (64, 16)
    top_mlp: tuple[int, ...] = (128, 64)
    din: bool = True
    din_length: int = 20  # the most recent actions target attention reads
    deep: str = "auto"  # auto: the deep part (embeddings, DIN, dot interactions) tried from deep_min_lists lists, kept if it wins on the validation lists | on | off
    deep_min_lists: int = 10_000  # see configs/default.toml
    user_item_cross: bool = False  # a bilinear user feature x candidate feature term in the wide part
    ignore_user_features: tuple[str, ...] = ("user_id",)
    cvr_weight: float = 1.0  # score = pCTR * (1 + cvr_weight * pCVR): a purchase counts 1 + w clicks
    cvr_loss_weight: float = 0.5
    listwise_weight: float = 1.0  # plus a softmax over each list with its clicks as targets (ListNet), this much
    max_users: int = 20_000
    users_per_batch: int = 8
    steps: int = 4000  # a fixed budget: a few hundred held-out lists are too few to early-stop on
    ema_decay: float = 0.995  # the served weights: a moving average of the trained ones
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    dropout: float = 0.1
    valid_share: float = 0.1  # of the holdout users, kept out of training to report the ranker's NDCG@10
    # the served score's popularity exponent (runtime.steps.popularity_factor), chosen by `train` on later
    # held-out data: one value fixes it, (0.0,) turns it off
    popularity_prior: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    seed: int = 7


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # auto | flat | ivf | hnsw; auto: exact (flat) up to exact_max_items, IVF above
    # at the medium shop's 100k items IVF serves the same lists (NDCG@10 .0535 vs .0536) for 21 % less step work
    exact_max_items: int = 50_000
    # search breadth: 0 = the smallest that reaches target_recall (recall@num_candidates against exact search on
    # the store users' embeddings, measured at export and recorded in the bundle's report); a positive value is
    # used as given
    ivf_nprobe: int = 0
    hnsw_ef_search: int = 0
    target_recall: float = 0.95
    ivf_nlist: int = 0  # IVF lists; 0 = 4 * sqrt(items)
    hnsw_m: int = 32


@dataclass(frozen=True)
class ServeConfig:
    num_candidates: int = 300  # N items merged from the recall routes and ranked; the largest k a request may ask
    recent_window: int = 5  # the last actions the short-term item-to-item score reads
    exclude_seen: bool = True  # default of the request flag `exclude_seen`
    repeat_categories: tuple[str, ...] = ()  # items of these categories stay recommendable after an interaction
    diversity: float = 0.0  # MMR lambda when a request sends none: 0 = the ranker's order, 1 = most diverse
    diversity_pool: int = 50  # MMR re-ranks the best max(pool, k) candidates
    max_per_category: int = 0  # at most this many items of one category in a top-k (0: no cap)
    blocked_items_file: str = ""  # raw item ids never served (blocked, out of stock), one per line; re-read when it changes
    # the item index's lists memory-mapped (the instances share one copy) or read into each instance (default):
    # an IVF search scans its lists' pages, and over a map it was ~2 ms slower a request at 1M items (docs/performance.md)
    mmap_index: bool = False
    # scenes and layered experiments (runtime/strategy.py): request input `scene` picks one; built-in home,
    # item_detail and cart, a [serve.scenes.<name>] table replaces or adds one; [serve.experiments.<layer>]
    default_scene: str = "home"
    scenes: dict = field(default_factory=dict)
    experiments: dict = field(default_factory=dict)
    max_context_items: int = 50  # context_item_ids a request may send (viewed item, cart)
    max_blend_weight: float = 10.0  # each weight of a request's `blend` must be in [0, this]
    # routes precomputed by `shoprec export` from the served actions
    trending_half_life_days: float = 7.0  # trending: positives weighted 0.5 ** (age / half-life) at the last event
    copurchase_window: int = 5  # copurchase: a purchase votes for the user's next purchases up to this many
    copurchase_neighbours: int = 100  # strongest co-purchased items kept per item
    # the online user store (runtime/online_store.py): "private" = `shoprec serve` starts its own
    # redis-server (data under artifacts/online), "redis://host:port/db" = an existing one, "none" =
    # the export's snapshot only. The in-process pipeline and evaluation read the snapshot unless given a URL.
    online_store: str = "private"
    online_timeout_ms: float = 50.0  # a slower read serves the request from the snapshot, marked degraded
    online_retry_s: float = 1.0  # after a failed read, the store is not asked again for this long
    online_ttl_days: float = 30.0  # live keys of a user expire this long after their last event
    online_max_actions: int = 2000  # live actions kept per user (the latest); bounds memory per user
    online_max_event_ids: int = 10_000  # applied event ids remembered per user for idempotency (the latest)
    online_max_ahead_s: float = 3600.0  # an event later than the writer's clock by more than this is refused (<= 0: never)
    online_max_memory_mb: int = 1024  # the private instance's maxmemory; when full it refuses events (noeviction)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    # gRPC over TLS: PEM files (absolute paths), both or neither ("": plaintext); with grpc_tls_client_ca
    # set, clients must also present a certificate signed by that CA (mutual TLS)
    # `shoprec serve` puts a validating front (serving/http_front.py) on the HTTP port and tritonserver's own
    # HTTP on a private loopback port: Triton 2.51's HTTP front end dies on a few malformed requests
    http_front: bool = True
    # a gRPC front (serving/grpc_front.py) caps request size on the gRPC port: Triton 2.51 takes messages up to
    # 2 GiB. "auto": on when gRPC listens beyond loopback (it costs a local hop), off on 127.0.0.1; true / false
    grpc_front: str = "auto"
    grpc_max_message_mb: float = 1.0
    grpc_tls_cert: str = ""
    grpc_tls_key: str = ""
    grpc_tls_client_ca: str = ""
    ready_timeout_s: float = 120.0
    # instances per served model ({"pipeline": 4}: four stubs run batches at once); absent: the step's default
    # (contract.default_instances: the cpu profile's whole-graph model one per core, up to 8; others 1)
    instances: dict = field(default_factory=dict)
    # a model's CPU instances preferred in order while free (tritonserver's rate limiter: serving/command.py), so at
    # low load the first one serves back to back, caches warm; false: the instances take turns
    prefer_first_instance: bool = True
    # Triton's dynamic batcher per served model ({"pipeline": {"preferred_batch_sizes": [], "max_queue_delay_us":
    # 0}}): what each step's declaration says unless set (contract.Step; serving/command.py apply_batching)
    batching: dict = field(default_factory=dict)
    # Triton's response cache (local, LRU) for the steps whose outputs depend on their inputs alone
    # (contract.Step.cacheable: retrieval and the candidate features); 0: no cache. Off by default: a miss costs
    # ~0.35 ms a request here, a hit saves a third (docs/performance.md, Response cache)
    response_cache_mb: int = 0
    # the step doctor (serving/canary.py): one request through the ensemble this often; a failure or a
    # reply slower than canary_timeout_s reloads the failed step (or every step), then restarts the server
    canary_interval_s: float = 2.0  # 0: off
    canary_timeout_s: float = 5.0
    # numbered bundles (shoprec/bundles.py, serving/versions.py): export keeps this many besides those a live
    # server serves or can roll back to; a deploy waits swap_drain_s for requests already in the old
    # version's steps before it unloads them
    keep_versions: int = 3
    swap_drain_s: float = 1.0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    cf: CFConfig = field(default_factory=CFConfig)
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
    """Load the TOML config; missing sections/keys take the dataclass defaults. Without a path: configs/default.toml
    beside the code, or, where the code is installed without it (the serving image), the dataclass defaults."""
    if not path and not DEFAULT_CONFIG.is_file():
        return Config()
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
