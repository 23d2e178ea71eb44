"""Run configuration: YAML + `key=value` overrides over the typed schema, validation, ds_config cross-check.

Precedence: schema defaults (the SPEC recipe) < YAML file < command-line overrides. Every problem is a
`ConfigError` whose one-line message names the file or key and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pascal_dist.schema import RunConfig

ATTENTION_BACKENDS = ("reference", "sdpa", "none", "banded", "fused")
COMPILE_SCOPES = ("blocks", "model")  # train.compile_scope


class ConfigError(ValueError):
    """A configuration the run cannot honour; the message says which key and why."""


def _schema_keys(cls: type) -> dict[str, Any]:
    """Nested {field: sub-schema class or None} for a dataclass schema."""
    keys = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys[f.name] = type(default) if dataclasses.is_dataclass(default) else None
    return keys


def _check_keys(node: Any, schema: type, prefix: str, origin: str) -> None:
    """Reject unknown keys with the closest valid one, before OmegaConf's less helpful error."""
    if not isinstance(node, dict):
        raise ConfigError(f"{origin}: '{prefix.rstrip('.') or '<root>'}' must be a mapping of keys, got {node!r}")
    valid = _schema_keys(schema)
    for key, value in node.items():
        if key not in valid:
            full = [prefix + k for k in valid]
            close = difflib.get_close_matches(prefix + str(key), full, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(sorted(valid))}"
            raise ConfigError(f"{origin}: unknown config key '{prefix}{key}'{hint}")
        if valid[key] is not None and value is not None:
            _check_keys(value, valid[key], f"{prefix}{key}.", origin)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Schema defaults, then the YAML at `path`, then `key=value` overrides; validated."""
    merged = OmegaConf.structured(RunConfig)
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' not found (expected a YAML file, e.g. configs/demo.yaml)")
        try:
            layers.append((path, OmegaConf.load(path)))
        except Exception as e:  # yaml.YAMLError and friends: report, don't trace
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for origin, layer in layers:
        container = OmegaConf.to_container(layer, resolve=False) or {}
        _check_keys(container, RunConfig, "", origin)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or "?"
            msg = str(e).splitlines()[0]
            raise ConfigError(f"{origin}: bad value for '{key}': {msg}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Collect every inconsistency, then raise them together so one edit fixes them all."""
    problems: list[str] = []
    m, t = cfg.model, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        need(getattr(m, key) > 0, f"model.{key} must be > 0, got {getattr(m, key)}")
    need(m.n_head > 0 and m.n_embd % m.n_head == 0,
         f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    need(0.0 <= m.attn_dropout < 1.0, f"model.attn_dropout must be in [0, 1), got {m.attn_dropout}")
    need(m.attention.backend in ATTENTION_BACKENDS,
         f"model.attention.backend must be one of {', '.join(ATTENTION_BACKENDS)}, got '{m.attention.backend}'")
    need(m.bias.pascal_n >= 1, f"model.bias.pascal_n must be >= 1, got {m.bias.pascal_n}")
    need(1 <= m.bias.window <= m.bias.pascal_n + 1,
         f"model.bias.window must be in [1, pascal_n + 1 = {m.bias.pascal_n + 1}], got {m.bias.window}")
    need(m.bias.warmup_steps >= 0, f"model.bias.warmup_steps must be >= 0, got {m.bias.warmup_steps}")
    for key in ("micro_batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches"):
        need(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    need(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(0 <= t.warmup_steps <= t.decay_steps,
         f"train.warmup_steps ({t.warmup_steps}) must be between 0 and train.decay_steps ({t.decay_steps})")
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    need(t.compile_scope in COMPILE_SCOPES,
         f"train.compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got '{t.compile_scope}'")
    need(0 < t.activation_memory_budget <= 1,
         f"train.activation_memory_budget must be in (0, 1], got {t.activation_memory_budget}")
    need(t.time_limit_s >= 0, f"train.time_limit_s must be >= 0, got {t.time_limit_s}")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    need(cfg.logging.log_interval > 0, f"logging.log_interval must be > 0, got {cfg.logging.log_interval}")
    need(cfg.checkpoint.interval >= 0, f"checkpoint.interval must be >= 0, got {cfg.checkpoint.interval}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# The run config is the one source of truth for batch sizes and clipping; a ds_config may repeat them
# (DeepSpeed requires them at initialize) but never contradict them.
_DS_SHARED_KEYS = (
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("train_batch_size", "global batch (train.micro_batch_size x train.grad_accum x world size)"),
    ("gradient_clipping", "train.grad_clip"),
)


def load_ds_config(path: str, cfg: RunConfig, world_size: int) -> dict:
    """Read a DeepSpeed JSON config and fill in what the run config owns, refusing contradictions."""
    if not os.path.isfile(path):
        raise ConfigError(f"ds_config '{path}' not found (expected a DeepSpeed JSON file, e.g. configs/zero2.json)")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object at top level")
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(f"{path}: remove '{owned}': pascal-dist builds AdamW and the LR schedule from train.*")
    t = cfg.train
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
    }
    for ds_key, our_key in _DS_SHARED_KEYS:
        theirs = ds.get(ds_key, "auto")
        if theirs != "auto" and theirs != ours[ds_key]:
            raise ConfigError(f"{path}: {ds_key}={theirs} disagrees with {our_key}={ours[ds_key]} "
                              f"(world size {world_size}); remove it from the ds_config or make them equal")
        ds[ds_key] = ours[ds_key]
    # DeepSpeed's throughput timer synchronises the GPU at every forward and step (the trainer times steps itself)
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":
        # Overlapping reductions with the backward pays across ranks; on one there is nothing to overlap, and the
        # overlap path synchronises the device at the end of every backward.
        zero["overlap_comm"] = world_size > 1
    return ds
