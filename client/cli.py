"""`shoprec recommend`: print a user's recommendations with scores and item features."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from . import RecommenderClient, key_id


BAD_REQUEST = ("400", "StatusCode.INVALID_ARGUMENT")  # InferenceServerException.status() over HTTP, gRPC


def item_details(artifacts: Path) -> dict | None:
    """Display columns of the item table (category and the items' text/categorical attributes), if the bundle is here."""
    from shoprec.manifest import verified_path

    try:
        path = verified_path(artifacts / "serving", "item_table.npz")
    except Exception:  # noqa: BLE001 - details are optional for a remote server
        return None
    with np.load(path, allow_pickle=False) as z:
        names, codes = z["category_names"], z["category_code"]
        columns = {"category": np.where(codes >= 0, names[np.maximum(codes, 0)] if len(names) else "", "")}
        shown = sorted((k for k in z.files if k.startswith("display__")), key=lambda k: k != "display__item_key")
        for key in shown:  # the text id first (data loaded with --string-ids), then the others as stored
            if key[len("display__"):] != "category" and len(columns) < 3:
                columns[key[len("display__"):]] = z[key]
        return {"ids": z["item_ids"], "columns": columns}


def format_table(rec, details) -> str:
    lines = [f"user {rec.user_id}: {len(rec.item_ids)} items" + ("  (cold start: no history)" if rec.cold_start else "")
             + ("  (degraded: online store unavailable, served from the snapshot)" if getattr(rec, "degraded", False) else "")
             + ("  experiment: " + ", ".join(f"{k}={v}" for k, v in rec.experiment.items()) if rec.experiment else "")
             + (f"  (bundle version {rec.version})" if getattr(rec, "version", None) else "")]
    cols = list(details["columns"]) if details else []
    width = max([9, *(len(str(int(i))) for i in rec.item_ids)])  # text ids (--string-ids) hash to 16 digits
    routes_width = max([6, *(len("+".join(r)) for r in (rec.routes or []))])
    lines.append(f"{'rank':>4}  {'item_id':>{width}}  {'score':>7}  {'routes':<{routes_width}}  "
                 + "  ".join(f"{c[:24]:<24}" for c in cols))
    order = np.argsort(details["ids"]) if details else None
    for i, (item, score) in enumerate(zip(rec.item_ids, rec.scores), 1):
        extra = ""
        if details is not None:
            at = int(np.searchsorted(details["ids"], item, sorter=order))
            j = order[at] if at < len(order) else None
            if j is None or details["ids"][j] != item:  # a server with another bundle: say so, never show a neighbour's row
                extra = "(not in the local item table)"
            else:
                extra = "  ".join(f"{str(details['columns'][c][j])[:24]:<24}" for c in cols)
        routes = "+".join(rec.routes[i - 1]) if rec.routes else ""
        lines.append(f"{i:>4}  {item:>{width}}  {score:7.4f}  {routes:<{routes_width}}  {extra}")
    return "\n".join(lines)


def _key(option: str, text: str) -> int:
    try:
        return key_id(text)
    except ValueError:  # the one refusal of a str: empty
        raise SystemExit(f"shoprec recommend: {option}: empty text id") from None


def run(args, cfg) -> None:
    port = cfg.serve.grpc_port if args.protocol == "grpc" else cfg.serve.http_port
    url = args.url or f"127.0.0.1:{port}"
    from tritonclient.utils import InferenceServerException

    user = args.user if args.user is not None else _key("--user-key", args.user_key)
    context = [_key("--context-key", k) for k in args.context_key] if getattr(args, "context_key", None) else args.context
    with RecommenderClient(url, args.protocol, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key) as c:
        try:
            rec = c.recommend(user, args.k, args.hour, args.weekday, args.client_device,
                              exclude_seen=False if args.include_seen else None, diversity=args.diversity, scene=args.scene,
                              context_item_ids=context, force_arms=",".join(args.force_arm) if args.force_arm else None,
                              blend=args.blend)
        except InferenceServerException as exc:  # the server's one-line reason (a bad request: the field it names)
            print(f"shoprec recommend: error: {exc.message() or exc}", file=sys.stderr)
            # a request the server refused as invalid is bad input (exit 2, as every command's); anything else 1
            raise SystemExit(2 if str(exc.status()) in BAD_REQUEST else 1) from None
        except ValueError as exc:  # refused before sending: a value outside its wire type
            print(f"shoprec recommend: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:  # the HTTP client's connection errors (gRPC's come as InferenceServerException)
            print(f"shoprec recommend: error: cannot reach {url} over {args.protocol}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
    print(format_table(rec, item_details(Path(args.artifacts))))
