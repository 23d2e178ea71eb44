"""The DeepSpeed JSON config: read it and fill in what the run config owns, refusing contradictions."""

from __future__ import annotations

import json
import os

from pascal_dist.config.load import ConfigError
from pascal_dist.config.schema import RunConfig

# The run config is the one source of truth for batch sizes and clipping; a ds_config may repeat them
# (DeepSpeed requires them at initialize) but never contradict them.
_DS_SHARED_KEYS = (
    ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("train_batch_size", "global batch (train.micro_batch_size x train.grad_accum x world size)"),
    ("gradient_clipping", "train.grad_clip"),
)


def _refuse_asynchronous_checkpoints(path: str, ds: dict) -> None:
    """The checkpoint commit protocol writes meta.json once every rank's save_checkpoint has returned, taking the
    files as durable then; a writer that returns before its files are written would let a crash leave a committed
    checkpoint with missing files."""
    checkpoint = ds.get("checkpoint") or {}
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{path}: 'checkpoint' must be a JSON object, got {checkpoint!r}")
    writer = checkpoint.get("writer") or {}
    if isinstance(writer, dict) and writer.get("decoupled"):
        raise ConfigError(
            f"{path}: checkpoint.writer.decoupled=true writes checkpoints in the background, after save returns; "
            "pascal-dist commits a checkpoint (meta.json, then latest) only once its files are written: remove it"
        )
    if ds.get("datastates_ckpt", False) is not False:
        raise ConfigError(
            f"{path}: datastates_ckpt writes checkpoints asynchronously, after save returns; pascal-dist commits a "
            "checkpoint (meta.json, then latest) only once its files are written: remove it"
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
    _refuse_asynchronous_checkpoints(path, ds)
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
            raise ConfigError(
                f"{path}: {ds_key}={theirs} disagrees with {our_key}={ours[ds_key]} "
                f"(world size {world_size}); remove it from the ds_config or make them equal"
            )
        ds[ds_key] = ours[ds_key]
    # DeepSpeed's throughput timer synchronises the GPU at every forward and step (the trainer times steps itself)
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":
        # Overlapping reductions with the backward pays across ranks; on one there is nothing to overlap, and the
        # overlap path synchronises the device at the end of every backward.
        zero["overlap_comm"] = world_size > 1
    return ds
