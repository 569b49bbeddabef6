"""The steps of the graph (shoprec/contract.py) as NumPy / ONNX Runtime / FAISS classes over batches.

Every step class takes (declaration, bundle, serve config, device, device id, threads) and has
  check(tensors)  validate one request's inputs (RequestError names the field), return them;
  run(tensors)    compute a batch: the declared outputs, in order, shaped as Triton ships them.
Triton's generic python model (serving/triton_models.py) and the in-process pipeline
(runtime/pipeline.py) run these same objects, so served and in-process results agree id for id.
A step loads only files of the serving bundle, each checked against the manifest, and checks the
bundle's sizes against its declaration when it loads; its outputs are checked against the
declared dtypes and dims on every batch (`check_outputs`).

Adding a step: a subclass of `StepImpl` here, and one `Step(...)` entry in contract.STEPS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.candidates import ROUTES, CandidateGenerator, CategoryPrior, ItemNeighbours, csr_offsets, popularity_bias
from runtime.online_store import OnlineStore, store_url
from runtime.request_transform import TransformPlan, UserColumns, UserStore, context_raw, find_rows
from runtime.strategy import Strategy
from shoprec import contract
from shoprec.config import REPO_ROOT, ServeConfig, load_config
from shoprec.contract import BUNDLE_FILES
from shoprec.manifest import ArtifactError, read_manifest, verify_manifest

MAX_DEVICE_BYTES = 64


class RequestError(ValueError):
    """A bad request: reported to that request only, never to the batch it shares."""


def bundle_dir(version: int | None = None) -> Path:
    """The bundle a step loads: bundles/<its Triton model version> where the launcher versions the repository
    ($SHOPREC_BUNDLES, serving/versions.py); the folder the container's entrypoint verified ($SHOPREC_BUNDLE);
    else artifacts/serving (the in-process pipeline)."""
    versioned = os.environ.get("SHOPREC_BUNDLES")
    if versioned and version is not None:
        return Path(versioned) / str(int(version))
    if os.environ.get("SHOPREC_BUNDLE"):
        return Path(os.environ["SHOPREC_BUNDLE"])
    root = Path(os.environ.get("SHOPREC_ARTIFACTS", REPO_ROOT / "artifacts"))
    return root / "serving"


def _npz_members(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, memory-mapped read-only where the member is stored uncompressed (np.savez), else
    read. Mapped arrays live in the page cache, shared by every process that maps the file: the instances of
    a model, the FastAPI workers; a bundle's files never change once exported (shoprec/bundles.py)."""
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type == zipfile.ZIP_STORED:
                fh.seek(info.header_offset)
                local = fh.read(30)  # the local file header: its name and extra field lengths at bytes 26-29
                fh.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
                version = np.lib.format.read_magic(fh)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(fh))
                if not dtype.hasobject and int(np.prod(shape)) > 0:
                    # a plain ndarray over the map (the memmap subclass would cost a Python call on every
                    # slice of the request path)
                    out[name] = np.memmap(path, dtype=dtype, mode="r", offset=fh.tell(), shape=shape,
                                          order="F" if fortran else "C").view(np.ndarray)
                    continue
            with zf.open(info) as member:
                out[name] = np.lib.format.read_array(member, allow_pickle=False)
    return out


@dataclass
class Bundle:
    """The serving bundle. Each file is checked against the manifest once, each .npz read once,
    however many steps of one process ask for it; arrays are memory-mapped where the file allows, so
    processes serving one bundle share them."""

    path: Path
    _checked: set = field(default_factory=set, repr=False)
    _arrays: dict = field(default_factory=dict, repr=False)

    def file(self, key: str) -> Path:
        if key not in self._checked:
            verify_manifest(self.path, [BUNDLE_FILES[key]])
            self._checked.add(key)
        return self.path / BUNDLE_FILES[key]

    def npz(self, key: str) -> dict[str, np.ndarray]:
        if key not in self._arrays:
            self._arrays[key] = _npz_members(self.file(key))
        return dict(self._arrays[key])  # callers may pop keys; the arrays themselves are shared

    def npy(self, key: str) -> np.ndarray:
        if key not in self._arrays:
            self._arrays[key] = np.load(self.file(key), allow_pickle=False, mmap_mode="r").view(np.ndarray)
        return self._arrays[key]

    @functools.cached_property
    def dims(self) -> dict:
        return json.loads(self.file("contract").read_text())

    @functools.cached_property
    def version(self) -> int:
        """The export's number (shoprec/bundles.py); 0 for a bundle exported before versions."""
        return int(read_manifest(self.path).get("bundle_version", 0))

    def sizes(self, cfg: ServeConfig) -> dict:
        """The named dims of the step graph: what the exporter recorded plus the serve-time candidate count."""
        return {**self.dims, "num_candidates": contract.num_candidates(cfg.num_candidates, self.dims["n_items"])}


def serve_config() -> ServeConfig:
    """Serve-time settings, read when a step starts (the launcher passes the config file it was given, and
    the online store's URL when it started one or was given one)."""
    cfg = load_config(os.environ.get("SHOPREC_CONFIG") or None).serve
    url = os.environ.get("SHOPREC_ONLINE_STORE")
    return dataclasses.replace(cfg, online_store=url) if url else cfg


def max_k(bundle: Bundle, cfg: ServeConfig) -> int:
    """The largest k a request may ask: the candidates ranked per request (never more than the catalog)."""
    return contract.num_candidates(cfg.num_candidates, bundle.dims["n_items"])


def check_k(k: np.ndarray, k_max: int) -> None:
    if k.size == 0:
        raise RequestError("empty request: send at least one row")
    if (k < 1).any():
        raise RequestError(f"k must be >= 1, got {int(k.min())}")
    if (k > k_max).any():
        raise RequestError(f"k must be <= {k_max} (the candidates ranked per request: serve.num_candidates, at most "
                           f"the catalog's items), got {int(k.max())}")


def validate_request(k: np.ndarray, hour: np.ndarray | None, weekday: np.ndarray | None, client_device, k_max: int) -> None:
    check_k(k, k_max)
    if hour is not None and ((hour < 0) | (hour > 23)).any():
        raise RequestError(f"hour must be in 0..23, got {int(hour[(hour < 0) | (hour > 23)][0])}")
    if weekday is not None and ((weekday < 0) | (weekday > 6)).any():
        raise RequestError(f"weekday must be in 0..6 (0 = Monday), got {int(weekday[(weekday < 0) | (weekday > 6)][0])}")
    if client_device is not None:
        for d in client_device:
            if len(d.encode() if isinstance(d, str) else d) > MAX_DEVICE_BYTES:  # bytes, not characters
                raise RequestError(f"client_device must be at most {MAX_DEVICE_BYTES} bytes")


ROW_INPUTS = ("history_rows", "unavailable_rows", "candidate_rows", "context_rows")  # item rows of the bundle, -1 pads


def check_inputs(t: dict, sizes: dict) -> None:
    """What every step checks of its inputs, whoever sent them (the ensemble, or a client calling an internal
    step directly): item rows inside the catalog, floats finite. RequestError names the input."""
    n_items = int(sizes["n_items"])
    for name, value in t.items():
        if value is None or not isinstance(value, np.ndarray):
            continue
        if name in ROW_INPUTS and value.size and (int(value.min()) < -1 or int(value.max()) >= n_items):
            raise RequestError(f"{name} must hold item rows in -1..{n_items - 1}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise RequestError(f"{name} must be finite (no NaN or infinity)")


def merge_requests(step: contract.Step, parsed: list[dict]) -> dict:
    """One batch from several requests' checked inputs (all carry the same optional inputs): concatenated along the
    batch dim. An input declared with a pad value (contract.Tensor.pad: Triton batches those requests whatever their
    widths, allow_ragged_batch) is padded to the widest request first; the step ignores the pad value, so each user's
    outputs do not depend on the batch."""
    pads = {t.name: t.pad for t in step.inputs}
    batch = {}
    for name in parsed[0]:
        parts = [p[name] for p in parsed]
        if parts[0] is None:
            batch[name] = None
            continue
        pad = pads.get(name)
        if pad is not None and len(parts) > 1:
            width = max(x.shape[1] for x in parts)
            parts = [x if x.shape[1] == width else np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=pad)
                     for x in parts]
        batch[name] = np.concatenate(parts)
    return batch


def check_strategy(strategy: Strategy, t: dict) -> None:
    """The strategy codes a step is sent (scene, experiment variant; from the feature step, or a direct caller) are
    ones this serve config has; RequestError otherwise."""
    code = t.get("strategy")
    if code is not None:
        code = np.asarray(code).reshape(-1, 2)
        try:
            strategy.check_codes(code[:, 0], code[:, 1])
        except ValueError as exc:
            raise RequestError(str(exc)) from None


def decode_text(raw, name: str) -> np.ndarray:
    try:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.ravel(raw)], dtype=object)
    except UnicodeDecodeError as exc:
        raise RequestError(f"{name} must be UTF-8 text") from exc


def _flat(x):
    return None if x is None else np.ravel(x)


NUMPY_DTYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "STRING": np.object_}


def check_outputs(step: contract.Step, outputs, sizes: dict, batch: int | None = None) -> None:
    """The step's outputs against its declaration: count, dtype and every dim but the variable ones.
    A mismatch is a bug or a bundle built for another graph; it fails the batch with the step's name."""
    if len(outputs) != len(step.outputs):
        raise RuntimeError(f"{step.name}: returned {len(outputs)} outputs, the graph declares {len(step.outputs)}")
    for t, out in zip(step.outputs, outputs):
        want = t.resolve(sizes)
        if out.dtype != NUMPY_DTYPES[t.dtype] or out.ndim != len(want) + 1 \
                or any(w != -1 and w != g for w, g in zip(want, out.shape[1:])) or (batch is not None and len(out) != batch):
            raise RuntimeError(f"{step.name}: output {t.name} is {out.dtype}{list(out.shape)}, the graph declares "
                               f"{t.dtype}[batch, {', '.join(map(str, want))}]")


class StepImpl:
    """One step of the graph. `self.step` is its declaration, `self.sizes` the named dims of this bundle.

    `METRICS` names the counters a step class keeps ({name: description}); `count()` adds to them and
    `take_counts()` hands them over: the Triton adapter publishes them as Prometheus counters on the
    server's metrics port, the in-process pipeline just keeps them. `GAUGES` names its gauges, whose
    current values `gauge_values()` gives when the adapter publishes (off the request path)."""

    METRICS: dict[str, str] = {}
    GAUGES: dict[str, str] = {}

    def __init__(self, step: contract.Step, bundle: Bundle, cfg: ServeConfig, device: str = "cpu", device_id: int = 0,
                 threads: int = 1):
        self.step, self.bundle, self.cfg = step, bundle, cfg
        self.device, self.device_id, self.threads = device, device_id, threads
        self.sizes = bundle.sizes(cfg)
        self._counts: dict[tuple[str, tuple], float] = {}
        self._counts_lock = threading.Lock()  # a publisher thread takes the counts while requests add to them
        self._batch = threading.local()  # batch_counts(): this thread's batch's counts until it has succeeded

    def metrics(self) -> dict[str, str]:
        return dict(self.METRICS)

    def gauges(self) -> dict[str, str]:
        return dict(self.GAUGES)

    def gauge_values(self) -> dict[tuple[str, tuple], float]:
        """{(gauge name, labels): value} now; a gauge left out keeps its last published value."""
        return {}

    def count(self, name: str, value: float, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        pending = getattr(self._batch, "pending", None)
        if pending is not None:  # inside batch_counts(): kept until the batch has succeeded
            pending[key] = pending.get(key, 0) + float(value)
            return
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + float(value)

    @contextlib.contextmanager
    def batch_counts(self):
        """The counts of a batch land only if it succeeds: a failed batch is re-run request by request (the Triton
        adapter), and each request must be counted once."""
        self._batch.pending = {}
        try:
            yield
        except BaseException:
            self._batch.pending = None
            raise
        pending, self._batch.pending = self._batch.pending, None
        with self._counts_lock:
            for key, value in pending.items():
                self._counts[key] = self._counts.get(key, 0) + value

    def take_counts(self) -> dict[tuple[str, tuple], float]:
        with self._counts_lock:
            counts, self._counts = self._counts, {}
        return counts

    def check(self, t: dict) -> dict:
        return t

    def run(self, t: dict) -> tuple:
        raise NotImplementedError

    def run_requests(self, t: dict, counts: list[int]) -> list[tuple]:
        """A per-request step over a batch of requests (`counts` rows each): one output tuple per request."""
        offsets = np.cumsum([0, *counts])
        return [self.run({k: None if v is None else v[a:b] for k, v in t.items()}) for a, b in zip(offsets[:-1], offsets[1:])]


class Fused(StepImpl):
    """Adjacent steps of the graph in one model (the cpu profiles, contract.FUSION): the parts' own
    classes run in order over one dict of tensors. The per-request parts run after the batched parts ran
    over the whole batch, so the ranker still batches across requests: one per-request part (top-k, the
    graph's end) answers the batch's requests in one call (`run_requests`), several run request by request."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        graph = {s.name: s for s in contract.STEPS}
        self.parts = [(part, load_step(part, self.bundle, self.cfg, self.device, self.device_id, self.threads))
                      for part in (graph[name] for name in self.step.parts)]
        self.split = next((i for i, (part, _) in enumerate(self.parts) if part.per_request), len(self.parts))
        self.one_call = True  # one per-request part answers the batch in one call (False: request by request, to compare)

    def metrics(self) -> dict[str, str]:
        return {k: v for _, impl in self.parts for k, v in impl.metrics().items()}

    def take_counts(self) -> dict[tuple[str, tuple], float]:
        return {k: v for _, impl in self.parts for k, v in impl.take_counts().items()}

    def gauges(self) -> dict[str, str]:
        return {k: v for _, impl in self.parts for k, v in impl.gauges().items()}

    def gauge_values(self) -> dict[tuple[str, tuple], float]:
        return {k: v for _, impl in self.parts for k, v in impl.gauge_values().items()}

    @contextlib.contextmanager
    def batch_counts(self):
        with contextlib.ExitStack() as stack:
            for _, impl in self.parts:
                stack.enter_context(impl.batch_counts())
            yield

    def check(self, t: dict) -> dict:
        for part, impl in self.parts:  # each part checks the request inputs it reads (the others are None here)
            checked = impl.check({x.name: t.get(part.graph_name(x.name)) for x in part.inputs})
            t.update({part.graph_name(k): v for k, v in checked.items() if part.graph_name(k) in t})
        return t

    def _run(self, parts, tensors: dict) -> dict:
        for part, impl in parts:
            outputs = impl.run({x.name: tensors.get(part.graph_name(x.name)) for x in part.inputs})
            check_outputs(part, outputs, self.sizes)
            tensors.update(zip((part.graph_name(x.name) for x in part.outputs), outputs))
        return tensors

    def run(self, t: dict) -> tuple:
        tensors = self._run(self.parts, dict(t))
        return tuple(tensors[x.name] for x in self.step.outputs)

    def run_requests(self, t: dict, counts: list[int]) -> list[tuple]:
        tensors = self._run(self.parts[: self.split], dict(t))
        rest = self.parts[self.split :]
        offsets = np.cumsum([0, *counts])
        out = []
        if len(rest) == 1 and self.one_call:  # the one per-request part (top-k) answers the batch's requests at once
            part, impl = rest[0]
            per_request = impl.run_requests({x.name: tensors.get(part.graph_name(x.name)) for x in part.inputs}, counts)
            names = [part.graph_name(x.name) for x in part.outputs]
            for (a, b), outputs in zip(zip(offsets[:-1], offsets[1:]), per_request):
                check_outputs(part, outputs, self.sizes)
                own = dict(zip(names, outputs))  # the model's other outputs come from the batched parts
                out.append(tuple(own[x.name] if x.name in own else tensors[x.name][a:b] for x in self.step.outputs))
            return out
        for a, b in zip(offsets[:-1], offsets[1:]):
            one = self._run(self.parts[self.split :], {k: None if v is None else v[a:b] for k, v in tensors.items()})
            out.append(tuple(one[x.name] for x in self.step.outputs))
        return out


def load_step(step: contract.Step, bundle: Bundle, cfg: ServeConfig, device: str = "cpu", device_id: int = 0,
              threads: int = 1) -> StepImpl:
    """The step's class, named by its declaration, loaded over the bundle."""
    cls = globals().get(step.impl)
    if not (isinstance(cls, type) and issubclass(cls, StepImpl)):
        raise ValueError(f"step {step.name}: impl {step.impl!r} is not a StepImpl in runtime/steps.py")
    return cls(step, bundle, cfg, device, device_id, threads)


NO_ROWS = np.zeros(0, np.int64)  # no unavailable items (one array, so the feature step's union with blocked ones is kept)
NO_ROWS.flags.writeable = False


class FeatureTransform(StepImpl):
    """user_id, k, optional hour/weekday/client_device -> user_cat, user_cont, seq_items, seq_kinds,
    history_rows, history_kinds, unavailable_rows, cold_start, degraded, strategy, context_rows, experiment,
    served_version (the bundle's version: every step of one request runs the same one).

    The user's state comes from the online store when the server has one (their events since the
    export, read in one round trip with the unavailable items), else from the export's snapshot: a
    user without live state, or every user of a request the store failed (`degraded`). Attributes
    always come from the snapshot. Absent context is null: the "unknown" the training rows carry when
    their context is dropped out, never the server's clock. A user is cold when neither holds an
    action of theirs, whatever their id.

    The snapshot's users come with their attribute and history columns encoded once (user_store.npz), and
    a live state with them encoded when its events were written (runtime/online_store.py), so a request
    encodes only its context; a user unknown to the snapshot without live state, or a state written
    without them, is encoded per request by the same plan."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bundle = self.bundle
        self.plan = TransformPlan.load(bundle.file("query_plan"), bundle.file("query_vocab"))
        self.store = UserStore(bundle.npz("user_store"))
        self.columns = UserColumns(self.plan, bundle.dims["query_spec"])
        # the snapshot users' attribute and history columns, encoded once by `export`; a store
        # without them (an older bundle) has every row encoded per request
        self.encoded = self.store.encoded(self.columns) and len(self.store.user_id) > 0
        if self.encoded:
            self.enc_cat, self.enc_cont = self.store.arrays["enc__cat"], self.store.arrays["enc__cont"]
        table = bundle.npz("item_table")
        self.item_codes = table["item_cat"][:, 0]
        self.category_names = table["category_names"]
        self.spec = bundle.dims["query_spec"]
        self.seq_len = int(bundle.dims["seq_len"])
        self.k_max = max_k(bundle, self.cfg)
        self.strategy = Strategy(self.cfg)
        self.item_ids = table["item_ids"]
        self.item_order = np.argsort(self.item_ids, kind="stable")
        url = store_url(self.cfg.online_store)
        self.online = OnlineStore.for_bundle(url, bundle, self.cfg, self.store) if url else None
        self._memory_at, self._memory = -float("inf"), None  # gauge_values(): the store's memory, read now and then
        # blocked items join the unavailable ones, so every recall route skips them and the lists stay full
        self.blocked = BlockedItems(self.cfg.blocked_items_file, self.item_ids) if self.cfg.blocked_items_file else None
        self._merged = (None, None, None)  # (store's unavailable rows, blocked rows, their union): made once per change

    def check(self, t: dict) -> dict:
        n = len(t["user_id"])
        if n == 0:
            raise RequestError("empty request: send at least one row")
        if t["k"].shape != t["user_id"].shape:
            raise RequestError(f"k must have the same shape as user_id, got {list(t['k'].shape)} vs {list(t['user_id'].shape)}")
        if t.get("client_device") is not None:
            t["client_device"] = decode_text(t["client_device"], "client_device")
        for name in ("hour", "weekday", "client_device"):
            if t.get(name) is not None and len(np.ravel(t[name])) != n:
                raise RequestError(f"{name} must have one value per user_id row")
        validate_request(t["k"].ravel(), _flat(t.get("hour")), _flat(t.get("weekday")), t.get("client_device"), self.k_max)
        st = self.strategy
        if t.get("scene") is not None:
            names = decode_text(t["scene"], "scene")
            if len(names) != n:
                raise RequestError("scene must have one value per user_id row")
            bad = [x for x in names if x not in st.scene_code]
            if bad:
                raise RequestError(f"scene must be one of {list(st.scenes)}, got {bad[0][:64]!r}")
            t["scene"] = np.array([st.scene_code[x] for x in names], np.int32)
        if t.get("force_arms") is not None:
            texts = decode_text(t["force_arms"], "force_arms")
            if len(texts) != n:
                raise RequestError("force_arms must have one value per user_id row")
            long = next((x for x in texts if len(x) > 1024), None)
            if long is not None:
                raise RequestError(f"force_arms: at most 1024 characters, got {len(long)}")
            try:
                t["force_arms"] = [st.parse_forced(x) for x in texts]
            except ValueError as exc:
                raise RequestError(str(exc)) from None
        ctx = t.get("context_item_ids")
        if ctx is not None:
            ctx = np.asarray(ctx, dtype=np.int64).reshape(n, -1)
            if ctx.shape[1] > self.cfg.max_context_items:
                raise RequestError(f"context_item_ids: at most {self.cfg.max_context_items} items per request "
                                   f"(serve.max_context_items), got {ctx.shape[1]}")
            t["context_item_ids"] = ctx
        return t

    METRICS = {"shoprec_requests_total": "users answered (one per request row; a failed request is not counted)",
               "shoprec_cold_start_total": "of them, users without history in the user store (cold start)",
               "shoprec_live_state_total": "of them, users served from their live state in the online store",
               "shoprec_degraded_total": "of them, users served from the snapshot because the online store failed",
               "shoprec_scene_requests_total": "users asked for recommendations, by scene (label: scene)",
               "shoprec_arm_requests_total": "users asked for recommendations, by experiment layer and arm (labels: layer, arm)",
               "shoprec_context_items_total": "context items requests sent (item_detail, cart)",
               "shoprec_context_items_unknown_total": "of them, ids not in the catalog: ignored"}
    GAUGES = {"shoprec_online_store_used_bytes": "memory the online store (Redis) uses, INFO used_memory, read every "
                                                 "few seconds; absent without an online store",
              "shoprec_online_store_max_bytes": "the online store's maxmemory (0: no limit); a full store refuses new "
                                                "events (noeviction)"}
    MEMORY_EVERY_S = 5.0  # Redis's INFO is read at most this often, by the publisher, never by a request

    def gauge_values(self) -> dict[tuple[str, tuple], float]:
        if self.online is None:
            return {}
        now = time.monotonic()
        if now - self._memory_at >= self.MEMORY_EVERY_S:
            self._memory_at, self._memory = now, self.online.memory()
        if self._memory is None:  # unreachable: the last values stay (the degraded counter says why)
            return {}
        used, limit = self._memory
        return {("shoprec_online_store_used_bytes", ()): float(used), ("shoprec_online_store_max_bytes", ()): float(limit)}

    def run(self, t: dict) -> tuple:
        strategy, context_rows, experiment = self.request_strategy(t)
        f = self(t["user_id"].ravel(), _flat(t.get("hour")), _flat(t.get("weekday")), _flat(t.get("client_device")))
        n = len(f["cold"])
        self.count("shoprec_requests_total", n)
        self.count("shoprec_cold_start_total", int(f["cold"].sum()))
        self.count("shoprec_live_state_total", int(f["live"].sum()))
        self.count("shoprec_degraded_total", n if f["degraded"] else 0)
        unavailable = np.broadcast_to(f["unavailable"], (n, len(f["unavailable"]))).copy()
        return (f["user_cat"], f["user_cont"], f["seq_items"], f["seq_kinds"], f["history_rows"], f["history_kinds"],
                unavailable, f["cold"][:, None], np.full((n, 1), f["degraded"]), strategy, context_rows, experiment,
                np.full((n, 1), self.bundle.version, dtype=np.int64))

    def request_strategy(self, t: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(strategy [B, 2]: scene code and experiment variant, context_rows [B, L], experiment [B, 1]) of checked
        request tensors; counts requests by scene and arm, and the context items."""
        st = self.strategy
        user_id = t["user_id"].ravel()
        n = len(user_id)
        scene = np.full(n, st.default_scene, np.int32) if t.get("scene") is None else np.asarray(t["scene"], np.int32)
        variant = st.assign(user_id, t.get("force_arms"))
        for code, c in zip(*np.unique(scene, return_counts=True)):
            self.count("shoprec_scene_requests_total", int(c), scene=st.scenes[int(code)])
        labels = {}
        for v, c in zip(*np.unique(variant, return_counts=True)):
            labels[int(v)] = st.label(int(v))
            for layer, arm in st.arms(int(v)):
                self.count("shoprec_arm_requests_total", int(c), layer=layer, arm=arm)
        ctx = t.get("context_item_ids")
        if ctx is None or not ctx.size:
            rows = np.full((n, 1), -1, np.int64)
        else:
            rows = find_rows(self.item_ids, ctx.ravel(), self.item_order).reshape(ctx.shape)
            self.count("shoprec_context_items_total", int(ctx.size))
            self.count("shoprec_context_items_unknown_total", int((rows < 0).sum()))
        experiment = np.array([[labels[int(v)].encode()] for v in variant], dtype=object)
        return np.stack([scene, variant], axis=1).astype(np.int32), rows, experiment

    def __call__(self, user_id: np.ndarray, hour=None, weekday=None, client_device=None) -> dict:
        """The step's tensors for a batch of users (dict), plus `live` (per user: read from the online store)."""
        user_id = np.asarray(user_id, dtype=np.int64)
        pending = self.online.send(user_id) if self.online is not None else None  # Redis answers while the snapshot is read
        rows = self.store.lookup(user_id)
        state = self.store.state(rows, self.seq_len)
        history = [self.store.history(int(r)) for r in rows]
        live = np.zeros(len(user_id), bool)
        live_encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # the columns the store encoded at ingestion
        unavailable, degraded = NO_ROWS, False
        if pending is not None:
            states, unavailable, degraded = pending()
            for i, one in enumerate(states):
                if one is None:
                    continue
                live[i] = True
                for key in state:
                    state[key][i] = one[key][: self.seq_len] if key in ("seq_rows", "seq_kinds") else one[key]
                history[i] = (one["hist_rows"], one["hist_kinds"])
                if "enc_cat" in one:
                    live_encoded[i] = (one["enc_cat"], one["enc_cont"])
        if self.blocked is not None:
            unavailable = self._with_blocked(unavailable, self.blocked.rows())
        cat, cont = self.encode(user_id, rows, state, live, hour, weekday, client_device, live_encoded=live_encoded)
        seq_rows = state["seq_rows"]
        seq = np.where(seq_rows >= 0, self.item_codes[np.maximum(seq_rows, 0)], 0).astype(np.int64)
        width = max(1, max(len(h[0]) for h in history))
        hist_rows = np.full((len(user_id), width), -1, np.int64)
        hist_kinds = np.zeros((len(user_id), width), np.int32)
        for i, (r, k) in enumerate(history):
            hist_rows[i, : len(r)], hist_kinds[i, : len(k)] = r, k
        return {"user_cat": cat, "user_cont": cont, "seq_items": seq, "seq_kinds": state["seq_kinds"].astype(np.int64),
                "history_rows": hist_rows, "history_kinds": hist_kinds,
                "unavailable": np.pad(unavailable, (0, 1 if not len(unavailable) else 0), constant_values=-1),
                "cold": state["activity"] <= 0, "live": live, "degraded": degraded}

    def _with_blocked(self, unavailable: np.ndarray, blocked: np.ndarray) -> np.ndarray:
        """The union of the online store's unavailable rows and the blocked rows; both arrays are kept until their
        source changes, so the union is made again only then, not per request."""
        a, b, union = self._merged
        if a is not unavailable or b is not blocked:
            union = np.union1d(unavailable, blocked)
            self._merged = (unavailable, blocked, union)
        return union

    def encode(self, user_id: np.ndarray, rows: np.ndarray, state: dict, live: np.ndarray, hour=None, weekday=None,
               client_device=None, encoded: bool | None = None,
               live_encoded: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The query plan's packed (user_cat, user_cont): the snapshot's columns encoded once where the user's
        state is the snapshot's, the online store's where it encoded the live state (live_encoded: row ->
        (cat, cont)), the same plan on the state otherwise (`encoded=False`: every row so)."""
        cols = self.columns
        use = self.encoded if encoded is None else encoded
        live_encoded = live_encoded if use and live_encoded else {}
        fresh = np.array([i in live_encoded and len(live_encoded[i][0]) == len(cols.cat)
                          and len(live_encoded[i][1]) == len(cols.cont) for i in range(len(rows))], bool)
        redo = np.flatnonzero(~fresh & ((rows < 0) | live)) if use else np.arange(len(rows))
        if len(redo) == len(rows):
            user_cat, user_cont = None, None
        else:
            safe = np.maximum(rows, 0)
            user_cat, user_cont = self.enc_cat[safe].astype(np.int64), self.enc_cont[safe]
            for i in np.flatnonzero(fresh):
                user_cat[i], user_cont[i] = live_encoded[i]
        if len(redo):
            one = {k: v[redo] for k, v in state.items()}
            cat_r, cont_r = cols.encode(one, self.store.attrs(user_id[redo], rows[redo]), self.category_names)
            if user_cat is None:
                user_cat, user_cont = cat_r, cont_r
            else:
                user_cat[redo], user_cont[redo] = cat_r, cont_r
        return cols.assemble(user_cat, user_cont, context_raw(len(rows), hour, weekday, client_device))


class OnnxStep(StepImpl):
    """An exported graph (the bundle file named like the step) in ONNX Runtime; the CUDA provider when
    Triton gave the instance a GPU. Its inputs are checked against the declaration when it loads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        providers = [("CUDAExecutionProvider", {"device_id": self.device_id})] if self.device == "cuda" else []
        providers.append("CPUExecutionProvider")
        path = self.bundle.file(self.step.name)
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        if self.device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError(f"{self.step.name}: Triton gave this instance a GPU but ONNX Runtime has no CUDA provider "
                               f"(providers: {self.session.get_providers()}); install onnxruntime-gpu or serve the cpu profile")
        got = {i.name: i.shape for i in self.session.get_inputs()}
        for t in self.step.inputs:
            if t.name not in got:
                raise ArtifactError(f"{path}: has no input {t.name!r} (inputs: {sorted(got)}); re-run `shoprec export`")
            want = t.resolve(self.sizes)
            fixed = [(w, g) for w, g in zip(want, got[t.name][1:]) if isinstance(g, int)]
            if len(got[t.name]) != len(want) + 1 or any(w != g for w, g in fixed):
                raise ArtifactError(f"{path}: input {t.name} has shape {got[t.name]}, the bundle's contract.json says "
                                    f"[batch, {', '.join(map(str, want))}]; re-run `shoprec export`")
        self.inputs = [t.name for t in self.step.inputs]
        # the declaration's cpu_chunk_rows, read through the first input over candidates (0: whole batches)
        over = next((t.name for t in self.step.inputs if t.dims[:1] == ("num_candidates",)), None)
        self.chunk_rows = self.step.cpu_chunk_rows if self.device != "cuda" and over else 0
        self._over_candidates = over

    def run(self, t: dict) -> tuple:
        feeds = {n: t[n] for n in self.inputs}
        if self.chunk_rows:
            users, candidates = feeds[self._over_candidates].shape[:2]
            per_run = max(1, self.chunk_rows // max(candidates, 1))
            if users > per_run:
                parts = [self.session.run(None, {n: a[i : i + per_run] for n, a in feeds.items()})
                         for i in range(0, users, per_run)]
                return tuple(np.concatenate(out) for out in zip(*parts))
        return tuple(self.session.run(None, feeds))

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self.session.run(None, dict(zip(self.inputs, arrays)))[0]


class Retrieval(StepImpl):
    """user_embedding [B, D], history_rows / history_kinds [B, H], unavailable_rows [B, U], exclude_seen [B, 1],
    strategy [B, 2] (scene, experiment variant: the fusion weights), context_rows [B, L]
    -> candidate_rows [B, N] (-1 pads when the catalog minus the user's seen and the unavailable items has
    fewer than N), candidate_dense [B, N, F], candidate_routes [B, N].

    The recall routes of `runtime.candidates` over the user's actions (from the feature step)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import faiss

        bundle, cfg = self.bundle, self.cfg
        # one thread per instance, like the ONNX sessions: parallelism comes from Triton instances
        # (or server workers); FAISS's OpenMP team otherwise spins against them on a few cores
        faiss.omp_set_num_threads(self.threads)
        embeddings = bundle.npy("item_embeddings")
        if embeddings.shape[1] != self.sizes["embedding_dim"]:
            raise ArtifactError(f"{bundle.path}: item embeddings are {embeddings.shape[1]}-d, contract.json says "
                                f"{self.sizes['embedding_dim']}; re-run `shoprec export`")
        # serve.mmap_index: the lists memory-mapped where this FAISS can (1.8+), shared by the instances like the
        # bundle's arrays; else read into this instance (a search scans many lists' pages: faster off a map)
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) if cfg.mmap_index else 0
        index = faiss.read_index(str(bundle.file("faiss_index")), flags)
        if self.device == "cuda":
            if not hasattr(faiss, "StandardGpuResources"):
                raise RuntimeError("retrieval: Triton gave this instance a GPU but FAISS has no GPU support; "
                                   "install faiss-gpu or serve the cpu profile")
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, self.device_id, index)  # the GPU Triton assigned
        table = bundle.npz("item_table")
        names = [str(n) for n in table["category_names"]]
        unknown = sorted(set(cfg.repeat_categories) - set(names))
        if unknown:
            raise ValueError(f"serve.repeat_categories names categories the catalog does not have: {unknown}")
        exempt = np.isin(table["category_code"], [names.index(c) for c in cfg.repeat_categories])
        routes = bundle.npz("scene_routes")
        # the ann route's popularity bias (train's choice; bundles before it have none), the column export indexed
        bias = popularity_bias(table["popularity"], float(bundle.dims.get("ann_popularity_weight", 0.0)))
        try:  # the generator checks that the bundle's parts fit together (the index's dimensions among them)
            self.generator = CandidateGenerator(
                embeddings, index, ItemNeighbours.from_arrays(bundle.npz("cf_all")), ItemNeighbours.from_arrays(bundle.npz("cf_pos")),
                table["popular_rows"], self.sizes["num_candidates"], cfg.recent_window, exempt,
                CategoryPrior.from_popularity(table["category_code"], table["popularity"]), routes["trending_rows"],
                ItemNeighbours.from_arrays({k.removeprefix("copurchase_"): v for k, v in routes.items() if k.startswith("copurchase_")}),
                ann_bias=bias)
        except ValueError as exc:
            raise ArtifactError(f"{bundle.path}: {exc}; re-run `shoprec export`") from exc
        self.default_exclude = cfg.exclude_seen
        self.strategy = Strategy(cfg)

    @property
    def n(self) -> int:
        return self.generator.n

    METRICS = {"shoprec_route_candidates_total": "candidates each recall route returned, before the fusion, where the "
                                                 "request's scene uses the route (label: route)",
               "shoprec_route_empty_total": "users for whom a recall route their scene uses returned nothing (label: route)",
               "shoprec_route_errors_total": "batches in which a recall route failed and the others served (label: route)",
               "shoprec_candidates_total": "candidates after the fusion, sent to the ranker"}

    def check(self, t: dict) -> dict:
        check_strategy(self.strategy, t)
        rows, kinds = t.get("history_rows"), t.get("history_kinds")
        if rows is not None and kinds is not None and np.shape(rows) != np.shape(kinds):
            raise RequestError(f"history_kinds must have the shape of history_rows, got {list(np.shape(kinds))} "
                               f"vs {list(np.shape(rows))}")
        return t

    def run(self, t: dict) -> tuple:
        failed: dict[str, str] = {}  # this call's own (the FastAPI baseline runs a step in several threads at once)
        cand, dense, lists, routes, weights = self._candidates(t, failed)
        used = weights > 0  # [U, R]: the routes each user's scene uses
        found = np.stack([(lists[r] >= 0).sum(1) for r in ROUTES], axis=1)  # [U, R] candidates per route
        totals, empty = (found * used).sum(0).tolist(), ((found == 0) & used).sum(0).tolist()
        for i in np.flatnonzero(used.any(0)).tolist():
            self.count("shoprec_route_candidates_total", int(totals[i]), route=ROUTES[i])
            self.count("shoprec_route_empty_total", int(empty[i]), route=ROUTES[i])
        for route, error in failed.items():
            self.count("shoprec_route_errors_total", 1, route=route)
            _log_once(f"retrieval: route {route} failed, the other routes served: {error}")
        self.count("shoprec_candidates_total", int((cand >= 0).sum()))
        return cand, dense, routes

    def candidates(self, t: dict) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
        """(candidate_rows, candidate_dense, each route's ranked list, each candidate's route bitmask); the lists
        are for evaluation and the metrics."""
        return self._candidates(t)[:4]

    def _candidates(self, t: dict, failed: dict | None = None) -> tuple:
        """candidates() and each user's fusion weights (returned, not kept: the FastAPI baseline runs a step in
        several threads at once); the routes that failed are written into `failed`."""
        hist = np.asarray(t["history_rows"], dtype=np.int64)
        if hist.size and (hist.max() >= self.generator.n_items or hist.min() < -1):
            raise ValueError(f"history row outside the item table (0..{self.generator.n_items - 1}, -1 = padding)")
        keep = hist >= 0  # padding is at the end of each row, so the kept entries stay in time order
        indptr = csr_offsets(np.cumsum(keep.sum(1))).astype(np.int64)
        kinds = np.asarray(t["history_kinds"])[keep].astype(np.int8)
        flag = t.get("exclude_seen")
        exclude = self.default_exclude if flag is None else np.asarray(flag, dtype=bool).ravel()
        # per user: the rows of one request's users are the same, but a batch holds requests read at other moments
        n = len(indptr) - 1
        raw = np.asarray(t["unavailable_rows"], dtype=np.int64)
        unavailable = np.where(raw < self.generator.n_items, raw, -1).reshape(n, -1) if raw.size else None
        code = t.get("strategy")
        code = None if code is None else np.asarray(code).reshape(n, 2)
        resolved = [self.strategy.resolve(*(code[i] if code is not None else (self.strategy.default_scene, 0)))
                    for i in range(n)]
        ctx = t.get("context_rows")
        ctx = np.full((n, 0), -1, np.int64) if ctx is None else np.asarray(ctx, dtype=np.int64).reshape(n, -1)
        known = ctx >= 0
        context = (csr_offsets(np.cumsum(known.sum(1))).astype(np.int64), ctx[known])
        weights = np.stack([r.weights for r in resolved])
        out = self.generator(t["user_embedding"], indptr, hist[keep], kinds, exclude, with_routes=True, unavailable=unavailable,
                             weights=weights, context=context,
                             exclude_context_categories=np.array([r.exclude_context_categories for r in resolved]),
                             failed=failed)
        return (*out, weights)


class CandidateFeatures(StepImpl):
    """candidate_rows [B, N] -> item_cat [B, N, Fi], item_cont [B, N, Ci] from the precomputed table.
    Padding rows (-1) get row 0's features: documented, because their score is masked (-inf) by top-k
    and never served. A row outside the table fails the batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        table = self.bundle.npz("item_table")
        self.item_cat, self.item_cont = table["item_cat"], table["item_cont"]

    def run(self, t: dict) -> tuple:
        rows = t["candidate_rows"]
        n = len(self.item_cat)
        if (rows >= n).any() or (rows < -1).any():
            bad = rows[(rows >= n) | (rows < -1)]
            raise ValueError(f"candidate row {int(bad[0])} outside the item table (0..{n - 1}, -1 = padding)")
        safe = np.maximum(rows, 0)
        return self.item_cat[safe], self.item_cont[safe]


@functools.lru_cache(maxsize=64)
def _log_once(message: str) -> None:
    import logging

    logging.getLogger("shoprec.serve").warning(message)


def popularity_factor(popularity: np.ndarray, weight: float) -> np.ndarray:
    """What the served score is multiplied by per item row: (popularity share of the most popular item)^weight,
    counts smoothed by one. The weight is `train`'s choice on held-out later data (ranking.popularity_prior):
    the ranker learns from the holdout inside the training window, and later periods favour popular items more
    than it does. weight 0: all ones."""
    pop = np.asarray(popularity, dtype=np.float64)
    return ((pop + 1.0) / (pop.max(initial=0.0) + 1.0)) ** float(weight)


def best_first(rows: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n best-scored candidates per row ([B, N] -> [B, n]); padding (-1) sorts last,
    ties keep the candidate order (stable)."""
    return np.argsort(-np.where(rows >= 0, scores, -np.inf), axis=-1, kind="stable")[..., : int(n)]


def mmr_order(rows: np.ndarray, scores: np.ndarray, k: int, lam: float, embeddings: np.ndarray, pool: int) -> np.ndarray:
    """Maximal marginal relevance over one user's candidates: positions of k candidates, each the best of
    (1 - lam) * relevance - lam * (its largest cosine similarity to those already picked). Relevance is
    the ranker's score min-max scaled over the best max(pool, k) candidates, the only ones considered.
    lam = 0 is the ranker's order exactly."""
    order = best_first(rows, scores, k if lam <= 0 else max(pool, k))
    order = order[rows[order] >= 0]
    if lam <= 0 or len(order) <= 1:
        return order[:k]
    rel = scores[order].astype(np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones_like(rel)
    emb = embeddings[rows[order]].astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = emb @ emb.T
    picked = [int(np.argmax(rel))]
    closest = sim[picked[0]].copy()
    free = np.ones(len(order), bool)
    free[picked[0]] = False
    while len(picked) < min(k, len(order)):
        gain = np.where(free, (1 - lam) * rel - lam * closest, -np.inf)
        j = int(np.argmax(gain))
        picked.append(j)
        free[j] = False
        closest = np.maximum(closest, sim[j])
    return order[picked]


class TopK(StepImpl):
    """Per request (k differs between requests, so the output length does too): candidate_rows [B, N],
    ranking_scores [B, N] (and ranking_probs [B, N, 2]), k [B, 1], optional diversity [B, 1], blend [B, 3],
    strategy [B, 2] -> item_ids, scores [B, k'], raw ids. The score is the exported one, or the blend the
    request, the scene or its experiment arm sets, times the item's popularity factor (`popularity_factor`,
    the bundle's `popularity_prior`; 1 when train chose 0); the order is by score (or, for a scene with order =
    "recall", the fused recall order), re-ranked by MMR over the item embeddings when diversity > 0 (the
    scores stay the blend's), capped per category where the scene says so. A user whose unseen candidates
    are fewer than k gets all of them; the rows of a batch are padded to the longest with item_id -1 and
    score -inf. k is validated upstream."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k_max = max_k(self.bundle, self.cfg)
        table = self.bundle.npz("item_table")
        self.item_ids = table["item_ids"]
        self.category = table["category_code"]
        self._category_span = int(self.category.max(initial=0)) + 2  # (list, category) keys in _count_lists
        self.embeddings = self.bundle.npy("item_embeddings")
        weight = float(self.bundle.dims.get("popularity_prior", 0.0))  # bundles before it: no prior
        self.prior = popularity_factor(table["popularity"], weight).astype(np.float32) if weight > 0 else None
        if not 0.0 <= self.cfg.diversity <= 1.0:
            raise ValueError(f"serve.diversity must be in [0, 1], got {self.cfg.diversity}")
        if self.cfg.max_per_category < 0:
            raise ValueError(f"serve.max_per_category must be >= 0 (0: no cap), got {self.cfg.max_per_category}")
        self.strategy = Strategy(self.cfg)
        # the blend's item value: the items' price over its median (so weights compare across shops); None without
        value = table.get("value", np.zeros(0))
        self.value = (value / np.median(value[value > 0])).astype(np.float32) if len(value) and (value > 0).any() else None
        if self.value is None:
            st = self.strategy
            blends = [(f"serve.scenes.{name}", s.get("blend")) for name, s in st.scene_settings.items()]
            for layer in st.layers:
                for arm, s in zip(layer.arms, layer.settings):
                    where = f"serve.experiments.{layer.name}.set.{arm}"
                    blends += [(where, s.get("blend"))] + [(f"{where}.scenes.{sc}", v.get("blend"))
                                                           for sc, v in s.get("scenes", {}).items()]
            for where, blend in blends:
                if blend is not None and blend[2] > 0:
                    raise ValueError(f"{where}.blend weighs the item value, but the items have no price "
                                     "(item_table.npz value)")

    def check(self, t: dict) -> dict:
        check_strategy(self.strategy, t)
        k = t["k"].ravel()
        check_k(k, self.k_max)  # a direct caller of this step too (the gpu profile's topk)
        if len(k) and (k != k[0]).any():
            raise RequestError("k must be the same for every row of one request")
        d = t.get("diversity")
        if d is not None:
            d = np.ravel(d)
            bad = d[~((d >= 0) & (d <= 1))]  # NaN fails too
            if len(bad):
                raise RequestError(f"diversity must be in [0, 1] (0 = the ranker's order), got {float(bad[0])}")
            if len(d) != len(k):
                raise RequestError("diversity must have one value per user_id row")
        b = t.get("blend")
        if b is not None:
            b = np.asarray(b, dtype=np.float32).reshape(len(k), -1) if len(k) else b
            top = self.cfg.max_blend_weight
            if b.shape[1] != 3 or not ((b >= 0) & (b <= top)).all():
                raise RequestError(f"blend must be 3 weights (pCTR, pCTR*pCVR, pCTR*pCVR*value) each in [0, {top:g}] "
                                   f"(serve.max_blend_weight)")
            if not (b > 0).any(axis=1).all():
                raise RequestError("blend must have at least one weight > 0")
            if self.value is None and (b[:, 2] > 0).any():
                raise RequestError("blend: the value weight needs an item value, and the items have no price")
            t["blend"] = b
        return t

    METRICS = {"shoprec_served_items_total": "items in the served lists",
               "shoprec_served_route_items_total": "served items that a recall route proposed (label: route; an item "
                                                   "several routes proposed counts for each)",
               "shoprec_list_pairs_total": "item pairs within served lists",
               "shoprec_list_pairs_diverse_total": "of them, pairs of different categories (diversity = diverse / pairs)"}

    def _count_routes(self, masks: np.ndarray) -> None:
        per_route = ((masks.reshape(-1, 1) >> np.arange(len(ROUTES), dtype=np.int32)) & 1).sum(0).tolist()
        for route, n in zip(ROUTES, per_route):
            self.count("shoprec_served_route_items_total", n, route=route)

    def _count_lists(self, rows: np.ndarray, owner: np.ndarray) -> None:
        """The served rows of a batch's lists (owner: each row's list, ascending): items, pairs within a list, and
        of them the pairs of different categories (items without a category count as one category)."""
        same = _run_lengths(np.sort(owner * self._category_span + self.category[rows]))
        lists = _run_lengths(owner)
        pairs = int((lists * (lists - 1) // 2).sum())
        self.count("shoprec_served_items_total", len(rows))
        self.count("shoprec_list_pairs_total", pairs)
        self.count("shoprec_list_pairs_diverse_total", pairs - int((same * (same - 1) // 2).sum()))

    def run(self, t: dict) -> tuple:
        return self.run_requests(t, [len(t["candidate_rows"])])[0]

    def run_requests(self, t: dict, counts: list[int]) -> list[tuple]:
        """The requests of a batch (`counts` rows each, each request its own k) in one pass: the scores, the orders
        (one sort for every user served without MMR or a category cap, in the ranker's or the recall order) and
        the metrics over the whole batch; then each request's rows, padded to its own longest list, as if it had
        run alone."""
        rows, scores, k = t["candidate_rows"], t["ranking_scores"], np.ravel(t["k"]).astype(np.int64)
        code = t.get("strategy")
        st = self.strategy
        resolved = [st.resolve(*(np.asarray(code).reshape(-1, 2)[i] if code is not None else (st.default_scene, 0)))
                    for i in range(len(rows))]
        lam = np.array([r.diversity for r in resolved]) if t.get("diversity") is None else np.ravel(t["diversity"])
        scores = self.final_scores(rows, scores, t.get("ranking_probs"), t.get("blend"), resolved)
        routes = t.get("candidate_routes")
        routes = np.zeros(rows.shape, np.int32) if routes is None else routes
        recall_order = -np.arange(rows.shape[1], dtype=np.float32)  # the fused order: candidates arrive in it
        by_ranker = np.array([r.by_ranker for r in resolved], dtype=bool)
        ranked = np.where(by_ranker[:, None], scores, recall_order[None, :])
        plain = (lam <= 0) & np.array([r.max_per_category <= 0 for r in resolved], dtype=bool)
        # the plain users' lists: mmr_order with lam 0 is best_first's first k minus padding, row by row
        firsts = best_first(rows[plain], ranked[plain], int(k.max(initial=0))) if plain.any() else None
        top, j = [], 0
        for i in range(len(rows)):
            if plain[i]:
                order = firsts[j][: k[i]]
                j += 1
                top.append(order[rows[i][order] >= 0])
            else:
                top.append(self.order(rows[i], ranked[i], int(k[i]), float(lam[i]), resolved[i].max_per_category))
        served = np.concatenate([rows[i][o] for i, o in enumerate(top)]) if top else np.zeros(0, np.int64)
        owner = np.repeat(np.arange(len(top)), [len(o) for o in top])
        self._count_lists(served, owner)
        self._count_routes(np.concatenate([routes[i][o] for i, o in enumerate(top)]) if top else np.zeros(0, np.int32))
        out, offsets = [], np.cumsum([0, *counts])
        for a, b in zip(offsets[:-1], offsets[1:]):
            width = max((len(top[i]) for i in range(a, b)), default=0)
            ids = np.full((b - a, width), -1, np.int64)
            best = np.full((b - a, width), -np.inf, np.float32)
            masks = np.zeros((b - a, width), np.int32)
            for j, i in enumerate(range(a, b)):
                n = len(top[i])
                ids[j, :n], best[j, :n], masks[j, :n] = self.item_ids[rows[i][top[i]]], scores[i][top[i]], routes[i][top[i]]
            out.append((ids, best, masks))
        return out

    def final_scores(self, rows: np.ndarray, scores: np.ndarray, probs: np.ndarray | None, request_blend: np.ndarray | None,
                     resolved: list) -> np.ndarray:
        """Per user: the exported score (pCTR * (1 + w * pCVR)), or the blend the request, else the scene or its arm,
        sets: ctr * pCTR + cvr * pCTR * pCVR + value * pCTR * pCVR * item value; times the bundle's popularity
        factor (`popularity_factor`) when train chose one."""
        blends = [request_blend[i] if request_blend is not None else r.blend for i, r in enumerate(resolved)]
        if probs is None or all(b is None for b in blends):
            return self.with_prior(rows, scores)
        out = np.array(scores, dtype=np.float32, copy=True)
        value = self.value[np.maximum(rows, 0)] if self.value is not None else np.zeros(rows.shape, np.float32)
        for i, b in enumerate(blends):
            if b is not None:
                ctr, cvr = probs[i, :, 0], probs[i, :, 1]
                out[i] = b[0] * ctr + ctr * cvr * (b[1] + b[2] * value[i])
        return self.with_prior(rows, out)

    def with_prior(self, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The scores times each candidate's popularity factor (padding keeps its score)."""
        if self.prior is None:
            return scores
        return np.where(rows >= 0, scores * self.prior[np.maximum(rows, 0)], scores).astype(np.float32)

    def __call__(self, rows: np.ndarray, scores: np.ndarray, k: int, diversity: float = 0.0):
        """One user: (raw item ids, scores), padding dropped."""
        scores = self.with_prior(rows, scores)
        order = self.order(rows, scores, k, diversity)
        return self.item_ids[rows[order]], scores[order].astype(np.float32)

    def order(self, rows: np.ndarray, scores: np.ndarray, k: int, diversity: float = 0.0, cap: int | None = None) -> np.ndarray:
        """One user: positions of the served candidates, in served order; cap: at most this many items per category
        (0: no cap; None: serve.max_per_category)."""
        cap = self.cfg.max_per_category if cap is None else cap
        if cap <= 0:
            order = mmr_order(rows, scores, k, diversity, self.embeddings, self.cfg.diversity_pool)
        else:  # the MMR (or ranker) order over the pool, then the rest by score; at most `cap` per category
            first = mmr_order(rows, scores, max(self.cfg.diversity_pool, k), diversity, self.embeddings, self.cfg.diversity_pool)
            rest = best_first(rows, scores, len(rows))
            rest = rest[(rows[rest] >= 0) & ~np.isin(rest, first)]
            order = capped(np.concatenate([first, rest]), self.category[rows[np.concatenate([first, rest])]], cap, k)
        return order


def _run_lengths(sorted_keys: np.ndarray) -> np.ndarray:
    """The lengths of the runs of equal values in a sorted array."""
    if not len(sorted_keys):
        return np.zeros(0, np.int64)
    return np.diff(np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1], [True]))))


def capped(order: np.ndarray, categories: np.ndarray, cap: int, k: int) -> np.ndarray:
    """The first k of `order` with at most `cap` items per category (items without a category are not capped)."""
    counts: dict[int, int] = {}
    keep = []
    for j, c in zip(order.tolist(), categories.tolist()):
        if c >= 0 and counts.get(c, 0) >= cap:
            continue
        keep.append(j)
        counts[c] = counts.get(c, 0) + 1
        if len(keep) == k:
            break
    return np.asarray(keep, dtype=np.int64)


class BlockedItems:
    """Raw item ids that are never served, from a text file (one id per line, '#' comments) that operators
    change while the server runs: re-read at most once a second when its mtime changes. A file that
    disappears or stops parsing keeps the last good list (logged); ids not in the catalog are ignored
    (logged with their count)."""

    def __init__(self, path: str, item_ids: np.ndarray, check_every_s: float = 1.0):
        self.path = Path(path).expanduser()
        if not self.path.is_absolute():
            raise ValueError(f"serve.blocked_items_file must be an absolute path (each server process has its own working "
                             f"folder), got {path!r}")
        if not self.path.is_file():
            raise FileNotFoundError(f"serve.blocked_items_file: {self.path} does not exist (create it empty to block nothing)")
        self.item_ids, self.check_every_s = item_ids, check_every_s
        self._order = np.argsort(item_ids, kind="stable")
        self._mask, self._rows = np.zeros(len(item_ids), bool), np.zeros(0, np.int64)
        self._mtime, self._checked = None, 0.0
        self.reload()

    def reload(self) -> None:
        import logging
        import time

        log = logging.getLogger("shoprec.serve")
        self._checked = time.monotonic()
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._mtime:
                return
            ids = []
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                text = line.split("#", 1)[0].strip()
                if text:
                    try:
                        ids.append(int(text))
                    except ValueError:
                        raise ValueError(f"{self.path}: line {n}: {text!r} is not an integer item id") from None
        except (OSError, ValueError) as exc:
            log.warning("blocked items: keeping the last list (%d items): %s", int(self._mask.sum()), exc)
            return
        ids = np.asarray(ids, dtype=np.int64)
        rows = find_rows(self.item_ids, ids, self._order)
        found = rows >= 0
        mask = np.zeros(len(self.item_ids), bool)
        mask[rows[found]] = True
        if (~found).any():
            log.warning("blocked items: %d ids in %s are not in the catalog (ignored), e.g. %d", int((~found).sum()), self.path,
                        int(ids[~found][0]))
        self._mask, self._mtime, self._rows = mask, mtime, np.flatnonzero(mask).astype(np.int64)

    def mask(self) -> np.ndarray:
        import time

        if time.monotonic() - self._checked >= self.check_every_s:
            self.reload()
        return self._mask

    def rows(self) -> np.ndarray:
        """The blocked items' rows, ascending."""
        self.mask()
        return self._rows
