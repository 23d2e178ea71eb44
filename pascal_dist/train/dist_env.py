"""Who am I in the job: rank, local rank, world size and rendezvous address from whichever launcher started us.

The only module that reads launcher environment variables; everything else takes rank and world size as
arguments. Supported: the `deepspeed` launcher and torchrun (RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*),
Slurm's `srun` (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS), and a plain `python` process (rank 0 of 1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from pascal_dist.errors import UserError


class LaunchError(UserError):
    """A process started in a way that would leave it waiting for ranks that never come."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "deepspeed/torchrun", "srun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist such as 'n[1-4,7],gpu2' without calling scontrol."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST '{nodelist}'")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


# Rendezvous port of an srun job without MASTER_PORT: derived from the job id so that two jobs sharing a node do not
# collide on one port, within 20000-39999 (above the well-known and registered ports most services take, below
# Linux's default ephemeral range 32768-60999 in most of it).
JOB_PORT_BASE, JOB_PORT_SPAN = 20000, 20000
DEFAULT_MASTER_PORT = 29500  # torch.distributed's own default


def _port_from_job(job_id: str) -> int:
    return JOB_PORT_BASE + int(job_id) % JOB_PORT_SPAN


def detect(environ: Mapping[str, str] = os.environ) -> DistEnv:
    e = environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(
            int(e["RANK"]),
            int(e.get("LOCAL_RANK", 0)),
            int(e["WORLD_SIZE"]),
            e.get("MASTER_ADDR", "127.0.0.1"),
            int(e.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
            "deepspeed/torchrun",
        )
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        if "SLURM_STEP_ID" not in e:
            # The batch script itself (SLURM_PROCID=0 of SLURM_NTASKS, but no job step): the other ranks were never
            # started, so waiting for them at the rendezvous would hang until the job's time limit.
            raise LaunchError(
                f"SLURM_NTASKS={e['SLURM_NTASKS']} but this process was not started by srun (no SLURM_STEP_ID): "
                "start one process per task with `srun python launcher/train.py ...` (as slurm/*.sh do), or "
                "allocate --ntasks=1 to run one process"
            )
        addr = e.get("MASTER_ADDR") or first_host(e.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(e["MASTER_PORT"]) if "MASTER_PORT" in e else _port_from_job(e.get("SLURM_JOB_ID", "0"))
        return DistEnv(
            int(e["SLURM_PROCID"]), int(e.get("SLURM_LOCALID", 0)), int(e["SLURM_NTASKS"]), addr, port, "srun"
        )
    return DistEnv(0, 0, 1, e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 0) or 0), "single")


def export(env: DistEnv, environ: dict = os.environ) -> None:
    """Publish the detected values under the names torch.distributed's env:// rendezvous reads."""
    port = env.master_port or free_port()
    environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(port),
    )


def free_port() -> int:
    """A TCP port free on this host right now (for single-host rendezvous: tests, benchmarks, the ablation)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
