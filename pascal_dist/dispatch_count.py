"""Counts what a piece of code asks of the device: ops dispatched (kernel launches on a GPU) and host reads.

A host read (`.item()`, `bool(tensor)`, `.cpu()`, an op whose output size depends on values) makes the CPU wait
for the device to finish everything queued so far; while the CPU then prepares the next kernels the GPU idles.
Both counts are properties of the program, not of the machine, so a CPU can tell how many launches and stalls
a training step will cost on a GPU before one is at hand. Ops inside a torch.compile'd region are not seen
one by one (count eager code).
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops that read device values back to the host. `.item()`, bool(), int(), float() all reach _local_scalar_dense.
_HOST_READS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
               _aten.unique_consecutive.default, _aten._unique2.default, _aten.equal.default}
# Ops that only relabel memory launch no kernel.
_NO_KERNEL = {"view", "_unsafe_view", "reshape", "expand", "as_strided", "t", "transpose", "permute", "unsqueeze",
              "squeeze", "slice", "select", "detach", "alias", "split", "split_with_sizes", "chunk", "unbind",
              "_reshape_alias", "lift_fresh", "empty", "empty_like", "empty_strided", "set_", "resize_"}


class DispatchCounter(TorchDispatchMode):
    """`with DispatchCounter() as c: step()`, then `c.launches`, `c.host_reads` and `c.top(10)`."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func in _HOST_READS or (name == "_to_copy" and _to_host(args[0], kwargs)):
            self.host_reads += 1
        if name not in _NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **kwargs)

    @property
    def launches(self) -> int:
        return sum(self.ops.values())

    def top(self, n: int) -> list[tuple[str, int]]:
        return self.ops.most_common(n)


def _to_host(tensor, kwargs) -> bool:
    """A blocking copy from an accelerator to the CPU. (On a CPU-only machine `.cpu()` is not seen: the tensor is
    already there, and code that moves tensors `.to(current_device)` would otherwise count as reading.)"""
    device = kwargs.get("device")
    return (isinstance(tensor, torch.Tensor) and tensor.device.type != "cpu" and device is not None
            and torch.device(device).type == "cpu" and not kwargs.get("non_blocking", False))
