"""The DeepSpeed side of a run: process group, AdamW with decay groups, the SPEC LR schedule, the ZeRO engine.

The model stays a plain nn.Module; this module is where it meets DeepSpeed.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Callable

import torch

from pascal_dist.dist_env import DistEnv, export
from pascal_dist.schema import TrainConfig


def lr_lambda(t: TrainConfig) -> Callable[[int], float]:
    """SPEC schedule as a multiplier of train.lr, in optimizer steps: linear warm-up, cosine to the floor, flat."""

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if step >= t.decay_steps:
            return t.min_lr_ratio
        progress = (step - t.warmup_steps) / max(1, t.decay_steps - t.warmup_steps)
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def init_distributed(env: DistEnv) -> None:
    """Start the process group with the accelerator's backend (NCCL on GPUs, gloo on CPU)."""
    import deepspeed

    export(env)
    deepspeed.init_distributed(verbose=False)
    _unlink_cpu_shm_segment(env)


def _unlink_cpu_shm_segment(env: DistEnv) -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce segment from /dev/shm.

    DeepSpeed's CPU accelerator creates one /dev/shm segment per rank (tens of MB), named after the rendezvous
    address, and never removes it: every CPU run leaked one, and a test suite of many launches filled /dev/shm
    until the machine ran out of memory. Once every local rank has mapped its peers' segments (the barrier),
    the names can go; the memory stays mapped until the processes exit, even by kill -9, and is then freed.
    """
    import torch.distributed as dist

    pattern = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
               f"{os.environ['MASTER_PORT']}_{env.rank}")
    if torch.cuda.is_available() or not glob.glob(pattern):
        return
    dist.barrier()
    for path in glob.glob(pattern):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def build_engine(model: torch.nn.Module, train: TrainConfig, ds_config: dict):
    """Wrap `model` in a ZeRO engine; returns (engine, optimizer, lr_scheduler).

    We build the optimizer ourselves so that weight decay follows `model.param_groups` (matrices and
    embeddings decay; LayerNorm parameters and theta do not) and so the same code runs on CPU and GPU.
    """
    import deepspeed

    groups = model.param_groups(train.weight_decay)
    # fused: one kernel for all parameters, and no host read of the step count (the for-each version reads it)
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    skip_redundant_overflow_scan(optimizer)
    foreach_grad_norm(optimizer)
    return engine, optimizer, scheduler


def compile_engine(engine, activation_memory_budget: float = 1.0) -> None:
    """engine.compile(), with torch.compile's activation memory budget (see TrainConfig). The budget is a global of
    torch's partitioner, read when the graphs are compiled (the first step), so it is set here, before."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = activation_memory_budget
    engine.compile()


def _checked_zero_1_2(optimizer) -> bool:
    """Whether `optimizer` is DeepSpeed's ZeRO-1/2 optimizer in a version whose step the patches here were read
    against and tested with (tests/test_engine.py)."""
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from packaging.version import Version

    return (Version("0.19.8") <= Version(deepspeed.__version__) < Version("0.20")
            and isinstance(optimizer, DeepSpeedZeroOptimizer))


def skip_redundant_overflow_scan(optimizer) -> bool:
    """Let ZeRO-1/2 in bf16 find non-finite gradients the way ZeRO-3 does: from the global gradient norm alone.

    Before its step, DeepSpeed's ZeRO-1/2 optimizer scans every gradient tensor for inf/NaN (about five kernels
    per tensor, an all-reduce and a host read: half the ops of the whole engine step for the SPEC model, see
    bench/bench_step.py) and then computes the global gradient norm for clipping, which it also checks: a norm
    that is not finite skips the step on every rank (the norm is all-reduced, so every rank decides alike). Any
    inf or NaN gradient makes that norm inf or NaN, so in bf16 the scan finds nothing the norm check would not;
    DeepSpeed's ZeRO-3 relies on the norm alone in bf16. Applied only where that norm check runs (bf16, the norm
    computed, no CPU offload) in the DeepSpeed versions read and tested for it (tests/test_engine.py: older ones
    lack the norm check); returns whether it was.
    """
    applies = (_checked_zero_1_2(optimizer) and optimizer.dtype == torch.bfloat16
               and getattr(optimizer, "check_grad_overflow", False) and getattr(optimizer, "compute_grad_norm", False)
               and not optimizer.cpu_offload)
    if applies:
        optimizer.check_overflow = lambda partition_gradients=True: None  # step() then sets overflow from the norm
    return applies


def restore_deepspeed_step(optimizer) -> bool:
    """Undo skip_redundant_overflow_scan and foreach_grad_norm: DeepSpeed's own ZeRO-1/2 step again (benchmarks and
    tests compare the two); returns whether either was applied."""
    patched = [vars(optimizer).pop(name, None) for name in ("check_overflow", "get_grad_norm_direct")]
    return any(p is not None for p in patched)


def foreach_grad_norm(optimizer) -> bool:
    """Compute ZeRO-1/2's global gradient norm with one for-each kernel instead of two kernels per tensor.

    DeepSpeed's get_grad_norm_direct copies every gradient tensor of the partition to fp64 and takes its norm,
    one tensor at a time: for the SPEC model about 200 launches and an fp64 copy of every gradient, each step.
    torch._foreach_norm with dtype=float64 accumulates in fp64 without the copies, in a few launches. The rest is
    DeepSpeed's: the same tensors counted (padding, pipeline replicas and model-parallel duplicates left out),
    the same all-reduces, and a non-finite norm masked to -1, which makes the step skip. L2 only (what clipping
    asks for); anything else goes to DeepSpeed's own. Returns whether it was applied.
    """
    if not _checked_zero_1_2(optimizer):
        return False
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    own = type(optimizer).get_grad_norm_direct

    def grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return own(optimizer, gradients, params, norm_type)
        grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
        counted = [g.detach() for g, p in zip(grads, params)
                   if not getattr(p, "ds_pipe_replicated", False)
                   and (is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0)]
        if counted:
            norms = torch._foreach_norm(counted, 2.0, dtype=get_norm_dtype())
            total = torch.stack(norms).square().sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = grad_norm_direct
    return True

