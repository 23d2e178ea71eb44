"""Shared test helpers: launching real multi-process runs and reading TensorBoard event files back."""
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(ds_config: str, overrides: list[str], nprocs: int = 2, resume: str = "never",
              config: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N launcher/train.py ...` on CPU; stdout and stderr together in .stdout."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
                "--master_port", str(free_port())]
    cmd = launcher + ["launcher/train.py", "--ds_config", ds_config, "--resume", resume]
    cmd += ["--config", config] if config else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd + overrides, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def read_scalars(run_dir: str, tag: str | None = None):
    """All scalar tags of a run's TensorBoard events, or one tag's (step, value) list."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag is None:
        return acc.Tags()["scalars"]
    return [(e.step, e.value) for e in acc.Scalars(tag)]
