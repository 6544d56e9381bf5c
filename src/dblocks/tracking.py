"""MLflow tracking for the pipeline: one parent run per experiment, one child run per job.

``init_runs`` runs once, before the parallel jobs fan out: it creates the MLflow experiment and one
parent run per experiment of a params file, and writes ``<out_dir>/<name>.json`` naming them. Each job
(``dblocks train-block --track <name>.json`` ...) then opens a :class:`JobRun`, a child run of that
parent, and logs its config, loss curve, timings and checkpoint hashes.

Tracking never costs a job its results: if the backend fails inside a ``JobRun`` (server down,
database locked for too long, a read-only store), the job prints one warning line and goes on
untracked. Every job also writes a journal of what it logged (``<out_dir>/journal/<job>.json``: tags,
params, metrics with their steps and times, artifact paths, a unique ``dblocks.run_key``), and
:func:`sync_journals` (``dblocks track-sync``, run by the pipeline before the tables) logs the
journals of finished jobs that the store does not hold yet. The run key makes that idempotent: a run
already in the store is never logged twice, and a run cut short by an outage is replaced, not
duplicated. Several processes may log to one SQLite file at once; "database is locked" is retried
with a short backoff. ``mlflow`` is imported lazily, so importing this module is cheap.

``tracking.mode: journal`` in the params file makes the journal the only log while the pipeline runs:
``track-init`` writes its records (marked ``"mode": "journal"``, naming no run) without importing MLflow or
touching the store, the jobs write their journals without importing MLflow (seconds saved per job, which
matters when jobs take seconds), and ``track-sync`` logs everything in one process, creating the MLflow
experiment and the parent runs as ``track-init`` does in the default ``live`` mode. The store then holds
the same runs, tags, params and metrics as after a live run, except for times and each child's
``dblocks.logged_later`` tag.

What a user browsing the store sees: the MLflow experiment is of the classic kind (tag
``mlflow.experimentKind`` = ``custom_model_development``), which MLflow 3 UIs that read the tag open on the
runs table rather than the GenAI traces overview (MLflow 3.17's UI decides by its own "GenAI / Model
training" switch instead, remembered per browser: ``#/experiments/<id>?workflowType=machine_learning``
opens the runs table). Each parent run carries its experiment's headline results per method
(``<method>.<metric>``, e.g. ``blockwise.accuracy``, ``e2e.fid_test``), logged by the evaluate jobs (or by
``track-sync`` for journaled ones), so the runs table shows results at a glance. Training and evaluation
runs list the prepared dataset splits they read as MLflow dataset inputs (name ``<dataset>-<split>``,
digest = the first 36 hex digits of the split's sha256, the full sha256 and size in its profile, source =
the prepared file), read from each split's JSON record, never by hashing the data; their parent runs list
them too, so that every row of the runs table names its data."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import dblocks
from dblocks.checkpoint import sidecar_path
from dblocks.errors import ConfigError, TrackingError
from dblocks.io import flatten, one_line, write_json_atomic

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_JOB = "parent"
JOURNAL_DIR = "journal"
RUN_KEY_TAG = "dblocks.run_key"
EVAL_HASH_TAG = "dblocks.eval_hash"
#: MLflow 3's experiment kind: "custom_model_development" is classic ML (runs), not GenAI (traces). MLflow UIs
#: that read it open such an experiment on its runs table; 3.17's UI follows its own GenAI / Model training
#: switch instead (see runs_view_url)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: the evaluation metrics a parent run carries per method, as ``<method>.<metric>`` (when the evaluation made them)
HEADLINE_METRICS = (
    "accuracy",
    "fid",
    "fid_train",
    "fid_test",
    "bpc",
    "mauve_reference",
    "mauve_minilm",
    "mauve_ngram",
    "mauve_gpt2_large",
    "gen_ppl_reference",
    "gen_ppl_llama2",
    "gen_ppl_gpt2xl",
    "next_token_bits",
)
#: MLflow's limit on a dataset digest
_MAX_DIGEST = 36
#: the saved runs-table view (an experiment tag the MLflow UI reads): the Dataset column and the parents'
#: headline metrics; open it with :func:`runs_view_url`
RUNS_VIEW_KEY = "dblocks"
_SHARED_VIEW_TAG = "mlflow.sharedViewState."
#: MLflow's limits per log_batch request
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
_LOCKED = ("database is locked", "database table is locked", "sqlite_busy")


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


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:_MAX_PARAM_VALUE]) for k, v in sorted(params.items())]
    for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
        _retry(client.log_batch, run_id, params=chunk, synchronous=True)


def headline_metrics(method: str | None, metrics: dict[str, Any]) -> dict[str, float]:
    """An evaluation's headline numbers as its parent run carries them: ``{"<method>.<metric>": value}`` for
    each of :data:`HEADLINE_METRICS` among ``metrics`` (child and parent share the metric names)."""
    return {
        f"{method or 'model'}.{k}": float(metrics[k])
        for k in HEADLINE_METRICS
        if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
    }


def dataset_input(name: str, split: str, sha256: str, source: str | Path, context: str, **profile) -> dict:
    """One MLflow dataset input as journals keep it: name ``<name>-<split>``, digest = the first 36 hex digits
    of ``sha256`` (MLflow's limit), a profile with the whole sha256, the split and ``profile`` (its size), and
    the file as a local source."""
    return {
        "name": f"{name}-{split}",
        "digest": sha256[:_MAX_DIGEST],
        "source_type": "local",
        "source": json.dumps({"uri": str(Path(source).resolve())}),
        "profile": json.dumps({"sha256": sha256, "split": split, **profile}, sort_keys=True),
        "tags": {"mlflow.data.context": context, "dblocks.split": split},
    }


def prepared_input(directory: str | Path, split: str, context: str) -> dict | None:
    """The dataset input of a prepared split (``<directory>/<split>.safetensors``) from its JSON record, which
    holds the sha256 (the tensors are neither read nor hashed); None without a readable record."""
    path = Path(directory) / f"{split}.safetensors"
    try:
        meta = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(meta, dict)
        or meta.get("kind") not in ("dataset", "text-dataset")
        or not isinstance(meta.get("sha256"), str)
    ):
        return None
    size = {"num_examples": meta["examples"]} if "examples" in meta else {"tokens": meta.get("tokens")}
    return dataset_input(
        str(meta.get("name", "data")), str(meta.get("split", split)), meta["sha256"], path, context, **size
    )


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


_DUPLICATE = ("unique constraint", "integrityerror", "duplicate key", "already exists")


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


# ------------------------------------------------------------------------------------ parent runs


def headline_metric_names(task: str, settings: dict) -> list[str]:
    """The :data:`HEADLINE_METRICS` that an evaluation of a ``task`` model with these evaluation settings
    (:func:`dblocks.params.evaluation_settings`) logs."""
    if task == "classification":
        return ["accuracy"]
    if task == "generation":
        return ["fid_train", "fid_test"]  # fid is fid_test when there are both
    if task == "masked_text":
        return ["bpc"]
    features, judged = set(settings.get("mauve_features") or []), settings.get("judge") is not None
    names = [
        ("mauve_reference", "reference-lm" in features and judged),
        ("mauve_minilm", "minilm" in features),
        ("mauve_ngram", "ngram" in features),
        ("mauve_gpt2_large", "gpt2-large" in features),
        ("gen_ppl_reference", judged),
        ("gen_ppl_llama2", "llama2" in (settings.get("hf_judges") or [])),
        ("gen_ppl_gpt2xl", "gpt2-xl" in (settings.get("hf_judges") or [])),
        ("next_token_bits", True),
    ]
    return [name for name, logged in names if logged]


def runs_view(params) -> dict:
    """The runs-table view of a params file's MLflow experiment (MLflow's shared view state): the Dataset
    column, then every ``<method>.<metric>`` that its parent runs will carry."""
    columns = []
    for exp, config in params.experiments.items():
        for metric in headline_metric_names(config["task"], params.evaluation_settings(exp)):
            columns += [f"{method}.{metric}" for method in params.methods(exp)]
    methods = ["blockwise", "paper", "e2e"]
    ordered = sorted(
        dict.fromkeys(columns), key=lambda c: (methods.index(c.split(".")[0]) if c.split(".")[0] in methods else 9, c)
    )
    return {"selectedColumns": ["attributes.`Dataset`", *(f"metrics.`{c}`" for c in ordered)]}


def runs_view_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """Where the MLflow UI (``dblocks ui``) shows the runs table with :func:`runs_view` (MLflow 3.17's UI
    opens an experiment on its GenAI overview unless asked for the model-training view)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}"


def _set_runs_view(client, experiment_id: str, view: dict) -> None:
    value = json.dumps(view)
    exp = _retry(client.get_experiment, experiment_id)
    if (exp.tags or {}).get(_SHARED_VIEW_TAG + RUNS_VIEW_KEY) != value:
        _retry(client.set_experiment_tag, experiment_id, _SHARED_VIEW_TAG + RUNS_VIEW_KEY, value)


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


STORE_RECORD = "store.json"
#: ``tracking.mode`` in which jobs only write their journals (see the module's docstring)
JOURNAL_MODE = "journal"


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


# -------------------------------------------------------------------------------------- job runs


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".") or "run"


def _now_ms() -> int:
    return int(time.time() * 1000)


def job_run(track: Path | None, job: str, method: str | None, block: int | None, config: dict):
    """A :class:`JobRun` child run when ``track`` (a run JSON of track-init) is given, else a context that
    yields None."""
    if track is None:
        return contextlib.nullcontext(None)
    return JobRun(track, job, method, block, config)


class JobRun:
    """A child run of an experiment's parent run, for one job process (a context manager).

    ``JobRun(run_json, "train", "blockwise", 2, config)`` -> run "<exp> block 2" tagged with the job,
    method, block, git commit, config hash and paper tables, the flattened config as params. Every
    method is a no-op on the store once tracking has failed (one warning line on stderr); exceptions of
    the job itself propagate and mark the run FAILED. Whatever happens to the store, everything logged
    is also kept in the job's journal (written at exit) for :func:`sync_journals`. With a journal-mode record
    (``track-init`` of a params file with ``tracking.mode: journal``) the journal is all it writes: it never
    imports MLflow and prints nothing (an outage it is not)."""

    def __init__(
        self,
        run_json_path: str | Path,
        job: str,
        method: str | None,
        block: int | None,
        config: dict,
        tables: list[str] | None = None,
        *,
        flush_every: int = 50,
        flush_seconds: float = 15.0,
    ):
        self.path = Path(run_json_path)
        self.job, self.method, self.block = job, method or "", block
        self.config, self.tables = config, tables
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.client = None
        self.run_id: str | None = None
        self.enabled = True
        self.warning: str | None = None
        self.journal: dict = {}
        self.journal_path: Path | None = None
        self._buffer: list = []
        self._last_flush = time.monotonic()

    # -- internals
    def _disable(self, what: str, exc: BaseException) -> None:
        self.enabled = False
        self._buffer.clear()
        self.warning = (
            f"dblocks: warning: MLflow tracking off for this job ({what} failed: {one_line(exc)}); "
            f"the job goes on, writes its results and keeps its log in {self.journal_path} for "
            f"'dblocks track-sync'"
        )
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
        if self.block is not None:  # a block job; a named part (NoProp-DT's head) with its method
            return (
                f"{experiment} block {self.block}"
                if str(self.block).isdigit()
                else f"{experiment} {self.method} {self.block}"
            )
        return f"{experiment} {self.method or self.job}"

    def _open_journal(self) -> None:
        """Everything a run needs, decided before the store is touched (so an outage changes nothing)."""
        try:
            record = json.loads(self.path.read_text())
            record = record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            record = {}
        experiment = self.config.get("name") or record.get("experiment") or ""
        key = uuid.uuid4().hex
        tags = run_tags(
            experiment=experiment,
            scale=record.get("scale", ""),
            method=self.method,
            block=self.block,
            job=self.job,
            config=self.config,
            tables=self.tables,
        )
        tags.update(
            {
                "mlflow.parentRunId": record.get("parent_run_id") or "",
                RUN_KEY_TAG: key,
                "mlflow.source.name": f"dblocks {self.job}",
                "mlflow.source.type": "LOCAL",
                "mlflow.user": _user(),
            }
        )
        self.journal = {
            "format": 1,
            "run_key": key,
            "record": record,
            "run_name": self._run_name(experiment),
            "tags": tags,
            "params": flatten(self.config, as_strings=True),
            "config": self.config,
            "metrics": [],
            "artifacts": [],
            "inputs": [],
            "parent_metrics": [],
            "start_time": _now_ms(),
            "end_time": None,
            "status": "RUNNING",
            "run_id": None,
            "synced": False,
            "parent_synced": False,
        }
        job = ".".join(str(x) for x in (experiment, self.job, self.method or "-", self.block or "-"))
        self.journal_path = self.path.parent / JOURNAL_DIR / f"{_safe_name(job)}.json"

    def _start(self) -> None:
        record = self.journal["record"]
        uri, experiment_id, parent = (
            record.get("tracking_uri"),
            record.get("experiment_id"),
            record.get("parent_run_id"),
        )
        if not (uri and experiment_id and parent):
            raise ValueError(f"{self.path} names no parent run; run 'dblocks track-init' first")
        db = sqlite_path(uri)
        if db is not None and not db.is_file():  # MLflow would create an empty store here, far from the parent
            raise FileNotFoundError(
                f"{db}: no such tracking database (from {self.path}); run "
                f"'dblocks track-init' first, from the same directory"
            )
        import mlflow

        self.client = _retry(mlflow.MlflowClient, tracking_uri=uri)
        run = _retry(
            self.client.create_run,
            experiment_id,
            start_time=self.journal["start_time"],
            tags=self.journal["tags"],
            run_name=self.journal["run_name"],
        )
        self.run_id = run.info.run_id
        _log_params(self.client, self.run_id, self.journal["params"])

    def _close_journal(self, status: str) -> None:
        self.journal.update(
            status=status, end_time=_now_ms(), run_id=self.run_id, synced=bool(self.enabled and self.run_id is not None)
        )
        try:
            write_json_atomic(self.journal_path, self.journal, keep_unchanged=True)
        except OSError as exc:  # the job's own outputs matter more than its log
            print(
                f"dblocks: warning: could not write the tracking journal {self.journal_path}: {one_line(exc)}",
                file=sys.stderr,
                flush=True,
            )

    # -- context manager
    def __enter__(self) -> JobRun:
        self._open_journal()
        if self.journal["record"].get("mode") == JOURNAL_MODE:
            self.enabled = False  # journal only, by choice: track-sync logs it
        else:
            try:
                self._start()
            except Exception as exc:
                self._disable("starting the run", exc)
        data = self.journal["record"].get("data")
        if self.job == "train" and data:  # the pipeline's training jobs read the train split named by the record
            item = prepared_input(data, "train", "training")
            if item is not None and item["name"] == f"{self.config.get('dataset')}-train":
                self.log_inputs([item])
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
        self._close_journal(status)
        return False  # the job's own exception, if any, propagates

    # -- logging
    def _record(self, key: str, value: float, step: int) -> None:
        metric = [key, float(value), _now_ms(), int(step)]  # an MLflow Metric's fields, built when sent
        self.journal["metrics"].append(metric)
        if self.enabled:
            self._buffer.append(metric)

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """Record ``train_loss`` and ``lr`` at ``step``; sent every ``flush_every`` calls (and at exit)."""
        self._record("train_loss", loss, step)
        self._record("lr", lr, step)
        if len(self._buffer) >= 2 * self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or self.run_id is None:
            self._buffer.clear()
            return
        from mlflow.entities import Metric

        pending, self._buffer = [Metric(*m) for m in self._buffer], []
        _log_metric_batches(
            self.client,
            self.run_id,
            pending,
            lambda chunk: self._call(
                "logging metrics", self.client.log_batch, self.run_id, metrics=chunk, synchronous=True
            ),
        )
        self._last_flush = time.monotonic()

    def log_metrics(self, metrics: dict[str, float | None], step: int = 0) -> None:
        """Log ``metrics`` (None values are skipped) at ``step``."""
        for key, value in metrics.items():
            if value is not None:
                self._record(key, value, step)
        self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        tags = {k: "" if v is None else str(v) for k, v in tags.items()}
        self.journal["tags"].update(tags)
        if self.enabled and self.run_id is not None:
            self._call("setting tags", _log_tags, self.client, self.run_id, tags)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log more params (values as strings, others as JSON), e.g. an evaluation's settings."""
        flat = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        self.journal["params"].update(flat)
        if self.enabled and self.run_id is not None:
            self._call("logging params", _log_params, self.client, self.run_id, flat)

    def _parent(self) -> str | None:
        """The parent run to update, while tracking works."""
        return self.journal["record"].get("parent_run_id") if self.enabled and self.run_id is not None else None

    def log_inputs(self, inputs: list[dict]) -> None:
        """Log dataset inputs (:func:`dataset_input`, :func:`prepared_input`; None entries are skipped), on the
        parent run too, so that the experiment's row of the runs table names its data (MLflow keeps one
        input per dataset and run, however many jobs log it)."""
        inputs = [i for i in inputs if i]
        self.journal["inputs"].extend(inputs)
        if inputs and self.enabled and self.run_id is not None:
            self._call("logging dataset inputs", _log_inputs, self.client, self.run_id, inputs)
        parent = self._parent()
        if inputs and parent:
            self._call("logging dataset inputs to the parent run", _log_inputs, self.client, parent, inputs)
            self.journal["parent_synced"] = self.enabled

    def log_dataset(self, directory: str | Path, split: str, context: str) -> dict | None:
        """Log a prepared split as a dataset input (from its JSON record); returns it, None without a record."""
        item = prepared_input(directory, split, context)
        self.log_inputs([item])
        return item

    def log_parent_metrics(self, metrics: dict[str, float | None]) -> None:
        """Log ``metrics`` (None values skipped) to this job's parent run as well: the experiment's results
        at a glance (:func:`headline_metrics`). Journaled, so that ``track-sync`` logs them with the run."""
        items = [[k, float(v), _now_ms(), 0] for k, v in metrics.items() if v is not None]
        self.journal["parent_metrics"].extend(items)
        parent = self._parent()
        if not items or not parent:
            return
        from mlflow.entities import Metric

        self._call(
            "logging metrics to the parent run",
            _log_metric_batches,
            self.client,
            parent,
            [Metric(*item) for item in items],
        )
        self.journal["parent_synced"] = self.enabled

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, name: str | None = None) -> None:
        """Log the file ``path`` under ``artifact_path``, as ``name`` if given (the tables look sample grids
        up by name)."""
        self.journal["artifacts"].append(
            {"path": str(Path(path).resolve()), "artifact_path": artifact_path, "name": name}
        )
        if self.enabled and self.run_id is not None:
            self._call("logging an artifact", _upload, self.client, self.run_id, Path(path), artifact_path, name)


def _log_metric_batches(client, run_id: str, metrics: list, send: Callable | None = None) -> None:
    send = send or (lambda chunk: _retry(client.log_batch, run_id, metrics=chunk, synchronous=True))
    for chunk in _chunks(metrics, _MAX_METRICS_PER_BATCH):
        send(chunk)


def _log_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], _MAX_PARAMS_PER_BATCH):
        _retry(client.log_batch, run_id, tags=chunk, synchronous=True)


def _upload(client, run_id: str, path: Path, artifact_path: str | None, name: str | None) -> None:
    if name is None or name == path.name:
        _retry(client.log_artifact, run_id, str(path), artifact_path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path, Path(tmp) / name)
        _retry(client.log_artifact, run_id, str(Path(tmp) / name), artifact_path)


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return ""


# ------------------------------------------------------------------------------- logging later


@dataclasses.dataclass
class SyncReport:
    logged: list[str] = dataclasses.field(default_factory=list)  # journals logged now
    present: list[str] = dataclasses.field(default_factory=list)  # already in the store
    replaced: list[str] = dataclasses.field(default_factory=list)  # incomplete copies deleted and relogged
    unfinished: list[str] = dataclasses.field(default_factory=list)  # jobs that failed: nothing to log
    missing_artifacts: list[str] = dataclasses.field(default_factory=list)


def read_journals(runs_dir: str | Path) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted((Path(runs_dir) / JOURNAL_DIR).glob("*.json")):
        try:
            journal = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TrackingError(f"{path}: unreadable tracking journal ({one_line(exc)})") from None
        if not isinstance(journal, dict) or journal.get("format") != 1 or not journal.get("run_key"):
            raise TrackingError(f"{path}: not a dblocks tracking journal (format 1 with a run_key)")
        out.append((path, journal))
    return out


def _runs_by_key(client, experiment_id: str) -> dict[str, Any]:
    """Every live run of the experiment that carries a run key, by key."""
    from mlflow.entities import ViewType

    found, token = {}, None
    while True:
        page = _retry(
            client.search_runs, [experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        for run in page:
            key = run.data.tags.get(RUN_KEY_TAG)
            if key:
                found[key] = run
        token = page.token
        if not token:
            return found


def _find_parent(client, experiment_id: str, journal: dict) -> str:
    """The journal's parent run if the store has it live, else the experiment's newest live parent run
    for the same config, else a new parent run (the store was down when the pipeline set it up, or the
    pipeline runs in journal mode). The config is the one its record holds (journal mode: the params file's,
    as track-init gives a parent run in live mode), else the job's."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    from dblocks.config import config_hash

    record, tags = journal["record"], journal["tags"]
    if isinstance(record.get("config"), dict):
        config = record["config"]
        chash = config_hash(config)
    else:
        config, chash = journal["config"], tags["dblocks.config_hash"]
    parent = record.get("parent_run_id")
    if parent:
        try:
            run = _retry(client.get_run, parent)
            if run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id:
                return parent
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    name = record.get("experiment") or tags["dblocks.experiment"]
    query = (
        f"tags.`dblocks.experiment` = '{name}' and tags.`dblocks.job` = '{PARENT_JOB}' and "
        f"tags.`dblocks.config_hash` = '{chash}'"
    )
    runs = _retry(
        client.search_runs,
        [experiment_id],
        query,
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if runs:
        return runs[0].info.run_id
    return _create_parent(client, experiment_id, name, record.get("scale") or tags.get("dblocks.scale", ""), config)


def _journal_mode_records(runs_dir: str | Path) -> list[dict]:
    """The journal-mode records of ``track-init`` in ``runs_dir``: store.json and, per experiment, the newest
    record (the older ones are of configs the experiment had before: no parent run is wanted for those)."""
    newest: dict[str, dict] = {}
    for path in sorted(Path(runs_dir).glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("mode") == JOURNAL_MODE:
            newest[record.get("experiment") or path.name] = record
    return list(newest.values())


def _log_journal(client, experiment_id: str, journal: dict, report: SyncReport) -> str:
    from mlflow.entities import Metric

    tags = dict(
        journal["tags"],
        **{"mlflow.parentRunId": _find_parent(client, experiment_id, journal), "dblocks.logged_later": "true"},
    )
    run = _retry(
        client.create_run, experiment_id, start_time=journal["start_time"], tags=tags, run_name=journal["run_name"]
    )
    run_id = run.info.run_id
    _log_params(client, run_id, journal["params"])
    _log_metric_batches(client, run_id, [Metric(k, v, t, s) for k, v, t, s in journal["metrics"]])
    if journal.get("inputs"):
        _log_inputs(client, run_id, journal["inputs"])
    for item in journal["artifacts"]:
        path = Path(item["path"])
        if path.is_file():
            _upload(client, run_id, path, item["artifact_path"], item["name"])
        else:
            report.missing_artifacts.append(str(path))
    # FINISHED last: a sync cut short leaves a RUNNING run, which the next sync replaces
    _retry(client.set_terminated, run_id, journal["status"], journal["end_time"])
    return run_id


def _sync_parent(client, run_id: str, journal: dict) -> bool:
    """Log a journal's parent metrics and dataset inputs to the parent of its stored run ``run_id``; False
    if that parent is gone."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    parent = _retry(client.get_run, run_id).data.tags.get("mlflow.parentRunId")
    if not parent:
        return False
    try:
        if _retry(client.get_run, parent).info.lifecycle_stage != "active":
            return False
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    _log_metric_batches(client, parent, [Metric(k, v, t, s) for k, v, t, s in journal.get("parent_metrics") or []])
    if journal.get("inputs"):
        _log_inputs(client, parent, journal["inputs"])
    return True


def _store_of(record: dict, uri: str | None) -> tuple[str, str]:
    """(tracking URI, MLflow experiment) that a run record's runs are logged to (``uri`` overrides its URI)."""
    return resolve_uri(uri or record.get("tracking_uri")), record.get("mlflow_experiment") or "diffusion-blocks"


def sync_journals(runs_dir: str | Path, uri: str | None = None) -> SyncReport:
    """Log every finished job's journal under ``runs_dir`` that the tracking store lacks (idempotent).

    The store is the one each journal was written for, unless ``uri`` (or MLFLOW_TRACKING_URI) names
    another, e.g. a shared server that results are copied to. Journal-mode records of ``track-init`` in
    ``runs_dir`` get what live mode's track-init makes, whether or not a job has journaled yet: the MLflow
    experiment, its runs view and each experiment's parent run."""
    import mlflow

    report = SyncReport()
    journals = read_journals(runs_dir)
    groups: dict[tuple[str, str], list[tuple[Path, dict]]] = {}
    for path, journal in journals:
        if journal.get("status") != "FINISHED":
            report.unfinished.append(str(path))
            continue
        groups.setdefault(_store_of(journal.get("record") or {}, uri), []).append((path, journal))
    planned: dict[tuple[str, str], list[dict]] = {}
    for record in _journal_mode_records(runs_dir):
        planned.setdefault(_store_of(record, uri), []).append(record)
    for target, experiment_name in dict.fromkeys([*planned, *groups]):
        items, records = groups.get((target, experiment_name), []), planned.get((target, experiment_name), [])
        with _store_errors(target):
            client = _retry(mlflow.MlflowClient, tracking_uri=target)
            experiment_id = _get_or_create_experiment(client, experiment_name, target)
            views = [
                v
                for v in [(j.get("record") or {}).get("runs_view") for _, j in items]
                + [r.get("runs_view") for r in records]
                if isinstance(v, dict)
            ]  # the records' are the newest
            if views:  # track-init did not save it: the store was down, or the pipeline runs in journal mode
                _set_runs_view(client, experiment_id, views[-1])
            for record in records:  # the parent runs that track-init makes in live mode
                if record.get("experiment") and isinstance(record.get("config"), dict):
                    _find_parent(client, experiment_id, {"record": record, "tags": {}, "config": record["config"]})
            existing = _runs_by_key(client, experiment_id)
            for path, journal in items:
                run = existing.get(journal["run_key"])
                if run is not None and run.info.status == journal["status"]:
                    report.present.append(str(path))
                    run_id = run.info.run_id
                else:
                    if run is not None:  # cut short by an outage: replace it rather than add a twin
                        _retry(client.delete_run, run.info.run_id)
                        report.replaced.append(str(path))
                    run_id = _log_journal(client, experiment_id, journal, report)
                    report.logged.append(str(path))
                    journal = dict(journal, parent_synced=False)  # a new run: update its parent
                parent_synced = bool(journal.get("parent_synced"))
                if (journal.get("parent_metrics") or journal.get("inputs")) and not parent_synced:
                    parent_synced = _sync_parent(client, run_id, journal)
                if (
                    not journal.get("synced")
                    or journal.get("run_id") != run_id
                    or parent_synced != bool(journal.get("parent_synced"))
                ):
                    write_json_atomic(
                        path,
                        dict(journal, synced=True, run_id=run_id, parent_synced=parent_synced),
                        keep_unchanged=True,
                    )
    return report
