"""Benchmark: TrainLoader batches (64 x 257 tokens) per second against a one-window-at-a-time Python loop."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pascal_dist.data.loader import TrainLoader  # noqa: E402
from pascal_dist.data.prepare import prepare  # noqa: E402
from pascal_dist.data.shards import open_split  # noqa: E402

B, T = 64, 256


def naive_batches(data_dir: str, n: int, seed: int) -> float:
    """Baseline: per sample, find its shard with a Python loop, slice, convert; stack. Returns seconds."""
    shards = open_split(data_dir, "train")
    counts = [(len(s) - 1) // T for s in shards]
    perm = np.random.default_rng([seed, 0]).permutation(sum(counts))
    t0 = time.perf_counter()
    for k in range(n):
        rows = []
        for s in perm[(k * B + np.arange(B)) % len(perm)]:
            i = 0
            while s >= counts[i]:
                s -= counts[i]
                i += 1
            rows.append(torch.tensor(shards[i][s * T : s * T + T + 1].astype(np.int64)))
        w = torch.stack(rows)
        _inputs, _targets = w[:, :-1], w[:, 1:]  # the views the loader hands out
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="data/embedded", help="prepared data dir (prepared into a temp dir if missing)")
    p.add_argument("--batches", type=int, default=2000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not (Path(data) / "manifest.json").is_file():
            data = str(Path(tmp) / "embedded")
            prepare(data)
        loader = TrainLoader(data, "train", T, B, 1, 0, 1, seed=0)
        loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(a.batches):
            x, y = loader.next_batch()
        t_loader = time.perf_counter() - t0
        n_naive = max(a.batches // 10, 1)
        t_naive = naive_batches(data, n_naive, 0)
    per_batch = B * (T + 1)
    fast, slow = a.batches * per_batch / t_loader, n_naive * per_batch / t_naive
    print(
        f"\nbatch {B} x {T + 1} tokens, {loader.num_samples:,} train samples, 1 process, torch threads "
        f"{torch.get_num_threads()}\n"
    )
    print("| loader | batches | ms/batch | tokens/s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| naive (Python loop per window) | {n_naive} | {t_naive / n_naive * 1e3:.3f} | {slow / 1e6:.1f} M | 1.0 |")
    print(
        f"| TrainLoader (vectorised memmap gather) | {a.batches} | {t_loader / a.batches * 1e3:.3f} | "
        f"{fast / 1e6:.1f} M | {fast / slow:.1f} |"
    )
    print(f"\ntarget: >30M tokens/s per process: {'met' if fast > 30e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
