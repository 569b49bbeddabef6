"""The tensor contract: every name, dtype and shape that crosses a step boundary.

Each Triton step's config.pbtxt is generated from this module (serving/repository.py) and a test
regenerates and diffs the committed files; the ONNX exporters name their inputs/outputs from it.
Dims exclude the batch dimension; -1 is variable (feature counts come from the fitted workflow
and are recorded in the serving bundle's contract.json).
"""

from __future__ import annotations

from dataclasses import dataclass

ENSEMBLE = "recommender"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton dtype without the TYPE_ prefix: INT64, INT32, FP32, BOOL, STRING
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    runtime: str  # "python": python backend everywhere; "onnx": python+ORT on cpu, TensorRT plan on gpu
    gpu_kind: str  # instance kind in the gpu profile: KIND_CPU for light steps, KIND_GPU for models
    max_batch_size: int = 256
    preferred_batch_sizes: tuple[int, ...] = (8, 32, 64)
    # cpu: no queue delay. On a few cores every step instance is busy under load, so requests queue
    # behind it and batch anyway; a delay would only add latency at low load (6 steps x delay).
    # gpu: a short delay fills bigger batches for the GPU kernels.
    cpu_queue_delay_us: int = 0
    gpu_queue_delay_us: int = 100


# request inputs (per request: one user)
USER_ID = Tensor("user_id", "INT64", (1,))
K = Tensor("k", "INT32", (1,))
HOUR = Tensor("hour", "INT32", (1,), optional=True)
WEEKDAY = Tensor("weekday", "INT32", (1,), optional=True)
DEVICE = Tensor("device", "STRING", (1,), optional=True)
EXCLUDE_SEEN = Tensor("exclude_seen", "BOOL", (1,), optional=True)
# intermediate tensors
USER_CAT = Tensor("user_cat", "INT64", (-1,))
USER_CONT = Tensor("user_cont", "FP32", (-1,))
SEQ_ITEMS = Tensor("seq_items", "INT64", (-1,))
SEQ_KINDS = Tensor("seq_kinds", "INT64", (-1,))
USER_ROW = Tensor("user_row", "INT64", (1,))
COLD_START = Tensor("cold_start", "BOOL", (1,))
USER_EMBEDDING = Tensor("user_embedding", "FP32", (-1,))
CANDIDATE_ROWS = Tensor("candidate_rows", "INT64", (-1,))
CANDIDATE_DENSE = Tensor("candidate_dense", "FP32", (-1, -1))
ITEM_CAT = Tensor("item_cat", "INT64", (-1, -1))
ITEM_CONT = Tensor("item_cont", "FP32", (-1, -1))
RANKING_SCORES = Tensor("ranking_scores", "FP32", (-1,))
# response
ITEM_IDS = Tensor("item_ids", "INT64", (-1,))
SCORES = Tensor("scores", "FP32", (-1,))

REQUEST_INPUTS = (USER_ID, K, HOUR, WEEKDAY, DEVICE, EXCLUDE_SEEN)
RESPONSE_OUTPUTS = (ITEM_IDS, SCORES, COLD_START)
USER_MODEL_INPUTS = (USER_CAT, USER_CONT, SEQ_ITEMS, SEQ_KINDS)
RANKER_INPUTS = (*USER_MODEL_INPUTS, ITEM_CAT, ITEM_CONT, CANDIDATE_DENSE)

STEPS: tuple[Step, ...] = (
    Step("feature_transform", (USER_ID, K, HOUR, WEEKDAY, DEVICE), (*USER_MODEL_INPUTS, USER_ROW, COLD_START), "python",
         "KIND_CPU"),
    Step("user_tower", USER_MODEL_INPUTS, (USER_EMBEDDING,), "onnx", "KIND_GPU"),
    Step("retrieval", (USER_EMBEDDING, USER_ROW, EXCLUDE_SEEN), (CANDIDATE_ROWS, CANDIDATE_DENSE), "python", "KIND_GPU"),
    Step("candidate_features", (CANDIDATE_ROWS,), (ITEM_CAT, ITEM_CONT), "python", "KIND_CPU"),
    Step("ranker", RANKER_INPUTS, (RANKING_SCORES,), "onnx", "KIND_GPU", max_batch_size=64, preferred_batch_sizes=(4, 16, 32)),
    Step("topk", (CANDIDATE_ROWS, RANKING_SCORES, K, COLD_START), (ITEM_IDS, SCORES), "python", "KIND_CPU"),
)
STEP_BY_NAME = {s.name: s for s in STEPS}

# ONNX graphs exported by training/export.py: (inputs, outputs), batch dim first
ONNX_MODELS = {
    "user_tower": (USER_MODEL_INPUTS, (USER_EMBEDDING,)),
    "item_tower": ((Tensor("item_cat", "INT64", (-1,)), Tensor("item_cont", "FP32", (-1,))),
                   (Tensor("item_embedding", "FP32", (-1,)),)),
    "ranker": (RANKER_INPUTS, (RANKING_SCORES,)),
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
    "contract": "contract.json",
}
