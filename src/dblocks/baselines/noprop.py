"""NoProp (Li, Teh & Pascanu 2025, "NoProp: Training Neural Networks without Back-propagation or
Forward-propagation", arXiv 2503.24322), the baseline of the paper's Table 6, in its three variants.

The paper's model (section 2), in its notation: a class embedding u_y; latents z_0, ..., z_T where
z_0 ~ p(z_0) = N(0, I) is pure noise and z_T lies near u_y; the noising chain fixes each latent's marginal,
``q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I)`` with abar_t increasing in t (abar_0 = 0 here: z_0 is
the prior). A network u_hat_t(z_{t-1}, x) predicts u_y from the image x and the previous latent, and the
generative step copies the noising chain's posterior with u_y replaced by the prediction::

    p(z_t | z_{t-1}, x) = N(a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1}, c_t I)

(:func:`posterior_coefficients` gives a_t, b_t, c_t). Inference draws z_0 ~ N(0, I), runs the T steps in
sequence and classifies z_T with a linear-softmax head p_hat(y | z_T). The ELBO (eq. 8) reads::

    L = E_q(z_T|y)[-log p_hat(y | z_T)] + KL(q(z_0 | y) || p(z_0))
        + (T / 2) eta E_{t ~ U{1..T}}[(SNR(t) - SNR(t-1)) ||u_hat_t(z_{t-1}, x) - u_y||^2]

with SNR(t) = abar_t / (1 - abar_t); the factor 1/2 is the Gaussian KL's (a_t^2 / c_t = SNR(t) - SNR(t-1)),
and eta = 1 is the exact bound (the paper: eta = 0.1 for DT, 1 for CT). Each network's term involves z_{t-1}
drawn from q alone, never another network's output: that is what makes the T networks trainable independently.

* **NoProp-DT** (discrete time): T independent networks, one per step. Block t's job trains u_hat_t on its own
  term of the sum, ``(T eta / 2)(SNR(t) - SNR(t-1)) ||u_hat_t - u_y||^2`` (as the paper's Algorithm 1 writes
  a block's loss), and builds, loads and updates nothing else.
* **NoProp-CT** (continuous time, section 2.3): one network u_hat(z_t, x, t) for t in [0, 1], a learnable noise
  schedule (:class:`LearnedSNR`) and the continuous limit of the sum, ``(eta / 2) SNR'(t) ||u_hat - u_y||^2``
  with t ~ U[0, 1], plus the head's cross-entropy and the prior KL, all trained together (one job, as the
  paper: the schedule, network and head share the loss).
* **NoProp-FM** (flow matching, section 2.3): z_t = t u_y + (1 - t) z_0, the network predicts the velocity
  v_hat(z_t, x, t) with loss ||v_hat - (u_y - z_0)||^2, inference is Euler from z_0 ~ N(0, I) to z_1 and the
  class is the embedding nearest z_1.

The class embedding and the head: the paper learns W_Embed and the head jointly with every block (its
Algorithm 1 updates theta_t, theta_out and W_Embed at each step of block t). Shared, jointly updated pieces
would be state passed between block jobs, so here the embedding is the paper's fixed one-hot option
(u_y = e_y, dimension = number of classes, unit norm like DiffusionBlocks' label embeddings). With it fixed,
the ELBO splits into terms with disjoint parameters: block t's term involves theta_t only, the cross-entropy
involves the head only (z_T ~ q(z_T | y) needs no block), and the prior KL none (abar_0 = 0 makes it 0). So
DT is T + 1 independent jobs: one per block and one for the head (:func:`train_noprop_head`). CT and FM
keep the same fixed embedding; CT's head is trained with its network (one job anyway).

Architecture (the paper's Figure 6, see :class:`NoPropNet` and docs/noprop.md): the image through conv 3x3
stages 32 (max-pool) / 64 / 128 (max-pool) with ReLU and dropout 0.2, then FC 256; the noisy embedding through
FC 256 with a residual branch (DT); CT and FM add a 64-dimensional positional time embedding and, as Figure 6's
caption says, no batch norm; the concatenation through FC 256, FC 128 and a last FC to logits. DT and CT
predict u_hat = softmax(logits) @ W_Embed, the posterior mean of a discrete label; FM's last layer returns
the velocity itself (a velocity u_y - z_0 is no mixture of embeddings). Sizes: :data:`NOPROP_ARCHITECTURES`.

Noise schedule (DT): a cosine schedule (Nichol & Dhariwal 2021, s = 0.008) laid over T + 1 intervals,
``abar_t = f((T + 1 - t) / (T + 1)) / f(0)`` with f(tau) = cos^2(pi/2 (tau + s)/(1 + s)): abar_0 = 0 (z_0 is
the prior) and abar_T < 1 (SNR(T), which weights block T's loss, stays finite); the interval that would end
at abar = 1 is the clean label itself, which no block needs. The paper names the cosine schedule without
giving its end points; these are our choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dblocks.baselines import seeded, state_of, train_config
from dblocks.train import Objective, train

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NoPropSpec:
    """Sizes of a NoProp network (the paper's Figure 6). ``channels``: the image embedding's 3x3 conv stages;
    ``pool``: which of them end in a 2x2 max-pool (Figure 6: the first and the last); ``width``: the image
    and label features (FC 256 in the paper); ``fuse``: the dense layers after concatenation (256, 128);
    ``time_dim``: CT's / FM's sinusoidal time embedding (Figure 6: pos emb 64); ``steps``: T, the DT blocks and
    the CT / FM inference steps (the paper: T = 10 for DT)."""

    channels: tuple[int, ...]
    width: int
    fuse: tuple[int, ...]
    dropout: float
    pool: tuple[bool, ...] = (True, False, True)
    time_dim: int = 64
    steps: int = 10


NOPROP_ARCHITECTURES: dict[str, NoPropSpec] = {
    # CIFAR (3x32x32), Figure 6: conv 32 (pool) / 64 / 128 (pool) down to 8x8, dropout 0.2, FC 256 features,
    # dense 256 and 128 after concatenation, a 64-dimensional time embedding (CT, FM)
    "NoProp-paper": NoPropSpec(channels=(32, 64, 128), width=256, fuse=(256, 128), dropout=0.2),
    # the 8x8 digits: the same stages (8x8 down to 2x2) and T, a quarter of the widths, no dropout (a few
    # hundred steps per block do not overfit 1437 digits)
    "NoProp-tiny": NoPropSpec(channels=(8, 16, 32), width=64, fuse=(64, 32), dropout=0.0, time_dim=16),
}

#: the paper's optimizer for NoProp-DT (AdamW, lr 1e-3, weight decay 1e-3, batch 128, no schedule named); no
#: gradient clipping, which the paper does not use. (CT and FM: the paper's Adam with the same lr and decay;
#: the project's one training loop has AdamW only, see docs/noprop.md.)
NOPROP_TRAIN = {
    "lr": 1e-3,
    "weight_decay": 1e-3,
    "batch_size": 128,
    "warmup": 0,
    "schedule": "constant",
    "grad_clip": None,
}

#: the paper's loss weight eta on the denoising terms: 0.1 for NoProp-DT, 1 for NoProp-CT (FM has none)
ETA = 0.1
ETA_CT = 1.0


def get_noprop(spec: str | NoPropSpec) -> NoPropSpec:
    if isinstance(spec, NoPropSpec):
        return spec
    try:
        return NOPROP_ARCHITECTURES[spec]
    except KeyError:
        raise ValueError(f"unknown NoProp architecture {spec!r}; allowed: {', '.join(NOPROP_ARCHITECTURES)}") from None


# ------------------------------------------------------------------------------------ schedules, losses


def class_embeddings(num_classes: int) -> torch.Tensor:
    """W_Embed, fixed: the one-hot embedding (row y is u_y = e_y)."""
    return torch.eye(num_classes)


def cosine_alpha_bar(steps: int, s: float = 0.008) -> torch.Tensor:
    """abar_0..abar_T (float64) of NoProp-DT's schedule (see the module docstring): 0 at t = 0, increasing,
    below 1 at t = T."""
    tau = (steps + 1 - torch.arange(steps + 1, dtype=torch.float64)) / (steps + 1)
    f = torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / math.cos(s / (1 + s) * math.pi / 2) ** 2
    abar[0] = 0.0  # cos(pi/2) is 6e-17 in floating point, not 0: z_0 is the prior exactly
    return abar


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR = abar / (1 - abar) (section 2.1)."""
    return alpha_bar / (1 - alpha_bar)


def posterior_coefficients(alpha_bar_prev: torch.Tensor, alpha_bar: torch.Tensor):
    """(a_t, b_t, c_t) of the posterior q(z_t | z_{t-1}, y) = N(a_t u_y + b_t z_{t-1}, c_t I) (section 2.1),
    from abar_{t-1} and abar_t. With alpha_{t-1} = abar_{t-1} / abar_t, the noising step
    q(z_{t-1} | z_t) = N(sqrt(alpha_{t-1}) z_t, (1 - alpha_{t-1}) I) gives::

        a_t = sqrt(abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})
        b_t = sqrt(alpha_{t-1}) (1 - abar_t) / (1 - abar_{t-1})
        c_t = (1 - abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})

    (DDPM's posterior with the time index reversed). DT uses it at its T steps, CT on its inference grid."""
    alpha_prev = alpha_bar_prev / alpha_bar
    a = alpha_bar.sqrt() * (1 - alpha_prev) / (1 - alpha_bar_prev)
    b = alpha_prev.sqrt() * (1 - alpha_bar) / (1 - alpha_bar_prev)
    c = (1 - alpha_bar) * (1 - alpha_prev) / (1 - alpha_bar_prev)
    return a, b, c


def noisy_embedding(u: torch.Tensor, alpha_bar: torch.Tensor | float, noise: torch.Tensor) -> torch.Tensor:
    """A draw of z_t ~ q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I) from standard normal ``noise``."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=u.dtype, device=u.device)
    return alpha_bar.sqrt() * u + (1 - alpha_bar).sqrt() * noise


def prior_kl(u: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Per row, KL(q(z_0 | y) || N(0, I)) = (abar ||u||^2 + d (1 - abar) - d - d log(1 - abar)) / 2, the ELBO's
    prior term (eq. 8). 0 for DT, whose abar_0 is 0; it trains CT's noise-end of the schedule."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=u.dtype, device=u.device)
    d = u.shape[-1]
    return 0.5 * (alpha_bar * u.pow(2).sum(-1) - d * alpha_bar - d * torch.log1p(-alpha_bar))


def denoising_loss(u_hat: torch.Tensor, u: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """The batch mean of weight * ||u_hat - u||^2 (``weight`` a number or one per row): eq. 8's denoising
    term, and its continuous-time twin."""
    return (weight * (u_hat - u).pow(2).sum(-1)).mean()


def dt_block_weight(alpha_bar: torch.Tensor, t: int, eta: float = ETA) -> float:
    """Block t's weight in NoProp-DT's loss, (T eta / 2)(SNR(t) - SNR(t-1)), T = len(alpha_bar) - 1."""
    steps = len(alpha_bar) - 1
    if not 1 <= t <= steps:
        raise ValueError(f"block {t} out of range; allowed: 1..{steps}")
    ratio = snr(alpha_bar)
    return float(steps * eta / 2 * (ratio[t] - ratio[t - 1]))


class LearnedSNR(nn.Module):
    """NoProp-CT's learnable noise schedule (section 2.3), the variational diffusion model's parameterisation
    (Kingma et al. 2021, sections 3-4 and Appendix H): ``abar(t) = sigmoid(-gamma(t))``, i.e.
    ``SNR(t) = exp(-gamma(t))``, with::

        gamma(t) = gamma_noise + (gamma_clean - gamma_noise) * gbar(t),
        gbar(t) = (g(t) - g(0)) / (g(1) - g(0)),  g(t) = l1(t) + l3(sigmoid(l2(l1(t))))

    where l1, l2, l3 are linear maps with positive weights (softplus of free parameters), so g, gbar are
    increasing, gbar runs 0 -> 1 and gamma falls from the learned end point gamma_noise at t = 0 (z_0, noise)
    to the learned gamma_clean at t = 1 (z_1, near the label): the SNR rises with t, as NoProp's time does.
    The initial end points are those of DT's default schedule's extremes, abar(0) ~ 5e-5, abar(1) ~ 0.98."""

    def __init__(self, gamma_noise: float = 10.0, gamma_clean: float = -4.0, hidden: int = 1024) -> None:
        super().__init__()
        self.gamma_noise = nn.Parameter(torch.tensor(float(gamma_noise)))
        self.gamma_clean = nn.Parameter(torch.tensor(float(gamma_clean)))
        self.l1, self.l2, self.l3 = nn.Linear(1, 1), nn.Linear(1, hidden), nn.Linear(hidden, 1)

    @staticmethod
    def _positive(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.softplus(layer.weight), layer.bias)

    def _g(self, t: torch.Tensor) -> torch.Tensor:
        h = self._positive(self.l1, t.reshape(-1, 1))
        return (h + self._positive(self.l3, torch.sigmoid(self._positive(self.l2, h)))).reshape(t.shape)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        ends = self._g(torch.tensor([0.0, 1.0], device=t.device))
        unit = (self._g(t) - ends[0]) / (ends[1] - ends[0])
        return self.gamma_noise + (self.gamma_clean - self.gamma_noise) * unit

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self.gamma(t))

    def snr_derivative(self, t: torch.Tensor) -> torch.Tensor:
        """dSNR/dt = -gamma'(t) exp(-gamma(t)), with gamma' by autograd (kept in the graph, so the schedule
        learns through the loss weight)."""
        t = t.detach().requires_grad_(True)
        with torch.enable_grad():
            gamma = self.gamma(t)
            (slope,) = torch.autograd.grad(gamma.sum(), t, create_graph=True)
        return -slope * torch.exp(-gamma)


# --------------------------------------------------------------------------------------------- network


def _dense(inputs: int, outputs: int, batchnorm: bool = True, relu: bool = True) -> nn.Sequential:
    """FC, then batch norm (DT's network only: Figure 6 leaves it out of the continuous-time one), then ReLU."""
    layers: list[nn.Module] = [nn.Linear(inputs, outputs)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(outputs))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """CT's / FM's positional embedding of t in [0, 1] (Figure 6: pos emb): sin and cos of 1000 t at dim / 2
    geometric frequencies from 1 to 1 / 10000 (the transformer's; t scaled as a step index of 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class NoPropNet(nn.Module):
    """One NoProp network (Figure 6), mapped by dense layers to ``out_dim`` outputs (logits, or FM's velocity):

    * image: per stage conv 3x3, ReLU, (max-pool 2x2), dropout; flatten, FC ``width``, then batch norm (DT) or
      ReLU (CT, FM);
    * noisy label, DT: FC + BN + ReLU, then a residual branch (FC + BN + ReLU, FC + BN) added to it (the skip
      connection); CT, FM: FC + ReLU;
    * time (``timed``: CT, FM): positional embedding (``time_dim``), FC + ReLU;
    * the concatenation: ``fuse`` dense layers (FC + BN + ReLU; no BN in CT / FM), then FC to ``out_dim``.

    ``timed`` also drops every batch norm: "batch normalization is not included in the continuous-time model"
    (Figure 6's caption)."""

    def __init__(
        self, spec: NoPropSpec, image_shape: Sequence[int], label_dim: int, out_dim: int, timed: bool = False
    ) -> None:
        super().__init__()
        self.label_dim, self.time_dim = label_dim, spec.time_dim
        norm = not timed
        channels, height, width = image_shape
        if len(spec.pool) != len(spec.channels):
            raise ValueError(f"pool {spec.pool} needs one entry per conv stage {spec.channels}")
        stages: list[nn.Module] = []
        for size, pool in zip(spec.channels, spec.pool):
            stages += [nn.Conv2d(channels, size, 3, padding=1), nn.ReLU()]
            if pool:
                stages.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            stages.append(nn.Dropout(spec.dropout))
            channels = size
        if height < 1 or width < 1:
            raise ValueError(f"image {tuple(image_shape)} is too small for {sum(spec.pool)} pooling stages")
        features = nn.BatchNorm1d(spec.width) if norm else nn.ReLU()
        self.image = nn.Sequential(*stages, nn.Flatten(), nn.Linear(channels * height * width, spec.width), features)
        self.label = _dense(label_dim, spec.width, batchnorm=norm)
        # DT's skip connection: label features plus a two-layer residual branch of them
        self.label_skip = (
            nn.Sequential(_dense(spec.width, spec.width), _dense(spec.width, spec.width, relu=False)) if norm else None
        )
        self.time = _dense(spec.time_dim, spec.width, batchnorm=False) if timed else None
        fused = spec.width * (3 if timed else 2)
        layers: list[nn.Module] = []
        for size in spec.fuse:
            layers.append(_dense(fused, size, batchnorm=norm))
            fused = size
        self.fuse = nn.Sequential(*layers, nn.Linear(fused, out_dim))

    def forward(self, image: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        label = self.label(z)
        if self.label_skip is not None:
            label = label + self.label_skip(label)
        features = [self.image(image), label]
        if self.time is not None:
            features.append(self.time(time_features(t, self.time_dim)))
        return self.fuse(torch.cat(features, dim=-1))


def _embedding_prediction(logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """u_hat = softmax(logits) @ W_Embed: the network's class probabilities averaged over the embeddings."""
    return logits.softmax(dim=-1) @ embeddings.to(logits.dtype)


def _standard_normal(shape: Sequence[int], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    # drawn on the CPU from the job's generator, as every random input of the project's training steps
    return torch.randn(tuple(shape), generator=gen).to(device)


# ----------------------------------------------------------------------------------------- NoProp-DT


def dt_block(spec: str | NoPropSpec, image_shape: Sequence[int], num_classes: int) -> NoPropNet:
    """Block t's network u_hat_t (every block has the same architecture)."""
    return NoPropNet(get_noprop(spec), image_shape, num_classes, num_classes)


def dt_head(num_classes: int) -> nn.Linear:
    """p_hat(y | z_T): a linear layer whose softmax is the class distribution (section 2.1)."""
    return nn.Linear(num_classes, num_classes)


def dt_block_objective(net: NoPropNet, block: int, steps: int, eta: float = ETA) -> Objective:
    """Block ``block``'s term of NoProp-DT's loss (eq. 8, Algorithm 1): z_{t-1} ~ q(z_{t-1} | y), its
    prediction of u_y weighted by (T eta / 2)(SNR(t) - SNR(t-1))."""
    alpha_bar = cosine_alpha_bar(steps)
    weight = dt_block_weight(alpha_bar, block, eta)
    previous = float(alpha_bar[block - 1])

    def draw(batch: Batch, gen: torch.Generator) -> Batch:
        labels = batch["label"]
        return {**batch, "noise": _standard_normal((len(labels), net.label_dim), gen, labels.device)}

    def loss(batch: Batch) -> torch.Tensor:
        embeddings = class_embeddings(net.label_dim).to(batch["noise"].device)
        u = embeddings[batch["label"]]
        z = noisy_embedding(u, previous, batch["noise"])
        return denoising_loss(_embedding_prediction(net(batch["image"], z), embeddings), u, weight)

    return Objective(loss, draw)


def dt_head_objective(head: nn.Linear, steps: int) -> Objective:
    """The head's term of NoProp-DT's loss: cross-entropy of p_hat(y | z_T) with z_T ~ q(z_T | y), which needs
    the label and the schedule only, no block."""
    last = float(cosine_alpha_bar(steps)[-1])

    def draw(batch: Batch, gen: torch.Generator) -> Batch:
        labels = batch["label"]
        return {**batch, "noise": _standard_normal((len(labels), head.in_features), gen, labels.device)}

    def loss(batch: Batch) -> torch.Tensor:
        u = class_embeddings(head.in_features).to(batch["noise"].device)[batch["label"]]
        return F.cross_entropy(head(noisy_embedding(u, last, batch["noise"])), batch["label"])

    return Objective(loss, draw)


class NoPropDT(nn.Module):
    """Trained NoProp-DT blocks and head assembled for inference (section 2.1): z_0 ~ N(0, I), then
    z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps through blocks 1..T, then the head's argmax."""

    def __init__(self, blocks: Sequence[NoPropNet], head: nn.Linear) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.register_buffer("embeddings", class_embeddings(head.in_features), persistent=False)
        alpha_bar = cosine_alpha_bar(len(blocks))
        a, b, c = posterior_coefficients(alpha_bar[:-1], alpha_bar[1:])
        self.register_buffer("coefficients", torch.stack([a, b, c.sqrt()], dim=1).float(), persistent=False)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, generator: torch.Generator, noise: bool = True) -> torch.Tensor:
        """Labels of ``images``; ``noise=False`` drops the sqrt(c_t) eps terms (the posterior means only)."""
        z = _standard_normal((len(images), self.embeddings.shape[1]), generator, images.device)
        for block, (a, b, c) in zip(self.blocks, self.coefficients):
            u_hat = _embedding_prediction(block(images, z), self.embeddings)
            eps = _standard_normal(z.shape, generator, z.device) if noise else 0.0
            z = a * u_hat + b * z + c * eps
        return self.head(z).argmax(dim=-1)


def noprop_dt(
    spec: str | NoPropSpec,
    image_shape: Sequence[int],
    num_classes: int,
    blocks: Sequence[Mapping[str, torch.Tensor]],
    head: Mapping[str, torch.Tensor],
) -> NoPropDT:
    """The assembled model from the T block jobs' and the head job's states (blocks in order 1..T)."""
    spec = get_noprop(spec)
    if len(blocks) != spec.steps:
        raise ValueError(f"{len(blocks)} block states given for T = {spec.steps}")
    nets = []
    for state in blocks:
        net = dt_block(spec, image_shape, num_classes)
        net.load_state_dict(state)
        nets.append(net)
    linear = dt_head(num_classes)
    linear.load_state_dict(head)
    return NoPropDT(nets, linear)


# ------------------------------------------------------------------------------------- NoProp-CT / FM


class NoPropCT(nn.Module):
    """NoProp-CT (section 2.3): one network u_hat(z_t, x, t), a learned schedule and the head, trained together
    on ``CE(p_hat(y | z_1)) + KL(q(z_0 | y) || N(0, I)) + (eta / 2) SNR'(t) ||u_hat(z_t, x, t) - u_y||^2``,
    t ~ U[0, 1]. Inference: DT's posterior step on a grid of ``steps`` equal intervals of [0, 1]."""

    def __init__(self, spec: str | NoPropSpec, image_shape: Sequence[int], num_classes: int, eta: float = ETA_CT):
        super().__init__()
        self.spec, self.eta = get_noprop(spec), eta
        self.net = NoPropNet(self.spec, image_shape, num_classes, num_classes, timed=True)
        self.head = dt_head(num_classes)
        self.schedule = LearnedSNR()
        self.register_buffer("embeddings", class_embeddings(num_classes), persistent=False)

    def draw(self, batch: Batch, gen: torch.Generator) -> Batch:
        n, d, device = len(batch["label"]), self.embeddings.shape[1], batch["label"].device
        return {
            **batch,
            "time": torch.rand(n, generator=gen).to(device),
            "noise": _standard_normal((n, d), gen, device),
            "noise_end": _standard_normal((n, d), gen, device),
        }

    def loss(self, batch: Batch) -> torch.Tensor:
        u = self.embeddings[batch["label"]]
        t = batch["time"]
        ends = self.schedule.alpha_bar(torch.tensor([0.0, 1.0], device=t.device))
        z_end = noisy_embedding(u, ends[1], batch["noise_end"])
        z = noisy_embedding(u, self.schedule.alpha_bar(t)[:, None], batch["noise"])
        u_hat = _embedding_prediction(self.net(batch["image"], z, t), self.embeddings)
        return (
            F.cross_entropy(self.head(z_end), batch["label"])
            + prior_kl(u, ends[0]).mean()
            + denoising_loss(u_hat, u, self.eta / 2 * self.schedule.snr_derivative(t))
        )

    @torch.no_grad()
    def classify(self, images: torch.Tensor, generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        steps = steps or self.spec.steps
        grid = torch.linspace(0, 1, steps + 1, device=images.device)
        alpha_bar = self.schedule.alpha_bar(grid)
        a, b, c = posterior_coefficients(alpha_bar[:-1], alpha_bar[1:])
        z = _standard_normal((len(images), self.embeddings.shape[1]), generator, images.device)
        for k in range(steps):
            t = grid[k].expand(len(images))
            u_hat = _embedding_prediction(self.net(images, z, t), self.embeddings)
            z = a[k] * u_hat + b[k] * z + c[k].sqrt() * _standard_normal(z.shape, generator, z.device)
        return self.head(z).argmax(dim=-1)


class NoPropFM(nn.Module):
    """NoProp-FM (section 2.3): the straight path z_t = t u_y + (1 - t) z_0 and the loss
    ||v_hat(z_t, x, t) - (u_y - z_0)||^2, t ~ U[0, 1]; inference integrates dz/dt = v_hat from z_0 ~ N(0, I)
    with ``steps`` Euler steps and returns the class whose embedding is nearest z_1."""

    def __init__(self, spec: str | NoPropSpec, image_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.spec = get_noprop(spec)
        self.net = NoPropNet(self.spec, image_shape, num_classes, num_classes, timed=True)
        self.register_buffer("embeddings", class_embeddings(num_classes), persistent=False)

    def draw(self, batch: Batch, gen: torch.Generator) -> Batch:
        n, d, device = len(batch["label"]), self.embeddings.shape[1], batch["label"].device
        return {
            **batch,
            "time": torch.rand(n, generator=gen).to(device),
            "noise": _standard_normal((n, d), gen, device),
        }

    def loss(self, batch: Batch) -> torch.Tensor:
        u, z0, t = self.embeddings[batch["label"]], batch["noise"], batch["time"]
        z = t[:, None] * u + (1 - t[:, None]) * z0
        return denoising_loss(self.net(batch["image"], z, t), u - z0, 1.0)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, generator: torch.Generator, steps: int | None = None) -> torch.Tensor:
        steps = steps or self.spec.steps
        z = _standard_normal((len(images), self.embeddings.shape[1]), generator, images.device)
        for k in range(steps):
            z = z + self.net(images, z, torch.full((len(images),), k / steps, device=z.device)) / steps
        return torch.cdist(z, self.embeddings).argmin(dim=-1)


CONTINUOUS: dict[str, Callable[..., nn.Module]] = {"ct": NoPropCT, "fm": NoPropFM}


# ------------------------------------------------------------------------------------------- training


def _train(
    module: nn.Module,
    objective: Objective,
    data,
    seed: int,
    device,
    state_path,
    on_log,
    desc: str,
    overrides: Mapping,
    steps_factor: int = 1,
) -> dict[str, torch.Tensor]:
    cfg = train_config(NOPROP_TRAIN, overrides)
    train(
        module,
        objective,
        data,
        cfg,
        seed=seed,
        device=torch.device(device),
        steps=cfg["steps"] * steps_factor,
        state_path=state_path,
        on_log=on_log,
        desc=desc,
        progress=False,
    )
    return state_of(module)


def train_noprop_block(
    spec: str | NoPropSpec,
    data,
    block: int,
    *,
    seed: int = 0,
    device="cpu",
    eta: float = ETA,
    module: NoPropNet | None = None,
    state_path=None,
    on_log=None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """Train NoProp-DT's block ``block`` (1..T) alone on ``data`` and return its state. It builds this block's
    network only (or trains ``module`` in place), from seed ``(seed, block)``; ``overrides`` are train
    settings over :data:`NOPROP_TRAIN` (``steps=...``, ``lr=...``)."""
    spec = get_noprop(spec)
    if module is None:
        with seeded(seed * 1000 + block):
            module = dt_block(spec, data.shape, data.num_classes)
    return _train(
        module,
        dt_block_objective(module, block, spec.steps, eta),
        data,
        seed * 1000 + block,
        device,
        state_path,
        on_log,
        f"NoProp-DT block {block}",
        overrides,
    )


def train_noprop_head(
    spec: str | NoPropSpec,
    data,
    *,
    seed: int = 0,
    device="cpu",
    module: nn.Linear | None = None,
    state_path=None,
    on_log=None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """Train NoProp-DT's head alone (its own job: it reads z_T ~ q(z_T | y), no block) and return its state.
    It takes T x ``steps`` optimizer steps: the paper updates the head at every step of every block's training
    (Algorithm 1), and a linear head at lr 1e-3 needs them (at one block's 150 steps it read 25 % of the
    digits from clean-ish z_T)."""
    spec = get_noprop(spec)
    if module is None:
        with seeded(seed * 1000):
            module = dt_head(data.num_classes)
    return _train(
        module,
        dt_head_objective(module, spec.steps),
        data,
        seed * 1000,
        device,
        state_path,
        on_log,
        "NoProp-DT head",
        overrides,
        steps_factor=spec.steps,
    )


def train_noprop_continuous(
    variant: str,
    spec: str | NoPropSpec,
    data,
    *,
    seed: int = 0,
    device="cpu",
    module: nn.Module | None = None,
    state_path=None,
    on_log=None,
    **overrides,
) -> dict[str, torch.Tensor]:
    """Train NoProp-CT (``variant="ct"``) or NoProp-FM (``"fm"``), one job, and return the model's state."""
    if variant not in CONTINUOUS:
        raise ValueError(f"unknown NoProp variant {variant!r}; allowed: {', '.join(CONTINUOUS)}")
    if module is None:
        with seeded(seed):
            module = CONTINUOUS[variant](spec, data.shape, data.num_classes)
    return _train(
        module,
        Objective(module.loss, module.draw),
        data,
        seed,
        device,
        state_path,
        on_log,
        f"NoProp-{variant.upper()}",
        overrides,
    )


def noprop_continuous(
    variant: str,
    spec: str | NoPropSpec,
    image_shape: Sequence[int],
    num_classes: int,
    state: Mapping[str, torch.Tensor],
) -> nn.Module:
    """A trained NoProp-CT / FM model from its state."""
    model = CONTINUOUS[variant](spec, image_shape, num_classes)
    model.load_state_dict(state)
    return model
