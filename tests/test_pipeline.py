"""The Snakemake pipeline: params validation, the DAG at both scales, DVC agreement, a real small run
that ends in tables read from MLflow, and rerunning exactly one block."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dblocks.checkpoint import load_metadata
from dblocks.config import LOCAL_METHODS, SHARDED_DATASETS
from dblocks.dvcgen import generate, parse_dry_run, snakemake_jobs
from dblocks.errors import ConfigError
from dblocks.pipeline import Pipeline

pytestmark = pytest.mark.slow  # whole pipelines: `pytest -m 'not slow'` leaves them out

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = dict(
    os.environ,
    PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    HF_DATASETS_OFFLINE="1",
    HF_HUB_OFFLINE="1",
    MLFLOW_TRACKING_URI="",
)
ENV.pop("MLFLOW_TRACKING_URI")


def snakemake(*args, cwd=REPO, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def job(rule: str, **wildcards) -> tuple:
    return rule, tuple(sorted(wildcards.items()))


def planned(cwd: Path, params: Path) -> list[tuple]:
    out = snakemake("-n", "-p", "--cores", 1, "--config", f"params={params}", cwd=cwd).stdout
    return sorted(job(j.rule, **j.wildcards) for j in parse_dry_run(out))


# ------------------------------------------------------------------------------------------ params


def _params(file: str = "params/tiny.yaml", **edits) -> dict:
    raw = yaml.safe_load((REPO / file).read_text())
    for dotted, value in edits.items():
        cursor = raw
        *parents, last = dotted.split("/")
        for p in parents:
            cursor = cursor[p]
        cursor[last] = value
    return raw


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"scale": "huge"}, "scale='huge' is not allowed; allowed: tiny, paper, smoke"),
        (
            {"evaluation/fid_features": "clip"},
            "evaluation.fid_features='clip' is not allowed; allowed: digits, inception",
        ),
        ({"resources/gpu": -1}, "resources.gpu=-1 is out of range; allowed: >= 0"),
        (
            {"experiments/vit-cifar100/pipeline/methods": ["adjoint"]},
            "experiments.vit-cifar100.pipeline.methods.0='adjoint' is not allowed; allowed: blockwise, e2e, paper, "
            "noprop-dt, noprop-ct, noprop-fm, forward-forward",
        ),
        (
            {"experiments/noprop-dt-cifar100/pipeline/methods": ["noprop"]},
            "experiments.noprop-dt-cifar100.pipeline.methods.0='noprop' is not allowed; allowed: blockwise, e2e, paper, "
            "noprop-dt, noprop-ct, noprop-fm, forward-forward",
        ),
        # a block-local baseline trains its own network with its own recipe: an experiment of its own
        (
            {"experiments/ff-cifar100/pipeline/methods": ["forward-forward", "blockwise"]},
            "experiments.ff-cifar100.pipeline.methods=['forward-forward', 'blockwise']: forward-forward train their own "
            "network with their own train recipe, not the one of blockwise; allowed: blockwise, e2e, paper in one "
            "experiment, the block-local methods (noprop-dt, noprop-ct, noprop-fm, forward-forward) in experiments of "
            "their own",
        ),
        (
            {"experiments/ff-cifar100/pipeline/methods": ["noprop-dt"]},
            "experiments.ff-cifar100.arch='ViT-tiny': method noprop-dt trains NoProp's own network; allowed: NoProp-paper, "
            "NoProp-tiny",
        ),
        (
            {"experiments/noprop-ct-cifar100/pipeline/methods": ["blockwise"]},
            "experiments.noprop-ct-cifar100.pipeline.methods.0='blockwise' cannot train arch='NoProp-tiny' (NoProp's "
            "network); allowed: noprop-dt, noprop-ct, noprop-fm",
        ),
        (
            {"experiments/ff-cifar100/blocks": 5},
            "experiments.ff-cifar100.blocks=5, layer_split=None: Forward-Forward trains blocks units of equally many of the "
            "12 layers of ViT-tiny, each on its own goodness; allowed: blocks in 1, 2, 3, 4, 6, 12 and no layer_split",
        ),
        (
            {"experiments/noprop-fm-cifar100/arch": "NoProp-huge"},
            "experiments.noprop-fm-cifar100.arch='NoProp-huge' is not a registered architecture; allowed: ",
        ),
        (
            {"experiments/noprop-fm-cifar100/dataset": "digits-latent"},
            "experiments.noprop-fm-cifar100.dataset='digits-latent' does not fit arch='NoProp-tiny' (NoProp's convolutional "
            "network of pixel images); allowed: digits, cifar10, cifar100",
        ),
        (
            {"experiments/vit-cifar100/overlap": 0.7},
            "experiments.vit-cifar100.overlap=0.7 is out of range; allowed: < 0.5",
        ),
        ({"experiments/dit-cifar10/arch": "DiT-XXL/2"}, "experiments.dit-cifar10.arch='DiT-XXL/2' is not a registered"),
        (
            {"file": "params/tiny-ablations.yaml", "experiments/dit-t7-uniform-363/layer_split": [3, 6, 4]},
            "must sum to the depth L=12",
        ),
        (
            {"file": "params/tiny-ablations.yaml", "experiments/dit-t10-b2/blocks": 0},
            "experiments.dit-t10-b2.blocks=0 is out of range; allowed: >= 1",
        ),
    ],
)
def test_params_rejections_name_key_and_allowed_values(edits, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_params(**edits)))
    with pytest.raises(ConfigError) as err:
        Pipeline.load(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "baseline, methods, message",
    [
        (
            "dit-cifar10",
            ["blockwise"],
            "experiments.noprop-cifar100.pipeline.baseline='dit-cifar10' is not an experiment "
            "with an e2e baseline whose settings equal this one's outside blocks, layer_split, "
            "overlap, partition; allowed: vit-cifar100",
        ),
        ("vit-cifar100", ["blockwise", "e2e"], "trains its own e2e baseline; allowed: drop 'e2e'"),
    ],
)
def test_a_shared_baseline_must_train_the_same_network(baseline, methods, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            _params(
                **{
                    "experiments/noprop-cifar100/pipeline/baseline": baseline,
                    "experiments/noprop-cifar100/pipeline/methods": methods,
                }
            )
        )
    )
    with pytest.raises(ConfigError) as err:
        Pipeline.load(path)
    assert message in str(err.value)


def test_shared_baseline_is_trained_once():
    pipe = Pipeline.load(REPO / "params/tiny.yaml")
    assert pipe.baseline("noprop-cifar100") == "vit-cifar100"
    baselines = [exp for exp, method, _ in pipe.training_jobs() if method == "e2e"]
    assert "noprop-cifar100" not in baselines and "vit-cifar100" in baselines


def test_snakemake_refuses_bad_params_before_any_job(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_params(**{"experiments/vit-cifar100/blocks": 13})))
    proc = snakemake("-n", "--config", f"params={path}", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert (
        "experiments.vit-cifar100.blocks=13 exceeds the depth of ViT-tiny (12 layers); allowed: 1..12"
        in proc.stdout + proc.stderr
    )
    assert not (tmp_path / "checkpoints").exists()


def test_snakemake_refuses_config_overrides_that_would_not_reach_jobs(tmp_path):
    proc = snakemake("-n", "--config", "blocks=4", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "allowed: --config params=<params/*.yaml>" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ the DAG


@pytest.mark.parametrize(
    "params", ["params/tiny.yaml", "params/paper.yaml", "params/tiny-latent.yaml", "params/smoke.yaml"]
)
def test_dry_run_has_exactly_b_block_jobs_per_experiment(params):
    pipe = Pipeline.load(REPO / params)
    jobs = snakemake_jobs(params, REPO)
    for exp in pipe.experiments:
        blocks = sorted(
            int(j.wildcards["block"]) for j in jobs if j.rule == "train_block" and j.wildcards["exp"] == exp
        )
        expected = list(range(1, pipe.blocks(exp) + 1)) if "blockwise" in pipe.methods(exp) else []
        assert blocks == expected, exp
        baselines = [j for j in jobs if j.rule == "train_baseline" and j.wildcards["exp"] == exp]
        assert len(baselines) == ("e2e" in pipe.methods(exp))
    # every generator evaluation reads the train and test reference statistics, computed once per dataset
    generators = [j for j in jobs if j.rule == "evaluate_generator"]
    assert generators and all("--train-stats" in j.command and "--test-stats" in j.command for j in generators)
    refs = [j for j in jobs if j.rule == "reference_stats"]
    assert len(refs) == len({pipe.experiments[j.wildcards["exp"]]["dataset"] for j in generators})
    assert all(o.startswith(f"{pipe.data_dir}/reference/") for j in refs for o in j.outputs)
    # a dataset whose prepare trains its autoencoder (digits-latent) writes it beside its splits, and its
    # reference statistics and evaluations decode with exactly that file
    for j in [*refs, *generators]:
        dataset = j.wildcards.get("dataset") or pipe.experiments[j.wildcards["exp"]]["dataset"]
        autoencoder = pipe.autoencoder(dataset)
        assert (autoencoder in j.inputs) == (autoencoder is not None), j.name
        if j.rule == "evaluate_generator":
            assert (f"--data {pipe.prepared(dataset)}" in j.command) == (autoencoder is not None), j.name
    prepared = {j.wildcards["dataset"]: j for j in jobs if j.rule.startswith("prepare_")}
    for dataset, j in prepared.items():
        autoencoder = pipe.autoencoder(dataset)
        assert (autoencoder in j.outputs) == (autoencoder is not None)
        # a sharded dataset's shards are one more output, their folder (dblocks.data.prepared)
        sharded = dataset in SHARDED_DATASETS
        assert (f"{pipe.prepared(dataset)}/shards" in j.outputs) == sharded
        assert j.rule == "prepare_" + "sharded_" * sharded + "autoencoded_" * (autoencoder is not None) + "data"
    inception = [j for j in jobs if j.rule == "inception_weights"]
    assert len(inception) == (pipe.evaluation["fid_features"] == "inception")
    # the block-local baselines: NoProp-DT exactly T block jobs (blocks 1..T) and one head job; NoProp-CT / FM and
    # Forward-Forward one job; one evaluation per method, reading every part
    for exp in pipe.experiments:
        for method in pipe.methods(exp):
            if method in LOCAL_METHODS:
                mine = [j for j in jobs if j.wildcards.get("exp") == exp and j.wildcards.get("local") == method]
                blocks = sorted(int(j.wildcards["block"]) for j in mine if j.rule == "train_local_block")
                heads = [j for j in mine if j.rule == "train_local_head"]
                whole = [j for j in mine if j.rule == "train_local"]
                (evaluation,) = [j for j in mine if j.rule == "evaluate_local"]
                if method == "noprop-dt":
                    assert blocks == list(range(1, pipe.blocks(exp) + 1)) and len(heads) == 1 and not whole, exp
                    assert all(
                        f"--block {j.wildcards['block']} " in j.command for j in mine if j.rule.endswith("block")
                    )
                    assert "--head " in heads[0].command
                else:
                    assert not blocks and not heads and len(whole) == 1, exp
                parts = pipe.local_checkpoints(exp, method)
                assert [
                    i for i in evaluation.inputs if i.endswith(".safetensors") and i.startswith("checkpoints/")
                ] == parts
                assert evaluation.outputs == [pipe.metrics(exp, method)] and " ".join(parts) in evaluation.command
    if params == "params/tiny.yaml":  # Tables 6 and 1 run the baselines at tiny scale too
        assert {m for e in pipe.experiments for m in pipe.methods(e)} >= set(LOCAL_METHODS)
    train_jobs = [j for j in jobs if j.rule.startswith("train_")]
    assert all("--track" in j.command and "> logs/" in j.command for j in train_jobs)
    # a job of N > 1 GPUs trains N data-parallel ranks under torchrun (paper: DiT-L/2 on 8), sharing the job's
    # threads (here 1: the dry run has 1 core); every other job runs dblocks in one process
    for j in train_jobs:
        ranks = pipe.ranks(j.wildcards["exp"])
        launch = f"torchrun --standalone --nproc_per_node={ranks} -m dblocks" if ranks > 1 else "dblocks"
        command = "train-local" if j.rule.startswith("train_local") else j.rule.replace("_", "-")
        assert j.command.startswith(f"OMP_NUM_THREADS=1 {launch} {command} "), j.command
    parallel = {j.wildcards["exp"] for j in train_jobs if "torchrun" in j.command}
    assert parallel == (
        {"dit-imagenet256", "dit-t8-b1", "dit-t8-b2", "dit-t8-b4", "dit-t8-b6"}
        if params.endswith("paper.yaml")
        else set()
    )
    if params.endswith("paper.yaml"):  # paper scale asks SLURM for a GPU per training job
        assert "gpu=1" in snakemake("-n", "--config", f"params={params}", "--rerun-triggers", "mtime").stdout


@functools.cache
def _outputs(params: str) -> frozenset[str]:
    return frozenset(o for j in snakemake_jobs(params, REPO) for o in j.outputs)


@pytest.mark.parametrize(
    "params, out",
    [
        ("params/tiny-text.yaml", "tiny-text"),
        ("params/tiny-latent.yaml", "tiny-latent"),
        ("params/tiny-ablations.yaml", "tiny-ablations"),
    ],
)
def test_tiny_params_files_never_write_the_same_file(params, out):
    """The text, latent and ablation files are scale 'tiny' like params/tiny.yaml; ``outputs:`` keeps their products
    (tables, tracking records, checkpoints, logs) apart, so running one never invalidates another. Only a
    prepared dataset and its reference statistics may be shared (the latent file's digits feature net reads
    the digits; the ablations sample digits): one command writes the same files whichever params file asks."""
    image, other = _outputs("params/tiny.yaml"), _outputs(params)
    assert f"results/{out}/tables" in other and f"results/{out}/runs/store.json" in other
    assert all(o.startswith(("data/prepared/", "data/reference/")) for o in image & other), sorted(image & other)


@pytest.mark.parametrize(
    "params",
    ["params/tiny.yaml", "params/paper.yaml", "params/tiny-text.yaml", "params/tiny-latent.yaml", "params/smoke.yaml"],
)
def test_snakemake_lint_is_clean(params):
    """Snakemake's own linter: a software environment per rule, non-file values through params:, named
    inputs and outputs in commands, helper functions in common.smk, envvars for what jobs need."""
    out = snakemake("--lint", "--config", f"params={params}")
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr, out.stdout


def test_dvc_yaml_is_generated_from_the_current_dag():
    assert (REPO / "dvc.yaml").read_text() == generate("params/tiny.yaml", REPO), (
        "dvc.yaml is stale: run `dblocks dvc-yaml`"
    )


def test_dvc_and_snakemake_describe_the_same_jobs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    jobs = snakemake_jobs("params/tiny.yaml", REPO)
    assert sorted(stages) == sorted(j.name for j in jobs)
    for job in jobs:
        stage = stages[job.name]
        assert stage["cmd"].endswith(job.command)
        assert stage.get("deps", []) == job.inputs
        named = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        outs = named + [next(iter(m)) for m in stage.get("metrics", [])]
        assert sorted(outs) == sorted(job.outputs)
        # trained weights and their records stay in place when either tool reruns the job (Snakemake's
        # `update`, DVC's `persist`), so that the job can keep a block already trained with this config
        persisted = [
            next(iter(o)) for o in stage.get("outs", []) if isinstance(o, dict) and o[next(iter(o))]["persist"]
        ]
        assert persisted == job.kept
        if job.rule.startswith("train"):
            assert persisted == job.outputs and "--replace-stale" in job.command
    # DVC itself accepts the file
    proc = subprocess.run([str(BIN / "dvc"), "stage", "list"], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "train_block.vit-cifar100.1" in proc.stdout


def test_wildcards_cannot_carry_shell_syntax(tmp_path):
    proc = snakemake("-n", "checkpoints/tiny/vit-cifar100;touch pwned/block-1.safetensors", cwd=REPO, check=False)
    assert proc.returncode != 0
    assert not (REPO / "pwned").exists()


# ------------------------------------------------------------------------------- a real small run

MICRO = """
scale: tiny
tracking: {uri: "sqlite:///store/mlflow.db", experiment: micro}
resources: {gpu: 0, mem_mb: 1000, runtime: 10, threads: 1}
evaluation: {samples: 40, sample_steps: 6, fid_features: digits}
defaults: {dataset: digits, seed: 0, device: cpu}
experiments:
  vit-cifar100:
    task: classification
    arch: ViT-micro
    blocks: 2
    train: {steps: 4, batch_size: 16, warmup: 1, log_every: 2, checkpoint_every: 2}
    pipeline: {tables: ["1", "12"], methods: [blockwise, e2e]}
  dit-t10-b2:
    task: generation
    arch: DiT-micro
    blocks: 2
    train: {steps: 4, batch_size: 16, warmup: 1, log_every: 2, checkpoint_every: 2}
    sample: {steps: 6, guidance: 1.0, batch_size: 64}
    pipeline: {tables: ["10"], methods: [blockwise]}
"""


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    """The micro pipeline, run while its tracking store is unusable (``store`` is a file, not the folder
    of mlflow.db): every job must still finish and keep its results; only the tables, which read
    MLflow, fail. With the store back, a second run does just the tables rule, which first logs the
    journaled runs."""
    work = tmp_path_factory.mktemp("pipeline")
    (work / "micro.yaml").write_text(MICRO)
    (work / "store").write_text("not a directory")
    down = snakemake("--cores", 2, "--keep-going", "--config", "params=micro.yaml", cwd=work, check=False)
    assert down.returncode != 0
    assert "MLflow tracking off for this job" in (work / "logs/tiny/vit-cifar100/train-block-1.log").read_text()
    assert "tracking store sqlite:///store/mlflow.db" in (work / "logs/tiny/tables.log").read_text()
    assert len(list(work.glob("metrics/tiny/*/*.json"))) == 3 and not (work / "results/tiny/tables").exists()

    (work / "store").unlink()
    (work / "store").mkdir()
    assert planned(work, work / "micro.yaml") == [job("tables")]
    snakemake("--cores", 2, "--config", "params=micro.yaml", cwd=work)
    return work


def test_real_run_writes_tables_from_mlflow(micro_run):
    table = (micro_run / "results/tiny/tables/table1.md").read_text()
    blockwise = json.loads((micro_run / "metrics/tiny/vit-cifar100/blockwise.json").read_text())
    assert f"{100 * blockwise['accuracy']:.2f}" in table and "60.25" in table and "tiny" in table
    assert (micro_run / "results/tiny/tables/table10.csv").is_file()
    assert (
        "Our FID: domain FID (digits-classifier features)" in (micro_run / "results/tiny/tables/table10.md").read_text()
    )
    generation = json.loads((micro_run / "metrics/tiny/dit-t10-b2/blockwise.json").read_text())
    assert generation["fid"] > 0 and generation["block_calls"] == [3, 3]
    assert (micro_run / "metrics/tiny/dit-t10-b2/blockwise-samples.png").is_file()
    # every job logged a run under its experiment's parent
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{micro_run / 'store/mlflow.db'}")
    exp = client.get_experiment_by_name("micro")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {r.info.run_id: r.data.tags["dblocks.experiment"] for r in runs if r.data.tags["dblocks.job"] == "parent"}
    children = [r for r in runs if r.data.tags["dblocks.job"] != "parent"]
    assert sorted(parents.values()) == ["dit-t10-b2", "vit-cifar100"]
    # vit: 2 block jobs + 1 baseline + 2 evaluations; dit: 2 block jobs + 1 evaluation
    assert len(children) == (2 + 1 + 2) + (2 + 1)
    for r in children:
        assert parents[r.data.tags["mlflow.parentRunId"]] == r.data.tags["dblocks.experiment"]
        assert r.data.tags["dblocks.logged_later"] == "true" and r.info.status == "FINISHED"


def base64_of(path) -> str:
    """A file's bytes as the report embeds them (Snakemake writes each result into it as a base64 data URI)."""
    return base64.b64encode(path.read_bytes()).decode()


def test_the_report_holds_every_table_figure_and_sample_grid(micro_run):
    """The Snakemake report of the finished run (`make report`): one self-contained HTML file that holds every
    table, figure and sample grid of the run, grouped by paper table, with the code version behind them."""
    report = micro_run / "results/tiny/report.html"
    provenance = micro_run / "results/tiny/provenance.yaml"
    # the provenance job ran after the tables (a job: parsing runs no git)
    record = yaml.safe_load(provenance.read_text())
    assert record["params file"] == "micro.yaml" and record["workflow commit"]
    snakemake("--config", "params=micro.yaml", "--report", report, "--report-metadata", provenance, cwd=micro_run)
    html = report.read_text()

    tables = sorted((micro_run / "results/tiny/tables").glob("table*.md"))
    tables += sorted((micro_run / "results/tiny/tables").glob("table*.csv"))
    assert {t.name for t in tables} >= {"table1.md", "table1.csv", "table10.md", "table10.csv", "table12.md"}
    figures = sorted((micro_run / "results/tiny/figures").glob("curves-*.png"))
    assert figures  # training curves of both experiments
    grid = micro_run / "metrics/tiny/dit-t10-b2/blockwise-samples.png"
    for path in [*tables, *figures, grid, provenance]:
        assert base64_of(path) in html, path.name

    # grouped by paper table: each table's own category, an experiment's grid under its first table
    for category in ("Table 1", "Table 10", "Table 12", "Sample grids", "Provenance"):
        assert category in html, category
    # captions (workflow/report/*.rst) and the code version on the landing page (--report-metadata)
    assert "regenerated by" in html and "each Euler step runs only the block that owns its noise level" in html
    assert record["workflow commit"].split()[0] in html
    # and Snakemake's own statistics: the rules that ran and their runtimes
    assert "train_block" in html and "evaluate_generator" in html


def tree_state(root: Path) -> dict[str, tuple]:
    """Every file and directory under ``root`` with its bytes' hash and mtime: what 'changes nothing' means.
    Snakemake's own bookkeeping folder is left out: a dry run caches its file inventory there
    (.snakemake/iocache, for a later --trust-io-cache), which is not the workspace."""
    import hashlib

    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.split("/")[0] == ".snakemake":
            continue
        if path.is_dir():
            state[rel] = ("dir",)
        else:
            state[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return state


def test_deleting_or_corrupting_one_block_reruns_only_that_block(micro_run):
    params = micro_run / "micro.yaml"
    assert planned(micro_run, params) == []  # everything is up to date

    (micro_run / "checkpoints/tiny/dit-t10-b2/block-2.safetensors").unlink()
    before = tree_state(micro_run)
    plan = planned(micro_run, params)
    assert tree_state(micro_run) == before  # a dry run renames, deletes and writes nothing
    assert plan == sorted(
        [
            job("train_block", exp="dit-t10-b2", block="2"),
            job("assemble", exp="dit-t10-b2", assembled="blockwise"),
            job("evaluate_generator", exp="dit-t10-b2", method="blockwise"),
            job("tables"),
        ]
    )

    block = micro_run / "checkpoints/tiny/vit-cifar100/block-1.safetensors"
    data, stat = bytearray(block.read_bytes()), block.stat()
    data[len(data) // 2] ^= 0xFF  # flip one byte in the tensor data: silent corruption, same mtime
    block.write_bytes(bytes(data))
    os.utime(block, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned(micro_run, params) == plan  # parsing does not hash: corruption is found where it is read ...
    verify = subprocess.run(
        [str(BIN / "dblocks"), "verify", "--params", str(params)],
        cwd=micro_run,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert verify.returncode == 1 and "CORRUPT  checkpoints/tiny/vit-cifar100/block-1.safetensors" in verify.stdout
    assert block.is_file()  # ... and by `dblocks verify`, which moves nothing unless asked
    verify = subprocess.run(
        [str(BIN / "dblocks"), "verify", "--params", str(params), "--quarantine"],
        cwd=micro_run,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert (micro_run / "checkpoints/tiny/vit-cifar100/block-1.safetensors.corrupt").is_file()
    assert planned(micro_run, params) == sorted(
        plan
        + [
            job("train_block", exp="vit-cifar100", block="1"),
            job("assemble", exp="vit-cifar100", assembled="blockwise"),
            job("evaluate_classifier", exp="vit-cifar100", method="blockwise"),
        ]
    )

    # and the rerun really rebuilds just those, leaving the other blocks' files untouched
    untouched = micro_run / "checkpoints/tiny/vit-cifar100/block-2.safetensors"
    before = (untouched.stat().st_mtime_ns, load_metadata(untouched)["sha256"])
    run = snakemake("--cores", 2, "--config", f"params={params}", cwd=micro_run)
    assert "9 of 9 steps (100%) done" in run.stderr  # the 7 jobs above, the tables' provenance and "all"
    assert (untouched.stat().st_mtime_ns, load_metadata(untouched)["sha256"]) == before
    assert load_metadata(block)["block"] == 1
    assert planned(micro_run, params) == []


def test_snakemake_reruns_exactly_the_jobs_that_read_a_changed_setting(micro_run):
    """A changed value reruns the jobs whose commands read it: the evaluations for an evaluation setting,
    the MLflow set-up (and the evaluations that log there) for `tracking`, never a finished block."""
    params = micro_run / "micro.yaml"
    original = params.read_text()
    assert planned(micro_run, params) == []
    evaluations = [
        job("evaluate_classifier", exp="vit-cifar100", method="blockwise"),
        job("evaluate_classifier", exp="vit-cifar100", method="e2e"),
        job("evaluate_generator", exp="dit-t10-b2", method="blockwise"),
    ]
    try:
        params.write_text(original.replace("samples: 40", "samples: 24"))
        assert planned(micro_run, params) == sorted(evaluations + [job("tables")])
        params.write_text(original.replace("experiment: micro}", "experiment: micro-renamed}"))
        assert planned(micro_run, params) == sorted(
            evaluations
            + [
                job("tracking_store"),
                *[
                    job("tracking_parent", exp=e, chash=Pipeline.load(params).hash(e))
                    for e in ("vit-cifar100", "dit-t10-b2")
                ],
                job("tables"),
            ]
        )
    finally:
        params.write_text(original)
    assert planned(micro_run, params) == []


def test_a_changed_experiment_is_retrained_in_the_first_call(micro_run):
    """A changed training setting reruns the experiment's blocks, baseline and what reads them, in ONE call:
    its run record is named by its config hash, so the record's tracking job does not hide the trainings
    below it (Snakemake skips a job below a rerun job when its input from it is `ancient` and present)."""
    params = micro_run / "micro.yaml"
    original = params.read_text()
    assert planned(micro_run, params) == []
    raw = yaml.safe_load(original)
    raw["experiments"]["vit-cifar100"]["train"]["steps"] = 3
    try:
        params.write_text(yaml.safe_dump(raw))
        assert planned(micro_run, params) == sorted(
            [
                job("tracking_parent", exp="vit-cifar100", chash=Pipeline.load(params).hash("vit-cifar100")),
                job("train_block", exp="vit-cifar100", block="1"),
                job("train_block", exp="vit-cifar100", block="2"),
                job("train_baseline", exp="vit-cifar100"),
                job("assemble", exp="vit-cifar100", assembled="blockwise"),
                job("evaluate_classifier", exp="vit-cifar100", method="blockwise"),
                job("evaluate_classifier", exp="vit-cifar100", method="e2e"),
                job("tables"),
            ]
        )
    finally:
        params.write_text(original)
    assert planned(micro_run, params) == []


def test_a_training_job_rerun_for_another_reason_keeps_its_finished_block(micro_run):
    """Snakemake reruns a training job when something other than its experiment changed (a new rule command, a
    regenerated run record; forced here). It leaves the checkpoint in place (`update` outputs, where it deletes
    a plain output first), and the job keeps it: the same bytes, no training step, and the log says why."""
    params = micro_run / "micro.yaml"
    pipe = Pipeline.load(params)
    target = pipe.block_checkpoint("vit-cifar100", 1)
    block = micro_run / target
    before = block.read_bytes()
    snakemake(target, "--forcerun", "train_block", "--cores", 1, "--config", f"params={params}", cwd=micro_run)
    assert block.read_bytes() == before
    log = (micro_run / pipe.log("vit-cifar100", "train-block-1")).read_text()
    assert "already trained with this config" in log and "wrote" not in log
    snakemake("--cores", 2, "--config", f"params={params}", cwd=micro_run)  # its assembly and evaluation follow
    assert block.read_bytes() == before and planned(micro_run, params) == []


def test_training_on_another_number_of_gpus_reruns_no_job(micro_run):
    """The GPUs (hence ranks) of an experiment's jobs are resources, outside every config hash and settings
    digest, and the command's launcher is a param derived from them, which Snakemake's params trigger leaves
    out: the same blocks on 2 GPUs each are not changed jobs (only the tables, which read the whole file)."""
    params = micro_run / "micro.yaml"
    original = params.read_text()
    assert planned(micro_run, params) == []
    try:
        params.write_text(
            original.replace("resources: {gpu: 0,", "resources: {experiments: {vit-cifar100: {gpu: 2}}, gpu: 1,")
        )
        assert Pipeline.load(params).ranks("vit-cifar100") == 2
        out = snakemake(
            "-n",
            "-p",
            "--cores",
            2,
            "--config",
            f"params={params}",
            "--forcerun",
            "train_block",
            "--until",
            "train_block",
            cwd=micro_run,
        ).stdout
        assert "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m dblocks train-block" in out
        assert planned(micro_run, params) == [job("tables")]
    finally:
        params.write_text(original)
    assert planned(micro_run, params) == []


def test_dvc_reruns_exactly_the_stages_that_read_a_changed_setting(micro_run, tmp_path):
    """dvc.yaml's params dependencies: change one value of each top-level section of the params file and
    `dvc status` names exactly the stages whose commands read that section."""
    import shutil

    work = tmp_path / "dvc"
    shutil.copytree(micro_run, work, ignore=shutil.ignore_patterns(".snakemake"))
    params = "micro.yaml"
    plan = snakemake("-n", "-p", "--forceall", "--cores", 1, "--config", f"params={params}", cwd=work).stdout
    from dblocks.dvcgen import render

    (work / "dvc.yaml").write_text(render(parse_dry_run(plan), params, work))

    def run(*argv):
        proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "commit", "-f", "-q")  # record the finished run's state in dvc.lock
    stages = list(yaml.safe_load((work / "dvc.yaml").read_text())["stages"])
    assert json.loads(run(str(BIN / "dvc"), "status", "--json")) == {}

    original = (work / params).read_text()

    def changed(edit) -> set[str]:
        raw = yaml.safe_load(original)
        edit(raw)
        (work / params).write_text(yaml.safe_dump(raw))
        try:
            return set(json.loads(run(str(BIN / "dvc"), "status", "--json")))
        finally:
            (work / params).write_text(original)

    def of(*prefixes) -> set[str]:
        return {s for s in stages if s.startswith(prefixes)}

    evaluations = of("evaluate_")
    assert changed(lambda r: r.update(scale="paper")) == of("tracking_", "tables") | evaluations
    assert changed(lambda r: r["tracking"].update(experiment="renamed")) == of("tracking_", "tables")
    assert changed(lambda r: r["resources"].update(threads=2)) == of("tables")
    assert changed(lambda r: r["evaluation"].update(samples=41)) == of("tables") | evaluations
    assert changed(lambda r: r["defaults"].update(seed=1)) == of("tracking_parent", "train_", "tables") | evaluations
    vit = changed(lambda r: r["experiments"]["vit-cifar100"]["train"].update(steps=5))
    assert vit == {s for s in stages if s.split(".")[1:2] == ["vit-cifar100"]} - of("assemble") | of("tables")
    # settings that do not change what a block learns (here: how the tables label it) retrain nothing
    untrained = changed(lambda r: r["experiments"]["vit-cifar100"]["pipeline"].update(tables=["1"]))
    assert untrained == of("tables", "evaluate_classifier.vit-cifar100")

    # `dvc exp run -S` on an evaluation setting reruns the evaluations, which read the new value from the file
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "finished run")
    run(str(BIN / "dvc"), "exp", "run", "-S", f"{params}:evaluation.samples=24")
    record = json.loads((work / "metrics/tiny/dit-t10-b2/blockwise.json").read_text())
    assert record["evaluation"]["samples"] == 24 and record["eval_hash"] == Pipeline.load(work / params).eval_hash(
        "dit-t10-b2"
    )
    assert f"| {record['fid_test']:.2f} |" in (work / "results/tiny/tables/table10.md").read_text()  # and the table
    assert json.loads(run(str(BIN / "dvc"), "status", "--json")) == {}


# ------------------------------------------------------------- the block-local baselines, run for real

LOCAL = """
scale: tiny
tracking: {uri: "sqlite:///mlflow.db", experiment: micro-local, mode: journal}
resources: {gpu: 0, mem_mb: 1000, runtime: 10, threads: 1}
evaluation: {samples: 40, sample_steps: 6, fid_features: digits}
defaults: {dataset: digits, seed: 0, device: cpu}
templates:
  vit: &vit {task: classification, arch: ViT-micro, blocks: 3,
             train: &train {steps: 4, batch_size: 16, warmup: 1, log_every: 2, checkpoint_every: 2}}
  noprop: &noprop {task: classification, arch: NoProp-tiny, blocks: 3,
                   train: {<<: *train, lr: 1.0e-3, schedule: constant, warmup: 0, grad_clip: null}}
experiments:
  vit-cifar100: {<<: *vit, pipeline: {tables: ["1"], methods: [blockwise, e2e]}}
  ff-cifar100: {<<: *vit, train: {<<: *train, lr: 1.0e-2, grad_clip: null},
                pipeline: {tables: ["1"], methods: [forward-forward], seeds: 2}}
  noprop-cifar100: {<<: *vit, overlap: 0.1, pipeline: {tables: ["6"], methods: [blockwise], baseline: vit-cifar100}}
  noprop-dt-cifar100: {<<: *noprop, pipeline: {tables: ["6"], methods: [noprop-dt]}}
  noprop-ct-cifar100: {<<: *noprop, pipeline: {tables: ["6"], methods: [noprop-ct]}}
  noprop-fm-cifar100: {<<: *noprop, pipeline: {tables: ["6"], methods: [noprop-fm]}}
"""


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """Tables 1 and 6 with every row measured: ViT-micro DiffusionBlocks and its baseline, Forward-Forward (two
    seeds), NoProp-DT (T = 3 block jobs and a head job), NoProp-CT and NoProp-FM, a few steps each, journal
    tracking, then the tables from MLflow."""
    work = tmp_path_factory.mktemp("local")
    (work / "micro.yaml").write_text(LOCAL)
    snakemake("--cores", 2, "--config", "params=micro.yaml", cwd=work)
    return work


def test_the_dag_has_t_noprop_block_jobs_and_one_head_job(tmp_path):
    five = LOCAL.replace("arch: NoProp-tiny, blocks: 3,", "arch: NoProp-tiny, blocks: 5,")
    assert five != LOCAL
    (tmp_path / "micro.yaml").write_text(five)
    plan = planned(tmp_path, tmp_path / "micro.yaml")
    dt = [j for j in plan if dict(j[1]).get("exp") == "noprop-dt-cifar100"]
    assert sorted(dict(j[1])["block"] for j in dt if j[0] == "train_local_block") == ["1", "2", "3", "4", "5"]
    assert [j[0] for j in dt].count("train_local_head") == 1 and [j[0] for j in dt].count("evaluate_local") == 1
    assert job("train_local", exp="noprop-ct-cifar100", local="noprop-ct") in plan
    assert job("train_local", exp="ff-cifar100-seed1", local="forward-forward") in plan
    baselines = ("ff-cifar100", "noprop-dt-cifar100", "noprop-ct-cifar100", "noprop-fm-cifar100")
    assert not [j for j in plan if j[0] in ("train_block", "assemble") and dict(j[1])["exp"].startswith(baselines)]


def test_baselines_fill_tables_1_and_6_from_real_runs(local_run):
    def metrics(exp, method):
        return json.loads((local_run / f"metrics/tiny/{exp}/{method}.json").read_text())

    def row(table, label):
        text = (local_run / f"results/tiny/tables/table{table}.md").read_text()
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
        return [c.strip() for c in line.strip("|").split("|")][1:]

    # NoProp-DT: T = 3 block jobs and a head job, assembled by its evaluation; its cost is the blocks'
    dt = metrics("noprop-dt-cifar100", "noprop-dt")
    assert dt["train_jobs"] == 4 and len(dt["train_ms_per_step_per_block"]) == 3 and dt["head_ms_per_step"] > 0
    assert 0 <= dt["accuracy"] <= 1 and dt["train_ms_per_step"] > 0 and dt["train_memory_mb"] >= 0
    assert [Path(m).name for m in dt["models"]] == [
        "block-1.safetensors",
        "block-2.safetensors",
        "block-3.safetensors",
        "head.safetensors",
    ]
    for b in (1, 2, 3):
        record = load_metadata(local_run / f"checkpoints/tiny/noprop-dt-cifar100/noprop-dt/block-{b}.safetensors")
        assert (record["kind"], record["method"], record["part"], record["block"]) == (
            "local",
            "noprop-dt",
            f"block-{b}",
            b,
        )
        assert record["steps_run"] == 4 and record["train_memory_mb"] is not None
    assert load_metadata(local_run / "checkpoints/tiny/noprop-dt-cifar100/noprop-dt/head.safetensors")["step"] == 3 * 4

    # every row of both tables is ours, measured, with its training cost beside it
    for label, exp, method in (
        ("NoProp-DT", "noprop-dt-cifar100", "noprop-dt"),
        ("NoProp-CT", "noprop-ct-cifar100", "noprop-ct"),
        ("NoProp-FM", "noprop-fm-cifar100", "noprop-fm"),
    ):
        cells = row(6, label)
        record = metrics(exp, method)
        assert cells[1] == f"{100 * record['accuracy']:.2f}", label
        assert cells[2] == "—"  # no chain to start: the noise-mean column is DiffusionBlocks' own
        assert cells[3] == f"{record['train_ms_per_step']:.1f}" and cells[4] == f"{record['train_memory_mb']:.1f}"
    blockwise = metrics("noprop-cifar100", "blockwise")
    assert row(6, "DiffusionBlocks")[1:3] == [
        f"{100 * blockwise['accuracy']:.2f}",
        f"{100 * blockwise['accuracy_mean_start']:.2f}",
    ]
    ff = [100 * metrics(e, "forward-forward")["accuracy"] for e in ("ff-cifar100", "ff-cifar100-seed1")]
    import statistics

    mean, std = statistics.mean(ff), statistics.stdev(ff)
    assert row(1, "Forward-Forward")[1] == (f"{mean:.2f} ± {std:.2f}" if f"{std:.2f}" != "0.00" else f"{mean:.2f}")
    for table, label in ((1, "End-to-end backprop"), (1, "DiffusionBlocks"), (1, "Forward-Forward"), (6, "Backprop")):
        cells = row(table, label)
        assert "n/a" not in cells and "—" not in cells[1:2] + cells[3:], (table, label)
    assert row(1, "DiffusionBlocks")[2] != "—"

    # MLflow holds a run per job: NoProp-DT's blocks "1".."3" and "head", one evaluation per method
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{local_run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("micro-local").experiment_id], max_results=1000)
    dt_runs = [r for r in runs if r.data.tags["dblocks.experiment"] == "noprop-dt-cifar100"]
    assert sorted(r.data.tags["dblocks.block"] for r in dt_runs if r.data.tags["dblocks.job"] == "train") == [
        "1",
        "2",
        "3",
        "head",
    ]
    assert all(
        "train_memory_mb" in r.data.metrics and "seconds_per_step" in r.data.metrics
        for r in dt_runs
        if r.data.tags["dblocks.job"] == "train"
    )
    parents = [r for r in dt_runs if r.data.tags["dblocks.job"] == "parent"]
    assert parents[0].data.metrics["noprop-dt.accuracy"] == pytest.approx(dt["accuracy"])

    # a finished part is never retrained; the pipeline is up to date
    again = subprocess.run(
        [
            str(BIN / "dblocks"),
            "train-local",
            "--config",
            "micro.yaml",
            "--experiment",
            "noprop-dt-cifar100",
            "--method",
            "noprop-dt",
            "--block",
            "2",
            "--out",
            "checkpoints/tiny/noprop-dt-cifar100/noprop-dt/block-2.safetensors",
        ],
        cwd=local_run,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert again.returncode == 0 and "already trained with this config" in again.stdout
    assert planned(local_run, local_run / "micro.yaml") == []
