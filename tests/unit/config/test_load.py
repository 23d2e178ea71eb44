"""Config loading: every shipped YAML loads, overrides, unknown keys, bad values, ds_config cross-check."""

import glob
import json

import pytest

from pascal_dist.config import ConfigError, load_config, load_ds_config
from pascal_dist.config.schema import RunConfig


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.n_embd % cfg.model.n_head == 0


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.json")))
def test_every_shipped_ds_config_fills_in_batch_sizes(path):
    cfg = load_config("configs/demo.yaml")
    ds = load_ds_config(path, cfg, world_size=2)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.json")))
def test_shipped_ds_configs_keep_deepspeed_from_waiting_on_the_gpu(path):
    """No throughput-timer synchronizes; reductions overlap the backward only where there are other ranks."""
    cfg = load_config("configs/demo.yaml")
    shipped = json.load(open(path))["zero_optimization"]
    assert shipped.get("overlap_comm", "auto") == "auto"
    for world_size in (1, 2):
        ds = load_ds_config(path, cfg, world_size=world_size)
        assert ds["timers"] == {"throughput": {"enabled": False}}
        if "overlap_comm" in shipped:  # ZeRO-1 has no such option
            assert ds["zero_optimization"]["overlap_comm"] is (world_size > 1)


def test_a_ds_config_of_ones_own_keeps_its_timers_and_overlap(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {"timers": {"throughput": {"enabled": True}}, "zero_optimization": {"stage": 2, "overlap_comm": True}}
        )
    )
    ds = load_ds_config(str(path), load_config("configs/demo.yaml"), world_size=1)
    assert ds["timers"]["throughput"]["enabled"] is True and ds["zero_optimization"]["overlap_comm"] is True


def test_defaults_are_the_spec_recipe():
    cfg = load_config()
    m, t = cfg.model, cfg.train
    assert (m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd) == (8192, 256, 12, 12, 768)
    assert (m.bias.pascal_n, m.bias.window, m.bias.theta_init, m.bias.warmup_steps) == (3, 3, -1.5, 4000)
    assert (t.micro_batch_size, t.grad_accum, t.max_steps, t.lr) == (64, 2, 20000, 3e-4)
    assert (t.warmup_steps, t.decay_steps, t.min_lr_ratio, t.weight_decay) == (2000, 8000, 0.1, 0.1)
    assert (t.beta1, t.beta2, t.grad_clip) == (0.9, 0.95, 1.0)


def test_overrides_beat_yaml():
    cfg = load_config("configs/demo.yaml", ["train.max_steps=7", "model.attention.backend=none"])
    assert cfg.train.max_steps == 7 and cfg.model.attention.backend == "none"


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'; did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: 2\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown config key 'model.n_layers'; did you mean 'model.n_layer'"
    ):
        load_config(str(bad))


def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.max_steps'.*abc"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"model.n_embd \(128\) must be divisible by model.n_head \(3\)"):
        load_config(None, ["model.n_embd=128", "model.n_head=3"])
    with pytest.raises(ConfigError, match=r"model.attention.backend must be one of"):
        load_config(None, ["model.attention.backend=flashy"])
    # All problems at once, so one edit fixes them.
    with pytest.raises(ConfigError, match=r"train.grad_accum must be > 0, got 0; train.lr must be > 0"):
        load_config(None, ["train.lr=0", "train.grad_accum=0"])
    with pytest.raises(ConfigError, match=r"train.activation_memory_budget must be in \(0, 1\], got 1.5"):
        load_config(None, ["train.activation_memory_budget=1.5"])
    with pytest.raises(ConfigError, match="train.compile_scope must be one of blocks, model, got 'layers'"):
        load_config(None, ["train.compile_scope=layers"])
    with pytest.raises(ConfigError, match=r"not of the form key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"config file 'nope.yaml' not found"):
        load_config("nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_config(str(broken))


def test_ds_config_batch_conflict_names_both_values(tmp_path):
    cfg = load_config("configs/demo.yaml")
    ds = json.load(open("configs/zero2.json"))
    ds["train_micro_batch_size_per_gpu"] = 99
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(
        ConfigError, match=r"train_micro_batch_size_per_gpu=99 disagrees with train.micro_batch_size=16"
    ):
        load_ds_config(str(path), cfg, world_size=2)
    ds["train_micro_batch_size_per_gpu"] = 16
    ds["train_batch_size"] = 16  # right for one rank, wrong for two
    path.write_text(json.dumps(ds))
    load_ds_config(str(path), cfg, world_size=1)
    with pytest.raises(ConfigError, match=r"train_batch_size=16 disagrees with global batch .*=32"):
        load_ds_config(str(path), cfg, world_size=2)


def test_ds_config_bad_files(tmp_path):
    cfg = load_config()
    with pytest.raises(ConfigError, match=r"ds_config 'missing.json' not found"):
        load_ds_config("missing.json", cfg, 1)
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match=r"x.json: not valid JSON"):
        load_ds_config(str(p), cfg, 1)
    p.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match=r"remove 'optimizer'"):
        load_ds_config(str(p), cfg, 1)
