"""When to stop early: SIGTERM/SIGUSR1 (cluster preemption, Slurm's --signal) and the configured time limit.

A signal only sets a flag; the training loop turns it into a decision shared by every rank (a vote all-reduced
at each step boundary and read at the next, so that no step waits for it), finishes the step, checkpoints, and
exits with EXIT_PREEMPTED so that a job script can requeue. A signal that reaches only some ranks (the deepspeed
launcher forwards SIGTERM one rank at a time) still stops all of them together.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again with --resume auto
EXIT_NUMERICAL = 3  # too many consecutive non-finite steps; the last good state was checkpointed

NONE, SIGNALLED, TIME_LIMIT = 0, 1, 2


class StopTraining(Exception):
    """The run ended early on purpose, on every rank together; `exit_code` says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_received: list[str] = []  # names of the stop signals seen by this process


def install_handlers(signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
    """Record stop signals instead of dying. Called first thing, so a signal during start-up is not lost."""

    def on_signal(signum, frame) -> None:
        _received.append(signal.Signals(signum).name)

    for sig in signals:
        signal.signal(sig, on_signal)


class StopWatch:
    """This rank's reasons to stop; `reason()` is local, the training loop reduces it across ranks."""

    def __init__(self, time_limit_s: float = 0.0):
        install_handlers()  # idempotent; makes the trainer safe to use without the CLI too
        self.start = time.monotonic()
        self.time_limit_s = time_limit_s

    @property
    def signal_name(self) -> str | None:
        return _received[0] if _received else None

    def reason(self, slowest_step_s: float, save_s: float) -> int:
        """SIGNALLED, TIME_LIMIT if the steps until the stop plus a save might not fit in the limit, else NONE."""
        if self.signal_name is not None:
            return SIGNALLED
        if self.time_limit_s > 0:
            # the decision is acted on a step after it is taken (StopVote), then a save; generous beyond that:
            # a missed deadline loses everything since the last save
            margin = 3 * slowest_step_s + 2 * save_s
            if time.monotonic() - self.start + margin >= self.time_limit_s:
                return TIME_LIMIT
        return NONE


class SlowestStep:
    """The longest optimizer step so far, for the time limit's margin (three steps). The process's first step
    counts only until a second is timed: torch.compile compiles in it (about a minute on a GPU, again after every
    resume), which no later step repeats, and a margin of three compiles would stop every run minutes early."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.steps += 1
        self.seconds = seconds if self.steps <= 2 else max(self.seconds, seconds)


class StopVote:
    """The ranks' stop reasons, reduced (max) without stalling a GPU: a vote cast at one step boundary is read at
    the next. Reading it at once would make the host wait for the whole step's kernels every step, leaving the GPU
    idle while the next step is launched; a step later the vote has long arrived in pinned host memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pending = None  # (host tensor holding the reduced vote, what to wait on before reading it)
        # one vote is in flight at a time, so one pinned landing place serves every step (no allocation per step)
        self._host = torch.empty(1, dtype=torch.int64, pin_memory=True) if device.type == "cuda" else None

    def cast(self, reason: int) -> None:
        """Start reducing this rank's reason; every rank casts at the same boundaries, in the same order."""
        self.result()  # at most one vote in flight: collectives must be issued in the same order on every rank
        # a fill kernel: torch.tensor([reason], device=cuda) would copy from pageable memory and wait for the GPU
        vote = torch.full((1,), reason, dtype=torch.int64, device=self.device)
        work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # orders the copy after the collective on the stream; the host does not wait
            self._host.copy_(vote, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record()
            self._pending = (self._host, arrived.synchronize)
        else:
            self._pending = (vote, work.wait)

    def result(self) -> int:
        """The last vote's outcome, the same on every rank (NONE if none is pending); consumes it."""
        if self._pending is None:
            return NONE
        host, wait = self._pending
        self._pending = None
        wait()
        return int(host.numpy()[0])  # numpy: reads host memory directly, no device op
