"""The one place that works around NVTabular 23.08's CPU bugs. Every transform goes through here.

1. Categorify on CPU takes null positions from the index *labels*: with a non-default index it
   raises or silently returns wrong codes. `transform` resets the index first.
2. Categorify's default `out_path` is relative to the working directory: `categorify` requires
   an explicit folder.
3. A Categorify fit on a column without nulls cannot encode a later null in an integer column
   (pandas refuses NaN -> int). Id columns are validated non-null before they get here.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def categorify(out_path: str | Path, **kwargs):
    from nvtabular import ops

    return ops.Categorify(out_path=str(Path(out_path).resolve()), **kwargs)


def transform(workflow, df: pd.DataFrame) -> pd.DataFrame:
    """Workflow.transform of an in-memory frame, index reset (bug 1), result in row order."""
    import nvtabular as nvt

    clean = df.reset_index(drop=True)
    out = workflow.transform(nvt.Dataset(clean, npartitions=1)).to_ddf().compute()
    return out.reset_index(drop=True)
