"""Reliability figures on a real tritonserver: a malformed-request fuzz over gRPC and HTTP, and a soak.

    .venv/bin/python -m benchmarks.reliability                         # 2,000 fuzz requests per protocol, 10 min soak
    .venv/bin/python -m benchmarks.reliability --fuzz 200 --soak-s 20  # the short form the tests run

The fuzz draws requests from a fixed list of malformations (wrong dtypes and shapes, missing or
unknown inputs, out-of-range values, NaN, invalid UTF-8, oversized batches, broken JSON, strings for
numbers, integers past int32/int64), seeded, and sends a valid request after every ten to check the
server still answers. It records each answer's class (answered, client error, server error, no
answer). HTTP goes through the validating front (serving/http_front.py), as `shoprec serve` runs
it; the three requests known to kill Triton 2.51's own HTTP front end (a declared shape of
[2^31, 1] or [2^63-1, 1], JSON nested 100k deep) are among the HTTP cases.

The soak keeps `--concurrency` gRPC clients busy for `--soak-s` seconds and samples the server's
RSS (tritonserver and its stubs) every 5 s. It counts answers that came back without outputs
(client.IncompleteResponse; the client asks once more). Writes benchmarks/results/reliability.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from shoprec.config import REPO_ROOT, load_config

from .machine import describe
from .serving_bench import warm_users

I64 = (1 << 63) - 1


def _grpc_cases(user: int) -> list[tuple[str, list]]:
    """(name, [(input name, numpy value, Triton dtype)]) per malformation."""
    u = np.array([[user]], np.int64)
    k = np.array([[10]], np.int32)
    cases = [
        ("user_id FP32", [("user_id", u.astype(np.float32), "FP32"), ("k", k, "INT32")]),
        ("user_id BYTES", [("user_id", np.array([[b"\xff\xfe"]], object), "BYTES"), ("k", k, "INT32")]),
        ("k INT64", [("user_id", u, "INT64"), ("k", k.astype(np.int64), "INT64")]),
        ("k FP32", [("user_id", u, "INT64"), ("k", k.astype(np.float32), "FP32")]),
        ("shape [1,2]", [("user_id", np.repeat(u, 2, 1), "INT64"), ("k", np.repeat(k, 2, 1), "INT32")]),
        ("rows differ", [("user_id", np.repeat(u, 2, 0), "INT64"), ("k", k, "INT32")]),
        ("empty batch", [("user_id", u[:0], "INT64"), ("k", k[:0], "INT32")]),
        ("missing k", [("user_id", u, "INT64")]),
        ("missing user_id", [("k", k, "INT32")]),
        ("unknown input", [("user_id", u, "INT64"), ("k", k, "INT32"), ("bogus", k, "INT32")]),
        ("k = 0", [("user_id", u, "INT64"), ("k", k * 0, "INT32")]),
        ("k = -1", [("user_id", u, "INT64"), ("k", k * 0 - 1, "INT32")]),
        ("k = 10^6", [("user_id", u, "INT64"), ("k", k * 0 + 1_000_000, "INT32")]),
        ("hour = 99", [("user_id", u, "INT64"), ("k", k, "INT32"), ("hour", k * 0 + 99, "INT32")]),
        ("weekday = -1", [("user_id", u, "INT64"), ("k", k, "INT32"), ("weekday", k * 0 - 1, "INT32")]),
        ("diversity NaN", [("user_id", u, "INT64"), ("k", k, "INT32"), ("diversity", np.full((1, 1), np.nan, np.float32), "FP32")]),
        ("diversity 2", [("user_id", u, "INT64"), ("k", k, "INT32"), ("diversity", np.full((1, 1), 2.0, np.float32), "FP32")]),
        ("device not UTF-8", [("user_id", u, "INT64"), ("k", k, "INT32"), ("client_device", np.array([[b"\xc3\x28"]], object), "BYTES")]),
        ("device 10 kB", [("user_id", u, "INT64"), ("k", k, "INT32"), ("client_device", np.array([[b"m" * 10_000]], object), "BYTES")]),
        ("batch 65", [("user_id", np.repeat(u, 65, 0), "INT64"), ("k", np.repeat(k, 65, 0), "INT32")]),
        ("user_id int64 min", [("user_id", u * 0 - I64 - 1, "INT64"), ("k", k, "INT32")]),
        ("user_id int64 max", [("user_id", u * 0 + I64, "INT64"), ("k", k, "INT32")]),
        ("exclude_seen INT32", [("user_id", u, "INT64"), ("k", k, "INT32"), ("exclude_seen", k, "INT32")]),
    ]
    return cases


def _http_cases(user: int) -> list[tuple[str, bytes]]:
    def body(inputs) -> bytes:
        return json.dumps({"inputs": inputs}).encode()

    uid = {"name": "user_id", "shape": [1, 1], "datatype": "INT64", "data": [user]}
    k = {"name": "k", "shape": [1, 1], "datatype": "INT32", "data": [10]}
    nested = b'{"inputs": ' + b"[" * 50 + b"]" * 50 + b"}"
    return [
        ("not JSON", b"{inputs: nope"),
        ("empty body", b""),
        ("inputs not a list", json.dumps({"inputs": {"a": 1}}).encode()),
        ("nested 50 deep", nested),
        ("string for k", body([uid, {**k, "data": ["ten"]}])),
        ("float for k", body([uid, {**k, "data": [1.5]}])),
        ("k past int32", body([uid, {**k, "data": [(1 << 32) + 5]}])),
        ("user_id past int64", body([{**uid, "data": [1 << 64]}, k])),
        ("shape/data mismatch", body([{**uid, "shape": [1, 3]}, k])),
        ("negative shape", body([{**uid, "shape": [-1, 1]}, k])),
        ("unknown datatype", body([{**uid, "datatype": "INT128"}, k])),
        ("missing k", body([uid])),
        ("k = 0", body([uid, {**k, "data": [0]}])),
        ("hour = 99", body([uid, k, {"name": "hour", "shape": [1, 1], "datatype": "INT32", "data": [99]}])),
        ("batch 65", body([{**uid, "shape": [65, 1], "data": [user] * 65}, {**k, "shape": [65, 1], "data": [10] * 65}])),
        ("null data", body([{**uid, "data": None}, k])),
        ("shape [2^31, 1]", body([{**uid, "shape": [2**31, 1]}, k])),
        ("shape [2^63-1, 1]", body([{**uid, "shape": [2**63 - 1, 1]}, k])),
        ("nested 100k deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ]


def _classify_grpc(exc) -> str:
    if exc is None:
        return "answered"
    status = str(exc.status())
    if status in ("StatusCode.INVALID_ARGUMENT", "400"):
        return "client error"
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
        return "no answer"
    return "server error"


def _fuzz(cases: list, send, good, n: int, seed: int) -> dict:
    """n requests drawn from `cases` (name, payload) with `send(payload) -> outcome class`; after every tenth,
    `good()` sends a valid request (True: answered)."""
    rng = random.Random(seed)
    outcomes: dict[str, dict[str, int]] = {}
    valid_ok = valid_failed = 0
    for i in range(n):
        name, payload = cases[rng.randrange(len(cases))]
        cls = send(payload)
        outcomes.setdefault(name, {}).setdefault(cls, 0)
        outcomes[name][cls] += 1
        if i % 10 == 9:
            if good():
                valid_ok += 1
            else:
                valid_failed += 1
    return {"requests": n, "cases": outcomes, "valid_answered": valid_ok, "valid_failed": valid_failed}


def _answers(client, user: int, errors) -> bool:
    try:
        client.recommend(user, k=10)
        return True
    except errors:
        return False


def fuzz_grpc(url: str, user: int, n: int, seed: int = 0) -> dict:
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    from client import RecommenderClient

    client = g.InferenceServerClient(url)

    def send(spec) -> str:
        inputs = []
        for inp, value, dtype in spec:
            x = g.InferInput(inp, list(value.shape), dtype)
            x.set_data_from_numpy(value)
            inputs.append(x)
        try:
            client.infer("recommender", inputs, client_timeout=30)
            return "answered"
        except InferenceServerException as exc:
            return _classify_grpc(exc)

    with RecommenderClient(url) as good:
        return _fuzz(_grpc_cases(user), send, lambda: _answers(good, user, InferenceServerException), n, seed)


def fuzz_http(url: str, user: int, n: int, seed: int = 1) -> dict:
    from tritonclient.utils import InferenceServerException

    from client import RecommenderClient

    def send(body: bytes) -> str:
        req = urllib.request.Request(f"http://{url}/v2/models/recommender/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30):
                return "answered"
        except urllib.error.HTTPError as exc:
            return "client error" if 400 <= exc.code < 500 else "server error"
        except OSError:
            return "no answer"

    with RecommenderClient(url, "http") as good:
        return _fuzz(_http_cases(user), send, lambda: _answers(good, user, (InferenceServerException, OSError)), n, seed)


def _rss_mb(pgid: int) -> float:
    from serving.launcher import process_group

    return sum(int(fields[21]) for _, fields, _ in process_group(pgid)) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(server, users: list[int], seconds: float, concurrency: int) -> dict:
    from tritonclient.utils import InferenceServerException

    from client import AsyncRecommenderClient

    ok = failed = 0
    rss = [(0.0, round(_rss_mb(server.process.pid), 1))]
    t0 = time.time()

    async def worker(c, offset):
        nonlocal ok, failed
        i = offset
        while time.time() - t0 < seconds:
            try:
                await c.recommend(users[i % len(users)], k=10)
                ok += 1
            except InferenceServerException:
                failed += 1
            i += concurrency

    async def sampler():
        while time.time() - t0 < seconds:
            await asyncio.sleep(5)
            rss.append((round(time.time() - t0, 1), round(_rss_mb(server.process.pid), 1)))

    async def main():
        async with AsyncRecommenderClient(server.grpc_url) as c:
            await asyncio.gather(sampler(), *(worker(c, j) for j in range(concurrency)))
            return c.incomplete

    incomplete = asyncio.run(main())
    half = [r for t, r in rss if t >= seconds / 2] or [rss[-1][1]]
    # answers without outputs (client.IncompleteResponse), each asked again once; one left so counts in `failed`
    return {"seconds": seconds, "concurrency": concurrency, "answered": ok, "failed": failed, "incomplete_answers": incomplete,
            "throughput_rps": round(ok / seconds, 1), "rss_mb": rss,
            "rss_growth_second_half_mb": round(max(half) - min(half), 1)}


def run(artifacts: Path, n_fuzz: int, soak_s: float, concurrency: int) -> dict:
    from serving.launcher import TritonServer

    cfg = load_config()
    # no response cache: the soak cycles 200 users, so the cache would answer most requests, and its filling
    # would read as memory growth
    serve = cfg.replace("serve", online_store="none", response_cache_mb=0).serve
    users = [int(u) for u in warm_users(artifacts)[:200]]
    with TritonServer.from_config(serve, artifacts, ephemeral_ports=True) as server:
        report = {"grpc_fuzz": fuzz_grpc(server.grpc_url, users[0], n_fuzz),
                  "http_fuzz": fuzz_http(server.http_url, users[0], n_fuzz)}
        report["alive_after_fuzz"] = server.process.poll() is None
        report["soak"] = soak(server, users, soak_s, concurrency)
        report["alive_after_soak"] = server.process.poll() is None
        report["doctor_incidents"] = len(server.doctor.incidents) if server.doctor else None
    return report


def markdown(r: dict) -> str:
    lines = ["# Reliability: fuzz and soak on a real tritonserver", "",
             (f"Command: `{r['command']}`. Machine: {r['machine']}. HTTP through the validating front, the three requests "
             "that kill Triton 2.51's own HTTP front end included."), ""]
    for proto in ("grpc", "http"):
        f = r[f"{proto}_fuzz"]
        totals: dict[str, int] = {}
        for outcome in f["cases"].values():
            for cls, n in outcome.items():
                totals[cls] = totals.get(cls, 0) + n
        lines += [f"## {proto} fuzz: {f['requests']} malformed requests", "",
                  (f"Outcomes: {', '.join(f'{k} {v}' for k, v in sorted(totals.items()))}. Valid requests in between: "
                  f"{f['valid_answered']} answered, {f['valid_failed']} failed."), "",
                  "| malformation | outcomes |", "|---|---|"]
        lines += [f"| {name} | {', '.join(f'{k} {v}' for k, v in sorted(o.items()))} |" for name, o in sorted(f["cases"].items())]
        lines.append("")
    s = r["soak"]
    lines += ["## Soak", "",
              (f"{s['concurrency']} gRPC clients for {s['seconds']:.0f} s: {s['answered']} answered, {s['failed']} failed "
              f"({s['throughput_rps']} req/s); {s.get('incomplete_answers', 'not counted')} answers without outputs, each "
              f"asked again once (client.IncompleteResponse). RSS of tritonserver and its stubs: {s['rss_mb'][0][1]} MB at the start, "
              f"{s['rss_mb'][-1][1]} MB at the end, {s['rss_growth_second_half_mb']} MB of spread over the second half."),
              "", (f"Server alive after the fuzz: {r['alive_after_fuzz']}; after the soak: {r['alive_after_soak']}; step "
              f"doctor incidents: {r['doctor_incidents']}."), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", type=Path, default=REPO_ROOT / "artifacts")
    ap.add_argument("--results", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--fuzz", type=int, default=2000, help="malformed requests per protocol (default 2000)")
    ap.add_argument("--soak-s", type=float, default=600.0, help="soak seconds (default 600)")
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args(argv)
    r = run(args.artifacts, args.fuzz, args.soak_s, args.concurrency)
    r.update(machine=describe(), command="python -m benchmarks.reliability"
             + ("" if (args.fuzz, args.soak_s) == (2000, 600.0) else f" --fuzz {args.fuzz} --soak-s {args.soak_s:g}"))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "reliability.json").write_text(json.dumps(r, indent=1) + "\n")
    (args.results / "reliability.md").write_text(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
