"""The tracking store: its URI (``resolve_uri``, ``sqlite_path``), retries while SQLite says "database is
locked" (``_retry``), store failures as one-line :class:`~dblocks.errors.TrackingError` (``_store_errors``),
the MLflow experiment (got or created, of the classic kind) and the batched logging calls that the job runs and
the later sync share. ``mlflow`` is imported lazily, inside the functions that need it."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from dblocks.errors import TrackingError
from dblocks.io import one_line

DEFAULT_URI = "sqlite:///mlflow.db"
#: MLflow 3's experiment kind: "custom_model_development" is classic ML (runs), not GenAI (traces). MLflow UIs
#: that read it open such an experiment on its runs table; 3.17's UI follows its own GenAI / Model training
#: switch instead (see runs_view_url)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: MLflow's limits per log_batch request
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_LOCKED = ("database is locked", "database table is locked", "sqlite_busy")
_DUPLICATE = ("unique constraint", "integrityerror", "duplicate key", "already exists")


def resolve_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the configured URI, then :data:`DEFAULT_URI`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in _LOCKED)


def _lock_wait() -> float:
    """How long a job waits for a locked store before it goes on untracked (DBLOCKS_TRACKING_WAIT)."""
    try:
        return max(0.0, float(os.environ.get("DBLOCKS_TRACKING_WAIT", "30")))
    except ValueError:
        return 30.0


def _retry(fn: Callable, *args, max_wait: float | None = None, **kwargs):
    """Call ``fn``; while SQLite says "database is locked", retry with a short jittered exponential
    backoff for up to ``max_wait`` seconds (default :func:`_lock_wait`; MLflow's own busy timeout applies
    within each attempt)."""
    deadline = time.monotonic() + (_lock_wait() if max_wait is None else max_wait)
    delay = 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _is_locked(exc) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay * (1.0 + random.random()))
            delay = min(2 * delay, 2.0)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@contextlib.contextmanager
def _store_errors(uri: str):
    """Store failures (MLflow, the file system, SQLAlchemy, HTTP) -> one-line :class:`TrackingError`."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"tracking store {uri}: {one_line(exc)}") from None
    except Exception as exc:  # sqlalchemy and friends, without importing them here
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3", "alembic"):
            raise TrackingError(f"tracking store {uri}: {one_line(exc)}") from None
        raise


def _default_artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store go beside the database file, in mlruns/<experiment> (MLflow's default
    is ./mlruns of whichever directory the experiment happened to be created from)."""
    db = sqlite_path(uri)
    if db is None:
        return None  # a server decides (its --default-artifact-root or artifact proxy)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "experiment"
    return (db.resolve().parent / "mlruns" / safe).as_uri()


def _get_or_create_experiment(client, name: str, uri: str) -> str:
    """The id of the MLflow experiment ``name``, created (of the classic kind) if missing; an existing one
    is restored if deleted and gets the kind if it has none (or only one the UI inferred)."""
    from mlflow.exceptions import MlflowException

    exp = _retry(client.get_experiment_by_name, name)
    if exp is None:
        try:
            return _retry(
                client.create_experiment,
                name,
                artifact_location=_default_artifact_location(uri, name),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:
            exp = _retry(client.get_experiment_by_name, name)  # created meanwhile by another process
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        _retry(client.restore_experiment, exp.experiment_id)
    kind = (exp.tags or {}).get(EXPERIMENT_KIND_TAG, "")
    if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
        _retry(client.set_experiment_tag, exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:_MAX_PARAM_VALUE]) for k, v in sorted(params.items())]
    for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
        _retry(client.log_batch, run_id, params=chunk, synchronous=True)


def _log_metric_batches(client, run_id: str, metrics: list, send: Callable | None = None) -> None:
    send = send or (lambda chunk: _retry(client.log_batch, run_id, metrics=chunk, synchronous=True))
    for chunk in _chunks(metrics, _MAX_METRICS_PER_BATCH):
        send(chunk)


def _log_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], _MAX_PARAMS_PER_BATCH):
        _retry(client.log_batch, run_id, tags=chunk, synchronous=True)


def _log_inputs(client, run_id: str, inputs: list[dict], attempts: int = 5) -> None:
    """Log dataset inputs. A dataset is stored once per MLflow experiment, and jobs that start together
    (the B block jobs of an experiment) race to create it: the losers' insert fails as a duplicate, and
    their next attempt finds it (each attempt is one transaction, so nothing half-written remains)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    datasets = [
        DatasetInput(
            Dataset(i["name"], i["digest"], i["source_type"], i["source"], i.get("schema"), i.get("profile")),
            [InputTag(k, v) for k, v in i["tags"].items()],
        )
        for i in inputs
    ]
    for attempt in range(attempts):
        try:
            _retry(client.log_inputs, run_id, datasets=datasets)
            return
        except Exception as exc:
            if attempt == attempts - 1 or not any(s in str(exc).lower() for s in _DUPLICATE):
                raise
            time.sleep(0.05 * (1.0 + random.random()))


def _upload(client, run_id: str, path: Path, artifact_path: str | None, name: str | None) -> None:
    if name is None or name == path.name:
        _retry(client.log_artifact, run_id, str(path), artifact_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / name)
        _retry(client.log_artifact, run_id, str(Path(tmp) / name), artifact_path)
