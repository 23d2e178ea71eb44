"""Run metrics: TensorBoard scalars and text from rank 0, step timing, throughput and memory.

Callers reduce across ranks before logging; this module only writes what it is given.
"""

from __future__ import annotations

import os
import time

import torch


class MetricsWriter:
    """Writes TensorBoard events under `log_dir` on the main rank; a no-op elsewhere."""

    def __init__(self, log_dir: str, enabled: bool):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 needs it

            self._writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            # TensorBoard renders text as Markdown; indenting by four spaces keeps YAML readable.
            self._writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class StepTimer:
    """Wall time between `lap()` calls.

    Only a lap with sync=True waits for the GPU: one wait per step would leave the GPU idle while the next step is
    launched. Laps in between are host times, which track the device's because the ZeRO step reads its gradient
    norm on the host; a run of laps ending in a synced one adds up to the device time exactly.
    """

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self, sync: bool = False) -> float:
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed


def memory_gib() -> float:
    """Peak GPU memory allocated on this device, or this process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**30
    except ImportError:
        return 0.0
