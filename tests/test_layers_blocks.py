"""Noise-conditioned layers, the stack-to-blocks converter, experiment-built blocks, routing of an
assembled model and the samplers' per-block call counts (docs/method.md §3-§5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dblocks import config as cfg
from dblocks import sample
from dblocks.blocks import AssembledModel, BlockDenoiser, DenoiserOutput, convert_stack
from dblocks.experiment import Experiment
from dblocks.layers import AdaLNZeroLayer, Attention, FinalLayer, NoiseEmbedding, SwiGLU, apply_rotary
from dblocks.noise import Partition
from dblocks.tasks import ImageGenerationTask


def _vit_experiment(**extra) -> Experiment:
    return Experiment(
        cfg.resolve(
            {
                "name": "vit-micro",
                "task": "classification",
                "arch": "ViT-micro",
                "dataset": "digits",
                "blocks": 3,
                **extra,
            }
        )
    )


def _dit_experiment(**extra) -> Experiment:
    return Experiment(
        cfg.resolve(
            {"name": "dit-micro", "task": "generation", "arch": "DiT-micro", "dataset": "digits", "blocks": 3, **extra}
        )
    )


def _perturb(module: nn.Module, seed: int = 0) -> None:
    """Give zero-initialised parameters some random values so outputs are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("width, heads", [(16, 2), (32, 4)])
def test_adaln_zero_layer_is_identity_at_init(width, heads):
    torch.manual_seed(0)
    layer = AdaLNZeroLayer(width, heads)
    h = torch.randn(3, 5, width) * 4
    c = torch.randn(3, width) * 4
    assert torch.equal(layer(h, c), h)
    # the modulation is the only zero-initialised part: attention and MLP are not trivially zero
    assert layer.attn.qkv.weight.abs().sum() > 0
    assert layer.mlp[0].weight.abs().sum() > 0
    assert torch.count_nonzero(layer.modulation[1].weight) == 0
    assert torch.count_nonzero(layer.modulation[1].bias) == 0


def test_adaln_zero_layer_after_perturbation_is_not_identity_and_uses_c():
    torch.manual_seed(0)
    layer = AdaLNZeroLayer(16, 2)
    _perturb(layer)
    h = torch.randn(2, 4, 16)
    c1, c2 = torch.randn(2, 16), torch.randn(2, 16)
    out1 = layer(h, c1)
    assert out1.shape == h.shape
    assert not torch.allclose(out1, h)
    assert not torch.allclose(out1, layer(h, c2))


def test_llama_style_layer_rmsnorm_swiglu_no_bias_and_identity_at_init():
    torch.manual_seed(0)
    layer = AdaLNZeroLayer(32, 4, style="llama", rope_period=8)
    assert isinstance(layer.norm1, nn.RMSNorm) and isinstance(layer.mlp, SwiGLU)
    assert layer.attn.qkv.bias is None and layer.attn.proj.bias is None
    assert layer.mlp.gate.weight.shape == (88, 32)  # 2/3 of 4 x 32, rounded up to a multiple of 8
    h, c = torch.randn(2, 16, 32) * 4, torch.randn(2, 32)
    assert torch.equal(layer(h, c), h)
    _perturb(layer)
    assert not torch.allclose(layer(h, c), h)
    with pytest.raises(ValueError, match="allowed: dit, llama"):
        AdaLNZeroLayer(32, 4, style="gpt")


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rotary(q, torch.tensor([m])) * apply_rotary(k, torch.tensor([n]))).sum(-1)

    assert torch.allclose(score(3, 1), score(10, 8), atol=1e-5)
    assert torch.allclose(score(0, 0), (q * k).sum(-1), atol=1e-6)  # position 0 is no rotation
    assert not torch.allclose(score(3, 1), score(1, 3), atol=1e-3)


def test_rotary_period_puts_the_noisy_half_at_the_clean_positions():
    """With period T a 2T sequence [a; a] gets positions [0..T-1; 0..T-1]: without a mask the two halves
    give identical outputs, which absolute positions 0..2T-1 would not."""
    torch.manual_seed(0)
    attn = Attention(16, 2, bias=False, rope_period=5)
    a = torch.randn(1, 5, 16)
    out = attn(torch.cat([a, a], dim=1))
    assert torch.allclose(out[:, :5], out[:, 5:], atol=1e-6)
    attn.rope_period = 10
    out = attn(torch.cat([a, a], dim=1))
    assert not torch.allclose(out[:, :5], out[:, 5:], atol=1e-4)


def test_adaln_zero_layer_cond_dim():
    layer = AdaLNZeroLayer(16, 4, cond_dim=8)
    h = torch.randn(2, 3, 16)
    assert torch.equal(layer(h, torch.randn(2, 8)), h)


def test_final_layer_outputs_zeros_at_init():
    torch.manual_seed(0)
    final = FinalLayer(16, 7)
    out = final(torch.randn(3, 5, 16), torch.randn(3, 16))
    assert out.shape == (3, 5, 7)
    assert torch.count_nonzero(out) == 0


def test_noise_embedding_shape_and_distinct():
    torch.manual_seed(0)
    emb = NoiseEmbedding(24, frequency_dim=32)
    sigmas = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0])
    c_noise = sigmas.log() / 4
    out = emb(c_noise)
    assert out.shape == (5, 24)
    assert torch.isfinite(out).all()
    for i in range(5):
        for j in range(i + 1, 5):
            assert not torch.allclose(out[i], out[j], atol=1e-4), (i, j)
    # same sigma -> same embedding
    torch.testing.assert_close(emb(c_noise[:1]), out[:1])
    # a nearby sigma gives a different embedding (continuous in sigma, but not constant)
    assert not torch.equal(emb(torch.log(torch.tensor([0.51])) / 4), out[2:3])


# ----------------------------------------------------------------------------- convert_stack


class MyLayer(nn.Module):
    """A user-defined residual layer with the layer(h, c) -> h signature."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h, c):
        return h + self.lin(h) * c.unsqueeze(1)


class MyStem(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.cond = nn.Linear(1, width)

    def forward(self, z_in, cond, c_noise):
        return self.inp(z_in).unsqueeze(1), self.cond(c_noise.reshape(-1, 1))


class MyHead(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.out = nn.Linear(width, 4)

    def forward(self, h, c):
        return self.out(h[:, 0])


class VectorTask(ImageGenerationTask):
    def __init__(self) -> None:
        super().__init__((4,), num_classes=1)  # type: ignore[arg-type]


def _user_stack(width: int = 8, depth: int = 6):
    torch.manual_seed(0)
    return [MyLayer(width) for _ in range(depth)], MyStem(width), MyHead(width)


def test_convert_stack_user_layers_independent():
    layers, stem, head = _user_stack()
    blocks = convert_stack(layers, Partition.make(3), stem, head, VectorTask(), split=[1, 3, 2], share_stem_head=False)
    assert isinstance(blocks, AssembledModel) and len(blocks) == 3 and blocks.partition.blocks == 3
    assert all(isinstance(b, BlockDenoiser) for b in blocks)
    assert [len(b.layers) for b in blocks] == [1, 3, 2]
    # the very same layer objects, in order
    flat = [layer for b in blocks for layer in b.layers]
    assert len(flat) == 6
    assert all(a is b for a, b in zip(flat, layers))
    # no parameter storage shared between any two blocks
    ptrs = [{p.data_ptr() for p in b.parameters()} for b in blocks]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not ptrs[i] & ptrs[j], (i, j)
    assert blocks[1].stem is not blocks[2].stem and blocks[1].head is not blocks[2].head
    # each copy starts from the same stem/head weights
    for b in blocks:
        torch.testing.assert_close(b.stem.inp.weight, stem.inp.weight)
        torch.testing.assert_close(b.head.out.weight, head.out.weight)
    # and the blocks are runnable denoisers
    z = torch.randn(5, 4)
    out = blocks[1](z, torch.full((5,), 0.7), None)
    assert isinstance(out, DenoiserOutput)
    assert out.raw.shape == (5, 4) and out.denoised.shape == (5, 4)


def test_convert_stack_independent_blocks_train_independently():
    layers, stem, head = _user_stack()
    blocks = convert_stack(layers, Partition.make(3), stem, head, VectorTask(), split=[2, 2, 2])
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    out = blocks[0](torch.randn(4, 4), torch.full((4,), 5.0), None)
    out.denoised.pow(2).mean().backward()
    with torch.no_grad():
        for p in blocks[0].parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    for k, v in blocks[1].state_dict().items():
        assert torch.equal(v, before[1][k])
    for k, v in blocks[2].state_dict().items():
        assert torch.equal(v, before[2][k])
    assert any(not torch.equal(v, before[0][k]) for k, v in blocks[0].state_dict().items())


def test_convert_stack_shared_stem_head():
    layers, stem, head = _user_stack()
    blocks = convert_stack(layers, Partition.make(3), stem, head, VectorTask(), split=[1, 3, 2], share_stem_head=True)
    assert all(b.stem is stem for b in blocks)
    assert all(b.head is head for b in blocks)
    assert [len(b.layers) for b in blocks] == [1, 3, 2]
    # layers are still disjoint
    layer_ptrs = [{p.data_ptr() for layer in b.layers for p in layer.parameters()} for b in blocks]
    assert not layer_ptrs[0] & layer_ptrs[1] and not layer_ptrs[1] & layer_ptrs[2]


@pytest.mark.parametrize("split", [[1, 3, 3], [2, 2], [6, 1], [1, 1, 1]])
def test_convert_stack_wrong_split_raises(split):
    layers, stem, head = _user_stack()
    with pytest.raises(ValueError, match="split"):
        convert_stack(layers, Partition.make(len(split)), stem, head, VectorTask(), split=split)


def test_block_denoiser_matches_edm_composition():
    layers, stem, head = _user_stack()
    _perturb(head)
    block = convert_stack(layers, Partition.make(1), stem, head, VectorTask(), split=[6])[0]
    z = torch.randn(3, 4)
    sigma = torch.tensor([0.375, 0.5, 1.2])
    out = block(z, sigma, None)
    # EDM preconditioning at sigma_data 0.5, by hand (tests/test_edm.py PRECOND_BY_HAND): sqrt(sigma^2 + 0.25) is
    # 0.625, sqrt(0.5), 1.3, so c_in = 1 / that, c_skip = 0.25 / (sigma^2 + 0.25), c_out = 0.5 sigma / sqrt(...)
    c_in = torch.tensor([[1.6], [2**0.5], [1 / 1.3]])
    c_skip = torch.tensor([[0.64], [0.5], [0.25 / 1.69]])
    c_out = torch.tensor([[0.3], [2**0.5 / 4], [0.6 / 1.3]])
    c_noise = torch.tensor([-0.98082925, -0.69314718, 0.18232156]) / 4  # ln(sigma) / 4
    raw = block.network(c_in * z, None, c_noise)
    torch.testing.assert_close(out.raw, raw)
    torch.testing.assert_close(out.denoised, c_skip * z + c_out * raw)
    # a scalar sigma is broadcast to the batch
    out_scalar = block(z, torch.tensor(1.0), None)
    torch.testing.assert_close(out_scalar.raw, block(z, torch.ones(3), None).raw)


# ----------------------------------------------------------------------------- Experiment-built blocks


def test_vit_block_shapes():
    exp = _vit_experiment()
    assert exp.split == [1, 1, 1]
    target_dim = exp.arch.target_dim
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 1, 8, 8, generator=g)
    for b in (1, 2, 3):
        block = exp.block(b)
        assert len(block.layers) == 1
        z = torch.randn(5, target_dim, generator=g)
        out = block(z, torch.full((5,), 0.4), images)
        assert out.raw.shape == (5, 10)
        assert out.denoised.shape == (5, target_dim)
        # at init the head is zero: uniform logits, D = mean label embedding
        assert torch.count_nonzero(out.raw) == 0
        torch.testing.assert_close(out.denoised, exp.task.embedding.mean(0).expand(5, -1))


def test_dit_block_shapes():
    exp = _dit_experiment()
    labels = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for b in (1, 2, 3):
        block = exp.block(b).eval()
        out = block(z, torch.full((4,), 1.5), labels)
        assert out.raw.shape == (4, 1, 8, 8)
        assert out.denoised.shape == (4, 1, 8, 8)
        # zero head: F = 0, so D = c_skip * z
        torch.testing.assert_close(out.denoised, z * 0.25 / (1.5**2 + 0.25))


def test_dit_block_nontrivial_after_perturbation():
    exp = _dit_experiment()
    block = exp.block(2).eval()
    _perturb(block)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out_a = block(z, torch.full((2,), 1.0), torch.tensor([1, 1]))
    out_b = block(z, torch.full((2,), 1.0), torch.tensor([2, 2]))
    out_c = block(z, torch.full((2,), 3.0), torch.tensor([1, 1]))
    assert not torch.allclose(out_a.raw, out_b.raw)  # label conditioning reaches the output
    assert not torch.allclose(out_a.raw, out_c.raw)  # noise conditioning reaches the output


@pytest.mark.parametrize("make", [_vit_experiment, _dit_experiment])
def test_block_init_deterministic_and_distinct(make):
    s1 = make().block(1).state_dict()
    torch.manual_seed(12345)  # the global RNG state must not matter
    s1_again = make().block(1).state_dict()
    assert s1.keys() == s1_again.keys()
    assert all(torch.equal(s1[k], s1_again[k]) for k in s1)
    s2 = make().block(2).state_dict()
    assert s1.keys() == s2.keys()  # same shapes for a [1,1,1] split ...
    assert not torch.equal(s1["stem.patch_embed.weight"], s2["stem.patch_embed.weight"])  # ... other values
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if "layers" in k)
    # another experiment seed gives other weights
    s1_other = make(seed=1).block(1).state_dict()
    assert not torch.equal(s1["stem.patch_embed.weight"], s1_other["stem.patch_embed.weight"])


def test_block_rejects_bad_index():
    exp = _vit_experiment()
    for b in (0, 4):
        with pytest.raises(ValueError):
            exp.block(b)


@pytest.mark.parametrize("make", [_vit_experiment, _dit_experiment])
def test_e2e_has_all_layers(make):
    exp = make()
    model = exp.e2e()
    assert len(model.layers) == exp.arch.spec.depth == 3
    assert sum(exp.split) == exp.arch.spec.depth


def test_custom_layer_split_and_two_blocks():
    exp = _vit_experiment(blocks=2, layer_split=[2, 1])
    assert [len(exp.block(b).layers) for b in (1, 2)] == [2, 1]
    assert exp.layer_indices(1) == [0, 1] and exp.layer_indices(2) == [2]


def test_shared_blocks_mode_shares_stem_and_head():
    exp = _dit_experiment()
    model = exp.shared_blocks()
    assert isinstance(model, AssembledModel)
    assert model.blocks[0].stem is model.blocks[1].stem is model.blocks[2].stem
    assert model.blocks[0].head is model.blocks[2].head
    assert [len(b.layers) for b in model.blocks] == exp.split


def test_vit_e2e_runs_without_noise_input():
    exp = _vit_experiment()
    model = exp.e2e().eval()
    logits = model.network(None, torch.randn(3, 1, 8, 8), None)
    assert logits.shape == (3, 10)
    preds = sample.classify_direct(model, torch.randn(5, 1, 8, 8), batch_size=2)
    assert preds.shape == (5,) and preds.dtype == torch.int64


# ----------------------------------------------------------------------------- AssembledModel routing


def test_assembled_model_routes_each_sigma_to_one_block():
    exp = _vit_experiment()
    p = exp.partition
    model = AssembledModel(exp.empty_blocks(), p)
    images = torch.randn(2, 1, 8, 8)
    z = torch.randn(2, exp.arch.target_dim)
    expected = [0, 0, 0]
    probes = []
    for b in (1, 2, 3):
        lo, hi = p.interval(b)
        probes += [(float((lo * hi) ** 0.5), b), (hi, b)]
    probes.append((p.dist.sigma_min, 3))
    for sigma, owner in probes:
        assert model.block_for(sigma) == owner
        out = model(z, sigma, images)
        expected[owner - 1] += 1
        assert model.calls == expected, (sigma, owner)
        # the output is exactly the owning block's output
        direct = model.blocks[owner - 1](z, torch.full((2,), sigma), images)
        torch.testing.assert_close(out.raw, direct.raw)
        torch.testing.assert_close(out.denoised, direct.denoised)
    assert model.task is exp.task


def test_assembled_model_rejects_mismatched_block_count():
    exp = _vit_experiment()
    with pytest.raises(ValueError):
        AssembledModel([exp.block(1), exp.block(2)], exp.partition)


# ----------------------------------------------------------------------------- samplers


def _perturbed_model(exp: Experiment) -> AssembledModel:
    """``exp``'s blocks with random weights (each its own seed), assembled."""
    blocks = exp.empty_blocks()
    for i, b in enumerate(blocks):
        _perturb(b, seed=i)
    return AssembledModel(blocks, exp.partition)


def _dit_model() -> tuple[Experiment, AssembledModel]:
    exp = _dit_experiment()
    return exp, _perturbed_model(exp)


def test_generate_calls_one_block_per_step():
    exp, model = _dit_model()
    grid = exp.noise.quantile_grid(12)
    labels = torch.tensor([0, 1, 2, 3, 4])
    imgs = sample.generate(model, labels, grid, torch.Generator().manual_seed(0), batch_size=8)
    assert imgs.shape == (5, 1, 8, 8)
    assert torch.isfinite(imgs).all()
    assert imgs.min() >= -1 and imgs.max() <= 1
    assert sum(model.calls) == 12
    owners = [exp.partition.route(s) for s in grid[:-1]]
    assert model.calls == [owners.count(b) for b in (1, 2, 3)]
    assert model.calls == [4, 4, 4]  # equi-probability partition, 12 equi-quantile steps


def test_generate_with_guidance_one_batched_call_per_step():
    exp, model = _dit_model()
    grid = exp.noise.quantile_grid(12)
    labels = torch.tensor([0, 5, 9])
    null = model.blocks[0].stem.null_label
    assert null == 10
    guided = sample.generate(
        model, labels, grid, torch.Generator().manual_seed(0), guidance=2.0, null_label=null, batch_size=8
    )
    assert guided.shape == (3, 1, 8, 8)
    assert sum(model.calls) == 12
    owners = [exp.partition.route(s) for s in grid[:-1]]
    assert model.calls == [owners.count(b) for b in (1, 2, 3)]
    # guidance changes the result (the conditional and null predictions differ)
    model.calls = [0, 0, 0]
    plain = sample.generate(model, labels, grid, torch.Generator().manual_seed(0), batch_size=8)
    assert sum(model.calls) == 12
    assert not torch.allclose(guided, plain)


def test_generate_deterministic_and_batched():
    exp, model = _dit_model()
    grid = exp.noise.quantile_grid(6)
    labels = torch.arange(4)
    a = sample.generate(model, labels, grid, torch.Generator().manual_seed(3), batch_size=4)
    b = sample.generate(model, labels, grid, torch.Generator().manual_seed(3), batch_size=4)
    assert torch.equal(a, b)
    model.calls = [0, 0, 0]
    sample.generate(model, labels, grid, torch.Generator().manual_seed(3), batch_size=2)
    assert sum(model.calls) == 2 * 6  # two chunks, 6 steps each


def test_classify_calls_each_block_once_per_batch():
    model = _perturbed_model(_vit_experiment())
    images = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    preds = sample.classify(model, images, torch.Generator().manual_seed(0), batch_size=2)
    assert preds.shape == (5,)
    assert preds.dtype == torch.int64
    assert ((preds >= 0) & (preds < 10)).all()
    assert model.calls == [3, 3, 3]  # 3 batches (2 + 2 + 1), each block once per batch
    model.calls = [0, 0, 0]
    sample.classify(model, images, torch.Generator().manual_seed(0), batch_size=512)
    assert model.calls == [1, 1, 1]


def test_classify_from_the_noise_mean_is_deterministic_and_starts_at_zero():
    model = _perturbed_model(_vit_experiment())
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    a = sample.classify(model, images, torch.Generator().manual_seed(1), start="mean")
    b = sample.classify(model, images, start="mean")
    assert torch.equal(a, b)  # no draw enters the chain: it needs no generator
    assert all(torch.equal(z, torch.zeros_like(z)) for z in seen)  # the first block reads z = 0 at sigma_max
    seen.clear()
    sample.classify(model, images, torch.Generator().manual_seed(1))  # the paper's start: a noise draw
    assert seen[0].std() > 0.5 * model.partition.boundaries[-1]
    with pytest.raises(ValueError, match="allowed: noise, mean"):
        sample.classify(model, images, torch.Generator(), start="zero")
    with pytest.raises(ValueError, match="pass a generator"):
        sample.classify(model, images)


def test_euler_sample_uses_last_output_of_lowest_noise_block():
    exp = _vit_experiment()
    model = AssembledModel(exp.empty_blocks(), exp.partition)
    grid = list(reversed(exp.partition.boundaries))
    z = torch.randn(2, exp.arch.target_dim)
    images = torch.randn(2, 1, 8, 8)
    z_final, out = sample.euler_sample(model, z, grid, images)
    assert model.calls == [1, 1, 1]
    assert z_final.shape == z.shape
    assert out.raw.shape == (2, 10)
