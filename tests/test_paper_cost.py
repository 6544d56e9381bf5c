"""benchmarks/paper_cost.py: its FLOP counts agree with an analytic count, scale with the layers a job
holds, average the shared-stem and Huginn draws correctly, and its GPU-hour arithmetic covers every job of
params/paper.yaml. Everything is counted on the meta device (shapes only), so paper sizes stay cheap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch import nn

from dblocks.config import resolve
from dblocks.experiment import Experiment
from dblocks.layers import Attention
from dblocks.params import Params
from dblocks.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_cost  # noqa: E402

PAPER = ROOT / "params" / "paper.yaml"


def paper_experiment(name: str) -> Experiment:
    return Experiment(Params.load(PAPER).experiments[name])


def analytic_flops(module: nn.Module, run) -> tuple[int, int]:
    """(all, outside module.layers) matmul FLOPs of ``run()`` (one forward + backward), from the shapes
    each Linear, Conv2d and attention call sees: forward 2 x multiply-adds; backward the weight gradient
    (same cost) plus the input gradient when the input needs one; attention's QK^T and AV 4 n t^2 d
    forward, twice that backward."""
    inside = {id(m) for m in module.layers.modules()}
    counts = {"all": 0, "outside": 0}

    def hook(mod, args, _out):
        x = args[0]
        if isinstance(mod, nn.Linear):
            fwd = 2 * x.numel() // mod.in_features * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            positions = _out.numel() // mod.out_channels  # batch x output pixels
            fwd = 2 * positions * mod.out_channels * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
        else:  # Attention: the two products around the softmax (its Linears are hooked themselves)
            n, t, d = x.shape
            fwd = 4 * n * t * t * d
        total = fwd * (3 if isinstance(mod, Attention) else 2 + x.requires_grad)
        counts["all"] += total
        if id(mod) not in inside:
            counts["outside"] += total

    handles = [
        m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, Attention))
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts["all"], counts["outside"]


def counted_and_analytic(exp: Experiment, method: str, block: int | None, batch: int) -> tuple[int, int, int]:
    module, objective, _ = paper_cost.build_job(exp, method, block)
    data = paper_cost.fake_data(exp)
    result = {}

    def run():
        result["flops"] = paper_cost.count_step(objective, data, batch, seed=0)

    total, outside = analytic_flops(module, run)
    return result["flops"], total, outside


def test_flops_of_a_paper_dit_block_match_the_analytic_count():
    # DiT-S/2 on CIFAR-10 exactly as params/paper.yaml trains it, at its real batch (512): the count
    # includes the backward pass and attention (a meta-device count misses neither)
    exp = paper_experiment("dit-cifar10")
    counted, analytic, _ = counted_and_analytic(exp, "blockwise", 1, exp.config["train"]["batch_size"])
    assert counted == pytest.approx(analytic, rel=0.01)
    # and the rule of thumb: 6 x (per-token matmul parameters: 12 d^2 per layer) x tokens, plus attention
    d, tokens, batch, layers = 384, 256, 512, 4
    thumb = 6 * 12 * d * d * tokens * batch * layers + 12 * batch * tokens**2 * d * layers
    assert counted == pytest.approx(thumb, rel=0.05)


def test_blocks_of_an_equal_split_cost_a_third_of_the_end_to_end_layers():
    exp = Experiment(
        resolve({"task": "generation", "arch": "DiT-S/2", "dataset": "cifar10", "blocks": 3, "device": "cpu"})
    )
    e2e, e2e_all, e2e_stem_head = counted_and_analytic(exp, "e2e", None, 2)
    assert e2e == pytest.approx(e2e_all, rel=0.01)
    for b in (1, 2, 3):
        block, block_all, stem_head = counted_and_analytic(exp, "blockwise", b, 2)
        assert block == pytest.approx(block_all, rel=0.01)
        assert block - stem_head == pytest.approx((e2e - e2e_stem_head) / 3, rel=0.01)


def test_shared_stem_mode_costs_the_mean_of_its_blocks():
    # an uneven split, so the blocks differ: each shared-stem step costs what that block's own job costs
    exp = Experiment(
        resolve(
            {
                "task": "generation",
                "arch": "DiT-micro",
                "dataset": "digits",
                "blocks": 2,
                "layer_split": [1, 2],
                "device": "cpu",
            }
        )
    )
    paper = paper_cost.job_cost(exp, "paper", None, batch_size=4)
    own = [paper_cost.job_cost(exp, "blockwise", b, batch_size=4)["flops_per_step"] for b in (1, 2)]
    assert paper["flops_per_block_step"] == own
    assert own[0] < own[1]
    assert paper["flops_per_step"] == pytest.approx(sum(own) / 2)
    assert paper["steps"] == 2 * exp.config["train"]["steps"]


def test_huginn_baseline_is_counted_at_its_mean_recurrence():
    exp = Experiment(
        resolve(
            {"task": "recurrent_text", "arch": "Huginn-micro", "dataset": "shakespeare", "blocks": 1, "device": "cpu"}
        )
    )
    spec = exp.arch.spec
    assert spec.recurrence - 1 >= spec.backprop_depth  # the cost is affine in r from the backprop depth on
    at_mean = paper_cost.job_cost(exp, "e2e", None, batch_size=2)
    assert at_mean["recurrence"] == spec.recurrence
    below, above = (
        paper_cost.job_cost(exp, "e2e", None, batch_size=2, recurrence=r)["flops_per_step"]
        for r in (spec.recurrence - 1, spec.recurrence + 1)
    )
    assert below < at_mean["flops_per_step"] < above
    assert at_mean["flops_per_step"] == pytest.approx((below + above) / 2)
    # every step at the mean: the count does not depend on the generator's draws
    module, objective, _ = paper_cost.build_job(exp, "e2e", None)
    data = paper_cost.fake_data(exp)
    assert {paper_cost.count_step(objective, data, 2, seed) for seed in range(3)} == {at_mean["flops_per_step"]}


def test_every_job_of_the_paper_file_gets_a_row_and_the_right_peak(monkeypatch, tmp_path, capsys):
    # the FLOP counting is tested above; here a fixed cost per step checks the job list and the arithmetic
    steps, flops = 1000, 1e15
    monkeypatch.setattr(
        paper_cost,
        "job_cost",
        lambda exp, method, block: {
            "steps": steps,
            "params": 1,
            "batch_size": exp.config["train"]["batch_size"],
            "flops_per_step": flops,
        },
    )
    out = tmp_path / "cost.json"
    assert paper_cost.main(["--params", str(PAPER), "--mfu", "0.5", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    jobs = Pipeline.load(PAPER).training_jobs()
    assert [(r["experiment"], r["method"], r["block"]) for r in record["jobs"]] == jobs
    assert record["estimate"] is True and record["mfu_assumed"] == 0.5
    modes = {r["experiment"]: r["math_mode"] for r in record["jobs"]}
    assert modes["vit-cifar100"] == modes["dit-imagenet256"] == "tf32"  # fp32 with TF32 matmuls
    assert modes["mdm-text8"] == modes["ar-lm1b"] == modes["huginn-lm1b"] == "bf16"
    # 1000 steps x 1e15 FLOPs = 1e18 FLOPs on an H100 at 50 % of its peak, by hand:
    #   bf16 989 TFLOPS: 1e18 / 494.5e12 = 2022.245 s = 0.5617346 h; tf32 494: 1e18 / 247e12 = 4048.583 s
    #   = 1.1246064 h; fp32 67: 1e18 / 33.5e12 = 29850.75 s = 8.2918740 h
    h100_hours = {"bf16": 0.5617346, "tf32": 1.1246064, "fp32": 8.2918740}
    for r in record["jobs"]:
        assert r["gpu_hours"]["H100"] == pytest.approx(h100_hours[r["math_mode"]], rel=1e-6)
    # Table 12's wall time applies to the ViT jobs of its shapes only (e2e and 4-layer blocks)
    timed = {(r["experiment"], r["job"]) for r in record["jobs"] if "paper_gpu_hours" in r}
    assert ("vit-cifar100", "e2e") in timed and ("vit-cifar100", "block 2") in timed
    assert all(e in ("vit-cifar100", "vit-cifar100-500ep", "noprop-cifar100") for e, _ in timed)
    assert record["total_gpu_hours"]["A100"] == pytest.approx(sum(r["gpu_hours"]["A100"] for r in record["jobs"]))
    table = capsys.readouterr().out
    assert table.count("\n| dit-t8-b6 | block ") == 6 and "ESTIMATE" in table
