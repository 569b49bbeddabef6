"""Triton's response cache on the candidates step (the cpu-stages profile): its hit rate and what a hit saves, on
a replay of the shop.

    python -m benchmarks.response_cache                  # after `make demo`; ~5 min on 2 cores
    python -m benchmarks.response_cache --artifacts A --tag medium

The cache answers the candidates step (retrieval + candidate features, a function of its inputs and the
bundle; `serve.response_cache_mb`) when a request repeats one the step ran: same user embedding (so the
same user state and context), history, unavailable items, scene and arm. What hits is a question of traffic,
so the traffic is a replay, not a made-up repeat rate:

- The export's later events (valid + test windows), in time order, `--events` of them. Before each event its
  user loads a page: a request (k = 10, the event's hour, weekday and device as context). Then the event goes
  into the server's online store, so the user's next request sees it.
- A share of the sessions (`--anonymous-share`, seeded) is replayed as visitors without an account: their
  requests carry an id no store knows and their events are not ingested (nothing ties them to a user). The
  synthetic shop has no such traffic of its own; the share is an assumption, so every figure is given per
  class (known users, anonymous visitors) and the overall rate at that share.

The same request sequence runs against servers started alike (private online store, fresh), the cache off
and on, `--rounds` times in the order off, on, on, off, ... (this machine's speed drifts within minutes).
Per request: the client's latency (the median of its rounds) and whether the candidates step was a hit
(Triton's statistics, read after each request). Every round's lists must be identical. Results:
benchmarks/results/response_cache[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import command_line, commit, describe
from .online_bench import KIND_NAMES

COMMAND = "python -m benchmarks.response_cache"
ANONYMOUS_ID = 10**15  # + the session's number: an id no store knows


def replay(artifacts: Path, n_events: int, anonymous_share: float, seed: int = 0) -> list[dict]:
    """The request sequence: one per later event, in time order; anonymous sessions marked."""
    import pandas as pd

    from shoprec.manifest import verified_path

    actions = pd.read_parquet(verified_path(artifacts / "features", "actions.parquet"))
    later = actions[actions["split"] > 0].sort_values(["ts", "user_id"], kind="stable").head(n_events)
    with np.load(verified_path(artifacts / "serving", "item_table.npz"), allow_pickle=False) as table:
        ids = table["item_ids"]
    sessions = np.unique(later["session_id"].values)
    anonymous = set(sessions[np.random.default_rng(seed).random(len(sessions)) < anonymous_share].tolist())
    out = []
    for i, (u, r, k, t, s, d) in enumerate(zip(later["user_id"], later["item_row"], later["kind"], later["ts"],
                                               later["session_id"], later["device"])):
        anon = int(s) in anonymous
        when = time.gmtime(int(t))
        out.append({"user_id": ANONYMOUS_ID + int(s) if anon else int(u), "anonymous": anon, "hour": when.tm_hour,
                    "weekday": when.tm_wday, "device": None if d is None else str(d),
                    "event": None if anon else {"user_id": int(u), "item_id": int(ids[r]), "type": KIND_NAMES[int(k)],
                                                "timestamp": int(t), "session_id": int(s), "event_id": f"cache-{i}"}})
    return out


def run(artifacts: Path, sequence: list[dict], cache_mb: int, tmp: Path) -> dict:
    """The sequence against a fresh server (its own private online store) with this cache size."""
    import tritonclient.grpc as grpcclient

    from client import RecommenderClient
    from runtime.online_store import OnlineStore
    from serving.launcher import TritonServer

    cfg = load_config().serve
    root = tmp / f"cache-{cache_mb}"
    root.mkdir(parents=True)
    (root / "serving").symlink_to((artifacts / "serving").resolve())
    # the cpu-stages profile: its candidates model is the one the response cache can answer
    server = TritonServer.from_config(cfg, root, "cpu-stages", ephemeral_ports=True, log_path=tmp / f"triton-{cache_mb}.log")
    server.online_store, server.response_cache_mb, server.canary_interval_s = "private", cache_mb, 0.0
    lists, latency, hit = [], [], []
    with server, RecommenderClient(server.grpc_url) as c, grpcclient.InferenceServerClient(server.grpc_url) as g:
        store = OnlineStore.open(root / "serving", server.online_url, cfg)

        def hits() -> int:
            return g.get_inference_statistics("candidates").model_stats[0].inference_stats.cache_hit.count

        before = hits()
        for i, r in enumerate(sequence):
            t0 = time.perf_counter()
            rec = c.recommend(r["user_id"], 10, hour=r["hour"], weekday=r["weekday"], client_device=r["device"])
            latency.append((time.perf_counter() - t0) * 1e3)
            lists.append(rec.item_ids.tolist())
            now = hits()
            hit.append(now > before)
            before = now
            if r["event"] is not None:
                report = store.ingest([r["event"]])
                if report.rejected:
                    raise RuntimeError(f"event {i} rejected: {report.as_dict()}")
            if (i + 1) % 1000 == 0:
                print(f"  cache {cache_mb} MB: {i + 1}/{len(sequence)} requests, {sum(hit)} hits", flush=True)
        stats = g.get_inference_statistics("candidates").model_stats[0].inference_stats
        step_ms = {"hit": stats.cache_hit.ns / max(stats.cache_hit.count, 1) / 1e6,
                   "miss_lookup_and_insert": stats.cache_miss.ns / max(stats.cache_miss.count, 1) / 1e6,
                   "compute": stats.compute_infer.ns / max(stats.compute_infer.count, 1) / 1e6}
    return {"lists": lists, "latency_ms": np.array(latency), "hit": np.array(hit, bool), "step_ms": step_ms}


def _merge(rounds: list[dict]) -> dict:
    """One server setting's rounds: each request's median latency; hits and lists must agree across rounds."""
    first = rounds[0]
    return {"lists": first["lists"], "latency_ms": np.median([r["latency_ms"] for r in rounds], axis=0),
            "hit": first["hit"], "step_ms": {k: float(np.median([r["step_ms"][k] for r in rounds])) for k in first["step_ms"]},
            "identical": all(r["lists"] == first["lists"] and np.array_equal(r["hit"], first["hit"]) for r in rounds)}


def _summary(sequence: list[dict], off: dict, on: dict) -> dict:
    anon = np.array([r["anonymous"] for r in sequence])
    classes = {"all": np.ones(len(anon), bool), "known users": ~anon, "anonymous visitors": anon}
    out = {}
    for name, sel in classes.items():
        if not sel.any():
            continue
        h = on["hit"][sel]
        out[name] = {
            "requests": int(sel.sum()), "hits": int(h.sum()), "hit_rate": round(float(h.mean()), 4),
            "p50_ms_cache_off": round(float(np.median(off["latency_ms"][sel])), 3),
            "p50_ms_cache_on": round(float(np.median(on["latency_ms"][sel])), 3),
            "mean_ms_cache_off": round(float(off["latency_ms"][sel].mean()), 3),
            "mean_ms_cache_on": round(float(on["latency_ms"][sel].mean()), 3),
        }
        if h.any():  # the same requests in the runs without the cache, split by what the cache did
            out[name]["p50_ms_on_hits"] = round(float(np.median(on["latency_ms"][sel][h])), 3)
            out[name]["p50_ms_off_same_requests"] = round(float(np.median(off["latency_ms"][sel][h])), 3)
    return out


def write_outputs(report: dict, out: Path, tag: str) -> None:
    suffix = f"_{tag}" if tag else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"response_cache{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = report["classes"]
    md = [f"# Response cache on the candidates step — `{report['command']}`", "",
          f"Machine: {report['machine']}. Commit {report['commit']}. Bundle: {report['items']} items. "
          f"{report['requests']} requests replayed from the shop's later events ({report['anonymous_share']:.0%} of the "
          f"sessions as anonymous visitors), gRPC, one at a time, k = 10, the event's hour, weekday and device as "
          f"context; cache {report['cache_mb']} MB; latencies are each request's median over {report['rounds']} "
          f"replays per setting, alternated. Lists identical with and without the cache, in every replay: "
          f"**{report['identical_lists']}**.", "",
          "| requests | n | hit rate | p50 ms, cache off | p50 ms, cache on | mean ms, off | mean ms, on |",
          "|---|---|---|---|---|---|---|",
          *[f"| {name} | {r['requests']} | {r['hit_rate']:.1%} | {r['p50_ms_cache_off']} | {r['p50_ms_cache_on']} | "
            f"{r['mean_ms_cache_off']} | {r['mean_ms_cache_on']} |" for name, r in rows.items()], "",
          "Inside Triton, per request of the candidates step (cache on): a hit took "
          f"{report['step_ms']['hit']:.3f} ms; a miss's lookup and insert {report['step_ms']['miss_lookup_and_insert']:.3f} ms, "
          f"on top of the step's compute ({report['step_ms']['compute']:.3f} ms per execution).", ""]
    for name, r in rows.items():
        if "p50_ms_on_hits" in r:
            md.append(f"- {name}: the requests that hit took {r['p50_ms_on_hits']} ms at p50, the same requests "
                      f"{r['p50_ms_off_same_requests']} ms without the cache.")
    (out / f"response_cache{suffix}.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> dict:
    from shoprec.manifest import verify_tree

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"), help="built by `make demo` (default: ./artifacts)")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. medium)")
    p.add_argument("--events", type=int, default=3000, help="later events replayed, in time order (one request each)")
    p.add_argument("--anonymous-share", type=float, default=0.3, help="share of sessions replayed as anonymous visitors")
    p.add_argument("--rounds", type=int, default=2, help="replays per setting, alternated (off, on, on, off, ...)")
    p.add_argument("--cache-mb", type=int, default=load_config().serve.response_cache_mb or 64,
                   help="cache size of the run with the cache (default: serve.response_cache_mb, else 64)")
    args = p.parse_args(argv)
    if not 0 <= args.anonymous_share <= 1:
        p.error("--anonymous-share must be in [0, 1]")
    artifacts = Path(args.artifacts).resolve()
    verify_tree(artifacts / "serving")
    sequence = replay(artifacts, args.events, args.anonymous_share)
    tmp = Path(tempfile.mkdtemp(prefix="shoprec-cache-"))
    runs: dict[int, list[dict]] = {0: [], args.cache_mb: []}
    try:
        for r in range(args.rounds):
            for mb in (0, args.cache_mb) if r % 2 == 0 else (args.cache_mb, 0):
                print(f"round {r + 1}/{args.rounds}: replaying {len(sequence)} requests, cache {mb} MB ...", flush=True)
                runs[mb].append(run(artifacts, sequence, mb, tmp / f"r{r}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    off, on = _merge(runs[0]), _merge(runs[args.cache_mb])
    if off["hit"].any():
        raise RuntimeError("the run without the cache reported cache hits")
    report = {"command": command_line(COMMAND, argv), "machine": describe(), "commit": commit(),
              "items": json.loads((artifacts / "serving" / "contract.json").read_text())["n_items"],
              "requests": len(sequence), "anonymous_share": args.anonymous_share, "cache_mb": args.cache_mb,
              "rounds": args.rounds, "identical_lists": off["lists"] == on["lists"] and off["identical"] and on["identical"],
              "classes": _summary(sequence, off, on),
              "step_ms": {k: round(v, 4) for k, v in on["step_ms"].items()}}
    write_outputs(report, Path(args.out), args.tag)
    print(json.dumps({k: v for k, v in report.items() if k != "command"}, indent=1))
    if not report["identical_lists"]:
        raise SystemExit("the lists with the cache differ from those without it")
    return report


if __name__ == "__main__":
    main()
