"""Where our numbers come from: the runs of one MLflow experiment, and which of them count.

Only runs of the params file's *current* configuration count: a run's ``dblocks.config_hash`` tag must equal
its experiment's config hash and an evaluate run's ``dblocks.eval_hash`` the hash of the evaluation settings
the file gives it; of the matching runs the most recent FINISHED one wins. A look-up that finds none says why
(stale runs of other configurations or settings are named and counted, never shown)."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dblocks.tables.experiments import ParamsInfo

TAG = "dblocks."
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri_for(params: ParamsInfo, tracking_uri: str | None = None) -> str | None:
    """MLFLOW_TRACKING_URI, else the argument, else the params file's ``tracking.uri``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or params.tracking_uri


def parse_param(text: Any) -> Any:
    """An MLflow param string back to a value: "[4, 4, 4]" -> [4, 4, 4], "None" -> None, "0.0" -> 0.0."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        lowered = text.strip().lower()
        if lowered in ("null", "none"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        return text.strip()


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str
    start_time: int
    end_time: int
    tags: dict
    params: dict
    metrics: dict

    @classmethod
    def from_mlflow(cls, run) -> RunInfo:
        return cls(
            run.info.run_id,
            run.info.status,
            run.info.start_time or 0,
            run.info.end_time or 0,
            dict(run.data.tags),
            dict(run.data.params),
            dict(run.data.metrics),
        )

    def tag(self, name: str) -> str:
        return str(self.tags.get(TAG + name, "") or "")

    @property
    def order(self) -> tuple:
        return (self.start_time, self.end_time, self.run_id)

    @property
    def short(self) -> str:
        return self.run_id[:8]


class RunIndex:
    """All runs of one MLflow experiment (active, of this scale), with the look-ups the tables need.

    ``hashes`` maps an experiment to the (config hash, evaluation hash) its runs must carry to count
    (:meth:`ParamsInfo.hashes`); look-ups see only those runs, and say why when they find none. An
    experiment it does not name (or a None hash) accepts any run."""

    def __init__(
        self,
        runs: Iterable[RunInfo],
        scale: str | None = None,
        hashes: dict[str, tuple[str | None, str | None]] | None = None,
        seeds: dict[str, list[str]] | None = None,
    ) -> None:
        # exactly this scale: a run without the label (or with another) never fills a cell of this table
        self.runs = [r for r in runs if scale is None or r.tag("scale") == scale]
        self.by_id = {r.run_id: r for r in self.runs}
        self.hashes = dict(hashes or {})
        #: {experiment: the experiments that train it with each seed}: a metric of it aggregates over them
        self.seeds = dict(seeds or {})

    @classmethod
    def from_mlflow(
        cls,
        client,
        experiment_name: str,
        scale: str | None = None,
        hashes: dict[str, tuple[str | None, str | None]] | None = None,
        seeds: dict[str, list[str]] | None = None,
    ) -> RunIndex:
        from mlflow.entities import ViewType

        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return cls([], scale, hashes, seeds)
        runs, token = [], None
        while True:
            page = client.search_runs(
                [experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
            )
            runs.extend(RunInfo.from_mlflow(r) for r in page)
            token = page.token
            if not token:
                break
        return cls(runs, scale, hashes, seeds)

    def is_current(self, run: RunInfo, experiment: str) -> bool:
        """Whether ``run`` is of the configuration (and, for an evaluate run, the evaluation settings) that the
        params file now gives ``experiment``."""
        config_hash, eval_hash = self.hashes.get(experiment, (None, None))
        if config_hash and run.tag("config_hash") != config_hash:
            return False
        return not (eval_hash and run.tag("job") == "evaluate" and run.tag("eval_hash") != eval_hash)

    def matching(
        self, experiment: str, job: str, method: str | None = None, block: str | None = None, current: bool = True
    ) -> list[RunInfo]:
        """The runs of ``experiment`` of this job (method, block), newest first; with ``current`` (the default)
        only those of the experiment's current configuration and evaluation settings."""
        out = [
            r
            for r in self.runs
            if r.tag("experiment") == experiment
            and r.tag("job") == job
            and (method is None or r.tag("method") == method)
            and (block is None or r.tag("block") == block)
            and (not current or self.is_current(r, experiment))
        ]
        return sorted(out, key=lambda r: r.order, reverse=True)

    def latest(
        self, experiment: str, job: str, method: str | None = None, block: str | None = None
    ) -> tuple[RunInfo | None, str]:
        """The most recent FINISHED run of the current configuration, or None and why not."""
        current = self.matching(experiment, job, method, block)
        for run in current:
            if run.status == "FINISHED":
                return run, ""
        if current:
            return None, (
                f"no FINISHED {job} run of this configuration (latest is {current[0].status}, run {current[0].short})"
            )
        others = self.matching(experiment, job, method, block, current=False)
        if not others:
            return None, f"no {job} run logged"
        config_hash, eval_hash = self.hashes.get(experiment, (None, None))
        same_config = [r for r in others if not config_hash or r.tag("config_hash") == config_hash]
        if same_config:  # evaluate runs of this configuration, made with other evaluation settings
            latest = same_config[0]
            recorded = (
                f"eval_hash {latest.tag('eval_hash')}"
                if latest.tag("eval_hash")
                else "no eval_hash: logged before evaluation settings were recorded; rerun the evaluation"
            )
            return None, (
                f"no {job} run with this file's evaluation settings (eval_hash {eval_hash}); "
                f"{runs_text(len(same_config))} of this configuration with other evaluation settings "
                f"{exist_text(len(same_config))} (latest: run {latest.short}, {recorded})"
            )
        return None, (
            f"no {job} run of this configuration (config_hash {config_hash}); {runs_text(len(others))} of "
            f"other configurations {exist_text(len(others))} (latest: run {others[0].short}, "
            f"config_hash {others[0].tag('config_hash') or 'none'})"
        )

    def stale(self) -> int:
        """How many runs of the experiments in :attr:`hashes` are of other configurations or settings."""
        return sum(
            1
            for r in self.runs
            if r.tag("experiment") in self.hashes
            and r.tag("job") != "parent"
            and not self.is_current(r, r.tag("experiment"))
        )

    def methods(self, experiment: str, job: str) -> list[str]:
        return sorted({r.tag("method") for r in self.matching(experiment, job) if r.tag("method")})

    def blocks(self, experiment: str, method: str = "blockwise") -> list[str]:
        found = {r.tag("block") for r in self.matching(experiment, "train", method) if r.tag("block")}
        return sorted(found, key=lambda b: int(b) if b.isdigit() else 10**6)

    def logged_params(self, experiment: str, run: RunInfo | None = None) -> dict:
        """The params a run was made with: its own, its parent's, else its experiment's latest train or
        parent run's of the current configuration (finished ones first)."""
        if run is not None and run.params:
            return run.params
        parent = self.by_id.get(str(run.tags.get(PARENT_TAG, ""))) if run is not None else None
        if parent is not None and parent.params:
            return parent.params
        for job in ("train", "parent"):
            candidates = sorted(
                self.matching(experiment, job), key=lambda r: (r.status == "FINISHED", r.order), reverse=True
            )
            for candidate in candidates:
                if candidate.params:
                    return candidate.params
        return {}


def runs_text(n: int) -> str:
    """ "1 run", "2 runs"."""
    return f"{n} run{'s' if n != 1 else ''}"


def exist_text(n: int) -> str:
    """The verb after :func:`runs_text`: "1 run exists", "2 runs exist"."""
    return "exists" if n == 1 else "exist"
