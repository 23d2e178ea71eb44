"""The dense backends: `reference` (the float32-softmax oracle), `sdpa` (PyTorch SDPA with the band as a float
mask) and `none` (no bias: the ablation baseline). Each builds or implies a T x T mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pascal_dist.attention.base import band_matrix


class ReferenceBackend:
    name = "reference"
    uses_band = True

    def builds_dense_mask(self, dropout_p: float) -> bool:
        return True

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        # at least float32 whatever the compute dtype: the softmax runs in float32 (float64 in tests)
        acc = torch.promote_types(dtype, torch.float32)
        if band is None:
            band = torch.zeros(1, device=device)
        return band_matrix(band.to(acc), T, device)  # (T, T)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = torch.softmax(att.to(prepared.dtype) + prepared, dim=-1)
        if dropout_p > 0.0:
            att = F.dropout(att, p=dropout_p, training=True)
        return att.to(v.dtype) @ v  # (B, nh, T, hs)


class SdpaBackend:
    name = "sdpa"
    uses_band = True

    def builds_dense_mask(self, dropout_p: float) -> bool:
        return True

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if band is None:
            band = torch.zeros(1, device=device)
        return band_matrix(band, T, device).to(dtype)  # (T, T); the mask must match q's dtype

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        # a caller that guessed the compute dtype wrong still works (one cast per layer)
        mask = prepared if prepared.dtype == q.dtype else prepared.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class NoBiasBackend:
    name = "none"
    uses_band = False

    def builds_dense_mask(self, dropout_p: float) -> bool:
        return False  # is_causal: SDPA masks inside its kernel

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> None:
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: None, dropout_p: float) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
