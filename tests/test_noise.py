"""Noise distribution, partition of the noise range into blocks, overlap, sigma sampling, routing and
layer splits (docs/method.md §2 and §3)."""

from __future__ import annotations

import math

import pytest
import torch

from dblocks.masked_diffusion import MaskingPartition
from dblocks.noise import NoiseDistribution, Partition, layer_ranges, layer_split, partition_boundaries, uniform_draws

DIST = NoiseDistribution()
SMIN, SMAX = 0.002, 80.0


def _sig4(values) -> list[str]:
    return [f"{x:.4g}" for x in values]


def _cdf(sigma: float) -> float:
    """The spec's log-normal CDF, written from the textbook closed form with the spec's constants (ln sigma ~
    N(-1.2, 1.2^2)), independent of NoiseDistribution.cdf: Phi(x) = erfc(-x / sqrt 2) / 2."""
    return 0.5 * math.erfc(-(math.log(sigma) + 1.2) / (1.2 * math.sqrt(2.0)))


# ----------------------------------------------------------------------------- boundaries (docs/method.md §3 values)


@pytest.mark.parametrize(
    "blocks, kind, expected",
    [
        (2, "equiprobable", [0.002, 0.3012, 80]),
        (3, "equiprobable", [0.002, 0.1796, 0.5050, 80]),
        (4, "equiprobable", [0.002, 0.1341, 0.3012, 0.6766, 80]),
        (3, "uniform", [0.002, 0.0684, 2.339, 80]),
    ],
)
def test_boundaries_match_spec_check_values(blocks, kind, expected):
    p = Partition.make(blocks, kind)
    assert p.blocks == blocks
    assert len(p.boundaries) == blocks + 1
    assert _sig4(p.boundaries) == _sig4(expected)
    assert list(p.boundaries) == pytest.approx(expected, rel=5e-4)
    # endpoints are exact, not round-off copies
    assert p.boundaries[0] == SMIN and p.boundaries[-1] == SMAX


def test_defaults_match_spec():
    assert (DIST.p_mean, DIST.p_std, DIST.sigma_min, DIST.sigma_max) == (-1.2, 1.2, 0.002, 80.0)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 6, 8])
def test_equiprobable_intervals_hold_equal_truncated_mass(blocks):
    p = Partition.make(blocks)
    total = _cdf(SMAX) - _cdf(SMIN)
    masses = [(_cdf(p.boundaries[i + 1]) - _cdf(p.boundaries[i])) / total for i in range(blocks)]
    assert masses == pytest.approx([1.0 / blocks] * blocks, abs=1e-12)
    # and via the public interval() of each block
    for b in range(1, blocks + 1):
        lo, hi = p.interval(b)
        assert (_cdf(hi) - _cdf(lo)) / total == pytest.approx(1.0 / blocks, abs=1e-12)


@pytest.mark.parametrize("blocks", [2, 3, 5])
def test_uniform_intervals_have_equal_log_width(blocks):
    p = Partition.make(blocks, "uniform")
    widths = [math.log(p.boundaries[i + 1]) - math.log(p.boundaries[i]) for i in range(blocks)]
    assert widths == pytest.approx([math.log(SMAX / SMIN) / blocks] * blocks, rel=1e-12)


@pytest.mark.parametrize("kind", ["equiprobable", "uniform"])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7, 12])
def test_boundaries_strictly_ascending(kind, blocks):
    b = Partition.make(blocks, kind).boundaries
    assert all(b[i] < b[i + 1] for i in range(len(b) - 1))


@pytest.mark.parametrize("kind", ["equiprobable", "uniform"])
def test_single_block_is_whole_range(kind):
    p = Partition.make(1, kind)
    assert p.boundaries == (SMIN, SMAX)
    assert p.interval(1) == (SMIN, SMAX)
    assert p.train_interval(1) == (SMIN, SMAX)


def test_invalid_block_count_and_kind_raise():
    for blocks in (0, -1):
        with pytest.raises(ValueError, match="blocks"):
            Partition.make(blocks)
        with pytest.raises(ValueError, match="blocks"):
            partition_boundaries(DIST, blocks)
    with pytest.raises(ValueError, match="kind"):
        Partition.make(3, "linear")
    with pytest.raises(ValueError, match="kind"):
        partition_boundaries(DIST, 3, "quantile")


def test_invalid_noise_distribution_raises():
    with pytest.raises(ValueError):
        NoiseDistribution(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        NoiseDistribution(sigma_min=0.0)
    with pytest.raises(ValueError):
        NoiseDistribution(p_std=0.0)


def test_custom_distribution_changes_partition():
    d = NoiseDistribution(p_mean=0.0, p_std=1.0, sigma_min=0.1, sigma_max=10.0)
    p = Partition.make(2, dist=d)
    # symmetric log-normal around ln(1) on a range symmetric in log: the median is sigma = 1
    assert p.boundaries == pytest.approx((0.1, 1.0, 10.0), rel=1e-9)


# ----------------------------------------------------------------------------- block numbering


@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_block_one_is_highest_noise(blocks):
    p = Partition.make(blocks)
    assert p.interval(1)[1] == SMAX
    assert p.interval(blocks)[0] == SMIN
    # consecutive blocks tile the range from the top down
    for b in range(1, blocks):
        assert p.interval(b)[0] == p.interval(b + 1)[1]
    for b in range(1, blocks + 1):
        lo, hi = p.interval(b)
        assert (lo, hi) == (p.boundaries[blocks - b], p.boundaries[blocks - b + 1])


def test_interval_rejects_bad_block_index():
    p = Partition.make(3)
    for b in (0, 4, -1):
        with pytest.raises(ValueError, match="block"):
            p.interval(b)
        with pytest.raises(ValueError, match="block"):
            p.train_interval(b)


# ----------------------------------------------------------------------------- overlap


#: B = 3 equiprobable train intervals (blocks 1, 2, 3) by overlap gamma, worked from the boundaries
#: 0.002 < 0.1796325 < 0.5050415 < 80 (test_boundaries_match_spec_check_values) with a = (hi / lo)^gamma:
#:   gamma 0.05, block 2: 0.5050415 / 0.1796325 = 2.811526, ln = 1.033728, * 0.05 = 0.0516864, a = e^that = 1.053045;
#:     lo / a = 0.1796325 / 1.053045 = 0.1705838, hi * a = 0.5050415 * 1.053045 = 0.5318316
#:   gamma 0.05, block 1: a = (80 / 0.5050415)^0.05 = 158.403^0.05 = e^(5.06514 * 0.05) = 1.288214, lo / a = 0.3920477
#:   gamma 0.05, block 3: a = (0.1796325 / 0.002)^0.05 = 89.8162^0.05 = e^(4.49776 * 0.05) = 1.252183, hi * a = 0.2249327
#:   gamma 0.1 and 0.3 alike: a^2 and a^6 of the gamma 0.05 factors (e.g. block 2: 1.053045^2 = 1.108904)
#: the outer ends (80 for block 1, 0.002 for block 3) are clipped to the range
OVERLAP_B3 = {
    0.05: [(0.3920477, 80.0), (0.1705838, 0.5318316), (0.002, 0.2249327)],
    0.1: [(0.3043342, 80.0), (0.1619909, 0.5600428), (0.002, 0.2816569)],
    0.3: [(0.1105091, 80.0), (0.1317353, 0.6886677), (0.002, 0.6924546)],
}


@pytest.mark.parametrize("gamma", sorted(OVERLAP_B3))
def test_overlap_train_intervals_by_hand(gamma):
    p = Partition.make(3, overlap=gamma)
    for b, want in enumerate(OVERLAP_B3[gamma], start=1):
        assert p.train_interval(b) == pytest.approx(want, rel=1e-6), b
    assert p.train_interval(1)[1] == SMAX and p.train_interval(3)[0] == SMIN  # exactly, not round-off copies


@pytest.mark.parametrize("kind", ["equiprobable", "uniform"])
@pytest.mark.parametrize("gamma", [0.05, 0.1, 0.3])
def test_overlap_widens_each_inner_edge_by_gamma_of_the_log_width(kind, gamma):
    """Properties of the widening, whatever the partition: the train interval contains the raw one, the outer
    ends stay at the range's ends, and each inner edge moves out by gamma times the block's log width, so the
    log width grows by a factor 1 + gamma per widened edge (1 + 2 gamma for a middle block)."""
    blocks = 3
    p = Partition.make(blocks, kind, overlap=gamma)
    for b in range(1, blocks + 1):
        lo, hi = p.interval(b)
        t_lo, t_hi = p.train_interval(b)
        assert t_lo <= lo and t_hi >= hi
        width = math.log(hi) - math.log(lo)
        moved_down, moved_up = math.log(lo) - math.log(t_lo), math.log(t_hi) - math.log(hi)
        assert moved_up == (0.0 if b == 1 else pytest.approx(gamma * width, rel=1e-9))
        assert moved_down == (0.0 if b == blocks else pytest.approx(gamma * width, rel=1e-9))
        inner_edges = (b > 1) + (b < blocks)
        assert math.log(t_hi / t_lo) == pytest.approx((1 + inner_edges * gamma) * width, rel=1e-9)
    assert p.train_interval(1)[1] == SMAX
    assert p.train_interval(blocks)[0] == SMIN
    # interior edges really widen
    assert p.train_interval(1)[0] < p.interval(1)[0]
    assert p.train_interval(blocks)[1] > p.interval(blocks)[1]
    assert p.train_interval(2)[0] < p.interval(2)[0] < p.interval(2)[1] < p.train_interval(2)[1]


def test_overlap_block2_by_hand():
    p = Partition.make(3, overlap=0.05)
    lo, hi = p.interval(2)
    assert _sig4([lo, hi]) == ["0.1796", "0.505"]
    # OVERLAP_B3's arithmetic: a = 2.811526^0.05 = 1.053045
    assert p.train_interval(2) == pytest.approx((0.1796325 / 1.053045, 0.5050415 * 1.053045), rel=2e-6)


def test_zero_overlap_gives_raw_interval():
    p = Partition.make(4, overlap=0.0)
    for b in range(1, 5):
        assert p.train_interval(b) == p.interval(b)


@pytest.mark.parametrize("gamma", [-0.01, 0.5, 0.7, 1.0])
def test_overlap_out_of_range_raises(gamma):
    with pytest.raises(ValueError, match="overlap"):
        Partition.make(3, overlap=gamma)


# ----------------------------------------------------------------------------- sigma sampling


@pytest.mark.parametrize("overlap", [0.0, 0.05])
def test_sample_sigma_inside_train_interval(overlap):
    p = Partition.make(3, overlap=overlap)
    g = torch.Generator().manual_seed(0)
    for b in range(1, 4):
        s = p.sample_sigma(b, 5000, generator=g)
        assert s.shape == (5000,)
        assert s.dtype == torch.float32
        lo, hi = p.train_interval(b)
        # float32 cast: allow a relative hair of rounding at the edges
        assert s.min().item() >= lo * (1 - 1e-6)
        assert s.max().item() <= hi * (1 + 1e-6)
        assert torch.isfinite(s).all()


def test_sample_sigma_deterministic_with_seeded_generator():
    p = Partition.make(3, overlap=0.05)
    a = p.sample_sigma(2, 1000, generator=torch.Generator().manual_seed(123))
    b = p.sample_sigma(2, 1000, generator=torch.Generator().manual_seed(123))
    c = p.sample_sigma(2, 1000, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _ks_uniform(u: torch.Tensor) -> float:
    u, _ = torch.sort(u.double())
    n = u.numel()
    grid_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    grid_lo = torch.arange(0, n, dtype=torch.float64) / n
    return max((grid_hi - u).abs().max().item(), (u - grid_lo).abs().max().item())


@pytest.mark.parametrize("block, overlap", [(1, 0.0), (2, 0.05), (3, 0.0), (None, 0.0)])
def test_sample_sigma_matches_truncated_lognormal(block, overlap):
    p = Partition.make(3, overlap=overlap)
    g = torch.Generator().manual_seed(7)
    n = 20000
    if block is None:
        lo, hi = SMIN, SMAX
        s = DIST.sample(n, generator=g)
    else:
        lo, hi = p.train_interval(block)
        s = p.sample_sigma(block, n, generator=g)
    q_lo, q_hi = _cdf(lo), _cdf(hi)
    u = torch.tensor([(_cdf(float(x)) - q_lo) / (q_hi - q_lo) for x in s.tolist()])
    assert _ks_uniform(u) < 0.02
    # and the untruncated mean check of log sigma for the full range: truncated normal mean
    if block is None:
        a, b = (math.log(lo) + 1.2) / 1.2, (math.log(hi) + 1.2) / 1.2
        pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        mass = _cdf(hi) - _cdf(lo)
        want = -1.2 + 1.2 * (pdf(a) - pdf(b)) / mass
        assert s.log().mean().item() == pytest.approx(want, abs=0.03)


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 6])
def test_route_boundaries_low_high_ownership(blocks):
    p = Partition.make(blocks)
    assert p.route(SMAX) == 1
    assert p.route(SMIN) == blocks
    for b in range(1, blocks + 1):
        lo, hi = p.interval(b)
        # the upper end belongs to the block, the lower end to the block below
        assert p.route(hi) == b
        mid = math.sqrt(lo * hi)
        assert p.route(mid) == b
        if b < blocks:
            assert p.route(lo) == b + 1
    for i in range(1, blocks):  # interior boundaries (ascending index i)
        owner = blocks - i + 1
        assert p.interval(owner)[1] == p.boundaries[i]
        assert p.route(p.boundaries[i]) == owner


def test_route_returns_python_int_for_scalar():
    p = Partition.make(3)
    r = p.route(1.0)
    assert isinstance(r, int) and r == 1
    assert isinstance(p.route(torch.tensor(0.01, dtype=torch.float64)), int)


def test_route_tensor_elementwise():
    p = Partition.make(3)
    b = p.boundaries
    sig = torch.tensor([80.0, 10.0, b[2], 0.3, b[1], 0.01, 0.002], dtype=torch.float64)
    got = p.route(sig)
    assert isinstance(got, torch.Tensor)
    assert got.shape == sig.shape
    assert got.tolist() == [1, 1, 2, 2, 3, 3, 3]
    # 2-D tensors keep their shape
    grid = sig.reshape(1, -1).repeat(2, 1)
    assert p.route(grid).tolist() == [[1, 1, 2, 2, 3, 3, 3]] * 2
    # float32 interior values route the same way
    inner = torch.tensor([50.0, 0.3, 0.01], dtype=torch.float32)
    assert p.route(inner).tolist() == [1, 2, 3]


@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_samples_without_overlap_route_to_their_block(blocks):
    p = Partition.make(blocks, overlap=0.0)
    g = torch.Generator().manual_seed(3)
    for b in range(1, blocks + 1):
        s = p.sample_sigma(b, 4000, generator=g)
        lo, hi = p.interval(b)
        # exclude the measure-zero float32 ties with the shared lower boundary
        keep = s.double() > lo if b < blocks else torch.ones_like(s, dtype=torch.bool)
        assert keep.float().mean() > 0.99
        owners = p.route(s.double()[keep])
        assert (owners == b).all(), f"block {b}: {torch.unique(owners).tolist()}"


def test_samples_with_overlap_spill_into_neighbours():
    p = Partition.make(3, overlap=0.1)
    s = p.sample_sigma(2, 5000, generator=torch.Generator().manual_seed(0))
    owners = set(p.route(s.double()).tolist())
    assert owners == {1, 2, 3}


# ----------------------------------------------------------------------------- quantile grid


@pytest.mark.parametrize("steps", [1, 3, 12, 50])
def test_quantile_grid(steps):
    grid = DIST.quantile_grid(steps)
    assert len(grid) == steps + 1
    assert grid[0] == SMAX and grid[-1] == SMIN
    assert all(grid[i] > grid[i + 1] for i in range(steps))
    q = [_cdf(x) for x in grid]
    span = _cdf(SMAX) - _cdf(SMIN)
    gaps = [(q[i] - q[i + 1]) / span for i in range(steps)]
    assert gaps == pytest.approx([1.0 / steps] * steps, abs=1e-12)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 6, 8, 9, 10, 11, 12])
def test_quantile_grid_of_b_steps_is_the_partition(blocks):
    # exactly, bit for bit: a grid point a hair above a boundary would be routed to the wrong block
    assert DIST.quantile_grid(blocks) == list(reversed(Partition.make(blocks).boundaries))


@pytest.mark.parametrize("blocks", [2, 3, 4, 6, 8, 9, 10, 11, 12])
@pytest.mark.parametrize("per_block", [1, 3, 10])
def test_sampling_grid_runs_every_block_equally_often(blocks, per_block):
    p = Partition.make(blocks)
    owners = [p.route(s) for s in DIST.quantile_grid(blocks * per_block)[:-1]]
    assert [owners.count(b) for b in range(1, blocks + 1)] == [per_block] * blocks


def test_quantile_grid_rejects_zero_steps():
    with pytest.raises(ValueError):
        DIST.quantile_grid(0)


def test_quantile_grid_steps_per_block_b3():
    p = Partition.make(3)
    grid = DIST.quantile_grid(12)
    owners = [p.route(s) for s in grid[:-1]]
    assert owners == [1] * 4 + [2] * 4 + [3] * 4


# ----------------------------------------------------------------------------- layer split


def test_layer_split_default_equal():
    assert layer_split(12, 3) == [4, 4, 4]
    assert layer_split(12, 4) == [3, 3, 3, 3]
    assert layer_split(12, 1) == [12]
    assert layer_split(3, 3) == [1, 1, 1]
    uneven = layer_split(7, 3)
    assert sum(uneven) == 7 and len(uneven) == 3 and max(uneven) - min(uneven) <= 1


@pytest.mark.parametrize("split", [[3, 6, 3], [6, 4, 2], [2, 4, 6], (4, 4, 4)])
def test_layer_split_custom_accepted(split):
    assert layer_split(12, 3, split) == list(split)


@pytest.mark.parametrize(
    "num_layers, blocks, split, needle",
    [
        (12, 3, [4, 4, 3], "sum"),
        (12, 3, [4, 4, 5], "sum"),
        (12, 3, [6, 6], "entries"),
        (12, 3, [3, 3, 3, 3], "entries"),
        (12, 3, [6, 6, 0], "at least one layer"),
        (12, 3, [7, 6, -1], "at least one layer"),
        (2, 3, None, "exceed"),
        (12, 0, None, "blocks"),
    ],
)
def test_layer_split_errors(num_layers, blocks, split, needle):
    with pytest.raises(ValueError, match=needle):
        layer_split(num_layers, blocks, split)


def test_layer_ranges_contiguous():
    ranges = layer_ranges([3, 6, 3])
    assert [list(r) for r in ranges] == [[0, 1, 2], [3, 4, 5, 6, 7, 8], [9, 10, 11]]
    flat = [i for r in layer_ranges([4, 4, 4]) for i in r]
    assert flat == list(range(12))
    assert [len(r) for r in layer_ranges([1, 3, 2])] == [1, 3, 2]


def test_partition_to_dict():
    p = Partition.make(3, overlap=0.05)
    d = p.to_dict()
    assert d["blocks"] == 3 and d["kind"] == "equiprobable" and d["overlap"] == 0.05
    assert d["boundaries"] == list(p.boundaries)
    assert d["train_intervals"] == [list(p.train_interval(b)) for b in (1, 2, 3)]


# ----------------------------------------------------------------------- stratified times (train.time_sampling)


def test_stratified_draws_put_one_draw_in_each_stratum_and_iid_draws_are_torch_s():
    n = 16
    u = uniform_draws(n, torch.Generator().manual_seed(3), stratified=True)
    assert sorted(int(x * n) for x in u) == list(range(n))  # exactly one in each [i/n, (i+1)/n)
    # the common shift is uniform: over many batches the draws' mean is 1/2 and each stratum's draw uniform in it
    gen = torch.Generator().manual_seed(4)
    many = torch.stack([uniform_draws(4, gen, stratified=True) for _ in range(4000)])
    assert abs(many.mean().item() - 0.5) < 0.01
    assert abs((many * 4 % 1).mean().item() - 0.5) < 0.02
    # iid: what the samplers drew before the option existed, bit for bit
    assert torch.equal(
        uniform_draws(n, torch.Generator().manual_seed(3)),
        torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
    )


@pytest.mark.parametrize("partition", [Partition.make(3, "equiprobable", 0.1), MaskingPartition.make(3, overlap=0.05)])
def test_stratified_noise_levels_stay_in_the_block_s_interval_and_cover_it(partition):
    lo, hi = partition.train_interval(2)
    sigma = partition.sample_sigma(2, 64, torch.Generator().manual_seed(0), stratified=True).tolist()
    assert lo <= min(sigma) and max(sigma) <= hi
    # even coverage: one draw per stratum of the interval's probability mass (log-normal sigma; uniform t)
    if isinstance(partition, MaskingPartition):
        mass = [(s - lo) / (hi - lo) for s in sigma]
    else:
        mass = [(_cdf(s) - _cdf(lo)) / (_cdf(hi) - _cdf(lo)) for s in sigma]
    assert sorted(int(min(m, 1 - 1e-9) * 64) for m in mass) == list(range(64))
