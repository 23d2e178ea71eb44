"""What every attention backend shares: the backend protocol, the band as a dense mask or a vector, and the
cached-decoding attention that serves every backend at inference."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Any, Protocol

import torch
from torch import Tensor


class AttentionBackend(Protocol):
    name: str
    uses_band: bool
    """False: the model builds no Pascal bias at all and passes band=None."""

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> Any: ...

    def builds_dense_mask(self, dropout_p: float) -> bool:
        """Whether a training forward with this attention dropout builds the (T, T) mask (dense_mask_bytes)."""
        ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor: ...


def dense_mask_bytes(T: int) -> int:
    """Peak bytes of band_matrix for T positions: the (T, T) int64 distances and indices, and two float32 copies of
    the mask (before and after the causal fill); T = 100,000 needs 240 GB."""
    return 24 * T * T


def band_matrix(band: Tensor, T: int, device: torch.device, T_k: int | None = None) -> Tensor:
    """Dense (T, T_k) bias with band[i - j] on the first len(band) diagonals, 0 elsewhere, -inf above.

    Queries are the last T of T_k positions (T_k defaults to T: the square training mask; T < T_k is the
    KV-cache decode step). Built with tensor ops only (no host sync, no data-dependent branch) so it stays
    in the compiled graph and carries the gradient to the band.
    """
    T_k = T if T_k is None else T_k
    dist = torch.arange(T_k - T, T_k, device=device)[:, None] - torch.arange(T_k, device=device)[None, :]  # i - j
    window = band.shape[0]
    padded = torch.cat([band, band.new_zeros(1)])  # index `window` reads 0: outside the band
    idx = torch.where((dist >= 0) & (dist < window), dist, window)
    bias = padded[idx]  # (T, T_k)
    return bias.masked_fill(dist < 0, float("-inf"))


def attend_cached(q: Tensor, k: Tensor, v: Tensor, band: Tensor | None) -> Tensor:
    """Inference attention for queries at the last Tq of the Tk cached positions, for every backend.

    One dense path in float32 (the reference math) rather than each backend's kernel: SDPA's is_causal
    aligns the mask top-left when Tq != Tk, which is wrong for a cache, and a decode step is small.
    band=None is the unbiased model (causal mask only).
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    band = q.new_zeros(1, dtype=acc) if band is None else band.to(acc)
    mask = band_matrix(band, q.size(-2), q.device, k.size(-2))  # (Tq, Tk)
    att = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
    return (torch.softmax(att + mask, dim=-1) @ v.to(acc)).to(v.dtype)  # (B, nh, Tq, hs)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def band_vector(band: Tensor | None, device: torch.device) -> Tensor:
    """`prepare` of the backends whose kernels take the band itself: (window,), at least float32 (the precision
    the band terms are computed at); band=None (no bias yet) is one zero diagonal."""
    if band is None:
        band = torch.zeros(1, device=device)
    return band.to(torch.promote_types(band.dtype, torch.float32))


def fused_unavailable_reason() -> str | None:
    """Why the `fused` backend cannot run here, or None."""
    if not triton_installed():
        return "needs Triton (pip install triton; CUDA builds of torch include it)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA GPU (or TRITON_INTERPRET=1: Triton's CPU interpreter, for tests only, very slow)"
    return None
