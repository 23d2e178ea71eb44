"""Stop decisions: a recorded signal, the time limit with its safety margin, and the vote that shares them."""
import os
import signal
import time

import pytest

from pascal_dist import preemption
from pascal_dist.preemption import NONE, SIGNALLED, TIME_LIMIT, SlowestStep, StopWatch
from tests.helpers import run_torchrun


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


VOTE_WORKER = r'''
import torch
import torch.distributed as dist
from pascal_dist.dispatch_count import DispatchCounter
from pascal_dist.preemption import NONE, SIGNALLED, TIME_LIMIT, StopVote

dist.init_process_group("gloo")
rank = dist.get_rank()
vote = StopVote(torch.device("cpu"))
mine = {2: SIGNALLED if rank == 1 else NONE, 3: TIME_LIMIT if rank == 0 else NONE}
seen = []
with DispatchCounter() as counted:
    for boundary in range(6):
        seen.append(vote.result())
        vote.cast(mine.get(boundary, NONE))
seen.append(vote.result())
report({"seen": seen, "host_waits": counted.host_waits})
dist.destroy_process_group()
'''


def test_stop_vote_is_shared_one_boundary_later_without_host_waits(tmp_path):
    """A reason cast on one rank reaches every rank at the next boundary (max of the reasons), and reading it
    waits for nothing on the host."""
    results = run_torchrun(tmp_path, VOTE_WORKER)
    for r in results:
        assert r["seen"] == [NONE, NONE, NONE, SIGNALLED, TIME_LIMIT, NONE, NONE]
        assert r["host_waits"] == 0
