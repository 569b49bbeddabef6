"""What each step of the graph costs in-process, per user: one user per request (as the server sees them at
concurrency 1) and 16 per batch (what Triton's batcher hands a step under load): the numbers behind the
Python-backend stubs' CPU time.

    .venv/bin/python -m benchmarks.step_cost              # on ARTIFACTS (`make demo` built them)

The in-process pipeline (runtime/pipeline.py, the cpu profile's unfused steps, online store off)
runs `--users` warm users, one per request and then 16 per batch; every step is timed on its own inputs,
`--rounds` times; the minimum of the rounds' means is reported (the least disturbed round on a shared
machine). The feature step is timed a second time encoding every user's state per request
(`feature_transform_encoding_every_user`), against the columns `export` encoded once.
`--chunk-rows 0 1200` also times the ranker alone at 16 users per batch, run whole and in chunks of that many
candidate rows (the ranker declaration's `cpu_chunk_rows`, shoprec/contract.py), alternated.
`--fused` also times the cpu profile's one model (`pipeline`, the whole graph) over batches of 16 one-user
requests, as Triton's batcher hands them to it: top-k answering the batch's requests in one call (`Fused.one_call`,
the default) and request by request, alternated. Writes benchmarks/results/step_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import describe
from .serving_bench import warm_users


def run(artifacts: Path, users: int = 500, rounds: int = 5, batches: tuple[int, ...] = (1, 16),
        chunk_rows: tuple[int, ...] = (), fused: bool = False) -> dict:
    from runtime.pipeline import Pipeline

    cfg = load_config().replace("serve", online_store="none").serve
    p = Pipeline(artifacts / "serving", cfg=cfg)
    ids = [int(u) for u in warm_users(artifacts)[:users]]
    out = {"users": len(ids), "rounds": rounds}
    for batch in batches:
        ms = _per_step(p, ids, batch, rounds)
        key = "" if batch == 1 else f"_batch{batch}"  # batch 1: a request is a user
        out[f"ms_per_user{key}" if batch > 1 else "ms_per_request"] = ms
        out[f"total_ms_per_user{key}" if batch > 1 else "total_ms"] = round(sum(ms.values()), 4)
    ft = p.steps["feature_transform"]
    if ft.encoded:  # the same step encoding every user's state per request, as before the store held it encoded
        ft.encoded = False
        try:
            out["feature_transform_encoding_every_user"] = {
                ("ms_per_request" if batch == 1 else f"ms_per_user_batch{batch}"):
                    _per_step(p, ids, batch, rounds, only="feature_transform")["feature_transform"] for batch in batches}
        finally:
            ft.encoded = True
    if chunk_rows:
        out.update(_ranker_chunks(p, ids, rounds, chunk_rows))
    if fused:
        out.update(_fused(artifacts, ids, rounds))
    return out


def _ranker_chunks(p, ids: list[int], rounds: int, settings: tuple[int, ...]) -> dict:
    """The ranker step alone at 16 users per batch, its chunk_rows (the declaration's cpu_chunk_rows) set to each of
    `settings` (0: one run per batch), the settings alternated round by round: ms per user, the minimum of the rounds."""
    step = next(s for s in p.graph if s.name == "ranker")
    impl = p.steps["ranker"]
    feeds = []
    for i in range(0, len(ids), 16):
        t = p.run(p.request(np.array(ids[i : i + 16]), 10), stop="ranker")
        feeds.append(impl.check({x.name: t.get(step.graph_name(x.name)) for x in step.inputs}))
    default = impl.chunk_rows
    times: dict[int, list[float]] = {c: [] for c in settings}
    try:
        for r in range(rounds):
            for c in (settings if r % 2 == 0 else settings[::-1]):
                impl.chunk_rows = c
                t0 = time.perf_counter()
                for f in feeds:
                    impl.run(f)
                times[c].append((time.perf_counter() - t0) / len(ids) * 1e3)
    finally:
        impl.chunk_rows = default
    return {"ranker_ms_per_user_batch16_by_chunk_rows": {str(c): round(min(v), 4) for c, v in times.items()},
            "chunk_rows_default": default}


def _fused(artifacts: Path, ids: list[int], rounds: int) -> dict:
    """The cpu profile's fused model over batches of 16 one-user requests, top-k in one call and request by request
    (Fused.one_call), alternated round by round: ms per request, the minimum of the rounds."""
    from .graph_cost import fused_batches

    model, batches = fused_batches(artifacts, ids, 16)
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(rounds):
            for one_call in ((True, False) if r % 2 == 0 else (False, True)):
                model.one_call = one_call
                t0 = time.perf_counter()
                for b in batches:
                    model.run_requests(b, [1] * len(b["user_id"]))
                times[one_call].append((time.perf_counter() - t0) / (16 * len(batches)) * 1e3)
    finally:
        model.one_call = True
    return {"fused_ms_per_request_batch16": {"top-k in one call": round(min(times[True]), 4),
                                             "top-k request by request": round(min(times[False]), 4)}}


def _per_step(p, ids: list[int], batch: int, rounds: int, only: str | None = None) -> dict:
    """Each step's time per user, the users sent `batch` per request (as Triton's batcher hands them to a step)."""
    from runtime.steps import check_outputs

    timed = [s for s in p.graph if only is None or s.name == only]
    per_step: dict[str, list[float]] = {s.name: [] for s in timed}
    feeds = []
    for i in range(0, len(ids), batch):  # each step's checked inputs, from the steps before it
        chunk = ids[i : i + batch]
        tensors = p.request(np.array(chunk), 10)
        feed = {}
        for step in p.graph:
            impl = p.steps[step.name]
            inputs = impl.check({t.name: tensors.get(step.graph_name(t.name)) for t in step.inputs})
            feed[step.name] = (inputs, len(chunk))
            if step.per_request:
                break
            outputs = impl.run(inputs)
            check_outputs(step, outputs, p.sizes, len(chunk))
            tensors.update({step.graph_name(t.name): o for t, o in zip(step.outputs, outputs)})
        feeds.append(feed)
    for _ in range(rounds):
        for step in timed:
            impl = p.steps[step.name]
            t0 = time.perf_counter()
            for feed in feeds:
                inputs, n = feed[step.name]
                if step.per_request:
                    impl.run_requests(inputs, [1] * n)
                else:
                    impl.run(inputs)
            per_step[step.name].append((time.perf_counter() - t0) / len(ids) * 1e3)
    return {name: round(min(v), 4) for name, v in per_step.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, help="default: RESULTS/step_cost.json")
    ap.add_argument("--tables", choices=["auto", "dense", "sparse"], default="auto",
                    help="retrieval's per-user tables: as the server picks them by catalog size (auto), or forced")
    ap.add_argument("--chunk-rows", type=int, nargs="+", metavar="ROWS",
                    help="also time the ranker alone at 16 users per batch with its chunk_rows at each "
                         "value (0: the whole batch in one run), alternated")
    ap.add_argument("--fused", action="store_true",
                    help="also time the cpu profile's one model over batches of 16 requests, top-k in one call and "
                         "request by request, alternated")
    args = ap.parse_args(argv)
    if args.tables != "auto":
        import runtime.candidates

        runtime.candidates.SPARSE_FROM_ITEMS = 0 if args.tables == "sparse" else 2**62
    r = run(args.artifacts.resolve(), args.users, args.rounds, chunk_rows=tuple(args.chunk_rows or ()), fused=args.fused)
    given = sys.argv[1:] if argv is None else argv
    r.update(machine=describe(), tables=args.tables, command=" ".join(["python -m benchmarks.step_cost", *given]))
    out = args.out or args.results / "step_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
