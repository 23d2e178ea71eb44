"""Attention kernels: causal attention plus the Pascal band, behind one seam with named backends.

A backend turns the band vector a (window,) into whatever its kernel wants ONCE per model forward
(`prepare`, shared by all layers: SPEC lesson 1), then runs each layer (`attend`). Backends:

  reference  dense softmax(QK^T/sqrt(hs) + bias + causal) V, softmax in float32; the oracle, any device
  sdpa       F.scaled_dot_product_attention with the bias as a float mask (memory-efficient kernel)
  none       F.scaled_dot_product_attention(is_causal=True), no bias: the ablation baseline
  banded     causal flash attention + the exact banded correction of ANCHORS.md (fused Triton kernels on
             CUDA, PyTorch ops elsewhere; pascal_dist.banded_attention, imported at the bottom of this module)
  fused      one Triton flash kernel with the band and attention dropout in its inner loop
             (pascal_dist.fused_attention, imported on first use: it needs Triton and a GPU or its interpreter)

A new backend is a class with the `name / uses_band / prepare / attend` members below, registered with
`register_backend`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class AttentionBackend(Protocol):
    name: str
    uses_band: bool
    """False: the model builds no Pascal bias at all and passes band=None."""

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> Any: ...

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor: ...


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


class ReferenceBackend:
    name = "reference"
    uses_band = True

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

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> None:
        return None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: None, dropout_p: float) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    """Add a backend under backend.name (the seam the fused GPU kernel plugs into)."""
    BACKENDS[backend.name] = backend


for _b in (ReferenceBackend(), SdpaBackend(), NoBiasBackend()):
    register_backend(_b)


_ON_FIRST_USE = {"fused": "pascal_dist.fused_attention"}


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


def runnable_backend(name: str) -> str:
    """`name`, or the exact equivalent that runs on this machine: a model trained with `fused` on GPUs is
    evaluated, exported or sampled with `banded` (same function) where there is no GPU."""
    if name == "fused" and fused_unavailable_reason() is not None:
        return "banded"
    return name


def get_backend(name: str) -> AttentionBackend:
    if name in _ON_FIRST_USE and name not in BACKENDS:
        reason = fused_unavailable_reason()
        if reason:
            raise ValueError(f"attention backend {name!r} {reason}")
        importlib.import_module(_ON_FIRST_USE[name])
    if name not in BACKENDS:
        valid = sorted(set(BACKENDS) | set(_ON_FIRST_USE))
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(valid)}")
    return BACKENDS[name]


# last: the module imports band_matrix and register_backend from here and registers itself
import pascal_dist.banded_attention  # noqa: E402,F401
