"""NoProp (dblocks.baselines.noprop): the schedule and losses against the paper's formulas worked by hand,
block independence of NoProp-DT, and that each variant learns the digits."""

from __future__ import annotations

import math

import pytest
import torch

from dblocks.baselines import evaluate_accuracy, load_state, save_state
from dblocks.baselines import noprop as npm
from dblocks.baselines.noprop import (
    LearnedSNR,
    NoPropNet,
    cosine_alpha_bar,
    denoising_loss,
    dt_block,
    dt_block_objective,
    dt_block_weight,
    dt_head,
    noprop_continuous,
    noprop_dt,
    posterior_coefficients,
    prior_kl,
    snr,
    train_noprop_block,
    train_noprop_continuous,
    train_noprop_head,
)
from dblocks.data import load_image_dataset

SPEC = "NoProp-tiny"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small models, one thread


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits", "train"), load_image_dataset("digits", "test")


# ------------------------------------------------------------------------------- formulas, by hand


def test_cosine_schedule_by_hand():
    # T = 2: abar_t = f((3 - t) / 3) / f(0), f(tau) = cos^2(pi/2 (tau + 0.008) / 1.008)
    #   f(0)   = cos^2(pi/2 * 0.0079365)     = 0.99984459
    #   t = 0: tau = 1   -> cos^2(pi/2) = 0  -> abar_0 = 0
    #   t = 1: tau = 2/3 -> cos^2(1.051347) = 0.24640987 -> abar_1 = 0.24644817
    #   t = 2: tau = 1/3 -> cos^2(0.535432) = 0.74276818 -> abar_2 = 0.74288363
    abar = cosine_alpha_bar(2)
    assert abar.tolist() == pytest.approx([0.0, 0.24644817, 0.74288363], abs=1e-7)
    # SNR = abar / (1 - abar): 0, 0.24644817 / 0.75355183 = 0.32704873, 0.74288363 / 0.25711637 = 2.88928950
    assert snr(abar).tolist() == pytest.approx([0.0, 0.32704873, 2.88928950], abs=1e-7)
    # the paper's T = 10: 0 at the prior, rising, below 1 at z_T
    ten = cosine_alpha_bar(10)
    assert ten[0] == 0 and bool((ten.diff() > 0).all()) and 0.97 < ten[-1] < 0.98


def test_posterior_coefficients_by_hand():
    abar = cosine_alpha_bar(2)
    # t = 2: alpha_1 = abar_1 / abar_2 = 0.24644817 / 0.74288363 = 0.33174684
    #   a_2 = sqrt(0.74288363) (1 - 0.33174684) / (1 - 0.24644817) = 0.86190698 * 0.66825316 / 0.75355183 = 0.76434472
    #   b_2 = sqrt(0.33174684) (1 - 0.74288363) / 0.75355183 = 0.57597469 * 0.25711637 / 0.75355183 = 0.19652554
    #   c_2 = (1 - 0.74288363) (1 - 0.33174684) / 0.75355183 = 0.22801247
    a, b, c = posterior_coefficients(abar[1], abar[2])
    assert [a.item(), b.item(), c.item()] == pytest.approx([0.76434472, 0.19652554, 0.22801247], abs=1e-7)
    # t = 1 starts from the prior (abar_0 = 0): a_1 = sqrt(abar_1), b_1 = 0, c_1 = 1 - abar_1
    a, b, c = posterior_coefficients(abar[0], abar[1])
    assert [a.item(), b.item(), c.item()] == pytest.approx([math.sqrt(0.24644817), 0.0, 0.75355183], abs=1e-7)


def test_posterior_is_consistent_with_the_marginals_and_its_kl_weight_is_the_snr_difference():
    abar = cosine_alpha_bar(10)
    a, b, c = posterior_coefficients(abar[:-1], abar[1:])
    # z_{t-1} ~ q(z_{t-1}|y) pushed through the posterior gives q(z_t|y): mean and variance
    assert torch.allclose(a + b * abar[:-1].sqrt(), abar[1:].sqrt())
    assert torch.allclose(b**2 * (1 - abar[:-1]) + c, 1 - abar[1:])
    # KL(q(z_t|z_{t-1},y) || p(z_t|z_{t-1},x)) = a_t^2 ||u_hat - u||^2 / (2 c_t): a_t^2 / c_t = SNR(t) - SNR(t-1)
    assert torch.allclose(a**2 / c, snr(abar[1:]) - snr(abar[:-1]))


def test_dt_block_loss_by_hand():
    abar = cosine_alpha_bar(2)
    # block 2, eta = 0.1: (T eta / 2)(SNR(2) - SNR(1)) = (2 * 0.1 / 2)(2.88928950 - 0.32704873) = 0.25622408
    assert dt_block_weight(abar, 2, eta=0.1) == pytest.approx(0.25622408, abs=1e-7)
    assert dt_block_weight(abar, 1, eta=0.1) == pytest.approx(0.1 * 0.32704873, abs=1e-7)
    # u_hat = (0.5, 0.5, 0), u_y = (1, 0, 0): ||u_hat - u_y||^2 = 0.25 + 0.25 = 0.5; loss = 0.25622408 * 0.5
    u_hat, u = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    assert denoising_loss(u_hat, u, 0.25622408).item() == pytest.approx(0.12811204, abs=1e-7)
    with pytest.raises(ValueError, match="allowed: 1..2"):
        dt_block_weight(abar, 3)


def test_dt_block_objective_is_the_formula():
    """The objective block 2 trains: z_1 = sqrt(abar_1) u_y + sqrt(1 - abar_1) eps into the network, softmax of
    its logits over the one-hot embeddings as u_hat, weighted squared error."""
    torch.manual_seed(0)
    net = dt_block(SPEC, (1, 8, 8), 3).eval()
    seen = {}

    def fixed_logits(image, z):  # u_hat = softmax(log(0.5, 0.5, 1e-12)) = (0.5, 0.5, 0)
        seen["z"] = z
        return torch.log(torch.tensor([[0.5, 0.5, 1e-12]])).expand(len(z), -1)

    net.forward = fixed_logits
    objective = dt_block_objective(net, block=2, steps=2, eta=0.1)
    batch = objective.draw(
        {"image": torch.zeros(2, 1, 8, 8), "label": torch.tensor([0, 2])}, torch.Generator().manual_seed(0)
    )
    loss = objective.loss(batch)
    u = torch.eye(3)[[0, 2]]
    assert torch.allclose(seen["z"], math.sqrt(0.24644817) * u + math.sqrt(0.75355183) * batch["noise"], atol=1e-6)
    # errors: label 0 -> 0.25 + 0.25 = 0.5; label 2 -> 0.25 + 0.25 + 1 = 1.5; mean 1.0, times 0.25622408
    assert loss.item() == pytest.approx(0.25622408, abs=1e-6)


def test_prior_kl_by_hand():
    # d = 3, u = e_1, abar = 0.5: (0.5 * 1 - 3 * 0.5 - 3 log 0.5) / 2 = (0.5 - 1.5 + 2.07944154) / 2 = 0.53972077
    assert prior_kl(torch.tensor([[1.0, 0.0, 0.0]]), 0.5).item() == pytest.approx(0.53972077, abs=1e-6)
    # DT's prior is exact: abar_0 = 0 gives 0
    assert prior_kl(torch.eye(3), float(cosine_alpha_bar(10)[0])).abs().max().item() == 0


def test_learned_snr_schedule():
    torch.manual_seed(0)
    schedule = LearnedSNR(gamma_noise=10.0, gamma_clean=-4.0)
    t = torch.linspace(0, 1, 201)
    with torch.no_grad():
        gamma = schedule.gamma(t)
        abar = schedule.alpha_bar(t)
    # the end points: gamma(0) = gamma_noise, gamma(1) = gamma_clean; abar = sigmoid(-gamma)
    assert gamma[0].item() == pytest.approx(10.0, abs=1e-4) and gamma[-1].item() == pytest.approx(-4.0, abs=1e-4)
    assert abar[0].item() == pytest.approx(1 / (1 + math.exp(10)), rel=1e-4)
    assert abar[-1].item() == pytest.approx(1 / (1 + math.exp(-4)), rel=1e-5)
    assert bool((abar.diff() > 0).all())  # the SNR rises with t
    # SNR'(t) is the derivative of exp(-gamma(t)): central differences, and its integral is SNR(1) - SNR(0)
    derivative = schedule.snr_derivative(t).detach()
    ratio = torch.exp(-gamma.double())
    assert torch.allclose(derivative[1:-1].double(), (ratio[2:] - ratio[:-2]) / (2 / 200), rtol=2e-2)
    integral = torch.trapezoid(derivative.double(), t.double())
    assert integral.item() == pytest.approx(math.exp(4) - math.exp(-10), rel=1e-3)
    # the loss weight keeps its graph: the schedule's parameters learn through it
    schedule.snr_derivative(torch.tensor([0.5])).sum().backward()
    assert schedule.gamma_clean.grad is not None and schedule.l2.weight.grad.abs().sum() > 0


def test_fm_loss_and_ct_loss_are_the_formulas():
    torch.manual_seed(0)
    batch = {
        "image": torch.zeros(2, 1, 8, 8),
        "label": torch.tensor([1, 0]),
        "time": torch.tensor([0.25, 0.5]),
        "noise": torch.tensor([[1.0, 2.0], [0.0, -1.0]]),
        "noise_end": torch.zeros(2, 2),
    }
    fm = npm.NoPropFM(SPEC, (1, 8, 8), 2).eval()
    fm.net.forward = lambda image, z, t: torch.zeros_like(z)  # v_hat = 0: the loss is E ||u_y - z_0||^2
    # ||(0, 1) - (1, 2)||^2 = 2, ||(1, 0) - (0, -1)||^2 = 2
    assert fm.loss(batch).item() == pytest.approx(2.0)

    ct = npm.NoPropCT(SPEC, (1, 8, 8), 2, eta=0.1).eval()
    ct.net.forward = lambda image, z, t: torch.zeros_like(z)  # u_hat = softmax(0) @ I = (0.5, 0.5)
    ends = ct.schedule.alpha_bar(torch.tensor([0.0, 1.0]))
    u = torch.eye(2)[batch["label"]]
    cross_entropy = torch.nn.functional.cross_entropy(ct.head(ends[1].sqrt() * u), batch["label"])
    weight = 0.05 * ct.schedule.snr_derivative(batch["time"])
    expected = cross_entropy + prior_kl(u, ends[0]).mean() + (weight * 0.5).mean()  # ||(.5,.5) - e_y||^2 = 0.5
    assert ct.loss(batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_paper_sizes_run_on_cifar100_shapes():
    images, generator = torch.zeros(2, 3, 32, 32), torch.Generator().manual_seed(0)
    block = dt_block("NoProp-paper", (3, 32, 32), 100).eval()
    assert block(images, torch.zeros(2, 100)).shape == (2, 100)
    for variant in ("ct", "fm"):
        model = npm.CONTINUOUS[variant]("NoProp-paper", (3, 32, 32), 100).eval()
        assert model.classify(images, generator, steps=2).shape == (2,)
    with pytest.raises(ValueError, match="allowed: NoProp-paper, NoProp-tiny"):
        dt_block("NoProp-huge", (3, 32, 32), 100)


def test_network_is_figure_6():
    """The paper's Figure 6: conv 32 (pool) / 64 / 128 (pool), FC 256 image features, the label's residual
    branch (DT), dense 256 / 128 after concatenation; no batch norm in the continuous-time network."""
    block = dt_block("NoProp-paper", (3, 32, 32), 100)
    convs = [m for m in block.image if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (3, 32, (3, 3)),
        (32, 64, (3, 3)),
        (64, 128, (3, 3)),
    ]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in block.image) == 2
    assert [m.p for m in block.image if isinstance(m, torch.nn.Dropout)] == [0.2] * 3
    image_fc = [m for m in block.image if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in image_fc] == [(128 * 8 * 8, 256)]
    dense = [(m.in_features, m.out_features) for m in block.fuse.modules() if isinstance(m, torch.nn.Linear)]
    assert dense == [(512, 256), (256, 128), (128, 100)]
    # the skip connection: the label features h reach the dense layers as h + branch(h), beside the 256 image
    # features (the input the first dense layer sees, caught by a hook)
    block.eval()
    z = torch.randn(4, 100)
    seen = []
    block.fuse.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        block(torch.randn(4, 3, 32, 32), z)
        h = block.label(z)
        branch = block.label_skip(h)
    assert seen[0].shape == (4, 512) and branch.abs().max() > 0
    torch.testing.assert_close(seen[0][:, 256:], h + branch)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in block.modules())
    for variant in ("ct", "fm"):
        model = npm.CONTINUOUS[variant]("NoProp-paper", (3, 32, 32), 100)
        assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in model.modules())
        assert model.net.time[0].in_features == 64  # pos emb (64)


def test_time_features_by_hand():
    # dim 4: frequencies 1 and 10000^(-1/2) = 0.01, angles 1000 t and 10 t
    t = torch.tensor([0.0, 0.001])
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [math.sin(1.0), math.sin(0.01), math.cos(1.0), math.cos(0.01)]])
    torch.testing.assert_close(npm.time_features(t, 4), expected)


def test_paper_loss_weights():
    """eta: 0.1 for NoProp-DT, 1 for NoProp-CT (the paper's hyperparameters); T = 10."""
    assert npm.ETA == 0.1 and npm.ETA_CT == 1.0
    assert npm.NoPropCT(SPEC, (1, 8, 8), 10).eta == 1.0
    assert npm.get_noprop("NoProp-paper").steps == 10
    assert npm.NOPROP_TRAIN["lr"] == 1e-3 and npm.NOPROP_TRAIN["weight_decay"] == 1e-3
    assert npm.NOPROP_TRAIN["batch_size"] == 128


# ----------------------------------------------------------------------------------- independence


def test_dt_block_job_builds_only_its_own_block(digits, monkeypatch, optimizer_params):
    train, _ = digits
    built = []
    real_init = NoPropNet.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(NoPropNet, "__init__", counting_init)
    seen = optimizer_params
    state = train_noprop_block(SPEC, train, 3, steps=2, batch_size=8)
    assert len(built) == 1  # one network: block 3's
    assert len(seen) == 1 and {id(p) for p in seen[0]} == {id(p) for p in built[0].parameters()}
    assert set(state) == set(built[0].state_dict())


def test_training_dt_block_t_leaves_every_other_part_untouched(digits, optimizer_params):
    train, _ = digits
    torch.manual_seed(0)
    blocks = [dt_block(SPEC, train.shape, 10) for _ in range(10)]
    head = dt_head(10)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in [*blocks, head]]
    seen = optimizer_params

    train_noprop_block(SPEC, train, 4, module=blocks[3], steps=3, batch_size=16)

    assert len(seen) == 1 and {id(p) for p in seen[0]} == {id(p) for p in blocks[3].parameters()}
    for i, module in enumerate([*blocks, head]):
        changed = [k for k, v in module.state_dict().items() if not torch.equal(before[i][k], v)]
        if i == 3:
            assert changed  # block 4 learned
        else:
            assert not changed and all(p.grad is None for p in module.parameters())


def test_parts_save_and_load_as_checkpoints(digits, tmp_path):
    train, test = digits
    blocks = [train_noprop_block(SPEC, train, t, steps=1, batch_size=8) for t in range(1, 11)]
    head = train_noprop_head(SPEC, train, steps=1, batch_size=8)
    paths = []
    for t, state in enumerate(blocks, 1):
        paths.append(tmp_path / f"block{t}.safetensors")
        save_state(paths[-1], state, {"method": "noprop-dt", "arch": SPEC, "block": t})
    save_state(tmp_path / "head.safetensors", head, {"method": "noprop-dt", "arch": SPEC, "part": "head"})
    loaded = [load_state(p) for p in paths]
    assert loaded[2][1]["block"] == 3
    model = noprop_dt(SPEC, train.shape, 10, [s for s, _ in loaded], load_state(tmp_path / "head.safetensors")[0])
    reference = noprop_dt(SPEC, train.shape, 10, blocks, head)
    few = test.images[:16]
    assert torch.equal(
        model.eval().classify(few, torch.Generator().manual_seed(0)),
        reference.eval().classify(few, torch.Generator().manual_seed(0)),
    )


# -------------------------------------------------------------------------------------- learning


def test_noprop_dt_learns_digits(digits):
    """10 blocks and the head, each its own job (150 steps of batch 64; the head 10 x 150). Measured with
    Figure 6's layout: 94.2 % test accuracy (98.1 % from the posterior means alone), chance 10 %."""
    train, test = digits
    blocks = [train_noprop_block(SPEC, train, t, steps=150, batch_size=64) for t in range(1, 11)]
    head = train_noprop_head(SPEC, train, steps=150, batch_size=64)
    model = noprop_dt(SPEC, train.shape, 10, blocks, head)
    assert evaluate_accuracy(model, test) > 0.8
    assert evaluate_accuracy(model, test, noise=False) > 0.85


@pytest.mark.parametrize("variant, steps, floor", [("ct", 900, 0.7), ("fm", 450, 0.8)])
def test_noprop_continuous_variants_learn_digits(digits, variant, steps, floor):
    """Batch 64; CT 900 steps (Figure 6's continuous-time network has no batch norm and learns slower: 58 % at
    450 steps), FM 450. Measured: CT 80.0 %, FM 84.7 %; chance 10 %."""
    train, test = digits
    state = train_noprop_continuous(variant, SPEC, train, steps=steps, batch_size=64)
    model = noprop_continuous(variant, SPEC, train.shape, 10, state)
    assert evaluate_accuracy(model, test) > floor


# ------------------------------------------------------------------------------------ as pipeline jobs


def test_the_params_vocabulary_names_the_registry():
    """Validating params never imports torch: config keeps NoProp's architecture names, equal to the registry."""
    from dblocks.config import NOPROP_ARCHS

    assert tuple(npm.NOPROP_ARCHITECTURES) == NOPROP_ARCHS


def test_pipeline_jobs_build_one_part_each_from_the_seed_and_part_alone():
    """dblocks.baselines.jobs: NoProp-DT's block t job builds block t (T = the experiment's blocks) with its term of
    the ELBO, the head job the head with T x the steps; a part's initial weights depend on the experiment's seed
    and the part only; parts outside 1..T are refused with the allowed ones."""
    from dblocks.baselines import jobs
    from dblocks.config import resolve
    from dblocks.errors import ConfigError
    from dblocks.experiment import Experiment

    exp = Experiment(resolve({"arch": SPEC, "blocks": 4, "train": {"steps": 7}}))
    block, objective, steps = jobs.training_job(exp, "noprop-dt", 2)
    assert isinstance(block, NoPropNet) and steps == 7
    again, _, _ = jobs.training_job(exp, "noprop-dt", 2)
    other, _, _ = jobs.training_job(exp, "noprop-dt", 3)
    first = next(iter(block.state_dict()))
    assert torch.equal(block.state_dict()[first], again.state_dict()[first])
    assert not torch.equal(block.state_dict()[first], other.state_dict()[first])
    head, _, head_steps = jobs.training_job(exp, "noprop-dt", "head")
    assert isinstance(head, torch.nn.Linear) and head_steps == 4 * 7
    batch = objective.draw(
        {"image": torch.zeros(3, 1, 8, 8), "label": torch.tensor([0, 1, 2])}, torch.Generator().manual_seed(0)
    )
    assert objective.loss(batch).ndim == 0
    assert jobs.parts("noprop-dt", 4) == [1, 2, 3, 4, "head"] and jobs.parts("noprop-fm", 4) == [None]
    with pytest.raises(ConfigError, match="allowed: --block 1..4 or --head"):
        jobs.training_job(exp, "noprop-dt", 5)
    with pytest.raises(ConfigError, match="allowed: neither --block nor --head"):
        jobs.training_job(exp, "noprop-ct", 1)
