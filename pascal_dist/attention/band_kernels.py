"""Triton kernels for the exact banded Pascal correction: one forward, one backward (CPU via TRITON_INTERPRET=1).

They compute exactly what `banded_attention`'s PyTorch ops compute (the math is in that module's docstring), but
each query row reads its band neighbours once, in registers, instead of one pass over the (B, H, T, d) tensors
per band distance and per term: the unfused ops took a large share of a training step on a GPU, almost
all of it memory traffic. Work is O(B*H*T*window*d), fp32 accumulation, no atomics: d a comes back as one
partial sum per program, reduced in PyTorch, so a run stays bitwise reproducible.

Imported only when used: pascal-dist runs without Triton (CPU wheels do not ship it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Every launch states FP fusion (a * b + c as one FMA) instead of taking Triton's default: on by default up to 3.9,
# off from 3.10, which would change these kernels' rounding and speed with the Triton version.
FP_FUSION = dict(enable_fp_fusion=True)


def _blocking(head_dim: int, backward: bool) -> tuple[int, int]:
    """(rows per program, warps): the backward keeps 13 row tiles live, so it takes fewer rows per program to
    stay in registers. A starting point, not a tuned table: bench/bench_backends.py on a GPU is the judge."""
    if backward:
        return 16, 4 if head_dim <= 64 else 8
    return (64, 4) if head_dim <= 64 else (32, 8)


@triton.jit
def _row_ptrs(base, b, h, rows, cols, s_b, s_h, s_t):
    return base + b * s_b + h * s_h + rows[:, None] * s_t + cols[None, :]


@triton.jit
def _band_fwd_kernel(
    Q,
    K,
    V,
    O,
    L,
    C,
    OUT,
    LOUT,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    so_b,
    so_h,
    so_t,
    sout_b,
    sout_h,
    sout_t,
    sl_b,
    sl_h,
    sl_t,
    slo_b,
    slo_h,
    slo_t,
    H,
    T,
    D,
    scale,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64 offsets: B*H*T*d may pass 2**31
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    in_t, in_d = rows < T, cols < D
    tile = in_t[:, None] & in_d[None, :]
    q = tl.load(_row_ptrs(Q, b, h, rows, cols, sq_b, sq_h, sq_t), mask=tile, other=0.0).to(tl.float32)
    acc = tl.load(_row_ptrs(O, b, h, rows, cols, so_b, so_h, so_t), mask=tile, other=0.0).to(tl.float32)
    lse = tl.load(L + b * sl_b + h * sl_h + rows * sl_t, mask=in_t, other=0.0).to(tl.float32)
    wsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for m in tl.static_range(WINDOW):
        keys = rows - m
        has_key = in_t & (keys >= 0)
        key_tile = has_key[:, None] & in_d[None, :]
        k = tl.load(_row_ptrs(K, b, h, keys, cols, sk_b, sk_h, sk_t), mask=key_tile, other=0.0).to(tl.float32)
        v = tl.load(_row_ptrs(V, b, h, keys, cols, sv_b, sv_h, sv_t), mask=key_tile, other=0.0).to(tl.float32)
        s = tl.sum(q * k, axis=1) * scale
        # where, not multiply: exp(s - lse) of a row without a key may overflow, and inf * 0 is nan
        w = tl.where(has_key, tl.load(C + m) * tl.exp(s - lse), 0.0)
        acc += w[:, None] * v
        wsum += w
    out = acc / (1.0 + wsum)[:, None]
    tl.store(_row_ptrs(OUT, b, h, rows, cols, sout_b, sout_h, sout_t), out.to(OUT.dtype.element_ty), mask=tile)
    tl.store(
        LOUT + b * slo_b + h * slo_h + rows * slo_t, (lse + tl.log(1.0 + wsum)).to(LOUT.dtype.element_ty), mask=in_t
    )


@triton.jit
def _band_bwd_kernel(
    Q,
    K,
    V,
    OUT,
    L,
    DO,
    DQ,
    DK,
    DV,
    DQ_OUT,
    DK_OUT,
    DV_OUT,
    C,
    EA,
    DA,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    so_b,
    so_h,
    so_t,
    sl_b,
    sl_h,
    sl_t,
    sdo_b,
    sdo_h,
    sdo_t,
    sdq_b,
    sdq_h,
    sdq_t,
    sdk_b,
    sdk_h,
    sdk_t,
    sdv_b,
    sdv_h,
    sdv_t,
    sgo_b,
    sgo_h,
    sgo_t,
    H,
    T,
    D,
    scale,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows r of one (b, h): dq_r from the pairs (r, r - m); dk_r, dv_r from the pairs (r + m, r)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    in_t, in_d = rows < T, cols < D
    tile = in_t[:, None] & in_d[None, :]
    q = tl.load(_row_ptrs(Q, b, h, rows, cols, sq_b, sq_h, sq_t), mask=tile, other=0.0).to(tl.float32)
    k = tl.load(_row_ptrs(K, b, h, rows, cols, sk_b, sk_h, sk_t), mask=tile, other=0.0).to(tl.float32)
    v = tl.load(_row_ptrs(V, b, h, rows, cols, sv_b, sv_h, sv_t), mask=tile, other=0.0).to(tl.float32)
    do = tl.load(_row_ptrs(DO, b, h, rows, cols, sdo_b, sdo_h, sdo_t), mask=tile, other=0.0).to(tl.float32)
    out = tl.load(_row_ptrs(OUT, b, h, rows, cols, so_b, so_h, so_t), mask=tile, other=0.0).to(tl.float32)
    lse = tl.load(L + b * sl_b + h * sl_h + rows * sl_t, mask=in_t, other=0.0).to(tl.float32)
    delta = tl.sum(do * out, axis=1)  # D_r = dO_r . O'_r, as the flash backward computes it
    dq = tl.load(_row_ptrs(DQ, b, h, rows, cols, sdq_b, sdq_h, sdq_t), mask=tile, other=0.0).to(tl.float32)
    dk = tl.load(_row_ptrs(DK, b, h, rows, cols, sdk_b, sdk_h, sdk_t), mask=tile, other=0.0).to(tl.float32)
    dv = tl.load(_row_ptrs(DV, b, h, rows, cols, sdv_b, sdv_h, sdv_t), mask=tile, other=0.0).to(tl.float32)
    da_row = DA + (bh * tl.num_programs(0) + pid_m) * WINDOW
    for m in tl.static_range(WINDOW):
        c = tl.load(C + m)
        # query side: row r attends to key r - m
        keys = rows - m
        has_key = in_t & (keys >= 0)
        key_tile = has_key[:, None] & in_d[None, :]
        km = tl.load(_row_ptrs(K, b, h, keys, cols, sk_b, sk_h, sk_t), mask=key_tile, other=0.0).to(tl.float32)
        vm = tl.load(_row_ptrs(V, b, h, keys, cols, sv_b, sv_h, sv_t), mask=key_tile, other=0.0).to(tl.float32)
        p = tl.where(has_key, tl.exp(tl.sum(q * km, axis=1) * scale - lse), 0.0)  # what flash already counted
        g = tl.sum(do * vm, axis=1) - delta
        dq += (scale * c * p * g)[:, None] * km
        tl.store(da_row + m, tl.sum(tl.load(EA + m) * p * g, axis=0))
        # key side: row r is the key of query r + m
        queries = rows + m
        has_query = in_t & (queries < T)
        query_tile = has_query[:, None] & in_d[None, :]
        qm = tl.load(_row_ptrs(Q, b, h, queries, cols, sq_b, sq_h, sq_t), mask=query_tile, other=0.0).to(tl.float32)
        dom = tl.load(_row_ptrs(DO, b, h, queries, cols, sdo_b, sdo_h, sdo_t), mask=query_tile, other=0.0).to(
            tl.float32
        )
        om = tl.load(_row_ptrs(OUT, b, h, queries, cols, so_b, so_h, so_t), mask=query_tile, other=0.0).to(tl.float32)
        lsem = tl.load(L + b * sl_b + h * sl_h + queries * sl_t, mask=has_query, other=0.0).to(tl.float32)
        pm = tl.where(has_query, tl.exp(tl.sum(qm * k, axis=1) * scale - lsem), 0.0)
        gm = tl.sum(dom * v, axis=1) - tl.sum(dom * om, axis=1)
        dk += (scale * c * pm * gm)[:, None] * qm
        dv += (c * pm)[:, None] * dom
    # the three outputs share one contiguous layout (sgo_*)
    tl.store(_row_ptrs(DQ_OUT, b, h, rows, cols, sgo_b, sgo_h, sgo_t), dq.to(DQ_OUT.dtype.element_ty), mask=tile)
    tl.store(_row_ptrs(DK_OUT, b, h, rows, cols, sgo_b, sgo_h, sgo_t), dk.to(DK_OUT.dtype.element_ty), mask=tile)
    tl.store(_row_ptrs(DV_OUT, b, h, rows, cols, sgo_b, sgo_h, sgo_t), dv.to(DV_OUT.dtype.element_ty), mask=tile)


def inner_contiguous(x: Tensor) -> Tensor:
    """x itself when its last dimension is dense (all the kernels need), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def output_like(q: Tensor) -> Tensor:
    """An empty (B, H, T, d) attention output laid out as (B, T, H, d) in memory, as flash SDPA lays out its own:
    the model's transpose back to (B, T, C) is then free, and the tensor the kernel keeps for the backward is the
    one the output projection keeps anyway (else a copy of it per layer)."""
    B, H, T, D = q.shape
    return torch.empty((B, T, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)


def bht_strides(*xs: Tensor) -> tuple[int, ...]:
    """Batch, head and time strides of each (B, H, T, d) tensor, in order, flat (kernel arguments)."""
    return tuple(stride for x in xs for stride in x.stride()[:3])


def _launch(q: Tensor, backward: bool) -> tuple[tuple[int, int], dict]:
    """Grid (row blocks, B*H) and the compile-time launch options."""
    B, H, T, D = q.shape
    block_m, warps = _blocking(D, backward)
    return (triton.cdiv(T, block_m), B * H), dict(
        BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(D), num_warps=warps, **FP_FUSION
    )


# Custom ops, so that torch.compile treats each kernel as one opaque call with a known output shape
# instead of tracing the launch. Outputs are fresh tensors (custom ops may not return their inputs).
@torch.library.custom_op("pascal_dist::band_forward", mutates_args=())
def band_forward(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, a: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """(O', L') from the unbiased flash (O, L): O' in q's dtype, L' in lse's dtype and layout."""
    q, k, v, o = (inner_contiguous(x) for x in (q, k, v, o))
    B, H, T, D = q.shape
    out, lse_out = output_like(q), torch.empty_like(lse)
    c = torch.expm1(a.detach().float()).contiguous()
    grid, opts = _launch(q, backward=False)
    _band_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        c,
        out,
        lse_out,
        *bht_strides(q, k, v, o, out),
        *lse.stride(),
        *lse_out.stride(),
        H,
        T,
        D,
        scale,
        WINDOW=a.numel(),
        **opts,
    )
    return out, lse_out


@band_forward.register_fake
def _band_forward_fake(q, k, v, o, lse, a, scale):
    return output_like(q), torch.empty_like(lse)


@torch.library.custom_op("pascal_dist::band_backward", mutates_args=())
def band_backward(
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
    """The flash backward's (dq, dk, dv) plus the band terms, in q's dtype, and d a (float32)."""
    q, k, v, out, do, dq, dk, dv = (inner_contiguous(x) for x in (q, k, v, out, do, dq, dk, dv))
    B, H, T, D = q.shape
    af = a.detach().float()
    c, ea = torch.expm1(af).contiguous(), torch.exp(af).contiguous()
    grid, opts = _launch(q, backward=True)
    partial = torch.empty(grid[1] * grid[0], a.numel(), device=q.device, dtype=torch.float32)
    dq_out, dk_out, dv_out = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    _band_bwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        do,
        dq,
        dk,
        dv,
        dq_out,
        dk_out,
        dv_out,
        c,
        ea,
        partial,
        *bht_strides(q, k, v, out),
        *lse.stride(),
        *bht_strides(do, dq, dk, dv, dq_out),
        H,
        T,
        D,
        scale,
        WINDOW=a.numel(),
        **opts,
    )
    return dq_out, dk_out, dv_out, partial.sum(0)


@band_backward.register_fake
def _band_backward_fake(q, k, v, out, lse, do, dq, dk, dv, a, scale):
    grads = tuple(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    return (*grads, a.new_empty(a.shape, dtype=torch.float32))
