"""MLflow tracking: parent runs from a params file (idempotent), child runs from tracked CLI jobs, four
processes logging to one SQLite store at once, a tracking outage that costs the job nothing, and the
runs as a real MLflow server (on loopback) returns them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from dblocks.checkpoint import load_metadata
from dblocks.cli import main
from dblocks.config import config_hash
from dblocks.io import flatten
from dblocks.params import Params
from dblocks.tracking import (
    DEFAULT_URI,
    EXPERIMENT_KIND_TAG,
    JobRun,
    _retry,
    headline_metrics,
    init_runs,
    resolve_uri,
    sync_journals,
)
from tests.conftest import run_record
from tests.ui_server import ui_server, wait_healthy

VENV_BIN = Path(sys.executable).parent
PARAMS = """\
scale: tiny
tracking:
  uri: sqlite:///mlflow.db
  experiment: dblocks-test
resources: {gpu: 0, mem_mb: 1000, runtime: 10, threads: 1}
evaluation: {samples: 8, sample_steps: 2, fid_features: digits}
defaults:
  dataset: digits
  seed: 0
  device: cpu
templates:
  vit: &vit
    task: classification
    arch: ViT-micro
    blocks: 3
    train: {steps: 4, batch_size: 8, warmup: 1, log_every: 2, checkpoint_every: 2}
experiments:
  micro-a:
    <<: *vit
    pipeline: {tables: ["1", "12"], methods: [blockwise, e2e]}
  micro-b:
    <<: *vit
    overlap: 0.1
    pipeline: {tables: ["6"], methods: [blockwise]}
"""
MICRO = (
    "--arch ViT-micro --blocks 3 --steps 4 --batch-size 8 --device cpu --no-progress --set train.log_every=2"
).split()


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    params = root / "params.yaml"
    params.write_text(PARAMS)
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the environment would win over `uri`
        paths = init_runs(params, root / "runs", uri)
    return SimpleNamespace(
        root=root,
        params=params,
        uri=uri,
        paths=paths,
        client=mlflow.MlflowClient(uri),
        record={p.name.split(".")[0]: json.loads(p.read_text()) for p in paths},
    )


@pytest.fixture(scope="module")
def server(store):
    """The MLflow UI on the store's SQLite file as users start it (``dblocks ui``, after init_runs made
    the store), started early: it boots while the in-process tests run."""
    with ui_server(store.uri, store.root / "server.log", cwd=store.root) as running:
        yield running


def _children(store, parent_id: str) -> list:
    return store.client.search_runs(
        [store.record["micro-a"]["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------ unit


def test_resolve_uri_and_flatten(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == DEFAULT_URI == "sqlite:///mlflow.db"
    assert resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert resolve_uri("http://127.0.0.1:5000") == "sqlite:///other.db"
    flat = flatten(
        {"train": {"lr": 0.001, "steps": 4}, "layer_split": [3, 6, 3], "name": "x", "seed": None}, as_strings=True
    )
    assert flat == {"train.lr": "0.001", "train.steps": "4", "layer_split": "[3, 6, 3]", "name": "x", "seed": "null"}


def test_retry_backs_off_only_on_locked_database():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert _retry(flaky) == "ok" and len(calls) == 3
    calls.clear()

    def broken():
        calls.append(1)
        raise RuntimeError("no such table: runs")

    with pytest.raises(RuntimeError, match="no such table"):
        _retry(broken)
    assert len(calls) == 1


# ----------------------------------------------------------------------------------- parent runs


def test_init_runs_creates_parent_runs_once(store, server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert sorted(store.paths) == [run_record(store.root / "runs", store.params, e) for e in ("micro-a", "micro-b")]
    assert store.paths[0].name == f"micro-a.{config_hash(Params.load(store.params).experiments['micro-a'])}.json"
    exp = store.client.get_experiment_by_name("dblocks-test")
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"  # the UI opens on the runs table
    for name, tables, methods in (("micro-a", "1,12", "blockwise,e2e"), ("micro-b", "6", "blockwise")):
        rec = store.record[name]
        assert rec == {
            "tracking_uri": store.uri,
            "mlflow_experiment": "dblocks-test",
            "experiment_id": exp.experiment_id,
            "parent_run_id": rec["parent_run_id"],
            "experiment": name,
            "scale": "tiny",
            "data": "data/prepared/digits",
        }
        run = store.client.get_run(rec["parent_run_id"])
        config = Params.load(store.params).experiments[name]
        assert run.info.status == "FINISHED" and run.info.run_name == name
        tags = run.data.tags
        assert tags["dblocks.job"] == "parent" and tags["dblocks.experiment"] == name
        assert tags["dblocks.scale"] == "tiny" and tags["dblocks.block"] == ""
        assert tags["dblocks.tables"] == tables and tags["dblocks.method"] == methods
        assert tags["dblocks.config_hash"] == config_hash(config) and "dblocks.git_commit" in tags
        assert "mlflow.parentRunId" not in tags
        assert run.data.params["arch"] == "ViT-micro" and run.data.params["train.steps"] == "4"
        assert run.data.params["pipeline.tables"] == json.dumps(config["pipeline"]["tables"])
        assert run.data.params == flatten(config, as_strings=True)

    # again, through the CLI: same parents, no duplicates, files untouched
    before = {p.name: p.read_text() for p in store.paths}
    mtimes = {p.name: p.stat().st_mtime_ns for p in store.paths}
    assert (
        run_cli("track-init", "--params", store.params, "--out-dir", store.root / "runs", "--tracking-uri", store.uri)
        == 0
    )
    assert {p.name: p.read_text() for p in store.paths} == before
    assert {p.name: p.stat().st_mtime_ns for p in store.paths} == mtimes
    parents = store.client.search_runs([exp.experiment_id], filter_string="tags.`dblocks.job` = 'parent'")
    assert sorted(r.info.run_id for r in parents) == sorted(r["parent_run_id"] for r in store.record.values())
    assert not list((store.root / "runs").glob("*.tmp*"))


def test_init_runs_replaces_a_deleted_parent(store, tmp_path):
    out = tmp_path / "runs"
    (path,) = [p for p in init_runs(store.params, out, store.uri) if p.name.startswith("micro-b.")]
    first = json.loads(path.read_text())["parent_run_id"]
    assert init_runs(store.params, out, store.uri) and json.loads(path.read_text())["parent_run_id"] == first
    store.client.delete_run(first)
    init_runs(store.params, out, store.uri)
    second = json.loads(path.read_text())["parent_run_id"]
    assert second != first and store.client.get_run(second).info.status == "FINISHED"


def test_track_init_fails_loudly_without_a_store(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        run_cli(
            "track-init",
            "--params",
            store.params,
            "--out-dir",
            tmp_path / "runs",
            "--tracking-uri",
            "http://127.0.0.1:9",
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("dblocks track-init: error: tracking store http://127.0.0.1:9") and "\n" not in err
    assert not list(tmp_path.glob("runs/*.json"))


def test_track_options_validate_first(store, tmp_path, capsys):
    assert run_cli("track-init", "--params", tmp_path / "nope.yaml", "--out-dir", tmp_path / "runs") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--params" in err and "file not found" in err
    out = tmp_path / "b1.safetensors"
    assert run_cli("train-block", *MICRO, "--block", 1, "--out", out, "--track", tmp_path / "x.json") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--track {tmp_path / 'x.json'}: file not found") and err.count("\n") == 0
    assert not out.exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ child runs


def test_tracked_cli_jobs_are_child_runs(store, tmp_path, capsys):
    rec = store.record["micro-a"]
    track = run_record(store.root / "runs", store.params, "micro-a")
    exp_args = ["--config", store.params, "--experiment", "micro-a", *MICRO]
    blocks = [tmp_path / f"block-{b}.safetensors" for b in (1, 2, 3)]
    for b, path in enumerate(blocks, 1):
        assert run_cli("train-block", *exp_args, "--block", b, "--out", path, "--track", track) == 0
    assert run_cli("assemble", *blocks, "--out", tmp_path / "model.safetensors") == 0
    assert run_cli("evaluate", tmp_path / "model.safetensors", "--out", tmp_path / "eval.json", "--track", track) == 0
    assert "warning" not in capsys.readouterr().err

    runs = {r.info.run_name: r for r in _children(store, rec["parent_run_id"])}
    assert {"micro-a block 1", "micro-a block 2", "micro-a block 3", "micro-a evaluate blockwise"} <= set(runs)
    for b, path in enumerate(blocks, 1):
        run = runs[f"micro-a block {b}"]
        tags, metrics = run.data.tags, run.data.metrics
        assert run.info.status == "FINISHED" and run.info.experiment_id == rec["experiment_id"]
        assert tags["dblocks.block"] == str(b) and tags["dblocks.method"] == "blockwise"
        assert tags["dblocks.job"] == "train" and tags["dblocks.experiment"] == "micro-a"
        assert tags["dblocks.tables"] == "1,12" and tags["dblocks.scale"] == "tiny"
        meta = load_metadata(path)
        assert tags["dblocks.config_hash"] == meta["config_hash"]
        assert tags["checkpoint_sha256"] == meta["sha256"] and tags["checkpoint_path"] == str(path)
        assert _steps(store.client, run.info.run_id, "train_loss") == [2, 4]  # one point per log_every
        assert _steps(store.client, run.info.run_id, "lr") == [2, 4]
        history = {m.step: m.value for m in store.client.get_metric_history(run.info.run_id, "train_loss")}
        assert history == pytest.approx(dict(meta["losses"]), rel=1e-4)
        assert metrics["final_loss"] == pytest.approx(meta["final_loss"])
        assert metrics["train_seconds"] > 0 and metrics["seconds_per_step"] == pytest.approx(
            metrics["train_seconds"] / 4
        )
        assert run.data.params["train.steps"] == "4" and run.data.params["train.log_every"] == "2"
        assert [f.path for f in store.client.list_artifacts(run.info.run_id, "checkpoints")] == [
            f"checkpoints/{path.stem}.json"
        ]

    ev = runs["micro-a evaluate blockwise"]
    record = json.loads((tmp_path / "eval.json").read_text())
    assert ev.data.tags["dblocks.job"] == "evaluate" and ev.data.tags["dblocks.method"] == "blockwise"
    assert ev.data.tags["dblocks.block"] == "" and ev.data.tags["split"] == "test"
    assert ev.data.tags["model_sha256"] == record["model_sha256"]
    assert ev.data.metrics["accuracy"] == pytest.approx(record["accuracy"])
    assert ev.data.metrics["examples"] == record["examples"] and "eval_seconds" in ev.data.metrics
    # the evaluation record and run name the configuration, the code and the evaluation settings
    params = Params.load(store.params)
    assert record["config_hash"] == params.hash("micro-a") == ev.data.tags["dblocks.config_hash"]
    assert record["git_commit"] == (ev.data.tags["dblocks.git_commit"] or None)
    assert record["eval_hash"] == params.eval_hash("micro-a") == ev.data.tags["dblocks.eval_hash"]
    assert (
        record["evaluation"]
        == params.evaluation_settings("micro-a")
        == {"task": "classification", "protocol": 2, "split": "test", "seed": 0, "weights": "auto"}
    )
    assert ev.data.params["evaluation.split"] == "test" and ev.data.params["evaluation.seed"] == "0"
    assert record["weights"] == ev.data.tags["dblocks.weights"] == "raw"  # auto, and no average was kept
    # ... and the parent run shows the result at a glance
    parent = store.client.get_run(rec["parent_run_id"])
    assert parent.data.metrics["blockwise.accuracy"] == pytest.approx(record["accuracy"])

    # a finished block is skipped, and makes no run
    before = len(_children(store, rec["parent_run_id"]))
    assert run_cli("train-block", *exp_args, "--block", 1, "--out", blocks[0], "--track", track) == 0
    assert len(_children(store, rec["parent_run_id"])) == before


def test_tracked_baseline_and_paper_mode(store, tmp_path):
    parent = store.record["micro-b"]["parent_run_id"]
    track = run_record(store.root / "runs", store.params, "micro-b")
    exp_args = ["--config", store.params, "--experiment", "micro-b", *MICRO]
    assert run_cli("train-baseline", *exp_args, "--out", tmp_path / "e2e.safetensors", "--track", track) == 0
    assert run_cli("train-shared", *exp_args, "--out-dir", tmp_path / "paper", "--track", track) == 0
    runs = {
        r.info.run_name: r
        for r in store.client.search_runs(
            [store.record["micro-b"]["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"
        )
    }
    e2e, paper = runs["micro-b e2e"], runs["micro-b paper"]
    assert e2e.data.tags["dblocks.method"] == "e2e" and e2e.data.tags["dblocks.block"] == ""
    assert e2e.data.tags["checkpoint_sha256"] == load_metadata(tmp_path / "e2e.safetensors")["sha256"]
    assert paper.data.tags["dblocks.method"] == "paper" and paper.data.tags["dblocks.block"] == ""
    for b in (1, 2, 3):
        meta = load_metadata(tmp_path / "paper" / f"block-{b}.safetensors")
        assert paper.data.tags[f"checkpoint_sha256.block{b}"] == meta["sha256"]
    assert _steps(store.client, paper.info.run_id, "train_loss") == [2, 4, 6, 8, 10, 12]  # B x steps
    assert paper.data.metrics["seconds_per_step"] == pytest.approx(paper.data.metrics["train_seconds"] / 12)


def test_job_failure_marks_run_failed_and_propagates(store):
    config = Params.load(store.params).experiments["micro-b"]
    with pytest.raises(ZeroDivisionError):
        with JobRun(run_record(store.root / "runs", store.params, "micro-b"), "train", "blockwise", 2, config) as run:
            run.log_step(2, 1.5, 1e-3)
            raise ZeroDivisionError("the job fails")
    failed = store.client.get_run(run.run_id)
    assert failed.info.status == "FAILED" and _steps(store.client, run.run_id, "train_loss") == [2]


# --------------------------------------------------------------------------------------- outages


def test_unreachable_server_costs_the_job_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    track = tmp_path / "run.json"  # port 9 (discard): nothing listens on loopback
    track.write_text(
        json.dumps(
            {
                "tracking_uri": "http://127.0.0.1:9",
                "mlflow_experiment": "x",
                "experiment_id": "1",
                "parent_run_id": "0" * 32,
                "experiment": "x",
                "scale": "micro",
            }
        )
    )
    out = tmp_path / "block-1.safetensors"
    t0 = time.time()
    assert run_cli("train-block", *MICRO, "--block", 1, "--out", out, "--track", track) == 0
    assert time.time() - t0 < 30
    captured = capfd.readouterr()  # file-descriptor level: also whatever MLflow's loggers print
    warnings = [line for line in captured.err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "MLflow tracking off" in warnings[0], captured.err
    assert "127.0.0.1:9" in warnings[0]
    assert load_metadata(out)["block"] == 1 and "wrote" in captured.out


def test_missing_sqlite_store_costs_the_job_nothing(tmp_path, capsys):
    (tmp_path / "not-a-dir").write_text("")
    track = tmp_path / "run.json"
    track.write_text(
        json.dumps(
            {
                "tracking_uri": f"sqlite:///{tmp_path}/not-a-dir/mlflow.db",
                "mlflow_experiment": "x",
                "experiment_id": "1",
                "parent_run_id": "0" * 32,
                "experiment": "x",
                "scale": "micro",
            }
        )
    )
    out = tmp_path / "block-2.safetensors"
    assert run_cli("train-block", *MICRO, "--block", 2, "--out", out, "--track", track) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "MLflow tracking off" in warnings[0] and "no such tracking database" in warnings[0]
    assert load_metadata(out)["block"] == 2 and (tmp_path / "not-a-dir").is_file()


# ---------------------------------------------------------------------------------------- server


def _listening(port: int) -> list[str]:
    """The addresses with a socket listening on ``port`` (IPv4 and IPv6), from the kernel's tables."""
    import ipaddress

    found = []
    for table, _width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
                found.append(str(ipaddress.ip_address(raw)))
    return sorted(set(found))


def test_server_returns_parent_and_child_runs(store, server, monkeypatch):
    rec = store.record["micro-b"]
    config = Params.load(store.params).experiments["micro-b"]
    with JobRun(run_record(store.root / "runs", store.params, "micro-b"), "train", "blockwise", 3, config) as direct:
        direct.log_step(2, 0.5, 1e-3)
    wait_healthy(server)
    assert _listening(server.port) == ["127.0.0.1"]  # loopback only, unless the user passes --host
    # a job may also log through the server (same store, same parent)
    via_server = store.root / "runs" / "micro-b-http.json"
    via_server.write_text(json.dumps({**rec, "tracking_uri": server.url}))
    with JobRun(via_server, "train", "blockwise", 1, config) as http_run:
        http_run.log_step(2, 0.25, 1e-3)
    assert http_run.enabled and http_run.run_id

    body = json.dumps({"experiment_ids": [rec["experiment_id"]], "max_results": 1000}).encode()
    req = urllib.request.Request(
        f"{server.url}/api/2.0/mlflow/runs/search",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        found = {r["info"]["run_id"]: r for r in json.loads(resp.read())["runs"]}
    assert rec["parent_run_id"] in found and store.record["micro-a"]["parent_run_id"] in found
    for child in (direct.run_id, http_run.run_id):
        tags = {t["key"]: t["value"] for t in found[child]["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == rec["parent_run_id"] and tags["dblocks.job"] == "train"
        assert found[child]["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in found[http_run.run_id]["data"]["metrics"]}
    assert metrics["train_loss"] == 0.25
    server.stop()
    assert server.proc.poll() is not None


# ------------------------------------------------------------------------ parallel processes

PARALLEL_JOB = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from dblocks.tracking import JobRun, dataset_input
    track, block, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    config = json.loads(sys.argv[4])
    with JobRun(track, "train", "parallel", block, config, flush_every=1) as run:
        deadline = time.time() + 60
        while not go.exists() and time.time() < deadline:  # start logging together: real contention
            time.sleep(0.02)
        # all four create the same new MLflow dataset at once (as an experiment's block jobs do)
        run.log_inputs([dataset_input("race", "train", "cd" * 32, track, "training", num_examples=1)])
        for step in range(1, 21):
            run.log_step(step, 1.0 / step, 1e-3)
        run.log_metrics({"train_seconds": 1.0})
    assert run.enabled and run.run_id, "tracking was disabled"
    print(run.run_id, flush=True)
    os._exit(0)  # skip the interpreter's slow teardown of torch and mlflow
""")


def test_four_parallel_processes_share_one_sqlite_store(store, tmp_path):
    track = run_record(store.root / "runs", store.params, "micro-a")
    config = json.dumps(Params.load(store.params).experiments["micro-a"])
    go = tmp_path / "go"
    # run where the record's relative data path names nothing (a checkout that ran the pipeline has a prepared
    # digits split there, which a training job would log as its input beside the one logged here)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PARALLEL_JOB, str(track), str(b), str(go), config],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for b in (1, 2, 3, 4)
    ]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "warning" not in err, err
    run_ids = {out.strip() for out, _ in outs}
    runs = store.client.search_runs(
        [store.record["micro-a"]["experiment_id"]], filter_string="tags.`dblocks.method` = 'parallel'"
    )
    assert {r.info.run_id for r in runs} == run_ids and len(run_ids) == 4
    assert sorted(r.data.tags["dblocks.block"] for r in runs) == ["1", "2", "3", "4"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == store.record["micro-a"]["parent_run_id"]
        assert _steps(store.client, r.info.run_id, "train_loss") == list(range(1, 21))
        assert _steps(store.client, r.info.run_id, "lr") == list(range(1, 21))
        assert [i.dataset.name for i in r.inputs.dataset_inputs] == ["race-train"]


def test_parent_run_job_does_not_import_torch(tmp_path):
    """tracking_parent is one job per experiment and needs only MLflow: importing torch would add ~2 s of
    start-up to each of them (the CLI names its errors without importing their torch-heavy modules). The paper
    file tracks live: its track-init makes the parent run (a journal-mode one imports no MLflow either)."""
    params = Path(__file__).resolve().parents[1] / "params" / "paper.yaml"
    code = (
        "import sys; from dblocks.cli import main; "
        f"rc = main(['track-init', '--params', {str(params)!r}, '--out-dir', {str(tmp_path / 'runs')!r}, "
        f"'--tracking-uri', {'sqlite:///' + str(tmp_path / 'mlflow.db')!r}, '--experiment', 'vit-cifar100']); "
        "print(rc, 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=tmp_path
    ).stdout
    assert out.strip().splitlines()[-1] == "0 False"
    assert json.loads(run_record(tmp_path / "runs", params, "vit-cifar100").read_text())["parent_run_id"]


# -------------------------------------------------------------------------- logged later, in full


def test_a_journaled_evaluation_updates_the_parent_when_synced(store, tmp_path):
    """An evaluate job that ran while the store was down: track-sync logs its run with its dataset input,
    and its headline metrics to the parent run, once."""
    rec = store.record["micro-b"]
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    offline = runs_dir / "micro-b.json"  # what track-init --allow-offline writes: no experiment, no parent
    view = {"selectedColumns": ["attributes.`Dataset`", "metrics.`e2e.accuracy`"]}
    offline.write_text(
        json.dumps({**rec, "experiment_id": None, "parent_run_id": None, "offline": "down", "runs_view": view})
    )
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "test.json").write_text(
        json.dumps({"kind": "dataset", "name": "digits", "split": "test", "examples": 7, "sha256": "ab" * 32})
    )
    config = Params.load(store.params).experiments["micro-b"]
    with JobRun(offline, "evaluate", "e2e", None, config) as run:
        run.log_dataset(data, "test", "evaluation")
        run.log_metrics({"accuracy": 0.625})
        run.log_parent_metrics(headline_metrics("e2e", {"accuracy": 0.625, "examples": 7, "eval_seconds": 1.0}))
    assert not run.enabled and run.run_id is None
    journal = json.loads(run.journal_path.read_text())
    assert [m[:2] for m in journal["parent_metrics"]] == [["e2e.accuracy", 0.625]] and not journal["parent_synced"]

    report = sync_journals(runs_dir)
    assert len(report.logged) == 1
    journal = json.loads(run.journal_path.read_text())
    assert journal["parent_synced"] and journal["synced"]
    child = store.client.get_run(journal["run_id"])
    parent = store.client.get_run(child.data.tags["mlflow.parentRunId"])  # found by experiment and config hash
    assert parent.data.tags["dblocks.job"] == "parent" and parent.data.tags["dblocks.experiment"] == "micro-b"
    assert parent.data.tags["dblocks.config_hash"] == config_hash(config)
    assert parent.data.metrics["e2e.accuracy"] == 0.625 and "e2e.examples" not in parent.data.metrics
    assert "digits-test" in [i.dataset.name for i in parent.inputs.dataset_inputs]
    # the runs view that track-init could not save while the store was down
    tags = store.client.get_experiment(rec["experiment_id"]).tags
    assert json.loads(tags["mlflow.sharedViewState.dblocks"]) == view
    (item,) = child.inputs.dataset_inputs
    assert item.dataset.name == "digits-test" and item.dataset.digest == ("ab" * 32)[:36]
    assert {t.key: t.value for t in item.tags}["mlflow.data.context"] == "evaluation"
    # again: nothing logged twice
    assert sync_journals(runs_dir).present == [str(run.journal_path)]
    history = store.client.get_metric_history(parent.info.run_id, "e2e.accuracy")
    assert len(history) == 1


def test_runs_view_names_each_tasks_headline_metrics():
    from dblocks.pipeline import Pipeline
    from dblocks.tracking import runs_view

    repo = Path(__file__).resolve().parents[1]
    tiny = runs_view(Pipeline.load(repo / "params/tiny.yaml"))["selectedColumns"]
    assert tiny[0] == "attributes.`Dataset`"
    assert {
        "metrics.`blockwise.accuracy`",
        "metrics.`e2e.accuracy`",
        "metrics.`blockwise.fid_test`",
        "metrics.`e2e.fid_train`",
    } <= set(tiny)
    text = set(runs_view(Pipeline.load(repo / "params/tiny-text.yaml"))["selectedColumns"])
    assert {
        "metrics.`blockwise.bpc`",
        "metrics.`blockwise.mauve_ngram`",
        "metrics.`e2e.gen_ppl_reference`",
        "metrics.`blockwise.next_token_bits`",
    } <= text
    assert "metrics.`blockwise.mauve_reference`" not in text  # only where the params ask for reference-LM features
    assert not any("gpt2_large" in c or "llama2" in c for c in text)  # online metrics only when configured


# ---------------------------------------------------------------------------------------- journal mode

JOURNAL_PARAMS = PARAMS.replace("  experiment: dblocks-test\n", "  experiment: dblocks-test\n  mode: journal\n")
#: what differs between a run logged live and the same run logged later from its journal, besides ids
_TIMING_METRICS = ("train_seconds", "seconds_per_step", "eval_seconds", "peak_memory_mb", "train_memory_mb")  # measured
_PER_RUN_TAGS = ("mlflow.parentRunId", "dblocks.run_key", "dblocks.logged_later")
#: file hashes: a checkpoint's JSON header holds its training time
_TIMED_FILE_TAGS = ("checkpoint_sha256", "model_sha256")


def _store_contents(client) -> dict:
    """What a user sees in the store, without ids and times: the experiment's tags, and every run by (job,
    experiment, method, block) with its name, status, parent (by name), tags, params, metrics (timings by key
    only), dataset inputs and artifacts."""
    (exp,) = [e for e in client.search_experiments() if e.name == "dblocks-test"]
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_id: r.info.run_name for r in runs}
    out = {"experiment_tags": exp.tags, "runs": {}}
    for run in runs:
        tags = run.data.tags
        key = tuple(tags.get(f"dblocks.{k}") for k in ("job", "experiment", "method", "block"))
        assert key not in out["runs"], key
        out["runs"][key] = {
            "name": run.info.run_name,
            "status": run.info.status,
            "parent": names.get(tags.get("mlflow.parentRunId")),
            "logged_later": tags.get("dblocks.logged_later"),
            "tags": {k: None if k in _TIMED_FILE_TAGS else v for k, v in tags.items() if k not in _PER_RUN_TAGS},
            "params": run.data.params,
            "metrics": {k: None if k in _TIMING_METRICS else v for k, v in run.data.metrics.items()},
            "inputs": sorted((i.dataset.name, i.dataset.digest, i.dataset.source) for i in run.inputs.dataset_inputs),
            "artifacts": sorted(f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")),
        }
    return out


def test_journal_mode_then_track_sync_leaves_what_live_mode_logs(tmp_path, monkeypatch, capsys):
    """The same jobs, tracked live and in journal mode (track-init, a baseline, its evaluation): after
    track-sync the journal-mode store holds the same experiment, parent runs (both experiments', one without any
    job), child runs, tags, params, metrics, dataset inputs and artifacts; only ids, times and each child's
    dblocks.logged_later tag differ. Nothing touches that store before track-sync."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model, result = tmp_path / "e2e.safetensors", tmp_path / "eval.json"
    stores = {}
    for mode, text in (("live", PARAMS), ("journal", JOURNAL_PARAMS)):
        root = tmp_path / mode
        root.mkdir()
        (root / "params.yaml").write_text(text)
        uri, runs = f"sqlite:///{root}/mlflow.db", root / "runs"
        assert (
            run_cli(
                "track-init", "--params", root / "params.yaml", "--out-dir", runs, "--tracking-uri", uri, "--store-only"
            )
            == 0
        )
        assert run_cli("track-init", "--params", root / "params.yaml", "--out-dir", runs, "--tracking-uri", uri) == 0
        track = run_record(runs, root / "params.yaml", "micro-a")
        assert (
            run_cli(
                "train-baseline",
                "--config",
                root / "params.yaml",
                "--experiment",
                "micro-a",
                "--no-progress",
                "--out",
                model,
                "--track",
                track,
                "--force",
            )
            == 0
        )
        assert run_cli("evaluate", model, "--out", result, "--track", track) == 0
        assert "warning" not in capsys.readouterr().err.lower()
        if mode == "journal":
            record = json.loads(track.read_text())
            assert record["mode"] == "journal" and record["parent_run_id"] is None
            assert record["config"] == Params.load(root / "params.yaml").experiments["micro-a"]
            assert not (root / "mlflow.db").exists()  # the store is untouched until track-sync
            assert len(sync_journals(runs).logged) == 2
            assert not sync_journals(runs).logged  # idempotent, and no second parent run either
        stores[mode] = _store_contents(mlflow.MlflowClient(uri))
    live, journal = stores["live"], stores["journal"]
    assert journal["experiment_tags"] == live["experiment_tags"]  # the kind and the runs view
    assert (
        sorted(journal["runs"])
        == sorted(live["runs"])
        == sorted(
            [
                ("parent", "micro-a", "blockwise,e2e", ""),
                ("parent", "micro-b", "blockwise", ""),
                ("train", "micro-a", "e2e", ""),
                ("evaluate", "micro-a", "e2e", ""),
            ]
        )
    )
    for key, run in live["runs"].items():
        later = journal["runs"][key]
        assert run.pop("logged_later") is None
        assert later.pop("logged_later") == (None if key[0] == "parent" else "true")
        assert later == run, key
    parent = live["runs"][("parent", "micro-a", "blockwise,e2e", "")]
    assert parent["metrics"] == {"e2e.accuracy": json.loads(result.read_text())["accuracy"]}
    assert parent["params"] == flatten(
        Params.load(tmp_path / "live" / "params.yaml").experiments["micro-a"], as_strings=True
    )
    assert live["runs"][("train", "micro-a", "e2e", "")]["parent"] == "micro-a"


def test_a_journal_mode_job_never_imports_mlflow(tmp_path):
    """In journal mode track-init and a tracked training job import no MLflow (seconds of every job's start-up),
    print no warning and leave the store alone; the job's journal holds its run for track-sync."""
    params = tmp_path / "params.yaml"
    params.write_text(JOURNAL_PARAMS)
    runs, out = tmp_path / "runs", tmp_path / "block-1.safetensors"
    init = [
        "track-init",
        "--params",
        str(params),
        "--out-dir",
        str(runs),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    train = [
        "train-block",
        "--config",
        str(params),
        "--experiment",
        "micro-b",
        "--block",
        "1",
        "--no-progress",
        "--out",
        str(out),
        "--track",
        str(run_record(runs, params, "micro-b")),
    ]
    code = (
        f"import sys; from dblocks.cli import main; rcs = [main({init + ['--store-only']!r}), main({init!r}), "
        f"main({train!r})]; print(*rcs, 'mlflow' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0 0 0 False"
    assert "warning" not in proc.stderr.lower(), proc.stderr
    assert json.loads((runs / "store.json").read_text())["mode"] == "journal"
    assert not (tmp_path / "mlflow.db").exists() and load_metadata(out)["block"] == 1
    (journal,) = [json.loads(p.read_text()) for p in (runs / "journal").glob("*.json")]
    assert journal["status"] == "FINISHED" and not journal["synced"]
    assert [m[0] for m in journal["metrics"] if m[3] == 4][:2] == ["train_loss", "lr"]
    assert journal["tags"]["checkpoint_sha256"] == load_metadata(out)["sha256"]
