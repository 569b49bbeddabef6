"""Errors a user can act on: the CLI reports them as one line (no traceback).

Each stage's error type derives from `UserError`, so the application layer catches them all
without importing any stage.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a stale artifact or a failed run the user can fix: reported as one line naming the file/field."""


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
