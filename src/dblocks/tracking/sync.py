"""Logging later: :func:`sync_journals` (``dblocks track-sync``) reads the jobs' journals and logs those of finished
jobs that the store lacks, idempotently (by run key), and creates what ``track-init`` creates in live mode for
journal-mode records (the MLflow experiment, its runs view, the parent runs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dblocks.errors import TrackingError
from dblocks.io import one_line, write_json_atomic
from dblocks.tracking.records import JOURNAL_DIR, JOURNAL_MODE, PARENT_JOB, RUN_KEY_TAG, _create_parent
from dblocks.tracking.store import (
    _get_or_create_experiment,
    _log_inputs,
    _log_metric_batches,
    _log_params,
    _retry,
    _store_errors,
    _upload,
    resolve_uri,
)
from dblocks.tracking.views import _set_runs_view


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
