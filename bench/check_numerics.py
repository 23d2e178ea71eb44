"""Each Pascal attention backend against dense float64 attention on fresh random inputs, as a Markdown table.

Relative error (||x - ref|| / ||ref||) of the output and of dq, dk, dv, d theta, at several shapes including
ragged T, in the compute dtype (bf16 on a GPU, float32 on CPU), dropout off. PASS = every error within the
dtype's tolerance (bf16: 1e-2, d theta 2e-2; float32: 1e-4). Exits 1 if any row fails.

    python bench/check_numerics.py                          # CPU: sdpa, reference, banded, float32
    python bench/check_numerics.py --backends banded,fused  # on a GPU, bf16
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from pascal_dist.attention import fused_unavailable_reason, get_backend
from pascal_dist.config.schema import BiasConfig
from pascal_dist.model.bias import PascalBias

STEP, WARMUP, THETA = 1800, 4000, -0.7  # mid warm-up, theta off its init: every band term non-trivial


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    default = "sdpa,reference,banded" + (",fused" if fused_unavailable_reason() is None else "")
    p.add_argument("--backends", default=default)
    p.add_argument(
        "--shapes",
        default="256x64,1000x64,1024x128,4096x64" if gpu else "64x16,100x32,130x64",
        help="TxD list; batch 1, 2 heads",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def dense64(q, k, v, w, theta):
    """float64 softmax(q k^T / sqrt(d) + band + causal) v with the reference band, and the grads of (out * w).sum()."""
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    theta = torch.tensor([theta], dtype=torch.float64, requires_grad=True)
    alpha = 0.01 + 0.99 * min(STEP / WARMUP, 1.0)
    band = torch.stack(
        [
            alpha * torch.log(torch.tensor(2.0, dtype=torch.float64)),
            alpha * torch.log(torch.tensor(4.0, dtype=torch.float64)),
            alpha * math.log(4.0) * torch.exp(-torch.exp(theta[0])),
        ]
    )
    T = q.size(-2)
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    bias = torch.zeros(T, T, dtype=torch.float64).masked_fill(dist < 0, -math.inf)
    for m in range(3):
        bias = bias + torch.where(dist == m, band[m], 0.0)
    out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias, dim=-1) @ v
    (out * w.double().cpu()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, theta.grad


def backend_run(name, q, k, v, w):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    bias = PascalBias(BiasConfig(pascal_n=3, window=3, theta_init=THETA, warmup_steps=WARMUP)).to(q.device)
    be = get_backend(name)
    out = be.attend(q, k, v, be.prepare(bias(torch.tensor(STEP, device=q.device)), q.size(-2), q.device, q.dtype), 0.0)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad, bias.theta.grad


def rel(x, ref) -> float:
    return ((x.detach().double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main() -> int:
    a = parse()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol, tol_theta = (1e-2, 2e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
    g = torch.Generator().manual_seed(a.seed)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"\n{card}, torch {torch.__version__}, {dtype}, reference band at alpha({STEP}), theta {THETA}, "
        f"tolerance {tol:g} (d theta {tol_theta:g})\n"
    )
    print("| backend | T | d | out | dq | dk | dv | d theta | |\n|---|---|---|---|---|---|---|---|---|")
    failed = False
    for shape in a.shapes.split(","):
        T, D = map(int, shape.split("x"))
        q, k, v = (2 * torch.randn(1, 2, T, D, generator=g) for _ in range(3))  # peaky softmax: big band terms
        w = torch.randn(1, 2, T, D, generator=g)
        ref = dense64(q, k, v, w, THETA)
        q, k, v, w = (t.to(device, dtype) for t in (q, k, v, w))
        for name in a.backends.split(","):
            errs = [rel(x, r) for x, r in zip(backend_run(name, q, k, v, w), ref)]
            ok = all(e < tol for e in errs[:4]) and errs[4] < tol_theta
            failed |= not ok
            print(
                f"| {name} | {T} | {D} | " + " | ".join(f"{e:.1e}" for e in errs) + f" | {'PASS' if ok else 'FAIL'} |"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
