"""Run records and parent runs: the ``dblocks.*`` tags of every run, the ``track-init`` records
(``<out_dir>/<name>.<config hash>.json``, ``store.json``) and :func:`init_runs`, which creates the MLflow
experiment and one parent run per experiment of a params file (or, in journal mode, only writes the records)."""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
from pathlib import Path

import dblocks
from dblocks.errors import ConfigError, TrackingError
from dblocks.io import flatten, write_json_atomic
from dblocks.tracking.store import _get_or_create_experiment, _log_params, _retry, _store_errors, resolve_uri
from dblocks.tracking.views import _set_runs_view, runs_view

PARENT_JOB = "parent"
JOURNAL_DIR = "journal"
RUN_KEY_TAG = "dblocks.run_key"
EVAL_HASH_TAG = "dblocks.eval_hash"
STORE_RECORD = "store.json"
#: ``tracking.mode`` in which jobs only write their journals (see :mod:`dblocks.tracking`)
JOURNAL_MODE = "journal"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checked-out code, or None outside a git checkout (recorded in every run's tags
    and every checkpoint's provenance)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(dblocks.__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(
    *,
    experiment: str,
    scale: str,
    method: str,
    block: int | None,
    job: str,
    config: dict,
    tables: list[str] | None = None,
) -> dict[str, str]:
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
        "dblocks.git_commit": git_commit() or "",
        "dblocks.config_hash": config_hash(config),
        "dblocks.tables": ",".join(str(t) for t in tables or []),
        "dblocks.host": socket.gethostname(),
    }


def record_value(run_json_path: str | Path | None, key: str) -> str | None:
    """A non-empty string field of a ``track-init`` record (e.g. ``data``, ``scale``), or None."""
    if run_json_path is None:
        return None
    try:
        record = json.loads(Path(run_json_path).read_text())
    except (OSError, ValueError):
        return None
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, str) and value else None


def record_data(run_json_path: str | Path | None) -> str | None:
    """The prepared data directory that a ``track-init`` record names (``data``), or None."""
    return record_value(run_json_path, "data")


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
    if (
        run.info.lifecycle_stage != "active"
        or run.info.experiment_id != experiment_id
        or run.data.tags.get("dblocks.config_hash") != chash
    ):
        return None
    return run_id


def _create_parent(client, experiment_id: str, name: str, scale: str, config: dict) -> str:
    methods = (config.get("pipeline") or {}).get("methods") or []
    tags = run_tags(experiment=name, scale=scale, method=",".join(methods), block=None, job=PARENT_JOB, config=config)
    run = _retry(client.create_run, experiment_id, tags=tags, run_name=name)
    _log_params(client, run.info.run_id, flatten(config, as_strings=True))
    _retry(client.set_terminated, run.info.run_id, "FINISHED")
    return run.info.run_id


def init_runs(
    params_path: str | Path,
    out_dir: str | Path,
    uri: str | None = None,
    names: list[str] | None = None,
    store_only: bool = False,
    allow_offline: bool = False,
) -> list[Path]:
    """Create (or reuse) the MLflow experiment and one parent run per experiment of ``params_path``
    (or only those in ``names``); write ``out_dir/<name>.<config hash>.json`` for each (the file name of
    :meth:`~dblocks.pipeline.Pipeline.run_json`) and return those paths.

    With ``store_only`` it only creates the store and the MLflow experiment and writes
    ``out_dir/store.json``: the pipeline does that once before anything runs in parallel.
    ``uri`` overrides the params file's ``tracking.uri``; MLFLOW_TRACKING_URI overrides both. Every
    experiment config is resolved and validated before the tracking store is touched. With
    ``allow_offline`` an unreachable store is a warning: the records name no parent run, so the jobs
    run untracked and :func:`sync_journals` logs them later. Each experiment's record also names its
    prepared data directory (``data``, relative to where the pipeline runs), whose train split its training
    jobs log as their dataset input.

    In journal mode (``tracking.mode: journal``) it neither imports MLflow nor touches the store: the records
    say ``"mode": "journal"`` and name no run, and each experiment's record holds the experiment's config, from
    which :func:`sync_journals` creates the parent run that track-init would have created."""
    from dblocks.config import config_hash
    from dblocks.pipeline import Pipeline

    params = Pipeline.load(params_path)
    uri = resolve_uri(uri or params.tracking_uri)
    mlflow_experiment, scale = params.mlflow_experiment, params.scale
    unknown = sorted(set(names or []) - set(params.experiments))
    if unknown:
        raise ConfigError(f"--experiment {unknown[0]}: not in {params_path}; allowed: {', '.join(params.experiments)}")
    selected = [] if store_only else (names or list(params.experiments))
    configs = {name: params.experiments[name] for name in selected}
    out_dir = Path(out_dir)
    record_of = {name: out_dir / Path(params.run_json(name)).name for name in selected}
    base = {"tracking_uri": uri, "mlflow_experiment": mlflow_experiment, "scale": scale}
    records: dict[Path, dict] = {}
    if params.tracking_mode == JOURNAL_MODE:  # the jobs only journal; track-sync logs everything
        journal = dict(base, mode=JOURNAL_MODE, experiment_id=None, runs_view=runs_view(params))
        if store_only:
            records[out_dir / STORE_RECORD] = journal
        for name, config in configs.items():
            records[record_of[name]] = dict(
                journal, parent_run_id=None, experiment=name, data=params.prepared(config["dataset"]), config=config
            )
        for path, record in records.items():
            write_json_atomic(path, record, keep_unchanged=True)
        return list(records)

    import mlflow

    try:
        with _store_errors(uri):
            client = _retry(mlflow.MlflowClient, tracking_uri=uri)
            experiment_id = _get_or_create_experiment(client, mlflow_experiment, uri)
            _set_runs_view(client, experiment_id, runs_view(params))
            if store_only:
                records[out_dir / STORE_RECORD] = dict(base, experiment_id=experiment_id)
            for name, config in configs.items():
                path = record_of[name]
                run_id = _reusable_parent(client, path, uri, experiment_id, config_hash(config))
                if run_id is None:
                    run_id = _create_parent(client, experiment_id, name, scale, config)
                records[path] = dict(
                    base,
                    experiment_id=experiment_id,
                    parent_run_id=run_id,
                    experiment=name,
                    data=params.prepared(config["dataset"]),
                )
    except TrackingError as exc:
        if not allow_offline:
            raise
        # The jobs run untracked and journal what they would have logged; 'dblocks track-sync' logs it
        # (creating the experiment and parent runs) once the store is back.
        print(
            f"dblocks: warning: {exc}; going on without tracking (log the runs later with "
            f"'dblocks track-sync --runs-dir {out_dir}')",
            file=sys.stderr,
            flush=True,
        )
        offline = dict(base, experiment_id=None, offline=str(exc), runs_view=runs_view(params))
        records = {out_dir / STORE_RECORD: offline} if store_only else {}
        records.update(
            {
                record_of[name]: dict(
                    offline, parent_run_id=None, experiment=name, data=params.prepared(config["dataset"])
                )
                for name, config in configs.items()
            }
        )
    for path, record in records.items():
        write_json_atomic(path, record, keep_unchanged=True)
    return list(records)
