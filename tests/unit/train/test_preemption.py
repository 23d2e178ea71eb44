"""Stop decisions: a recorded signal, the time limit with its safety margin, and the vote that shares them."""

import os
import signal
import time

import pytest

from pascal_dist.train import preemption
from pascal_dist.train.preemption import NONE, SIGNALLED, TIME_LIMIT, SlowestStep, StopWatch


@pytest.fixture(autouse=True)
def restore_signal_handlers(monkeypatch):
    """StopWatch installs process-wide handlers; give pytest its own back afterwards."""
    monkeypatch.setattr(preemption, "_received", [])
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_signal_is_recorded_not_fatal():
    watch = StopWatch()
    assert watch.reason(0.0, 0.0) == NONE
    os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
    time.sleep(0.01)
    assert watch.reason(0.0, 0.0) == SIGNALLED and watch.signal_name == "SIGUSR1"


def test_time_limit_leaves_room_for_the_steps_before_the_stop_and_a_save():
    """The vote is read a step after it is cast, then the step finishes and the run saves: 3 steps + 2 saves."""
    watch = StopWatch(time_limit_s=10.0)
    watch.start = time.monotonic() - 5.0  # 5 s used, 5 s left
    assert watch.reason(slowest_step_s=1.0, save_s=0.9) == NONE  # needs 4.8 s
    assert watch.reason(slowest_step_s=1.0, save_s=1.1) == TIME_LIMIT  # needs 5.2 s
    assert StopWatch(time_limit_s=0.0).reason(1e9, 1e9) == NONE  # 0 = no limit


def test_the_margin_forgets_the_compiling_first_step_once_a_second_is_timed():
    slowest = SlowestStep()
    slowest.add(60.0)  # the process's first step: torch.compile compiled in it
    assert slowest.seconds == 60.0  # all that is known yet
    slowest.add(0.02)
    assert slowest.seconds == 0.02
    for seconds in (0.03, 0.025):
        slowest.add(seconds)
    assert slowest.seconds == 0.03
