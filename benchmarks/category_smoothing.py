"""Does a better-calibrated category route make better served lists? The route shrunk toward the catalog's categories.

    .venv/bin/python -m benchmarks.category_smoothing --tag small                              # after make demo
    .venv/bin/python -m benchmarks.category_smoothing --referee random-8-1-1 --tag mlls-random  # ml-latest-small
    .venv/bin/python -m benchmarks.category_smoothing --artifacts MEDIUM --tag medium --alphas 30  # ~20 min

The category route scores an item P(category | user) * P(item | category), the user's shares read from their
actions. A user with a dozen actions in two categories gets nothing from the other categories, so on the synthetic
medium shop the route alone scores below popularity. `CategoryPrior.smoothing` (alpha) shrinks the shares toward
the catalog's, (W * shares + alpha * global) / (W + alpha), W the user's decayed action count: the user's
categories first, the rest in popularity order.

For each alpha (0, the served route, first): the route alone ranks the evaluated users' catalog (seen items
excluded), and the ranker is retrained as `train` trains it (`train_ranker` as configured) on stage A's lists
built with that route, since the route changes both the candidates and two of their features (`cat_affinity`,
`cat_score`); the evaluated users' candidates come from the bundle's final models with the same route. Stage A's
two-tower is trained once (the route does not touch it). Figures: NDCG@10, Recall@10 and Recall@100 of the
evaluated users (synthetic shop: warm test users; ml-latest-small: the referee's valid and test users, scored by
the referee), the served lists paired per user with alpha 0. Writes benchmarks/results/category_smoothing_<tag>.{json,md}.
"""

from __future__ import annotations

import time

import numpy as np

from training.metrics import mean_se

CHUNK = 512  # users per dense [users, items] score block of the route alone


def route_alone(data, users: np.ndarray, alpha: float) -> np.ndarray:
    """[U, 100] item rows: the category route alone over the whole catalog (popularity on all of train), the users'
    train items excluded as `shoprec evaluate` excludes them."""
    from runtime.candidates import CategoryPrior
    from training import evaluate as E

    prior = CategoryPrior.from_popularity(data.items["category_code"], data.items["popularity"], smoothing=alpha)
    train = data.actions[data.actions["split"] == 0]
    q = data.queries(users, data.action_log(train))
    shares = prior.shares(q["hist_indptr"], q["hist_rows"])
    seen = E._seen(users, train, data.n_items)
    return np.concatenate([E.top_n_unseen(prior.scores(shares[s : s + CHUNK]), seen[s : s + CHUNK], 100)
                           for s in range(0, len(users), CHUNK)])


def run(artifacts, cfg, evaluators: dict, alphas: list[float]) -> dict:
    from training import train as T

    from .ranker_variants import stage_a_lists

    kc = cfg.ranking
    data, _, _, tt_a, users_a, by_alpha = stage_a_lists(artifacts, cfg, tuple(alphas))
    report: dict = {"lists": {"train_users": int(len(users_a))}, "alphas": {}}
    served: dict = {}
    for alpha in alphas:
        t0 = time.time()
        lists = by_alpha[alpha]
        model, _ = T.train_ranker(data, kc, lists, {k: x[:0] for k, x in lists.items()}, [], data.items["item_cont_fit"],
                                  tt_a.item_ids, "cpu", False, deep=None)
        row: dict = {"ranker_seconds": round(time.time() - t0, 1)}
        for part, ev in evaluators.items():
            ev_lists = ev.prepare(data, cfg, lists_only=True, category_smoothing=alpha)["lists"]
            order = np.argsort(-T.ranker_scores(model, data, ev_lists, data.item_cont, kc.cvr_weight, "cpu"), axis=1,
                               kind="stable")
            got = {"served": ev(np.take_along_axis(ev_lists["rows"], order, 1)), "merged candidates": ev(ev_lists["rows"]),
                   "route alone": ev(route_alone(data, ev.users, alpha))}
            per_user = {k: m.pop("per_user_ndcg@10") for k, m in got.items()}
            served.setdefault(part, {})[alpha] = per_user["served"]
            if alpha != alphas[0]:
                got["served"]["NDCG@10 - alpha 0"] = mean_se(per_user["served"] - served[part][alphas[0]])
            row[part] = got
        report["alphas"][str(alpha)] = row
        print(f"category_smoothing: alpha {alpha}: " + "  ".join(
            f"{p} served NDCG@10 {row[p]['served']['NDCG@10'][0]:.4f}, route alone {row[p]['route alone']['NDCG@10'][0]:.4f}"
            for p in evaluators), flush=True)
    return report


def markdown(report: dict, meta: dict) -> str:
    lines = [f"# Category route smoothing: `{meta['tag']}`", "", f"Command: `{meta['command']}` ({meta['date']}, "
             f"{meta['machine']}).", "", f"{report['lists']['train_users']} training lists. NDCG@10 ± s.e., Recall@10 and "
             "Recall@100 of the evaluated users; the served lists also paired per user with alpha 0.", "",
             "| alpha | part | route alone NDCG@10 | route alone Recall@100 | merged NDCG@10 | merged Recall@100 | served NDCG@10 "
             "| served Recall@10 | served - alpha 0 |", "|---|---|---|---|---|---|---|---|---|"]
    for alpha, row in report["alphas"].items():
        for part, got in row.items():
            if part == "ranker_seconds":
                continue
            r, m, s = got["route alone"], got["merged candidates"], got["served"]
            paired = "{:+.4f} ± {:.4f}".format(*s["NDCG@10 - alpha 0"]) if "NDCG@10 - alpha 0" in s else "reference"
            lines.append(f"| {alpha} | {part} | {r['NDCG@10'][0]:.4f} ± {r['NDCG@10'][1]:.4f} | {r['Recall@100'][0]:.4f} | "
                         f"{m['NDCG@10'][0]:.4f} | {m['Recall@100'][0]:.4f} | {s['NDCG@10'][0]:.4f} ± {s['NDCG@10'][1]:.4f} | "
                         f"{s['Recall@10'][0]:.4f} | {paired} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from .ablation import bundle, paired_evaluators, parse, save

    args = parse("category_smoothing", __doc__, argv, extra=lambda p: p.add_argument(
        "--alphas", nargs="+", type=float, default=[10.0, 30.0], help="smoothings besides 0 (default: 10 30)"))
    cfg, artifacts = bundle("category_smoothing", args)
    evaluators = paired_evaluators(artifacts, args.referee)
    t0 = time.time()
    report = run(artifacts, cfg, evaluators, [0.0] + [a for a in args.alphas if a != 0.0])
    save("category_smoothing", args, argv, report, time.time() - t0, markdown)
    return report


if __name__ == "__main__":
    main()
