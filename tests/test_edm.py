"""EDM pieces (docs/method.md §2): preconditioning, loss weight, losses, noise and the Euler step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dblocks import edm

SD = 0.5
SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 20.0, 80.0], dtype=torch.float64)


# ----------------------------------------------------------------------------- preconditioning


#: sigma -> (c_in, c_skip, c_out, c_noise) at sigma_data = 0.5, worked by hand at sigmas where
#: sqrt(sigma^2 + 0.25) is exact or simple:
#:   0.375: sqrt(0.140625 + 0.25) = 0.625 -> c_in = 1 / 0.625 = 1.6, c_skip = 0.25 / 0.390625 = 0.64,
#:          c_out = 0.375 * 0.5 / 0.625 = 0.3, c_noise = ln(0.375) / 4 = -0.98083 / 4 = -0.2452073
#:   0.5:   sqrt(0.5) = 0.7071068 -> c_in = 1.4142136, c_skip = 0.25 / 0.5 = 0.5, c_out = 0.25 / 0.7071068 = 0.3535534,
#:          c_noise = ln(0.5) / 4 = -0.6931472 / 4 = -0.1732868
#:   1.2:   sqrt(1.44 + 0.25) = 1.3 -> c_in = 1 / 1.3 = 0.7692308, c_skip = 0.25 / 1.69 = 0.1479290,
#:          c_out = 0.6 / 1.3 = 0.4615385, c_noise = ln(1.2) / 4 = 0.1823216 / 4 = 0.0455804
PRECOND_BY_HAND = {
    0.375: (1.6, 0.64, 0.3, math.log(0.375) / 4),
    0.5: (math.sqrt(2), 0.5, math.sqrt(2) / 4, math.log(0.5) / 4),
    1.2: (1 / 1.3, 0.25 / 1.69, 0.6 / 1.3, math.log(1.2) / 4),
}


def test_preconditioning_by_hand():
    sigmas = torch.tensor(list(PRECOND_BY_HAND), dtype=torch.float64)
    p = edm.preconditioning(sigmas, SD)
    for i, want in enumerate(PRECOND_BY_HAND.values()):
        got = (p.c_in[i].item(), p.c_skip[i].item(), p.c_out[i].item(), p.c_noise[i].item())
        assert got == pytest.approx(want, rel=1e-12), sigmas[i].item()
    # over the whole range: positive scales, a skip weight strictly between 0 and 1 (which, with the identities
    # below, leaves exactly one solution for c_skip and c_out)
    p = edm.preconditioning(SIGMAS, SD)
    assert (p.c_in > 0).all() and (p.c_out > 0).all()
    assert ((p.c_skip > 0) & (p.c_skip < 1)).all()


def test_preconditioning_identities():
    p = edm.preconditioning(SIGMAS, SD)
    # unit-variance network input: c_in * sqrt(sigma^2 + sd^2) = 1
    torch.testing.assert_close(p.c_in * torch.sqrt(SIGMAS**2 + SD**2), torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.exp(4 * p.c_noise), SIGMAS, rtol=1e-12, atol=0)  # c_noise = ln(sigma) / 4
    # EDM: the effective training target has unit variance, i.e. c_skip^2 sigma^2 + (1-c_skip)^2 sd^2 = c_out^2
    lhs = p.c_skip**2 * SIGMAS**2 + (1 - p.c_skip) ** 2 * SD**2
    torch.testing.assert_close(lhs, p.c_out**2, rtol=1e-12, atol=0)
    # and c_out^2 = sigma^2 sd^2 / (sigma^2 + sd^2) = c_skip * sigma^2
    torch.testing.assert_close(p.c_out**2, p.c_skip * SIGMAS**2, rtol=1e-12, atol=0)
    # loss weight = 1 / c_out^2
    torch.testing.assert_close(edm.loss_weight(SIGMAS, SD), 1 / p.c_out**2)


def test_preconditioning_limits():
    tiny = edm.preconditioning(torch.tensor([1e-6], dtype=torch.float64), SD)
    assert tiny.c_skip.item() == pytest.approx(1.0, abs=1e-10)
    assert tiny.c_out.item() == pytest.approx(0.0, abs=1e-5)
    huge = edm.preconditioning(torch.tensor([1e4], dtype=torch.float64), SD)
    assert huge.c_skip.item() == pytest.approx(0.0, abs=1e-8)
    assert huge.c_out.item() == pytest.approx(SD, rel=1e-6)
    # at sigma = sigma_data skip and output paths are balanced
    mid = edm.preconditioning(torch.tensor([SD], dtype=torch.float64), SD)
    assert mid.c_skip.item() == pytest.approx(0.5)
    assert mid.c_out.item() == pytest.approx(SD / math.sqrt(2))


def test_preconditioning_respects_sigma_data():
    p = edm.preconditioning(torch.tensor([1.0]), sigma_data=1.0)
    assert p.c_skip.item() == pytest.approx(0.5)
    assert p.c_in.item() == pytest.approx(1 / math.sqrt(2))


def test_skip_combine_limits_and_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    raw = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * 10
    # sigma -> 0: D -> z whatever F says
    d0 = edm.skip_combine(z, raw, torch.full((3,), 1e-8, dtype=torch.float64), SD)
    torch.testing.assert_close(d0, z, atol=1e-6, rtol=0)  # |c_out F| <= 1e-8 * |F|
    # sigma large: D -> sd * F (skip path vanishes)
    dl = edm.skip_combine(z, raw, torch.full((3,), 1e6, dtype=torch.float64), SD)
    torch.testing.assert_close(dl, SD * raw, atol=1e-5, rtol=1e-5)
    # per-example sigmas broadcast over the example's elements; c_skip, c_out from PRECOND_BY_HAND
    sig = torch.tensor(list(PRECOND_BY_HAND), dtype=torch.float64)
    d = edm.skip_combine(z, raw, sig, SD)
    for i, (_, c_skip, c_out, _) in enumerate(PRECOND_BY_HAND.values()):
        torch.testing.assert_close(d[i], c_skip * z[i] + c_out * raw[i])


def test_per_example_reshapes():
    like = torch.zeros(4, 3, 5, 5)
    s = torch.arange(4, dtype=torch.float64)
    out = edm.per_example(s, like)
    assert out.shape == (4, 1, 1, 1)
    assert out.dtype == like.dtype
    assert edm.per_example(s, torch.zeros(4, 7)).shape == (4, 1)


# ----------------------------------------------------------------------------- loss weight


def test_loss_weight_by_hand():
    w = edm.loss_weight(SIGMAS, SD)
    # (sigma^2 + 0.25) / (0.25 sigma^2) = 4 + 1 / sigma^2 at each of SIGMAS:
    #   0.002: 4 + 250000 | 0.01: 4 + 10000 | 0.1: 4 + 100 | 0.5: 4 + 4 | 1: 4 + 1 | 3: 4 + 1/9 | 20: 4 + 1/400
    #   80: 4 + 1/6400
    want = [250004.0, 10004.0, 104.0, 8.0, 5.0, 4.1111111, 4.0025, 4.00015625]
    assert w.tolist() == pytest.approx(want, rel=1e-7)
    assert edm.loss_weight(torch.tensor([1.0]), SD).item() == pytest.approx(1.25 / 0.25)
    # 1 / c_out^2 of PRECOND_BY_HAND: 1 / 0.09 = 11.111111 at 0.375, 1 / 0.2130178 = 4.6944444 at 1.2
    got = edm.loss_weight(torch.tensor([0.375, 1.2], dtype=torch.float64), SD)
    assert got.tolist() == pytest.approx([11.111111, 4.6944444], rel=1e-7)
    # decreasing in sigma
    assert (w[1:] < w[:-1]).all()


def test_loss_weight_span_over_range():
    w = edm.loss_weight(torch.tensor([0.002, 80.0], dtype=torch.float64), SD)
    assert w[0].item() == pytest.approx(250004.0, rel=1e-9)
    assert w[1].item() == pytest.approx(6400.25 / 1600.0, rel=1e-9)
    ratio = (w[0] / w[1]).item()
    assert 1e4 < ratio < 1e6  # "spans ~1e5"
    assert math.log10(ratio) == pytest.approx(4.8, abs=0.1)


def test_loss_weight_clamp():
    w = edm.loss_weight(SIGMAS, SD, max_weight=100.0)
    assert w.max().item() == 100.0
    raw = edm.loss_weight(SIGMAS, SD)
    torch.testing.assert_close(w, raw.clamp(max=100.0))
    # values under the clamp are untouched
    under = raw < 100.0
    assert under.any() and (~under).any()
    torch.testing.assert_close(w[under], raw[under])
    # None means no clamp
    torch.testing.assert_close(edm.loss_weight(SIGMAS, SD, max_weight=None), raw)


# ----------------------------------------------------------------------------- losses


def test_weighted_l2_hand_computed():
    denoised = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [3.0, 5.0]], [[1.0, 1.0], [1.0, 1.0]]])
    weight = torch.tensor([2.0, 10.0])
    # example 0: (0 + 4 + 0 + 1)/4 = 1.25 -> *2 = 2.5 ; example 1: (1+1+1+0)/4 = 0.75 -> *10 = 7.5
    got = edm.weighted_l2(denoised, target, weight)
    assert got.item() == pytest.approx((2.5 + 7.5) / 2)
    assert got.ndim == 0


def test_weighted_l2_gradient_flows():
    d = torch.zeros(2, 3, requires_grad=True)
    loss = edm.weighted_l2(d, torch.ones(2, 3), torch.tensor([1.0, 3.0]))
    loss.backward()
    # dL/dd = w_i * 2 (d - y) / (3 * 2)
    torch.testing.assert_close(d.grad, torch.tensor([[-1 / 3] * 3, [-1.0] * 3]))


def test_weighted_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]])
    labels = torch.tensor([1, 0])
    weight = torch.tensor([4.0, 0.5])
    ce0 = math.log(3.0)
    ce1 = -(2.0 - math.log(math.exp(2.0) + 1.0 + math.exp(-1.0)))
    got = edm.weighted_cross_entropy(logits, labels, weight)
    assert got.item() == pytest.approx((4.0 * ce0 + 0.5 * ce1) / 2, rel=1e-6)
    per = F.cross_entropy(logits, labels, reduction="none")
    assert got.item() == pytest.approx((weight * per).mean().item(), rel=1e-7)


# ----------------------------------------------------------------------------- add_noise


def test_add_noise_std_per_example_and_deterministic():
    n, d = 6, 20000
    y = torch.randn(n, d, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])
    z1 = edm.add_noise(y, sigma, generator=torch.Generator().manual_seed(11))
    z2 = edm.add_noise(y, sigma, generator=torch.Generator().manual_seed(11))
    z3 = edm.add_noise(y, sigma, generator=torch.Generator().manual_seed(12))
    assert z1.shape == y.shape and z1.dtype == y.dtype
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)
    noise = (z1 - y).double()
    std = noise.std(dim=1)
    mean = noise.mean(dim=1)
    for i in range(n):
        assert std[i].item() == pytest.approx(sigma[i].item(), rel=0.03)
        assert abs(mean[i].item()) < 0.05 * sigma[i].item()
    # eps = (z - y)/sigma is the same standard normal draw for every example scale
    eps = noise / sigma.double()[:, None]
    assert eps.std().item() == pytest.approx(1.0, rel=0.02)


def test_add_noise_image_shape_broadcast():
    y = torch.zeros(4, 1, 8, 8)
    sigma = torch.tensor([1.0, 2.0, 3.0, 4.0])
    z = edm.add_noise(y, sigma, generator=torch.Generator().manual_seed(0))
    eps = edm.add_noise(y, torch.ones(4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, eps * sigma[:, None, None, None])


# ----------------------------------------------------------------------------- Euler step


def test_euler_step_formula_and_sign():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3
    D = torch.randn(5, 7, generator=g, dtype=torch.float64)
    sigma, sigma_next = 2.0, 1.25
    got = edm.euler_step(z, D, sigma, sigma_next)
    # dz/dsigma = (z - D) / sigma; a step of -0.75 from sigma = 2 moves z toward D by 0.75 / 2 of the gap
    torch.testing.assert_close(got, z - (0.75 / 2.0) * (z - D))


@pytest.mark.parametrize("sigma, sigma_next", [(80.0, 40.0), (2.0, 1.9), (0.5, 0.1), (0.01, 0.002)])
def test_euler_step_moves_toward_denoised(sigma, sigma_next):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, generator=g, dtype=torch.float64) * sigma
    D = torch.randn(64, generator=g, dtype=torch.float64)
    z_next = edm.euler_step(z, D, sigma, sigma_next)
    before = (z - D).abs()
    after = (z_next - D).abs()
    assert (after < before).all()
    # the residual shrinks by exactly sigma_next / sigma (the VE ODE with a fixed D)
    torch.testing.assert_close(after, before * sigma_next / sigma)


def test_euler_step_to_zero_returns_denoised():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(100, generator=g, dtype=torch.float64) * 5
    D = torch.randn(100, generator=g, dtype=torch.float64)
    for sigma in (80.0, 1.0, 0.002):
        torch.testing.assert_close(edm.euler_step(z, D, sigma, 0.0), D, atol=1e-12, rtol=0)
    # float32: equal up to round-off relative to |z|
    z32, D32 = z.float() * 16, D.float()
    out = edm.euler_step(z32, D32, 80.0, 0.0)
    assert (out - D32).abs().max().item() <= 1e-6 * z32.abs().max().item()


def test_euler_step_exact_for_straight_line_ode():
    """If D is constant, the VE probability-flow ODE is linear in sigma: z(s) = D + (s/sigma) (z - D).
    Euler is exact for it, so many small steps and one big step agree."""
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(10, generator=g, dtype=torch.float64) * 80
    D = torch.randn(10, generator=g, dtype=torch.float64)
    grid = torch.linspace(80, 0.5, 30, dtype=torch.float64).tolist()
    z = z0
    for s, s_next in zip(grid[:-1], grid[1:]):
        z = edm.euler_step(z, D, s, s_next)
    torch.testing.assert_close(z, edm.euler_step(z0, D, 80.0, 0.5))
    torch.testing.assert_close(z, D + (0.5 / 80.0) * (z0 - D))
