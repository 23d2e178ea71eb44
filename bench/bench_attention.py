"""Pascal attention alone, forward + backward, as Markdown tables: each backend against unbiased SDPA flash.

Per shape (the reference model's 12 heads of dim 64 at T=256 x batch 64 and T=1024 x batch 16) and attention
dropout (0 and the reference recipe's 0.1): milliseconds per forward + backward of one attention layer (q, k, v
and the band in, every gradient out, the band's `prepare` included), tokens/s, and the ratio to `none`
(F.scaled_dot_product_attention, causal, no bias: the ceiling). Backends take turns in rounds; the median round counts.

With --tiles, each fused kernel's TILE_CANDIDATES are timed alone (fwd: the forward op; dq, dkdv: the backward op
with the other kernel's tiles fixed), each first checked against the shipped tiles' results, and the fastest
over all shapes is printed as the TILES entry to ship.

    python bench/bench_attention.py                      # on a GPU, bf16
    python bench/bench_attention.py --tiles --backends none,fused
    TRITON_INTERPRET=1 python bench/bench_attention.py --shapes 1x2x40x16 --dtype float16 --tiles  # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from pascal_dist.attention import get_backend

GPU = torch.cuda.is_available()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backends",
        default="none,fused,banded,sdpa,reference",
        help="comma-separated; banded:torch is banded with its correction in PyTorch ops",
    )
    p.add_argument("--shapes", default="64x12x256x64,16x12x1024x64", help="BxHxTxD list")
    p.add_argument("--dropouts", default="0,0.1")
    p.add_argument("--dtype", default="bfloat16" if GPU else "float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=10, help="calls per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiles", action="store_true", help="also time the fused kernels' tile candidates")
    return p.parse_args()


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def spec_band(device) -> torch.Tensor:
    """The reference band at full strength with theta off its init: log 2, log 4, log 4 exp(-exp(theta))."""
    theta = -0.7
    return torch.tensor([math.log(2), math.log(4), math.log(4) * math.exp(-math.exp(theta))], device=device)


def inputs(shape: str, dtype: torch.dtype, seed: int = 0):
    """q, k, v, dO, band in the memory layouts the model hands over: q, k, v as (B, H, T, d) views of one
    (B, T, 3, H, d) projection, dO as a (B, H, T, d) view of (B, T, H, d) memory (the output projection's)."""
    B, H, T, D = map(int, shape.split("x"))
    device = "cuda" if GPU else "cpu"
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    dout = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g).transpose(1, 2)
    return q, k, v, dout, spec_band(device)


def layer(name: str, q, k, v, dout, band, dropout_p: float) -> Callable[[], None]:
    """One attention layer's forward and backward with `name`, every input's gradient taken."""
    name, _, kernels = name.partition(":")
    be = get_backend(name, kernels or "auto")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    band = band.detach().requires_grad_()
    wrt = (q, k, v, band) if be.uses_band else (q, k, v)

    def run() -> None:
        out = be.attend(q, k, v, be.prepare(band if be.uses_band else None, q.size(-2), q.device, q.dtype), dropout_p)
        torch.autograd.grad(out, wrt, dout)

    return run


def median_ms(fns: dict[str, Callable[[], None]], reps: int, rounds: int) -> dict[str, float]:
    """Each callable's median milliseconds per call; callables take turns, round by round."""
    for fn in fns.values():  # untimed: compilation, autotuning, allocator
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / reps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def backends_table(a: argparse.Namespace, dtype: torch.dtype) -> None:
    names = a.backends.split(",")
    print("| B x H x T x D | dropout | backend | ms fwd+bwd | tokens/s | ratio vs none |\n|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        q, k, v, dout, band = inputs(shape, dtype)
        tokens = q.size(0) * q.size(2)
        for p in map(float, a.dropouts.split(",")):
            ms = median_ms({n: layer(n, q, k, v, dout, band, p) for n in names}, a.reps, a.rounds)
            ceiling = ms.get("none", ms[names[0]])
            for n in names:
                print(f"| {shape} | {p:g} | {n} | {ms[n]:.3f} | {tokens / ms[n] * 1e3:,.0f} | {ceiling / ms[n]:.2f} |")


def tiles_table(a: argparse.Namespace, dtype: torch.dtype) -> None:
    """Every candidate of every fused kernel, timed alone against the shipped tiles, after a results check."""
    import pascal_dist.attention.fused as fa

    print(
        "\n| kernel | B x H x T x D | dropout | tiles M x N | warps | stages | ms | vs shipped | check |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    totals: dict[tuple, float] = {}
    for shape in a.shapes.split(","):
        q, k, v, dout, band = inputs(shape, dtype)
        key_d = 64 if q.size(-1) <= 64 else 128
        for p in map(float, a.dropouts.split(",")):
            torch.manual_seed(0)
            out, lse, seed = fa.fused_forward(q, k, v, band, p)
            for kernel in ("fwd", "dq", "dkdv"):
                shipped = fa.TILES[(kernel, key_d)]

                def call(kernel=kernel):
                    if kernel == "fwd":
                        torch.manual_seed(0)  # the same dropout seed: the mask does not depend on the tiles
                        return fa.fused_forward(q, k, v, band, p)[:1]
                    return fa.fused_backward(dout, q, k, v, out, lse, band, seed, p)

                def with_tiles(tiles, fn=call, kernel=kernel):
                    def run():
                        fa.TILES[(kernel, key_d)] = tiles
                        try:
                            return fn()
                        finally:
                            fa.TILES[(kernel, key_d)] = shipped

                    return run

                expected = with_tiles(shipped)()
                fns, checks = {}, {}
                for cand in fa.TILE_CANDIDATES[kernel]:
                    got = with_tiles(cand)()
                    err = max(
                        ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()
                        for x, y in zip(got, expected)
                    )
                    checks[cand] = err <= (2e-2 if dtype != torch.float32 else 1e-4)
                    if checks[cand]:
                        fns[cand] = with_tiles(cand)
                ms = median_ms(fns, a.reps, a.rounds) if fns else {}
                for cand in fa.TILE_CANDIDATES[kernel]:
                    m, n, warps, stages = cand
                    if cand in ms:
                        totals[(kernel, key_d, cand)] = totals.get((kernel, key_d, cand), 0.0) + ms[cand]
                    timing = (
                        f"{ms[cand]:.3f} | {ms[shipped] / ms[cand]:.2f}"
                        if cand in ms and shipped in ms
                        else (f"{ms[cand]:.3f} | -" if cand in ms else "- | -")
                    )
                    print(
                        f"| {kernel} | {shape} | {p:g} | {m} x {n}{' (shipped)' if cand == shipped else ''} | "
                        f"{warps} | {stages} | {timing} | {'ok' if checks[cand] else 'WRONG'} |"
                    )
    print("\nfastest over the shapes and dropouts above (set in pascal_dist/attention/fused.py TILES):\n")
    for kernel, key_d in sorted({(kk, d) for kk, d, _ in totals}):
        mine = {c: t for (kk, d, c), t in totals.items() if (kk, d) == (kernel, key_d)}
        best = min(mine, key=mine.get)
        print(
            f"    TILES[({kernel!r}, {key_d})] = {best}  # {mine[best]:.3f} ms vs shipped "
            f"{mine.get(fa.TILES[(kernel, key_d)], float('nan')):.3f} ms"
        )


def main() -> None:
    a = parse()
    dtype = getattr(torch, a.dtype)
    card = torch.cuda.get_device_name() if GPU else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{card}, torch {torch.__version__}, {a.dtype}, window 3, {a.rounds} rounds of {a.reps} calls, median round\n"
    )
    backends_table(a, dtype)
    if a.tiles:
        tiles_table(a, dtype)


if __name__ == "__main__":
    main()
