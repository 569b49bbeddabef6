"""Rehearse the judges' run on the releases that are not here: `referee_bench --dataset ml100k` and
`--dataset ml1m-partial`, every protocol, on ml-latest-small's ratings laid out as those releases.

    .venv/bin/python -m benchmarks.referee_rehearsal                          # both releases, 3 protocols, ~40 min
    .venv/bin/python -m benchmarks.referee_rehearsal --datasets ml100k --protocols temporal

The product is judged on MovieLens 100K and ML-1M-partial with the referee's three protocols, among them the
global `temporal` split, which ml-latest-small cannot exercise (7 test users). The referee copy in ../shared
splits ml-latest-small only, so here:
- the `ml100k-files` and `ml1m-files` variants of `benchmarks.referee_variants` (whole stars, the release's item
  file, a user file of random attributes) get their ratings in the release's own ratings file (u.data;
  ratings_users1-2999.dat), in a folder named as the referee names the release;
- a copy of the referee that lists those releases (its `DATASETS` line widened, nothing else changed) splits them
  with the same code and seed;
- `benchmarks.referee_bench --dataset RELEASE` runs exactly as the judges would run it: split, the release's files
  handed to the product, data, features --deploy, train, export, serve, score, and the referee's baselines fitted
  on the same split.
On random-8-1-1 and user-temporal-8-1-1 the lists must equal the variant's (same ratings, same split, same files).
`temporal` shows only that the path runs: its 7 test users make no figure. Splits, artifacts and the referee copy go
to --work (outside the work tree); the referee's scores to benchmarks/results/rehearsal/.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from shoprec.config import REPO_ROOT

from . import referee_bench
from .referee_variants import HANDED_AS, handed_over, make_variant

VARIANT_OF = {release: variant for variant, release in HANDED_AS.items()}  # ml100k -> ml100k-files, ...
SEPARATOR = {"ml100k": "\t", "ml1m-partial": "::"}
REFEREE_DATASETS_LINE = 'DATASETS = ("mlls",)'


def release_folder(dataset: str, data: Path, work: Path) -> Path:
    """`dataset`'s folder as the referee reads it (named as the referee names it), made from ml-latest-small."""
    variant = make_variant(VARIANT_OF[dataset], data, work / "variants")
    folder, ratings_name, _ = referee_bench.DATASETS[dataset]
    out = work / "releases" / folder
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(handed_over(VARIANT_OF[dataset], variant), out)
    ratings = pd.read_csv(variant / "ratings.csv")[["userId", "movieId", "rating", "timestamp"]]
    with open(out / ratings_name, "w") as fh:
        fh.writelines(SEPARATOR[dataset].join(map(str, row)) + "\n" for row in ratings.itertuples(index=False))
    return out


def referee_copy(referee: Path, datasets: list[str], out: Path) -> Path:
    """The referee with `datasets` added to the data sets it splits; stops if its DATASETS line is not the one known."""
    text = referee.read_text()
    if REFEREE_DATASETS_LINE not in text:
        raise SystemExit(f"referee_rehearsal: {referee} has no line {REFEREE_DATASETS_LINE!r}; it may list the "
                         "releases already: run benchmarks.referee_bench --dataset with it directly")
    listed = ", ".join(f'"{d}"' for d in [*datasets, "mlls"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "referee.py"
    path.write_text(text.replace(REFEREE_DATASETS_LINE, f"DATASETS = ({listed})"))
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(VARIANT_OF), choices=list(VARIANT_OF))
    parser.add_argument("--protocols", nargs="+", default=list(referee_bench.PROTOCOLS), choices=referee_bench.PROTOCOLS)
    parser.add_argument("--referee", default=str(referee_bench.SHARED / "quality" / "referee.py"))
    parser.add_argument("--data", default=str(referee_bench.SHARED / "data" / "ml-latest-small"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "shoprec_rehearsal"))
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "rehearsal"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    referee = referee_copy(Path(args.referee), args.datasets, work / "referee")
    summaries = {}
    for dataset in args.datasets:
        folder = release_folder(dataset, Path(args.data), work)
        summaries[dataset] = referee_bench.main(
            ["--dataset", dataset, "--referee", str(referee), "--data", str(folder), "--protocols", *args.protocols,
             "--work", str(work / "runs" / dataset), "--out", args.out])
    return summaries


if __name__ == "__main__":
    main()
