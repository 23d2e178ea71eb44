"""The DeepSpeed side of a run: process group, AdamW with decay groups, the reference LR schedule, the ZeRO engine, and
compiling the engine's model (block by block or whole).

The model stays a plain nn.Module; this module is where it meets DeepSpeed and torch.compile.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Callable

import torch

from pascal_dist.config import ConfigError
from pascal_dist.config.schema import TrainConfig
from pascal_dist.train import zero_step
from pascal_dist.train.dist_env import DistEnv, export


def lr_lambda(t: TrainConfig) -> Callable[[int], float]:
    """The LR schedule as a multiplier of train.lr, in optimizer steps: linear warm-up, cosine to the floor, flat."""

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

    pattern = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
        f"{os.environ['MASTER_PORT']}_{env.rank}"
    )
    if torch.cuda.is_available() or not glob.glob(pattern):
        return
    dist.barrier()
    for path in glob.glob(pattern):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# What pascal-dist relies on (also pyproject's requirement): under bf16, DeepSpeed skips a step whose gradient is not
# finite only from 0.19.8 on (ZeRO-1/2 since 0.19.4, ZeRO-3 since 0.19.8); an older one applies the NaN to the
# weights, and the skip counter, train.max_bad_steps and the bias-warmup counter never see it.
DEEPSPEED_REQUIRED = ">=0.19.8,<0.20"


def require_deepspeed() -> None:
    """ConfigError (one line, exit 2) unless the installed DeepSpeed is one pascal-dist supports."""
    import deepspeed
    from packaging.specifiers import SpecifierSet

    if deepspeed.__version__ not in SpecifierSet(DEEPSPEED_REQUIRED):
        raise ConfigError(
            f"DeepSpeed {deepspeed.__version__} is installed; pascal-dist needs deepspeed{DEEPSPEED_REQUIRED} (older "
            f"releases apply a bf16 step whose gradient is not finite): pip install 'deepspeed{DEEPSPEED_REQUIRED}'"
        )


def build_engine(model: torch.nn.Module, train: TrainConfig, ds_config: dict):
    """Wrap `model` in a ZeRO engine; returns (engine, optimizer, lr_scheduler).

    We build the optimizer ourselves so that weight decay follows `model.param_groups` (matrices and
    embeddings decay; LayerNorm parameters and theta do not) and so the same code runs on CPU and GPU.
    """
    import deepspeed

    require_deepspeed()
    groups = model.param_groups(train.weight_decay)
    # fused: one kernel for all parameters, and no host read of the step count (the for-each version reads it)
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    zero_step.apply(optimizer)  # DeepSpeed's step without its redundant work (pascal_dist/train/zero_step.py)
    return engine, optimizer, scheduler


def set_activation_memory_budget(budget: float) -> None:
    """torch.compile's activation memory budget (see TrainConfig): a global of torch's partitioner, read when a
    graph is compiled (its first call), so it must be set before that."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = budget


def compile_model(model: torch.nn.Module, scope: str, **compile_kwargs) -> None:
    """torch.compile `model` in place (train.compile_scope): 'model' as one graph, 'blocks' region by region
    (`model.regions()`). Compiling happens at the first call; set the memory budget before that."""
    if scope == "model":
        model.compile(**compile_kwargs)
    elif scope == "blocks":
        for region in model.regions():
            region.compile(**compile_kwargs)
    else:
        raise ValueError(f"compile scope must be 'blocks' or 'model', got '{scope}'")


def compile_engine(engine, activation_memory_budget: float = 1.0, scope: str = "blocks") -> None:
    """Compile the engine's model (see compile_model), with torch.compile's activation memory budget set first.
    'model' goes through engine.compile(), which compiles the whole module and records it in the engine."""
    set_activation_memory_budget(activation_memory_budget)
    if scope == "model":
        engine.compile()
    else:
        import deepspeed.utils.nvtx

        deepspeed.utils.nvtx.enable_nvtx = False  # as engine.compile() does: its NVTX ranges break the graphs
        compile_model(engine.module, scope)
