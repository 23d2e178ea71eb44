"""Sampler and loaders: windows, seeded order, rank disjointness, resume (also across world sizes), val batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pascal_dist.data import DataError, TrainLoader, read_vocab_size, val_batches, write_shard
from pascal_dist.data.shards import write_manifest

T = 8


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """Shards whose tokens are distinct (0, 1, 2, ...), so a window's first token identifies its sample."""
    entries, start = [], 0
    for split, lengths in {"train": (83, 41, 9, 200), "val": (50,)}.items():
        for i, n in enumerate(lengths):
            tokens = np.arange(start, start + n, dtype=np.uint16)
            entries.append((split, write_shard(tmp_path / f"{split}_{i:05d}.bin", tokens)))
            start += n
    splits = {s: [e for name, e in entries if name == s] for s in ("train", "val")}
    write_manifest(
        tmp_path,
        {
            "format_version": 1,
            "splits": splits,
            "tokenizer": {"file": "tokenizer.json", "vocab_size": 4096, "eos_id": 2},
        },
    )
    return tmp_path


def expected_windows(data_dir: Path, split: str) -> np.ndarray:
    """All windows of a split, built the slow obvious way from the shards' token arrays."""
    rows = []
    for path in sorted(data_dir.glob(f"{split}_*.bin")):
        tokens = np.fromfile(path, dtype="<u2", offset=32).astype(np.int64)
        rows += [tokens[s * T : s * T + T + 1] for s in range((len(tokens) - 1) // T)]
    return np.stack(rows)


def make(data_dir: Path, rank: int = 0, world: int = 1, b: int = 4, accum: int = 1, seed: int = 0) -> TrainLoader:
    return TrainLoader(str(data_dir), "train", T, b, accum, rank, world, seed)


def run(loaders: list[TrainLoader], calls: int) -> list[torch.Tensor]:
    """Micro-batches of all ranks in global-position order (micro-step major, rank minor)."""
    out = []
    for _ in range(calls):
        out += [torch.cat(ld.next_batch(), dim=1) for ld in loaders]
    return out


def test_windows_are_the_token_stream(data_dir: Path) -> None:
    ld = make(data_dir, b=7)
    want = expected_windows(data_dir, "train")
    assert ld.num_samples == len(want) == 10 + 5 + 1 + 24
    perm = np.random.default_rng([0, 0]).permutation(ld.num_samples)
    x, y = ld.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (7, T)
    np.testing.assert_array_equal(x.numpy(), want[perm[:7], :-1])
    np.testing.assert_array_equal(y.numpy(), want[perm[:7], 1:])


def test_same_seed_same_batches_other_seed_differs(data_dir: Path) -> None:
    a, b, c = run([make(data_dir)], 5), run([make(data_dir)], 5), run([make(data_dir, seed=1)], 5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_every_epoch_visits_each_sample_once(data_dir: Path) -> None:
    ld = make(data_dir, b=8)  # 40 samples = 5 batches per epoch
    firsts = torch.cat([x[:, 0] for x in run([ld], 10)]).numpy()
    want = sorted(expected_windows(data_dir, "train")[:, 0])
    assert sorted(firsts[:40]) == want and sorted(firsts[40:]) == want
    assert not np.array_equal(firsts[:40], firsts[40:]) and ld.epoch == 2


def test_ranks_split_the_global_batch(data_dir: Path) -> None:
    r0, r1 = make(data_dir, 0, 2, b=3, accum=2), make(data_dir, 1, 2, b=3, accum=2)
    assert r0.global_batch_size == 12
    batches = run([r0, r1], 2)  # one optimizer step
    firsts = [set(x[:, 0].tolist()) for x in batches]
    per_rank = [firsts[0] | firsts[2], firsts[1] | firsts[3]]
    assert not per_rank[0] & per_rank[1]
    perm = np.random.default_rng([0, 0]).permutation(r0.num_samples)
    assert per_rank[0] | per_rank[1] == set(expected_windows(data_dir, "train")[perm[:12], 0].tolist())
    assert r0.samples_consumed == r1.samples_consumed == 12


def test_resume_on_two_ranks_equals_uninterrupted(data_dir: Path) -> None:
    full = run([make(data_dir, r, 2, accum=2) for r in range(2)], 2 * 7)  # 7 steps, crosses an epoch
    first = [make(data_dir, r, 2, accum=2) for r in range(2)]
    head = run(first, 2 * 3)
    state = first[0].state_dict()
    assert (
        state
        == first[1].state_dict()
        == {"version": 1, "seed": 0, "samples_consumed": 48, "num_samples": 40, "block_size": T}
    )
    second = [make(data_dir, r, 2, accum=2) for r in range(2)]
    for ld in second:
        ld.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(full, head + run(second, 2 * 4)))


def test_resume_on_one_rank_after_two_continues_the_sequence(data_dir: Path) -> None:
    full = run([make(data_dir, r, 2) for r in range(2)], 6)  # world 2, accum 1: global batch 8
    two = [make(data_dir, r, 2) for r in range(2)]
    head = run(two, 3)
    one = make(data_dir, 0, 1, accum=2)  # world 1, accum 2: same global batch
    assert one.global_batch_size == two[0].global_batch_size == 8
    one.load_state_dict(two[0].state_dict())
    assert all(torch.equal(u, v) for u, v in zip(full, head + run([one], 6)))


@pytest.mark.parametrize(
    "key, value, why",
    [
        ("seed", 5, "shuffle order"),
        ("num_samples", 41, "data"),
        ("block_size", 16, "windows"),
        ("version", 2, "version"),
    ],
)
def test_load_state_refuses_mismatch(data_dir: Path, key: str, value: int, why: str) -> None:
    ld = make(data_dir)
    state = ld.state_dict() | {key: value, "samples_consumed": 8}
    with pytest.raises(DataError, match=f"{key}={value}.*{why}"):
        ld.load_state_dict(state)
    assert ld.samples_consumed == 0


def test_val_batches_fixed_disjoint_and_wrapping(data_dir: Path) -> None:
    want = expected_windows(data_dir, "val")  # 6 samples

    def firsts(rank: int) -> list[list[int]]:
        return [x[:, 0].tolist() for x, _ in val_batches(str(data_dir), "val", T, 2, rank, 2, num_batches=2)]

    r0, r1 = firsts(0), firsts(1)
    assert r0 == firsts(0)
    w = want[:, 0].tolist()
    assert r0 == [w[0:2], [w[4], w[5]]] and r1 == [w[2:4], [w[0], w[1]]]  # batch 1 of rank 1 wraps around
    x, y = next(val_batches(str(data_dir), "val", T, 6, 0, 1, 1))
    np.testing.assert_array_equal(x.numpy(), want[:, :-1])
    np.testing.assert_array_equal(y.numpy(), want[:, 1:])


def test_errors(data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"split 'val' has no sample of block_size 64"):
        TrainLoader(str(data_dir), "val", 64, 1, 1, 0, 1, 0)
    with pytest.raises(DataError, match="4096 != model vocab_size 8192"):
        TrainLoader(str(data_dir), "train", T, 1, 1, 0, 1, 0, expected_vocab_size=8192)
    with pytest.raises(DataError, match="rank=2"):
        TrainLoader(str(data_dir), "train", T, 1, 1, 2, 2, 0)
    assert read_vocab_size(data_dir) == 4096


def test_a_batch_with_an_id_beyond_the_vocabulary_is_refused_with_shard_and_offset(tmp_path):
    """A shard damaged in place (header and size intact) reaches the loader; the batch that holds the bad id is
    refused before it reaches the model, naming the shard and the token's offset in it."""
    import struct

    from pascal_dist.data import DataError
    from pascal_dist.data.loader import Windows
    from pascal_dist.data.shards import HEADER_SIZE
    from tests.unit.data.test_shards import make_dir

    d = make_dir(tmp_path, vocab=1000, lengths=(500, 300))
    with open(d / "train_00001.bin", "r+b") as f:
        f.seek(HEADER_SIZE + 2 * 37)
        f.write(struct.pack("<H", 65000))
    windows = Windows(d, "train", block_size=10)
    first_of_shard_1 = 499 // 10  # shard 0 has 49 windows of 11 tokens
    windows.gather(np.arange(first_of_shard_1))  # every window of shard 0 is fine
    with pytest.raises(DataError, match=r"train_00001.bin: token 37 is id 65000, not below vocab_size 1000"):
        windows.gather(np.array([first_of_shard_1 + 3]))  # shard 1's window 3 holds tokens 30..40
    assert Windows(d, "train", block_size=10, check_range=False).gather(np.array([first_of_shard_1 + 3])).max() == 65000
