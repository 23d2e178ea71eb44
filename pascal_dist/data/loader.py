"""Sampling and batching of token windows: the seeded global sample order, rank assignment, resumable state.

Sample s of a shard is the window tokens[s*T : s*T + T + 1] (T = block_size), never crossing shards; a split's
samples are its shards' samples in order. The training order is a fresh permutation per epoch, seeded by
(seed, epoch) and independent of the world size, and `samples_consumed` counts global samples, so a run can
resume on a different number of ranks with the same global batch and continue with exactly the next samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pascal_dist.data.shards import DataError, open_split, read_manifest

STATE_VERSION = 1


def read_vocab_size(data_dir: str | Path) -> int:
    """The tokenizer's vocabulary size recorded in the data manifest."""
    return int(read_manifest(data_dir)["tokenizer"]["vocab_size"])


class Windows:
    """Random access to the (block_size + 1)-token windows of one split, gathered without reading whole shards.

    Every gathered window is checked against the vocabulary (`check_range`): a damaged shard whose header and size
    are intact would otherwise feed an id >= vocab_size to the embedding (an IndexError on CPU, a device-side
    assert on a GPU). The check is a max over the batch's ids on the host, before the copy to the device
    (bench/bench_loader.py measures its cost). A damaged id below vocab_size cannot be told from a real one:
    `pascal-dist prepare --verify DIR` (or data.verify) checks the shards' sha256 against the manifest.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        block_size: int,
        expected_vocab_size: int | None = None,
        check_range: bool = True,
    ) -> None:
        if block_size < 1:
            raise DataError(f"block_size={block_size}, expected >= 1")
        self.block_size, self.check_range = block_size, check_range
        self.vocab_size = read_vocab_size(data_dir)
        shards = open_split(data_dir, split, expected_vocab_size=expected_vocab_size)
        self._paths = [str(getattr(s, "filename", "?")) for s in shards if len(s) > block_size]
        # A strided (samples, T+1) view per shard: indexing its rows copies just those windows out of the memmap.
        self._views = [
            np.lib.stride_tricks.as_strided(
                s,
                shape=((len(s) - 1) // block_size, block_size + 1),
                strides=(block_size * s.itemsize, s.itemsize),
                writeable=False,
            )
            for s in shards
            if len(s) > block_size
        ]
        counts = [len(v) for v in self._views]
        self._starts = np.cumsum([0] + counts)
        self.num_samples = int(self._starts[-1])
        if self.num_samples < 1:
            tokens = sum(len(s) for s in shards)
            raise DataError(
                f"{data_dir}: split {split!r} has no sample of block_size {block_size} + 1 tokens "
                f"({tokens} tokens in {len(shards)} shard(s)); use a smaller block_size or more data"
            )

    def gather(self, samples: np.ndarray) -> np.ndarray:
        """Windows for the given sample ids as an int64 array (len(samples), block_size + 1)."""
        out = np.empty((len(samples), self.block_size + 1), dtype=np.int64)
        shard = np.searchsorted(self._starts, samples, side="right") - 1
        for k in np.unique(shard):
            rows = shard == k
            local = samples[rows] - self._starts[k]
            windows = self._views[k][local]
            if self.check_range and windows.max(initial=0) >= self.vocab_size:
                self._refuse(k, local, windows)
            out[rows] = windows
        return out

    def _refuse(self, shard: int, local: np.ndarray, windows: np.ndarray) -> None:
        row, col = np.argwhere(windows >= self.vocab_size)[0]
        offset = int(local[row]) * self.block_size + int(col)  # token index within the shard's tokens
        raise DataError(
            f"{self._paths[shard]}: token {offset} is id {int(windows[row, col])}, not below vocab_size "
            f"{self.vocab_size}: the shard is damaged (check the data dir with `pascal-dist prepare --verify`, or "
            "prepare it again)"
        )


def _to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(windows)
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if device.type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        x, y = x.to(device), y.to(device)
    return x, y


class TrainLoader:
    """Seeded, shuffled, rank-sharded training batches with a resumable position.

    Each next_batch() on rank r reads global positions samples_consumed + r*b + [0, b) and then advances
    samples_consumed by b*W, so the W ranks together consume each optimizer step's global batch, disjointly.
    """

    def __init__(
        self,
        data_dir: str,
        split: str,
        block_size: int,
        micro_batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        expected_vocab_size: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} with world_size={world_size}, expected 0 <= rank < world_size")
        if micro_batch_size < 1 or grad_accum < 1:
            raise DataError(f"micro_batch_size={micro_batch_size}, grad_accum={grad_accum}, expected both >= 1")
        self.windows = Windows(data_dir, split, block_size, expected_vocab_size)
        self.block_size, self.micro_batch_size, self.seed = block_size, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch_size = micro_batch_size * grad_accum * world_size
        self.num_samples = self.windows.num_samples
        self.device = torch.device(device)
        self.samples_consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """Epoch of the next global position to be consumed."""
        return self.samples_consumed // self.num_samples

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs once N >= batch; keep only recent ones
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at global positions: epoch g // N, entry g % N of that epoch's permutation."""
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (micro_batch_size, block_size) on the device; y is x shifted by one token."""
        b = self.micro_batch_size
        positions = self.samples_consumed + self.rank * b + np.arange(b, dtype=np.int64)
        self.samples_consumed += b * self.world_size
        return _to_device(self.windows.gather(self.samples_at(positions)), self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "samples_consumed": self.samples_consumed,
            "num_samples": self.num_samples,
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuses a state whose sample order this loader cannot reproduce."""
        mine = self.state_dict()
        for key, why in (
            ("version", "saved by another loader version"),
            ("seed", "the shuffle order would differ"),
            ("num_samples", "the data or its split changed since the checkpoint"),
            ("block_size", "samples would be different windows"),
        ):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"cannot resume the data loader: {key}={state.get(key)!r} in the checkpoint, "
                    f"{mine[key]!r} now ({why})"
                )
        self.samples_consumed = int(state["samples_consumed"])


def val_batches(
    data_dir: str,
    split: str,
    block_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    num_batches: int,
    device: torch.device | str = "cpu",
    expected_vocab_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same `num_batches` sequential (unshuffled) batches at every evaluation; ranks take disjoint samples.

    Batch j of rank r holds samples (j*W + r)*b + [0, b), wrapping around the split if it is too small.
    """
    windows = Windows(data_dir, split, block_size, expected_vocab_size)
    device = torch.device(device)
    for j in range(num_batches):
        start = (j * world_size + rank) * micro_batch_size
        samples = (start + np.arange(micro_batch_size, dtype=np.int64)) % windows.num_samples
        yield _to_device(windows.gather(samples), device)
