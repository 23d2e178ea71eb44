"""Checkpoints: atomic saves, retention, validation before loading, fallback, and resume on another world size.

Layout under `<run_dir>/checkpoints/`:
    stepNNNNNNNN/            DeepSpeed's files (model, ZeRO optimizer shards, LR scheduler) + our client state,
                             rng_rankNNNNN.pt per rank, and meta.json, written LAST: a tag without meta.json
                             is incomplete and never loaded
    stepNNNNNNNN_universal/  made on demand when resuming on a different world size (ds_to_universal)
    latest                   name of the newest complete tag, replaced atomically (write, fsync, rename)

Saving is collective; rank 0 writes meta.json and the pointer only after every rank's files are on disk, so
`kill -9` at any moment leaves the previous checkpoint loadable. Assumes a filesystem every rank sees
(the usual shared /scratch or Lustre on clusters).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from pascal_dist.errors import UserError

CLIENT_STATE_VERSION = 1
META = "meta.json"
POINTER = "latest"
_TAG = re.compile(r"^step(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the path and the problem."""


@dataclass(frozen=True)
class Identity:
    """What a checkpoint must match to be loadable into this run."""

    model: dict  # the model config section
    tokenizer_sha256: Optional[str]


def _architecture(model: dict) -> dict:
    """The model config without the attention kernel's name or implementation: every biased backend computes the
    same function, so a run may resume on another one (`fused` on the GPU cluster, `banded` elsewhere) or with
    other `kernels`; only `none` drops the bias."""
    out = dict(model)
    if isinstance(out.get("attention"), dict):
        attention = dict(out["attention"])
        attention.pop("kernels", None)
        attention["biased"] = attention.pop("backend", None) != "none"
        out["attention"] = attention
    return out


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def list_tags(ckpt_dir: str) -> list[str]:
    """Complete or not, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if _TAG.match(t) and os.path.isdir(os.path.join(ckpt_dir, t)))


def read_meta(ckpt_dir: str, tag: str) -> Optional[dict]:
    try:
        with open(os.path.join(ckpt_dir, tag, META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def latest_tag(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, POINTER)) as f:
            return f.read().strip() or None
    except OSError:
        return None


# --- RNG ---------------------------------------------------------------------------------------------------
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


def _rng_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"rng_rank{rank:05d}.pt")


# --- durable writes ----------------------------------------------------------------------------------------
def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sizes(tag_dir: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(tag_dir):
        for name in files:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, tag_dir)] = os.path.getsize(full)
    return sizes


class Checkpointer:
    """Saves and restores one run's checkpoints; every method is collective unless it says otherwise."""

    def __init__(
        self,
        ckpt_dir: str,
        rank: int,
        world_size: int,
        keep_last: int,
        identity: Identity,
        log: Callable[[str], None] = print,
    ):
        self.dir, self.rank, self.world_size, self.keep_last = ckpt_dir, rank, world_size, keep_last
        self.identity, self.log = identity, log

    # --- save ----------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, val_loss: Optional[float] = None) -> str:
        """Write tag stepN; the pointer moves only once every rank's files are on disk. Returns the tag."""
        tag = tag_for(step)
        tag_dir = os.path.join(self.dir, tag)
        if self.rank == 0 and os.path.isdir(tag_dir):
            shutil.rmtree(tag_dir)  # an incomplete leftover of a killed save at this same step
        dist.barrier()
        try:
            os.makedirs(tag_dir, exist_ok=True)
            torch.save(rng_state(), _rng_file(tag_dir, self.rank))
            state = {
                "pascal_dist": dict(client_state, version=CLIENT_STATE_VERSION),
                # ds_to_universal refuses checkpoints without this key
                "universal_checkpoint_info": {},
            }
            engine.save_checkpoint(self.dir, tag=tag, client_state=state, save_latest=False)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(
                f"saving checkpoint {tag_dir} failed: {e}; the previous checkpoint "
                f"({latest_tag(self.dir) or 'none'}) is untouched"
            ) from None
        dist.barrier()  # every rank's files are written: only now may the checkpoint become visible
        if self.rank == 0:
            try:
                _fsync_tree(tag_dir)
                meta = {
                    "step": step,
                    "world_size": self.world_size,
                    "model": self.identity.model,
                    "tokenizer_sha256": self.identity.tokenizer_sha256,
                    "val_loss": val_loss,
                    "time": time.time(),
                    "files": _file_sizes(tag_dir),
                }
                write_atomic(os.path.join(tag_dir, META), json.dumps(meta, indent=1, sort_keys=True))
                write_atomic(os.path.join(self.dir, POINTER), tag)
                self._retain()
            except OSError as e:
                raise CheckpointError(
                    f"committing checkpoint {tag_dir} failed: {e}; the previous checkpoint is untouched"
                ) from None
        dist.barrier()
        return tag

    def _retain(self) -> None:
        """Keep the newest `keep_last` complete tags and the best by validation loss; drop the rest (rank 0)."""
        metas = {t: read_meta(self.dir, t) for t in list_tags(self.dir)}  # oldest first
        complete = [t for t, m in metas.items() if m is not None]
        keep = set(complete[-self.keep_last :])
        scored = [(metas[t]["val_loss"], t) for t in complete if metas[t].get("val_loss") is not None]
        if scored:
            keep.add(min(scored)[1])
        newest = complete[-1] if complete else ""
        for tag, meta in metas.items():
            # an incomplete tag is a killed save's leftover once a newer checkpoint is complete
            if tag not in keep and (meta is not None or tag < newest):
                shutil.rmtree(os.path.join(self.dir, tag), ignore_errors=True)
                shutil.rmtree(os.path.join(self.dir, tag + "_universal"), ignore_errors=True)

    # --- load ----------------------------------------------------------------------------------------------
    def problem(self, tag: str) -> Optional[str]:
        """Why `tag` cannot be loaded into this run, or None. Not collective: reads files only."""
        tag_dir = os.path.join(self.dir, tag)
        meta = read_meta(self.dir, tag)
        if meta is None:
            return f"{tag_dir}: incomplete (no {META}; the save was interrupted)"
        for name, size in meta["files"].items():
            path = os.path.join(tag_dir, name)
            if not os.path.isfile(path):
                return f"{tag_dir}: file {name} is missing"
            if os.path.getsize(path) != size:
                return (
                    f"{tag_dir}: file {name} is truncated or changed ({os.path.getsize(path)} bytes, expected {size})"
                )
        saved, ours = _architecture(meta["model"]), _architecture(self.identity.model)
        if saved != ours:
            diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            shown = ", ".join(f"model.{k}: {saved.get(k)} in checkpoint vs {ours.get(k)}" for k in diff[:3])
            return f"{tag_dir}: saved from another model config ({shown})"
        if meta["tokenizer_sha256"] != self.identity.tokenizer_sha256:
            return (
                f"{tag_dir}: trained with another tokenizer (sha256 {str(meta['tokenizer_sha256'])[:12]}... vs "
                f"{str(self.identity.tokenizer_sha256)[:12]}... of data.dir): its token ids would mean other words"
            )
        return None

    def choose(self, tag: Optional[str]) -> Optional[dict]:
        """The checkpoint to resume from: `tag` if given (an error if unusable), else the newest good one.

        With tag=None, unusable checkpoints are skipped with a warning. Returns its meta, or None if the run
        has no checkpoint at all. Not collective.
        """
        if tag is not None:
            if tag not in list_tags(self.dir):
                complete = [t for t in list_tags(self.dir) if read_meta(self.dir, t) is not None]
                raise CheckpointError(
                    f"no checkpoint '{tag}' in {self.dir}; available: {', '.join(complete) or 'none'}"
                )
            why = self.problem(tag)
            if why:
                raise CheckpointError(why)
            return dict(read_meta(self.dir, tag), tag=tag)
        tags = list_tags(self.dir)
        problems = []
        for candidate in reversed(tags):
            why = self.problem(candidate)
            if why is None:
                if problems:
                    self.log(f"warning: falling back to {candidate}: " + "; ".join(problems))
                return dict(read_meta(self.dir, candidate), tag=candidate)
            problems.append(why)
        if problems:
            raise CheckpointError("no loadable checkpoint: " + "; ".join(problems))
        return None

    def universal_tag(self, meta: dict) -> str:
        """Convert `meta`'s checkpoint to DeepSpeed's universal format once (rank 0; others wait)."""
        src, dst = os.path.join(self.dir, meta["tag"]), os.path.join(self.dir, meta["tag"] + "_universal")
        if self.rank == 0 and not os.path.isfile(os.path.join(dst, META)):
            shutil.rmtree(dst, ignore_errors=True)
            self.log(
                f"world size {meta['world_size']} -> {self.world_size}: converting {src} to a universal checkpoint"
            )
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    src,
                    "--output_folder",
                    dst,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if proc.returncode != 0:
                raise CheckpointError(
                    f"converting {src} to a universal checkpoint failed: "
                    f"{proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.returncode}"
                )
            for rng in glob.glob(os.path.join(src, "rng_rank*.pt")):
                shutil.copy2(rng, dst)
            write_atomic(os.path.join(dst, META), json.dumps(meta))
        dist.barrier()
        return meta["tag"] + "_universal"

    def load(self, engine, tag: str) -> dict:
        """Restore engine state and this rank's RNG from `tag`; returns our client state."""
        path, client = engine.load_checkpoint(self.dir, tag=tag)
        if path is None:
            raise CheckpointError(f"{os.path.join(self.dir, tag)}: DeepSpeed could not load this checkpoint")
        ours = (client or {}).get("pascal_dist")
        if not ours or ours.get("version") != CLIENT_STATE_VERSION:
            raise CheckpointError(
                f"{os.path.join(self.dir, tag)}: missing or incompatible pascal_dist client "
                f"state (expected version {CLIENT_STATE_VERSION})"
            )
        rng = _rng_file(os.path.join(self.dir, tag), self.rank)
        if os.path.isfile(rng):
            set_rng_state(torch.load(rng, weights_only=False))
        else:
            self.log(f"warning: {rng} not found (new world size); rank {self.rank} keeps its seeded RNG")
        return ours
