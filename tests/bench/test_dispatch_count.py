"""The dispatch counter sees kernel-launching ops and host reads, and not the ops that only relabel memory."""

import torch

from bench.dispatch_count import DispatchCounter


def test_counts_launches_and_host_reads():
    x = torch.randn(4, 5)
    with DispatchCounter() as c:
        y = (x * 2).sum()
        y.item(), bool(y > 0), float(y), int(y)
        x.nonzero()
        x.reshape(20).view(5, 4).t()[1:]  # views only: no kernel
        x.t().reshape(20)  # a copy after all: transposed memory cannot be viewed flat
    assert c.host_reads == 5
    assert c.ops["mul"] == c.ops["sum"] == c.ops["clone"] == c.ops["gt"] == 1 and c.ops["_local_scalar_dense"] == 4
    assert not {"view", "t", "reshape", "slice"} & set(c.ops)
    assert c.launches == sum(n for _, n in c.top(100)) == 9


def test_device_resident_work_reads_nothing():
    """Accumulating on the device and reading host memory directly (numpy) are not host reads."""
    total = torch.zeros(())
    with DispatchCounter() as c:
        for _ in range(3):
            total += torch.randn(8).square().sum()
        torch.ones(2).numpy()
    assert c.host_reads == 0 and c.launches == 3 * 4 + 1
