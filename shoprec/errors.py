"""Errors a user can act on, reported as one line by the CLI (no traceback)."""

from __future__ import annotations


def user_facing_types() -> tuple[type[BaseException], ...]:
    from feature_workflows.raw_schema import RawDataError

    from .manifest import ArtifactError

    types: list[type[BaseException]] = [RawDataError, ArtifactError, FileNotFoundError]
    try:
        from training.evaluate import EvaluationError
        from training.export import ExportError
        from training.train import TrainingError

        types += [TrainingError, ExportError, EvaluationError]
    except ImportError:  # the serving image has no training stack
        pass
    return tuple(types)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
