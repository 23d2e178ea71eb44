"""Loading a run configuration: schema defaults < YAML file < `key=value` overrides, then validation.

Every problem is a `ConfigError` whose one-line message names the file or key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pascal_dist.attention import KERNEL_CHOICES, backend_names
from pascal_dist.config.schema import BIAS_KINDS, RunConfig
from pascal_dist.errors import UserError

COMPILE_SCOPES = ("blocks", "model")  # train.compile_scope


class ConfigError(UserError, ValueError):
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
    need(
        m.n_head > 0 and m.n_embd % m.n_head == 0,
        f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})",
    )
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    need(0.0 <= m.attn_dropout < 1.0, f"model.attn_dropout must be in [0, 1), got {m.attn_dropout}")
    backends = backend_names()  # the registry: a registered backend can be trained
    need(
        m.attention.backend in backends,
        f"model.attention.backend must be one of {', '.join(backends)}, got '{m.attention.backend}'",
    )
    need(
        m.attention.kernels in KERNEL_CHOICES,
        f"model.attention.kernels must be one of {', '.join(KERNEL_CHOICES)}, got '{m.attention.kernels}'",
    )
    need(m.bias.kind in BIAS_KINDS, f"model.bias.kind must be one of {', '.join(BIAS_KINDS)}, got '{m.bias.kind}'")
    need(m.bias.pascal_n >= 1, f"model.bias.pascal_n must be >= 1, got {m.bias.pascal_n}")
    most = m.bias.pascal_n + 1 if m.bias.kind == "pascal" else m.block_size  # layer n of the pyramid has n+1 rows
    need(
        1 <= m.bias.window <= most,
        f"model.bias.window must be in [1, {most}] for kind {m.bias.kind}, got {m.bias.window}",
    )
    need(m.bias.warmup_steps >= 0, f"model.bias.warmup_steps must be >= 0, got {m.bias.warmup_steps}")
    for key in ("micro_batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches"):
        need(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    need(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(
        0 <= t.warmup_steps <= t.decay_steps,
        f"train.warmup_steps ({t.warmup_steps}) must be between 0 and train.decay_steps ({t.decay_steps})",
    )
    need(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    need(
        t.compile_scope in COMPILE_SCOPES,
        f"train.compile_scope must be one of {', '.join(COMPILE_SCOPES)}, got '{t.compile_scope}'",
    )
    need(
        0 < t.activation_memory_budget <= 1,
        f"train.activation_memory_budget must be in (0, 1], got {t.activation_memory_budget}",
    )
    need(t.time_limit_s >= 0, f"train.time_limit_s must be >= 0, got {t.time_limit_s}")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    need(cfg.logging.log_interval > 0, f"logging.log_interval must be > 0, got {cfg.logging.log_interval}")
    need(cfg.checkpoint.interval >= 0, f"checkpoint.interval must be >= 0, got {cfg.checkpoint.interval}")
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
