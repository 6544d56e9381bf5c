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
them too, so that every row of the runs table names its data.

Modules: ``store`` (URIs, retries on a locked SQLite store, store errors, the MLflow experiment, batched
logging), ``views`` (headline metrics and the runs-table view), ``records`` (run tags, ``track-init`` records,
parent runs, :func:`init_runs`), ``job_run`` (:class:`JobRun`, its journal, dataset inputs) and ``sync``
(reading journals, :func:`sync_journals`)."""

from dblocks.tracking.job_run import JobRun, dataset_input, job_run, prepared_input
from dblocks.tracking.records import (
    EVAL_HASH_TAG,
    JOURNAL_DIR,
    JOURNAL_MODE,
    PARENT_JOB,
    RUN_KEY_TAG,
    STORE_RECORD,
    git_commit,
    init_runs,
    record_data,
    record_value,
    run_tags,
)
from dblocks.tracking.store import DEFAULT_URI, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, _retry, resolve_uri, sqlite_path
from dblocks.tracking.sync import SyncReport, read_journals, sync_journals
from dblocks.tracking.views import (
    HEADLINE_METRICS,
    RUNS_VIEW_KEY,
    headline_metric_names,
    headline_metrics,
    runs_view,
    runs_view_url,
)

__all__ = [
    "DEFAULT_URI",
    "EVAL_HASH_TAG",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "HEADLINE_METRICS",
    "JOURNAL_DIR",
    "JOURNAL_MODE",
    "JobRun",
    "PARENT_JOB",
    "RUNS_VIEW_KEY",
    "RUN_KEY_TAG",
    "STORE_RECORD",
    "SyncReport",
    "_retry",
    "dataset_input",
    "git_commit",
    "headline_metric_names",
    "headline_metrics",
    "init_runs",
    "job_run",
    "prepared_input",
    "read_journals",
    "record_data",
    "record_value",
    "resolve_uri",
    "run_tags",
    "runs_view",
    "runs_view_url",
    "sqlite_path",
    "sync_journals",
]
