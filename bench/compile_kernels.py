"""Compile every Triton kernel of pascal-dist for a GPU architecture without a GPU, as a Markdown table.

Per kernel and configuration: registers per thread, bytes spilled to local memory (STACK), shared memory, and
whether the matmuls use Hopper's wgmma. A spill or a missing wgmma at the shipped tile sizes is a speed bug you
can see on a laptop; the timings themselves need a GPU (bench/gpu.sh). Uses Triton's bundled ptxas/cuobjdump.

    python bench/compile_kernels.py                 # sm_90 (H100/H200), bf16
    python bench/compile_kernels.py --arch 80       # A100
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiling, not running: the kernels must be real JIT functions
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pascal_dist.attention import band_kernels as bk  # noqa: E402
from pascal_dist.attention import fused as fa  # noqa: E402

FLOAT32_POINTERS = {"A", "L", "LOUT", "DELTA", "DA", "C", "EA"}
SIZES = {"H", "T", "D"}  # capitals that are not pointers
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(fn, data: str, constants: dict) -> dict:
    """Argument types from the argument names: CAPITALS are pointers (but H, T, D), scale/p_drop floats, the rest
    int32."""
    sig = {}
    for name in fn.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name == "SEED":
            sig[name] = "*i64"
        elif name.isupper() and name not in SIZES:
            sig[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{data}"
        else:
            sig[name] = "fp32" if name in ("scale", "p_drop") else "i32"
    return sig


def compile_row(fn, data: str, constants: dict, warps: int, arch: int, stages: int = 3) -> str:
    sig = signature(fn, data, constants)
    # what a real launch specializes on: pointers, strides and the head dim divisible by 16 (T, H need not be)
    aligned = {
        (fn.arg_names.index(n),): [["tt.divisibility", 16]]
        for n, t in sig.items()
        if t.startswith("*") or (t == "i32" and n not in ("T", "H"))
    }
    kernel = triton.compile(
        ASTSource(fn, sig, constants, attrs=aligned),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=stages, **bk.FP_FUSION),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    dots = (
        "wgmma" if "warp_group_dot" in kernel.asm["ttgir"] else ("mma" if "nvidia_mma" in kernel.asm["ttgir"] else "-")
    )
    return f"{regs} | {stack} | {kernel.metadata.shared // 1024} | {dots}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 = H100/H200, 80 = A100")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--kernels", default="fwd,dkdv,dq,delta,band_fwd,band_bwd")
    p.add_argument(
        "--candidates",
        action="store_true",
        help="every fused tile candidate that bench/bench_attention.py --tiles times, not only the shipped",
    )
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    data = TYPES[dtype]
    fused = {"fwd": fa._fwd_kernel, "dkdv": fa._bwd_dkdv_kernel, "dq": fa._bwd_dq_kernel}
    print(f"\nTriton {triton.__version__}, sm_{a.arch}, {a.dtype}, window 3\n")
    print(
        "| kernel | head dim | dropout | tiles (M x N) | warps | stages | registers | spilled bytes | shared KiB "
        "| matmul |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for D in map(int, a.head_dims.split(",")):
        for name in a.kernels.split(","):
            if name in fused:
                shipped = fa.TILES[(name, 64 if D <= 64 else 128)]
                for dropout in (False, True):
                    for m, n, warps, stages in fa.TILE_CANDIDATES[name] if a.candidates else [shipped]:
                        opts = dict(fa.tiles(D, name, dtype), BLOCK_M=m, BLOCK_N=n)
                        if dtype != torch.float32:
                            opts.update(num_warps=warps, num_stages=stages)
                        warps, stages = opts.pop("num_warps"), opts.pop("num_stages", 3)
                        opts.pop("enable_fp_fusion")  # an option of compile_row's, not a kernel constant
                        constants = dict(WINDOW=3, DROPOUT=dropout, IEEE=dtype == torch.float32, **opts)
                        if name == "dkdv":
                            constants["WINDOW_P2"] = 4
                        row = compile_row(fused[name], data, constants, warps, a.arch, stages)
                        print(
                            f"| fused {name} | {D} | {dropout} | {opts['BLOCK_M']} x {opts['BLOCK_N']} | {warps} | "
                            f"{stages} | {row} |"
                        )
            elif name == "delta":
                constants = fa.tiles(D, "delta", dtype)
                warps, _ = constants.pop("num_warps"), constants.pop("enable_fp_fusion")
                row = compile_row(fa._delta_kernel, data, constants, warps, a.arch)
                print(f"| fused delta | {D} | - | {constants['BLOCK_M']} rows | {warps} | 3 | {row} |")
            else:
                backward = name == "band_bwd"
                block_m, warps = bk._blocking(D, backward)
                fn = bk._band_bwd_kernel if backward else bk._band_fwd_kernel
                constants = dict(WINDOW=3, BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(D))
                row = compile_row(fn, data, constants, warps, a.arch)
                print(
                    f"| banded {'backward' if backward else 'forward'} | {D} | - | {block_m} rows | {warps} | 3 | "
                    f"{row} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
