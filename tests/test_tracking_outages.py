"""Tracking outages lose nothing: a job whose store is locked or unreachable finishes, keeps its results
and a journal of what it would have logged, and ``dblocks track-sync`` logs that journal later exactly
once (a second sync adds nothing; a run cut short is replaced, not duplicated)."""

from __future__ import annotations

import json
import sqlite3
import time
from types import SimpleNamespace

import mlflow
import pytest
from mlflow.entities import ViewType

from dblocks.checkpoint import load_metadata, sha256_file
from dblocks.tracking import JOURNAL_DIR, RUN_KEY_TAG, init_runs, read_journals
from tests.conftest import run_record
from tests.test_tracking import PARAMS, run_cli


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DBLOCKS_TRACKING_WAIT", "1")  # a locked store gives up after ~1 s (+ SQLite's own 5 s)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return SimpleNamespace(
        root=tmp_path, params=params, uri=uri, runs=tmp_path / "runs", client=mlflow.MlflowClient(uri)
    )


def _runs(store, **tags) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    (experiment,) = [e for e in store.client.search_experiments() if e.name == "dblocks-test"]
    return store.client.search_runs([experiment.experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY)


def _sync(store, capsys, *extra) -> str:
    capsys.readouterr()
    assert run_cli("track-sync", "--runs-dir", store.runs, *extra) == 0
    return capsys.readouterr().out


def _train(store, block: int, capsys) -> tuple[int, str]:
    out = store.root / f"block-{block}.safetensors"
    rc = run_cli(
        "train-block",
        "--config",
        store.params,
        "--experiment",
        "micro-b",
        "--no-progress",
        "--block",
        block,
        "--out",
        out,
        "--track",
        run_record(store.runs, store.params, "micro-b"),
    )
    err = capsys.readouterr().err
    return rc, err


def test_locked_store_costs_the_job_nothing_and_sync_logs_it_once(store, capsys):
    init_runs(store.params, store.runs, store.uri)
    parent = json.loads((run_record(store.runs, store.params, "micro-b")).read_text())["parent_run_id"]
    db = store.root / "mlflow.db"
    lock = sqlite3.connect(db, timeout=0.1)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the database: every write waits, then fails
    try:
        t0 = time.time()
        rc, err = _train(store, 1, capsys)
        seconds = time.time() - t0
    finally:
        lock.rollback()
        lock.close()
    assert rc == 0 and seconds < 60
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "database is locked" in warnings[0] and "track-sync" in warnings[0], err
    checkpoint = store.root / "block-1.safetensors"
    assert load_metadata(checkpoint)["block"] == 1  # the results are on disk
    ((path, journal),) = read_journals(store.runs)
    assert path.parent.name == JOURNAL_DIR and journal["status"] == "FINISHED" and not journal["synced"]
    assert not _runs(store, **{"dblocks.block": "1", "dblocks.job": "train"})

    # the store is back: one sync logs the job, with its curve, tags, parent and checkpoint sidecar
    assert "1 runs logged now" in _sync(store, capsys)
    (run,) = _runs(store, **{"dblocks.block": "1", "dblocks.job": "train"})
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[RUN_KEY_TAG] == journal["run_key"] and run.data.tags["dblocks.logged_later"] == "true"
    assert run.data.tags["checkpoint_sha256"] == sha256_file(checkpoint)
    assert [m.step for m in store.client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4]
    assert run.info.start_time == journal["start_time"]  # the job's own times, not the sync's
    artifacts = [a.path for a in store.client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/block-1.json"]

    # a second sync, and a sync after a normally tracked job, add nothing twice
    out = _sync(store, capsys)
    assert "0 runs logged now" in out and "1 already tracked" in out
    rc, err = _train(store, 2, capsys)
    assert rc == 0 and "warning" not in err.lower()
    out = _sync(store, capsys)
    assert "0 runs logged now" in out and "2 already tracked" in out
    assert len(_runs(store, **{"dblocks.job": "train"})) == 2
    assert all(j["synced"] for _, j in read_journals(store.runs))


def test_a_run_cut_short_is_replaced_not_duplicated(store, capsys):
    init_runs(store.params, store.runs, store.uri)
    rc, _ = _train(store, 3, capsys)
    (run,) = _runs(store, **{"dblocks.block": "3"})
    store.client.update_run(run.info.run_id, status="RUNNING")  # as if the store died before the run ended
    out = _sync(store, capsys)
    assert "1 runs logged now (1 of them replace runs cut short)" in out
    (after,) = _runs(store, **{"dblocks.block": "3"})
    assert after.info.run_id != run.info.run_id and after.info.status == "FINISHED"
    assert store.client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    assert "0 runs logged now" in _sync(store, capsys)


def test_unreachable_store_at_setup_then_sync_creates_experiment_and_parent(store, capsys):
    """The pipeline's track-init --allow-offline: the store is down before the fan-out, so records name
    no run; jobs run untracked; a later sync (here into the SQLite store that is now reachable) creates
    the experiment and one parent run, and hangs every job under it."""
    down = "http://127.0.0.1:9"  # nothing listens on the discard port
    assert (
        run_cli(
            "track-init", "--params", store.params, "--out-dir", store.runs, "--tracking-uri", down, "--allow-offline"
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "going on without tracking" in err and "track-sync" in err
    record = json.loads((run_record(store.runs, store.params, "micro-b")).read_text())
    assert record["parent_run_id"] is None and record["offline"]
    for block in (1, 2):
        rc, err = _train(store, block, capsys)
        assert rc == 0 and "names no parent run" in err
    assert "2 runs logged now" in _sync(store, capsys, "--tracking-uri", store.uri)
    (parent,) = _runs(store, **{"dblocks.job": "parent"})
    assert parent.data.tags["dblocks.experiment"] == "micro-b"
    children = _runs(store, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(r.data.tags["dblocks.block"] for r in children) == ["1", "2"]
    assert "0 runs logged now" in _sync(store, capsys, "--tracking-uri", store.uri)


def test_track_init_without_allow_offline_still_fails_loudly(store, capsys):
    assert (
        run_cli("track-init", "--params", store.params, "--out-dir", store.runs, "--tracking-uri", "http://127.0.0.1:9")
        == 1
    )
    assert not store.runs.exists()


def test_sync_refuses_a_foreign_journal(store, capsys):
    (store.runs / JOURNAL_DIR).mkdir(parents=True)
    (store.runs / JOURNAL_DIR / "x.json").write_text('{"hello": 1}')
    assert run_cli("track-sync", "--runs-dir", store.runs) == 1
    err = capsys.readouterr().err
    assert "x.json: not a dblocks tracking journal" in err and err.count("\n") == 1
