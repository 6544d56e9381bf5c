"""Noise-conditioned transformer layers (docs/method.md §4).

Every residual layer in this project has the signature ``layer(h, c) -> h`` where ``h`` is the token
sequence (N, T, d) and ``c`` the conditioning vector (N, d_c). The block converter accepts any module
with that signature, so a user's own residual layers can be split into blocks the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Fixed sinusoidal features of a scalar (here c_noise = ln(sigma)/4), as in DiT's timestep embedder."""

    def __init__(self, dim: int, max_period: float = 10_000.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # c_noise lives in roughly [-1.6, 1.1]; scale so the lowest frequencies still vary across that span.
        args = 1000.0 * x.float().reshape(-1, 1) * self.freqs.reshape(1, -1)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class NoiseEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise followed by an MLP: the conditioning vector c."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.sinusoid = SinusoidalEmbedding(frequency_dim)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(c_noise))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotary position embedding (RoPE, Su et al.; Llama's): channel pairs (i, i + D/2) of every head are
    rotated by angle position x base^(-2i/D), so q.k depends on positions only through their difference.
    ``x`` is (N, heads, T, D), ``positions`` (T,)."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = positions.to(x.device, torch.float32)[:, None] * freqs[None]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Incremental decoding: the keys and values that the positions computed so far left in every attention
    layer, so that each new token runs the layers on its new positions only (O(1) rows per layer, not the whole
    context) and they attend to the kept keys and to their own.

    The caller announces each token's rows with :meth:`advance`: their positions in the layout of the full,
    uncached sequence (which the layers' masks and rotary positions are written for), and how many of them, the
    leading ones, later tokens attend to (an AR block-wise model's clean tokens; its noisy slot is seen by itself
    only and is not kept). A layer may run several times per token at different conditionings c (a block-wise
    model: once per sigma-grid step; Huginn: once per recurrence iteration); adaLN modulates every layer by c, so
    the same positions' keys differ between those runs and each run keeps its own. Runs are told apart by their
    order: the n-th call of a layer within a token is its n-th run, as every token makes the same calls in the
    same order (the sampler's grid, K iterations); a token that does not is caught (the kept lengths disagree)."""

    def __init__(self) -> None:
        self.positions = torch.zeros(0, dtype=torch.long)  # this token's rows, in the full sequence's layout
        self.keep = 0  # how many of them, the leading ones, are kept for later tokens
        self._kept = torch.zeros(0, dtype=torch.long)  # positions kept before this token (the same in every run)
        self._runs: dict = {}  # (attention, run) -> kept keys, values
        self._calls: dict = {}  # attention -> its calls in this token
        self._masks: dict = {}  # (id of a mask, device) -> its rows of this token, columns kept + this token's

    @property
    def length(self) -> int:
        """Positions every run keeps once this token's calls are done: where the next token's rows begin."""
        return len(self._kept) + self.keep

    def advance(self, positions: torch.Tensor, keep: int | None = None) -> None:
        """Begin a token: its calls compute the rows at ``positions`` (full-sequence layout), and the first
        ``keep`` of them (default: all) are kept for later tokens."""
        self._kept = torch.cat([self._kept, self.positions[: self.keep]])
        self.positions = torch.as_tensor(positions, dtype=torch.long).cpu()
        self.keep = len(self.positions) if keep is None else keep
        self._calls, self._masks = {}, {}

    def extend(
        self, attention: nn.Module, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (N, heads, positions, D) a call of ``attention`` attends to: its run's kept ones
        followed by this call's (``keys``, ``values``: this token's rows), whose first ``keep`` it keeps."""
        run = self._calls.get(attention, 0)
        self._calls[attention] = run + 1
        if (attention, run) in self._runs:
            kept_keys, kept_values = self._runs[attention, run]
            keys, values = torch.cat([kept_keys, keys], dim=2), torch.cat([kept_values, values], dim=2)
        if keys.shape[2] != len(self._kept) + len(self.positions):
            raise RuntimeError(
                f"KV cache out of step: run {run} of a layer kept {keys.shape[2] - len(self.positions)} "
                f"positions, the others {len(self._kept)} (the tokens made different calls)"
            )
        end = self.length
        self._runs[attention, run] = keys[:, :, :end], values[:, :, :end]
        return keys, values

    def mask(self, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The full sequence's ``mask`` cut to this token's rows and the keys a call attends to (the kept
        positions, then this token's), on ``device``: gathered once per token, shared by the layers."""
        if mask is None:
            return None
        key = id(mask), device  # masks are layer attributes: alive, so their ids unique, all generation long
        if key not in self._masks:
            keys = torch.cat([self._kept, self.positions])
            self._masks[key] = mask[..., self.positions, :][..., keys].to(device)
        return self._masks[key]


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, in float32 when bf16 autocast runs on a CPU: there the matmuls
    around attention run twice as fast in bf16, while PyTorch's CPU flash-attention backward in bf16 took ~9x
    its float32 time (a 12-layer, width-64 text model: 640 ms against 70 ms per three steps), which more than
    ate the gain. Autocast is switched off inside so that it does not cast the float32 inputs back."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.to(q.dtype)


class Attention(nn.Module):
    """Multi-head self-attention. ``rope_period`` (Llama-style layers) switches on rotary positions; token
    t sits at position t mod period, so the noisy half of an AR [clean; noisy] sequence shares the
    positions of the clean half (noisy z_i is the target for token x_i)."""

    def __init__(self, width: int, heads: int, bias: bool = True, rope_period: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if rope_period is not None and (width // heads) % 2:
            raise ValueError(f"rotary positions need an even head size, got {width // heads}")
        self.heads = heads
        self.rope_period = rope_period
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """``mask`` is written for the full sequence (a mask built for the longest sequence also covers its
        prefixes). With a ``cache``, ``x`` holds the cache's current rows only (:class:`KVCache`)."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope_period is not None:
            positions = torch.arange(t, device=x.device) if cache is None else cache.positions.to(x.device)
            positions = positions % self.rope_period
            q, k = apply_rotary(q, positions), apply_rotary(k, positions)  # keys are kept rotated
        if cache is not None:
            k, v = cache.extend(self, k, v)
            mask = cache.mask(mask, x.device)
        elif mask is not None:
            # set as a plain attribute, so .to(device) does not move it
            mask = (mask[..., :t, :t] if mask.shape[-1] != t else mask).to(x.device)
        out = scaled_dot_product_attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class SwiGLU(nn.Module):
    """Llama's gated MLP, down(silu(gate(x)) * up(x)), without biases; the hidden size is 2/3 of
    mlp_ratio x width (rounded up to a multiple of 8), so it costs what the GELU MLP of that ratio costs."""

    def __init__(self, width: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = -(-int(2 * mlp_ratio * width / 3) // 8) * 8
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


#: residual layer styles: DiT's (LayerNorm, GELU MLP, biases, positions added by the stem) and
#: Llama's (RMSNorm, SwiGLU, no biases, rotary positions in attention), both under adaLN-Zero
LAYER_STYLES = ("dit", "llama")


class AdaLNZeroLayer(nn.Module):
    """Pre-norm transformer layer modulated by c (shift, scale, gate for attention and MLP).

    The modulation is zero-initialised, so every gate starts at 0 and the layer starts as the identity:
    a freshly converted block is a no-op on h until it learns otherwise. ``style`` picks the layer body
    (:data:`LAYER_STYLES`); ``rope_period`` is the period of rotary positions (Llama style only)."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        cond_dim: int | None = None,
        style: str = "dit",
        rope_period: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if style not in LAYER_STYLES:
            raise ValueError(f"unknown layer style {style!r}; allowed: {', '.join(LAYER_STYLES)}")
        cond_dim = cond_dim or width
        llama = style == "llama"
        # no affine parameters in either norm: adaLN's shift and scale take their place
        norm = (
            (lambda: nn.RMSNorm(width, eps=1e-6, elementwise_affine=False))
            if llama
            else (lambda: nn.LayerNorm(width, elementwise_affine=False, eps=1e-6))
        )
        self.norm1 = norm()
        self.attn = Attention(width, heads, bias=not llama, rope_period=rope_period if llama else None)
        self.norm2 = norm()
        hidden = int(width * mlp_ratio)
        self.mlp = (
            SwiGLU(width, mlp_ratio)
            if llama
            else nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)
        self.attn_mask: torch.Tensor | None = None  # set by architectures that need one (causal text)
        # on the residual branches, where ViT (timm's proj_drop / drop) puts it; parameter-free, so checkpoints
        # do not change, and its draws come from torch's generator, which the training state saves
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, h: torch.Tensor, c: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``cache``: incremental decoding (:class:`KVCache`), ``h`` holding its current rows only."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=-1)
        h = h + gate_a.unsqueeze(1) * self.drop(
            self.attn(modulate(self.norm1(h), shift_a, scale_a), self.attn_mask, cache)
        )
        h = h + gate_m.unsqueeze(1) * self.drop(self.mlp(modulate(self.norm2(h), shift_m, scale_m)))
        return h


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised linear read-out (DiT's final layer)."""

    def __init__(self, width: int, out_dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        cond_dim = cond_dim or width
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        for module in (self.modulation[1], self.linear):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))


def clean_noisy_mask(length: int) -> torch.Tensor:
    """Boolean (2T, 2T) attention mask (True = may attend) for the sequence [clean x_0..x_{T-1}; noisy z_0..z_{T-1}]
    where noisy z_i carries token x_i (docs/method.md §5): clean tokens attend causally to clean tokens; noisy i
    attends to clean j < i and to itself only, so it never sees its own or any later clean token. Its top-left
    T x T corner is the ordinary causal mask, which is what a clean-only sequence of length <= T gets."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    mask[:length, :length] = causal
    mask[length:, :length] = causal.tril(-1)
    mask[length:, length:] = torch.eye(length, dtype=torch.bool)
    return mask


@contextlib.contextmanager
def counting_layer_calls(module: nn.Module) -> Iterator[list[int]]:
    """Count forward calls of every AdaLNZeroLayer inside ``module`` (training and sampling cost, tests):
    ``with counting_layer_calls(m) as calls: ...; calls[0]``."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, AdaLNZeroLayer)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
