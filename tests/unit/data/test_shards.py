"""Shard format and manifest validation: every corrupt input gives a DataError naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pascal_dist.data import DataError, open_shard, open_split, read_manifest, write_shard
from pascal_dist.data.shards import HEADER_SIZE, MAGIC, ShardWriter, write_manifest


def make_dir(root: Path, vocab: int = 1000, lengths: tuple[int, ...] = (500, 300)) -> Path:
    """A data dir whose train split has shards of the given lengths."""
    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    entries = [
        write_shard(root / f"train_{i:05d}.bin", rng.integers(0, vocab, n).astype(dtype)) for i, n in enumerate(lengths)
    ]
    write_manifest(
        root,
        {
            "format_version": 1,
            "splits": {"train": entries},
            "tokenizer": {"file": "tokenizer.json", "vocab_size": vocab, "eos_id": 2},
        },
    )
    return root


def test_header_layout_and_round_trip(tmp_path: Path) -> None:
    tokens = np.array([0, 1, 65535, 7], dtype=np.uint16)
    entry = write_shard(tmp_path / "a.bin", tokens)
    raw = (tmp_path / "a.bin").read_bytes()
    assert raw[:8] == MAGIC and len(raw) == HEADER_SIZE + 8 == 40
    assert struct.unpack("<IIQ", raw[8:24]) == (1, 2, 4) and raw[24:32] == bytes(8)
    assert raw[32:] == tokens.astype("<u2").tobytes()
    mm = open_shard(tmp_path / "a.bin")
    assert isinstance(mm, np.memmap) and mm.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(mm, tokens)
    assert entry == {"file": "a.bin", "tokens": 4, "sha256": entry["sha256"]} and len(entry["sha256"]) == 64


def test_uint32_and_streamed_writer(tmp_path: Path) -> None:
    tokens = np.arange(70_000, 70_100, dtype=np.uint32)
    whole = write_shard(tmp_path / "a.bin", tokens)
    w = ShardWriter(tmp_path / "b.bin", np.dtype(np.uint32))
    for chunk in np.array_split(tokens, 7):
        w.write(chunk)
    streamed = w.close()
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert whole["sha256"] == streamed["sha256"]
    np.testing.assert_array_equal(open_shard(tmp_path / "b.bin"), tokens)


def test_valid_dir_opens_with_checksum(tmp_path: Path) -> None:
    shards = open_split(make_dir(tmp_path), "train", verify="checksum", expected_vocab_size=1000)
    assert [len(s) for s in shards] == [500, 300]


def _corrupt_truncate(d: Path) -> None:
    p = d / "train_00001.bin"
    p.write_bytes(p.read_bytes()[:-2])


def _corrupt_magic(d: Path) -> None:
    p = d / "train_00001.bin"
    p.write_bytes(b"NOTATOK\x00" + p.read_bytes()[8:])


def _corrupt_header_short(d: Path) -> None:
    (d / "train_00001.bin").write_bytes(MAGIC)


def _corrupt_count(d: Path) -> None:
    m = read_manifest(d)
    m["splits"]["train"][1]["tokens"] += 1
    write_manifest(d, m)


def _corrupt_vocab(d: Path) -> None:
    m = read_manifest(d)
    m["tokenizer"]["vocab_size"] = 100_000  # needs uint32, shards are uint16
    write_manifest(d, m)


def _corrupt_missing(d: Path) -> None:
    (d / "train_00001.bin").unlink()


def _corrupt_version(d: Path) -> None:
    p = d / "train_00001.bin"
    raw = bytearray(p.read_bytes())
    raw[8:12] = struct.pack("<I", 9)
    p.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_truncate, "truncated"),
        (_corrupt_magic, "magic"),
        (_corrupt_header_short, "header"),
        (_corrupt_count, "manifest says 301"),
        (_corrupt_vocab, "needs itemsize 4"),
        (_corrupt_missing, "missing"),
        (_corrupt_version, "version 9"),
    ],
)
def test_corrupt_shard_is_named(tmp_path: Path, corrupt, message: str) -> None:
    shard = "train_00000.bin" if corrupt is _corrupt_vocab else "train_00001.bin"  # vocab: the first one checked
    d = make_dir(tmp_path)
    corrupt(d)
    with pytest.raises(DataError, match=message) as err:
        open_split(d, "train")
    assert f"{shard}: " in str(err.value) and "\n" not in str(err.value)


def test_checksum_mismatch_found_only_when_asked(tmp_path: Path) -> None:
    d = make_dir(tmp_path)
    p = d / "train_00000.bin"
    raw = bytearray(p.read_bytes())
    raw[HEADER_SIZE + 10] ^= 0xFF
    p.write_bytes(bytes(raw))
    open_split(d, "train", verify="size")
    with pytest.raises(DataError, match=r"train_00000\.bin: sha256"):
        open_split(d, "train", verify="checksum")


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(tmp_path)
    d = make_dir(tmp_path)
    with pytest.raises(DataError, match=r"no split 'val'.*\['train'\]"):
        open_split(d, "val")
    with pytest.raises(DataError, match="vocab_size 1000 != model vocab_size 8192"):
        open_split(d, "train", expected_vocab_size=8192)
    (d / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {}}))
    with pytest.raises(DataError, match="missing key 'tokenizer'"):
        read_manifest(d)


def damage(path: Path, token: int, value: int) -> None:
    """Overwrite one token of a shard in place: header, size and manifest stay as they were."""
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 2 * token)
        f.write(struct.pack("<H", value))


def test_verify_names_the_shard_and_token_of_an_id_beyond_the_vocabulary(tmp_path: Path) -> None:
    from pascal_dist.data.shards import verify_data_dir

    d = make_dir(tmp_path)
    assert verify_data_dir(d) == {"shards": 2, "tokens": 800, "bytes": 1600}
    damage(d / "train_00001.bin", token=123, value=4000)
    with pytest.raises(DataError, match=r"train_00001.bin: token 123 is id 4000, not below vocab_size 1000"):
        verify_data_dir(d)


def test_verify_finds_a_damaged_id_below_the_vocabulary_by_its_checksum(tmp_path: Path) -> None:
    from pascal_dist.data.shards import verify_data_dir

    d = make_dir(tmp_path)
    tokens = np.asarray(open_shard(d / "train_00000.bin"))
    damage(d / "train_00000.bin", token=7, value=(int(tokens[7]) + 1) % 1000)
    with pytest.raises(DataError, match=r"train_00000.bin: sha256 of the tokens is .*manifest says"):
        verify_data_dir(d)
