"""Per-job child runs: :class:`JobRun` (and :func:`job_run`) logs a job's config, metrics, dataset inputs and
artifacts to a child run of its experiment's parent run, and keeps all of it in the job's journal
(``<out_dir>/journal/<job>.json``), which survives store outages and which :func:`~dblocks.tracking.sync.sync_journals`
logs later. A journal-mode job never imports MLflow."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dblocks.checkpoint import sidecar_path
from dblocks.io import flatten, one_line, write_json_atomic
from dblocks.tracking.records import JOURNAL_DIR, JOURNAL_MODE, RUN_KEY_TAG, run_tags
from dblocks.tracking.store import (
    _log_inputs,
    _log_metric_batches,
    _log_params,
    _log_tags,
    _retry,
    _upload,
    sqlite_path,
)

#: MLflow's limit on a dataset digest
_MAX_DIGEST = 36


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


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return ""
