"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=N``: trains the data-parallel jobs the test
compares with one process (a ViT block, a DiT block, the paper's shared-stem mode, an end-to-end DiT with
gradient accumulation), each for a few steps, and writes their weights (and weight averages) from rank 0.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dblocks import distributed
from dblocks.blocks import AssembledModel
from dblocks.config import resolve
from dblocks.evaluate import evaluate_generator, in_chunks
from dblocks.experiment import Experiment
from dblocks.jobs import training_job
from dblocks.sample import generate
from dblocks.text_generation import generate_baseline, generate_blockwise
from dblocks.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import micro_config  # noqa: E402

STEPS = 20
CPU = torch.device("cpu")


def jobs() -> dict[str, tuple[Experiment, str, int | None]]:
    """name -> (experiment, method, block): one of each kind of training job, 20 steps of micro models."""
    train_cfg = {"steps": STEPS, "batch_size": 16, "warmup": 2, "log_every": 5, "ema_decay": 0.9}
    vit = Experiment(micro_config(train=train_cfg))
    dit = Experiment(micro_config(task="generation", train={**train_cfg, "augment": "flip"}))
    accumulated = Experiment(micro_config(task="generation", train={**train_cfg, "batch_per_device": 3}))
    text = {"dataset": "shakespeare", "device": "cpu", "train": train_cfg}
    masked = Experiment(resolve({**text, "task": "masked_text", "arch": "MDM-micro", "blocks": 3}))
    huginn = Experiment(resolve({**text, "task": "recurrent_text", "arch": "Huginn-micro", "blocks": 1}))
    ar = Experiment(resolve({**text, "task": "ar_text", "arch": "AR-micro", "blocks": 4}))
    return {
        "vit-block-2": (vit, "blockwise", 2),
        "dit-block-1": (dit, "blockwise", 1),
        "vit-paper": (Experiment(micro_config(train={**train_cfg, "ema_decay": 0.0})), "paper", None),
        "dit-e2e-accumulated": (accumulated, "e2e", None),
        # the text objectives: masking draws, Huginn's recurrence count and initial state, clean/noisy AR
        "mdm-block-2": (masked, "blockwise", 2),
        "huginn-e2e": (huginn, "e2e", None),
        "ar-block-3": (ar, "blockwise", 3),
    }


def run(name: str, exp: Experiment, method: str, block: int | None, device: torch.device) -> dict[str, torch.Tensor]:
    module, objective, steps = training_job(exp, method, block)
    result = train(
        module,
        objective,
        exp.load_data("train"),
        exp.config["train"],
        seed=7,
        device=device,
        steps=steps,
        progress=False,
    )
    tensors = {f"model/{k}": v.detach().clone() for k, v in module.state_dict().items()}
    if result.averaged is not None:
        tensors.update({f"ema/{k}": v.detach().clone() for k, v in result.averaged.state_dict().items()})
    tensors["losses"] = torch.tensor([loss for _, loss in result.losses])
    return tensors


def samples() -> torch.Tensor | None:
    """10 class-conditional samples of a freshly built 3-block DiT, in chunks of 3 (dealt over the ranks)."""
    exp = Experiment(micro_config(task="generation"))
    torch.manual_seed(0)
    model = AssembledModel(exp.empty_blocks(), exp.partition)
    grid = exp.partition.boundaries[::-1]
    return generate(
        model,
        torch.arange(10) % 10,
        list(grid),
        torch.Generator().manual_seed(3),
        guidance=2.0,
        null_label=exp.arch.num_classes,
        batch_size=3,
    )


def evaluation(inputs: Path) -> dict | None:
    """evaluate_generator's record for a freshly built 3-block DiT, against the feature net and reference
    statistics the test wrote under ``inputs`` (rank 0's; None on the others)."""
    exp = Experiment(micro_config(task="generation"))
    torch.manual_seed(0)
    model = AssembledModel(exp.empty_blocks(), exp.partition)
    stats = {split: inputs / f"{split}.safetensors" for split in ("train", "test")}
    result = evaluate_generator(
        model,
        exp,
        None,
        features=inputs / "net.safetensors",
        samples=24,
        steps=3,
        grid_path=None,
        reference_stats=stats,
        evaluations=2,
        batch_size=8,
    )
    return None if result is None else {k: v for k, v in result.items() if "seconds" not in k}


def continuations() -> dict[str, torch.Tensor] | None:
    """7 top-p continuations (end-to-end AR) and 7 block-wise greedy ones of 4 tokens each, from freshly built
    micro models, in chunks of 2 (dealt over the ranks): rank 0's, None on the others."""
    exp = Experiment(
        resolve({"task": "ar_text", "arch": "AR-micro", "dataset": "shakespeare", "blocks": 4, "device": "cpu"})
    )
    torch.manual_seed(0)
    baseline, blocks = exp.e2e().eval(), AssembledModel(exp.empty_blocks(), exp.partition).eval()
    prompts = exp.load_data("validation").tokens[:7, :12]
    out = {
        "e2e": in_chunks(lambda c, g: generate_baseline(baseline, c, 4, g), prompts, 2, 5, "test", CPU),
        "blockwise": in_chunks(lambda c, g: generate_blockwise(blocks, c, 4, g), prompts, 2, 5, "test", CPU),
    }
    return None if out["e2e"] is None else out


def main(out: Path) -> None:
    world, device = distributed.setup(torch.device("cpu"))
    try:
        for name, (exp, method, block) in jobs().items():
            tensors = run(name, exp, method, block, device)
            if world.main:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
        images = samples()
        assert (images is not None) == world.main
        if world.main:
            save_file({"images": images}, str(out / "samples.safetensors"))
        record = evaluation(out)
        if world.main:
            (out / "evaluation.json").write_text(json.dumps(record))
        texts = continuations()
        if world.main:
            save_file(texts, str(out / "continuations.safetensors"))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
