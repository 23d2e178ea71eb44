"""The ablation: train arms that differ in one setting (Pascal bias vs none, or bias.warmup_steps), compare them.

Each arm is a real `deepspeed` launch of launcher/train.py with the same config, seed (so the same initial
weights and data order) and budget, plus its own overrides, in `<out>/<arm>`. The comparison is read back
from the arms' TensorBoard events: `<out>/ablation.png` (validation loss vs step and vs wall-clock time)
and `<out>/ablation.md` (best validation loss, its perplexity, time, tokens/s). The arms' TensorBoard dirs
sit side by side, so `tensorboard --logdir <out>` overlays them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from pascal_dist.errors import UserError
from pascal_dist.train.dist_env import free_port
from pascal_dist.train.preemption import EXIT_PREEMPTED


class AblationError(UserError, RuntimeError):
    """An arm that failed or left no validation loss; the message names its log."""


@dataclass
class Arm:
    name: str
    overrides: list[str]


@dataclass
class ArmResult:
    name: str
    val: list[tuple[int, float, float]]  # (step, seconds since the run's writer opened, val loss)
    tokens_per_s: float
    theta: float | None
    overrides: list[str] = field(default_factory=list)

    @property
    def best(self) -> tuple[int, float, float]:
        return min(self.val, key=lambda r: r[2])


def backend_arms() -> list[Arm]:
    return [Arm("pascal", ["model.attention.backend=sdpa"]), Arm("none", ["model.attention.backend=none"])]


def warmup_arms(values: Sequence[int]) -> list[Arm]:
    return [Arm(f"warmup_{v}", ["model.attention.backend=sdpa", f"model.bias.warmup_steps={v}"]) for v in values]


def launch(
    arm: Arm, out: str, config: str, ds_config: str, nprocs: int, overrides: Sequence[str], timeout: float | None = None
) -> None:
    """Train one arm to its step or time budget (resuming it if <out>/<arm> holds checkpoints: a finished arm is
    a no-op); its log goes to <out>/<arm>/train.log."""
    run_dir = os.path.join(out, arm.name)
    os.makedirs(run_dir, exist_ok=True)
    # `python -m pascal_dist train` on every rank (the installed package, not a checkout's launcher/ script)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(free_port()),
        "--no_local_rank",
        "--module",
        "pascal_dist",
        "train",
        "--config",
        os.path.abspath(config),
        "--ds_config",
        os.path.abspath(ds_config),
        "--resume",
        "auto",
        *overrides,
        *arm.overrides,
        f"train.run_dir={os.path.abspath(run_dir)}",
    ]
    # one thread per rank: the ranks already fill the cores; more threads only contend
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode == EXIT_PREEMPTED:  # the wall-clock budget (train.time_limit_s) ran out: the arm is done
        print(f"[ablation] arm {arm.name} stopped by its time limit", flush=True)
    elif r.returncode != 0:
        raise AblationError(f"arm {arm.name!r} failed (exit {r.returncode}); see {run_dir}/train.log")


def read_arm(out: str, arm: Arm) -> ArmResult:
    """Validation curve, mean throughput and final theta from the arm's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, arm.name, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "val/loss" not in tags:
        raise AblationError(f"arm {arm.name!r}: no val/loss in {out}/{arm.name}/tensorboard")
    t0 = acc.FirstEventTimestamp()
    val = [(e.step, e.wall_time - t0, e.value) for e in acc.Scalars("val/loss")]
    tps = [e.value for e in acc.Scalars("tokens_per_s")] if "tokens_per_s" in tags else [float("nan")]
    theta = acc.Scalars("bias/theta")[-1].value if "bias/theta" in tags else None
    return ArmResult(arm.name, val, sum(tps) / len(tps), theta, arm.overrides)


def table(results: Sequence[ArmResult]) -> str:
    rows = [
        "| arm | overrides | best val loss | at step | val ppl | final val loss | wall time (s) | tokens/s "
        "| final theta |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        step, _, loss = r.best
        theta = "-" if r.theta is None else f"{r.theta:+.3f}"
        rows.append(
            f"| {r.name} | `{' '.join(r.overrides)}` | {loss:.4f} | {step} | {math.exp(loss):.2f} | "
            f"{r.val[-1][2]:.4f} | {r.val[-1][1]:.0f} | {r.tokens_per_s:,.0f} | {theta} |"
        )
    return "\n".join(rows)


def plot(results: Sequence[ArmResult], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for r in results:
        steps, secs, losses = zip(*r.val)
        by_step.plot(steps, losses, marker=".", label=r.name)
        by_time.plot(secs, losses, marker=".", label=r.name)
    by_step.set(xlabel="optimizer step", ylabel="validation loss (nats/token)")
    by_time.set(xlabel="wall-clock time since start (s)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def ablate(
    out: str,
    config: str,
    ds_config: str,
    arms: Sequence[Arm],
    nprocs: int = 2,
    overrides: Sequence[str] = (),
    time_limit_s: float = 0.0,
    timeout: float | None = None,
) -> str:
    """Train every arm in turn, then write <out>/ablation.png and <out>/ablation.md; returns the table."""
    budget = [*overrides, *([f"train.time_limit_s={time_limit_s}"] if time_limit_s else [])]
    started = time.time()
    for arm in arms:
        print(f"[ablation] training arm {arm.name}: {' '.join(arm.overrides)}", flush=True)
        launch(arm, out, config, ds_config, nprocs, budget, timeout)
    results = [read_arm(out, arm) for arm in arms]
    title = " vs ".join(r.name for r in results)
    plot(results, os.path.join(out, "ablation.png"), f"{title} ({os.path.basename(config)})")
    md = table(results)
    cmd = " ".join(
        ["pascal-dist ablate", "--config", config, "--ds_config", ds_config, "--nprocs", str(nprocs), *budget]
    )
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(
            f"# Ablation: {title}\n\nSame config, seed (weights, data order) and budget; arms differ only in "
            f"their overrides. `{cmd}` ({nprocs} ranks, {time.time() - started:.0f} s in all).\n\n{md}\n\n"
            "![validation loss](ablation.png)\n"
        )
    return md
