"""The Pascal bias: pyramid coefficients, the banded bias vector and its warm-up schedule.

The bias is a function of the distance d = i - j only and is non-zero on `window` diagonals, so the
whole thing is a vector `a` of length `window`: a_d = alpha(t) * b_d * s^max(d-1, 0), with
b_d = log(1 + C(n : n-d, d, 0)) = log(1 + C(n, d)) and s = exp(-exp(theta)).

Generalisation of the reference model's bias (n = 3, window 3): distance d reads the pyramid at row
r = d, column c = d; every distance beyond the neighbour is a skip pair and pays the skip factor once
per token skipped, s^(d-1). For n = 3, window 3 this is exactly log 2, log 4, log 4 * exp(-exp(theta)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from pascal_dist.config.schema import BiasConfig


def pyramid_layer(n: int) -> list[list[int]]:
    """Layer n of Pascal's pyramid: row r (0..n) holds C(n : n-r, c, r-c) = C(n, r) * C(r, c), c = 0..r."""
    if n < 0:
        raise ValueError(f"pyramid layer n must be >= 0, got {n}")
    return [[math.comb(n, r) * math.comb(r, c) for c in range(r + 1)] for r in range(n + 1)]


def band_base(pascal_n: int, window: int) -> list[float]:
    """Unscaled bias per distance d = 0..window-1: log(1 + coefficient at row d, column d of layer n)."""
    if not 1 <= window <= pascal_n + 1:
        raise ValueError(
            f"bias window must be in 1..pascal_n+1 = {pascal_n + 1} (layer {pascal_n} has "
            f"{pascal_n + 1} rows), got window={window} with pascal_n={pascal_n}"
        )
    layer = pyramid_layer(pascal_n)
    return [math.log1p(layer[d][d]) for d in range(window)]


def alpha(step: Tensor, warmup_steps: int) -> Tensor:
    """Bias strength 0.01 + 0.99 * min(t / T, 1), float32, with no data-dependent Python branch."""
    t = step.float()
    if warmup_steps <= 0:
        return torch.ones_like(t)
    return 0.01 + 0.99 * torch.clamp(t / warmup_steps, min=0.0, max=1.0)


class PascalBias(nn.Module):
    """One learnable band shared by every head and layer: forward(step) -> a, shape (window,)."""

    uses_warmup = True  # forward(step) ramps the band in with alpha(step)

    def __init__(self, cfg: BiasConfig) -> None:
        super().__init__()
        self.warmup_steps = cfg.warmup_steps
        self.window = cfg.window
        self.pascal_n = cfg.pascal_n
        # shape (1,), not (): deepspeed.initialize crashes on 0-dim parameters
        self.theta = nn.Parameter(torch.full((1,), float(cfg.theta_init)))
        # constants, recomputable from the config, so kept out of checkpoints
        self.register_buffer("base", torch.tensor(band_base(cfg.pascal_n, cfg.window)), persistent=False)
        self.register_buffer("skip_pow", torch.arange(cfg.window).sub(1).clamp(min=0).float(), persistent=False)

    def reset_buffers(self) -> None:
        """Rewrite the constants exactly in float32 (a wrapper's module.bfloat16() rounds them too)."""
        dev = self.theta.device
        self.base = torch.tensor(band_base(self.pascal_n, self.window), device=dev)
        self.skip_pow = torch.arange(self.window, device=dev).sub(1).clamp(min=0).float()

    def skip_penalty(self) -> Tensor:
        """s = exp(-exp(theta)), the factor on a skip pair (0.800 at theta = -1.5); for logging."""
        return torch.exp(-torch.exp(self.theta.detach().float()))

    def forward(self, step: Tensor) -> Tensor:
        # float32 even if a wrapper cast theta to bf16; float64 when the test asks for it
        dt = torch.promote_types(self.theta.dtype, torch.float32)
        theta = self.theta.to(dt)
        penalty = torch.exp(-torch.exp(theta) * self.skip_pow.to(dt))  # (window,) = s^max(d-1, 0)
        return alpha(step, self.warmup_steps).to(dt) * self.base.to(dt) * penalty  # (window,)


class LearnedBand(nn.Module):
    """The control of the ablation: a band of `window` free parameters, one per diagonal, shared by every head and
    layer, initialised at 0 (so it starts as the unbiased model) with no pyramid and no warm-up. It separates what
    the pyramid's coefficients add from what any learned locality adds. forward(step) -> a, shape (window,)."""

    uses_warmup = False

    def __init__(self, cfg: BiasConfig) -> None:
        super().__init__()
        self.window = cfg.window
        self.band = nn.Parameter(torch.zeros(cfg.window))

    def forward(self, step: Tensor) -> Tensor:
        return self.band.to(torch.promote_types(self.band.dtype, torch.float32))  # float32 under a bf16 wrapper


def make_bias(cfg: BiasConfig) -> PascalBias | LearnedBand:
    """The bias module of model.bias.kind."""
    kinds = {"pascal": PascalBias, "learned": LearnedBand}
    if cfg.kind not in kinds:
        raise ValueError(f"model.bias.kind must be one of {', '.join(kinds)}, got {cfg.kind!r}")
    return kinds[cfg.kind](cfg)
