"""Merging parts: the part directories of one preparation (`prepare --part i/N`, i = 0..N-1) into the data directory
that one process would have written from the same source, byte for byte.

Parts must agree on everything but their index: settings, source, tokenizer. The merge re-reads every part's tokens
once (checking each shard's sha256 on the way), concatenates them split by split in part order and cuts them into
shards of the preparation's --shard-tokens, so the shard boundaries (and with them the loader's windows) are those
of a single-process run. Document, word and overlap counts are summed. The output is atomic, like a preparation's.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pascal_dist.data.prepare import (
    SplitWriter,
    already_prepared,
    build_atomically,
    check_existing,
    fingerprint,
    parse_part,
    summary,
)
from pascal_dist.data.shards import (
    HEADER_SIZE,
    TOKENIZER,
    DataError,
    file_sha256,
    read_header,
    read_manifest,
    write_manifest,
)

CHUNK_TOKENS = 1 << 22  # tokens read at a time from a part's shard


def _ordered_parts(dirs: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) of each part, in part order; refuses a set that is not parts 0..N-1 of N exactly once."""
    if not dirs:
        raise DataError("--merge: no part directories given")
    by_index: dict[int, tuple[Path, dict[str, Any]]] = {}
    counts: dict[int, Path] = {}
    for d in map(Path, dirs):
        manifest = read_manifest(d)
        part = manifest.get("settings", {}).get("part")
        if part is None:
            raise DataError(f"{d}: not a part (prepared without --part); --merge takes the outputs of prepare --part")
        index, count = parse_part(part)
        counts.setdefault(count, d)
        if len(counts) > 1:
            (n1, d1), (n2, d2) = list(counts.items())[:2]
            raise DataError(f"--merge: {d1} is a part of {n1}, {d2} a part of {n2}: parts of different preparations")
        if index in by_index:
            raise DataError(f"--merge: part {part} given twice: {by_index[index][0]} and {d}")
        by_index[index] = (d, manifest)
    (count,) = counts
    if missing := [f"{i}/{count}" for i in range(count) if i not in by_index]:
        raise DataError(f"--merge: missing part(s) {', '.join(missing)} of {count} (each part is merged exactly once)")
    return [by_index[i] for i in range(count)]


def _check_compatible(parts: list[tuple[Path, dict[str, Any]]]) -> None:
    """Every part must come from the same source with the same settings and the same tokenizer as part 0."""
    d0, m0 = parts[0]
    for d, m in parts[1:]:
        for key in ("format_version", "source", "tokenizer"):
            if m.get(key) != m0.get(key):
                raise DataError(f"--merge: {d} and {d0} differ in {key}: {m.get(key)} != {m0.get(key)}")
        a = {k: v for k, v in m["settings"].items() if k != "part"}
        b = {k: v for k, v in m0["settings"].items() if k != "part"}
        if diff := sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)):
            what = ", ".join(f"{k}={a.get(k)!r} ({d0}: {b.get(k)!r})" for k in diff)
            raise DataError(f"--merge: {d} was prepared with other settings than {d0}: {what}")
    for d, m in parts:
        if (sha := file_sha256(d / TOKENIZER)) != m["tokenizer"]["sha256"]:
            raise DataError(f"{d / TOKENIZER}: sha256 {sha[:16]}... does not match its manifest (a damaged part)")


def _append_shard(path: Path, entry: dict[str, Any], writer: SplitWriter) -> None:
    """Copy one part shard's tokens into the merged split, checking its size and sha256 against its manifest."""
    itemsize, count = read_header(path)
    if count != entry["tokens"]:
        raise DataError(f"{path}: header says {count} tokens, manifest says {entry['tokens']}")
    dtype, sha = np.dtype(f"<u{itemsize}"), hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        while chunk := f.read(itemsize * CHUNK_TOKENS):
            sha.update(chunk)
            writer.write(np.frombuffer(chunk, dtype=dtype), 0)
    if sha.hexdigest() != entry["sha256"]:
        raise DataError(f"{path}: sha256 of the tokens does not match the part's manifest (a damaged part)")


def merge_parts(parts: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Merge the directories of parts 0..N-1 of one preparation into `out_dir`; a no-op if it already holds them."""
    ordered = _ordered_parts(parts)
    _check_compatible(ordered)
    m0 = ordered[0][1]
    settings, desc = {**m0["settings"], "part": None}, m0["source"]
    out = Path(out_dir)
    if out.resolve() in {d.resolve() for d, _ in ordered}:
        raise DataError(f"--merge: --out {out} is one of the parts; write the merged directory elsewhere")
    existing = check_existing(out, settings)
    if existing is not None and already_prepared(out, existing, desc, settings):
        return existing

    def build(tmp: Path) -> dict[str, Any]:
        shutil.copyfile(ordered[0][0] / TOKENIZER, tmp / TOKENIZER)
        dtype = np.dtype(m0["tokenizer"]["dtype"])
        names = list(dict.fromkeys(s for _, m in ordered for s in m["splits"]))
        manifest: dict[str, Any] = {"splits": {}, "documents": {}, "words": {}, "dropped_overlap": 0}
        for name in names:
            writer = SplitWriter(tmp, name, dtype, settings["shard_tokens"])
            for d, m in ordered:
                for entry in m["splits"].get(name, []):
                    _append_shard(d / entry["file"], entry, writer)
            manifest["splits"][name] = writer.close()
        for _, m in ordered:
            for key in ("documents", "words"):
                for name, n in m[key].items():
                    manifest[key][name] = manifest[key].get(name, 0) + n
            manifest["dropped_overlap"] += m["dropped_overlap"]
        manifest.update(
            tokenizer=m0["tokenizer"],
            format_version=m0["format_version"],
            source=desc,
            settings=settings,
            fingerprint=fingerprint(desc, settings),
        )
        write_manifest(tmp, manifest)
        return manifest

    manifest = build_atomically(out, build)
    print(f"{out}: merged {len(ordered)} parts: {summary(manifest)}")
    return manifest
