"""The errors that end a ``dblocks`` command with one line instead of a traceback, and their exit codes:
input problems exit 2, failed training, tracking or integrity checks 1.

They live here, apart from the code that raises them, so that the CLI can name them all without importing
that code: this module imports nothing but the standard library, while dblocks.train or dblocks.data would
cost every job (a tracking job needs no torch) about two seconds of start-up."""

from __future__ import annotations

import os
from pathlib import Path

#: the exit code of a bad input: an option, a params value, a checkpoint or a data set that cannot be used
EXIT_USAGE = 2
#: the exit code of a command that ran and failed (training, tracking, integrity)
EXIT_FAILURE = 1


class UsageError(Exception):
    """Invalid user input, reported as one line and exit code 2."""


class IntegrityFailure(Exception):
    """``dblocks verify`` found corrupt artefacts and left them in place: exit code 1."""


class ConfigError(ValueError):
    """An invalid parameter: the message names the key and what is allowed."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or loaded. The message always names the file and, where
    one is at fault, the field (``path`` and ``field`` are also kept as attributes)."""

    def __init__(self, path: str | os.PathLike, problem: str, field: str | None = None):
        self.path = Path(path)
        self.field = field
        where = f" (field {field!r})" if field is not None else ""
        super().__init__(f"{self.path}{where}: {problem}")


class DataError(ValueError):
    """A data set that cannot be used as given (unreachable, missing files, wrong columns or shapes); the
    message names what was asked for and what is expected. The CLI reports it as one line, exit 2."""


class InceptionWeightsError(RuntimeError):
    """The offline Inception weights are missing, unverified or do not fit."""


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss became NaN); nothing poisoned is written."""


class TrackingError(RuntimeError):
    """The tracking setup (``track-init``) cannot reach or use its tracking store."""


#: every error a command reports in one line, with its exit code (the first class that matches wins)
EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (UsageError, EXIT_USAGE),
    (IntegrityFailure, EXIT_FAILURE),
    (ConfigError, EXIT_USAGE),
    (CheckpointError, EXIT_USAGE),
    (DataError, EXIT_USAGE),
    (InceptionWeightsError, EXIT_USAGE),
    (TrainingError, EXIT_FAILURE),
    (TrackingError, EXIT_FAILURE),
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code for a one-line error, else None (an unexpected error: its traceback is shown)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return None
