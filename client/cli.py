"""`shoprec recommend`: print a user's recommendations with scores and item features."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import RecommenderClient


def item_details(artifacts: Path) -> dict | None:
    from shoprec.manifest import verified_path

    try:
        path = verified_path(artifacts / "serving", "item_table.npz")
    except Exception:  # noqa: BLE001 - details are optional for a remote server
        return None
    with np.load(path, allow_pickle=False) as z:
        return {"ids": z["item_ids"], "category": z["category"], "brand": z["brand"], "price": z["price"]}


def format_table(rec, details) -> str:
    lines = [f"user {rec.user_id}: {len(rec.item_ids)} items" + ("  (cold start: popular items)" if rec.cold_start else "")]
    lines.append(f"{'rank':>4}  {'item_id':>9}  {'score':>7}  category  brand       price")
    order = np.argsort(details["ids"]) if details else None
    for i, (item, score) in enumerate(zip(rec.item_ids, rec.scores), 1):
        extra = ""
        if details is not None:
            j = order[np.searchsorted(details["ids"], item, sorter=order)]
            extra = f"  {details['category'][j]:<8}  {details['brand'][j]:<10}  {details['price'][j]:.2f}"
        lines.append(f"{i:>4}  {item:>9}  {score:7.4f}{extra}")
    return "\n".join(lines)


def run(args, cfg) -> None:
    port = cfg.serve.grpc_port if args.protocol == "grpc" else cfg.serve.http_port
    url = args.url or f"127.0.0.1:{port}"
    with RecommenderClient(url, args.protocol) as c:
        rec = c.recommend(args.user, args.k, args.hour, args.weekday, args.device)
    print(format_table(rec, item_details(Path(args.artifacts))))


def demo_served(artifacts: Path, cfg) -> None:
    """Start Triton, ask it over HTTP and gRPC for two users, print, stop."""
    from serving.launcher import TritonServer

    from shoprec.manifest import verified_path

    with np.load(verified_path(artifacts / "serving", "user_store.npz"), allow_pickle=False) as z:
        users = z["user_id"][:2]
    details = item_details(artifacts)
    with TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True) as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with RecommenderClient(url, protocol) as c:
                rec = c.recommend(int(users[0]), k=5, hour=20, weekday=4, device="mobile")
            print(f"[{protocol}] " + format_table(rec, details))
        with RecommenderClient(server.grpc_url, "grpc") as c:
            print("[grpc] " + format_table(c.recommend(123, k=5), details))
