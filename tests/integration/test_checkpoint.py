"""Checkpoints that cannot be used say why; numerical faults skip steps on every rank; export from any ZeRO stage."""

import json
import os
import shutil
import subprocess

import pytest

from pascal_dist.config.schema import TrainConfig
from pascal_dist.train.engine import lr_lambda
from tests.helpers import TINY, read_scalars, run_train

pytestmark = pytest.mark.slow
SHORT = TINY + ["checkpoint.interval=2", "checkpoint.keep_last=5"]


def run(run_dir, data, extra=(), nprocs=1, ds="configs/zero2.json", **kw):
    return run_train(ds, SHORT + [f"data.dir={data}", f"train.run_dir={run_dir}", *extra], nprocs=nprocs, **kw)


def error_line(proc):
    lines = [line for line in proc.stdout.splitlines() if "error: " in line]
    assert lines, proc.stdout[-3000:]
    return lines[0]


def latest(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


@pytest.fixture(scope="module")
def four_steps(tiny_data, tmp_path_factory):
    """A finished 1-rank run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("four")
    proc = run(run_dir, tiny_data, ["train.max_steps=4"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    return run_dir


def test_checkpoint_from_another_model_config(four_steps, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    proc = run(run_dir, tiny_data, ["train.max_steps=6", "model.n_layer=3"], resume="auto")
    assert proc.returncode == 2
    assert "saved from another model config (model.n_layer: 2 in checkpoint vs 3)" in error_line(proc)


def test_resume_on_another_biased_backend_but_not_without_the_bias(four_steps, tiny_data, tmp_path):
    """The backend and its kernels are an implementation choice (same function), except `none`, another model."""
    for backend, code in (("banded", 0), ("none", 2)):
        run_dir = tmp_path / backend
        shutil.copytree(four_steps, run_dir)
        overrides = ["train.max_steps=6", f"model.attention.backend={backend}", "model.attention.kernels=torch"]
        proc = run(run_dir, tiny_data, overrides, resume="auto")
        assert proc.returncode == code, proc.stdout[-3000:]
        if code == 0:
            assert "resumed from step00000004 at step 4" in proc.stdout
        else:
            assert (
                "saved from another model config (model.attention: {'biased': True} in checkpoint vs "
                "{'biased': False})" in error_line(proc)
            )


def test_checkpoint_from_another_tokenizer(four_steps, tiny_data, tmp_path):
    from pascal_dist.data.prepare import embedded_files, prepare

    other = tmp_path / "other_data"
    prepare(other, files=embedded_files()[3:5], vocab_size=512)
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    proc = run(run_dir, str(other), ["train.max_steps=6"], resume="auto")
    assert proc.returncode == 2
    assert "trained with another tokenizer" in error_line(proc)


def test_truncated_checkpoint_falls_back_or_names_the_file(four_steps, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    shard = next((run_dir / "checkpoints" / "step00000004").glob("*optim_states.pt"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    explicit = run(run_dir, tiny_data, ["train.max_steps=6"], resume="step00000004")
    assert explicit.returncode == 2
    assert f"file {shard.name} is truncated or changed" in error_line(explicit)
    auto = run(run_dir, tiny_data, ["train.max_steps=6"], resume="auto")
    assert auto.returncode == 0, auto.stdout[-3000:]
    assert "warning: falling back to step00000002" in auto.stdout
    assert "resumed from step00000002 at step 2" in auto.stdout
    assert latest(run_dir) == "step00000006"


def test_disk_full_while_saving_keeps_the_previous_checkpoint(four_steps, tiny_data, tmp_path):
    one_ckpt = sum(f.stat().st_size for f in (four_steps / "checkpoints" / "step00000002").rglob("*") if f.is_file())
    run_dir = tmp_path / "run"
    mount = run_dir / "checkpoints"
    mount.mkdir(parents=True)
    size_kib = int(one_ckpt * 1.6) // 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        proc = run(run_dir, tiny_data, ["train.max_steps=4"])
        assert proc.returncode != 0
        line = error_line(proc)
        assert "saving checkpoint" in line and "step00000004" in line and "step00000002) is untouched" in line
        assert latest(run_dir) == "step00000002"
        copy = tmp_path / "copy"
        shutil.copytree(run_dir, copy)
    finally:
        subprocess.run(["umount", str(mount)])
    resumed = run(copy, tiny_data, ["train.max_steps=4"], resume="auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from step00000002 at step 2" in resumed.stdout


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_non_finite_loss_on_one_rank_skips_the_step_everywhere(tiny_data, tmp_path, stage):
    """Under the installed DeepSpeed (bf16), a NaN loss on rank 1 alone skips that step on both ranks: the weights,
    the LR schedule and the bias-warmup counter do not move, and training goes on with finite values."""
    proc = run(
        tmp_path,
        tiny_data,
        ["train.max_steps=6"],
        nprocs=2,
        ds=f"configs/zero{stage}.json",
        faults=("--nan-loss", "3:1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "warning: step 4 skipped (non-finite loss or gradient), 1 in a row, 1 in total" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "rank_sync.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    factor = lr_lambda(TrainConfig(warmup_steps=2, decay_steps=12))
    for r in rows:
        assert r["ranks"][0] == r["ranks"][1] and r["ranks"][0]["bias_step"] == r["step"]
        assert r["lr"] == pytest.approx(3e-3 * factor(r["step"]))  # the scheduler did not advance on the skip
        assert r["loss"] == r["loss"]  # no NaN reached the logged mean: the skipped step is not counted
        assert r["ranks"][0]["theta"] == r["ranks"][0]["theta"]  # no NaN reached the weights
    assert read_scalars(tmp_path, "train/skipped_steps") == [(3, 1.0)]


def test_consecutive_non_finite_steps_stop_with_last_good_checkpoint(tiny_data, tmp_path):
    proc = run(
        tmp_path,
        tiny_data,
        ["train.max_steps=8", "train.max_bad_steps=3", "checkpoint.interval=100"],
        nprocs=2,
        faults=("--nan-loss", "2:0", "--nan-loss", "3:0", "--nan-loss", "4:0"),
    )
    assert proc.returncode == 3, proc.stdout[-3000:]
    assert "3 consecutive steps had a non-finite loss or gradient; last good state saved as step00000002" in proc.stdout
    assert latest(tmp_path) == "step00000002"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_export_from_each_zero_stage_loads_without_deepspeed(stage_runs, tmp_path, stage):
    out = tmp_path / "exported"
    proc = subprocess.run(["python", "launcher/export.py", stage_runs[stage], str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["config.yaml", "export.json", "model.safetensors", "tokenizer.json"]
    final = [json.loads(line) for line in open(os.path.join(stage_runs[stage], "rank_sync.jsonl"))][-1]
    check = (
        "import sys, json, torch; sys.modules['deepspeed'] = None\n"
        "from pascal_dist.eval.export import load_exported\n"
        f"m, cfg, tok = load_exported({str(out)!r})\n"
        "ids = torch.tensor([tok.encode('To be, or not to be, that is the question').ids])\n"
        "print(json.dumps({'theta': float(m.bias.theta), 'step': int(m.bias_step),"
        " 'loss': float(m(ids[:, :-1], ids[:, 1:])[1])}))"
    )
    loaded = subprocess.run(["python", "-c", check], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    got = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert got["theta"] == final["ranks"][0]["theta"]  # the fp32 master value, bit for bit
    assert got["step"] == 12 and got["loss"] < 6.0


def test_export_refuses_non_empty_output_and_non_checkpoints(stage_runs, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    proc = subprocess.run(
        ["python", "launcher/export.py", stage_runs[2], str(tmp_path / "full")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    proc = subprocess.run(
        ["python", "launcher/export.py", str(tmp_path), str(tmp_path / "x")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "is not a pascal-dist checkpoint" in proc.stderr
