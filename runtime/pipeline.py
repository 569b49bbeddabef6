"""The step graph in-process: the reference the served results must equal, the latency floor for the
benchmarks, the engine behind the FastAPI comparison server, and what `shoprec evaluate` scores as
"the full served pipeline".

It runs the same step classes as the Triton models (runtime/steps.py), in the order the graph
declares them (shoprec/contract.py), over tensors shaped as Triton ships them, and checks every
step's outputs against the declaration. By default it runs the graph's steps one by one; with
`profile="cpu"` it runs that profile's fused steps, exactly as the cpu repository does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shoprec import contract

from .steps import NUMPY_DTYPES, Bundle, bundle_dir, check_outputs, load_step, max_k, serve_config


class Pipeline:
    def __init__(self, path: str | Path | None = None, threads: int = 1, cfg=None, profile: str | None = None):
        self.bundle = bundle = Bundle(Path(path) if path else bundle_dir())
        self.cfg = cfg or serve_config()
        self.graph = contract.STEPS if profile is None else contract.profile_steps(profile)
        self.steps = {s.name: load_step(s, bundle, self.cfg, threads=threads) for s in self.graph}
        self.sizes = bundle.sizes(self.cfg)
        self.max_k = max_k(bundle, self.cfg)
        self.item_table = bundle.npz("item_table")

    def run(self, tensors: dict, start: str | None = None, stop: str | None = None) -> dict:
        """Run the steps from `start` up to (not including) `stop` over a batch; returns every tensor.

        Request inputs are [B, 1] arrays (absent optional inputs: missing or None). A step whose
        outputs differ in length per request (top-k) answers each request of the batch on its own, as
        Triton runs it: call `recommend` for those."""
        tensors = dict(tensors)
        names = [s.name for s in self.graph]
        first = names.index(start) if start else 0
        last = names.index(stop) if stop else len(names)
        for step in self.graph[first:last]:
            impl = self.steps[step.name]
            inputs = impl.check({t.name: tensors.get(step.graph_name(t.name)) for t in step.inputs})
            outputs = impl.run(inputs)
            check_outputs(step, outputs, self.sizes)
            tensors.update({step.graph_name(name): value for name, value in inputs.items()})
            tensors.update(zip((step.graph_name(t.name) for t in step.outputs), outputs))
        return tensors

    @staticmethod
    def request(user_id, k, hour=None, weekday=None, client_device=None, exclude_seen=None, diversity=None, scene=None,
                context_item_ids=None, force_arms=None, blend=None, cache_salt=None) -> dict:
        """Request tensors ([B, 1], the contract's dtypes; context_item_ids [B, L], blend [B, 3]) from scalars or
        per-user arrays (context_item_ids, blend: one for every user, or one per user). cache_salt changes
        nothing here (it is the server's response cache's business)."""
        user_id = np.asarray(user_id, dtype=np.int64).reshape(-1, 1)
        values = {"k": k, "hour": hour, "weekday": weekday, "client_device": client_device, "exclude_seen": exclude_seen,
                  "diversity": diversity, "scene": scene, "force_arms": force_arms, "cache_salt": cache_salt}
        out = {"user_id": user_id}
        for t in contract.REQUEST_INPUTS[1:]:
            if t.name in ("context_item_ids", "blend"):
                continue
            v = values.get(t.name)
            if v is not None:
                out[t.name] = np.broadcast_to(np.asarray(v, dtype=NUMPY_DTYPES[t.dtype]).reshape(-1, 1), user_id.shape).copy()
        if context_item_ids is not None:
            ctx = np.asarray(context_item_ids, dtype=np.int64)
            out["context_item_ids"] = np.broadcast_to(ctx.reshape(-1, ctx.shape[-1] if ctx.ndim else 1),
                                                      (len(user_id), ctx.shape[-1] if ctx.ndim else 1)).copy()
        if blend is not None:
            out["blend"] = np.broadcast_to(np.asarray(blend, dtype=np.float32).reshape(-1, 3), (len(user_id), 3)).copy()
        return out

    def rank(self, request: dict) -> dict:
        """Every step before the per-request ones for a batch of users: candidate_rows, ranking_scores, cold_start, ..."""
        per_request = next((s.name for s in self.graph if s.per_request), None)
        return self.run(request, stop=per_request)

    def recommend(self, user_id, k, hour=None, weekday=None, client_device=None, exclude_seen=None, diversity=None,
                  with_routes: bool = False, scene=None, context_item_ids=None, force_arms=None, blend=None, cache_salt=None):
        """Batch of users -> list of (item_ids, scores, cold_start), one per user (each user its own request);
        with_routes: (item_ids, scores, cold_start, item_routes), the route bitmask of each served item."""
        tensors = self.rank(self.request(user_id, k, hour, weekday, client_device, exclude_seen, diversity, scene,
                                         context_item_ids, force_arms, blend, cache_salt))
        last = self.graph[-1]
        if not last.per_request:
            raise ValueError(f"the graph's last step {last.name!r} does not produce per-request lists")
        impl = self.steps[last.name]
        inputs = impl.check({t.name: tensors.get(last.graph_name(t.name)) for t in last.inputs})
        out = []
        for i, outputs in enumerate(impl.run_requests(inputs, [1] * len(tensors["user_id"]))):
            check_outputs(last, outputs, self.sizes, 1)
            named = {last.graph_name(t.name): o[0] for t, o in zip(last.outputs, outputs)}
            keep = named["item_ids"] >= 0
            # cold_start: from the feature step, or from the last step where it runs the whole graph (the cpu profile)
            cold = named["cold_start"] if "cold_start" in named else tensors["cold_start"][i]
            one = (named["item_ids"][keep], named["scores"][keep], bool(np.ravel(cold)[0]))
            out.append((*one, named["item_routes"][keep]) if with_routes else one)
        return out
