"""Progress that does not flood logs: tqdm bars on a terminal, a few plain lines otherwise.

When stdout is not a terminal (CI, `> log`, Kubernetes) a bar would write thousands of carriage
-return updates into the file; here each loop logs at most one line per `every_s` seconds and one
at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _tty() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def progress(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None, every_s: float = 30.0) -> Iterator[T]:
    """Iterate `items`, reporting progress as a bar (terminal) or as rare plain lines (anything else)."""
    if not enabled:
        yield from items
        return
    if _tty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    t0 = last = time.time()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        now = time.time()
        if now - last >= every_s:
            last = now
            of = f"/{total}" if total else ""
            print(f"{desc}: {n}{of} ({now - t0:.0f}s)", flush=True)
    if time.time() - t0 >= every_s:  # a loop that printed progress says when it ended; short ones stay silent
        print(f"{desc}: done, {n} in {time.time() - t0:.1f}s", flush=True)


class Steps:
    """Named steps of a stage: one line per finished step (`features: split (0.8s)`)."""

    def __init__(self, stage: str, total: int, enabled: bool = True):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.n, self.t = 0, time.time()

    def done(self, what: str) -> None:
        self.n += 1
        if self.enabled:
            now = time.time()
            print(f"{self.stage} [{self.n}/{self.total}] {what} ({now - self.t:.1f}s)", flush=True)
            self.t = now
