"""Params overlays: a file that says ``base: other.yaml`` is that file with its own sections merged over it,
and ``only`` / ``override`` / ``data_roots`` reshape the experiments. Everything downstream (hashes, digests,
DVC's params dependencies, a job's --config) sees the merged settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dblocks.config import config_hash, resolve
from dblocks.errors import ConfigError
from dblocks.params import Params, experiment_config
from dblocks.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]

BASE = """
scale: paper
tracking: {uri: "sqlite:///mlflow.db", experiment: base}
resources: {gpu: 1, mem_mb: 1000, runtime: 10, threads: 1}
evaluation: {samples: 100, sample_steps: 50, fid_features: inception, text: {prompts: 10, new_tokens: 5}}
defaults: {seed: 0}
experiments:
  vit:
    task: classification
    arch: ViT-micro
    dataset: cifar100
    train: {steps: 100, batch_size: 64, lr: 1.0e-3}
    pipeline: {tables: ["1"], methods: [blockwise, e2e]}
  dit:
    task: generation
    arch: DiT-micro
    dataset: cifar10
    layer_split: [1, 1, 1]
    train: {steps: 200, batch_size: 32}
    pipeline: {tables: ["2"], methods: [blockwise]}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def base(tmp_path) -> Path:
    return write(tmp_path, "base.yaml", BASE)


def test_overlay_merges_sections_over_its_base(base):
    overlay = write(
        base.parent,
        "over.yaml",
        """
base: base.yaml
scale: smoke
tracking: {experiment: over}
evaluation: {samples: 4, text: {prompts: 2}}
experiments:
  dit: {blocks: 2, layer_split: [2, 1]}   # lists replace
""",
    )
    params = Params.load(overlay)
    assert params.files == [base, overlay]
    assert params.scale == "smoke" and params.mlflow_experiment == "over"
    assert params.tracking_uri == "sqlite:///mlflow.db"  # mappings merge: the base's uri stays
    assert params.evaluation["samples"] == 4 and params.evaluation["sample_steps"] == 50
    assert params.text_evaluation == {"prompts": 2, "new_tokens": 5}
    assert params.experiments["dit"]["layer_split"] == [2, 1]
    assert params.experiments["vit"]["train"]["steps"] == 100


def test_override_data_roots_and_only_reshape_the_experiments(base):
    overlay = write(
        base.parent,
        "over.yaml",
        """
base: base.yaml
only: [dit]
override: {train: {steps: 2, batch_size: 2}, sample: {num_images: 8}}
data_roots: {cifar10: generated/cifar10}
experiments:
  dit: {train: {lr: 0.5}}
""",
    )
    params = Params.load(overlay)
    assert list(params.experiments) == ["dit"]
    train = params.experiments["dit"]["train"]
    # override wins over the experiment's own settings (the overlay's and the base's); the rest stays
    assert (train["steps"], train["batch_size"], train["lr"]) == (2, 2, 0.5)
    assert params.experiments["dit"]["sample"]["num_images"] == 8
    assert params.experiments["dit"]["data_root"] == "generated/cifar10"
    # a job's --config FILE --experiment NAME gets the same resolved experiment
    assert experiment_config(overlay, "dit") == params.experiments["dit"]


def test_an_overlay_can_build_on_an_overlay(base, tmp_path):
    write(tmp_path, "mid.yaml", "base: base.yaml\noverride: {train: {steps: 3}}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    top = write(sub, "top.yaml", "base: ../mid.yaml\nonly: [vit]\nevaluation: {samples: 2}\n")
    params = Params.load(top)
    assert [p.name for p in params.files] == ["base.yaml", "mid.yaml", "top.yaml"]
    assert list(params.experiments) == ["vit"] and params.experiments["vit"]["train"]["steps"] == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: missing.yaml\n", "over.yaml: base="),
        ("base: over.yaml\n", "base='over.yaml' leads back to"),
        ("base: 3\n", "base=3 has the wrong type"),
        ("base: base.yaml\nscale: huge\n", "over.yaml: scale='huge' is not allowed; allowed: tiny, paper, smoke"),
        (
            "base: base.yaml\nonly: [vit, nope]\n",
            "over.yaml: only: 'nope' is not an experiment here; allowed: vit, dit",
        ),
        (
            "base: base.yaml\ndata_roots: {imagenet256: x}\n",
            "over.yaml: data_roots.imagenet256: no experiment reads this dataset; allowed: cifar10, cifar100",
        ),
        (
            "base: base.yaml\noverride: {train: {steps: 0}}\n",
            "experiments.vit.train.steps=0 is out of range; allowed: >= 1",
        ),
        (
            "base: base.yaml\nautoencoders: {imagenet256: vqgan}\n",
            "autoencoders.imagenet256='vqgan' is not allowed; allowed: sd-vae-ft-ema, untrained-conv",
        ),
    ],
)
def test_overlay_errors_name_the_file_key_and_allowed_values(base, text, message):
    with pytest.raises(ConfigError) as err:
        Params.load(write(base.parent, "over.yaml", text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_change_in_the_base_changes_what_the_jobs_that_read_it_see(base):
    """Snakemake reruns a job when its config hash or settings digest changes; both come from the merged
    settings, so an edit of the base file reruns exactly what it would rerun in the base itself, and an edit
    the overlay overrides reruns nothing."""
    overlay = write(base.parent, "over.yaml", "base: base.yaml\noverride: {train: {steps: 2}}\n")
    before = Pipeline.load(overlay)

    def after(edit) -> Pipeline:
        raw = yaml.safe_load(BASE)
        edit(raw)
        base.write_text(yaml.safe_dump(raw))
        return Pipeline.load(overlay)

    lr = after(lambda r: r["experiments"]["vit"]["train"].update(lr=2e-3))
    assert lr.hash("vit") != before.hash("vit") and lr.hash("dit") == before.hash("dit")
    steps = after(lambda r: r["experiments"]["vit"]["train"].update(steps=7))  # overridden: no change
    assert steps.hash("vit") == before.hash("vit")
    samples = after(lambda r: r["evaluation"].update(samples=5))
    assert samples.settings_digest("evaluate_generator", "dit") != before.settings_digest("evaluate_generator", "dit")
    assert samples.settings_digest("train_block", "dit") == before.settings_digest("train_block", "dit")


def test_dvc_params_name_keys_that_exist_in_the_file_they_name(base):
    """DVC reads params from files, not merged settings: each key is declared in the file that writes it,
    an override under override.<key>, a data root under data_roots.<dataset>."""
    overlay = write(
        base.parent,
        "over.yaml",
        """
base: base.yaml
evaluation: {samples: 4}
override: {train: {steps: 2}}
data_roots: {cifar10: generated/cifar10}
""",
    )
    pipe = Pipeline.load(overlay)
    assert pipe.param_sources(pipe.reads("train_block", "dit")) == {
        base: [
            "defaults.seed",
            "experiments.dit.task",
            "experiments.dit.arch",
            "experiments.dit.dataset",
            "experiments.dit.layer_split",
            "experiments.dit.train",
        ],
        overlay: ["override.train"],
    }
    assert pipe.param_sources(pipe.reads("evaluate_generator", "dit")) == {
        base: ["scale", "evaluation", "defaults", "experiments.dit"],
        overlay: ["evaluation", "override", "data_roots.cifar10"],
    }
    assert pipe.param_sources(pipe.reads("tracking_store")) == {base: ["scale", "tracking"]}
    assert pipe.param_sources(None) == {base: None, overlay: None}
    # a file that builds on nothing is declared as before: its own keys, itself only
    plain = Pipeline.load(base)
    assert plain.param_sources(plain.reads("train_block", "dit")) == {base: plain.reads("train_block", "dit")}


def test_smoke_params_dvc_stages_declare_only_existing_keys():
    """The generated dvc.yaml of params/smoke.yaml: every params key lies in the file it names."""
    from dblocks.dvcgen import generate

    stages = yaml.safe_load(generate("params/smoke.yaml", REPO))["stages"]
    files = {name: yaml.safe_load((REPO / name).read_text()) for name in ("params/paper.yaml", "params/smoke.yaml")}
    declared = 0
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            for path, keys in entry.items():
                for key in keys or []:
                    node = files[path]
                    for part in key.split("."):
                        assert isinstance(node, dict) and part in node, (name, path, key)
                        node = node[part]
                    declared += 1
    assert declared > 0
    assert stages["train_block.dit-imagenet256.1"]["params"][1] == {"params/smoke.yaml": ["override.train"]}


def test_the_masked_lm_evaluation_takes_the_files_sample_steps():
    """evaluation.sample_steps is the masked LM's unmasking steps too (it was ignored for text tasks, so
    tiny-text's 48 and the smoke run's 6 evaluated with the model's own sample.steps of 50)."""
    for name, steps in (("params/tiny-text.yaml", 48), ("params/smoke.yaml", 6)):
        params = Params.load(REPO / name)
        assert params.evaluate_options("mdm-text8")["sample_steps"] == steps
        assert params.evaluation_settings("mdm-text8")["sample_steps"] == steps
        assert "sample_steps" not in params.evaluate_options("ar-lm1b")


# ------------------------------------------------------------------------------- per-experiment resources


def test_an_experiment_s_training_resources_are_merged_over_the_file_s_and_never_hashed(base):
    """resources.experiments.<name>: that experiment's training jobs take these keys over the file's
    resources; the config hash and every job's settings digest stay as they were (GPUs do not change what
    a job learns), and a job of N ranks asks N times a rank's memory share."""
    before = Pipeline.load(base)
    raw = yaml.safe_load(BASE)
    raw["resources"]["experiments"] = {"dit": {"gpu": 4, "gpu_model": "h100", "runtime": 30}}
    base.write_text(yaml.safe_dump(raw))
    pipe = Pipeline.load(base)
    assert pipe.training_resources("dit") == {
        "gpu": 4,
        "gpu_model": "h100",
        "mem_mb": 1000,
        "runtime": 30,
        "threads": 1,
    }
    assert pipe.training_resources("vit") == {"gpu": 1, "mem_mb": 1000, "runtime": 10, "threads": 1}
    assert (pipe.ranks("dit"), pipe.ranks("vit")) == (4, 1)
    for exp in ("vit", "dit"):
        assert pipe.hash(exp) == before.hash(exp)
        for rule in ("train_block", "tracking_parent", "evaluate_generator", "evaluate_classifier"):
            assert pipe.settings_digest(rule, exp) == before.settings_digest(rule, exp)
    # DiT-micro has 3 layers, one per block: a block job's share is 1/3 of 1000 MB, floored at the runtime's
    # 1024 MB, i.e. the whole 1000, for each of its 4 ranks
    assert pipe.training_memory("dit", "blockwise", 1) == 4 * 1000
    assert pipe.training_memory("vit", "e2e") == before.training_memory("vit", "e2e") == 1000


def test_a_cpu_run_keeps_its_base_s_gpu_experiments_in_one_process(base):
    """An overlay with resources.gpu: 0 (params/smoke.yaml over params/paper.yaml) runs every job on the
    CPU in one process: an experiment's own gpu and gpu_model are ignored, its other keys are not."""
    raw = yaml.safe_load(BASE)
    raw["resources"]["experiments"] = {"dit": {"gpu": 8, "gpu_model": "a100", "threads": 4}}
    base.write_text(yaml.safe_dump(raw))
    assert Pipeline.load(base).ranks("dit") == 8
    overlay = write(base.parent, "over.yaml", "base: base.yaml\nresources: {gpu: 0}\n")
    pipe = Pipeline.load(overlay)
    assert pipe.training_resources("dit") == {"gpu": 0, "mem_mb": 1000, "runtime": 10, "threads": 4}
    assert pipe.ranks("dit") == 1
    # an overlay keeping only some experiments may leave the others' resources behind
    assert list(Pipeline.load(write(base.parent, "only.yaml", "base: base.yaml\nonly: [vit]\n")).experiments) == ["vit"]


def test_paper_dit_l_trains_on_eight_gpus_and_the_smoke_run_on_the_cpu():
    paper, smoke = Pipeline.load(REPO / "params/paper.yaml"), Pipeline.load(REPO / "params/smoke.yaml")
    dit_l = {e for e, c in paper.experiments.items() if c["arch"] == "DiT-L/2"}
    assert dit_l == {"dit-imagenet256", "dit-t8-b1", "dit-t8-b2", "dit-t8-b4", "dit-t8-b6"}
    for exp in paper.experiments:
        assert paper.ranks(exp) == (8 if exp in dit_l else 1), exp
        assert smoke.ranks(exp) == 1, exp
    # the batch stays the paper's global batch, 64 rows per GPU
    assert {paper.experiments[e]["train"]["batch_size"] for e in dit_l} == {512}


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "resources: {experiments: {nope: {gpu: 2}}}\n",
            "over.yaml: resources.experiments.nope: not an experiment here; allowed: vit, dit",
        ),
        (
            "resources: {experiments: {vit: {gpu: 2, cpus: 4}}}\n",
            "resources.experiments.vit: unknown key ('cpus' was unexpected); allowed keys: gpu, gpu_model, mem_mb, "
            "runtime, threads",
        ),
        ("resources: {experiments: {vit: {eval_mem_mb: 4}}}\n", "resources.experiments.vit: unknown key"),
        (
            "resources: {experiments: {vit: {gpu: -1}}}\n",
            "resources.experiments.vit.gpu=-1 is out of range; allowed: >= 0",
        ),
        ("resources: {experiments: {vit: {}}}\n", "resources.experiments.vit: {} should be non-empty"),
        (
            "resources: {experiments: {dit: {gpu: 64}}}\n",
            "over.yaml: resources.experiments.dit.gpu=64: a training job of dit runs 64 ranks, each computing a share of "
            "train.batch_size=32 (the global batch); allowed: at most 32 GPUs, or a larger batch",
        ),
        ("resources: {gpu: 33}\n", "over.yaml: resources.gpu=33: a training job of dit runs 33 ranks"),
    ],
)
def test_per_experiment_resources_errors_name_the_key_and_allowed_values(base, text, message):
    with pytest.raises(ConfigError) as err:
        Params.load(write(base.parent, "over.yaml", "base: base.yaml\n" + text))
    assert message in str(err.value)


def test_an_option_added_later_keeps_the_hash_of_configs_that_leave_it_at_its_former_behaviour():
    """train.time_sampling came after checkpoints existed: at "iid" (what training did before) it is left out
    of the config hash, so finished blocks are not retrained; "stratified" changes what a block learns."""
    config = resolve({"name": "m", "task": "masked_text", "arch": "MDM-micro", "dataset": "shakespeare"})
    assert config["train"]["time_sampling"] == "iid"
    without = {**config, "train": {k: v for k, v in config["train"].items() if k != "time_sampling"}}
    assert config_hash(config) == config_hash(without)
    stratified = {**config, "train": {**config["train"], "time_sampling": "stratified"}}
    assert config_hash(stratified) != config_hash(config)
