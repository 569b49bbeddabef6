"""`shoprec abtest`: replay synthetic shoppers against a RUNNING server and compare its experiment arms.

The server assigns each user an arm per experiment layer (runtime/strategy.py) and says which in the
response (`experiment`). Each replayed user asks for one list; their clicks and purchases are drawn from
the generator's planted truth (feature_workflows.synthetic.respond: taste, brands, price fit, a position
examination model), never from a model the server runs. Per layer and arm the report gives CTR (the mean
over users of clicks per shown item) and purchases per request with 95 % confidence intervals, and a
two-sided Welch z-test of each arm against the base arm (`control` when the layer has one, else the first
by name) over per-user outcomes (users are independent; items of one list are not). No correction for
comparing several arms: with more than two, read the p-values with that in mind.

Only a synthetic shop has a planted truth: the raw data's schema.json names its size and seed.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ALPHA = 0.05


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(difference of means b - a, two-sided p of a Welch z-test); the samples are hundreds of users or more."""
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if len(a) > 1 and len(b) > 1 else float("inf")
    diff = float(b.mean() - a.mean())
    if se == 0:
        return diff, 1.0 if diff == 0 else 0.0
    return diff, math.erfc(abs(diff) / se / math.sqrt(2))


def _ci(x: np.ndarray) -> float:
    return float(1.96 * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def shop_of(raw_dir: Path) -> tuple[str, int]:
    """(size, seed) of the synthetic shop in raw_dir; UserError for other data."""
    from shoprec.errors import UserError

    path = raw_dir / "schema.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; run `shoprec data` (the synthetic shop) first")
    schema = json.loads(path.read_text())
    if not str(schema.get("source", "")).startswith("synthetic") or "size" not in schema:
        raise UserError(f"{path}: source {schema.get('source')!r} has no planted truth; `shoprec abtest` replays the "
                        "synthetic shop only")
    return str(schema["size"]), int(schema["seed"])


def serve_lists(url: str, protocol: str, users: np.ndarray, k: int, scene: str | None, workers: int,
                tls: dict | None = None) -> tuple[np.ndarray, list[dict]]:
    """One request per user (`workers` clients in parallel) -> served ids [U, k] (-1 pads), experiment per user."""
    from client import RecommenderClient

    chunks = np.array_split(users, max(1, workers))

    def ask(chunk):
        out = []
        with RecommenderClient(url, protocol, **(tls or {})) as c:
            for u in chunk:
                rec = c.recommend(int(u), k, scene=scene)
                out.append((rec.item_ids[:k], rec.experiment or {}))
        return out

    with ThreadPoolExecutor(len(chunks)) as pool:
        answers = [a for part in pool.map(ask, chunks) for a in part]
    ids = np.full((len(users), k), -1, np.int64)
    for i, (served, _) in enumerate(answers):
        ids[i, : len(served)] = served
    return ids, [e for _, e in answers]


def analyse(experiments: list[dict], clicks: np.ndarray, purchases: np.ndarray, shown: np.ndarray) -> dict:
    """Per layer and arm: users, CTR and purchases per request with 95 % CIs; each arm against the base arm."""
    ctr_user = clicks.sum(1) / np.maximum(shown, 1)
    buys_user = purchases.sum(1).astype(np.float64)
    layers: dict[str, dict] = {}
    for name in sorted({layer for e in experiments for layer in e}):
        arm_of = np.array([e.get(name, "") for e in experiments])
        arms = sorted(a for a in set(arm_of) if a)
        if "control" in arms:  # the base arm first
            arms.remove("control")
            arms.insert(0, "control")
        report = {}
        for arm in arms:
            m = arm_of == arm
            report[arm] = {"users": int(m.sum()), "shown": int(shown[m].sum()), "clicks": int(clicks[m].sum()),
                           "purchases": int(purchases[m].sum()),
                           "ctr": float(ctr_user[m].mean()), "ctr_ci95": _ci(ctr_user[m]),
                           "purchases_per_request": float(buys_user[m].mean()), "purchases_ci95": _ci(buys_user[m]),
                           "cvr": float(purchases[m].sum() / max(clicks[m].sum(), 1))}
        base = arms[0] if arms else None
        for arm in arms[1:]:
            a, b = arm_of == base, arm_of == arm
            d_ctr, p_ctr = _welch(ctr_user[a], ctr_user[b])
            d_buy, p_buy = _welch(buys_user[a], buys_user[b])
            report[arm]["vs"] = base
            report[arm]["ctr_diff"], report[arm]["ctr_p"] = d_ctr, p_ctr
            report[arm]["purchases_diff"], report[arm]["purchases_p"] = d_buy, p_buy
            report[arm]["verdict"] = verdict(arm, base, d_ctr, p_ctr)
        layers[name] = report
    return layers


def verdict(arm: str, base: str, diff: float, p: float) -> str:
    if p >= ALPHA:
        return f"no significant CTR difference between {arm} and {base} (p = {p:.3f})"
    better, worse = (arm, base) if diff > 0 else (base, arm)
    return f"{better} has the higher CTR (p = {p:.2g}); {worse} is worse"


def run_abtest(url: str, protocol: str, raw_dir: Path, users: int = 2000, k: int = 10, seed: int = 0,
               scene: str | None = None, workers: int = 4, tls: dict | None = None) -> dict:
    from feature_workflows.synthetic import SIZES, USER_ID_BASE, latent_truth, respond

    size, shop_seed = shop_of(raw_dir)
    rng = np.random.default_rng(seed)
    n = min(users, SIZES[size].users)
    chosen = np.sort(rng.choice(SIZES[size].users, n, replace=False)) + USER_ID_BASE
    ids, experiments = serve_lists(url, protocol, chosen, k, scene, workers, tls)
    items, truth = latent_truth(size, shop_seed, chosen)
    clicks, purchases = respond(items, truth, ids, rng)
    shown = (ids >= 0).sum(1)
    if not any(experiments):
        from shoprec.errors import UserError

        raise UserError(f"the server at {url} runs no experiment (responses carry no arm): configure serve.experiments")
    return {"shop": {"size": size, "seed": shop_seed}, "users": int(n), "k": k, "seed": seed, "scene": scene or "default",
            "layers": analyse(experiments, clicks, purchases, shown)}


def format_report(report: dict) -> str:
    lines = [f"{report['users']} synthetic users of the {report['shop']['size']} shop, one list of {report['k']} each "
             f"(scene {report['scene']}); clicks and purchases drawn from the planted truth"]
    for layer, arms in report["layers"].items():
        lines.append(f"layer {layer}:")
        lines.append(f"  {'arm':<14} {'users':>6} {'CTR':>8} {'±95%':>7} {'buys/req':>9} {'±95%':>7}")
        for arm, r in arms.items():
            lines.append(f"  {arm:<14} {r['users']:>6} {r['ctr']:>8.4f} {r['ctr_ci95']:>7.4f} "
                         f"{r['purchases_per_request']:>9.4f} {r['purchases_ci95']:>7.4f}")
        for arm, r in arms.items():
            if "verdict" in r:
                lines.append(f"  {r['verdict']}; purchases/request {r['purchases_diff']:+.4f} (p = {r['purchases_p']:.3g})")
    return "\n".join(lines)


def cmd(args, cfg) -> None:
    url = args.url or f"127.0.0.1:{cfg.serve.grpc_port if args.protocol == 'grpc' else cfg.serve.http_port}"
    report = run_abtest(url, args.protocol, Path(args.artifacts).resolve() / "data" / "raw", args.users, args.k, args.seed,
                        args.scene, args.workers)
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


# -- the committed runs: an A/A test, a planted worse arm and a subtler change, each on its own server ---------------------------

CASES = {
    # two arms with the same settings: the test should find no difference
    "aa": '''
[serve.experiments.ranking]
salt = "abtest-aa"
arms = { a = 0.5, b = 0.5 }
''',
    # the planted worse arm: no personal route and the popular order (a most-popular list); the planted truth
    # rewards taste, brand and price fit, so the control arm must win
    "planted": '''
[serve.experiments.ranking]
salt = "abtest-planted"
arms = { control = 0.5, popular = 0.5 }
[serve.experiments.ranking.set.popular]
routes = { cf_all = 0.0, cf_pos = 0.0, ann = 0.0, category = 0.0, trending = 0.0, popular = 1.0 }
order = "recall"
''',
    # a subtler change, reported whatever it shows: MMR diversity 0.5 (the README's curve: NDCG within one
    # standard error offline)
    "diversity": '''
[serve.experiments.rerank]
salt = "abtest-diversity"
arms = { control = 0.5, mmr = 0.5 }
[serve.experiments.rerank.set.mmr]
diversity = 0.5
''',
}


def main(argv=None) -> None:
    import argparse
    import tempfile

    from serving.launcher import TritonServer
    from shoprec.config import DEFAULT_CONFIG, REPO_ROOT, load_config

    from .machine import describe

    p = argparse.ArgumentParser(description="A/A and planted A/B tests of `shoprec abtest` against real servers on "
                                            "ARTIFACTS (the synthetic shop: `make demo`); writes abtest.{json,md}")
    p.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"))
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    artifacts = Path(args.artifacts).resolve()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, block in CASES.items():
            config = Path(tmp) / f"{name}.toml"
            config.write_text(DEFAULT_CONFIG.read_text() + block)
            cfg = load_config(config).replace("serve", canary_interval_s=0.0, online_store="none")
            with TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True, config_path=config) as server:
                runs[name] = run_abtest(server.grpc_url, "grpc", artifacts / "data" / "raw", args.users)
            runs[name]["config"] = block.strip()
            print(f"== {name}\n{format_report(runs[name])}", flush=True)
    out = Path(args.out)
    command = f"python -m benchmarks.abtest --users {args.users}"
    (out / "abtest.json").write_text(json.dumps({"command": command, "machine": describe(), "runs": runs}, indent=1) + "\n")
    md = [f"# `shoprec abtest`: an A/A test, a planted worse arm, a subtler change\n\n`{command}` on {describe()}\n"]
    for name, run in runs.items():
        md += [f"## {name}\n", "```toml", run["config"], "```", "```", format_report(run), "```", ""]
    (out / "abtest.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
