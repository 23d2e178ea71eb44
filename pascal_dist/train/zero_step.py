"""Two replacements in DeepSpeed's ZeRO optimizer step that keep its result and drop work: the redundant
per-tensor overflow scan (ZeRO-1/2, bf16) and the per-tensor gradient norm (every stage), both per-instance
patches of DeepSpeed's optimizer, gated to the DeepSpeed versions they were read against and tested with
(tests/integration/test_zero_step.py). `restore_deepspeed_step` undoes them (benchmarks and tests compare the two).
"""

from __future__ import annotations

import torch

PATCHED = ("check_overflow", "get_grad_norm_direct")  # the optimizer attributes these patches set
# The DeepSpeed releases these patches were read against and tested with; on any other the engine runs DeepSpeed's
# own step (correct, slower), and the trainer says so once.
TESTED_DEEPSPEED = ("0.19.8",)


def apply(optimizer) -> None:
    """Both patches, where they apply."""
    skip_redundant_overflow_scan(optimizer)
    foreach_grad_norm(optimizer)


def restore_deepspeed_step(optimizer) -> bool:
    """Undo both: DeepSpeed's own step again; returns whether either was applied."""
    return any([vars(optimizer).pop(name, None) is not None for name in PATCHED])


def _checked_deepspeed() -> bool:
    return untested_deepspeed() is None


def untested_deepspeed() -> str | None:
    """Why the patches do not apply to the installed DeepSpeed, or None when they do."""
    import deepspeed
    from packaging.version import Version

    if any(Version(deepspeed.__version__) == Version(v) for v in TESTED_DEEPSPEED):
        return None
    return (
        f"DeepSpeed {deepspeed.__version__}: its own ZeRO step runs (correct, slower); the step patches of "
        f"pascal_dist/train/zero_step.py were tested with DeepSpeed {', '.join(TESTED_DEEPSPEED)} only"
    )


def _zero_1_2(optimizer) -> bool:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return _checked_deepspeed() and isinstance(optimizer, DeepSpeedZeroOptimizer)


def _zero_3(optimizer) -> bool:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    return _checked_deepspeed() and isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)


def skip_redundant_overflow_scan(optimizer) -> bool:
    """Let ZeRO-1/2 in bf16 find non-finite gradients the way ZeRO-3 does: from the global gradient norm alone.

    Before its step, DeepSpeed's ZeRO-1/2 optimizer scans every gradient tensor for inf/NaN (about five kernels
    per tensor, an all-reduce and a host read: half the ops of the whole engine step for the reference model, see
    bench/bench_step.py) and then computes the global gradient norm for clipping, which it also checks: a norm
    that is not finite skips the step on every rank (the norm is all-reduced, so every rank decides alike). Any
    inf or NaN gradient makes that norm inf or NaN, so in bf16 the scan finds nothing the norm check would not;
    DeepSpeed's ZeRO-3 relies on the norm alone in bf16. Applied only where that norm check runs (bf16, the norm
    computed, no CPU offload) in the DeepSpeed versions read and tested for it (tests/integration/test_zero_step.py:
    older ones lack the norm check); returns whether it was.
    """
    applies = (
        _zero_1_2(optimizer)
        and optimizer.dtype == torch.bfloat16
        and getattr(optimizer, "check_grad_overflow", False)
        and getattr(optimizer, "compute_grad_norm", False)
        and not optimizer.cpu_offload
    )
    if applies:
        optimizer.check_overflow = lambda partition_gradients=True: None  # step() then sets overflow from the norm
    return applies


def foreach_grad_norm(optimizer) -> bool:
    """Compute the ZeRO optimizer's gradient norm with one for-each kernel per parameter group instead of two
    kernels per tensor.

    DeepSpeed's get_grad_norm_direct copies every gradient tensor of the partition to fp64 and takes its norm,
    one tensor at a time: for the reference model about 200 launches and an fp64 copy of every gradient, each step.
    torch._foreach_norm with dtype=float64 accumulates in fp64 without the copies, in a few launches. The rest is
    DeepSpeed's: the same tensors counted, the same all-reduces, and a non-finite norm masked to -1, which makes
    the step skip. L2 only (what clipping asks for); anything else, and ZeRO-3 with model or expert parallelism,
    goes to DeepSpeed's own. Returns whether it was applied.
    """
    if _zero_1_2(optimizer):
        optimizer.get_grad_norm_direct = _zero_1_2_norm(optimizer)
    elif _zero_3(optimizer):
        optimizer.get_grad_norm_direct = _zero_3_norm(optimizer)
    else:
        return False
    return True


def _zero_1_2_norm(optimizer):
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    own = type(optimizer).get_grad_norm_direct

    def grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return own(optimizer, gradients, params, norm_type)
        grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
        counted = [
            g.detach()
            for g, p in zip(grads, params)
            if not getattr(p, "ds_pipe_replicated", False)
            and (is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0)
        ]
        if counted:
            total = _sum_of_squared_norms(counted).float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    return grad_norm_direct


def _zero_3_norm(optimizer):
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero.utils import get_norm_dtype

    own = type(optimizer).get_grad_norm_direct

    def grad_norm_direct(gradients, params, norm_type=2):
        if (
            float(norm_type) != 2.0
            or optimizer.model_parallel_group is not None
            or optimizer._autoep_expert_parallel_group(params) is not None
        ):
            return own(optimizer, gradients, params, norm_type)
        optimizer._assert_same_partition_group(params)
        group = optimizer._get_param_partition_group(params[0])
        device = get_accelerator().device_name()
        counted = [
            g.to(device, non_blocking=True)
            for g, p in zip(gradients, params)
            if is_model_parallel_parameter(p) or optimizer.model_parallel_rank == 0
        ]
        if counted:
            total = _sum_of_squared_norms(counted)
        else:
            total = torch.zeros((), dtype=get_norm_dtype(), device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        total = total.sqrt()
        invalid = total.isinf().logical_or(total.isnan())
        return torch.where(invalid, torch.tensor(-1.0, device=optimizer.device, dtype=torch.float), total)

    return grad_norm_direct


def _sum_of_squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum_i ||t_i||^2 in DeepSpeed's norm dtype (fp64 where the device has it): one for-each kernel for the norms."""
    from deepspeed.runtime.zero.utils import get_norm_dtype

    return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=get_norm_dtype())).square().sum()
