"""The step graph, declared once: every step, the tensors that cross its boundaries, its batching,
device and profiles, and the class that computes it.

From this one declaration come every generated config.pbtxt of every profile
(serving/repository.py), the Triton python models (serving/triton_models.py: one generic adapter),
the TensorRT shape profiles (shoprec/tensorrt_shapes.py), the container's engine list
(docker/entrypoint.py), the in-process pipeline used by evaluation and the FastAPI baseline
(runtime/pipeline.py), and the names of the exported ONNX graphs (training/export.py).

A dim is an int, -1 (varies per request), or the name of a size the exporter records in the bundle's
contract.json ("user_cat_dim") or the serve config fixes ("num_candidates"). Configs render named
dims as -1; every step checks them against its bundle when it loads. Dims exclude the batch dim.

Standard library only: the container entrypoint imports it without NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ENSEMBLE = "recommender"
PROFILES = ("cpu", "cpu-stages", "gpu")


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton dtype without the TYPE_ prefix: INT64, INT32, FP32, BOOL, STRING
    dims: tuple[int | str, ...]
    optional: bool = False
    # a step input whose width varies per request (-1) and that a batch may pad to its widest request with
    # this value (the step ignores it): Triton's batcher then batches requests of different widths
    # (allow_ragged_batch) and the python adapter pads them into one array. None: requests batch only with
    # requests of the same shape
    pad: int | None = None

    def resolve(self, sizes: dict) -> tuple[int, ...]:
        """The dims with named sizes looked up in `sizes` (contract.json plus num_candidates)."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    @property
    def config_dims(self) -> list[int]:
        return [-1 if isinstance(d, str) else d for d in self.dims]


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    impl: str  # the class in runtime/steps.py that computes the step (Triton and in-process alike)
    gpu_kind: str  # instance kind in the gpu profile: KIND_CPU for light steps, KIND_GPU for models
    engine: bool = False  # an exported ONNX graph: python+ORT in the cpu profile, a TensorRT plan in the gpu profile
    per_request: bool = False  # output length differs per request (top-k): answers each request of a batch
    profiles: tuple[str, ...] = PROFILES
    max_batch_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = (8, 32, 64)
    # cpu: no queue delay. On a few cores every step instance is busy under load, so requests queue
    # behind it and batch anyway; a delay would only add latency at low load (6 steps x delay).
    # gpu: a short delay fills bigger batches for the GPU kernels.
    cpu_queue_delay_us: int = 0
    gpu_queue_delay_us: int = 100
    # cpu: an ONNX step over candidates runs a batch at most this many candidate rows (users x num_candidates) at a
    # time, 0 = the whole batch at once. The ranker's attention tensors for 16 users of 300 candidates leave the
    # cache: four runs of four users cost less than one of sixteen (benchmarks/step_cost --chunk-rows). Rows are
    # independent, so the outputs are the same.
    cpu_chunk_rows: int = 0
    # (step tensor, graph tensor) pairs where the ensemble routes another tensor to or from this step
    # (Triton's input_map/output_map): a step inserted before this one rewires it without a code change
    wiring: tuple[tuple[str, str], ...] = ()
    parts: tuple[str, ...] = ()  # a fused step (cpu profile): the graph's steps it runs, in order, in one model
    # its outputs are a function of its inputs and the bundle alone (no clock, no live state read inside the step);
    # `response_cache` says whether Triton's cache answers repeated requests for it (serve.response_cache_mb)
    cacheable: bool = False
    # instances when serve.instances does not name the model: 1, or "cores" (one per CPU core, at most 8: the
    # whole-pipeline model of the cpu profile, whose instances are the server's only parallelism)
    instances: int | str = 1

    def kind(self, profile: str) -> str:
        return self.gpu_kind if profile == "gpu" else "KIND_CPU"

    @property
    def response_cache(self) -> bool:
        """Cached by Triton: a cacheable step that reads CACHE_SALT, so the canary's fresh salt still runs it."""
        return self.cacheable and any(t.name == "cache_salt" for t in self.inputs)

    def graph_name(self, tensor: str) -> str:
        """The ensemble tensor a step input/output is connected to."""
        return dict(self.wiring).get(tensor, tensor)


# request inputs (per request: one user)
USER_ID = Tensor("user_id", "INT64", (1,))
K = Tensor("k", "INT32", (1,))
HOUR = Tensor("hour", "INT32", (1,), optional=True)
WEEKDAY = Tensor("weekday", "INT32", (1,), optional=True)
CLIENT_DEVICE = Tensor("client_device", "STRING", (1,), optional=True)  # request context (mobile, web): not a compute device
EXCLUDE_SEEN = Tensor("exclude_seen", "BOOL", (1,), optional=True)
DIVERSITY = Tensor("diversity", "FP32", (1,), optional=True)  # MMR lambda in [0, 1]; absent: the scene's or serve.diversity
SCENE = Tensor("scene", "STRING", (1,), optional=True)  # home, item_detail, cart, or a configured one; absent: serve.default_scene
CONTEXT_ITEM_IDS = Tensor("context_item_ids", "INT64", (-1,), optional=True)  # raw ids: the viewed item, the cart
FORCE_ARMS = Tensor("force_arms", "STRING", (1,), optional=True)  # QA: "layer=arm,..." instead of the hashed arms
BLEND = Tensor("blend", "FP32", (3,), optional=True)  # final score weights: pCTR, pCTR * pCVR, pCTR * pCVR * item value
# any value: part of the response cache's key and read by nothing else, so a request carrying a fresh one runs
# every step (the canary: a dead stub behind a cached step would otherwise go unseen)
CACHE_SALT = Tensor("cache_salt", "INT64", (1,), optional=True)
# intermediate tensors
USER_CAT = Tensor("user_cat", "INT64", ("user_cat_dim",))
USER_CONT = Tensor("user_cont", "FP32", ("user_cont_dim",))
SEQ_ITEMS = Tensor("seq_items", "INT64", ("seq_len",))
SEQ_KINDS = Tensor("seq_kinds", "INT64", ("seq_len",))
# every action of the user (item rows, kinds 1-4, time order; -1 / 0 pad to the batch's longest): the
# seen-item filter and the item-to-item routes, from the live store or the snapshot
HISTORY_ROWS = Tensor("history_rows", "INT64", (-1,), pad=-1)
HISTORY_KINDS = Tensor("history_kinds", "INT32", (-1,), pad=0)
UNAVAILABLE_ROWS = Tensor("unavailable_rows", "INT64", (-1,), pad=-1)  # item rows no list may hold (-1 pads)
COLD_START = Tensor("cold_start", "BOOL", (1,))
STRATEGY = Tensor("strategy", "INT32", (2,))  # scene code, experiment variant (runtime/strategy.py)
CONTEXT_ROWS = Tensor("context_rows", "INT64", (-1,), pad=-1)  # item rows of the context items (-1 pads and unknown ids)
DEGRADED = Tensor("degraded", "BOOL", (1,))  # the online store failed: served from the export's snapshot
USER_EMBEDDING = Tensor("user_embedding", "FP32", ("embedding_dim",))
CANDIDATE_ROWS = Tensor("candidate_rows", "INT64", ("num_candidates",))
CANDIDATE_DENSE = Tensor("candidate_dense", "FP32", ("num_candidates", "dense_dim"))
CANDIDATE_ROUTES = Tensor("candidate_routes", "INT32", ("num_candidates",))  # bit i: in recall route i's list
ITEM_CAT = Tensor("item_cat", "INT64", ("num_candidates", "item_cat_dim"))
ITEM_CONT = Tensor("item_cont", "FP32", ("num_candidates", "item_cont_dim"))
RANKING_SCORES = Tensor("ranking_scores", "FP32", ("num_candidates",))  # pCTR * (1 + ranking.cvr_weight * pCVR)
RANKING_PROBS = Tensor("ranking_probs", "FP32", ("num_candidates", 2))  # pCTR, pCVR: what a blend weighs
# response
ITEM_IDS = Tensor("item_ids", "INT64", (-1,))
SCORES = Tensor("scores", "FP32", (-1,))
ITEM_ROUTES = Tensor("item_routes", "INT32", (-1,))  # per served item: bitmask of the recall routes it came from
EXPERIMENT = Tensor("experiment", "STRING", (1,))  # the arms the user got: "layer=arm,..." ("" without experiments)
SERVED_VERSION = Tensor("served_version", "INT64", (1,))  # the bundle version that computed the list (shoprec/bundles.py)

REQUEST_INPUTS = (USER_ID, K, HOUR, WEEKDAY, CLIENT_DEVICE, EXCLUDE_SEEN, DIVERSITY, SCENE, CONTEXT_ITEM_IDS, FORCE_ARMS, BLEND,
                  CACHE_SALT)
RESPONSE_OUTPUTS = (ITEM_IDS, SCORES, COLD_START, ITEM_ROUTES, DEGRADED, EXPERIMENT, SERVED_VERSION)
# the recall routes (runtime/candidates.py): fusion tie order, bit order of `item_routes`
ROUTES = ("cf_all", "cf_pos", "ann", "category", "popular", "trending", "similar", "similar_ann", "copurchase")
USER_MODEL_INPUTS = (USER_CAT, USER_CONT, SEQ_ITEMS, SEQ_KINDS)
RANKER_INPUTS = (*USER_MODEL_INPUTS, ITEM_CAT, ITEM_CONT, CANDIDATE_DENSE)

STEPS: tuple[Step, ...] = (
    Step("feature_transform", (USER_ID, K, HOUR, WEEKDAY, CLIENT_DEVICE, SCENE, CONTEXT_ITEM_IDS, FORCE_ARMS),
         (*USER_MODEL_INPUTS, HISTORY_ROWS, HISTORY_KINDS, UNAVAILABLE_ROWS, COLD_START, DEGRADED, STRATEGY, CONTEXT_ROWS,
          EXPERIMENT, SERVED_VERSION), "FeatureTransform", "KIND_CPU"),
    Step("user_tower", USER_MODEL_INPUTS, (USER_EMBEDDING,), "OnnxStep", "KIND_GPU", engine=True),
    Step("retrieval", (USER_EMBEDDING, HISTORY_ROWS, HISTORY_KINDS, UNAVAILABLE_ROWS, EXCLUDE_SEEN, STRATEGY, CONTEXT_ROWS,
                       CACHE_SALT),
         (CANDIDATE_ROWS, CANDIDATE_DENSE, CANDIDATE_ROUTES), "Retrieval", "KIND_GPU", cacheable=True),
    Step("candidate_features", (CANDIDATE_ROWS,), (ITEM_CAT, ITEM_CONT), "CandidateFeatures", "KIND_CPU", cacheable=True),
    Step("ranker", RANKER_INPUTS, (RANKING_SCORES, RANKING_PROBS), "OnnxStep", "KIND_GPU", engine=True, max_batch_size=64,
         preferred_batch_sizes=(4, 16, 32), cpu_chunk_rows=1200),
    Step("topk", (CANDIDATE_ROWS, RANKING_SCORES, K, COLD_START, DIVERSITY, CANDIDATE_ROUTES, STRATEGY, RANKING_PROBS, BLEND),
         (ITEM_IDS, SCORES, ITEM_ROUTES),
         "TopK", "KIND_CPU", per_request=True),
)
STEP_BY_NAME = {s.name: s for s in STEPS}
ENGINE_STEPS = tuple(s.name for s in STEPS if s.engine)  # the ONNX graphs the gpu profile serves as TensorRT plans


# Python-backend hops cost adapter work and a shared-memory round trip each, and on a few cores every
# extra process competes for them, so the cpu profiles fuse adjacent steps (ALL: every step of the
# graph, in order):
#   cpu         one model runs the whole graph, one instance per core: the fewest hops and the biggest
#               batches (benchmarks/results/instances_medium.md: 1.5x the throughput of cpu-stages at
#               concurrency 16 and a lower p50 at concurrency 1, medium shop, 2 cores);
#   cpu-stages  three models (features, candidates, ranking): per-step statistics and instance counts, and
#               Triton's response cache on `candidates` (the one stage whose answer is a function of its inputs).
# The gpu profile keeps every step its own model (TensorRT plans, GPU instances).
ALL = ("*",)
STAGE_FUSION: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("user_features", ("feature_transform", "user_tower")),
    ("candidates", ("retrieval", "candidate_features")),
    ("ranking", ("ranker", "topk")),
)
FUSION = {"cpu": (("pipeline", ALL),), "cpu-stages": STAGE_FUSION, "gpu": ()}


def profile_steps(profile: str) -> tuple[Step, ...]:
    """The steps one profile's repository serves: the graph's steps of that profile, adjacent ones fused
    where FUSION says so."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    steps = [s for s in STEPS if profile in s.profiles]
    names = [s.name for s in steps]
    out: list[Step] = []
    groups = {(names[0] if parts == ALL else parts[0]): (name, tuple(names) if parts == ALL else parts)
              for name, parts in FUSION[profile]}
    i = 0
    while i < len(steps):
        name, parts = groups.get(steps[i].name, (None, (steps[i].name,)))
        if names[i : i + len(parts)] != list(parts):
            raise ValueError(f"fusion {name!r}: {parts} are not adjacent steps of the {profile} graph {names}")
        if name is None:
            out.append(steps[i])
        else:
            fused = _fuse(name, steps[i : i + len(parts)], steps[i + len(parts):], profile)
            out.append(replace(fused, instances="cores") if len(parts) == len(steps) else fused)
        i += len(parts)
    if any(s.per_request for s in out[:-1]):
        raise ValueError(f"{profile}: only the last step may run per request, got {[s.name for s in out if s.per_request]}")
    return tuple(out)


def _fuse(name: str, parts: list[Step], later: list[Step], profile: str) -> Step:
    """One step running `parts` in order: it reads what they read and no earlier part writes, and returns
    what later steps or the response read. Tensors carry their graph names (wiring applied)."""
    produced: set[str] = set()
    inputs: list[Tensor] = []
    for s in parts:
        for t in s.inputs:
            g = s.graph_name(t.name)
            if g not in produced and g not in {x.name for x in inputs}:
                inputs.append(replace(t, name=g))
        produced |= {s.graph_name(t.name) for t in s.outputs}
    read_later = {s.graph_name(t.name) for s in later for t in s.inputs} | {t.name for t in RESPONSE_OUTPUTS}
    outputs = tuple(replace(t, name=s.graph_name(t.name)) for s in parts for t in s.outputs if s.graph_name(t.name) in read_later)
    return Step(name, tuple(inputs), outputs, "Fused", "KIND_CPU", engine=False, per_request=any(s.per_request for s in parts),
                profiles=(profile,), max_batch_size=min(s.max_batch_size for s in parts),
                preferred_batch_sizes=parts[0].preferred_batch_sizes, parts=tuple(s.name for s in parts),
                cacheable=all(s.cacheable for s in parts))


def default_instances(profile: str, cores: int) -> dict[str, int]:
    """The models of a profile that do not run one instance by default: one per core (up to 8). serve.instances
    overrides them."""
    return {s.name: max(1, min(cores, 8)) for s in profile_steps(profile) if s.instances == "cores"}


def profile_step(profile: str, name: str) -> Step:
    """A step of one profile by name (a fused step exists only in its profile)."""
    for s in profile_steps(profile):
        if s.name == name:
            return s
    raise KeyError(f"the {profile} profile has no step {name!r}")


def num_candidates(configured: int, n_items: int) -> int:
    """Candidates ranked per request, and so the largest k: the serve config's count, never more than the catalog."""
    return int(min(configured, n_items))


# ONNX graphs exported by training/export.py: (inputs, outputs), batch dim first. The served ones are steps.
ONNX_MODELS = {
    **{name: (STEP_BY_NAME[name].inputs, STEP_BY_NAME[name].outputs) for name in ENGINE_STEPS},
    "item_tower": ((Tensor("item_cat", "INT64", ("item_cat_dim",)), Tensor("item_cont", "FP32", ("item_cont_dim",))),
                   (Tensor("item_embedding", "FP32", ("embedding_dim",)),)),
}

# the serving bundle (artifacts/serving): every file a Triton step loads, checked by manifest
BUNDLE_FILES = {
    "query_plan": "query_plan.json",
    "query_vocab": "query_vocab.npz",
    "user_store": "user_store.npz",
    "item_table": "item_table.npz",
    "user_tower": "user_tower.onnx",
    "ranker": "ranker.onnx",
    "item_tower": "item_tower.onnx",
    "item_embeddings": "item_embeddings.npy",
    "faiss_index": "items.faiss",
    "cf_all": "cf_all.npz",
    "cf_pos": "cf_pos.npz",
    "scene_routes": "scene_routes.npz",  # trending order, co-purchase neighbours (training/export.py)
    "contract": "contract.json",
}
