"""Checkpoints: what a run must save beyond DeepSpeed's own state, where it goes, and what is kept.

DeepSpeed's `save_checkpoint` writes model, optimizer (ZeRO shards) and LR scheduler; we add the
trainer's own stateful parts as `client_state` (loader position, bias-warmup counter, config) and
every rank's RNG state in a file of its own, since client_state is written by rank 0 only.
"""
from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

CLIENT_STATE_VERSION = 1
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def list_tags(ckpt_dir: str) -> list[str]:
    """Checkpoint tags under `ckpt_dir`, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if _TAG.match(t) and os.path.isdir(os.path.join(ckpt_dir, t)))


def latest_tag(ckpt_dir: str) -> str | None:
    """The tag DeepSpeed's `latest` pointer names, if it exists on disk."""
    pointer = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(ckpt_dir, tag)) else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_path(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{rank:05d}.pt")


def save(engine, ckpt_dir: str, step: int, client_state: dict, rank: int, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
    # RNG first, so that once DeepSpeed moves `latest` to this tag the whole state is already there.
    torch.save(rng_state(), _rng_path(ckpt_dir, tag, rank))
    state = {"pascal_dist": dict(client_state, version=CLIENT_STATE_VERSION),
             # ds_to_universal refuses checkpoints without this key (see the resume docs).
             "universal_checkpoint_info": {}}
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=state)
    torch.distributed.barrier()
    if rank == 0:
        for old in list_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    return tag


def load(engine, ckpt_dir: str, rank: int, tag: str | None = None) -> dict | None:
    """Collective. Restores engine state and this rank's RNG; returns our client state, or None if no checkpoint."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    ours = (client or {}).get("pascal_dist")
    if not ours or ours.get("version") != CLIENT_STATE_VERSION:
        raise RuntimeError(f"{os.path.join(ckpt_dir, tag)}: missing or incompatible pascal_dist client state "
                           f"(expected version {CLIENT_STATE_VERSION})")
    rng_file = _rng_path(ckpt_dir, tag, rank)
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    ours["tag"] = tag
    return ours
