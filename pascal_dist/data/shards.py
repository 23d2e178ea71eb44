"""Binary token shards and the manifest: the on-disk format, writing, reading and validation.

A shard is a 32-byte header followed by the tokens, little-endian:

    magic b"PASCTOK\\x00" (8) | format version uint32 (4) | itemsize uint32 (4) | token count uint64 (8) | 8 zero bytes

Shards are only ever memory-mapped for reading, never loaded whole, so a split may be far larger than RAM.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pascal_dist.errors import UserError

MAGIC = b"PASCTOK\x00"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_SIZE = HEADER.size  # 32
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


class DataError(UserError, ValueError):
    """Bad or inconsistent data on disk or in the arguments; the message is one line naming what and where."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def file_sha256(path: str | Path, skip: int = 0) -> str:
    """sha256 of a file's bytes from offset `skip`, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(skip)
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Streams tokens into one shard file; the header's count is patched in on close()."""

    def __init__(self, path: str | Path, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.tokens = 0
        self._sha = hashlib.sha256()
        self._f: BinaryIO = open(self.path, "wb")
        self._f.write(bytes(HEADER_SIZE))

    def write(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._f.write(data)
        self._sha.update(data)
        self.tokens += len(tokens)

    def close(self) -> dict[str, Any]:
        """Finish the file; returns its manifest entry {file, tokens, sha256} (sha256 of the token bytes)."""
        self._f.seek(0)
        self._f.write(HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.tokens))
        self._f.close()
        return {"file": self.path.name, "tokens": self.tokens, "sha256": self._sha.hexdigest()}


def write_shard(path: str | Path, tokens: np.ndarray) -> dict[str, Any]:
    """Write one whole shard (tokens' dtype must be uint16 or uint32); returns its manifest entry."""
    if np.dtype(tokens.dtype).itemsize not in (2, 4) or np.dtype(tokens.dtype).kind != "u":
        raise DataError(f"{path}: tokens must be uint16 or uint32, got {tokens.dtype}")
    writer = ShardWriter(path, tokens.dtype)
    writer.write(tokens)
    return writer.close()


def read_header(path: str | Path) -> tuple[int, int]:
    """Validate a shard's header and size; returns (itemsize, token count)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise DataError(f"{path}: truncated shard, {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, itemsize, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a token shard, magic {magic!r} != {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {version}, this code reads version {FORMAT_VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: token itemsize {itemsize} in header, expected 2 (uint16) or 4 (uint32)")
    if size != HEADER_SIZE + count * itemsize:
        raise DataError(
            f"{path}: file is {size} bytes but its header promises {count} tokens x {itemsize} bytes "
            f"+ {HEADER_SIZE} (truncated or overwritten shard)"
        )
    return itemsize, count


def open_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (read-only) after checking its header and size."""
    itemsize, count = read_header(path)
    if count == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=f"<u{itemsize}")
    return np.memmap(path, dtype=f"<u{itemsize}", mode="r", offset=HEADER_SIZE, shape=(count,))


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> None:
    with open(Path(data_dir) / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Load manifest.json and check the keys every reader relies on."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path}: no manifest; prepare the data first (python launcher/prepare_data.py --out {data_dir})"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for key in ("format_version", "splits", "tokenizer"):
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest['format_version']}, this code reads {FORMAT_VERSION}")
    return manifest


def check_vocab(manifest: dict[str, Any], expected_vocab_size: int | None, data_dir: str | Path) -> None:
    vocab = manifest["tokenizer"]["vocab_size"]
    if expected_vocab_size is not None and expected_vocab_size != vocab:
        raise DataError(
            f"{Path(data_dir) / MANIFEST}: tokenizer vocab_size {vocab} != model vocab_size "
            f"{expected_vocab_size}; set model.vocab_size={vocab} or prepare data with "
            f"--vocab-size {expected_vocab_size}"
        )


def open_split(
    data_dir: str | Path, split: str, verify: str = "size", expected_vocab_size: int | None = None
) -> list[np.ndarray]:
    """Memory-map every shard of a split, validated against the manifest.

    verify="size" checks headers, counts and file sizes (cheap); "checksum" also hashes every shard.
    """
    if verify not in ("size", "checksum"):
        raise DataError(f"verify={verify!r}, expected 'size' or 'checksum'")
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    check_vocab(manifest, expected_vocab_size, data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir / MANIFEST}: no split {split!r}; available: {sorted(manifest['splits'])}")
    want_itemsize = dtype_for_vocab(manifest["tokenizer"]["vocab_size"]).itemsize
    shards = []
    for entry in manifest["splits"][split]:
        path = data_dir / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        itemsize, count = read_header(path)
        if itemsize != want_itemsize:
            raise DataError(
                f"{path}: tokens stored with itemsize {itemsize}, but vocab_size "
                f"{manifest['tokenizer']['vocab_size']} needs itemsize {want_itemsize}"
            )
        if count != entry["tokens"]:
            raise DataError(f"{path}: header says {count} tokens, manifest says {entry['tokens']}")
        if verify == "checksum":
            verify_shard(path, entry["sha256"], manifest["tokenizer"]["vocab_size"], itemsize)
        shards.append(open_shard(path))
    return shards


def verify_shard(path: Path, sha256: str, vocab_size: int, itemsize: int) -> None:
    """One read of a shard's tokens: their sha256 must be the manifest's and every id below vocab_size."""
    h, dtype, offset = hashlib.sha256(), np.dtype(f"<u{itemsize}"), 0
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        while chunk := f.read(itemsize << 22):  # 4Mi tokens a read
            h.update(chunk)
            ids = np.frombuffer(chunk, dtype=dtype)
            if ids.max(initial=0) >= vocab_size:
                bad = int(np.argmax(ids >= vocab_size))
                raise DataError(
                    f"{path}: token {offset + bad} is id {int(ids[bad])}, not below vocab_size {vocab_size} "
                    "(a damaged shard: prepare the data again)"
                )
            offset += len(ids)
    if (digest := h.hexdigest()) != sha256:
        raise DataError(
            f"{path}: sha256 of the tokens is {digest[:16]}..., manifest says {sha256[:16]}... (a damaged or "
            "replaced shard: prepare the data again)"
        )


def verify_data_dir(data_dir: str | Path) -> dict[str, int]:
    """Check every shard of every split against the manifest (header, size, sha256, ids below the vocabulary);
    returns {"shards", "tokens", "bytes"}. Raises DataError naming the first bad shard."""
    manifest = read_manifest(data_dir)
    totals = {"shards": 0, "tokens": 0, "bytes": 0}
    for split in sorted(manifest["splits"]):
        for shard in open_split(data_dir, split, verify="checksum"):
            totals["shards"] += 1
            totals["tokens"] += len(shard)
            totals["bytes"] += len(shard) * shard.itemsize
    return totals
