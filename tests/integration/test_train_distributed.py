"""End-to-end training under the real `deepspeed` launcher: 2 CPU ranks (gloo), ZeRO stages 1, 2 and 3.

Checks the loss falls, theta and the bias-warmup counter agree on both ranks at every step (the trainer
all-gathers each rank's step and the counter its model holds, and rank 0 records them in rank_sync.jsonl),
the counter the bias module actually receives in every training and evaluation forward (a probe on the
model), the TensorBoard tags read back from the event files, and a resumed run continues bitwise.
"""

import json
import os

import pytest

from tests.helpers import TINY, read_scalars, read_texts, run_torchrun, run_train

pytestmark = pytest.mark.slow

TB_TAGS = {
    "train/loss",
    "val/loss",
    "val/ppl",
    "lr",
    "bias/alpha",
    "bias/skip_penalty",
    "bias/theta",
    "grad_norm",
    "tokens_per_s",
    "step_time",
    "memory_gib",
}


def sync_rows(run_dir):
    with open(os.path.join(run_dir, "rank_sync.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls_and_ranks_agree(stage_runs, stage):
    rows = sync_rows(stage_runs[stage])
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert [rank["bias_step"] for rank in r["ranks"]] == [r["step"]] * 2, (
            "the counter in every rank's model must equal the optimizer step"
        )
        assert [rank["step"] for rank in r["ranks"]] == [r["step"]] * 2
        assert r["ranks"][0]["theta"] == r["ranks"][1]["theta"], "theta must be identical on both ranks"
    assert rows[0]["ranks"][0]["theta"] != rows[-1]["ranks"][0]["theta"], "theta must be trained"
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    val = read_scalars(stage_runs[stage], "val/loss")
    assert [s for s, _ in val] == [6, 12] and val[1][1] < val[0][1]


def test_tensorboard_tags_and_checkpoints(stage_runs):
    run_dir = stage_runs[2]
    tags = set(read_scalars(run_dir))
    assert TB_TAGS <= tags, f"missing: {TB_TAGS - tags}"
    alpha = dict(read_scalars(run_dir, "bias/alpha"))
    assert alpha[4] == pytest.approx(0.01 + 0.99 * 4 / 8) and alpha[12] == pytest.approx(1.0)
    ckpts = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert sorted(c for c in ckpts if c.startswith("step")) == ["step00000006", "step00000012"]
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        assert f.read().strip() == "step00000012"
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert "micro_batch_size: 4" in read_texts(run_dir, "config")[0][1]
    samples = read_texts(run_dir, "samples/0")  # a fixed prompt continued at every evaluation
    assert [s for s, _ in samples] == [6, 12] and all(text.strip().startswith("I think") for _, text in samples)


def test_resume_continues_step_lr_alpha_and_data(stage_runs, tiny_data, tmp_path):
    run_dir = str(tmp_path / "resumed")
    common = TINY + [f"data.dir={tiny_data}", f"train.run_dir={run_dir}"]
    first = run_train("configs/zero2.json", common + ["train.max_steps=6"])
    assert first.returncode == 0, first.stdout[-3000:]
    second = run_train("configs/zero2.json", common, resume="auto")
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resumed from step00000006 at step 6, 96 samples consumed" in second.stdout
    straight = {r["step"]: r for r in sync_rows(stage_runs[2])}
    resumed = sync_rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for r in resumed:
        ref = straight[r["step"]]
        # resumed at step 6 inside the warm-up (warmup_steps 8): the same state, data position and counter, so the
        # same losses bit for bit
        assert (r["lr"], r["alpha"], r["loss"], r["ranks"]) == (ref["lr"], ref["alpha"], ref["loss"], ref["ranks"])


@pytest.mark.parametrize("stage", [2, 3])
def test_compiled_training_follows_eager(stage_runs, tiny_data, tmp_path, stage):
    """train.compile=true (the default on a GPU; block by block) under the launcher: the same losses as the eager
    run step by step, to compiled-kernel rounding, and the checkpoint and evaluation at step 6 work compiled. ZeRO-3
    partitions every parameter here (no persistence threshold), so its gathers run inside the compiled blocks."""
    ds = json.load(open(f"configs/zero{stage}.json"))
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    run_dir = str(tmp_path / "compiled")
    proc = run_train(
        str(ds_path),
        TINY + [f"data.dir={tiny_data}", f"train.run_dir={run_dir}", "train.compile=true", "train.max_steps=6"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"ZeRO stage {stage}, compiled (blocks), step 0" in proc.stdout
    eager = {r["step"]: r for r in sync_rows(stage_runs[stage])}
    compiled = sync_rows(run_dir)
    assert [r["step"] for r in compiled] == list(range(1, 7))
    for r in compiled:
        assert r["loss"] == pytest.approx(eager[r["step"]]["loss"], abs=2e-3), r["step"]
    assert read_scalars(run_dir, "val/loss")[0][1] == pytest.approx(
        read_scalars(stage_runs[stage], "val/loss")[0][1], abs=2e-3
    )
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step00000006"))


def test_the_training_loop_waits_for_the_device_only_inside_deepspeeds_step(tiny_data, tmp_path):
    """A step of the loop (micro-batches, forwards, engine steps, the stop vote) neither reads a device value on the
    host nor synchronizes the device except inside DeepSpeed's optimizer step (its gradient-norm check): each such
    wait would stall a GPU. DeepSpeed's throughput timer, on by default, synchronized at every forward and step.
    (Logging, evaluation and saves wait, at their intervals.)"""
    results = run_torchrun(tmp_path, "loop_waits", tiny_data, str(tmp_path / "run"), *TINY)
    for r in results:
        assert len(r["inside_engine"]) == 3 * 2  # grad_accum=2 in TINY: two engine.step calls per step
        per_step = [sum(r["inside_engine"][2 * i : 2 * i + 2]) for i in range(3)]
        assert r["whole"] == per_step, r


def expected_counters(max_steps, grad_accum, eval_interval, skipped_attempts):
    """The counter the bias must see, worked out from the definition: each attempt's micro-batches run at the number
    of updates applied before it; a skipped attempt applies none; after update k an evaluation (if one is due) runs
    at t = k. Consecutive calls of one phase at one t are merged, with their count for training."""
    out, updates, attempt = [], 0, 0
    while updates < max_steps:
        if out and out[-1][:2] == ("train", updates):  # the attempt after a skipped one
            out[-1] = ("train", updates, out[-1][2] + grad_accum)
        else:
            out.append(("train", updates, grad_accum))
        if attempt not in skipped_attempts:
            updates += 1
            if updates % eval_interval == 0 or updates == max_steps:
                out.append(("eval", updates))
        attempt += 1
    return out


def merged(seen):
    """The probe's calls with consecutive calls of one phase at one t merged (counted for training)."""
    runs = []
    for phase, t in seen:
        if runs and runs[-1][:2] == [phase, t]:
            runs[-1][2] += 1
        else:
            runs.append([phase, t, 1])
    return [(p, t, n) if p == "train" else (p, t) for p, t, n in runs]


def test_the_bias_sees_the_optimizer_step_count_in_training_and_evaluation(tiny_data, tmp_path):
    """A probe on the bias module, 2 ranks, gradient accumulation 3, evaluation every 4 updates, a non-finite loss on
    rank 1 at attempt 5 (skipped on both ranks): micro-batches of update k+1 see t = k, evaluations and samples after
    update k see t = k, on every rank. Fails if the counter is not written, advances per micro-batch or counts the
    skipped attempt."""
    overrides = TINY + ["train.grad_accum=3", "train.eval_interval=4", "train.max_steps=9", "checkpoint.interval=0"]
    results = run_torchrun(tmp_path, "counter_probe", "--nan-loss", "5:1", tiny_data, str(tmp_path / "run"), *overrides)
    want = expected_counters(max_steps=9, grad_accum=3, eval_interval=4, skipped_attempts={5})
    assert ("eval", 4) in want and ("train", 5, 6) in want  # attempts 5 (skipped) and 6 both run at t = 5
    for rank, r in enumerate(results):
        assert merged(r["seen"]) == want, f"rank {rank}"
