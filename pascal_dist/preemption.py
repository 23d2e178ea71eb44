"""When to stop early: SIGTERM/SIGUSR1 (cluster preemption, Slurm's --signal) and the configured time limit.

A signal only sets a flag; the training loop turns it into a decision shared by every rank (an all-reduce at
each step boundary), finishes the step, checkpoints, and exits with EXIT_PREEMPTED so that a job script can
requeue. A signal that reaches only some ranks (the deepspeed launcher forwards SIGTERM one rank at a time)
still stops all of them together.
"""
from __future__ import annotations

import signal
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again with --resume auto
EXIT_NUMERICAL = 3   # too many consecutive non-finite steps; the last good state was checkpointed

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
        """SIGNALLED, TIME_LIMIT if another step plus a save might not fit in the limit, else NONE."""
        if self.signal_name is not None:
            return SIGNALLED
        if self.time_limit_s > 0:
            margin = 2 * slowest_step_s + 2 * save_s  # generous: a missed deadline loses everything since the last save
            if time.monotonic() - self.start + margin >= self.time_limit_s:
                return TIME_LIMIT
        return NONE
