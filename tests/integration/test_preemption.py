"""The stop vote across real ranks: a reason cast on one rank stops every rank one boundary later."""

from pascal_dist.train.preemption import NONE, SIGNALLED, TIME_LIMIT
from tests.helpers import run_torchrun


def test_stop_vote_is_shared_one_boundary_later_without_host_waits(tmp_path):
    """A reason cast on one rank reaches every rank at the next boundary (max of the reasons), and reading it
    waits for nothing on the host."""
    results = run_torchrun(tmp_path, "stop_vote")
    for r in results:
        assert r["seen"] == [NONE, NONE, NONE, SIGNALLED, TIME_LIMIT, NONE, NONE]
        assert r["host_waits"] == 0
