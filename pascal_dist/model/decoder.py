"""The Pascal-biased GPT decoder: GPT-2's blocks with the Pascal band in attention, its parameter groups and FLOPs.

nanoGPT-shaped. Differences that matter: one PascalBias owned by the model and evaluated once per
forward; the attention backend prepares its mask once per forward and every block reuses it; the
bias warm-up step is a buffer the trainer writes (`set_bias_step`) and the model only reads.
The model knows nothing of DeepSpeed, files or config loading.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from pascal_dist.attention import AttentionBackend, attend_cached, get_backend
from pascal_dist.config.schema import ModelConfig
from pascal_dist.model.bias import LearnedBand, PascalBias, make_bias
from pascal_dist.model.loss import linear_cross_entropy


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attn_dropout
        self.backend = backend

    def forward(self, x: Tensor, prepared: Any) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = self.backend.attend(q, k, v, prepared, self.attn_dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward_cached(self, x: Tensor, band: Tensor | None, cache: KVCache, layer: int) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        k, v = cache.append(layer, k, v)  # (B, nh, T_cached + T, hs)
        y = attend_cached(q, k, v, band).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class KVCache:
    """Keys and values of every layer for the tokens decoded so far (inference only; positions 0..length-1)."""

    def __init__(self, n_layer: int) -> None:
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].size(-2)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's (B, nh, T, hs) keys/values to `layer`; returns all of that layer's keys/values."""
        if (old := self.layers[layer]) is not None:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.gelu = nn.GELU()
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout2 = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.c_proj(self.dropout1(self.gelu(self.c_fc(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, backend)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, prepared: Any) -> Tensor:
        x = x + self.attn(self.ln_1(x), prepared)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x: Tensor, band: Tensor | None, cache: KVCache, layer: int) -> Tensor:
        x = x + self.attn.forward_cached(self.ln_1(x), band, cache, layer)
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Linear):
    """The output projection (no bias, as GPT-2's). Given targets it returns the mean cross-entropy instead of the
    logits, chunked (pascal_dist.model.loss) so that the (B, T, vocab) logits are never materialized. It stays a module
    so that ZeRO-3 gathers the (tied) weight for it like for any Linear."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)  # the chunked loss computes x @ W^T alone

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x.reshape(-1, x.size(-1)), self.weight, targets.reshape(-1))


class PascalGPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = get_backend(cfg.attention.backend, cfg.attention.kernels)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, self.backend) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size)
        self.lm_head.weight = self.wte.weight  # tied
        # the unbiased baseline owns no bias parameter: nothing unused for DDP/ZeRO to trip over
        self.bias: PascalBias | LearnedBand | None = make_bias(cfg.bias) if self.backend.uses_band else None
        # t of alpha(t): int64 so that a wrapper's module.bfloat16() cannot round it; written only
        # in place (set_bias_step) so a compiled graph sees a new value, not a new tensor
        self.register_buffer("bias_step", torch.zeros((), dtype=torch.long), persistent=False)

        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: residual projections scaled by 1/sqrt(2 n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def set_bias_step(self, step: int) -> None:
        """Set t for the bias warm-up (the trainer passes the number of optimizer updates applied)."""
        self.bias_step.fill_(int(step))

    def band(self) -> Tensor | None:
        """The band vector a (window,) at the current bias_step, or None for an unbiased backend."""
        return None if self.bias is None else self.bias(self.bias_step)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(logits (B, T, vocab), None) for idx (B, T); with targets (B, T), (None, mean cross-entropy in fp32 over
        every target: no ignore index). Training never materializes the logits (LMHead)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        dev = idx.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        prepared = self.backend.prepare(self.band(), T, idx.device, dtype)  # once, shared by all blocks
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(block, x, prepared, use_reentrant=False)
            else:
                x = block(x, prepared)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x), None
        return None, self.lm_head(x, targets)

    @torch.no_grad()
    def forward_cached(self, idx: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, T, vocab) for `idx` placed after the cache's tokens, whose keys/values it appends.

        Inference only (no dropout, no grad). Position i's query sees cached key j with bias band[i - j] at
        the current bias_step, so the logits equal forward()'s on the whole sequence, position by position.
        """
        B, T = idx.shape
        t0 = cache.length
        if t0 + T > self.cfg.block_size:
            raise ValueError(f"cache length {t0} + {T} new tokens exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(t0, t0 + T, device=idx.device))  # (B, T, C)
        band = self.band()
        for i, block in enumerate(self.blocks):
            x = block.forward_cached(x, band, cache, i)
        return self.lm_head(self.ln_f(x))

    def regions(self) -> list[nn.Module]:
        """The parts that torch.compile compiles one by one for regional compilation: every block (alike, so they
        share one compiled graph) and the loss head (its chunked loss is many pointwise passes over fp32 logits,
        which compiled become a few). What is left between them is a handful of ops per step."""
        return [*self.blocks, self.lm_head]

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied head counts once). non_embedding drops the position table:
        the token table stays because it is also the LM head's matmul (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, T: int | None = None) -> int:
        """Training FLOPs per token, 6N + 12 L d T (PaLM appendix B / nanoGPT), N = num_params(non_embedding=True).

        6N: forward + backward of every matmul weight (the position table does no matmul); 12 L d T:
        the attention scores and weighted sum. Default T = block_size; the band is O(T) and ignored.
        """
        T = self.cfg.block_size if T is None else T
        return 6 * self.num_params(non_embedding=True) + 12 * self.cfg.n_layer * self.cfg.n_embd * T

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups. Decay: every parameter with dim >= 2 (Linear weights, token and
        position embeddings; the tied head is the token table). No decay: LayerNorm weights and
        biases and the Pascal theta."""
        params = list(self.parameters())  # deduplicated: the tied weight appears once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
