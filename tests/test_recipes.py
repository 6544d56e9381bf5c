"""The paper recipes' training pieces: augmentation, the weight average (EMA), bf16 autocast, the cosine floor,
and which weights sampling and evaluation read."""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from dblocks.assemble import assemble, load_model, save_block, save_e2e
from dblocks.augment import augment, random_crop
from dblocks.checkpoint import load_checkpoint, load_metadata
from dblocks.cli import main
from dblocks.config import resolve
from dblocks.ema import EMA, beta, half_life
from dblocks.errors import ConfigError, TrainingError
from dblocks.experiment import Experiment
from dblocks.layers import Attention
from dblocks.params import Params
from dblocks.train import (
    Objective,
    block_objective,
    cross_entropy_objective,
    lr_lambda,
    paper_mode_objective,
    precision_context,
    resolve_precision,
    train,
)
from tests.conftest import micro_config, train_killed_at_loss

CPU = torch.device("cpu")


def _images(n=6, c=3, size=8) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ------------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("kind", ["flip", "crop_flip", "randaugment"])
def test_augmentation_is_fixed_by_the_generator_and_keeps_shape_and_range(kind):
    x = _images()
    global_state = torch.get_rng_state()
    a = augment(x, kind, torch.Generator().manual_seed(3))
    b = augment(x, kind, torch.Generator().manual_seed(3))
    c = augment(x, kind, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), global_state)  # dropout's stream is left alone
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= -1 and a.max() <= 1


def test_flip_mirrors_some_images_and_leaves_the_rest():
    x = _images(n=32)
    out = augment(x, "flip", torch.Generator().manual_seed(0))
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(m or k for m, k in zip(mirrored, kept)) and 4 < sum(mirrored) < 28
    # a latent dataset's mirrored encodings are picked instead of mirroring the latents
    stored = -x
    out = augment(x, "flip", torch.Generator().manual_seed(0), flipped=stored)
    assert all(torch.equal(o, s) if m else torch.equal(o, i) for o, s, i, m in zip(out, stored, x, mirrored))


def test_crop_is_a_window_of_the_black_padded_image():
    x = _images(n=16)
    out = random_crop(x, torch.Generator().manual_seed(0), padding=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), value=-1.0)
    for o, p in zip(out, padded):
        windows = [(t, left) for t in range(9) for left in range(9) if torch.equal(p[:, t : t + 8, left : left + 8], o)]
        assert windows, "a crop that is no window of the padded image"
    assert (out == -1).any()  # some crops reach into the padding


def test_randaugment_ops_on_a_group_equal_the_ops_image_by_image():
    """rand_augment batches the images that drew the same op; that is exact only if every op of torchvision's
    space treats the images of a batch independently (e.g. autocontrast's and equalize's statistics)."""
    from torchvision.transforms import v2

    transform = v2.RandAugment()
    pixels = ((_images(n=5, size=16) + 1) * 127.5).round().to(torch.uint8)
    for name, (magnitudes_of, _) in transform._AUGMENTATION_SPACE.items():
        magnitudes = magnitudes_of(transform.num_magnitude_bins, 16, 16)
        magnitude = float(magnitudes[transform.magnitude]) if magnitudes is not None else 0.0

        def apply(x, name=name, magnitude=magnitude):
            return transform._apply_image_or_video_transform(
                x, name, magnitude, interpolation=transform.interpolation, fill=transform._fill
            )

        assert torch.equal(apply(pixels), torch.stack([apply(p[None])[0] for p in pixels])), name


def test_augmentation_is_refused_where_it_has_no_meaning():
    with pytest.raises(ConfigError, match="train.augment='crop_flip' does not apply to dataset='digits-latent'"):
        resolve(
            {"task": "generation", "arch": "DiT-tiny/1", "dataset": "digits-latent", "train": {"augment": "crop_flip"}}
        )
    with pytest.raises(ConfigError, match="allowed: none, flip, crop_flip, randaugment"):
        resolve({"train": {"augment": "mixup"}})


# -------------------------------------------------------------------------------------------- the average


def test_ema_equals_the_closed_form_on_a_toy_parameter():
    p = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        p.weight.fill_(2.0)
    ema, d = EMA(p, 0.9, rampup=None), 0.9
    values = [1.0, -3.0, 0.5, 4.0, 2.5]
    for k, v in enumerate(values):
        with torch.no_grad():
            p.weight.fill_(v)
        ema.update(p, k)
    n = len(values)
    closed = d**n * 2.0 + (1 - d) * sum(d ** (n - i) * v for i, v in enumerate(values, 1))
    assert ema.tensors["weight"].item() == pytest.approx(closed, rel=1e-6)


def test_ema_ramp_up_follows_edm():
    assert beta(0.9999, 0.05, 0) == 0.0  # the first update copies the weights
    assert beta(0.9999, 0.05, 1000) == pytest.approx(0.5 ** (1 / 50))  # half-life 5 % of 1000 steps
    assert beta(0.9999, 0.05, 10**6) == pytest.approx(0.9999)  # long runs: the configured decay
    assert half_life(0.9999) == pytest.approx(6931.1, abs=0.1)


def _ema_exp(**train) -> Experiment:
    return Experiment(
        micro_config(train={**micro_config()["train"], "ema_decay": 0.9, "augment": "randaugment", **train})
    )


def test_resume_with_augmentation_and_ema_is_bit_identical(tmp_path):
    exp = _ema_exp()
    data, cfg = exp.load_data("train"), exp.config["train"]
    ref_model = exp.block(1)
    reference = train(
        ref_model, block_objective(ref_model, exp.partition, 1), data, cfg, seed=5, device=CPU, progress=False
    )
    state, m = tmp_path / "block-1.state.safetensors", exp.block(1)
    train_killed_at_loss(m, block_objective(m, exp.partition, 1), data, cfg, state)  # after the state of step 4
    resumed = exp.block(1)
    result = train(
        resumed,
        block_objective(resumed, exp.partition, 1),
        data,
        cfg,
        seed=5,
        device=CPU,
        state_path=state,
        progress=False,
    )
    assert result.resumed_from == 4
    for got, want in ((resumed, ref_model), (result.averaged, reference.averaged)):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert any(
        not torch.equal(a, b) for a, b in zip(result.averaged.state_dict().values(), resumed.state_dict().values())
    )


def test_a_training_state_and_its_config_must_agree_on_the_average(tmp_path):
    exp = _ema_exp(steps=4)
    m, state = exp.block(1), tmp_path / "s.safetensors"
    cfg = {**exp.config["train"], "checkpoint_every": 2}
    with pytest.raises(KeyboardInterrupt):
        calls = iter(range(10))
        objective = block_objective(m, exp.partition, 1)

        def dies(batch):
            if next(calls) == 3:
                raise KeyboardInterrupt
            return objective.loss(batch)

        train(
            m,
            Objective(dies, objective.draw),
            exp.load_data("train"),
            cfg,
            seed=0,
            device=CPU,
            state_path=state,
            progress=False,
        )
    with pytest.raises(Exception, match="a weight average was saved but training keeps none"):
        train(
            exp.block(1),
            objective,
            exp.load_data("train"),
            {**cfg, "ema_decay": 0.0},
            seed=0,
            device=CPU,
            state_path=state,
            progress=False,
        )


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def test_checkpoints_carry_both_weights_and_evaluation_names_the_ones_it_read(tmp_path, capsys):
    common = (
        "--arch ViT-micro --blocks 2 --steps 4 --batch-size 8 --no-progress --device cpu "
        "--set train.warmup=1 --set train.ema_decay=0.5"
    ).split()
    blocks = [tmp_path / f"block-{b}.safetensors" for b in (1, 2)]
    for b, out in enumerate(blocks, 1):
        assert _run("train-block", *common, "--block", b, "--out", out) == 0
    tensors, _ = load_checkpoint(blocks[0])
    raw = {k for k in tensors if not k.startswith(("ema/", "task/"))}
    assert raw and {k.removeprefix("ema/") for k in tensors if k.startswith("ema/")} == raw
    model_path = tmp_path / "model.safetensors"
    assemble(blocks, model_path)
    ema_model, _, meta = load_model(model_path)  # auto: the average where there is one
    raw_model, _, raw_meta = load_model(model_path, weights="raw")
    assert (meta["weights"], raw_meta["weights"]) == ("ema", "raw")
    assert any(not torch.equal(a, b) for a, b in zip(ema_model.state_dict().values(), raw_model.state_dict().values()))
    for weights in ("raw", "ema"):
        out = tmp_path / f"{weights}.json"
        assert _run("evaluate", model_path, "--out", out, "--weights", weights, "--no-progress") == 0
        record = json.loads(out.read_text())
        assert record["weights"] == weights and record["evaluation"]["weights"] == weights
    # without --weights the config's sample.weights decides (recorded with the model; --params' wins in the DAG)
    raw_cfg = tmp_path / "raw"
    raw_cfg.mkdir()
    for b in (1, 2):
        assert (
            _run(
                "train-block",
                *common,
                "--set",
                "sample.weights=raw",
                "--block",
                b,
                "--out",
                raw_cfg / f"block-{b}.safetensors",
            )
            == 0
        )
    assemble([raw_cfg / f"block-{b}.safetensors" for b in (1, 2)], raw_cfg / "model.safetensors")
    assert _run("evaluate", raw_cfg / "model.safetensors", "--out", raw_cfg / "m.json", "--no-progress") == 0
    assert json.loads((raw_cfg / "m.json").read_text())["weights"] == "raw"
    # a checkpoint without an average cannot be evaluated "with" one
    plain = tmp_path / "plain.safetensors"
    assert _run("train-baseline", *common[:-2], "--out", plain) == 0
    assert _run("evaluate", plain, "--out", tmp_path / "p.json", "--weights", "ema") == 2
    assert "training kept no weight average" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- precision, schedule


def test_bf16_autocast_learns_digits_and_keeps_float32_weights(tmp_path):
    exp = Experiment(
        micro_config(
            train={"steps": 150, "batch_size": 32, "lr": 3e-3, "warmup": 10, "log_every": 50, "precision": "bf16"}
        )
    )
    model = exp.e2e()
    seen = []
    objective = cross_entropy_objective(model)

    def spy(batch):
        loss = objective.loss(batch)
        seen.append(torch.is_autocast_enabled("cpu"))
        return loss

    train(
        model,
        Objective(spy, objective.draw),
        exp.load_data("train"),
        exp.config["train"],
        seed=0,
        device=CPU,
        progress=False,
    )
    assert all(seen)
    test = exp.load_data("test")
    with torch.no_grad():
        accuracy = (model.network(None, test.images, None).argmax(-1) == test.labels).float().mean()
    assert accuracy > 0.6, f"bf16 end-to-end accuracy {accuracy:.3f}"  # chance: 0.1
    path = tmp_path / "e2e.safetensors"
    save_e2e(path, model, exp, 150)
    tensors, _ = load_checkpoint(path)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}


def test_bf16_autocast_on_cpu_runs_attention_in_float32_and_matches_it():
    # the matmuls around attention run in bf16; attention itself in float32 (its CPU bf16 backward is slow)
    torch.manual_seed(0)
    attn = Attention(32, 4, rope_period=16)
    x = torch.randn(3, 16, 32, requires_grad=True)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, attn_mask=attn_mask)

    reference = attn(x)
    with mock.patch("torch.nn.functional.scaled_dot_product_attention", spy), torch.autocast("cpu", torch.bfloat16):
        out = attn(x)
    assert seen == [(torch.float32, False)]
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: agreement to a few parts in a hundred, not to float32's
    assert torch.allclose(out.float(), reference, atol=0.05 * reference.abs().max().item())
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_auto_precision_is_bf16_only_where_the_device_multiplies_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    assert (resolve_precision(cpu, "fp32"), resolve_precision(cpu, "bf16")) == ("fp32", "bf16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert resolve_precision(cpu, "auto") == "bf16"
    exp = Experiment(micro_config(train={**micro_config()["train"], "steps": 2, "precision": "auto"}))
    model = exp.block(1)
    result = train(
        model,
        block_objective(model, exp.partition, 1),
        exp.load_data("train"),
        exp.config["train"],
        seed=0,
        device=CPU,
        progress=False,
    )
    assert result.precision == "bf16"  # what the steps ran in, for the run's record
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision(cpu, "auto") == "fp32"  # emulated bf16 would be slower than float32
    with precision_context(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert resolve_precision(cpu, "auto") == "fp32"  # a torch without the probes: float32


def test_bf16_still_stops_a_diverging_job():
    exp = Experiment(micro_config(train={**micro_config()["train"], "precision": "bf16"}))
    m = exp.block(1)
    with torch.no_grad():
        next(m.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match="not finite|is nan|is inf"):
        train(
            m,
            block_objective(m, exp.partition, 1),
            exp.load_data("train"),
            exp.config["train"],
            seed=0,
            device=CPU,
            progress=False,
        )


def test_cosine_ends_at_the_floor_and_warms_up_linearly():
    f = lr_lambda(warmup=10, total=110, schedule="cosine", floor=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="train.min_lr=0.01 is above train.lr"):
        resolve({"train": {"lr": 1e-3, "min_lr": 1e-2}})
    assert math.isclose(lr_lambda(0, 10, "constant", 0.5)(7), 1.0)


def test_shared_stem_mode_learns_its_label_table_and_the_blocks_keep_it(vit_exp, tmp_path):
    """The authors' single process learns an L2-normalised label table; independent blocks keep the fixed one."""
    model = vit_exp.shared_blocks()
    table = model.label_table.weight.detach().clone()
    train(
        model,
        paper_mode_objective(model),
        vit_exp.load_data("train"),
        vit_exp.config["train"],
        seed=0,
        device=CPU,
        progress=False,
    )
    assert not torch.equal(model.label_table.weight, table)  # trained through the noisy input
    learned = vit_exp.task.embedding.detach()
    assert torch.allclose(learned.norm(dim=1), torch.ones(len(learned)))
    paths = [tmp_path / f"block-{b}.safetensors" for b in (1, 2, 3)]
    for b, (path, blk) in enumerate(zip(paths, model.blocks), 1):
        save_block(path, blk, vit_exp, b, "paper", 8)
    assemble(paths, tmp_path / "model.safetensors")
    loaded, exp, _ = load_model(tmp_path / "model.safetensors")
    assert torch.equal(exp.task.embedding, learned)  # sampling reads the learned space
    assert not torch.equal(learned, Experiment(vit_exp.config).task.fixed)
    assert not hasattr(Experiment(vit_exp.config).block(1), "label_table")


def test_a_job_of_k_times_the_steps_stretches_the_warm_up_too(vit_exp):
    """The shared-stem mode runs B x train.steps; its warm-up is B x train.warmup, as in the authors' code."""
    cfg = {**vit_exp.config["train"], "steps": 4, "warmup": 2, "log_every": 1, "schedule": "constant"}
    model, lrs = vit_exp.shared_blocks(), []
    train(
        model,
        paper_mode_objective(model),
        vit_exp.load_data("train"),
        cfg,
        seed=0,
        device=CPU,
        steps=12,
        on_log=lambda step, loss, lr: lrs.append(lr),
        progress=False,
    )
    # warm-up over 3 x 2 = 6 steps; the rate logged after the k-th step (k = 1, 2, ...) is the next step's,
    # (k + 1) / 6 of train.lr: 2/6, 3/6, 4/6, 5/6, then the full rate (a 2-step warm-up would reach it at once)
    assert lrs[:7] == pytest.approx([cfg["lr"] * f for f in (2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 1.0)])


def test_checkpoints_carry_the_scale_of_the_params_file_they_were_trained_from(tmp_path):
    out = tmp_path / "block-1.safetensors"
    assert (
        _run(
            "train-block",
            "--config",
            "params/tiny.yaml",
            "--experiment",
            "vit-cifar100",
            "--block",
            1,
            "--steps",
            1,
            "--batch-size",
            4,
            "--no-progress",
            "--out",
            out,
        )
        == 0
    )
    assert load_metadata(out)["scale"] == "tiny"
    model = tmp_path / "model.safetensors"
    assert (
        _run("train-baseline", "--arch", "ViT-micro", "--steps", 1, "--batch-size", 4, "--no-progress", "--out", model)
        == 0
    )
    assert load_metadata(model)["scale"] == "unknown"  # no params file, no --track record: never guessed


def test_latents_without_their_mirrored_encodings_are_not_flipped():
    from dblocks.data import ImageDataset
    from dblocks.train import sample_batch

    latents = ImageDataset(
        "imagenet256", "train", torch.randn(4, 4, 2, 2), torch.zeros(4, dtype=torch.long), 1000, latent_scale=0.18215
    )
    with pytest.raises(TrainingError, match="without the latents of mirrored images"):
        sample_batch(latents, 2, torch.Generator().manual_seed(0), CPU, "flip")
    latents.flipped = -latents.images
    batch = sample_batch(latents, 8, torch.Generator().manual_seed(0), CPU, "flip")
    assert all(any(torch.equal(x, y) for y in (*latents.images, *latents.flipped)) for x in batch["image"])


def test_the_shared_stem_classifier_refuses_a_weight_average_it_could_not_keep_whole(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(f"base: {Path('params/paper.yaml').resolve()}\noverride: {{train: {{ema_decay: 0.9}}}}\n")
    with pytest.raises(ConfigError, match="experiments.vit-cifar100.train.ema_decay=0.9: the shared-stem mode"):
        Params.load(params)
    assert _run("train-shared", "--arch", "ViT-micro", "--set", "train.ema_decay=0.5", "--out-dir", tmp_path) == 2
    assert "the shared-stem mode learns the label table" in capsys.readouterr().err
