"""What a user browsing the runs sees, checked through a real MLflow server's REST API (on loopback): the
experiment is of the classic ML kind (not GenAI) and has a saved runs view showing the Dataset column and
the parents' results, a parent run carries its experiment's results per method, and training and
evaluation runs (and their parent) list the prepared dataset they read as an MLflow dataset input whose
digest is that split's sha256 (from its JSON record). The store is filled by the project's own commands:
track-init, a 4-step ViT-micro block and baseline, and an evaluation."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import mlflow
import pytest

from dblocks.cli import main
from dblocks.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, RUNS_VIEW_KEY, runs_view_url
from tests.conftest import run_record
from tests.ui_server import ui_server, wait_healthy

EXPERIMENT = "dblocks-ui-test"
PARAMS = f"""\
scale: tiny
tracking: {{uri: "sqlite:///mlflow.db", experiment: {EXPERIMENT}}}
resources: {{gpu: 0, mem_mb: 1000, runtime: 10, threads: 1}}
evaluation: {{samples: 8, sample_steps: 2, fid_features: digits}}
defaults: {{dataset: digits, seed: 0, device: cpu}}
experiments:
  micro:
    task: classification
    arch: ViT-micro
    blocks: 3
    train: {{steps: 4, batch_size: 8, warmup: 1, log_every: 2, checkpoint_every: 2}}
    pipeline: {{tables: ["1"], methods: [blockwise, e2e]}}
"""


def _get(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_runs_as_the_mlflow_server_shows_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the pipeline's layout: data/prepared/<dataset>, the store beside it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(PARAMS)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # an experiment that exists without a kind (made by an older version, or by hand) gets one
    mlflow.MlflowClient(uri).create_experiment(EXPERIMENT)
    assert main(["track-init", "--params", "params.yaml", "--out-dir", "runs", "--tracking-uri", uri]) == 0

    with ui_server(uri, tmp_path / "server.log") as server:  # the server boots while the jobs run
        url, proc = server.url, server.proc
        assert main(["prepare", "--dataset", "digits", "--out", "data/prepared/digits"]) == 0
        common = [
            "--config",
            "params.yaml",
            "--experiment",
            "micro",
            "--data",
            "data/prepared/digits",
            "--track",
            str(run_record("runs", "params.yaml", "micro")),
            "--no-progress",
        ]
        assert main(["train-block", *common, "--block", "1", "--out", "ckpt/block-1.safetensors"]) == 0
        assert main(["train-baseline", *common, "--out", "ckpt/e2e.safetensors"]) == 0
        assert (
            main(
                [
                    "evaluate",
                    "ckpt/e2e.safetensors",
                    "--data",
                    "data/prepared/digits",
                    "--track",
                    str(run_record("runs", "params.yaml", "micro")),
                    "--out",
                    "metrics/e2e.json",
                ]
            )
            == 0
        )
        record = json.loads((tmp_path / "metrics/e2e.json").read_text())
        prepared = {s: json.loads((tmp_path / f"data/prepared/digits/{s}.json").read_text()) for s in ("train", "test")}
        wait_healthy(server)

        experiment = _get(
            f"{url}/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": EXPERIMENT})
        )["experiment"]
        tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
        assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
        # the saved runs view that runs_view_url opens: the Dataset column and the parents' results
        view = json.loads(tags[f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"])
        assert view == {
            "selectedColumns": ["attributes.`Dataset`", "metrics.`blockwise.accuracy`", "metrics.`e2e.accuracy`"]
        }
        assert runs_view_url(experiment["experiment_id"], url).startswith(f"{url}/#/experiments/")

        runs = _post(
            f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
        )["runs"]
        by_job = {}
        for run in runs:
            run_tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            by_job[(run_tags["dblocks.job"], run_tags["dblocks.method"])] = (run, run_tags)
        assert set(by_job) == {
            ("parent", "blockwise,e2e"),
            ("train", "blockwise"),
            ("train", "e2e"),
            ("evaluate", "e2e"),
        }

        # the parent run shows the result at a glance, under the child's metric name
        parent, _ = by_job[("parent", "blockwise,e2e")]
        metrics = {m["key"]: m["value"] for m in parent["data"].get("metrics", [])}
        assert metrics["e2e.accuracy"] == pytest.approx(record["accuracy"])

        # the Dataset column: the prepared split each run read, digest = its sha256 (as far as MLflow allows)
        def inputs(run):
            return [
                (i["dataset"], {t["key"]: t["value"] for t in i.get("tags", [])})
                for i in run.get("inputs", {}).get("dataset_inputs", [])
            ]

        for job, split, context in (("train", "train", "training"), ("evaluate", "test", "evaluation")):
            for method in ("blockwise", "e2e") if job == "train" else ("e2e",):
                ((dataset, input_tags),) = inputs(by_job[(job, method)][0])
                sha = prepared[split]["sha256"]
                assert dataset["name"] == f"digits-{split}" and dataset["digest"] == sha[:36]
                assert json.loads(dataset["profile"]) == {
                    "sha256": sha,
                    "split": split,
                    "num_examples": prepared[split]["examples"],
                }
                source = tmp_path / f"data/prepared/digits/{split}.safetensors"
                assert json.loads(dataset["source"])["uri"] == str(source)
                assert input_tags == {"mlflow.data.context": context, "dblocks.split": split}
        # the parent run lists what its jobs read, each dataset once, so its row of the runs table names it
        assert sorted((d["name"], d["digest"]) for d, _ in inputs(parent)) == [
            ("digits-test", prepared["test"]["sha256"][:36]),
            ("digits-train", prepared["train"]["sha256"][:36]),
        ]

        evaluate, evaluate_tags = by_job[("evaluate", "e2e")]
        assert evaluate_tags["dblocks.eval_hash"] == record["eval_hash"]
        assert evaluate_tags["dblocks.config_hash"] == record["config_hash"]
    assert proc.poll() is not None
