"""What the tables need of a params file: its scale, its MLflow experiment, and its experiments with the
tables they feed, the methods they run and the hashes their runs must carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dblocks.paper import table_sort_key


@dataclass
class ExperimentSpec:
    """One experiment of the params file, resolved and validated by the params model."""

    name: str
    config: dict
    tables: list[str]
    methods: list[str]
    baseline: str | None = None  # the experiment whose end-to-end run is this one's (pipeline.baseline)
    config_hash: str | None = None  # what its runs' dblocks.config_hash must be (None: any)
    eval_hash: str | None = None  # what its evaluate runs' dblocks.eval_hash must be (None: any)
    #: the experiments that are this one with other seeds (pipeline.seeds), each with its (config, eval) hashes;
    #: its cells aggregate over them and itself
    replicates: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return str(self.config.get("task", ""))


@dataclass
class ParamsInfo:
    path: Path
    scale: str
    tracking_uri: str | None
    mlflow_experiment: str
    resources: dict
    experiments: dict[str, ExperimentSpec]

    def feeders(self, table_id: str) -> list[ExperimentSpec]:
        return [e for e in self.experiments.values() if table_id in e.tables]

    def table_ids(self) -> list[str]:
        ids = {t for e in self.experiments.values() for t in e.tables}
        return sorted(ids, key=table_sort_key)

    def hashes(self) -> dict[str, tuple[str | None, str | None]]:
        """{experiment: (config hash, evaluation hash)} that its runs must carry to be this file's (the
        experiments that repeat another with other seeds included)."""
        return {
            name: hashes
            for e in self.experiments.values()
            for name, hashes in {e.name: (e.config_hash, e.eval_hash), **e.replicates}.items()
        }

    def seeds(self) -> dict[str, list[str]]:
        """{experiment: itself and its repeats with other seeds}, for the experiments that have repeats."""
        return {name: [name, *e.replicates] for name, e in self.experiments.items() if e.replicates}


def read_params(path: str | Path) -> ParamsInfo:
    """What the tables need of a params file, read through the one params model (dblocks.params): the same
    validation, defaults and resolved experiments that the jobs saw."""
    from dblocks.params import Params

    params = Params.load(path)
    experiments = {
        name: ExperimentSpec(
            name=name,
            config=config,
            tables=params.tables(name),
            methods=params.methods(name),
            baseline=params.baseline(name),
            config_hash=params.hash(name),
            eval_hash=params.eval_hash(name),
            replicates={r: (params.hash(r), params.eval_hash(r)) for r in params.replicates(name) if r != name},
        )
        for name, config in params.experiments.items()
        if params.replicate_of(name) == name
    }
    return ParamsInfo(
        path=params.path,
        scale=params.scale,
        tracking_uri=params.tracking_uri,
        mlflow_experiment=params.mlflow_experiment,
        resources=params.resources,
        experiments=experiments,
    )
