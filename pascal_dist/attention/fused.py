"""The `fused` attention backend: one Triton flash-attention kernel with the Pascal band and dropout inside it.

Where `banded` corrects a library flash kernel from outside, this kernel adds the band a[i - j] to the scores
of the diagonal tiles in its own inner loop, so the biased softmax is never wrong to begin with, and attention
dropout is applied in the same loop (Philox, keyed by a seed drawn from the device's torch generator and the
(head, i, j) position), so the reference recipe's attn_dropout 0.1 keeps the flash path: no T x T tensor is built
or saved, with or without dropout. Backward (FlashAttention-2): one kernel per key block for dk, dv and
d a = sum of dS over each diagonal (per-program partials, reduced in PyTorch: reproducible), one per query
block for dq. The dropout mask is regenerated from the saved seed, never stored.

Needs Triton (CUDA; or its CPU interpreter, TRITON_INTERPRET=1, which is how the tests run it without a GPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from pascal_dist.attention.band_kernels import FP_FUSION, bht_strides, inner_contiguous, output_like
from pascal_dist.attention.base import band_vector


@triton.jit
def _head(X, bh, H, s_b, s_h):
    """Start of (b, h) = divmod(bh, H) in a (B, H, T, d) tensor of any batch/head strides."""
    return X + (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h


@triton.jit
def _tile(base, rows, cols, s_t, n_rows, n_cols):
    """Pointers and mask of a (rows, cols) tile of one (b, h) slice with row stride s_t, column stride 1."""
    return base + rows[:, None] * s_t + cols[None, :], (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """tl.dot, in true float32 for float32 inputs (Triton's default there is TF32, ~1e-3 relative)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_kv(K, V, rows, offs_d, sk_t, sv_t, T, D):
    """Key and value rows `rows` of one head (zeros past T), and their mask."""
    k_ptrs, mask = _tile(K, rows, offs_d, sk_t, T, D)
    v_ptrs, _ = _tile(V, rows, offs_d, sv_t, T, D)
    return tl.load(k_ptrs, mask=mask, other=0.0), tl.load(v_ptrs, mask=mask, other=0.0), mask


@triton.jit
def _load_query_rows(Q, DO, L, DELTA, rows, offs_d, sq_t, sdo_t, T, D):
    """What the backward needs of query rows `rows` of one head: q, dO, logsumexp, D_i = dO_i . O_i, and the
    mask. Rows past T read dO = 0, so they add nothing to any gradient."""
    q_ptrs, mask = _tile(Q, rows, offs_d, sq_t, T, D)
    do_ptrs, _ = _tile(DO, rows, offs_d, sdo_t, T, D)
    in_t = rows < T
    return (
        tl.load(q_ptrs, mask=mask, other=0.0),
        tl.load(do_ptrs, mask=mask, other=0.0),
        tl.load(L + rows, mask=in_t, other=0.0),
        tl.load(DELTA + rows, mask=in_t, other=0.0),
        mask,
    )


@triton.jit
def _scores(q, k, offs_m, offs_n, A, scale, T, WINDOW: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """q k^T * scale (float32). Only tiles that reach the band or the diagonal (MASKED) pay for the band and the
    masks: -inf above the diagonal and past T. The others are plain matmuls, as in any flash kernel."""
    s = _dot(q, tl.trans(k), IEEE) * scale
    if MASKED:
        dist = offs_m[:, None] - offs_n[None, :]
        for m in tl.static_range(WINDOW):
            s += tl.where(dist == m, tl.load(A + m), 0.0)
        s = tl.where((dist >= 0) & (offs_n[None, :] < T) & (offs_m[:, None] < T), s, float("-inf"))
    return s


@triton.jit
def _keep(seed, bh, offs_m, start_n, T, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep-mask of the tile (rows offs_m, keys start_n .. start_n + BLOCK_N) of head bh: the same bits in the
    forward, both backward kernels and dropout_mask. One Philox call yields 4 numbers, so keys 4c .. 4c+3 of a
    row share counter c: a quarter of the generator's work, which would otherwise rival the matmuls."""
    cols = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    counters = (bh.to(tl.int64) * T + offs_m[:, None].to(tl.int64)) * tl.cdiv(T, 4) + cols[None, :].to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
    return tl.random.uint_to_uniform_float(bits) >= p_drop


@triton.jit
def _first_masked_key(start_m, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks before this one lie WINDOW or more below every query of the block: no band, no mask."""
    return tl.maximum(start_m - (WINDOW - 1), 0) // BLOCK_N * BLOCK_N


@triton.jit
def _fwd_block(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    A,
    seed,
    bh,
    sk_t,
    sv_t,
    offs_m,
    offs_d,
    start_n,
    T,
    D,
    scale,
    p_drop,
    WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v, _ = _load_kv(K, V, offs_n, offs_d, sk_t, sv_t, T, D)
    s = _scores(q, k, offs_m, offs_n, A, scale, T, WINDOW, MASKED, IEEE)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T see no key: keep them nan-free
    p = tl.exp(s - m_new[:, None])
    rescale = tl.exp(m_i - m_new)
    l_i = l_i * rescale + tl.sum(p, axis=1)  # the normaliser counts every key, dropped or not
    if DROPOUT:
        p = tl.where(_keep(seed, bh, offs_m, start_n, T, p_drop, BLOCK_M, BLOCK_N), p / (1.0 - p_drop), 0.0)
    acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    A,
    SEED,
    O,
    L,
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
    H,
    T,
    D,
    scale,
    p_drop,
    WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs, mask = _tile(_head(Q, bh, H, sq_b, sq_h), offs_m, offs_d, sq_t, T, D)
    q = tl.load(ptrs, mask=mask, other=0.0)
    K, V = _head(K, bh, H, sk_b, sk_h), _head(V, bh, H, sv_b, sv_h)
    seed = tl.load(SEED)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = _first_masked_key(start_m, WINDOW, BLOCK_N)
    for start_n in range(0, lo, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            A,
            seed,
            bh,
            sk_t,
            sv_t,
            offs_m,
            offs_d,
            start_n,
            T,
            D,
            scale,
            p_drop,
            WINDOW,
            DROPOUT,
            False,
            IEEE,
            BLOCK_M,
            BLOCK_N,
        )
    for start_n in range(lo, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):  # causal: keys j <= last query
        acc, l_i, m_i = _fwd_block(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            A,
            seed,
            bh,
            sk_t,
            sv_t,
            offs_m,
            offs_d,
            start_n,
            T,
            D,
            scale,
            p_drop,
            WINDOW,
            DROPOUT,
            True,
            IEEE,
            BLOCK_M,
            BLOCK_N,
        )
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs, o_mask = _tile(_head(O, bh, H, so_b, so_h), offs_m, offs_d, so_t, T, D)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(L + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)


@triton.jit
def _delta_kernel(
    DO, O, DELTA, sdo_b, sdo_h, sdo_t, so_b, so_h, so_t, H, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """D_i = dO_i . O_i (float32) of BLOCK_M query rows of one head, read from the bf16 tensors where they lie: in
    PyTorch it took four kernels and two float32 copies of (B, H, T, d) per layer, opaque to torch.compile."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    do_ptrs, mask = _tile(_head(DO, bh, H, sdo_b, sdo_h), offs_m, offs_d, sdo_t, T, D)
    o_ptrs, _ = _tile(_head(O, bh, H, so_b, so_h), offs_m, offs_d, so_t, T, D)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(do * o, axis=1), mask=offs_m < T)


@triton.jit
def _dkdv_block(
    dk,
    dv,
    da,
    diag,
    k,
    v,
    Q,
    DO,
    L,
    DELTA,
    A,
    seed,
    bh,
    sq_t,
    sdo_t,
    offs_n,
    start_n,
    offs_d,
    start_m,
    T,
    D,
    scale,
    p_drop,
    WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q, do, lse, delta, _ = _load_query_rows(Q, DO, L, DELTA, offs_m, offs_d, sq_t, sdo_t, T, D)
    p = tl.exp(_scores(q, k, offs_m, offs_n, A, scale, T, WINDOW, MASKED, IEEE) - lse[:, None])
    dp = _dot(do, tl.trans(v), IEEE)
    if DROPOUT:
        keep = _keep(seed, bh, offs_m, start_n, T, p_drop, BLOCK_M, BLOCK_N)
        dv += _dot(tl.trans(tl.where(keep, p / (1.0 - p_drop), 0.0).to(do.dtype)), do, IEEE)
        dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
    else:
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
    ds = p * (dp - delta[:, None])  # dLoss/d(score), bias included: a_m's gradient is its diagonal's sum
    dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    if MASKED:
        dist = offs_m[:, None] - offs_n[None, :]
        for m in tl.static_range(WINDOW):
            da += tl.where(diag == m, tl.sum(tl.sum(tl.where(dist == m, ds, 0.0), axis=1), axis=0), 0.0)
    return dk, dv, da


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    A,
    SEED,
    DO,
    L,
    DELTA,
    DK,
    DV,
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
    sdo_b,
    sdo_h,
    sdo_t,
    H,
    T,
    D,
    scale,
    p_drop,
    WINDOW: tl.constexpr,
    WINDOW_P2: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Key block n of one (b, h): dk, dv over every query i >= j, and this block's share of d a."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v, kv_mask = _load_kv(_head(K, bh, H, sk_b, sk_h), _head(V, bh, H, sv_b, sv_h), offs_n, offs_d, sk_t, sv_t, T, D)
    row0 = bh.to(tl.int64) * T  # int64: B*H*T*d passes 2**31 at long sequences
    Q, DO, L, DELTA = _head(Q, bh, H, sq_b, sq_h), _head(DO, bh, H, sdo_b, sdo_h), L + row0, DELTA + row0
    seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    diag = tl.arange(0, WINDOW_P2)  # tl.arange needs a power of two; the store masks the rest
    da = tl.zeros([WINDOW_P2], dtype=tl.float32)
    first = start_n // BLOCK_M * BLOCK_M  # causal: queries i >= the first key
    mid = tl.minimum(tl.cdiv(start_n + BLOCK_N + WINDOW - 1, BLOCK_M) * BLOCK_M, T)  # from here: no band, no mask
    for start_m in range(first, mid, BLOCK_M):
        dk, dv, da = _dkdv_block(
            dk,
            dv,
            da,
            diag,
            k,
            v,
            Q,
            DO,
            L,
            DELTA,
            A,
            seed,
            bh,
            sq_t,
            sdo_t,
            offs_n,
            start_n,
            offs_d,
            start_m,
            T,
            D,
            scale,
            p_drop,
            WINDOW,
            DROPOUT,
            True,
            IEEE,
            BLOCK_M,
            BLOCK_N,
        )
    for start_m in range(mid, T, BLOCK_M):
        dk, dv, da = _dkdv_block(
            dk,
            dv,
            da,
            diag,
            k,
            v,
            Q,
            DO,
            L,
            DELTA,
            A,
            seed,
            bh,
            sq_t,
            sdo_t,
            offs_n,
            start_n,
            offs_d,
            start_m,
            T,
            D,
            scale,
            p_drop,
            WINDOW,
            DROPOUT,
            False,
            IEEE,
            BLOCK_M,
            BLOCK_N,
        )
    dk_ptrs, _ = _tile(DK + bh.to(tl.int64) * T * D, offs_n, offs_d, D, T, D)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    dv_ptrs, _ = _tile(DV + bh.to(tl.int64) * T * D, offs_n, offs_d, D, T, D)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)
    tl.store(DA + (bh * tl.num_programs(0) + pid_n) * WINDOW + diag, da, mask=diag < WINDOW)


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse,
    delta,
    K,
    V,
    A,
    seed,
    bh,
    sk_t,
    sv_t,
    offs_m,
    offs_d,
    start_n,
    T,
    D,
    scale,
    p_drop,
    WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v, _ = _load_kv(K, V, offs_n, offs_d, sk_t, sv_t, T, D)
    p = tl.exp(_scores(q, k, offs_m, offs_n, A, scale, T, WINDOW, MASKED, IEEE) - lse[:, None])
    dp = _dot(do, tl.trans(v), IEEE)
    if DROPOUT:
        dp = tl.where(_keep(seed, bh, offs_m, start_n, T, p_drop, BLOCK_M, BLOCK_N), dp / (1.0 - p_drop), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    A,
    SEED,
    DO,
    L,
    DELTA,
    DQ,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    sdo_b,
    sdo_h,
    sdo_t,
    H,
    T,
    D,
    scale,
    p_drop,
    WINDOW: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = bh.to(tl.int64) * T  # int64: B*H*T*d passes 2**31 at long sequences
    q, do, lse, delta, q_mask = _load_query_rows(
        _head(Q, bh, H, sq_b, sq_h),
        _head(DO, bh, H, sdo_b, sdo_h),
        L + row0,
        DELTA + row0,
        offs_m,
        offs_d,
        sq_t,
        sdo_t,
        T,
        D,
    )
    K, V = _head(K, bh, H, sk_b, sk_h), _head(V, bh, H, sv_b, sv_h)
    seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = _first_masked_key(start_m, WINDOW, BLOCK_N)
    for start_n in range(0, lo, BLOCK_N):
        dq = _dq_block(
            dq,
            q,
            do,
            lse,
            delta,
            K,
            V,
            A,
            seed,
            bh,
            sk_t,
            sv_t,
            offs_m,
            offs_d,
            start_n,
            T,
            D,
            scale,
            p_drop,
            WINDOW,
            DROPOUT,
            False,
            IEEE,
            BLOCK_M,
            BLOCK_N,
        )
    for start_n in range(lo, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        dq = _dq_block(
            dq,
            q,
            do,
            lse,
            delta,
            K,
            V,
            A,
            seed,
            bh,
            sk_t,
            sv_t,
            offs_m,
            offs_d,
            start_n,
            T,
            D,
            scale,
            p_drop,
            WINDOW,
            DROPOUT,
            True,
            IEEE,
            BLOCK_M,
            BLOCK_N,
        )
    dq_ptrs, _ = _tile(DQ + row0 * D, offs_m, offs_d, D, T, D)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _mask_kernel(SEED, KEEP, T, p_drop, BLOCK: tl.constexpr):
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(SEED), bh, offs_m, pid_n * BLOCK, T, p_drop, BLOCK, BLOCK)
    ptrs, mask = _tile(KEEP + bh.to(tl.int64) * T * T, offs_m, offs_n, T, T, T)
    tl.store(ptrs, keep.to(tl.int8), mask=mask)


def dropout_mask(seed: Tensor, B: int, H: int, T: int, dropout_p: float) -> Tensor:
    """The (B, H, T, T) keep-mask that the kernels draw for `seed` (for tests and debugging: T x T memory)."""
    keep = torch.empty((B, H, T, T), device=seed.device, dtype=torch.int8)
    block = 32
    _mask_kernel[(triton.cdiv(T, block), triton.cdiv(T, block), B * H)](seed, keep, T, dropout_p, BLOCK=block)
    return keep.bool()


# bf16/fp16 tiles per (kernel, head-dim class): (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from sm_90
# compiles (Triton 3.9: no register spills with dropout on or off, every matmul on Hopper's wgmma), not yet from
# timings: on a GPU, bench/bench_attention.py --tiles times TILE_CANDIDATES against these and prints the fastest.
TILES = {
    ("fwd", 64): (64, 64, 4, 3),
    ("fwd", 128): (128, 64, 8, 3),
    ("dq", 64): (64, 64, 8, 3),
    ("dq", 128): (128, 32, 8, 3),
    ("dkdv", 64): (32, 64, 8, 3),
    ("dkdv", 128): (32, 64, 8, 3),
}
TILE_CANDIDATES = {  # sm_90 compiles of each: bench/compile_kernels.py --candidates
    "fwd": [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2)],
    "dq": [(64, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 4), (128, 32, 4, 3)],
    "dkdv": [(32, 64, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 4), (64, 32, 4, 3)],
}


DELTA_ROWS = 64  # query rows per program of _delta_kernel (memory-bound: any size that fits does)


def tiles(head_dim: int, kernel: str, dtype: torch.dtype) -> dict:
    """Launch options of `kernel` ("fwd", "dq", "dkdv" from TILES; "delta"). float32 (exact matmuls without tensor
    cores; tests and debugging, not training) takes small tiles so that it fits in shared memory on any card."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if kernel == "delta":
        return dict(BLOCK_M=DELTA_ROWS, BLOCK_D=block_d, num_warps=4, **FP_FUSION)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, **FP_FUSION)
    block_m, block_n, warps, stages = TILES[(kernel, 64 if head_dim <= 64 else 128)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages, **FP_FUSION)


# The forward draws its dropout seed inside: tagged nondeterministic_seeded, so that the compiler's partitioner
# saves the seed instead of re-running the op in backward (activation checkpointing), which would draw another.
@torch.library.custom_op(
    "pascal_dist::fused_band_attention", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def fused_forward(q: Tensor, k: Tensor, v: Tensor, a: Tensor, dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, H, T, d) in q's dtype, logsumexp (B, H, T) float32, dropout seed (1,) int64)."""
    q, k, v = (inner_contiguous(x) for x in (q, k, v))
    B, H, T, D = q.shape
    # drawn from the device's torch generator (checkpointed with the run, no host sync), only when it is used
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), device=q.device, dtype=torch.int64)
    else:
        seed = torch.zeros(1, device=q.device, dtype=torch.int64)
    out = output_like(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    opts = tiles(D, "fwd", q.dtype)
    grid = (triton.cdiv(T, opts["BLOCK_M"]), B * H)
    _fwd_kernel[grid](
        q,
        k,
        v,
        a.detach().float().contiguous(),
        seed,
        out,
        lse,
        *bht_strides(q, k, v, out),
        H,
        T,
        D,
        1.0 / math.sqrt(D),
        dropout_p,
        WINDOW=a.numel(),
        DROPOUT=dropout_p > 0.0,
        IEEE=q.dtype == torch.float32,
        **opts,
    )
    return out, lse, seed


@fused_forward.register_fake
def _fused_forward_fake(q, k, v, a, dropout_p):
    B, H, T, D = q.shape
    return (output_like(q), q.new_empty((B, H, T), dtype=torch.float32), q.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("pascal_dist::fused_band_attention_backward", mutates_args=())
def fused_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, a: Tensor, seed: Tensor, dropout_p: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in q's dtype and d a (window,) float32."""
    q, k, v = (inner_contiguous(x) for x in (q, k, v))
    do = inner_contiguous(do)  # usually (B, T, H, d) memory, as the output projection's gradient arrives
    B, H, T, D = q.shape
    out = inner_contiguous(out)
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    opts = tiles(D, "delta", q.dtype)
    _delta_kernel[(triton.cdiv(T, opts["BLOCK_M"]), B * H)](do, out, delta, *bht_strides(do, out), H, T, D, **opts)
    dq, dk, dv = (torch.empty((B, H, T, D), device=q.device, dtype=q.dtype) for _ in range(3))
    common = (*bht_strides(q, k, v, do), H, T, D, 1.0 / math.sqrt(D), dropout_p)
    flags = dict(WINDOW=a.numel(), DROPOUT=dropout_p > 0.0, IEEE=q.dtype == torch.float32)
    af = a.detach().float().contiguous()
    opts = tiles(D, "dkdv", q.dtype)
    n_blocks = triton.cdiv(T, opts["BLOCK_N"])
    partial = torch.empty(B * H * n_blocks, a.numel(), device=q.device, dtype=torch.float32)
    _bwd_dkdv_kernel[(n_blocks, B * H)](
        q,
        k,
        v,
        af,
        seed,
        do,
        lse,
        delta,
        dk,
        dv,
        partial,
        *common,
        WINDOW_P2=triton.next_power_of_2(a.numel()),
        **flags,
        **opts,
    )
    opts = tiles(D, "dq", q.dtype)
    _bwd_dq_kernel[(triton.cdiv(T, opts["BLOCK_M"]), B * H)](
        q, k, v, af, seed, do, lse, delta, dq, *common, **flags, **opts
    )
    return dq, dk, dv, partial.sum(0)


@fused_backward.register_fake
def _fused_backward_fake(do, q, k, v, out, lse, a, seed, dropout_p):
    B, H, T, D = q.shape
    return (*(q.new_empty((B, H, T, D)) for _ in range(3)), a.new_empty(a.shape, dtype=torch.float32))


class FusedBandAttention(torch.autograd.Function):
    """(q, k, v (B, H, T, d), a (window,), dropout_p) -> dropout(softmax(q k^T / sqrt(d) + band(a) + causal)) v."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, a: Tensor, dropout_p: float) -> Tensor:
        out, lse, seed = fused_forward(q, k, v, a, dropout_p)
        ctx.save_for_backward(q, k, v, a, out, lse, seed)
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx: Any, do: Tensor):
        q, k, v, a, out, lse, seed = ctx.saved_tensors
        dq, dk, dv, da = fused_backward(do, q, k, v, out, lse, a, seed, ctx.dropout_p)
        return dq, dk, dv, da.to(a.dtype), None


class FusedBackend:
    name = "fused"
    uses_band = True

    def builds_dense_mask(self, dropout_p: float) -> bool:
        return False

    def prepare(self, band: Tensor | None, T: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return band_vector(band, device)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        return FusedBandAttention.apply(q, k, v, prepared, dropout_p)
