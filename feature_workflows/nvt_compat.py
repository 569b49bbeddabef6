"""The one place that works around NVTabular 23.08's CPU bugs. Every transform goes through here.

1. Categorify on CPU takes null positions from the index *labels*: with a non-default index it
   raises or silently returns wrong codes. `transform` resets the index first.
2. Categorify's default `out_path` is relative to the working directory: `categorify` requires
   an explicit folder.
3. A Categorify fit on a column without nulls cannot encode a later null in an integer column
   (pandas refuses NaN -> int). Id columns are validated non-null before they get here.
4. Categorify's transform of a text column whose values are ALL null raises IndexError (it peeks at
   the first non-null value), in `fit` too (it transforms a sample). `fit` and `transform` append
   one throw-away row with a value in such columns (the third slot of a multi-valued attribute no
   item uses, the tenth recent category of a batch of new users); `transform` drops it again.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def categorify(out_path: str | Path, **kwargs):
    from nvtabular import ops

    return ops.Categorify(out_path=str(Path(out_path).resolve()), **kwargs)


def _padded(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The frame, index reset (bug 1), plus one row with text in every all-null text column (bug 4)."""
    clean = df.reset_index(drop=True)
    empty = [c for c in clean.columns if clean[c].dtype == object and clean[c].isna().all()]
    if not empty:
        return clean, False
    pad = clean.iloc[:1].copy()
    for c in empty:
        pad[c] = "\x00"
    return pd.concat([clean, pad], ignore_index=True), True


def fit(workflow, df: pd.DataFrame) -> None:
    import nvtabular as nvt

    workflow.fit(nvt.Dataset(_padded(df)[0], npartitions=1))


def transform(workflow, df: pd.DataFrame) -> pd.DataFrame:
    """Workflow.transform of an in-memory frame (bugs 1 and 4 worked around), result in row order."""
    import nvtabular as nvt

    clean, empty = _padded(df)
    out = workflow.transform(nvt.Dataset(clean, npartitions=1)).to_ddf().compute()
    out = out.reset_index(drop=True)
    return out.iloc[: len(df)].reset_index(drop=True) if empty else out
