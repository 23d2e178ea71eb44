"""Benchmark: TrainLoader batches (64 x 257 tokens) per second against a one-window-at-a-time Python loop, the
cost of its per-batch token-id check side by side, and the throughput of `prepare --verify`."""

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
from pascal_dist.data.shards import open_split, verify_data_dir, write_manifest, write_shard  # noqa: E402

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


def synthetic_data_dir(out: Path, megabytes: int) -> Path:
    """A data dir of `megabytes` MB of random ids below 8192, in 64 MB shards (for timing a full read)."""
    out.mkdir(parents=True)
    rng, entries, left = np.random.default_rng(0), [], megabytes * 10**6 // 2
    while left > 0:
        n = min(left, 32 * 10**6)
        entries.append(write_shard(out / f"train_{len(entries):05d}.bin", rng.integers(0, 8192, n, dtype=np.uint16)))
        left -= n
    manifest = {"format_version": 1, "splits": {"train": entries}}
    write_manifest(out, {**manifest, "tokenizer": {"file": "tokenizer.json", "vocab_size": 8192, "eos_id": 2}})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="data/embedded", help="prepared data dir (prepared into a temp dir if missing)")
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--verify-mb", type=int, default=256, help="size of the synthetic data dir `prepare --verify` reads")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not (Path(data) / "manifest.json").is_file():
            data = str(Path(tmp) / "embedded")
            prepare(data)
        loader = TrainLoader(data, "train", T, B, 1, 0, 1, seed=0)
        loader.next_batch()
        # with and without the per-batch id check (ids < vocab_size), in alternating rounds so drift hits both
        seconds = {True: 0.0, False: 0.0}
        rounds = 4
        for _ in range(rounds):
            for check in (True, False):
                loader.windows.check_range = check
                t0 = time.perf_counter()
                for _ in range(a.batches // rounds):
                    x, y = loader.next_batch()
                seconds[check] += time.perf_counter() - t0
        n_batches = a.batches // rounds * rounds
        t_loader, t_unchecked = seconds[True], seconds[False]
        n_naive = max(a.batches // 10, 1)
        t_naive = naive_batches(data, n_naive, 0)
        big = synthetic_data_dir(Path(tmp) / "synthetic", a.verify_mb)
        t0 = time.perf_counter()
        verified = verify_data_dir(big)
        t_verify = time.perf_counter() - t0
    per_batch = B * (T + 1)
    fast, slow = n_batches * per_batch / t_loader, n_naive * per_batch / t_naive
    unchecked = n_batches * per_batch / t_unchecked
    print(
        f"\nbatch {B} x {T + 1} tokens, {loader.num_samples:,} train samples, 1 process, torch threads "
        f"{torch.get_num_threads()}\n"
    )
    print("| loader | batches | ms/batch | tokens/s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| naive (Python loop per window) | {n_naive} | {t_naive / n_naive * 1e3:.3f} | {slow / 1e6:.1f} M | 1.0 |")
    print(
        f"| TrainLoader, no id check | {n_batches} | {t_unchecked / n_batches * 1e3:.3f} | "
        f"{unchecked / 1e6:.1f} M | {unchecked / slow:.1f} |"
    )
    print(
        f"| TrainLoader (vectorised memmap gather, ids < vocab checked) | {n_batches} | "
        f"{t_loader / n_batches * 1e3:.3f} | {fast / 1e6:.1f} M | {fast / slow:.1f} |"
    )
    print(f"\nthe id check costs {100 * (t_loader / t_unchecked - 1):+.1f}% of the loader's time per batch")
    gb = verified["bytes"] / 1e9
    print(
        f"prepare --verify (sha256 + ids of every shard): {verified['shards']} shards, {gb:.3f} GB in "
        f"{t_verify:.2f} s = {gb / t_verify:.2f} GB/s, {t_verify / gb:.1f} s per GB"
    )
    print(f"\ntarget: >30M tokens/s per process: {'met' if fast > 30e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
