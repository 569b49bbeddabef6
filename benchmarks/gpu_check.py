"""The prepared GPU check: one command to run the moment a GPU machine is at hand.

    benchmarks/gpu_check [--device auto|cpu|cuda] [--size tiny|full] [--out DIR] [--budget-s S]

Parts, each reported as ran or skipped (with the reason) in DIR/gpu_check.json and in one last line:
  training   the two-tower and the ranker (the production modules and losses, training/modules.py)
             on planted synthetic batches, the same data and seed on the CPU and on the device:
             samples/s both ways, and whether the loss curves agree in shape.
  retrieval  top-100 over a synthetic catalog (1M items at --size full): FAISS flat and IVF on the
             device when FAISS has GPU support there (FAISS on the CPU with --device cpu); torch
             matmul+topk on the device always, labelled as such and never as FAISS. Latency at batch
             1/16/256 and recall@100 against exact search.
  serving    the cpu profile on tritonserver (nvidia-pytriton wheel) with the exported bundle in
             ARTIFACTS/serving: served lists against the in-process pipeline (parity) and latency
             at concurrency 1..64 from the project's async gRPC client. The gpu profile is not run:
             it serves the towers and ranker as TensorRT plans, and no TensorRT builder exists
             outside the NGC container (see the README "GPU" section).

`--device cpu --size tiny` runs the same code paths in CI (tests/test_gpu_check.py), so the script is
known to work before a device is lent. On the device: `benchmarks/gpu_check --out "$OUT"`.
Standard library + NumPy + torch at import; FAISS, tritonserver and the client only where used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {
    "tiny": {"items": 2_000, "users": 500, "seq_len": 10, "batch": 128, "steps": 40, "candidates": 50, "lists": 16,
             "catalog": 20_000, "queries": 64, "reps": 5, "serve_users": 20, "concurrency": (1, 4), "serve_requests": 60},
    "full": {"items": 100_000, "users": 50_000, "seq_len": 50, "batch": 1024, "steps": 300, "candidates": 500, "lists": 32,
             "catalog": 1_000_000, "queries": 256, "reps": 20, "serve_users": 200, "concurrency": (1, 4, 16, 64),
             "serve_requests": 2000},
}
TOPK = 100
BATCHES = (1, 16, 256)


# --- the machine -----------------------------------------------------------------------------

def machine(device: str) -> dict:
    import torch

    from .machine import cpu_model

    info = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "cpu": cpu_model(), "cores": os.cpu_count(), "device": device, "gpu": None, "cuda": torch.version.cuda}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("faiss", "onnxruntime", "tritonclient"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: recorded as absent
            info[name] = None
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# --- training --------------------------------------------------------------------------------

def planted_data(size: dict, seed: int) -> dict:
    """Users with one taste category; their sequences and positives come from it (codes: 0 pad, 1 null, 2 OOV)."""
    rng = np.random.default_rng(seed)
    n_items, n_users, length, cats = size["items"], size["users"], size["seq_len"], 20
    item_cat = rng.integers(0, cats, n_items)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(cats)]
    taste = rng.integers(0, cats, n_users)

    def draw(users, k):
        return np.stack([rng.choice(by_cat[taste[u]], k) for u in users]) + 3

    users = np.arange(n_users)
    return {"item_cat": item_cat, "taste": taste, "seq": draw(users, length), "n_items": n_items, "cats": cats,
            "by_cat": by_cat}


def _two_tower_batches(data: dict, size: dict, steps: int, seed: int):
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        u = rng.integers(0, len(data["taste"]), size["batch"])
        pos = np.array([rng.choice(data["by_cat"][data["taste"][x]]) for x in u]) + 3
        ucat = np.stack([u % 50 + 3, data["taste"][u] + 3], axis=1)
        icat = np.stack([pos, data["item_cat"][pos - 3] + 3], axis=1)
        yield ucat, data["seq"][u], pos, icat


def train_curve(kind: str, device: str, size: dict, seed: int) -> dict:
    """`steps` optimizer steps of the production module on `device`; the loss every step and samples/s."""
    import torch
    from torch.nn import functional as F

    from training.modules import Ranker, TwoTower, sampled_softmax_loss

    data = planted_data(size, seed)
    length, n_codes = size["seq_len"], data["n_items"] + 3
    torch.manual_seed(seed)  # same initial weights on every device: built on the CPU, then moved
    tower = TwoTower([50 + 3, data["cats"] + 3], [0, 1], [0, 1], 2, [n_codes, data["cats"] + 3], [0, 1], 2, length,
                     out_dim=32, hidden=[64], id_dim=16, field_dim=8)
    if kind == "ranker":
        model = Ranker([50 + 3, data["cats"] + 3], [0, 1], [0, 1], 2, [n_codes, data["cats"] + 3], [0, 1], 2, 3, length,
                       dim=8, bottom=[16, 8], top=[32], id_table=tower.item_ids, din=True, deep=True)
    else:
        model = tower
    model = model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses, samples = [], 0
    rng = np.random.default_rng(seed + 2)
    _sync(device)
    t0 = time.perf_counter()
    for ucat, seq, pos, icat in _two_tower_batches(data, size, size["steps"], seed):
        t = {k: torch.as_tensor(v, device=device) for k, v in (("ucat", ucat), ("seq", seq), ("pos", pos), ("icat", icat))}
        b = len(ucat)
        ucont = torch.zeros(b, 2, device=device)
        kinds = torch.full_like(t["seq"], 2)
        if kind == "two_tower":
            u = model.user_tower(t["ucat"], ucont, t["seq"], kinds)
            v = model.item_tower(t["icat"], torch.zeros(b, 2, device=device))
            loss = sampled_softmax_loss(u, v, t["pos"], None, 0.05)
        else:  # one list per user: half from the user's taste category, half at random; a click is a taste match
            n, lists = size["candidates"] // 10, b // 8
            tastes = ucat[:lists, 1] - 3
            cand = np.concatenate([np.stack([rng.choice(data["by_cat"][x], n // 2) for x in tastes]) + 3,
                                   rng.integers(3, n_codes, (lists, n - n // 2))], axis=1)
            cand_cat = data["item_cat"][cand - 3]
            click = torch.as_tensor((cand_cat == tastes[:, None]).astype(np.float32), device=device)
            item_cat = torch.as_tensor(np.stack([cand, cand_cat + 3], axis=-1), device=device)
            logits = model(t["ucat"][:lists], ucont[:lists], t["seq"][:lists], kinds[:lists], item_cat,
                           torch.zeros(lists, n, 2, device=device), torch.zeros(lists, n, 3, device=device))
            loss = F.binary_cross_entropy_with_logits(logits[..., 0], click)
            b = lists * n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        samples += b
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"device": device, "steps": len(losses), "samples_per_s": round(samples / seconds, 1), "seconds": round(seconds, 2),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "losses": [round(x, 5) for x in losses]}


def curves_agree(a: list[float], b: list[float], windows: int = 5, tolerance: float = 0.1) -> dict:
    """Shape agreement of two loss curves: the mean loss of each of `windows` equal spans, relative gap at most `tolerance`,
    and both falling from the first span to the last."""
    wa = [float(np.mean(x)) for x in np.array_split(np.asarray(a), windows)]
    wb = [float(np.mean(x)) for x in np.array_split(np.asarray(b), windows)]
    gap = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(wa, wb))
    falling = wa[-1] < wa[0] and wb[-1] < wb[0]
    return {"windows_a": [round(x, 4) for x in wa], "windows_b": [round(x, 4) for x in wb], "max_relative_gap": round(gap, 4),
            "tolerance": tolerance, "both_falling": falling, "agree": bool(gap <= tolerance and falling)}


def part_training(device: str, size: dict, seed: int) -> dict:
    out = {}
    for kind in ("two_tower", "ranker"):
        runs = {"cpu": train_curve(kind, "cpu", size, seed)}
        if device != "cpu":
            runs[device] = train_curve(kind, device, size, seed)
            runs["agreement"] = curves_agree(runs["cpu"]["losses"], runs[device]["losses"])
            runs["speedup"] = round(runs[device]["samples_per_s"] / runs["cpu"]["samples_per_s"], 2)
        else:  # the CPU run against itself once more: the same seed gives the same curve (the check's own check)
            runs["agreement"] = curves_agree(runs["cpu"]["losses"], train_curve(kind, "cpu", size, seed)["losses"])
        out[kind] = runs
    return out


# --- retrieval -------------------------------------------------------------------------------

def _catalog(n: int, queries: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (like trained item embeddings, unlike uniform noise, IVF has structure to use)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim)).astype(np.float32)
    items = centres[rng.integers(0, 256, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    q = centres[rng.integers(0, 256, queries)] + 0.5 * rng.normal(size=(queries, dim)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return items, q


def _latency(search, queries: np.ndarray, reps: int, device: str) -> dict:
    out = {}
    for b in BATCHES:
        batch = queries[np.arange(b) % len(queries)]
        search(batch)  # warm-up
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            search(batch)
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[f"batch{b}_ms"] = round(float(np.median(times)) * 1e3, 3)
    return out


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return round(float(np.mean([len(np.intersect1d(f, e)) / len(e) for f, e in zip(found, exact)])), 4)


def part_retrieval(device: str, size: dict) -> dict:
    import torch

    items, queries = _catalog(size["catalog"], size["queries"])
    dev_items = torch.as_tensor(items, device=device)

    def torch_search(q: np.ndarray) -> np.ndarray:
        scores = torch.as_tensor(q, device=device) @ dev_items.T
        return torch.topk(scores, TOPK, dim=1).indices.cpu().numpy()

    exact = torch_search(queries)  # fp32 exhaustive: the reference every method is scored against
    methods = {f"torch-matmul-topk ({device}, not FAISS)": {**_latency(torch_search, queries, size["reps"], device),
                                                            f"recall@{TOPK}": _recall(exact, exact)}}
    out = {"catalog_items": len(items), "dim": items.shape[1], "queries": len(queries), "methods": methods}
    try:
        import faiss
    except ImportError:
        out["faiss"] = "skipped: FAISS is not installed here"
        return out
    gpu = device == "cuda"
    if gpu and not hasattr(faiss, "StandardGpuResources"):
        out["faiss"] = "skipped: this FAISS has no GPU support (no faiss-gpu wheel fits the device; see the README)"
        return out
    res = faiss.StandardGpuResources() if gpu else None
    nlist = int(min(4 * np.sqrt(len(items)), len(items) // 40))  # FAISS wants >= 39 training points per list
    for name, build in (("flat", lambda: faiss.IndexFlatIP(items.shape[1])),
                        ("ivf", lambda: faiss.IndexIVFFlat(faiss.IndexFlatIP(items.shape[1]), items.shape[1], nlist,
                                                           faiss.METRIC_INNER_PRODUCT))):
        t0 = time.perf_counter()
        index = build()
        if gpu:
            index = faiss.index_cpu_to_gpu(res, 0, index)
        if name == "ivf":
            index.train(items[np.random.default_rng(1).choice(len(items), min(len(items), 50 * nlist), replace=False)])
            index.nprobe = 32
        index.add(items)
        build_s = time.perf_counter() - t0

        def faiss_search(q, index=index):
            return index.search(np.ascontiguousarray(q), TOPK)[1]

        methods[f"faiss-{name} ({'gpu' if gpu else 'cpu'})"] = {
            **_latency(faiss_search, queries, size["reps"], device), f"recall@{TOPK}": _recall(faiss_search(queries), exact),
            "build_s": round(build_s, 2), **({"nlist": nlist, "nprobe": 32} if name == "ivf" else {})}
    return out


# --- serving ---------------------------------------------------------------------------------

def part_serving(device: str, size: dict, artifacts: Path) -> dict:
    """The cpu profile through a real tritonserver: parity with the in-process pipeline, then latency."""
    import asyncio

    if device == "cuda":
        raise _Skip("the gpu profile serves the towers and ranker as TensorRT plans, and no TensorRT builder exists outside "
                    "the NGC container; torch-on-CUDA python steps are not built yet")
    missing = [m for m in ("faiss", "onnxruntime", "tritonclient", "pytriton") if not _importable(m)]
    if missing:
        raise _Skip(f"not installed here: {', '.join(missing)}")
    if not (artifacts / "serving" / "manifest.json").is_file():
        raise _Skip(f"no exported bundle at {artifacts / 'serving'} (run `make demo` or `shoprec all` first)")
    from client import AsyncRecommenderClient
    from runtime.pipeline import Pipeline
    from serving.launcher import TritonServer
    from shoprec.config import load_config

    cfg = load_config()
    pipe = Pipeline(artifacts / "serving", cfg=cfg.serve)
    store = pipe.steps["feature_transform"].store
    users = store.user_id[: size["serve_users"]]
    want = {int(u): ids for u, (ids, _, _) in zip(users, pipe.recommend(users, 10))}

    async def load(url: str, concurrency: int, n: int) -> tuple[list[float], dict]:
        client = AsyncRecommenderClient(url, "grpc")
        times, served = [], {}
        queue = [int(users[i % len(users)]) for i in range(n)]

        async def worker():
            while queue:
                u = queue.pop()
                t0 = time.perf_counter()
                rec = await client.recommend(u, k=10)
                times.append(time.perf_counter() - t0)
                served[u] = rec.item_ids

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return times, served, time.perf_counter() - t0

    out = {"profile": "cpu", "users": len(users), "levels": []}
    with TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True) as server:
        _, served, _ = asyncio.run(load(server.grpc_url, 1, len(users)))
        same = sum(np.array_equal(served[u], want[u]) for u in want)
        out["parity"] = {"lists_equal": int(same), "of": len(want), "ok": same == len(want)}
        for c in size["concurrency"]:
            times, _, wall = asyncio.run(load(server.grpc_url, c, size["serve_requests"]))
            ms = np.array(times) * 1e3
            out["levels"].append({"concurrency": c, "requests": len(times), "throughput_rps": round(len(times) / wall, 1),
                                  "p50_ms": round(float(np.percentile(ms, 50)), 3),
                                  "p99_ms": round(float(np.percentile(ms, 99)), 3)})
    return out


class _Skip(Exception):
    """A part that cannot run here: its reason goes into the report and the last line."""


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- the run ---------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="compute device for the device side of each part (auto: CUDA when torch sees one)")
    p.add_argument("--size", choices=sorted(SIZES), help="tiny: CI sizes; full: 1M-item catalog (default: full on "
                                                         "CUDA, tiny on the CPU)")
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT") or "benchmarks/results",
                   help="folder for gpu_check.json (default: $GPU_CHECK_OUT, else $OUT, else benchmarks/results)")
    p.add_argument("--artifacts", default=os.environ.get("SHOPREC_ARTIFACTS", "artifacts"), help="for the serving part")
    p.add_argument("--parts", nargs="+", default=["training", "retrieval", "serving"],
                   choices=["training", "retrieval", "serving"])
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the parts that would start after this many seconds")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    import torch

    from shoprec.device import torch_device

    device = torch_device(args.device)
    size_name = args.size or ("full" if device == "cuda" else "tiny")
    size = SIZES[size_name]
    t_start = time.perf_counter()
    report = {"command": "benchmarks/gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "size": size_name,
              "machine": machine(device), "parts": {}}
    runners = {"training": lambda: part_training(device, size, args.seed), "retrieval": lambda: part_retrieval(device, size),
               "serving": lambda: part_serving(device, size, Path(args.artifacts))}
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in args.parts:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            report["parts"][name] = {"status": "skipped", "reason": f"time budget {args.budget_s:.0f}s spent ({elapsed:.0f}s)"}
            continue
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            report["parts"][name] = {"status": "ran", **runners[name](), "seconds": round(time.perf_counter() - t0, 1)}
        except _Skip as why:
            report["parts"][name] = {"status": "skipped", "reason": str(why)}
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others' figures
            report["parts"][name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["summary"] = summary_line(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(report["summary"], flush=True)
    return report


def summary_line(report: dict) -> str:
    dev = report["machine"]["gpu"] or f"cpu ({report['machine']['cores']} cores)"
    bits = []
    for name, part in report["parts"].items():
        if part["status"] == "ran":
            extra = ""
            if name == "training":
                agree = all(part[k]["agreement"]["agree"] for k in ("two_tower", "ranker"))
                extra = f" (curves {'agree' if agree else 'DISAGREE'})"
            elif name == "serving":
                extra = f" (parity {'ok' if part['parity']['ok'] else 'FAILED'})"
            bits.append(f"ran {name}{extra}")
        else:
            bits.append(f"{part['status']} {name}: {part['reason']}")
    return f"gpu_check on {dev}, {report['size']} sizes, {report['seconds']}s: " + "; ".join(bits)


if __name__ == "__main__":
    main()
