"""`shoprec`: one entry point, a subcommand per stage. Stages hand over through files on disk.

  data       generate the synthetic shop, or import MovieLens files, into ARTIFACTS/data/raw
  features   fit the NVTabular workflows, write transformed splits + serving feature files
  train      train the two-tower retrieval model, then the DLRM ranker on its candidates
  export     ONNX + parity checks, item embeddings, FAISS index, TensorRT (where present)
  evaluate   offline quality report vs popularity and ALS baselines (benchmarks/results)
  serve      start tritonserver on the generated model repository (Ctrl-C stops it)
  recommend  ask a running server for top-k items for a user (HTTP or gRPC)
  bench      benchmarks: request-time transform (NVTabular vs NumPy plan) and serving (perf_analyzer:
             Triton ensemble vs FastAPI vs in-process), results in benchmarks/results
  all        data -> features -> train -> export -> evaluate -> serve + recommend (the demo)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import REPO_ROOT, load_config


def _artifacts(args) -> Path:
    return Path(args.artifacts).resolve()


def cmd_data(args, cfg):
    raw = _artifacts(args) / "data" / "raw"
    if cfg.data.source == "synthetic":
        from feature_workflows.synthetic import generate

        info = generate(raw, cfg.data.size, cfg.data.seed, progress=not args.quiet)
    else:
        from feature_workflows.movielens import load_movielens, write_raw

        if not cfg.data.movielens_dir:
            raise SystemExit("data.source is MovieLens: pass --movielens-dir DIR (the unpacked download)")
        info = write_raw(load_movielens(cfg.data.movielens_dir, cfg.data.source), raw)
    print(json.dumps({"raw": str(raw), **info}))


def cmd_features(args, cfg):
    from feature_workflows.pipeline import build_features

    art = _artifacts(args)
    print(json.dumps(build_features(art / "data" / "raw", art / "features", cfg.features, progress=not args.quiet)))


def cmd_train(args, cfg):
    from training.train import train_all

    art = _artifacts(args)
    report = train_all(art / "features", art / "models", cfg.retrieval, cfg.ranking, args.device, progress=not args.quiet)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in report.items()}))


def cmd_export(args, cfg):
    from training.export import export_bundle

    art = _artifacts(args)
    print(json.dumps(export_bundle(art / "features", art / "models", art / "serving", cfg)))


def cmd_evaluate(args, cfg):
    from training.evaluate import evaluate

    art = _artifacts(args)
    report = evaluate(art / "features", art / "serving", Path(args.results), cfg, tag=args.tag)
    print(json.dumps(report["summary"], indent=1))


def cmd_serve(args, cfg):
    import time

    from serving.launcher import TritonServer

    server = TritonServer.from_config(cfg.serve, _artifacts(args), profile=args.profile)
    with server:
        print(f"tritonserver ready: gRPC {server.grpc_url}  HTTP {server.http_url}  (Ctrl-C stops)", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def cmd_recommend(args, cfg):
    from client.cli import run as recommend

    recommend(args, cfg)


def cmd_bench(args, cfg):
    if args.suite in ("transform", "all"):
        from benchmarks.transform_bench import main as transform_bench

        transform_bench(["--artifacts", str(_artifacts(args)), "--out", str(Path(args.results) / "transform_latency.json")])
    if args.suite in ("serving", "all"):
        from benchmarks.serving_bench import main as serving_bench

        serving_bench(["--artifacts", str(_artifacts(args)), "--out", str(args.results)])


def cmd_all(args, cfg):
    for step in (cmd_data, cmd_features, cmd_train, cmd_export, cmd_evaluate):
        print(f"== shoprec {step.__name__[4:]}", flush=True)
        step(args, cfg)
    from client.cli import demo_served

    print("== shoprec serve + recommend (HTTP and gRPC)", flush=True)
    demo_served(_artifacts(args), cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoprec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="TOML config (default: configs/default.toml)")
    parser.add_argument("--artifacts", default=str(REPO_ROOT / "artifacts"), help="where every stage reads/writes (default: ./artifacts)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    for name, func, help_ in (("data", cmd_data, "create the raw users/items/interactions tables"),
                              ("all", cmd_all, "run every stage and finish with served recommendations")):
        p = add(name, func, help_)
        p.add_argument("--size", choices=["tiny", "small", "medium", "large"], help="synthetic dataset size (overrides config)")
        p.add_argument("--seed", type=int, help="generator seed (overrides config)")
        p.add_argument("--source", choices=["synthetic", "movielens-100k", "movielens-1m"], help="data source (overrides config)")
        p.add_argument("--movielens-dir", help="folder holding the MovieLens files you downloaded")
        if name == "all":
            p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
            p.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results"))
            p.add_argument("--tag", default=None, help="suffix of the quality report file (default: the dataset size)")
    add("features", cmd_features, "fit NVTabular workflows; write splits, item table, request-time plan")
    p = add("train", cmd_train, "train two-tower retrieval and DLRM ranking")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    add("export", cmd_export, "export ONNX (+ parity), item embeddings, FAISS index, serving bundle")
    p = add("evaluate", cmd_evaluate, "offline quality report against popularity and ALS baselines")
    p.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="suffix of the report file (default: the dataset size)")
    p = add("serve", cmd_serve, "start tritonserver on model_repository/<profile> (loopback by default)")
    p.add_argument("--profile", default="cpu", choices=["cpu", "gpu"])
    p = add("recommend", cmd_recommend, "top-k items for a user from a running server")
    p.add_argument("--user", type=int, required=True, help="raw user id")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
    p.add_argument("--url", default=None, help="host:port (default: loopback and the configured port)")
    p.add_argument("--hour", type=int)
    p.add_argument("--weekday", type=int)
    p.add_argument("--device", help="request context device, e.g. mobile")
    p = add("bench", cmd_bench, "benchmarks on the built artifacts: request-time transform latency (Workflow.transform "
            "vs NumPy plan) and serving (perf_analyzer sweep: Triton ensemble vs FastAPI vs in-process, ~5 min)")
    p.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--suite", default="all", choices=["transform", "serving", "all"])
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config)
    for attr, key in (("size", "size"), ("seed", "seed"), ("source", "source"), ("movielens_dir", "movielens_dir")):
        if getattr(args, attr, None) is not None:
            cfg = cfg.replace("data", **{key: getattr(args, attr)})
    if getattr(args, "tag", "unset") is None:
        args.tag = cfg.data.size if cfg.data.source == "synthetic" else cfg.data.source
    args.func(args, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
