"""The command line: every subcommand listed, bad input to each answered with one `error:` line and exit code 2
(launcher/train.py's cases in a real process, nothing overwritten), overrides anywhere among the flags."""

import os

import pytest

from tests.helpers import ONE_PROCESS, run_python

TINY = ONE_PROCESS


def train(*args, timeout=180):
    return run_python("launcher/train.py", *args, timeout=timeout)


def assert_one_line_error(proc, pattern):
    import re

    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr[-2000:]


def test_unknown_key_suggests(tmp_path):
    proc = train("--ds_config", "configs/zero2.json", "train.max_step=3")
    assert_one_line_error(proc, r"unknown config key 'train.max_step'; did you mean 'train.max_steps'")


def test_missing_config_and_ds_config():
    assert_one_line_error(train("--config", "configs/nope.yaml"), r"config file 'configs/nope.yaml' not found")
    assert_one_line_error(train("--ds_config", "configs/nope.json"), r"ds_config 'configs/nope.json' not found")


def test_ds_config_batch_conflict(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}')
    proc = train("--ds_config", str(ds), "train.micro_batch_size=4")
    assert_one_line_error(proc, r"ds.json: train_micro_batch_size_per_gpu=8 disagrees with train.micro_batch_size=4")


def test_missing_data_dir(tmp_path):
    proc = train(
        "--ds_config", "configs/zero2.json", f"data.dir={tmp_path}/absent", f"train.run_dir={tmp_path}/run", *TINY
    )
    assert_one_line_error(proc, r"absent.*manifest")


def test_vocab_mismatch_names_both_values(tiny_data, tmp_path):
    proc = train(
        "--ds_config",
        "configs/zero2.json",
        f"data.dir={tiny_data}",
        f"train.run_dir={tmp_path}/run",
        *TINY,
        "model.vocab_size=1000",
    )
    assert_one_line_error(proc, r"vocab_size 512 != model vocab_size 1000")


def test_run_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should go")
    assert_one_line_error(train(f"train.run_dir={blocker}/run"), r"train.run_dir '.*file/run' is not writable")
    assert blocker.read_text().startswith("a file")


def test_existing_checkpoints_need_resume_and_are_kept(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["--ds_config", "configs/zero2.json", f"data.dir={tiny_data}", f"train.run_dir={run}", *TINY]
    first = train(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(os.listdir(run / "checkpoints"))
    assert_one_line_error(train(*args), r"already holds checkpoints; pass --resume auto")
    assert sorted(os.listdir(run / "checkpoints")) == before


def pascal_dist(*args, timeout=120):
    """`python -m pascal_dist ...` in a fresh process, as a user types it."""
    return run_python("-m", "pascal_dist", *args, timeout=timeout)


def test_help_lists_the_six_subcommands():
    proc = pascal_dist("--help")
    assert proc.returncode == 0
    for command in ("prepare", "train", "evaluate", "generate", "export", "ablate"):
        assert f"    {command} " in proc.stdout, command


BAD_INPUT = {
    "no subcommand": ([], r"pascal-dist: the following arguments are required"),
    "unknown subcommand": (["frobnicate"], r"invalid choice: 'frobnicate'"),
    "prepare": (["prepare", "--files", "nope.txt", "--out", "{tmp}/out"], r"nope.txt: file not found"),
    "train": (["train", "--config", "{tmp}/nope.yaml"], r"config file '.*nope.yaml' not found"),
    "evaluate": (["evaluate", "{tmp}/nope"], r"nope'?: no such directory"),
    "generate": (["generate", "{tmp}", "--top-p", "2"], r"--top-p 2.0: expected"),
    "export": (["export", "{tmp}", "{tmp}/out"], r"is not a pascal-dist checkpoint"),
    "ablate": (["ablate", "--config", "{tmp}/nope.yaml"], r"--config .*nope.yaml: file not found"),
    "ablate without its baseline arm": (["ablate", "--arms", "pascal,learned"], r"--arms 'pascal,learned': expected"),
    "a flag it does not know": (["export", "--frob", "a", "b"], r"unrecognized arguments: --frob"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_to_each_subcommand_is_one_error_line_and_exit_2(case, tmp_path):
    args, pattern = BAD_INPUT[case]
    before = sorted(os.listdir(tmp_path))
    assert_one_line_error(pascal_dist(*(a.format(tmp=tmp_path) for a in args)), pattern)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_overrides_may_stand_anywhere_among_the_flags():
    from pascal_dist.cli import parse

    args = parse(["train", "--config", "C", "train.run_dir=R", "--resume", "auto", "model.n_layer=3"])
    assert (args.config, args.resume, args.overrides) == ("C", "auto", ["train.run_dir=R", "model.n_layer=3"])
