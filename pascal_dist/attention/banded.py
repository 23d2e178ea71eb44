"""The `banded` attention backend: causal flash attention plus the exact banded Pascal correction.

softmax(QK^T/sqrt(d) + band + causal) V is computed as ordinary causal flash attention (O, L) followed by
an exact correction (docs/model.md derives it): with s_im = q_i.k_(i-m) * scale and c_m = exp(a_m) - 1,

    w_im = c_m exp(s_im - L_i)   r_i = 1 + sum_m w_im   O'_i = (O_i + sum_m w_im v_(i-m)) / r_i   L'_i = L_i + log r_i

Backward: the flash backward called with (O', L') is exact for every off-band score, but it weighs the band
positions with their UNbiased probability p_im = exp(s_im - L'_i) where the true one is exp(a_m) p_im; the
difference c_m p_im is added here (dS_im = c_m p_im g_im with g_im = dO_i.v_(i-m) - D_i, D_i = dO_i.O'_i),
and d a_m = sum_i exp(a_m) p_im g_im. The band vector `a` is an input of the autograd.Function, so autograd
carries d a to theta and alpha. Extra work and memory are O(B*H*T*window*d); no T x T tensor is built or
saved. The correction runs in float32 (float64 for float64 inputs); outputs come back in q's dtype.
On CUDA with Triton installed, the correction is two fused kernels (`band_kernels`, one each way); elsewhere,
and with kernels="torch" (model.attention.kernels), it is the PyTorch ops below. Both are tested against a
float64 dense reference.

Dropout: the flash kernel draws its dropout mask internally, so no exact band correction can be applied to
a dropped-out softmax from outside. Rather than silently train a different model (no attention dropout), a
training call with dropout_p > 0 falls back to the `sdpa` math (dense float mask, T x T memory; exact, with
dropout) and warns once. Set `model.attn_dropout: 0` to get the fast path in training, or use the `fused`
backend (pascal_dist.attention.fused), whose kernel draws the dropout mask itself.
The same exact fallback (no warning) serves CUDA inputs the flash kernel refuses (float32, head dim not a
multiple of 8 or > 256). Generation goes through the shared float32 KV-cache path (`attend_cached`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pascal_dist.attention.base import band_vector, triton_installed
from pascal_dist.attention.dense import SdpaBackend

aten = torch.ops.aten


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, tuple]:
    """Causal flash attention without bias: (out in q.dtype, logsumexp (B, H, T) float, extras for backward)."""
    if q.device.type == "cuda":
        # (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)
        o, lse, cq, ck, mq, mk, rng, unused, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale
        )
        return o, lse, (cq, ck, mq, mk, rng, unused)
    o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p=0.0, is_causal=True, scale=scale)
    return o, lse, ()


def _flash_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, scale: float, extras: tuple
) -> tuple[Tensor, Tensor, Tensor]:
    if q.device.type == "cuda":
        cq, ck, mq, mk, rng, unused = extras
        # philox_seed/offset are the forward's rng_state/unused outputs (as in torch's derivatives.yaml)
        return aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, cq, ck, mq, mk, 0.0, True, rng, unused, scale=scale
        )
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, o, lse, 0.0, True, scale=scale)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in `dtype`, and x itself when it already is, without even a no-op `.to`: under torch.compile in torch 2.11,
    an autograd.Function whose forward returns such an alias of an intermediate gets a zero gradient
    (pytorch/pytorch#180642; tests/unit/attention/test_banded.py compares compiled and eager gradients)."""
    return x if x.dtype == dtype else x.to(dtype)


def _shift_down(x: Tensor, m: int) -> Tensor:
    """Row i of the result is row i - m of x (zeros for i < m): key/value at distance m from query i."""
    if m == 0:
        return x
    T = x.size(-2)
    return F.pad(x, (0, 0, m, 0))[..., :T, :]


def _shift_up(x: Tensor, m: int) -> Tensor:
    """Row j of the result is row j + m of x (zeros past the end): sends a query-indexed term to key j = i - m."""
    if m == 0:
        return x
    T = x.size(-2)
    return F.pad(x, (0, 0, 0, m))[..., m : m + T, :]


def _band_probs(qf: Tensor, kf: Tensor, ref: Tensor, m: int, scale: float) -> Tensor:
    """exp(s_im - ref_i) for queries i >= m, 0 for i < m (no key at distance m); (B, H, T)."""
    s = (qf * _shift_down(kf, m)).sum(-1) * scale
    valid = torch.arange(qf.size(-2), device=qf.device) >= m
    # where, not multiply: exp(s - ref) of a padded row may overflow and inf * 0 is nan
    return torch.where(valid, torch.exp(s - ref), 0.0)


def _torch_band_forward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, a: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """(O', L') from the unbiased flash (O, L) with PyTorch ops: one pass per band distance."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, af = q.to(acc), k.to(acc), v.to(acc), a.detach().to(acc)
    lse_f = lse.to(acc)
    num, wsum = o.to(acc), torch.zeros_like(lse_f)
    for m in range(af.size(0)):
        w = torch.expm1(af[m]) * _band_probs(qf, kf, lse_f, m, scale)  # (B, H, T)
        num = num + w.unsqueeze(-1) * _shift_down(vf, m)
        wsum = wsum + w
    return _cast(num / (1.0 + wsum).unsqueeze(-1), q.dtype), _cast(lse_f + torch.log1p(wsum), lse.dtype)


def _torch_band_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    do: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    a: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The band terms added to the flash backward's (dq, dk, dv), and d a, with PyTorch ops."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    dq, dk, dv = dq.to(acc), dk.to(acc), dv.to(acc)
    af, lse_f = a.detach().to(acc), lse.to(acc)
    D = (dof * out.to(acc)).sum(-1)  # (B, H, T), from the same O' the flash backward used
    da = []
    for m in range(af.size(0)):
        p = _band_probs(qf, kf, lse_f, m, scale)  # exp(s_im - L'_i): what flash already counted
        g = (dof * _shift_down(vf, m)).sum(-1) - D
        t = torch.expm1(af[m]) * p * g  # the missing part of dS_im
        dq = dq + (scale * t).unsqueeze(-1) * _shift_down(kf, m)
        dk = dk + _shift_up((scale * t).unsqueeze(-1) * qf, m)
        dv = dv + _shift_up((torch.expm1(af[m]) * p).unsqueeze(-1) * dof, m)
        da.append(torch.exp(af[m]) * (p * g).sum())
    return dq, dk, dv, torch.stack(da) if da else torch.zeros_like(af)


def _use_triton(q: Tensor, kernels: str) -> bool:
    """kernels (model.attention.kernels): "auto" = the Triton kernels on CUDA (when Triton is installed), PyTorch ops
    elsewhere; "triton" forces the kernels (on CPU they need TRITON_INTERPRET=1: that is how the tests run them
    without a GPU); "torch" forces the ops."""
    if kernels == "auto":
        return q.device.type == "cuda" and triton_installed()
    return kernels == "triton"


def _correction(use_triton: bool):
    """(band_forward, band_backward)."""
    if use_triton:
        from pascal_dist.attention import band_kernels

        return band_kernels.band_forward, band_kernels.band_backward
    return _torch_band_forward, _torch_band_backward


class BandedFlashAttention(torch.autograd.Function):
    """(q, k, v (B, H, T, d), a (window,), kernels) -> softmax(q k^T * scale + band(a) + causal) v, exact."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, a: Tensor, kernels: str = "auto") -> Tensor:
        scale = 1.0 / math.sqrt(q.size(-1))
        ctx.use_triton = _use_triton(q, kernels)
        band_forward, _ = _correction(ctx.use_triton)
        with torch.autocast(q.device.type, enabled=False):
            o, lse, extras = _flash_forward(q, k, v, scale)
            out, lse_new = band_forward(q, k, v, o, lse, a, scale)
        ctx.save_for_backward(q, k, v, a, out, lse_new)
        ctx.extras, ctx.scale = extras, scale
        return out

    @staticmethod
    def backward(ctx: Any, do: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:
        q, k, v, a, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _flash_backward(do, q, k, v, out, lse, ctx.scale, ctx.extras)  # exact off the band
            _, band_backward = _correction(ctx.use_triton)
            dq, dk, dv, da = band_backward(q, k, v, out, lse, do, dq, dk, dv, a, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), da.to(a.dtype), None


def _flash_supports(q: Tensor) -> bool:
    if q.device.type == "cpu":
        return True
    if q.device.type == "cuda":
        d = q.size(-1)
        return q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    return False


_SDPA = SdpaBackend()


def _dense_fallback(q: Tensor, k: Tensor, v: Tensor, a: Tensor, dropout_p: float) -> Tensor:
    """The `sdpa` backend's exact dense-mask math, for the calls the flash path cannot serve."""
    return _SDPA.attend(q, k, v, _SDPA.prepare(a, q.size(-2), q.device, q.dtype), dropout_p)


class BandedBackend:
    name = "banded"
    uses_band = True

    def __init__(self, kernels: str = "auto") -> None:
        self.kernels = kernels  # the correction's implementation: auto | triton | torch

    def builds_dense_mask(self, dropout_p: float) -> bool:
        return dropout_p > 0.0  # attention dropout runs the exact sdpa-mask path (see attend)

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return band_vector(band, device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        if dropout_p > 0.0:
            if not torch.compiler.is_compiling():
                warnings.warn(
                    "attention backend 'banded' with attn_dropout > 0 runs the dense sdpa-mask path "
                    "(exact, T x T memory): on a GPU, backend 'fused' keeps dropout on the flash path; "
                    "or set model.attn_dropout=0",
                    stacklevel=2,
                )
            return _dense_fallback(q, k, v, prepared, dropout_p)
        if not _flash_supports(q):
            return _dense_fallback(q, k, v, prepared, 0.0)
        return BandedFlashAttention.apply(q, k, v, prepared, self.kernels)
