"""Counts what a piece of code asks of the device: ops dispatched (kernel launches on a GPU) and host waits.

A host wait makes the CPU wait for the device to finish everything queued so far, while the GPU then idles as
the CPU prepares the next kernels: a read of a device value (`.item()`, `bool(tensor)`, `.cpu()`, an op whose
output size depends on values) or a device synchronize (`torch.cuda.synchronize`, DeepSpeed's accelerator
`synchronize`, counted on any machine). These counts are properties of the program, not of the machine, so a
CPU can tell how many launches and stalls a training step will cost on a GPU before one is at hand.

Not seen: ops inside a torch.compile'd region one by one (count eager code), the value reads hidden inside an
op (a boolean-mask index), blocking host-to-device copies, and waits on one event or stream (partial, and
usually on work long finished). On a CPU-only machine a `.cpu()` copy is not seen either (nothing moves).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops that read device values back to the host. `.item()`, bool(), int(), float() all reach _local_scalar_dense.
_HOST_READS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_consecutive.default,
    _aten._unique2.default,
    _aten.equal.default,
}
# Ops that only relabel memory launch no kernel.
_NO_KERNEL = {
    "view",
    "_unsafe_view",
    "reshape",
    "expand",
    "as_strided",
    "t",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "detach",
    "alias",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "_reshape_alias",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
    "set_",
    "resize_",
}


class DispatchCounter(TorchDispatchMode):
    """`with DispatchCounter() as c: step()`, then `c.launches`, `c.host_waits` (`c.host_reads` +
    `c.device_syncs`) and `c.top(10)`."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.host_reads = 0
        self.device_syncs = 0
        self._patched: list[tuple[object, str, object, bool]] = []
        self._in_sync = False

    @property
    def host_waits(self) -> int:
        return self.host_reads + self.device_syncs

    def __enter__(self):
        targets = [(torch.cuda, "synchronize")]
        if "deepspeed.accelerator" in sys.modules:  # DeepSpeed syncs through its accelerator (a no-op on CPU)
            targets.append((sys.modules["deepspeed.accelerator"].get_accelerator(), "synchronize"))
        for owner, name in targets:
            original = getattr(owner, name)
            self._patched.append((owner, name, original, name in vars(owner)))
            setattr(owner, name, self._counting(original))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original, own_attribute in reversed(self._patched):
            if own_attribute:
                setattr(owner, name, original)
            else:  # a method of the class: drop the instance's shadow
                delattr(owner, name)
        self._patched.clear()
        return super().__exit__(*exc)

    def _counting(self, synchronize):
        def counted(*args, **kwargs):
            if self._in_sync:  # DeepSpeed's CUDA accelerator calls torch.cuda.synchronize: one wait, not two
                return synchronize(*args, **kwargs)
            self._in_sync, self.device_syncs = True, self.device_syncs + 1
            try:
                return synchronize(*args, **kwargs)
            finally:
                self._in_sync = False

        return counted

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
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.device.type != "cpu"
        and device is not None
        and torch.device(device).type == "cpu"
        and not kwargs.get("non_blocking", False)
    )
