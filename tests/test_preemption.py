"""Stop decisions of one rank: a recorded signal, and the time limit with its safety margin."""
import os
import signal
import time

import pytest

from pascal_dist import preemption
from pascal_dist.preemption import NONE, SIGNALLED, TIME_LIMIT, StopWatch


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


def test_time_limit_leaves_room_for_a_step_and_a_save():
    watch = StopWatch(time_limit_s=10.0)
    watch.start = time.monotonic() - 5.0  # 5 s used, 5 s left
    assert watch.reason(slowest_step_s=1.0, save_s=1.0) == NONE  # needs 4 s
    assert watch.reason(slowest_step_s=1.0, save_s=1.6) == TIME_LIMIT  # needs 5.2 s
    assert StopWatch(time_limit_s=0.0).reason(1e9, 1e9) == NONE  # 0 = no limit
