"""Data: preparation (sources, tokenizer, shards), the shard format, and the resumable sharded loader.

The loader (torch) is imported lazily so `pascal-dist prepare` starts fast; `datasets` is imported only when loading.
`prepare` is imported eagerly: the function shares its module's name, and a lazy attribute would be shadowed
by the submodule once anything imports `pascal_dist.data.prepare`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from pascal_dist.data.prepare import prepare
from pascal_dist.data.shards import DataError, open_shard, open_split, read_manifest, write_shard

_LAZY = ("TrainLoader", "val_batches", "read_vocab_size")

__all__ = ["DataError", "open_shard", "open_split", "prepare", "read_manifest", "write_shard", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pascal_dist.data' has no attribute {name!r}")
    return getattr(import_module("pascal_dist.data.loader"), name)
