"""Training throughput of each attention backend with a plain PyTorch AdamW loop, as a Markdown table.

Same model, same random tokens, one process, backends interleaved in rounds; warm-up steps (and compilation, with
--compile) are not timed. Ratio is tokens/s over the `none` row (no Pascal bias: the ceiling). `banded:torch` is the
banded backend with its correction in PyTorch ops instead of the fused Triton kernels (what the fusion buys, on CUDA).

    python bench/bench_backends.py                       # CPU-sized defaults
    python bench/bench_backends.py --n-layer 12 --n-embd 768 --n-head 12 --block-size 256 --batch 64 --compile
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from shapes import CPU_SIZED, add_shape_args, model_config

from pascal_dist.config import COMPILE_SCOPES
from pascal_dist.model import PascalGPT
from pascal_dist.train.engine import compile_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backends",
        default="none,sdpa,reference,banded,banded:torch",
        help="comma-separated; banded:torch|banded:triton picks the correction's implementation",
    )
    add_shape_args(p, CPU_SIZED)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per backend per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds of --steps, backends interleaved")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-scope", default="blocks", choices=COMPILE_SCOPES, help="train.compile_scope")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_stepper(backend: str, a: argparse.Namespace, data: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """A closure running optimizer step i (forward, backward, clip, AdamW) and returning its loss, on the device
    (reading it every step would add the same stall to every backend and flatter the ratios)."""
    torch.manual_seed(0)
    cfg = model_config(a, backend)
    model = PascalGPT(cfg).to(a.device).train()
    model.set_bias_step(cfg.bias.warmup_steps)  # full strength: costs the same as any other step
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    if a.compile:
        compile_model(model, a.compile_scope)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.device.startswith("cuda"))

    def step(i: int) -> torch.Tensor:
        with amp:
            _, loss = model(data[i, :, :-1], data[i, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main() -> None:
    a = parse()
    torch.set_float32_matmul_precision("high")
    names = a.backends.split(",")
    n_steps = a.warmup + a.rounds * a.steps
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, a.vocab, (n_steps, a.batch, a.block_size + 1), generator=g).to(a.device)
    steppers = {name: make_stepper(name, a, data) for name in names}
    for name in names:  # untimed: compilation, allocator and AdamW state warm-up
        for i in range(a.warmup):
            steppers[name](i)
    # backends take turns in rounds, so a drifting machine (other load, clocks) hurts none of them alone
    seconds, last = dict.fromkeys(names, 0.0), {}
    for r in range(a.rounds):
        for name in names:
            sync(a.device)
            t0 = time.perf_counter()
            for i in range(a.warmup + r * a.steps, a.warmup + (r + 1) * a.steps):
                last[name] = steppers[name](i)
            sync(a.device)
            seconds[name] += time.perf_counter() - t0
    tokens = a.rounds * a.steps * a.batch * a.block_size
    tps = {name: tokens / seconds[name] for name in names}
    ceiling = tps["none"] if "none" in tps else tps[names[0]]
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{dev}, torch {torch.__version__}, L={a.n_layer} d={a.n_embd} h={a.n_head} T={a.block_size} "
        f"B={a.batch} V={a.vocab}, {a.rounds}x{a.steps} timed steps after {a.warmup}, compile={a.compile}"
        f"{f' ({a.compile_scope})' if a.compile else ''}\n"
    )
    print("| backend | tokens/s | ratio vs none | last loss |\n|---|---|---|---|")
    for name in names:
        print(f"| {name} | {tps[name]:,.0f} | {tps[name] / ceiling:.2f} | {float(last[name]):.3f} |")


if __name__ == "__main__":
    main()
