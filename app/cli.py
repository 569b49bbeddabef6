"""`shoprec`: one entry point, a subcommand per stage. Stages hand over through files on disk.

  data       the synthetic shop, MovieLens files or your own interactions -> ARTIFACTS/data/raw
  features   split, fit the NVTabular workflows, write training rows + serving feature files
  train      two-tower retrieval, item-to-item routes (EASE / item-kNN), ranker on their candidates
  export     ONNX + parity checks, item embeddings, FAISS index, routes, TensorRT (where present)
  evaluate   offline quality: served pipeline vs popularity, ALS, item-kNN, EASE, two-tower alone
  serve      start tritonserver on the generated model repository, beside a private Redis that holds
             live user state (Ctrl-C stops both)
  deploy     switch a running server to another exported bundle version, no request lost (rollback: back)
  versions   the exported bundle versions, and which one each running server serves
  events     write user events to the online store: the next request of each user sees them
  items      mark items unavailable / available again (from the next request on)
  recommend  ask a running server for top-k items for a user (HTTP or gRPC)
  demo-page  the Streamlit demo page (a user's history and their served list, by scene) on a running server
  abtest     replay synthetic shoppers against a running server: CTR / purchases per experiment arm, CIs, test
  bench      benchmarks: request-time transform (NVTabular vs NumPy plan) and serving (perf_analyzer:
             Triton ensemble vs FastAPI vs in-process), results in benchmarks/results
  all        data -> features -> train -> export -> evaluate -> serve + recommend (the demo)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shoprec.config import REPO_ROOT, load_config
from shoprec.contract import PROFILES


def _artifacts(args) -> Path:
    return Path(args.artifacts).resolve()


def cmd_data(args, cfg):
    from feature_workflows.raw_schema import clear_raw, write_raw

    raw = _artifacts(args) / "data" / "raw"
    clear_raw(raw)
    d = cfg.data
    if getattr(args, "string_ids", False) and d.source != "interactions":
        raise SystemExit(f"shoprec data: --string-ids applies to --source interactions (your own files), not {d.source}")
    if d.source == "synthetic":
        from feature_workflows.synthetic import generate

        info = generate(raw, d.size, d.seed, progress=not args.quiet)
    elif d.source == "interactions":
        from feature_workflows.sources import SourceSpec, load_interactions_source, parse_column_kinds

        if not getattr(args, "interactions", None):
            raise SystemExit("shoprec data: --source interactions needs --interactions PATH (CSV or Parquet)")
        spec = SourceSpec(args.interactions, args.items, args.users, parse_column_kinds(args.item_column or []),
                          parse_column_kinds(args.user_column or []), d.positive_threshold, d.strong_threshold,
                          tuple(d.rating_range), args.category_column, args.price_column, args.string_ids)
        tables, schema = load_interactions_source(spec)
        info = {"source": "interactions", **write_raw(tables, schema, raw), "load_report": schema.get("load_report")}
    else:
        from feature_workflows.movielens import load_movielens

        if not d.movielens_dir:
            raise SystemExit("shoprec data: a MovieLens source needs --movielens-dir DIR (the files you downloaded)")
        tables, schema = load_movielens(d.movielens_dir, d.source)
        info = {"source": d.source, **write_raw(tables, schema, raw), "load_report": schema.get("load_report")}
    for warning in (info.get("load_report") or {}).get("warnings", []):
        print(f"shoprec data: warning: {warning}", file=sys.stderr)
    print(json.dumps({"raw": str(raw), **info}))


def cmd_features(args, cfg):
    from feature_workflows.pipeline import build_features

    art = _artifacts(args)
    print(json.dumps(build_features(art / "data" / "raw", art / "features", cfg.features, progress=not args.quiet)))


def cmd_train(args, cfg):
    from training.train import train_all

    art = _artifacts(args)
    report = train_all(art / "features", art / "models", cfg, args.device, progress=not args.quiet)
    print(json.dumps(_summary(report)))


def _summary(report: dict) -> dict:
    """The train report without per-epoch histories (those are in models/train_report.json)."""
    def strip(v):
        return {k: strip(x) for k, x in v.items() if k != "history"} if isinstance(v, dict) else v
    return strip(report)


def cmd_export(args, cfg):
    from training.export import export_bundle

    art = _artifacts(args)
    print(json.dumps(export_bundle(art / "features", art / "models", art / "serving", cfg)))


def cmd_evaluate(args, cfg):
    from training.evaluate import evaluate

    art = _artifacts(args)
    results = Path(args.results).resolve()
    # reports inside the artifacts folder are regenerated material; elsewhere (benchmarks/results is
    # committed) an existing report is replaced only when asked
    overwrite = args.overwrite or results.is_relative_to(art)
    report = evaluate(art / "features", art / "serving", results, cfg, tag=args.tag, overwrite=overwrite,
                      progress=not args.quiet)
    from training.evaluate import markdown

    print(markdown(report))


def cmd_serve(args, cfg):
    import signal

    from serving.launcher import TritonServer

    def stop(signum, frame):  # SIGTERM (kill, Kubernetes, systemd) stops the server as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    server = TritonServer.from_config(cfg.serve, _artifacts(args), profile=args.profile, config_path=args.config)
    with server:
        try:  # a SIGTERM right after "ready" (while the lines below print) stops the server as cleanly as a later one
            print(f"tritonserver ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics :{server.metrics_port}  "
                  "(Ctrl-C or SIGTERM stops)", flush=True)
            print(f"online store: {server.online_url or 'none (the export snapshot only)'}; admin APIs need the key in "
                  f"{server.admin_key_path}", flush=True)
            if server.grpc_front:
                print(f"gRPC requests over {server.grpc_max_message_mb:g} MiB are refused (serve.grpc_max_message_mb)",
                      flush=True)
            print(f"serving bundle version {server.served_version()}; `shoprec deploy` switches to a newer export, "
                  "`shoprec rollback` back", flush=True)
            server.wait()
        except KeyboardInterrupt:
            print("stopping tritonserver", flush=True)


def cmd_deploy(args, cfg):
    from serving.versions import deploy

    result = deploy(_artifacts(args), getattr(args, "version", None), args.grpc_port, None,  # the server's own drain
                    rollback=args.func is cmd_rollback, log=lambda m: None if args.quiet else print(m, file=sys.stderr))
    print(json.dumps(result))


def cmd_rollback(args, cfg):
    cmd_deploy(args, cfg)


def cmd_versions(args, cfg):
    from shoprec import bundles
    from shoprec.manifest import read_manifest

    art = _artifacts(args)
    serving = art / "serving"
    newest = bundles.current_version(serving)
    servers = bundles.live_servers(art)
    print(f"{'version':>7}  {'exported (UTC)':<19}  {'MB':>7}  use")
    for v in bundles.versions(serving):
        folder = bundles.bundles_root(serving) / str(v)
        try:
            created = read_manifest(folder).get("created_unix", 0)
        except Exception:  # noqa: BLE001 - a listing: the row says it
            created = None
        mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        use = (["newest export (artifacts/serving)"] if v == newest else [])
        for s in servers:
            hist = [int(h) for h in s.get("history", [])]
            if hist and hist[-1] == v:
                use.append(f"served on gRPC {s['grpc']}")
            elif v in hist[-2:]:
                use.append(f"rollback target of gRPC {s['grpc']}")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(created)) if created else "manifest unreadable"
        print(f"{v:>7}  {when:<19}  {mb:>7.1f}  {'; '.join(use)}")


def cmd_events(args, cfg):
    from app.events import cmd_events as run

    run(args, cfg)


def cmd_items(args, cfg):
    from app.events import cmd_items as run

    run(args, cfg)


def cmd_recommend(args, cfg):
    from client.cli import run as recommend

    recommend(args, cfg)


def cmd_demo_page(args, cfg):
    import os

    from benchmarks.browser import streamlit_command

    url = args.url or f"127.0.0.1:{cfg.serve.grpc_port}"
    command = streamlit_command(_artifacts(args), url, args.port, args.address)
    print(f"demo page: http://{args.address}:{args.port} (recommendations from {url}; Ctrl-C stops)", flush=True)
    os.execv(command[0], command)


def cmd_abtest(args, cfg):
    from benchmarks.abtest import cmd

    cmd(args, cfg)


def cmd_bench(args, cfg):
    if args.suite in ("transform", "all"):
        from benchmarks.transform_bench import main as transform_bench

        transform_bench(["--artifacts", str(_artifacts(args)), "--out", str(Path(args.results) / "transform_latency.json")])
    if args.suite in ("serving", "all"):
        from benchmarks.serving_bench import main as serving_bench

        serving_bench(["--artifacts", str(_artifacts(args)), "--out", str(args.results)])


def cmd_all(args, cfg):
    steps = [cmd_data, cmd_features, cmd_train, cmd_export]
    if cfg.features.split != "none":
        steps.append(cmd_evaluate)
    for step in steps:
        print(f"== shoprec {step.__name__[4:]}", flush=True)
        step(args, cfg)
    print("== shoprec serve + recommend (HTTP and gRPC)", flush=True)
    demo_served(_artifacts(args), cfg, args.config)


def demo_served(artifacts: Path, cfg, config_path=None) -> None:
    """Start Triton, ask it over HTTP and gRPC for a user with history and for an unknown one, print, stop."""
    import numpy as np

    from client import RecommenderClient
    from client.cli import format_table, item_details
    from serving.launcher import TritonServer
    from shoprec.manifest import verified_path

    with np.load(verified_path(artifacts / "serving", "user_store.npz"), allow_pickle=False) as z:
        warm = z["user_id"][z["activity"] > 0]
    user = int(warm[0]) if len(warm) else 1
    details = item_details(artifacts)
    with TritonServer.from_config(cfg.serve, artifacts, ephemeral_ports=True, config_path=config_path) as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with RecommenderClient(url, protocol) as c:
                rec = c.recommend(user, k=5)
            print(f"[{protocol}] " + format_table(rec, details))
        with RecommenderClient(server.grpc_url, "grpc") as c:
            print("[grpc] " + format_table(c.recommend(-1, k=5), details))


SOURCES = ["synthetic", "interactions", "movielens-100k", "movielens-1m", "movielens-latest-small"]
SPLITS = ["time", "user-time", "random", "none"]


def _data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=SOURCES, help="where the data comes from (default: config data.source = synthetic)")
    g.add_argument("--size", choices=["tiny", "small", "medium", "large"], help="synthetic shop size")
    g.add_argument("--seed", type=int, help="synthetic generator seed")
    g.add_argument("--movielens-dir", help="folder holding the MovieLens files you downloaded")
    g.add_argument("--interactions", help="your interactions: CSV/TSV/Parquet with user_id, item_id, timestamp and event or rating")
    g.add_argument("--items", help="optional item attributes table (item_id + columns)")
    g.add_argument("--users", help="optional user attributes table (user_id + columns)")
    g.add_argument("--item-column", action="append", metavar="NAME=KIND",
                   help="kind of an item column: categorical|numeric|multi|text|timestamp (repeatable; others inferred)")
    g.add_argument("--user-column", action="append", metavar="NAME=KIND", help="kind of a user column (repeatable)")
    g.add_argument("--category-column", help="the item column that is the item's category (default: first categorical/multi)")
    g.add_argument("--price-column", help="the numeric item column that is its price (default: a column named price)")
    g.add_argument("--string-ids", action="store_true", help="user and item ids are text (SKUs, UUIDs): each becomes the "
                   "integer shoprec.ids.key_id(text), stable across files and runs; the items/users tables keep the text "
                   "as item_key / user_key; ask for a user with `shoprec recommend --user-key TEXT`")
    g.add_argument("--positive-threshold", type=float, help="rating data: a rating >= this is a positive (default 4)")
    g.add_argument("--strong-threshold", type=float, help="rating data: a rating >= this is also a purchase, the CVR "
                   "head's target (default 5; above the scale's top: never)")
    g.add_argument("--rating-range", type=float, nargs=2, metavar=("LO", "HI"), help="rating data: the scale; a rating "
                   "outside is an error naming file, row and column (default 0.5 5; e.g. 1 10 with --positive-threshold 7 "
                   "--strong-threshold 9)")


def _split_args(p):
    p.add_argument("--split", choices=SPLITS, help="evaluation split (default: config features.split = time); "
                   "`none` trains on everything for deployment")
    p.add_argument("--deploy", action="store_true", help="same as --split none: refit on all the data, serve every event")


def _results_args(p):
    p.add_argument("--results", default=None,
                   help="folder of the quality report (default: ARTIFACTS/results, replaced on every run; committed reports "
                        "live in benchmarks/results and are replaced only with --overwrite)")
    p.add_argument("--tag", default=None, help="report name: quality_<tag>.* (default: the dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report of the same tag")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoprec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="TOML config (default: configs/default.toml)")
    parser.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"), help="where every stage reads/writes (default: ./artifacts)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    _data_args(add("data", cmd_data, "create the raw users/items/interactions tables (synthetic shop, MovieLens or your own files)"))
    p = add("all", cmd_all, "run every stage and finish with served recommendations")
    _data_args(p)
    _split_args(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device for training")
    _results_args(p)
    _split_args(add("features", cmd_features, "split; fit NVTabular workflows; write training rows, item table, user store, "
                    "request-time plan"))
    p = add("train", cmd_train, "train the two-tower, the item-to-item routes and the ranker (then refit on all of train)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (auto: CUDA when present)")
    add("export", cmd_export, "export ONNX (+ parity), item embeddings, FAISS index, routes, serving bundle")
    _results_args(add("evaluate", cmd_evaluate, "offline quality: the served pipeline against popularity, ALS, item-kNN, EASE "
                      "and the two-tower alone, same split and user state, seen items excluded for all"))
    p = add("serve", cmd_serve, "start tritonserver on model_repository/<profile> (loopback by default)")
    p.add_argument("--profile", default="cpu", choices=list(PROFILES),
                   help="cpu: one python model runs the whole graph, one instance per core; cpu-stages: three python "
                        "models (per-step statistics, response cache); gpu: TensorRT plans and FAISS-GPU (the container)")
    p.add_argument("--address", help="address HTTP, gRPC and metrics listen on (default: config serve.address, loopback)")
    p.add_argument("--http-port", type=int, help="default: config serve.http_port (8000)")
    p.add_argument("--grpc-port", type=int, help="default: config serve.grpc_port (8001)")
    p.add_argument("--metrics-port", type=int, help="default: config serve.metrics_port (8002)")
    p.add_argument("--online-store", help="live user state: private (start a redis-server under ARTIFACTS/online), "
                   "none (the export's snapshot only) or redis://HOST:PORT/DB (default: config serve.online_store = private)")
    p.add_argument("--grpc-front", choices=["auto", "true", "false"], help="cap gRPC request size with a front "
                   "(serve.grpc_max_message_mb; Triton itself takes up to 2 GiB); auto (default): on unless loopback")
    p.add_argument("--grpc-tls-cert", help="gRPC over TLS: the server's certificate (PEM; with --grpc-tls-key)")
    p.add_argument("--grpc-tls-key", help="gRPC over TLS: the server's private key (PEM)")
    p.add_argument("--grpc-tls-client-ca", help="mutual TLS: accept only clients whose certificate this CA signed")
    for name, func, text in (("deploy", cmd_deploy, "switch the running server (`shoprec serve` on these artifacts) to "
                              "an exported bundle version without dropping a request: new steps load beside the old, "
                              "the ensemble switches, the old unload"),
                             ("rollback", cmd_rollback, "switch the running server back to the version it served "
                              "before the last deploy")):
        p = add(name, func, text)
        if name == "deploy":
            p.add_argument("--version", type=int, help="bundle version (default: the newest export, artifacts/serving); "
                           "`shoprec versions` lists them")
        p.add_argument("--grpc-port", type=int, help="the server's gRPC port, when several serve these artifacts")
    add("versions", cmd_versions, "list the exported bundle versions and which one each running server serves")
    p = add("events", cmd_events, "write user events (view/click/cart/purchase) to the online store of a running server; "
            "the next request of each user sees them")
    p.add_argument("file", nargs="?", default="-", help="JSON lines or CSV (header: user_id,item_id,type,timestamp"
                   "[,event_id,session_id]); - or nothing: standard input")
    p.add_argument("--format", choices=["jsonl", "csv"], help="default: csv for .csv/.tsv files, else jsonl")
    p.add_argument("--string-ids", action="store_true", help="user_id and item_id are text ids (data loaded with "
                   "`shoprec data --string-ids`): each is sent as shoprec.ids.key_id(text)")
    p.add_argument("--online-store", help="redis://HOST:PORT/DB (default: the private store `shoprec serve` runs on "
                   "these artifacts)")
    p = add("items", cmd_items, "mark items unavailable (never served, from the next request on) or available again; "
            "list the unavailable and the trending items")
    p.add_argument("--unavailable", nargs="+", metavar="ITEM_ID", help="raw item ids to withdraw")
    p.add_argument("--available", nargs="+", metavar="ITEM_ID", help="raw item ids to serve again")
    p.add_argument("--string-ids", action="store_true", help="the item ids are text ids (data loaded with "
                   "`shoprec data --string-ids`): each is sent as shoprec.ids.key_id(text)")
    p.add_argument("--trending", type=int, metavar="HOURS", help="also list the 20 items with the most events in the "
                   "last HOURS hours (1-47)")
    p.add_argument("--online-store", help="redis://HOST:PORT/DB (default: the private store of `shoprec serve`)")
    p = add("recommend", cmd_recommend, "top-k items for a user from a running server")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="raw user id")
    who.add_argument("--user-key", metavar="TEXT", help="the user's text id, for data loaded with --string-ids "
                     "(asks for shoprec.ids.key_id(TEXT))")
    p.add_argument("-k", type=int, default=10, help="how many items (default 10; at most the served candidate count, "
                   "serve.num_candidates: more is a per-request error)")
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"], help="ask the server over gRPC (default) or "
                   "HTTP/JSON")
    p.add_argument("--url", default=None, help="host:port (default: loopback and the configured port)")
    p.add_argument("--hour", type=int, help="request context: hour of day 0-23 (default: unknown)")
    p.add_argument("--weekday", type=int, help="request context: weekday 0-6, 0 = Monday (default: unknown)")
    p.add_argument("--diversity", type=float, help="MMR lambda in [0, 1]: 0 = the ranker's order (default: config "
                                                   "serve.diversity)")
    p.add_argument("--client-device", help="request context: the device the user is on, e.g. mobile (default: unknown); not a compute device")
    p.add_argument("--scene", help="home (default: serve.default_scene), item_detail (similar items to --context), cart "
                   "(complements of the --context items), or a scene of the serve config")
    ctx = p.add_mutually_exclusive_group()
    ctx.add_argument("--context", type=int, nargs="+", metavar="ITEM_ID", help="context items (raw ids): the viewed item, "
                   "the cart")
    ctx.add_argument("--context-key", nargs="+", metavar="TEXT", help="the context items' text ids, for data loaded "
                     "with --string-ids (sent as shoprec.ids.key_id(TEXT))")
    p.add_argument("--blend", type=float, nargs=3, metavar=("CTR", "CVR", "VALUE"), help="final score = CTR * pCTR + "
                   "CVR * pCTR * pCVR + VALUE * pCTR * pCVR * item price / median price (default: the scene's)")
    p.add_argument("--force-arm", action="append", metavar="LAYER=ARM", help="QA: serve this experiment arm instead of "
                   "the user's (repeatable)")
    p.add_argument("--include-seen", action="store_true", help="do not filter out items the user already interacted with")
    p.add_argument("--tls-ca", help="gRPC over TLS: PEM of the CA that signed the server's certificate")
    p.add_argument("--tls-cert", help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--tls-key", help="mutual TLS: this client's key (PEM)")
    p = add("demo-page", cmd_demo_page, "the Streamlit demo page against a running server: pick a user and a scene, "
            "see their history and the served recommendations (http://ADDRESS:PORT)")
    p.add_argument("--url", default=None, help="the server, host:port (default: loopback and the configured gRPC port)")
    p.add_argument("--port", type=int, default=8501, help="the page's port (default 8501)")
    p.add_argument("--address", default="127.0.0.1", help="the page's address (default: loopback)")
    p = add("abtest", cmd_abtest, "replay synthetic shoppers against a running server with serve.experiments: clicks "
            "and purchases drawn from the generator's planted truth, CTR and purchases per arm with 95%% CIs and a "
            "Welch test of each arm against the layer's first")
    p.add_argument("--url", default=None, help="host:port (default: loopback and the configured port)")
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    p.add_argument("--users", type=int, default=2000, help="synthetic users replayed, one request each (default 2000)")
    p.add_argument("-k", type=int, default=10, help="list length (default 10)")
    p.add_argument("--scene", default=None, help="scene of every request (default: the server's default scene)")
    p.add_argument("--seed", type=int, default=0, help="which users, and the draws of their clicks (default 0)")
    p.add_argument("--workers", type=int, default=4, help="clients sending in parallel (default 4)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    p = add("bench", cmd_bench, "benchmarks on the built artifacts: request-time transform latency (Workflow.transform "
            "vs NumPy plan) and serving (perf_analyzer sweep: Triton ensemble vs FastAPI vs in-process, ~5 min)")
    p.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--suite", default="all", choices=["transform", "serving", "all"])
    return parser


def _apply_overrides(args, cfg):
    for attr, key in (("size", "size"), ("seed", "seed"), ("source", "source"), ("movielens_dir", "movielens_dir"),
                      ("positive_threshold", "positive_threshold"), ("strong_threshold", "strong_threshold"),
                      ("rating_range", "rating_range")):
        if getattr(args, attr, None) is not None:
            value = getattr(args, attr)
            cfg = cfg.replace("data", **{key: tuple(value) if isinstance(value, list) else value})
    if getattr(args, "command", None) == "serve" and args.online_store:
        cfg = cfg.replace("serve", online_store=args.online_store)
    for attr in ("address", "http_port", "grpc_port", "metrics_port", "grpc_tls_cert", "grpc_tls_key", "grpc_tls_client_ca",
                 "grpc_front"):
        if getattr(args, attr, None) is not None:
            cfg = cfg.replace("serve", **{attr: getattr(args, attr)})
    if getattr(args, "deploy", False):
        cfg = cfg.replace("features", split="none")
    elif getattr(args, "split", None):
        cfg = cfg.replace("features", split=args.split)
    if hasattr(args, "results") and args.results is None:
        args.results = str(Path(args.artifacts) / "results")
    if getattr(args, "tag", "unset") is None:
        args.tag = _default_tag(args, cfg)
    return cfg


def _default_tag(args, cfg) -> str:
    """The quality report's name: the source the raw data on disk came from (`shoprec data` wrote it; the config may
    name another), the synthetic shop's size for the synthetic shop."""
    from feature_workflows.raw_schema import RawDataError, read_schema

    source = cfg.data.source
    if getattr(args, "command", None) == "evaluate":
        try:
            source = read_schema(Path(args.artifacts) / "data" / "raw").get("source") or source
        except (RawDataError, OSError, ValueError):
            pass  # no raw data on disk (evaluate names what is missing)
    return cfg.data.size if source == "synthetic" else source


# known, harmless library warnings that would otherwise bury the progress lines
QUIET_WARNINGS = (
    r"Tensorflow dtype mappings did not load",  # merlin without TensorFlow
    r"Initializing an NVTabular Dataset in CPU mode",  # NVTabular on CPU: what this project does
    r"OpenBLAS is configured to use",  # implicit's ALS advice; EASE wants the threads
    r"Method expects CSR input",  # implicit converting a COO matrix itself
    r"Exporting aten::index operator",  # ONNX export of embedding lookups (indices are never negative)
)


def main(argv=None) -> int:
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    args = build_parser().parse_args(argv)
    from shoprec.errors import UserError, one_line

    try:
        cfg = _apply_overrides(args, load_config(args.config))
        args.func(args, cfg)
    except (UserError, FileNotFoundError) as exc:  # bad input or a stale artifact: one line naming the file, no traceback
        print(f"shoprec {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
