"""Each rank casts stop reasons at some step boundaries and records what the shared vote says at every boundary,
counting host waits (tests/integration/test_preemption.py)."""

import torch
import torch.distributed as dist

from bench.dispatch_count import DispatchCounter
from pascal_dist.train.preemption import NONE, SIGNALLED, TIME_LIMIT, StopVote
from tests.integration.workers import run_worker


def main(argv: list[str]) -> dict:
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
    dist.destroy_process_group()
    return {"seen": seen, "host_waits": counted.host_waits}


if __name__ == "__main__":
    run_worker(main)
