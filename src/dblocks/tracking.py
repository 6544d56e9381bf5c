"""MLflow tracking for the pipeline: one parent run per experiment, one child run per job.

``init_runs`` runs once, before the parallel jobs fan out: it creates the MLflow experiment and one
parent run per experiment of a params file, and writes ``<out_dir>/<name>.json`` naming them. Each job
(``dblocks train-block --track <name>.json`` ...) then opens a :class:`JobRun`, a child run of that
parent, and logs its config, loss curve, timings and checkpoint hashes.

Tracking never costs a job its results: if the backend fails inside a ``JobRun`` (server down,
database locked for too long, a read-only store), the job prints one warning line and goes on
untracked. Several processes may log to one SQLite file at once; "database is locked" is retried with
a short backoff. ``mlflow`` is imported lazily, so importing this module is cheap."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable


DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_JOB = "parent"
#: MLflow's limits per log_batch request
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_LOCKED = ("database is locked", "database table is locked", "sqlite_busy")


class TrackingError(RuntimeError):
    """The tracking setup (``track-init``) cannot reach or use its tracking store."""


def resolve_uri(configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the configured URI, then :data:`DEFAULT_URI`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_URI


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"train.lr": "0.001", "layer_split": "[3, 6, 3]", ...} (values as strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _is_locked(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in _LOCKED)


def _retry(fn: Callable, *args, max_wait: float = 30.0, **kwargs):
    """Call ``fn``; while SQLite says "database is locked", retry with a short jittered exponential
    backoff for up to ``max_wait`` seconds (MLflow's own busy timeout applies within each attempt)."""
    deadline = time.monotonic() + max_wait
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
        yield items[i:i + size]


def _write_json_atomic(path: Path, record: dict) -> None:
    """tmp + rename; an unchanged file is left alone (its mtime too, which Snakemake compares)."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_commit() -> str:
    from dblocks.assemble import git_commit

    return git_commit() or ""


def run_tags(*, experiment: str, scale: str, method: str, block: int | None, job: str, config: dict,
             tables: list[str] | None = None) -> dict[str, str]:
    """The ``dblocks.*`` tags every run carries (parent and children alike)."""
    from dblocks.config import config_hash

    if tables is None:
        tables = (config.get("pipeline") or {}).get("tables")
    return {
        "dblocks.experiment": experiment,
        "dblocks.scale": str(scale or ""),
        "dblocks.method": method or "",
        "dblocks.block": "" if block is None else str(block),
        "dblocks.job": job,
        "dblocks.git_commit": _git_commit(),
        "dblocks.config_hash": config_hash(config),
        "dblocks.tables": ",".join(str(t) for t in tables or []),
        "dblocks.host": socket.gethostname(),
    }


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:_MAX_PARAM_VALUE]) for k, v in sorted(params.items())]
    for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
        _retry(client.log_batch, run_id, params=chunk, synchronous=True)


# ------------------------------------------------------------------------------------ parent runs

def _default_artifact_location(uri: str, name: str) -> str | None:
    """Artifacts of a SQLite store go beside the database file, in mlruns/<experiment> (MLflow's default
    is ./mlruns of whichever directory the experiment happened to be created from)."""
    db = sqlite_path(uri)
    if db is None:
        return None  # a server decides (its --default-artifact-root or artifact proxy)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "experiment"
    return (db.resolve().parent / "mlruns" / safe).as_uri()


def _get_or_create_experiment(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = _retry(client.get_experiment_by_name, name)
    if exp is None:
        try:
            return _retry(client.create_experiment, name, artifact_location=_default_artifact_location(uri, name))
        except MlflowException:
            exp = _retry(client.get_experiment_by_name, name)  # created meanwhile by another process
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        _retry(client.restore_experiment, exp.experiment_id)
    return exp.experiment_id


def _reusable_parent(client, path: Path, uri: str, experiment_id: str, chash: str) -> str | None:
    """The parent run id recorded in ``path`` if that run still exists, live, for this config."""
    from mlflow.exceptions import MlflowException

    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    run_id = record.get("parent_run_id") if isinstance(record, dict) else None
    if not run_id or record.get("tracking_uri") != uri or record.get("experiment_id") != experiment_id:
        return None
    try:
        run = _retry(client.get_run, run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if (run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id
            or run.data.tags.get("dblocks.config_hash") != chash):
        return None
    return run_id


def read_params_file(params_path: str | Path) -> dict:
    from dblocks.config import ConfigError, read_yaml_mapping

    path = Path(params_path)
    data = read_yaml_mapping(path, "--params")
    if not isinstance(data.get("experiments"), dict) or not data["experiments"]:
        raise ConfigError(f"--params {path}: expected a mapping with a non-empty 'experiments:' mapping")
    tracking = data.get("tracking") or {}
    if not isinstance(tracking, dict):
        raise ConfigError(f"--params {path}: 'tracking' must be a mapping with uri and experiment")
    return data


STORE_RECORD = "store.json"


def init_runs(params_path: str | Path, out_dir: str | Path, uri: str | None = None,
              names: list[str] | None = None, store_only: bool = False) -> list[Path]:
    """Create (or reuse) the MLflow experiment and one parent run per experiment of ``params_path``
    (or only those in ``names``); write ``out_dir/<name>.json`` for each and return those paths.

    With ``store_only`` it only creates the store and the MLflow experiment and writes
    ``out_dir/store.json``: the pipeline does that once before anything runs in parallel.
    ``uri`` overrides the params file's ``tracking.uri``; MLFLOW_TRACKING_URI overrides both. Every
    experiment config is resolved and validated before the tracking store is touched."""
    from dblocks.config import ConfigError, config_hash, load_params, resolve

    data = read_params_file(params_path)
    tracking = data.get("tracking") or {}
    uri = resolve_uri(uri or tracking.get("uri"))
    mlflow_experiment = tracking.get("experiment") or "diffusion-blocks"
    scale = str(data.get("scale") or "")
    unknown = sorted(set(names or []) - set(data["experiments"]))
    if unknown:
        raise ConfigError(f"--experiment {unknown[0]}: not in {params_path}; allowed: {', '.join(data['experiments'])}")
    selected = [] if store_only else (names or list(data["experiments"]))
    configs = {name: resolve(load_params(params_path, name)) for name in selected}
    out_dir = Path(out_dir)

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client = _retry(mlflow.MlflowClient, tracking_uri=uri)
        experiment_id = _get_or_create_experiment(client, mlflow_experiment, uri)
        written = []
        if store_only:
            path = out_dir / STORE_RECORD
            _write_json_atomic(path, {"tracking_uri": uri, "mlflow_experiment": mlflow_experiment,
                                      "experiment_id": experiment_id, "scale": scale})
            written.append(path)
        for name, config in configs.items():
            path = out_dir / f"{name}.json"
            chash = config_hash(config)
            run_id = _reusable_parent(client, path, uri, experiment_id, chash)
            if run_id is None:
                methods = (config.get("pipeline") or {}).get("methods") or []
                tags = run_tags(experiment=name, scale=scale, method=",".join(methods), block=None,
                                job=PARENT_JOB, config=config)
                run = _retry(client.create_run, experiment_id, tags=tags, run_name=name)
                run_id = run.info.run_id
                _log_params(client, run_id, flatten(config))
                _retry(client.set_terminated, run_id, "FINISHED")
            record = {"tracking_uri": uri, "mlflow_experiment": mlflow_experiment, "experiment_id": experiment_id,
                      "parent_run_id": run_id, "experiment": name, "scale": scale}
            _write_json_atomic(path, record)
            written.append(path)
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"tracking store {uri}: {_one_line(exc)}") from None
    except Exception as exc:  # sqlalchemy and friends, without importing them here
        if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3", "alembic"):
            raise TrackingError(f"tracking store {uri}: {_one_line(exc)}") from None
        raise
    return written


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -------------------------------------------------------------------------------------- job runs

class JobRun:
    """A child run of an experiment's parent run, for one job process (a context manager).

    ``JobRun(run_json, "train", "blockwise", 2, config)`` -> run "<exp> block 2" tagged with the job,
    method, block, git commit, config hash and paper tables, the flattened config as params. Every
    method is a no-op once tracking has failed (one warning line on stderr); exceptions of the job
    itself propagate and mark the run FAILED."""

    def __init__(self, run_json_path: str | Path, job: str, method: str | None, block: int | None, config: dict,
                 tables: list[str] | None = None, *, flush_every: int = 50, flush_seconds: float = 15.0):
        self.path = Path(run_json_path)
        self.job, self.method, self.block = job, method or "", block
        self.config, self.tables = config, tables
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.client = None
        self.run_id: str | None = None
        self.enabled = True
        self.warning: str | None = None
        self._buffer: list = []
        self._last_flush = time.monotonic()

    # -- internals
    def _disable(self, what: str, exc: BaseException) -> None:
        self.enabled = False
        self._buffer.clear()
        self.warning = (f"dblocks: warning: MLflow tracking off for this job ({what} failed: {_one_line(exc)}); "
                        f"the job goes on and writes its results")
        print(self.warning, file=sys.stderr, flush=True)

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        if not self.enabled:
            return None
        try:
            return _retry(fn, *args, **kwargs)
        except Exception as exc:  # never let tracking cost the job its results
            self._disable(what, exc)
            return None

    def _run_name(self, experiment: str) -> str:
        if self.job == "evaluate":
            return f"{experiment} evaluate {self.method}".rstrip()
        if self.block is not None:
            return f"{experiment} block {self.block}"
        return f"{experiment} {self.method or self.job}"

    def _start(self) -> None:
        record = json.loads(self.path.read_text())
        uri, experiment_id, parent = record["tracking_uri"], record["experiment_id"], record["parent_run_id"]
        if not parent:
            raise ValueError(f"{self.path} names no parent run; run 'dblocks track-init' first")
        db = sqlite_path(uri)
        if db is not None and not db.is_file():  # MLflow would create an empty store here, far from the parent
            raise FileNotFoundError(f"{db}: no such tracking database (from {self.path}); run "
                                    f"'dblocks track-init' first, from the same directory")
        import mlflow

        self.client = _retry(mlflow.MlflowClient, tracking_uri=uri)
        experiment = self.config.get("name") or record.get("experiment") or ""
        tags = run_tags(experiment=experiment, scale=record.get("scale", ""), method=self.method,
                        block=self.block, job=self.job, config=self.config, tables=self.tables)
        tags.update({"mlflow.parentRunId": parent, "mlflow.source.name": f"dblocks {self.job}",
                     "mlflow.source.type": "LOCAL", "mlflow.user": _user()})
        run = _retry(self.client.create_run, experiment_id, tags=tags, run_name=self._run_name(experiment))
        self.run_id = run.info.run_id
        _log_params(self.client, self.run_id, flatten(self.config))

    # -- context manager
    def __enter__(self) -> "JobRun":
        try:
            self._start()
        except Exception as exc:
            self._disable("starting the run", exc)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.flush()
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        if self.run_id is not None:
            self._call("ending the run", self.client.set_terminated, self.run_id, status)
        return False  # the job's own exception, if any, propagates

    # -- logging
    def log_step(self, step: int, loss: float, lr: float) -> None:
        """Buffer ``train_loss`` and ``lr`` at ``step``; sent every ``flush_every`` calls (and at exit)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric("train_loss", float(loss), ts, int(step)), Metric("lr", float(lr), ts, int(step))]
        if len(self._buffer) >= 2 * self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or self.run_id is None:
            self._buffer.clear()
            return
        pending, self._buffer = self._buffer, []
        for chunk in _chunks(pending, _MAX_METRICS_PER_BATCH):
            self._call("logging metrics", self.client.log_batch, self.run_id, metrics=chunk, synchronous=True)
        self._last_flush = time.monotonic()

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        """Log ``metrics`` (None values are skipped) at ``step``."""
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.enabled or self.run_id is None:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, "" if v is None else str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
            self._call("setting tags", self.client.log_batch, self.run_id, tags=chunk, synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or self.run_id is None:
            return
        self._call("logging an artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return ""
