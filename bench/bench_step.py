"""One training step of the model, plain PyTorch loop vs the DeepSpeed ZeRO engine (stages 1, 2, 3), side by side.

Same model, same random tokens, one process; the ratio is tokens/s over the plain loop's. On a GPU it also
reports model TFLOP/s (6N + 12 L d T per token), MFU against --peak-tflops, and peak memory; at the reference
shape, the reference recipe's training time projected from each row's step time. On any machine it counts, for one
step run eagerly, the ops dispatched (kernel launches on a GPU) and the host waits (reads of device values and
device synchronizes: each one stalls the GPU until the CPU catches up): the engine's overhead in launches and
stalls, before a GPU times it. The engine rows run the project's own configs/zero*.json (what
`launcher/train.py` runs), or variants given with --ds, e.g.

    python bench/bench_step.py                                   # CPU-sized defaults, configs/zero{1,2,3}.json
    python bench/bench_step.py --spec --compile --peak-tflops 989  # reference model, H100/H200 (bf16 dense peak)
    python bench/bench_step.py --ds configs/zero2.json --ds configs/zero2.json:zero_optimization.overlap_comm=false
    python bench/bench_step.py --ds configs/zero2.json --ds-own configs/zero2.json  # and DeepSpeed's own step
    python bench/bench_step.py --spec --compile --compile-scope blocks,model --ds configs/zero2.json  # both scopes
    python bench/bench_step.py --profile out/                    # + a torch.profiler table and trace per row
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
from shapes import CPU_SIZED, SPEC, add_shape_args, model_config

from bench.dispatch_count import DispatchCounter
from pascal_dist.cli import run_rank
from pascal_dist.config import COMPILE_SCOPES, load_ds_config
from pascal_dist.config.schema import ModelConfig, RunConfig, TrainConfig
from pascal_dist.model import PascalGPT
from pascal_dist.train.dist_env import DistEnv
from pascal_dist.train.engine import (
    build_engine,
    compile_engine,
    compile_model,
    init_distributed,
    set_activation_memory_budget,
)
from pascal_dist.train.zero_step import restore_deepspeed_step


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", action="store_true", help="reference model and micro batch (12 x 768, T=256, batch 64)")
    add_shape_args(p, CPU_SIZED)
    p.add_argument("--backend", default="sdpa")
    p.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="residual and attention dropout (0 for the kernels' own speed; the reference recipe trains with 0.1)",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--ds",
        action="append",
        default=None,
        metavar="PATH[:key=value...]",
        help="a DeepSpeed config to time (repeatable), with optional dotted overrides, values in JSON "
        "(default: configs/zero1.json, zero2.json, zero3.json)",
    )
    p.add_argument(
        "--ds-own",
        action="append",
        default=[],
        metavar="PATH[:key=value...]",
        help="also time this config with DeepSpeed's own ZeRO-1/2 step (its per-tensor overflow scan and "
        "gradient norm), which pascal-dist replaces (pascal_dist.train.zero_step): their cost",
    )
    p.add_argument("--profile", default=None, metavar="DIR", help="also profile 3 steps of each row into DIR")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--compile-scope",
        default="blocks",
        metavar="SCOPE[,SCOPE]",
        help="train.compile_scope of every row (blocks or model); a second scope adds a plain-loop row "
        "compiled that way, side by side (--compile-scope blocks,model)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        default=1.0,
        help="torch.compile's activation memory budget (train.activation_memory_budget), every row",
    )
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the card's bf16 dense peak, for MFU")
    a = p.parse_args()
    if a.warmup < 1:
        p.error(f"--warmup must be at least 1 (the first step, which compiles, is timed apart), got {a.warmup}")
    a.scopes = a.compile_scope.split(",")
    if not set(a.scopes) <= set(COMPILE_SCOPES) or len(a.scopes) > len(set(a.scopes)):
        p.error(f"--compile-scope: one or two of {', '.join(COMPILE_SCOPES)}, got '{a.compile_scope}'")
    if len(a.scopes) > 1 and not a.compile:
        p.error(f"--compile-scope {a.compile_scope}: a second scope compares compiled rows; add --compile")
    if a.spec:
        vars(a).update(SPEC)
    return a


def model_cfg(a: argparse.Namespace) -> ModelConfig:
    return model_config(a, a.backend, a.dropout)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh_memory() -> float:
    """Free what earlier rows left and start the peak afresh; returns the GiB still allocated (the tokens)."""
    gc.collect()
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def timed(step, a: argparse.Namespace, name: str, before_gib: float) -> dict:
    """Seconds per step; then (outside the timing) one counted step and, with --profile, a profile.
    Peak memory is that of this row alone: what was allocated before it was built is subtracted."""
    start = time.perf_counter()
    for i in range(a.warmup):
        step()
        if i == 0:
            sync()
            first = time.perf_counter() - start  # with torch.compile's compilation: what a GPU session pays per row
    sync()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / a.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 - before_gib if torch.cuda.is_available() else float("nan")
    if a.profile:
        profile(step, a.profile, name)
    with torch.compiler.set_stance("force_eager"), DispatchCounter() as counted:
        step()
    sync()
    return {
        "seconds": seconds,
        "first": first,
        "peak": peak,
        "launches": counted.launches,
        "host_waits": counted.host_waits,
        "top": counted.top(8),
    }


def profile(step, out_dir: str, name: str) -> None:
    """Where the step's time goes: the top ops by self time (device time on a GPU), and a Chrome trace."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(os.path.join(out_dir, f"{slug}.txt"), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
    prof.export_chrome_trace(os.path.join(out_dir, f"{slug}.trace.json"))


def ds_variant(spec: str, a: argparse.Namespace) -> dict:
    """'configs/zero2.json:zero_optimization.overlap_comm=false' -> the resolved DeepSpeed config dict."""
    path, *overrides = spec.split(":")
    cfg = RunConfig(train=TrainConfig(micro_batch_size=a.batch, grad_accum=1, grad_clip=1.0))
    ds = load_ds_config(path, cfg, world_size=1)
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = ds
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(value)
    return ds


def plain(a: argparse.Namespace, device: torch.device, x: torch.Tensor, scope: str) -> dict:
    before = fresh_memory()
    torch.manual_seed(0)
    model = PascalGPT(model_cfg(a)).to(device)
    if a.compile:
        compile_model(model, scope)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)  # as the engine's

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, a, f"plain {scope}", before)


def zero(a: argparse.Namespace, spec: str, x: torch.Tensor, deepspeed_step: bool = False) -> dict:
    before = fresh_memory()
    torch.manual_seed(0)
    model = PascalGPT(model_cfg(a))
    engine, optimizer, _ = build_engine(model, TrainConfig(), ds_variant(spec, a))
    if deepspeed_step:
        restore_deepspeed_step(optimizer)
    if a.compile:
        compile_engine(engine, a.memory_budget, a.scopes[0])

    def step() -> None:
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()

    result = timed(step, a, spec + (" own" if deepspeed_step else ""), before)
    engine.destroy()
    return result


def projected_recipe(rows: list[tuple[str, dict]]) -> str:
    """The reference recipe's training time from each row's step time (the shape must be the reference micro-batch)."""
    t = TrainConfig()
    micro_steps = t.max_steps * t.grad_accum
    times = "; ".join(f"{name} {micro_steps * r['seconds'] / 60:.0f} min" for name, r in rows)
    return (
        f"reference recipe projected from these step times ({t.max_steps:,} optimizer steps x {t.grad_accum} "
        f"micro-batches of this shape, each timed with its own optimizer step, so an upper bound; evaluation "
        f"not included): {times}. The research code: about 250 min on one A100."
    )


def main() -> None:
    a = parse()
    set_activation_memory_budget(a.memory_budget)  # for the plain loop's torch.compile; compile_engine's rows too
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(DistEnv(0, 0, 1, "127.0.0.1", 0, "single"))
    x = torch.randint(0, a.vocab, (a.batch, a.block_size), device=device)
    tokens = a.batch * a.block_size
    flops_per_token = PascalGPT(model_cfg(a)).flops_per_token()
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    compiled = f"compiled {a.scopes[0]} (memory budget {a.memory_budget:g})" if a.compile else "eager"
    print(
        f"\n{card}, torch {torch.__version__}, L={a.n_layer} d={a.n_embd} T={a.block_size} B={a.batch}, "
        f"backend {a.backend}, dropout {a.dropout:g}, {compiled}, {a.steps} timed steps after {a.warmup}; "
        f"ops and host waits counted in one eager step; first step s: with whatever earlier rows left in "
        f"torch.compile's caches\n"
    )
    print(
        "| loop | ms/step | tokens/s | ratio | model TFLOP/s | MFU | peak GiB | first step s | ops/step "
        "| host waits/step |\n|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    rows: list[tuple[str, dict]] = []

    def add(name: str, r: dict) -> None:
        """Print the row as soon as it is measured: a run cut off by a time limit keeps what it finished."""
        rows.append((name, r))
        tflops = flops_per_token * tokens / r["seconds"] / 1e12
        mfu = f"{tflops / a.peak_tflops:.1%}" if a.peak_tflops else "-"
        print(
            f"| {name} | {r['seconds'] * 1e3:.1f} | {tokens / r['seconds']:,.0f} | "
            f"{rows[0][1]['seconds'] / r['seconds']:.2f} | {tflops:.2f} | {mfu} | {r['peak']:.2f} | "
            f"{r['first']:.2f} | {r['launches']:,} | {r['host_waits']} |",
            flush=True,
        )

    for scope in a.scopes:
        add("plain PyTorch" + (f" (compiled {scope})" if a.compile else ""), plain(a, device, x, scope))
    for spec in a.ds or [f"configs/zero{stage}.json" for stage in (1, 2, 3)]:
        add(f"DeepSpeed {spec}", zero(a, spec, x))
    for spec in a.ds_own:
        add(f"DeepSpeed {spec}, DeepSpeed's own step", zero(a, spec, x, deepspeed_step=True))
    if all(getattr(a, k) == v for k, v in SPEC.items()):
        print("\n" + projected_recipe(rows))
    print(
        "\nmost frequent ops per row: "
        + "; ".join(f"{name}: " + ", ".join(f"{op} {n}" for op, n in r["top"][:5]) for name, r in rows)
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    run_rank(lambda argv: main() or 0, [])  # ends like the trainer: no interpreter teardown to abort in
