"""Bad input across every command: exit code 2, one `error:` line naming the file, key or value, and nothing on
disk changed (every existing file of the data dirs, run dir, checkpoints, export and results hashed before and
after each case).

The world the cases run against is built once: a prepared data dir, a finished 1-rank run with two checkpoints,
its export and an evaluation result, plus damaged copies of the data dir. Each case is a real process, as a user
starts it (`python launcher/<script>.py` or `python -m pascal_dist`).
"""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from pascal_dist.data.shards import HEADER_SIZE, read_manifest
from tests.helpers import ONE_PROCESS, run_python

pytestmark = pytest.mark.slow

# ONE_PROCESS with two checkpoints (steps 2 and 4) and no compiling (a GPU would compile by default)
TINY = [o for o in ONE_PROCESS if not o.startswith("train.max_steps")] + [
    "train.max_steps=4",
    "checkpoint.interval=2",
    "train.compile=false",
]


def first_train_shard(data_dir: str) -> str:
    return os.path.join(data_dir, read_manifest(data_dir)["splits"]["train"][0]["file"])


def damage(path: str, every: int, value=None) -> None:
    """Overwrite every `every`-th token of a shard in place (header, size and manifest untouched): with `value`, or
    else with the next id below the vocabulary (a damage only the checksum can see)."""
    tokens = np.fromfile(path, dtype="<u2", offset=HEADER_SIZE)
    tokens[::every] = value if value is not None else (tokens[::every] + 1) % 512
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(tokens.tobytes())


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    run = root / "run"
    trained = run_python("launcher/train.py", *TINY, f"data.dir={data}", f"train.run_dir={run}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = run_python("-m", "pascal_dist", "export", str(run), str(root / "export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    evaluated = run_python("-m", "pascal_dist", "evaluate", str(root / "export"), "--limit", "500")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    for name, value in (("beyond_vocab", 60000), ("below_vocab", None)):
        shutil.copytree(data, root / name)
        damage(first_train_shard(str(root / name)), every=50, value=value)
    (root / "ds_optimizer.json").write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    (root / "ds_decoupled.json").write_text(json.dumps({"checkpoint": {"writer": {"decoupled": True}}}))
    (root / "ds_datastates.json").write_text(json.dumps({"datastates_ckpt": {"host_cache_size": 1}}))
    (root / "ds_batch.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    (root / "full").mkdir()
    (root / "full" / "mine.txt").write_text("someone's file")
    return root


def train(*args):
    return ("launcher/train.py", "--ds_config", "configs/zero2.json", *TINY, *args)


def pd(*args):
    return ("-m", "pascal_dist", *args)


# case: (command line with {w} = the world, what the one error line must say)
CASES = {
    "train: unknown key": (train("train.max_step=3"), r"unknown config key 'train.max_step'; did you mean"),
    "train: value of the wrong type": (train("train.lr=fast"), r"bad value for 'train.lr'"),
    "train: inconsistent values": (train("model.n_head=5"), r"model.n_embd \(32\) must be divisible by model.n_head"),
    "train: override without =": (train("train.max_steps"), r"'train.max_steps' is not of the form key=value"),
    "train: missing config file": (train("--config", "{w}/nope.yaml"), r"config file '.*nope.yaml' not found"),
    "train: missing ds_config": (
        ("launcher/train.py", "--ds_config", "{w}/nope.json"),
        r"ds_config '.*nope.json' not found",
    ),
    "train: ds_config defines the optimizer": (
        ("launcher/train.py", "--ds_config", "{w}/ds_optimizer.json", "train.run_dir={w}/new"),
        r"ds_optimizer.json: remove 'optimizer'",
    ),
    "train: ds_config with a background checkpoint writer": (
        ("launcher/train.py", "--ds_config", "{w}/ds_decoupled.json", "train.run_dir={w}/new"),
        r"ds_decoupled.json: checkpoint.writer.decoupled=true",
    ),
    "train: ds_config with DataStates checkpoints": (
        ("launcher/train.py", "--ds_config", "{w}/ds_datastates.json", "train.run_dir={w}/new"),
        r"ds_datastates.json: datastates_ckpt writes checkpoints asynchronously",
    ),
    "train: ds_config contradicts the batch": (
        ("launcher/train.py", "--ds_config", "{w}/ds_batch.json", *TINY, "train.run_dir={w}/new"),
        r"train_micro_batch_size_per_gpu=8 disagrees with train.micro_batch_size=2",
    ),
    "train: no data dir": (train("data.dir={w}/absent", "train.run_dir={w}/new"), r"absent/manifest.json: no manifest"),
    "train: vocabulary mismatch": (
        train("data.dir={w}/data", "train.run_dir={w}/new", "model.vocab_size=1000"),
        r"vocab_size 512 != model vocab_size 1000",
    ),
    "train: run dir with checkpoints, no --resume": (
        train("data.dir={w}/data", "train.run_dir={w}/run"),
        r"already holds checkpoints; pass --resume auto",
    ),
    "train: --resume of a tag that does not exist": (
        train("data.dir={w}/data", "train.run_dir={w}/run", "--resume", "step00000777"),
        r"no checkpoint 'step00000777' in .*checkpoints; available: step00000002, step00000004",
    ),
    "train: resume with another model": (
        train("data.dir={w}/data", "train.run_dir={w}/run", "--resume", "auto", "model.n_layer=2"),
        r"saved from another model config \(model.n_layer: 1 in checkpoint vs 2\)",
    ),
    "train: a dense mask that cannot be allocated": (
        train("data.dir={w}/data", "train.run_dir={w}/new", "model.block_size=100000"),
        r"model.block_size=100000: attention backend 'sdpa' builds a 100000 x 100000 mask .*use .*banded",
    ),
    "train: token ids beyond the vocabulary": (
        train("data.dir={w}/beyond_vocab", "train.run_dir={w}/new"),
        r"train_00000.bin: token \d+ is id 60000, not below vocab_size 512",
    ),
    "train: data.verify finds a damaged shard": (
        train("data.dir={w}/below_vocab", "train.run_dir={w}/new", "data.verify=true"),
        r"train_00000.bin: sha256 of the tokens is",
    ),
    "prepare: missing input file": (
        pd("prepare", "--files", "{w}/nope.txt", "--out", "{w}/new"),
        r"nope.txt: file not found",
    ),
    "prepare: output dir holds other files": (
        pd("prepare", "--files", "{w}/full/mine.txt", "--out", "{w}/full"),
        r"full: exists, is not empty and has no manifest.json",
    ),
    "prepare: validation fraction out of range": (
        pd("prepare", "--val-fraction", "1.5", "--out", "{w}/new"),
        r"val_fraction=1.5, expected 0 <= val_fraction < 1",
    ),
    "prepare --verify: an id beyond the vocabulary": (
        pd("prepare", "--verify", "{w}/beyond_vocab"),
        r"train_00000.bin: token 0 is id 60000, not below vocab_size 512",
    ),
    "prepare --verify: a damaged id below the vocabulary": (
        pd("prepare", "--verify", "{w}/below_vocab"),
        r"train_00000.bin: sha256 of the tokens is",
    ),
    "prepare --verify: not a data dir": (pd("prepare", "--verify", "{w}/full"), r"full/manifest.json: no manifest"),
    "evaluate: no such model": (pd("evaluate", "{w}/nope"), r"'.*nope': no such directory"),
    "evaluate: stride beyond the block": (pd("evaluate", "{w}/export", "--stride", "99"), r"stride=99, expected"),
    "evaluate: batch size 0": (pd("evaluate", "{w}/export", "--batch-size", "0"), r"--batch-size 0: expected >= 1"),
    "evaluate: held-out data dir missing": (
        pd("evaluate", "{w}/export", "--data-dir", "{w}/absent"),
        r"absent/manifest.json: no manifest",
    ),
    "generate: top-p out of range": (pd("generate", "{w}/export", "--top-p", "2"), r"--top-p 2.0: expected"),
    "generate: not a model": (pd("generate", "{w}/full"), r"full' is not a pascal-dist checkpoint"),
    "export: output dir not empty": (pd("export", "{w}/run", "{w}/full"), r"output directory '.*full' is not empty"),
    "export: not a checkpoint": (pd("export", "{w}/data", "{w}/new"), r"data' is not a pascal-dist checkpoint"),
    "ablate: missing config": (pd("ablate", "--config", "{w}/nope.yaml"), r"--config .*nope.yaml: file not found"),
    "ablate: bad sweep": (pd("ablate", "--sweep-warmup", "0,x", "--out", "{w}/new"), r"--sweep-warmup '0,x'"),
    "pascal-dist: unknown subcommand": (pd("frobnicate"), r"invalid choice: 'frobnicate'"),
}


def snapshot(root) -> dict[str, str]:
    """sha256 of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(world, case):
    args, pattern = CASES[case]
    before = snapshot(world)
    proc = run_python(*(a.format(w=world) for a in args))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    print(f"\n| {case} | `{errors[0] if errors else proc.stderr[-300:]}` |")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    after = snapshot(world)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing file changed or vanished"
    shutil.rmtree(world / "new", ignore_errors=True)  # a new run dir a refused run may have created, empty
