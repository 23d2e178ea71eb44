"""The ablation: arms that differ in one setting, each trained on several seeds, compared with paired intervals.

Every (arm, seed) is a real `deepspeed` launch of `pascal-dist train` with the same config and budget plus the
arm's overrides and `train.seed=<seed>`, in `<out>/<arm>/seed<seed>`. A seed fixes the initial weights and the data
order, and every arm of a seed shares them (a paired design: the arms' bias modules draw no random numbers, so
the rest of the model starts identical), so the difference between two arms on one seed is free of the
between-seed spread. After training, each run's final checkpoint is scored on the whole held-out split (sliding
window; nats per token and perplexity per word), and `<out>/summary.json`, `<out>/ablation.md` and
`<out>/ablation.png` (mean validation curve of each arm with its spread) and `<out>/theta.png` land next to the
runs. The statistics (`summarize`) are plain functions, tested against a hand-computed example.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from pascal_dist.errors import UserError
from pascal_dist.train.dist_env import free_port
from pascal_dist.train.preemption import EXIT_PREEMPTED

CONFIDENCE = 0.95  # the paired intervals' level


class AblationError(UserError, RuntimeError):
    """An arm that failed or left no validation loss; the message names its log."""


@dataclass
class Arm:
    name: str
    overrides: list[str]


def backend_arms() -> list[Arm]:
    """Pascal vs a learned band of the same diagonals (locality without the pyramid) vs no bias; `none` is the
    baseline the others are compared with."""
    return [
        Arm("pascal", ["model.attention.backend=sdpa", "model.bias.kind=pascal"]),
        Arm("learned", ["model.attention.backend=sdpa", "model.bias.kind=learned"]),
        Arm("none", ["model.attention.backend=none"]),
    ]


def warmup_arms(values: Sequence[int]) -> list[Arm]:
    """The Pascal model at each bias.warmup_steps; the first value is the baseline."""
    return [
        Arm(f"warmup_{v}", ["model.attention.backend=sdpa", "model.bias.kind=pascal", f"model.bias.warmup_steps={v}"])
        for v in values
    ]


def run_dir(out: str, arm: Arm, seed: int) -> str:
    return os.path.join(out, arm.name, f"seed{seed}")


def launch(
    arm: Arm,
    seed: int,
    out: str,
    config: str,
    ds_config: str,
    nprocs: int,
    overrides: Sequence[str],
    timeout: float | None = None,
) -> None:
    """Train one (arm, seed) to its step or time budget (resuming it if its run dir holds checkpoints: a finished
    run is a no-op); its log goes to <run dir>/train.log."""
    directory = run_dir(out, arm, seed)
    os.makedirs(directory, exist_ok=True)
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
        f"train.seed={seed}",
        f"train.run_dir={os.path.abspath(directory)}",
    ]
    # one thread per rank: the ranks already fill the cores; more threads only contend
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    with open(os.path.join(directory, "train.log"), "w") as log:
        r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode == EXIT_PREEMPTED:  # the wall-clock budget (train.time_limit_s) ran out: the run is done
        print(f"[ablation] {arm.name} seed {seed} stopped by its time limit", flush=True)
    elif r.returncode != 0:
        raise AblationError(f"{arm.name} seed {seed} failed (exit {r.returncode}); see {directory}/train.log")


def read_curves(directory: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of val/loss and of the bias's scalars from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(directory, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if "val/loss" not in tags:
        raise AblationError(f"{directory}: no val/loss in its tensorboard events")
    wanted = [t for t in tags if t == "val/loss" or t.startswith("bias/") or t == "tokens_per_s"]
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in wanted}


def heldout_score(directory: str) -> dict[str, float]:
    """The run's final checkpoint on the whole held-out split: sliding window (stride block_size // 2)."""
    import torch

    from pascal_dist.eval.evaluate import EvalRequest, evaluate

    out = evaluate(EvalRequest(model=directory, heldout=True), rank=0, world_size=1, device=torch.device("cpu"))
    (split,) = out["results"].values()
    return {k: split[k] for k in ("nll_per_token", "ppl_word", "ppl_token", "tokens", "words")} | {"step": out["step"]}


def t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, dof))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def paired_interval(arm: Sequence[float], baseline: Sequence[float], level: float = CONFIDENCE) -> dict:
    """Mean of the per-seed differences arm - baseline with its t interval (n - 1 degrees of freedom)."""
    if len(arm) != len(baseline):
        raise ValueError(f"paired samples of different sizes: {len(arm)} vs {len(baseline)}")
    diffs = [a - b for a, b in zip(arm, baseline)]
    mean, sd = mean_sd(diffs)
    n = len(diffs)
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "level": level}


def summarize(finals: dict[str, dict[int, dict[str, float]]], baseline: str) -> dict:
    """Per arm: n, mean and sd of the held-out nats/token and perplexity per word; per other arm: the paired
    difference to `baseline` over the seeds both ran (negative = better than the baseline), with its interval."""
    summary: dict = {"baseline": baseline, "level": CONFIDENCE, "arms": {}}
    for arm, by_seed in finals.items():
        seeds = sorted(by_seed)
        row: dict = {"seeds": seeds}
        for metric in ("nll_per_token", "ppl_word"):
            mean, sd = mean_sd([by_seed[s][metric] for s in seeds])
            row[metric] = {"mean": mean, "sd": sd}
        if arm != baseline:
            shared = [s for s in seeds if s in finals[baseline]]
            row["vs_baseline"] = {
                metric: paired_interval(
                    [by_seed[s][metric] for s in shared], [finals[baseline][s][metric] for s in shared]
                )
                for metric in ("nll_per_token", "ppl_word")
            }
        summary["arms"][arm] = row
    return summary


def verdict(interval: dict) -> str:
    if not interval["low"] < 0 < interval["high"]:
        return "better than the baseline" if interval["high"] < 0 else "worse than the baseline"
    return "no significant difference"


def table(summary: dict) -> str:
    level = f"{summary['level']:.0%}"
    rows = [
        f"| arm | seeds | held-out nats/token, mean ± sd | ppl/word, mean ± sd | vs {summary['baseline']}: paired "
        f"Δ nats/token [{level} CI] | Δ ppl/word [{level} CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in summary["arms"].items():
        nll, ppl = row["nll_per_token"], row["ppl_word"]
        cells = [
            f"{arm}",
            f"{len(row['seeds'])}",
            f"{nll['mean']:.4f} ± {nll['sd']:.4f}",
            f"{ppl['mean']:.2f} ± {ppl['sd']:.2f}",
        ]
        if "vs_baseline" in row:
            d, w = row["vs_baseline"]["nll_per_token"], row["vs_baseline"]["ppl_word"]
            cells += [
                f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]",
                f"{w['mean']:+.2f} [{w['low']:+.2f}, {w['high']:+.2f}]",
                verdict(d),
            ]
        else:
            cells += ["(baseline)", "", ""]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_curves(curves: dict[str, dict[int, dict]], tag: str, path: str, ylabel: str, title: str) -> None:
    """Each arm's mean of `tag` over its seeds against the step, shaded ± one sd (arms without the tag skipped)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for arm, by_seed in curves.items():
        series = [dict(c[tag]) for c in by_seed.values() if tag in c]
        if not series:
            continue
        steps = sorted(set.intersection(*(set(s) for s in series)))
        values = np.array([[s[k] for k in steps] for s in series])
        mean, sd = values.mean(0), values.std(0, ddof=1) if len(series) > 1 else np.zeros(len(steps))
        ax.plot(steps, mean, marker=".", label=f"{arm} (n={len(series)})")
        ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def ablate(
    out: str,
    config: str,
    ds_config: str,
    arms: Sequence[Arm],
    seeds: Sequence[int] = (1,),
    nprocs: int = 2,
    overrides: Sequence[str] = (),
    time_limit_s: float = 0.0,
    baseline: str | None = None,
    timeout: float | None = None,
    arms_flag: str = "",
) -> str:
    """Train every (arm, seed), score each on the held-out split, write the summary, table and plots; returns the
    table. `baseline` defaults to the last arm (`none` in backend_arms) for the backend ablation. `arms_flag`: the
    command line's choice of arms (`--arms ...` or `--sweep-warmup ...`), recorded in the command that reproduces
    the results."""
    budget = [*overrides, *([f"train.time_limit_s={time_limit_s}"] if time_limit_s else [])]
    baseline = baseline or arms[-1].name
    started = time.time()
    finals: dict[str, dict[int, dict]] = {a.name: {} for a in arms}
    curves: dict[str, dict[int, dict]] = {a.name: {} for a in arms}
    for seed in seeds:  # seed-major: an interrupted ablation has every arm of its first seeds
        for arm in arms:
            print(f"[ablation] {arm.name} seed {seed}: {' '.join(arm.overrides)}", flush=True)
            launch(arm, seed, out, config, ds_config, nprocs, budget, timeout)
            directory = run_dir(out, arm, seed)
            curves[arm.name][seed] = read_curves(directory)
            finals[arm.name][seed] = heldout_score(directory)
    summary = summarize(finals, baseline)
    command = " ".join(
        ["pascal-dist ablate", "--config", config, "--ds_config", ds_config, "--nprocs", str(nprocs)]
        + ["--seeds", ",".join(map(str, seeds)), *([arms_flag] if arms_flag else []), *budget]
    )
    summary.update(
        command=command,
        arms_overrides={a.name: a.overrides for a in arms},
        finals=finals,
        final_bias={
            arm: {seed: {t: c[-1][1] for t, c in run.items() if t.startswith("bias/")} for seed, run in by.items()}
            for arm, by in curves.items()
        },
        seconds=time.time() - started,
    )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    title = " vs ".join(a.name for a in arms)
    plot_curves(curves, "val/loss", os.path.join(out, "ablation.png"), "validation loss (nats/token)", title)
    plot_curves(curves, "bias/theta", os.path.join(out, "theta.png"), "theta", "theta across seeds")
    md = table(summary)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(
            f"# Ablation: {title}\n\n`{command}`: {len(seeds)} seeds x {len(arms)} arms, {nprocs} ranks each, "
            f"{summary['seconds']:.0f} s in all. A seed fixes the initial weights and the data order, shared by the "
            "arms (paired); scores are the final checkpoint on the whole held-out split (sliding window). "
            f"Intervals: {CONFIDENCE:.0%}, t distribution with n - 1 degrees of freedom, of the per-seed "
            f"differences to `{baseline}` (negative = lower loss than the baseline).\n\n{md}\n\n"
            "![validation loss](ablation.png)\n\n![theta](theta.png)\n"
        )
    return md
