"""Shared test helpers: launching real multi-process runs and reading TensorBoard event files back."""

import os
import subprocess
import sys

from pascal_dist.train.dist_env import free_port  # noqa: F401  (tests import it from here)

# A model small enough that a 2-rank CPU launch trains 12 steps in seconds (vocab of the tiny_data fixture).
TINY = [
    "model.vocab_size=512",
    "model.block_size=32",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.dropout=0.0",
    "model.attn_dropout=0.0",
    "model.bias.warmup_steps=8",
    "train.micro_batch_size=4",
    "train.grad_accum=2",
    "train.max_steps=12",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.decay_steps=12",
    "train.eval_interval=6",
    "train.eval_batches=2",
    "logging.log_interval=1",
    "checkpoint.interval=6",
    "checkpoint.keep_last=2",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One process, one layer: a run that trains a few steps in seconds without any launcher (vocab of tiny_data).
ONE_PROCESS = [
    "model.vocab_size=512",
    "model.block_size=32",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "train.micro_batch_size=2",
    "train.grad_accum=1",
    "train.max_steps=2",
    "train.eval_interval=2",
    "train.eval_batches=1",
    "logging.log_interval=1",
]


def run_python(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python ARGS` from the checkout in a fresh process, as a user starts it: no launcher's rank variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, text=True, capture_output=True, timeout=timeout)


def train_command(ds_config: str, nprocs: int = 2, resume: str = "never", faults: tuple[str, ...] = ()) -> list[str]:
    """`deepspeed --num_gpus N launcher/train.py ...`; with `faults` (tests.integration.workers.faults flags, e.g.
    ("--nan-loss", "3:1")), the fault-injecting entry point runs in place of launcher/train.py."""
    launcher = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(free_port()),
    ]
    entry = ["--module", "tests.integration.workers.faults", *faults] if faults else ["launcher/train.py"]
    return launcher + entry + ["--ds_config", ds_config, "--resume", resume]


def run_train(
    ds_config: str,
    overrides: list[str],
    nprocs: int = 2,
    resume: str = "never",
    config: str | None = None,
    timeout: int = 300,
    faults: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """A real multi-rank training run on CPU (train_command); stdout and stderr together in .stdout."""
    cmd = train_command(ds_config, nprocs, resume, faults)
    cmd += ["--config", config] if config else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        cmd + overrides, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def run_torchrun(tmp_path, worker: str, *args: str, nprocs: int = 2) -> list[dict]:
    """Run the worker module tests.integration.workers.<worker> on `nprocs` ranks with torchrun (gloo on CPU).
    Returns the dicts its ranks reported, in rank order."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, RESULT_DIR=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nprocs),
            "--master_port",
            str(free_port()),
            "-m",
            f"tests.integration.workers.{worker}",
            *args,
        ],
        cwd=REPO,
        text=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = []
    for rank in range(nprocs):
        with open(os.path.join(tmp_path, f"{rank}.json")) as f:
            results.append(json.load(f))
    return results


def read_scalars(run_dir: str, tag: str | None = None):
    """All scalar tags of a run's TensorBoard events, or one tag's (step, value) list."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag is None:
        return acc.Tags()["scalars"]
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def read_texts(run_dir: str, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a TensorBoard text tag, e.g. 'samples/0'."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


# Triton's CPU interpreter before 3.9 turns tensor loop bounds into Python ints in a way NumPy 2 refuses (seen
# with 3.5 and 3.6); with NumPy 1, 3.6's runs the fused kernels.
FUSED_INTERPRETER_FROM = (3, 9)


def triton_cannot_run(interpreter_from: tuple[int, int] | None = None) -> str | None:
    """Why this machine cannot run the kernels of a module (None if it can): no Triton, or no CUDA and an
    interpreter older than `interpreter_from` under NumPy 2."""
    import numpy
    import torch

    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    old = tuple(map(int, triton.__version__.split(".")[:2])) < (interpreter_from or (0, 0))
    if old and int(numpy.__version__.split(".")[0]) >= 2 and not torch.cuda.is_available():
        since = ".".join(map(str, interpreter_from))
        return f"Triton {triton.__version__}'s interpreter cannot run these kernels under NumPy 2 ({since}+ can)"
    return None


def require_triton(interpreter_from: tuple[int, int] | None = None):
    """Triton for a kernel test module, else skip the module; under CI=true (where `.[dev]` installs it) a missing
    or too old Triton fails instead, since a skip there would hide the kernels from every check.

    interpreter_from: the oldest Triton whose CPU interpreter runs the module's kernels (used only without CUDA).
    """
    import pytest

    reason = triton_cannot_run(interpreter_from)
    if reason is not None:
        if os.environ.get("CI") == "true":
            raise ImportError(reason)
        pytest.skip(reason, allow_module_level=True)
    import triton

    return triton
