"""Paper tables and figures from MLflow: fake-but-contract-following runs in a temporary sqlite store,
then ``dblocks.tables.generate`` and checks on every kind of output."""

from __future__ import annotations

import functools
import itertools
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

from dblocks import paper, tables

MLFLOW_EXPERIMENT = "dblocks-tables-test"
BASE_MS = 1_700_000_000_000

PARAMS = {
    "scale": "tiny",
    "tracking": {"uri": "sqlite:///nowhere.db", "experiment": MLFLOW_EXPERIMENT},
    "resources": {"gpu": 0, "mem_mb": 1000, "runtime": 10, "threads": 1},
    "evaluation": {"samples": 8, "sample_steps": 2, "fid_features": "digits"},
    "defaults": {"dataset": "digits", "seed": 0, "device": "auto"},
    "experiments": {
        "vit-cifar100": {
            "task": "classification",
            "arch": "ViT-micro",
            "blocks": 3,
            "overlap": 0.05,
            "pipeline": {"tables": ["1", "12"], "methods": ["blockwise", "e2e"]},
        },
        # Table 6: block-wise runs of its own, the backprop row from vit-cifar100's end-to-end run
        "noprop-cifar100": {
            "task": "classification",
            "arch": "ViT-micro",
            "blocks": 3,
            "overlap": 0.1,
            "pipeline": {"tables": ["6"], "methods": ["blockwise"], "baseline": "vit-cifar100"},
        },
        # DiT-tiny: 12 layers, so that the paper's [3, 6, 3] split is a valid one
        "dit-t7-uniform-363": {
            "task": "generation",
            "arch": "DiT-tiny",
            "blocks": 3,
            "partition": "uniform",
            "overlap": 0.0,
            "layer_split": [3, 6, 3],
            "pipeline": {"tables": ["7"], "methods": ["blockwise"]},
        },
        # no layer_split: DiT-micro's 3 layers split evenly, [1, 1, 1], which is the paper's [4, 4, 4] row
        "dit-t7-equiprob-444": {
            "task": "generation",
            "arch": "DiT-micro",
            "blocks": 3,
            "partition": "equiprobable",
            "overlap": 0.0,
            "pipeline": {"tables": ["7", "10"], "methods": ["blockwise"]},
        },
        "dit-t10-b2": {
            "task": "generation",
            "arch": "DiT-micro",
            "blocks": 2,
            "partition": "equiprobable",
            "overlap": 0.0,
            "pipeline": {"tables": ["10"], "methods": ["blockwise"]},
        },
        # Table 11: MAUVE vs B for the AR transformer
        "ar-lm1b": {
            "task": "ar_text",
            "arch": "AR-micro",
            "dataset": "shakespeare",
            "blocks": 4,
            "overlap": 0.1,
            "pipeline": {"tables": ["11"], "methods": ["blockwise"]},
        },
        "ar-t11-b2": {
            "task": "ar_text",
            "arch": "AR-micro",
            "dataset": "shakespeare",
            "blocks": 2,
            "overlap": 0.1,
            "pipeline": {"tables": ["11"], "methods": ["blockwise"]},
        },
        # the block-local baselines: Forward-Forward for Table 1 (two seeds), NoProp-DT (T = 3 block jobs and a
        # head job) and NoProp-CT for Table 6; no experiment runs NoProp-FM
        "ff-cifar100": {
            "task": "classification",
            "arch": "ViT-micro",
            "blocks": 3,
            "pipeline": {"tables": ["1"], "methods": ["forward-forward"], "seeds": 2},
        },
        "noprop-dt-cifar100": {
            "task": "classification",
            "arch": "NoProp-tiny",
            "blocks": 3,
            "pipeline": {"tables": ["6"], "methods": ["noprop-dt"]},
        },
        "noprop-ct-cifar100": {
            "task": "classification",
            "arch": "NoProp-tiny",
            "blocks": 10,
            "pipeline": {"tables": ["6"], "methods": ["noprop-ct"]},
        },
    },
}

_clock = itertools.count()


def _flat_params(name: str) -> dict[str, str]:
    """What the tracking module logs: the flattened resolved config, strings as they are, other values as
    JSON (layer_split "[3, 6, 3]", None as "null")."""
    from dblocks.config import DEFAULTS, deep_merge

    config = deep_merge(deep_merge(DEFAULTS, PARAMS["defaults"]), PARAMS["experiments"][name])
    config["name"] = name
    return tables.flatten(config, as_strings=True)


@functools.cache
def _hashes(params_yaml: str | None = None) -> dict[str, tuple[str, str]]:
    """{experiment: (config hash, evaluation hash)} of PARAMS (or of this YAML text), as the tables compute them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(params_yaml or yaml.safe_dump(PARAMS, sort_keys=False))
        return tables.read_params(path).hashes()


def _log(
    client: MlflowClient,
    eid: str,
    experiment: str,
    job: str,
    method: str = "",
    block: str = "",
    metrics: dict | None = None,
    history: list[float] | None = None,
    status: str = "FINISHED",
    parent: str | None = None,
    device: str | None = None,
    artifact: Path | None = None,
    with_params: bool = False,
    config_hash: str | None = None,
    eval_hash: str | None = None,
) -> str:
    """A run as the pipeline logs it: tagged with its experiment's current config hash (and evaluation hash,
    for an evaluate run) unless ``config_hash`` / ``eval_hash`` say otherwise."""
    start = BASE_MS + 1000 * next(_clock)
    current_config, current_eval = _hashes()[experiment]
    own = PARAMS["experiments"].get(experiment) or PARAMS["experiments"][experiment.rsplit("-seed", 1)[0]]
    tags = {
        "dblocks.experiment": experiment,
        "dblocks.scale": "tiny",
        "dblocks.method": method,
        "dblocks.block": block,
        "dblocks.job": job,
        "dblocks.tables": ",".join(own["pipeline"]["tables"]),
        "dblocks.config_hash": config_hash or current_config,
        "dblocks.git_commit": "deadbeefcafe",
    }
    if job == "evaluate":
        tags["dblocks.eval_hash"] = eval_hash or current_eval
    if parent:
        tags["mlflow.parentRunId"] = parent
    if device:
        tags["dblocks.device"] = device
    run_id = client.create_run(eid, start_time=start, tags=tags).info.run_id
    batch = [Metric(k, float(v), start, 0) for k, v in (metrics or {}).items()]
    batch += [Metric("train_loss", v, start + i, 10 * i) for i, v in enumerate(history or [])]
    params = [Param(k, v) for k, v in _flat_params(experiment).items()] if with_params else []
    client.log_batch(run_id, metrics=batch, params=params)
    if artifact is not None:
        client.log_artifact(run_id, str(artifact), "evaluation")
    client.set_terminated(run_id, status=status, end_time=start + 500)
    return run_id


def _experiment_runs(
    client, eid, name, blocks: int, seconds=(0.01, 0.011, 0.012), device="cpu", method="blockwise"
) -> str:
    parent = _log(client, eid, name, "parent", with_params=True)
    for b in range(1, blocks + 1):
        _log(
            client,
            eid,
            name,
            "train",
            method,
            str(b),
            parent=parent,
            device=device,
            with_params=True,
            metrics={
                "seconds_per_step": seconds[b - 1],
                "train_seconds": 10 * seconds[b - 1],
                "final_loss": 0.5,
                "train_memory_mb": 20.0 + b,
            },
            history=[2.0 / (b + i) for i in range(6)],
        )
    return parent


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    grid = root / "samples.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(grid)

    # Table 1 and 12: the ViT; an older evaluate run, the rerun of the same configuration, then a FAILED
    # rerun, and newer runs of another configuration and of other evaluation settings: none of these win
    parent = _experiment_runs(client, eid, "vit-cifar100", 3)
    _log(
        client,
        eid,
        "vit-cifar100",
        "train",
        "e2e",
        parent=parent,
        device="cpu",
        with_params=True,
        metrics={"seconds_per_step": 0.03, "train_memory_mb": 40.0},
        history=[2.5, 1.5, 1.0, 0.8],
    )
    _log(client, eid, "vit-cifar100", "evaluate", "blockwise", parent=parent, metrics={"accuracy": 0.50})
    _log(client, eid, "vit-cifar100", "evaluate", "e2e", parent=parent, metrics={"accuracy": 0.9012})
    _log(
        client,
        eid,
        "vit-cifar100",
        "evaluate",
        "blockwise",
        parent=parent,
        metrics={"accuracy": 0.8731, "accuracy_mean_start": 0.95},
    )
    _log(
        client, eid, "vit-cifar100", "evaluate", "blockwise", parent=parent, metrics={"accuracy": 0.10}, status="FAILED"
    )
    _log(
        client, eid, "vit-cifar100", "evaluate", "blockwise", metrics={"accuracy": 0.99}, config_hash="00000000000000aa"
    )
    _log(
        client,
        eid,
        "vit-cifar100",
        "evaluate",
        "blockwise",
        parent=parent,
        metrics={"accuracy": 0.98},
        eval_hash="00000000000000bb",
    )
    _log(
        client,
        eid,
        "vit-cifar100",
        "train",
        "blockwise",
        "1",
        config_hash="00000000000000aa",
        metrics={"seconds_per_step": 9.0},
        history=[9.0, 9.0],
    )

    parent = _experiment_runs(client, eid, "noprop-cifar100", 3)
    _log(client, eid, "noprop-cifar100", "evaluate", "blockwise", parent=parent, metrics={"accuracy": 0.8555})

    # Table 7 / 10: one FID logged with samples; one evaluate run whose FID is not logged (yet)
    parent = _experiment_runs(client, eid, "dit-t7-uniform-363", 3)
    _log(
        client,
        eid,
        "dit-t7-uniform-363",
        "evaluate",
        "blockwise",
        parent=parent,
        artifact=grid,
        metrics={"fid": 41.5, "sample_seconds": 3.0, "layer_evals_per_sample": 150, "class_agreement": 0.8125},
    )
    parent = _experiment_runs(client, eid, "dit-t7-equiprob-444", 3)
    _log(
        client,
        eid,
        "dit-t7-equiprob-444",
        "evaluate",
        "blockwise",
        parent=parent,
        metrics={"sample_seconds": 3.0, "layer_evals_per_sample": 150},
    )
    parent = _experiment_runs(client, eid, "dit-t10-b2", 2)
    _log(client, eid, "dit-t10-b2", "evaluate", "blockwise", parent=parent, metrics={"fid": 35.0})

    # Tables 1 and 6: the block-local baselines. Forward-Forward with two seeds (one job each); NoProp-DT's three
    # block jobs and its head job (the head's cost is not a block's); NoProp-CT trained, not evaluated yet
    for name, accuracy, seconds, memory in (
        ("ff-cifar100", 0.70, 0.020, 30.0),
        ("ff-cifar100-seed1", 0.74, 0.022, 32.0),
    ):
        parent = _log(client, eid, name, "parent")
        _log(
            client,
            eid,
            name,
            "train",
            "forward-forward",
            parent=parent,
            device="cpu",
            metrics={"seconds_per_step": seconds, "train_memory_mb": memory},
            history=[1.4, 1.0],
        )
        _log(client, eid, name, "evaluate", "forward-forward", parent=parent, metrics={"accuracy": accuracy})
    parent = _experiment_runs(client, eid, "noprop-dt-cifar100", 3, seconds=(0.004, 0.005, 0.006), method="noprop-dt")
    _log(
        client,
        eid,
        "noprop-dt-cifar100",
        "train",
        "noprop-dt",
        "head",
        parent=parent,
        device="cpu",
        metrics={"seconds_per_step": 0.001, "train_memory_mb": 99.0},
    )
    _log(client, eid, "noprop-dt-cifar100", "evaluate", "noprop-dt", parent=parent, metrics={"accuracy": 0.9611})
    _log(
        client,
        eid,
        "noprop-ct-cifar100",
        "train",
        "noprop-ct",
        device="cpu",
        metrics={"seconds_per_step": 0.015, "train_memory_mb": 25.0},
    )

    # Table 11: offline runs log MAUVE in the reference LM's feature space only; ar-lm1b's evaluation also logs
    # its text samples
    shown = root / "samples.md"
    shown.write_text("# Samples: ar-lm1b, blockwise\n\n1. prompt `To be`\n   - generated: `, or not`\n")
    for name, blocks, mauve in (("ar-lm1b", 4, 0.91), ("ar-t11-b2", 2, 0.97)):
        parent = _experiment_runs(client, eid, name, blocks, seconds=(0.01,) * blocks)
        _log(
            client,
            eid,
            name,
            "evaluate",
            "blockwise",
            parent=parent,
            metrics={"mauve_reference": mauve, "mauve_minilm": 0.1},
            artifact=shown if name == "ar-lm1b" else None,
        )

    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    out = root / "results"
    written = tables.generate(params_path, out, tracking_uri=uri)
    return {"out": out, "written": written, "uri": uri, "params": params_path}


def _md_row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_files_written_for_every_fed_table(generated):
    out = generated["out"]
    for table_id in ("1", "7", "10", "12"):
        for ext in ("md", "csv", "tex"):
            assert (out / "tables" / f"table{table_id}.{ext}") in generated["written"]
            assert (out / "tables" / f"table{table_id}.{ext}").stat().st_size > 0
    assert not (out / "tables" / "table2.md").exists()  # no experiment feeds it
    assert (out / "tables" / "index.md") in generated["written"]
    assert all(Path(p).is_file() for p in generated["written"])
    assert not list(out.rglob("*.tmp"))


def test_table1_ours_beside_paper_and_latest_finished_run_wins(generated):
    text = (generated["out"] / "tables" / "table1.md").read_text()
    header = _md_row(text, "method")
    assert header[1] == "paper"
    assert header[2:4] == ["ours accuracy (%) (tiny)", "ours accuracy, chain from the noise mean (%) (tiny)"]
    # not 50.00 (older), 10.00 (FAILED), 99.00 (another config) or 98.00 (other evaluation settings); beside
    # the accuracy, the training cost: ms per step (the mean over the blocks' jobs) and memory (the largest job)
    assert header[4:] == ["ours ms / training step (tiny)", "ours training memory (MB) (tiny)"]
    assert _md_row(text, "DiffusionBlocks")[1:] == ["59.30", "87.31", "95.00", "11.0", "23.0"]
    # the chain's start is DiffusionBlocks' own: "—" for the methods without a chain, not "n/a"
    assert _md_row(text, "End-to-end backprop")[1:] == ["60.25", "90.12", "—", "30.0", "40.0"]
    # Forward-Forward measured, not quoted: mean ± std over its two seeds, its one job's cost
    assert _md_row(text, "Forward-Forward")[1:] == ["7.85", "72.00 ± 2.83", "—", "21.0 ± 1.4", "31.0 ± 1.4"]
    assert "not comparable" in text and "ff-cifar100 (2 seeds: ff-cifar100, ff-cifar100-seed1)" in text

    df = pd.read_csv(generated["out"] / "tables" / "table1.csv")
    assert {"method", "paper", "ours_accuracy", "ours_accuracy_mean_start"} <= set(df.columns)
    row = df.set_index("method").loc["DiffusionBlocks"]
    assert row["paper"] == pytest.approx(59.30) and row["ours_accuracy"] == pytest.approx(87.31)
    assert row["ours_accuracy_mean_start"] == pytest.approx(95.0)
    assert row["ours_ms_training_step"] == pytest.approx(11.0) and row["ours_training_memory_mb"] == pytest.approx(23.0)
    ff = df.set_index("method").loc["Forward-Forward"]
    assert (ff["ours_accuracy"], ff["ours_accuracy_std"], ff["ours_accuracy_n"]) == (
        pytest.approx(72.0),
        pytest.approx(2.828, abs=1e-3),
        2,
    )


def test_table6_noprop_rows_are_measured_with_their_training_cost(generated):
    text = (generated["out"] / "tables" / "table6.md").read_text()
    # NoProp-DT: its evaluation; ms per step the mean over its 3 block jobs (4, 5, 6 ms), memory the largest
    # block job's (23 MB): the head job (1 ms, 99 MB) is not a block
    assert _md_row(text, "NoProp-DT")[1:] == ["46.06", "96.11", "—", "5.0", "23.0"]
    assert _md_row(text, "NoProp-CT")[1:] == ["21.31", "n/a", "—", "15.0", "25.0"]  # trained, not evaluated yet
    assert _md_row(text, "NoProp-FM")[1:] == ["37.57", "—", "—", "—", "—"]  # no experiment runs it
    # an evaluation logged before the chain-start column: n/a, expected and missing
    assert _md_row(text, "DiffusionBlocks")[1:] == ["46.88", "85.55", "n/a", "11.0", "23.0"]
    assert "n/a in row 'NoProp-CT'" in text and "no evaluate run logged (noprop-ct-cifar100, noprop-ct)" in text
    assert "NoProp-tiny on digits" in text


def test_table6_backprop_row_comes_from_the_shared_baseline(generated):
    text = (generated["out"] / "tables" / "table6.md").read_text()
    assert _md_row(text, "DiffusionBlocks")[1:3] == ["46.88", "85.55"]
    assert _md_row(text, "Backprop")[1:] == ["47.80", "90.12", "—", "30.0", "40.0"]  # vit-cifar100's e2e runs
    assert "the end-to-end run of vit-cifar100, which noprop-cifar100 shares" in text


def test_table7_places_runs_by_split_and_partition(generated):
    df = pd.read_csv(generated["out"] / "tables" / "table7.csv").set_index("layer_split")
    assert {"paper_uniform", "paper_equiprobable", "ours_uniform", "ours_equiprobable"} <= set(df.columns)
    assert df.loc["[3, 6, 3]", "ours_uniform"] == pytest.approx(41.5)
    assert df.loc["[3, 6, 3]", "paper_uniform"] == pytest.approx(43.59)
    assert df.loc["[3, 6, 3]", "paper_equiprobable"] == pytest.approx(41.64)
    assert pd.isna(df.loc["[3, 6, 3]", "ours_equiprobable"])
    assert df[["ours_uniform", "ours_equiprobable"]].notna().sum().sum() == 1
    assert list(df.index) == ["[4, 4, 4]", "[3, 6, 3]", "[6, 4, 2]", "[2, 4, 6]"]

    text = (generated["out"] / "tables" / "table7.md").read_text()
    header = _md_row(text, "layer split")
    row = dict(zip(header, _md_row(text, "[4, 4, 4]")))
    assert row["paper uniform"] == "43.53" and row["paper equi-probability"] == "38.03"
    assert row["ours equi-probability (tiny)"] == "n/a"  # the [1, 1, 1] run, fid not logged
    assert row["ours uniform (tiny)"] == "—"  # no experiment there
    assert "fid not logged" in text
    assert "same proportions" in text


def test_table10_by_blocks_with_missing_fid(generated):
    text = (generated["out"] / "tables" / "table10.md").read_text()
    assert _md_row(text, "2")[1:4] == ["35.47", "35.00", "dit-t10-b2"]
    assert _md_row(text, "3")[1:4] == ["38.03", "n/a", "dit-t7-equiprob-444"]
    assert _md_row(text, "6")[1:3] == ["53.32", "—"]
    assert re.search(r"n/a in row '3'.*fid not logged", text)
    df = pd.read_csv(generated["out"] / "tables" / "table10.csv")
    assert list(df["b"]) == [1, 2, 3, 4, 6]
    assert "not logged" in df.loc[df["b"] == 3, "notes"].item()


def test_table11_shows_one_feature_space_the_first_any_run_logged(generated, tmp_path):
    """Offline, no run logs GPT-2 large MAUVE: the column is the reference-LM MAUVE, labelled so. Once any
    run logs GPT-2 large MAUVE (online), the whole column switches to it; rows without it read "—"
    rather than mixing feature spaces."""
    text = (generated["out"] / "tables" / "table11.md").read_text()
    assert "ours MAUVE (own reference-LM features)" in text
    assert _md_row(text, "2")[1:] == ["0.61", "0.97", "ar-t11-b2"]
    assert _md_row(text, "4")[1:] == ["0.67", "0.91", "ar-lm1b"]
    assert "not logged by any run here: MAUVE (GPT-2 large)" in text
    assert (generated["out"] / "figures" / "table11-mauve_reference-vs-blocks.png").is_file()

    db = tmp_path / "mlflow.db"  # a copy of the store, so the shared one stays as the other tests expect
    db.write_bytes(Path(generated["uri"].removeprefix("sqlite:///")).read_bytes())
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    eid = client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id
    _log(client, eid, "ar-t11-b2", "evaluate", "blockwise", metrics={"mauve_gpt2_large": 0.64, "mauve_reference": 0.97})
    tables.generate(generated["params"], tmp_path / "online", tracking_uri=f"sqlite:///{db}")
    text = (tmp_path / "online" / "tables" / "table11.md").read_text()
    assert "ours MAUVE (GPT-2 large)" in text
    assert _md_row(text, "2")[1:] == ["0.61", "0.64", "ar-t11-b2"]
    assert _md_row(text, "4")[1:] == ["0.67", "—", "ar-lm1b"]


def test_table11_shows_the_known_word_rate_and_next_token_loss_beside_mauve(generated, tmp_path):
    """Where the runs logged them, Table 11 shows the known-word rate and the next-token loss of the same runs
    beside its MAUVE column (at tiny scale MAUVE sits at its floor for every B); the figure keeps to MAUVE."""
    text = (generated["out"] / "tables" / "table11.md").read_text()
    assert "known-word rate" not in text  # no run logged it: no empty column

    db = tmp_path / "mlflow.db"
    db.write_bytes(Path(generated["uri"].removeprefix("sqlite:///")).read_bytes())
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    eid = client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id
    _log(
        client,
        eid,
        "ar-t11-b2",
        "evaluate",
        "blockwise",
        metrics={"mauve_reference": 0.97, "train_word_rate": 0.326, "next_token_bits": 3.386},
    )
    tables.generate(generated["params"], tmp_path / "out", tracking_uri=f"sqlite:///{db}")
    text = (tmp_path / "out" / "tables" / "table11.md").read_text()
    assert "| ours: known-word rate | ours: next-token bits/byte |" in text
    assert _md_row(text, "2")[1:] == ["0.61", "0.97", "ar-t11-b2", "0.33", "3.39"]
    assert _md_row(text, "6")[1:4] == ["0.62", "—", "—"]
    df = pd.read_csv(tmp_path / "out" / "tables" / "table11.csv")
    assert df.loc[df["b"] == 2, "train_word_rate"].item() == pytest.approx(0.326)  # the CSV keeps the value


def test_text_tables_link_the_samples_behind_their_numbers(generated):
    """A text evaluation's samples.md artifact is fetched beside the figures, and the table links it."""
    fetched = generated["out"] / "figures" / "samples-ar-lm1b-blockwise.md"
    assert fetched.read_text().startswith("# Samples: ar-lm1b, blockwise")
    text = (generated["out"] / "tables" / "table11.md").read_text()
    assert "Samples behind these numbers" in text and "(../figures/samples-ar-lm1b-blockwise.md)" in text
    index = (generated["out"] / "tables" / "index.md").read_text()
    assert "samples-ar-t11-b2-blockwise.md" in index  # its run logged none: listed as not drawn, with why


def test_table12_timings(generated):
    df = pd.read_csv(generated["out"] / "tables" / "table12.csv").set_index("row")
    assert df.loc["End-to-end", "ours"] == pytest.approx(0.03)
    assert df.loc["End-to-end", "paper"] == pytest.approx(0.0507)
    assert df.loc["block 2 (1 layer)", "ours"] == pytest.approx(0.011)
    assert df.loc["block 2 (1 layer)", "paper"] == pytest.approx(0.0181)
    assert df.loc["sum over 3 blocks", "ours"] == pytest.approx(0.033)
    assert df.loc["sum over 3 blocks", "paper"] == pytest.approx(0.0543)
    assert df.loc["ratio sum / end-to-end", "ours"] == pytest.approx(1.1)
    assert df.loc["ratio sum / end-to-end", "paper"] == pytest.approx(0.0543 / 0.0507, abs=1e-3)
    assert df.loc["End-to-end", "device"] == "cpu"
    text = (generated["out"] / "tables" / "table12.md").read_text()
    assert _md_row(text, "sum over 3 blocks")[1:3] == ["0.0543", "0.0330"]
    assert "device where that job ran" in text


def test_tex_is_a_tabular(generated):
    tex = (generated["out"] / "tables" / "table7.tex").read_text()
    # layer split, paper x2, ours x2, our class agreement x2 (digits), then the inference cost (layer evals,
    # ms per sample) per partition
    body = tex[tex.index(r"\begin{tabular}{lrrrrrrrrrr}") : tex.index(r"\end{tabular}")]
    rows = [line for line in body.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 5  # header + 4 splits
    assert all(line.count("&") == 10 for line in rows)
    assert "class agreement" in rows[0]
    assert "41.50" in body and "---" in body and "0.812" in body  # FID and class agreement of the same run
    assert r"{[}3, 6, 3{]} & 43.59" in body  # a row starting with [ would be read as \\[length]
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    t1 = (generated["out"] / "tables" / "table1.tex").read_text()
    assert r"accuracy (\%)" in t1 and "87.31" in t1


def test_figures_are_pngs(generated):
    figures = generated["out"] / "figures"
    expected = [
        "curves-vit-cifar100.png",
        "curves-dit-t10-b2.png",
        "table10-fid-vs-blocks.png",
        "table7-partition.png",
        "samples-dit-t7-uniform-363-blockwise.png",
    ]
    for name in expected:
        assert figures / name in generated["written"]
        with Image.open(figures / name) as image:
            assert image.format == "PNG"
            image.verify()
    with Image.open(figures / "samples-dit-t7-uniform-363-blockwise.png") as image:
        assert image.size == (24, 16)  # the artifact itself, downloaded
    assert not (figures / "samples-dit-t7-equiprob-444-blockwise.png").exists()


def test_index_lists_tables_and_undrawn_figures(generated):
    text = (generated["out"] / "tables" / "index.md").read_text()
    for table_id in ("1", "7", "10", "12"):
        assert f"[md](table{table_id}.md)" in text
    assert "not comparable" in text
    assert "(../figures/table7-partition.png)" in text
    undrawn = text[text.index("## Figures not drawn") :]
    assert "samples-dit-t7-equiprob-444-blockwise.png" in undrawn and "no samples.png" in undrawn


def test_main_and_tracking_uri_precedence(generated, tmp_path, monkeypatch, capsys):
    params = tables.read_params(generated["params"])
    assert tables.tracking_uri_for(params) == "sqlite:///nowhere.db"
    assert tables.tracking_uri_for(params, "sqlite:///arg.db") == "sqlite:///arg.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", generated["uri"])
    assert tables.tracking_uri_for(params, "sqlite:///arg.db") == generated["uri"]
    # the environment wins over a bogus argument: same numbers as before (through `dblocks tables`)
    from dblocks.cli import main

    assert (
        main(
            [
                "tables",
                "--params",
                str(generated["params"]),
                "--out",
                str(tmp_path),
                "--tracking-uri",
                "sqlite:///bogus.db",
            ]
        )
        == 0
    )
    assert f"files under {tmp_path}" in capsys.readouterr().out and (tmp_path / "tables" / "index.md").is_file()
    assert (tmp_path / "tables" / "table1.csv").read_text() == (generated["out"] / "tables" / "table1.csv").read_text()


def test_no_runs_gives_na_tables(generated, tmp_path):
    params = {**PARAMS, "tracking": {"uri": "sqlite:///nowhere.db", "experiment": "never-logged"}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    written = tables.generate(params_path, tmp_path / "out", tracking_uri=generated["uri"])
    text = (tmp_path / "out" / "tables" / "table1.md").read_text()
    assert _md_row(text, "DiffusionBlocks")[1:] == ["59.30", "n/a", "n/a", "n/a", "n/a"]
    assert "no evaluate run logged" in text and "no train run logged" in text
    assert not [p for p in written if p.suffix == ".png"]
    index = (tmp_path / "out" / "tables" / "index.md").read_text()
    assert "warning: MLflow experiment `never-logged` has no runs" in index
    assert "`table10-fid-vs-blocks.png`: no fid logged yet" in index


def test_paper_numbers_and_param_parsing():
    assert paper.paper_value("1", "accuracy", method="blockwise") == 59.30
    assert paper.paper_value("7", "equiprobable", layer_split=(2, 4, 6)) == 40.40
    assert paper.paper_value("10", "fid", blocks=6) == 53.32
    assert paper.paper_value("8", "fid", blocks=2) == 9.90
    assert paper.paper_value("2", "fid_test", setting="imagenet", method="blockwise") == 10.63
    assert paper.paper_value("4", "mauve", setting="owt", method="e2e") == 0.85
    assert paper.paper_value("12", "seconds", row="sum") == 0.0543
    assert all(r["values"]["fid"] is None for r in paper.PAPER_TABLES["gamma"]["rows"])
    assert paper.table_ids()[:3] == ["1", "2", "3"] and paper.table_ids()[-1] == "gamma"
    assert tables.parse_param("[4, 4, 4]") == [4, 4, 4]
    assert tables.parse_param("None") is None
    assert tables.parse_param("0.0") == 0.0
    assert tables.parse_param("uniform") == "uniform"


def test_online_only_metrics_read_not_run_rather_than_missing():
    """GPT-2 large MAUVE and the Llama-2 / GPT2-XL judges need a download; a finished offline run without
    them shows "—" (not run here), while an offline metric that is absent stays n/a."""
    from dblocks.tables import DASH, NA, ONLINE_METRICS, metric_cell

    class Index:
        seeds: dict = {}

        def latest(self, experiment, job, method, block):
            return SimpleNamespace(metrics={"mauve_reference": 0.9}, short="abcd1234"), ""

    assert "mauve_gpt2_large" in ONLINE_METRICS
    assert metric_cell(Index(), "ar", "e2e", "mauve_gpt2_large").text == DASH
    assert metric_cell(Index(), "ar", "e2e", "gen_ppl_reference").text == NA
    assert metric_cell(Index(), "ar", "e2e", "mauve_reference").text == "0.90"


# ------------------------------------------------------------------ runs of this configuration only

OTHER_CONFIG, OTHER_EVAL = "00000000000000aa", "00000000000000bb"


def test_runs_of_other_configurations_read_na_with_the_reason_never_an_older_number(tmp_path):
    """A cell reads only runs whose config hash (and, for evaluations, evaluation hash) is the params
    file's: stale runs give n/a with the reason, whatever their age; a matching run gives its number, and
    of several matching reruns the newest wins. Curves and sample grids follow the same rule, and a shared
    baseline must match the hash of the experiment that trains it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    config_hash, eval_hash = _hashes()["vit-cifar100"]
    grid = tmp_path / "samples.png"
    Image.new("RGB", (8, 8)).save(grid)

    # only stale runs: two evaluations of another configuration (the newest runs in the store), one with
    # other evaluation settings, a training run of another configuration, and for the shared baseline an
    # end-to-end evaluation tagged with noprop-cifar100's hash instead of vit-cifar100's
    for accuracy in (0.91, 0.92):
        _log(
            client,
            eid,
            "vit-cifar100",
            "evaluate",
            "blockwise",
            metrics={"accuracy": accuracy},
            config_hash=OTHER_CONFIG,
        )
    _log(client, eid, "vit-cifar100", "evaluate", "e2e", metrics={"accuracy": 0.93}, eval_hash=OTHER_EVAL)
    _log(
        client,
        eid,
        "vit-cifar100",
        "evaluate",
        "e2e",
        metrics={"accuracy": 0.94},
        config_hash=_hashes()["noprop-cifar100"][0],
    )
    _log(client, eid, "vit-cifar100", "train", "blockwise", "1", config_hash=OTHER_CONFIG, history=[1.0, 0.5])
    _log(client, eid, "dit-t10-b2", "evaluate", "blockwise", metrics={"fid": 12.0}, artifact=grid, eval_hash=OTHER_EVAL)

    out = tmp_path / "stale"
    tables.generate(params_path, out, tracking_uri=uri)
    text = (out / "tables" / "table1.md").read_text()
    assert _md_row(text, "DiffusionBlocks")[1:3] == ["59.30", "n/a"]
    assert _md_row(text, "End-to-end backprop")[1:3] == ["60.25", "n/a"]
    assert (
        f"no evaluate run of this configuration (config_hash {config_hash}); 2 runs of other configurations exist"
    ) in text
    assert (
        f"no evaluate run with this file's evaluation settings (eval_hash {eval_hash}); 1 run of this "
        f"configuration with other evaluation settings exists"
    ) in text
    for value in ("91.00", "92.00", "93.00", "94.00"):
        assert value not in text
    table6 = (out / "tables" / "table6.md").read_text()
    assert _md_row(table6, "Backprop")[1:3] == ["47.80", "n/a"]  # noprop's hash is not vit-cifar100's
    assert "94.00" not in table6
    index = (out / "tables" / "index.md").read_text()
    assert "`curves-vit-cifar100.png`: no finished train run of this configuration" in index
    assert "`samples-dit-t10-b2-blockwise.png`: no evaluate run with this file's evaluation settings" in index
    assert not (out / "figures" / "samples-dit-t10-b2-blockwise.png").exists()
    assert f"| vit-cifar100 | `{config_hash}` | `{eval_hash}` |" in index
    assert "/runs?workflowType=machine_learning&viewStateShareKey=dblocks>" in index
    assert "6 runs of these experiments, of other configurations or evaluation settings, were left out" in index

    # the runs of this configuration arrive: their numbers are shown, the newest rerun's where there are two
    parent = _log(client, eid, "vit-cifar100", "parent", with_params=True)
    _log(client, eid, "vit-cifar100", "train", "blockwise", "1", parent=parent, history=[2.0, 1.0, 0.7])
    _log(client, eid, "vit-cifar100", "evaluate", "blockwise", parent=parent, metrics={"accuracy": 0.80})
    _log(client, eid, "vit-cifar100", "evaluate", "blockwise", parent=parent, metrics={"accuracy": 0.85})
    _log(client, eid, "vit-cifar100", "evaluate", "e2e", parent=parent, metrics={"accuracy": 0.90})
    _log(client, eid, "dit-t10-b2", "evaluate", "blockwise", metrics={"fid": 30.0}, artifact=grid)
    out = tmp_path / "current"
    tables.generate(params_path, out, tracking_uri=uri)
    text = (out / "tables" / "table1.md").read_text()
    assert _md_row(text, "DiffusionBlocks")[1:3] == ["59.30", "85.00"]
    assert _md_row(text, "End-to-end backprop")[1:3] == ["60.25", "90.00"]
    assert not [
        line
        for line in text.splitlines()  # their accuracies are there (no e2e train run logs a cost here)
        if line.startswith(("- n/a in row 'DiffusionBlocks'", "- n/a in row 'End-to-end")) and "'ours (tiny" in line
    ]
    assert f"config {config_hash}, evaluation {eval_hash}" in text  # the sources name the hashes
    assert _md_row((out / "tables" / "table6.md").read_text(), "Backprop")[1:3] == ["47.80", "90.00"]
    assert _md_row((out / "tables" / "table10.md").read_text(), "2")[1:4] == ["35.47", "30.00", "dit-t10-b2"]
    assert (out / "figures" / "curves-vit-cifar100.png").is_file()
    assert (out / "figures" / "samples-dit-t10-b2-blockwise.png").is_file()


def test_a_changed_evaluation_section_leaves_old_evaluations_out(tmp_path):
    """The evaluation hash covers the params file's evaluation settings, which the config hash does not:
    more samples make the old FID n/a (same configuration, other settings), not a stale number."""
    changed = {**PARAMS, "evaluation": {**PARAMS["evaluation"], "samples": 16}}
    text_yaml = yaml.safe_dump(changed, sort_keys=False)
    assert _hashes(text_yaml)["dit-t10-b2"][0] == _hashes()["dit-t10-b2"][0]  # same configuration
    assert _hashes(text_yaml)["dit-t10-b2"][1] != _hashes()["dit-t10-b2"][1]  # other evaluation settings
    assert _hashes(text_yaml)["vit-cifar100"] == _hashes()["vit-cifar100"]  # classification reads neither
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    _log(client, eid, "dit-t10-b2", "evaluate", "blockwise", metrics={"fid": 30.0})
    params_path = tmp_path / "params.yaml"
    params_path.write_text(text_yaml)
    tables.generate(params_path, tmp_path / "out", tracking_uri=uri)
    text = (tmp_path / "out" / "tables" / "table10.md").read_text()
    assert _md_row(text, "2")[1:4] == ["35.47", "n/a", "dit-t10-b2"]
    assert "other evaluation settings" in text


def test_an_evaluation_logged_before_eval_hashes_says_to_rerun_it():
    tags = {
        "dblocks.experiment": "x",
        "dblocks.job": "evaluate",
        "dblocks.method": "blockwise",
        "dblocks.config_hash": "c" * 16,
        "dblocks.scale": "tiny",
    }
    old = tables.RunInfo("a" * 32, "FINISHED", 1, 2, tags, {}, {"accuracy": 0.5})
    index = tables.RunIndex([old], "tiny", {"x": ("c" * 16, "e" * 16)})
    run, why = index.latest("x", "evaluate", "blockwise")
    assert run is None and "no eval_hash: logged before evaluation settings were recorded" in why
    assert index.stale() == 1 and tables.RunIndex([old], "tiny").latest("x", "evaluate", "blockwise")[0] is old


def test_a_run_of_another_or_no_scale_never_fills_a_cell():
    tags = {"dblocks.experiment": "x", "dblocks.job": "evaluate", "dblocks.method": "blockwise"}
    runs = [
        tables.RunInfo(str(i) * 32, "FINISHED", 1, 2, {**tags, **extra}, {}, {"accuracy": 0.5})
        for i, extra in enumerate([{}, {"dblocks.scale": "smoke"}, {"dblocks.scale": "tiny"}])
    ]
    assert [r.run_id for r in tables.RunIndex(runs, "tiny").runs] == ["2" * 32]


def test_a_metric_the_evaluation_was_not_asked_for_reads_not_run_here():
    """mauve_features / hf_judges choose what an evaluation computes (a smoke run: reference-lm only): a
    metric the run's logged settings did not ask for reads "—" (not run here), one they asked for reads n/a."""
    run = tables.RunInfo(
        "r" * 32,
        "FINISHED",
        1,
        2,
        {},
        {"evaluation.mauve_features": '["reference-lm"]', "evaluation.hf_judges": "[]"},
        {"mauve_reference": 0.5},
    )
    index = SimpleNamespace(latest=lambda *args: (run, ""), seeds={})
    cell = functools.partial(tables.metric_cell, index, "ar-lm1b", "blockwise")
    assert cell("mauve_reference").text == "0.50"
    assert cell("mauve_minilm").text == cell("gen_ppl_llama2").text == tables.DASH
    asked = tables.RunInfo("s" * 32, "FINISHED", 1, 2, {}, {"evaluation.mauve_features": '["minilm"]'}, {})
    index.latest = lambda *args: (asked, "")
    assert cell("mauve_minilm").text == tables.NA and "mauve_minilm not logged" in cell("mauve_minilm").note


def test_an_experiment_run_with_several_seeds_reads_as_mean_std_and_n(tmp_path):
    """pipeline.seeds: 3 -> the experiment and two repeats with seeds 1 and 2 (own hashes, own runs); a cell of
    the experiment aggregates the seeds' values (mean, sample std, n), names the seeds it lacks, lists every run
    among its sources, and the CSV carries std and n beside the mean."""
    params = {
        **PARAMS,
        "experiments": {
            "vit": {
                "task": "classification",
                "arch": "ViT-micro",
                "blocks": 3,
                "pipeline": {"tables": ["1"], "methods": ["blockwise"], "seeds": 3},
            }
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    info = tables.read_params(path)
    assert list(info.experiments) == ["vit"] and list(info.experiments["vit"].replicates) == ["vit-seed1", "vit-seed2"]
    hashes = info.hashes()
    assert len({config for config, _ in hashes.values()}) == 3  # three trainings, not one
    assert info.seeds() == {"vit": ["vit", "vit-seed1", "vit-seed2"]}

    def run(name: str, accuracy: float, k: int) -> tables.RunInfo:
        tags = {
            "dblocks.experiment": name,
            "dblocks.scale": "tiny",
            "dblocks.job": "evaluate",
            "dblocks.method": "blockwise",
            "dblocks.config_hash": hashes[name][0],
            "dblocks.eval_hash": hashes[name][1],
        }
        return tables.RunInfo(f"{k:032d}", "FINISHED", k, k + 1, tags, {}, {"accuracy": accuracy})

    two = tables.RunIndex([run("vit", 0.90, 1), run("vit-seed1", 0.94, 2)], "tiny", hashes, info.seeds())
    cell = tables.metric_cell(two, "vit", "blockwise", "accuracy", 100.0)
    assert (cell.value, cell.n, cell.text) == (pytest.approx(92.0), 2, "92.00 ± 2.83")
    assert cell.std == pytest.approx(2**1.5) and "2 of 3 seeds" in cell.note and "vit-seed2" in cell.note
    three = tables.RunIndex(
        [run("vit", 0.90, 1), run("vit-seed1", 0.94, 2), run("vit-seed2", 0.92, 3)], "tiny", hashes, info.seeds()
    )
    cell = tables.metric_cell(three, "vit", "blockwise", "accuracy", 100.0)
    assert (cell.value, cell.std, cell.n, cell.note) == (pytest.approx(92.0), pytest.approx(2.0), 3, "")
    assert sorted(r.tag("experiment") for r in cell.sources) == ["vit", "vit-seed1", "vit-seed2"]
    table = tables.Table(
        "1",
        "t",
        [],
        [tables.Column("label", "Method", "method", "label"), tables.Column("ours", "Ours", "ours_accuracy", "ours")],
        rows=[{"label": tables.Cell("DiffusionBlocks"), "ours": cell}],
    )
    assert tables.render_csv(table).splitlines() == [
        "method,ours_accuracy,ours_accuracy_std,ours_accuracy_n,notes",
        "DiffusionBlocks,92,2,3,",
    ]
    assert "92.00 ± 2.00" in tables.render_md(table) and len(table.sources()) == 3
    index_md = tables.render_index(info, [table], [], [], [], tmp_path)
    assert all(f"| {name} | `{config}` | `{evaluation}` |" in index_md for name, (config, evaluation) in hashes.items())
