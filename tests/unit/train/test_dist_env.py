"""Rank/world detection from each launcher's environment (the multi-process runs exercise it for real)."""

import pytest

from pascal_dist.train.dist_env import LaunchError, detect, first_host


def test_deepspeed_and_torchrun_variables():
    env = detect({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (3, 1, 4, "n1", 1234)


def test_srun_variables_and_nodelist():
    env = detect(
        {
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "16",
            "SLURM_JOB_NODELIST": "gpu[03-04,07]",
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_ID": "0",
        }
    )
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 1, 16, "srun")
    assert env.master_addr == "gpu03"
    assert env.master_port == 20000 + 4242


def test_plain_process_is_rank_zero_of_one():
    env = detect({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_first_host_forms():
    assert first_host("n1") == "n1"
    assert first_host("n[1-2]") == "n1"
    assert first_host("a1,b2") == "a1"
    assert first_host("node[010,012-014]") == "node010"


def test_a_batch_script_of_several_tasks_without_srun_is_refused():
    """Inside `sbatch --ntasks=2` but outside srun, Slurm sets SLURM_PROCID=0 and SLURM_NTASKS=2 and no job step:
    that process alone would wait forever for rank 1 (the real cluster test: tests/integration/test_slurm.py)."""
    batch = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    with pytest.raises(LaunchError, match="SLURM_NTASKS=2 but this process was not started by srun"):
        detect(batch)
    assert detect(dict(batch, SLURM_NTASKS="1")).world_size == 1  # one task: one process, nothing to wait for
