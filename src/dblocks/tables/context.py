"""What a table builder reads beside the paper's numbers: the params file and the run index, with the
questions it asks of them (which methods an experiment has run, which run places it, how to describe its
setting in a caption)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dblocks.io import flatten
from dblocks.tables.experiments import ExperimentSpec, ParamsInfo
from dblocks.tables.runs import RunIndex, RunInfo, parse_param


@dataclass
class Context:
    params: ParamsInfo
    index: RunIndex

    def device(self, exp: ExperimentSpec) -> str:
        """ "GPU" or "CPU": the experiment's device, else (auto) whether the params file's resources have a GPU."""
        device = str(exp.config.get("device") or "auto").lower()
        if device.startswith("cuda") or device == "gpu":
            return "GPU"
        if device == "cpu":
            return "CPU"
        return "GPU" if int(self.params.resources.get("gpu") or 0) > 0 else "CPU"

    def describe(self, exps: list[ExperimentSpec]) -> str:
        """ "tiny: ViT-tiny on digits, CPU" from the params file."""
        combos = unique(f"{e.config.get('arch')} on {e.config.get('dataset')}" for e in exps)
        devices = unique(self.device(e) for e in exps)
        return f"{self.params.scale}: {' / '.join(combos) or '?'}, {'/'.join(devices) or '?'}"

    def placement(self, exp: ExperimentSpec, run: RunInfo | None) -> tuple[dict, list[str]]:
        """Parameters for placing a run: logged ones over the params file's; notes where they disagree."""
        fallback = flatten(exp.config)
        logged = {k: parse_param(v) for k, v in self.index.logged_params(exp.name, run).items()}
        notes = []
        for key in ("partition", "layer_split", "blocks", "overlap", "arch", "dataset"):
            if key in logged and key in fallback and not same(logged[key], fallback[key]):
                notes.append(
                    f"{exp.name}: the run logged {key}={logged[key]!r} but {self.params.path.name} now "
                    f"has {fallback[key]!r}; placed by the logged value"
                )
        return {**fallback, **logged}, notes

    def caption(self, table_id: str, paper: dict | None, exps: list[ExperimentSpec]) -> list[str]:
        """The paper's setting beside ours: which experiments, at what scale, over how many seeds, which FID."""
        lines = []
        if paper:
            lines.append(f"Paper: {paper['setting']}.")
        lines.append(
            f"Ours ({self.describe(exps)}): experiments {', '.join(e.name for e in exps)}, "
            f"MLflow experiment `{self.params.mlflow_experiment}`."
        )
        if self.params.scale != "paper":
            lines.append(f"{self.params.scale.capitalize()}-scale numbers are not comparable to the paper's.")
        seeded = [
            f"{e.name} ({len(e.replicates) + 1} seeds: {', '.join([e.name, *e.replicates])})"
            for e in exps
            if e.replicates
        ]
        if seeded:
            lines.append(
                f"Ours over seeds: mean ± sample standard deviation over the seeds of {'; '.join(seeded)}; "
                f"one value where a single seed was run."
            )
        # Say which FID ours is: at the tiny scale it is measured in a digits classifier's features
        fid_kinds = unique(
            run.tags["fid_label"]
            for e in exps
            for run in self.index.matching(e.name, "evaluate")
            if run.tags.get("fid_label")
        )
        if fid_kinds:
            lines.append(f"Our FID: {'; '.join(fid_kinds)}.")
        return lines

    def run_methods(self, exp: ExperimentSpec) -> list[str]:
        """The methods the params file gives ``exp``, then any other its evaluations were logged with."""
        return unique([*exp.methods, *self.index.methods(exp.name, "evaluate")])

    def denoiser_method(self, exp: ExperimentSpec) -> str:
        """The block-wise method an ablation reads (blockwise, else the paper's shared-stem mode)."""
        methods = [m for m in self.run_methods(exp) if m != "e2e"]
        return "blockwise" if "blockwise" in methods or not methods else methods[0]

    def baseline_source(self, exp: ExperimentSpec, method: str) -> ExperimentSpec:
        """The experiment whose ``method`` runs fill ``exp``'s row: ``exp`` itself, or for the end-to-end row
        the experiment named by its ``pipeline.baseline`` when it trains no baseline of its own."""
        if method == "e2e" and exp.baseline and "e2e" not in exp.methods and exp.baseline in self.params.experiments:
            return self.params.experiments[exp.baseline]
        return exp


def unique(items: Iterable[str]) -> list[str]:
    """The items in their first order, each once."""
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def same(a: Any, b: Any) -> bool:
    """Whether a logged param and the params file's value agree (a list logged as a tuple, 3 as 3.0)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b
