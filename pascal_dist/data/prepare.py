"""Data preparation: the settings and their check against an existing directory, the tokenizer (trained on a sample
of the train documents, or given), the run over the source's splits, and the atomic output directory.

The pieces live by concern: pascal_dist.data.sources (loading, streaming, parts, batches of raw text),
pascal_dist.data.encode (cleaning, the split rule, token ids), pascal_dist.data.parallel (the worker processes),
pascal_dist.data.merge (parts into one directory), pascal_dist.data.shards (the format). The output directory is
written to a sibling temporary directory and renamed into place, so it exists only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from pascal_dist.data import parallel, sources
from pascal_dist.data.encode import MIN_CHARS, Pipeline, clean, doc_hash, documents, is_val
from pascal_dist.data.parallel import WorkerPool, default_workers, ordered_map, tokenizer_threads
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
from pascal_dist.data.sources import (
    EMBEDDED,
    EVAL_SPLITS,
    SAMPLE_BY,
    RowBatches,
    check_column,
    embedded_files,
    load_source,
    part_of,
    text_batches,
)

__all__ = [
    "EMBEDDED",
    "MIN_CHARS",
    "SAMPLE_BY",
    "SplitWriter",
    "build_tokenizer",
    "clean",
    "doc_hash",
    "embedded_files",
    "is_val",
    "load_source",
    "parse_part",
    "prepare",
]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]
PRELOAD = ("pyarrow", __name__)  # what a worker process imports as it starts: not datasets (see RowBatches)
# Text a task cleans and encodes, in bytes: about a tenth of a second of work on one core, in a worker or here. Tasks
# of 1,024 rows of the benchmark's paragraphs (about 130 KB) spent about 15% more CPU a token, in one process as in
# several; at this size the 50M-token benchmark corpus makes about a hundred tasks, so none waits long at the end, and a
# worker holds a few tasks' text and tokens (IN_FLIGHT), a few MB, whatever the length of the documents.
TASK_BYTES = 2 << 20
# The tokenizer is trained on the first this many train documents, not the whole corpus: a vocabulary of 8192 is
# settled long before (this is millions of tokens), and training is one process's work (about 2 s on one core for
# 50,000 paragraphs of the plays), which the workers wait for. Corpora of fewer train documents (the embedded plays:
# 21,684) train on all of them, as before this setting existed.
DEFAULT_TOKENIZER_SAMPLE = 50_000
# A sample up to this many documents is read first and sent whole to a worker to train on (see _train_in_pool): a
# few hundred MB at most. A larger one, or "all", is streamed into the trainer in this process.
EARLY_SAMPLE_DOCS = 1_000_000


# Recorded in the settings of every directory whose tokenizer was trained here: a change to build_tokenizer must
# bump it, or re-running prepare would call a directory made by the old recipe "already prepared".
TOKENIZER_RECIPE = "bpe-nfkc-whitespace-3"


def build_tokenizer(vocab_size: int, min_frequency: int, docs: Iterator[str]) -> Tokenizer:
    """Train the reference recipe's BPE (NFKC, Whitespace pre-tokenizer, [PAD]/[UNK]/[EOS]) on the given documents.

    Deterministic: the same documents give the same tokenizer.json, byte for byte, in any order (training counts
    words). A continuing-subword prefix ("##") would let decode restore word boundaries, but tokenizers 0.23 then
    assigns the prefixed pieces ids in hash-map order and breaks merge ties differently on every run
    (huggingface/tokenizers#1794): each prepare would make a new tokenizer, and checkpoints would refuse the
    re-prepared data. So pieces decode space-separated ("mis fortune"); the decoder only removes spaces before
    punctuation, and per-word perplexity counts words in the raw text at preparation (manifest "words"), not in
    decoded tokens.
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


class _OnRows:
    """The pipeline on rows [start, stop) of plan entry i, read in the process that runs it."""

    def __init__(self, pipeline: Pipeline, rows: dict[int, RowBatches]) -> None:
        self.pipeline, self.rows = pipeline, rows

    def __call__(self, entry: int, start: int, stop: int) -> tuple[dict[str, tuple[np.ndarray, int, int]], int]:
        return self.pipeline(entry, self.rows[entry](start, stop))


def _as_tasks(batches: Iterator[tuple[int, list[str | None]]]) -> Iterator[tuple[int, list[str | None]]]:
    """Streamed batches (plan entry, rows) as ordered_map's tasks: the first INLINE_BATCHES as they come (done in
    this process while workers would start), then consecutive rows of one entry joined to TASK_BYTES of text."""
    batches = iter(batches)
    yield from itertools.islice(batches, parallel.INLINE_BATCHES)
    for entry, group in itertools.groupby(batches, key=lambda batch: batch[0]):
        texts: list[str | None] = []
        size = 0
        for _, batch in group:
            texts += batch
            size += sum(len(t) for t in batch if t)
            if size >= TASK_BYTES:
                yield entry, texts
                texts, size = [], 0
        if texts:
            yield entry, texts


def parse_part(part: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N), parts numbered from 0 as Slurm array tasks are; None -> None."""
    if part is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", str(part))
    if not m or not int(m[1]) < int(m[2]):
        raise DataError(f"--part {part}: expected I/N with 0 <= I < N (parts are numbered from 0, e.g. 0/16 .. 15/16)")
    return int(m[1]), int(m[2])


def fingerprint(desc: dict[str, Any], settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([desc, settings], sort_keys=True).encode()).hexdigest()


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in keys)


def _as_now(manifest: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A manifest's settings in today's terms. Directories prepared before `tokenizer_sample` existed trained their
    tokenizer on every train document: the same as the sample asked for now if that covers all of them."""
    old = dict(manifest.get("settings", {}))
    if "tokenizer_sample" not in old and old.get("tokenizer") is None:
        sample, trained_on = settings.get("tokenizer_sample"), manifest.get("documents", {}).get("train")
        covered = sample == "all" or (isinstance(sample, int) and trained_on is not None and trained_on <= sample)
        old["tokenizer_sample"] = sample if covered else "all"
    return old


def check_existing(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest already in `out` if its settings match; None if `out` is absent or empty; else DataError."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / MANIFEST).is_file():
        raise DataError(
            f"{out}: exists, is not empty and has no {MANIFEST}; refusing to write there "
            "(choose another --out or delete it)"
        )
    manifest = read_manifest(out)
    if diff := _settings_diff(_as_now(manifest, settings), settings):
        raise DataError(
            f"{out}: already prepared with different settings: {diff}; use another --out or delete the directory"
        )
    return manifest


def already_prepared(out: Path, existing: dict[str, Any], desc: dict[str, Any], settings: dict[str, Any]) -> bool:
    """True (and says so) if `existing` was prepared from this source with these settings; DataError if from another
    source. A manifest from before some settings existed was fingerprinted without them."""
    known = {k: v for k, v in settings.items() if k in existing.get("settings", {})}
    if existing.get("fingerprint") in (fingerprint(desc, settings), fingerprint(desc, known)):
        print(f"{out}: already prepared (fingerprint {existing['fingerprint'][:12]})")
        return True
    raise DataError(
        f"{out}: already prepared from different source data "
        f"(dataset fingerprints {existing.get('source', {}).get('dataset_fingerprints')} "
        f"!= {desc['dataset_fingerprints']}); use another --out or delete the directory"
    )


def build_atomically(out: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """build(tmp) in a sibling temporary directory, renamed to `out` once complete; on any failure, removed."""
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = build(tmp)
        if out.is_dir():  # only an empty directory gets here
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def summary(manifest: dict[str, Any]) -> str:
    return ", ".join(f"{k} {sum(e['tokens'] for e in v):,} tokens" for k, v in manifest["splits"].items())


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
    tokenizer_sample: int | str | None = None,
    workers: int | None = None,
    streaming: bool = False,
    part: str | None = None,
) -> dict[str, Any]:
    """Prepare token shards + tokenizer + manifest in `out_dir`; a no-op if it already holds the same data.

    `tokenizer_sample`: train the tokenizer on the first that many train documents, or "all" (default
    DEFAULT_TOKENIZER_SAMPLE; not with `tokenizer`). `workers`: processes that clean and encode (default: every CPU
    this process may use); the output does not depend on it. `streaming`: read the source without converting it to
    datasets' cache. `part`: "i/N", only the i-th of N contiguous pieces of the source split (the source's own
    evaluation splits go whole into part 0), to be merged by pascal_dist.data.merge.merge_parts. Workers are
    spawned, so a script that calls this with workers > 1 must do so under `if __name__ == "__main__":`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}, expected 0 <= val_fraction < 1")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens}, expected >= 1")
    if sample_by not in SAMPLE_BY:
        raise DataError(f"sample_by={sample_by!r}, expected one of {SAMPLE_BY}")
    if files and source != EMBEDDED:
        raise DataError(f"give either --source ({source!r}) or --files, not both")
    if workers is not None and not _is_count(workers):
        raise DataError(f"--workers {workers}: expected a number of processes >= 1")
    if tokenizer and tokenizer_sample is not None:
        raise DataError("give --tokenizer or --tokenizer-sample, not both (a given tokenizer is not trained)")
    sample = None if tokenizer else DEFAULT_TOKENIZER_SAMPLE if tokenizer_sample is None else tokenizer_sample
    if sample is not None and sample != "all" and not _is_count(sample):
        raise DataError(f"--tokenizer-sample {tokenizer_sample}: expected a number of documents >= 1, or 'all'")
    piece = parse_part(part)
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
        "tokenizer_sample": sample,
        "shard_tokens": shard_tokens,
        "sample_by": sample_by,
        "part": f"{piece[0]}/{piece[1]}" if piece else None,
    }
    out = Path(out_dir)
    existing = check_existing(out, settings)

    workers = workers or default_workers()
    # A large local materialised source gets its worker processes first: they start (interpreter and imports, about a
    # second of CPU each) while this process imports datasets and loads the source, not while it trains the tokenizer.
    early = workers > 1 and not streaming and sources.is_large_local(source, config, files)
    with WorkerPool(workers, PRELOAD) if early else contextlib.nullcontext() as pool:
        trained = _train_in_pool(pool, source, settings) if pool and existing is None else None
        splits, desc = load_source(source, config, files, sample_by, streaming, workers)
        if existing is not None and already_prepared(out, existing, desc, settings):
            return existing
        if split not in splits:
            raise DataError(f"source {source!r} has no split {split!r}; available: {sorted(splits)}")
        for name in [split, *(n for n in EVAL_SPLITS if n in splits)]:
            check_column(splits[name], text_column, source, name)

        def build(tmp: Path) -> dict[str, Any]:
            manifest = _write_all(tmp, splits, settings, workers, pool, trained)
            manifest.update(
                format_version=FORMAT_VERSION, source=desc, settings=settings, fingerprint=fingerprint(desc, settings)
            )
            write_manifest(tmp, manifest)
            return manifest

        with tokenizer_threads(workers):
            manifest = build_atomically(out, build)
    vocab = manifest["tokenizer"]["vocab_size"]
    short = not tokenizer and vocab != vocab_size
    note = f" (the corpus supports only {vocab} of the {vocab_size} requested)" if short else ""
    what = f"part {settings['part']}: " if piece else ""
    print(f"{out}: prepared {what}{summary(manifest)}; vocab_size {vocab}{note}")
    return manifest


def _plan(splits: dict[str, Any], split: str) -> list[tuple[str, Any]]:
    """(name, split) in the order they are written: the source's evaluation splits first and its training split last,
    so that each one's documents can be withheld from every later one and no text lands in two splits."""
    plan = [(f"source_{n}", splits[n]) for n in EVAL_SPLITS if n in splits and n != split]
    return [*plan, ("train", splits[split])]


def _docs(name: str, ds: Any, settings: dict[str, Any]) -> Iterator[tuple[str, bytes]]:
    source = settings["source"] or "--files"
    return (d for texts in text_batches(ds, settings["text_column"], source, name) for d in documents(texts))


def _withheld(plan: list[tuple[str, Any]], settings: dict[str, Any]) -> list[frozenset[bytes]]:
    """withheld[i]: the hashes of the documents of the plan's entries before i (the evaluation splits are small)."""
    withheld: list[frozenset[bytes]] = [frozenset()]
    for name, ds in plan[:-1]:
        withheld.append(withheld[-1] | {digest for _, digest in _docs(name, ds, settings)})
    return withheld


def _sample(plan: list[tuple[str, Any]], withheld: frozenset[bytes], settings: dict[str, Any]) -> Iterator[str]:
    """The tokenizer's sample: the first `tokenizer_sample` documents that go to train, from the start of the whole
    split in every part."""
    sample, val_fraction = settings["tokenizer_sample"], settings["val_fraction"]
    train = (d for d, h in _docs("train", plan[-1][1], settings) if h not in withheld and not is_val(h, val_fraction))
    return train if sample == "all" else itertools.islice(train, sample)


def _trained_json(vocab_size: int, min_frequency: int, docs: list[str]) -> str:
    return build_tokenizer(vocab_size, min_frequency, iter(docs)).to_str()


def _train_in_pool(pool: WorkerPool, source: str, settings: dict[str, Any]) -> Future | None:
    """Start training the tokenizer in a worker, on the sample read from the source streamed, so that it trains
    while this process converts the source to datasets' cache (about 1.5 s each at 50M tokens, which one process did
    one after the other). Streamed and materialised, a source gives the same rows in the same order, so the same
    sample and the same tokenizer. None where the tokenizer is given, where the sample is too large to hold and send
    (EARLY_SAMPLE_DOCS), or where the source has no such split (the materialised load then says so)."""
    sample = settings["tokenizer_sample"]
    if settings["tokenizer"] or sample == "all" or sample > EARLY_SAMPLE_DOCS:
        return None
    streamed, _ = load_source(source, settings["config"], settings["files"], settings["sample_by"], streaming=True)
    if settings["split"] not in streamed:
        return None
    plan = _plan(streamed, settings["split"])
    docs = list(_sample(plan, _withheld(plan, settings)[-1], settings))
    return pool.submit(_trained_json, settings["vocab_size"], settings["min_frequency"], docs)


def _write_all(
    tmp: Path,
    splits: dict[str, Any],
    settings: dict[str, Any],
    workers: int,
    pool: WorkerPool | None,
    trained: Future | None = None,
) -> dict[str, Any]:
    """Tokenize every split (or this part of them) into `tmp`, in `pool` if the source is materialised and large
    (a pool is started here if none was given); returns the manifest's splits, documents, words and tokenizer."""
    # Source eval splits go first and each one's documents are withheld from every later split (train last),
    # so no text lands in two splits. withheld[i] = hashes of the eval splits before plan[i]. Every part reads the
    # eval splits whole for this (they are small); part 0 writes them.
    plan = _plan(splits, settings["split"])
    index, count = parse_part(settings["part"]) or (0, 1)
    todo = [  # (plan index, name, rows this run encodes: train's part, an eval split whole)
        (i, name, part_of(ds, settings["text_column"], *((index, count) if name == "train" else (0, 1)), name))
        for i, (name, ds) in enumerate(plan)
        if name == "train" or index == 0
    ]
    # A materialised source knows its size: a large one goes to the workers, each reading its own rows. A streamed
    # or small one is read here (a streamed one's first batches done here while workers would start; a small one
    # never pays for them).
    if all(isinstance(rows, RowBatches) for _, _, rows in todo):
        size = sum(rows.stop - rows.start for _, _, rows in todo)
    else:
        size = 0
    large = workers > 1 and size > parallel.INLINE_BATCHES * sources.READ_BATCH
    with contextlib.ExitStack() as stack:
        if large and pool is None:
            pool = stack.enter_context(WorkerPool(workers, PRELOAD))
        return _tokenize(tmp, plan, todo, settings, workers, pool if large else None, trained)


def _tokenize(
    tmp: Path,
    plan: list[tuple[str, Any]],
    todo: list[tuple[int, str, Any]],
    settings: dict[str, Any],
    workers: int,
    pool: WorkerPool | None,
    trained: Future | None,
) -> dict[str, Any]:
    """_write_all's work: the withheld hashes, the tokenizer (given, `trained` already, or trained here), and every
    task encoded and written in order. A materialised source's tasks are row ranges, read where they run (in `pool`
    if given, else here); a streamed source is read here and its text given to ordered_map."""
    source, column, val_fraction = settings["source"] or "--files", settings["text_column"], settings["val_fraction"]
    tokenizer = settings["tokenizer"]
    withheld = _withheld(plan, settings)
    if tokenizer:
        tok = Tokenizer.from_file(tokenizer)
    elif trained is not None:
        tok = Tokenizer.from_str(trained.result())
    else:
        tok = build_tokenizer(settings["vocab_size"], settings["min_frequency"], _sample(plan, withheld[-1], settings))
    eos = tok.token_to_id("[EOS]")
    if eos is None:
        raise DataError(f"{tokenizer}: tokenizer has no [EOS] token")
    vocab = tok.get_vocab_size()
    dtype = dtype_for_vocab(vocab)
    tok.save(str(tmp / TOKENIZER))

    writers = {
        dest: SplitWriter(tmp, dest, dtype, settings["shard_tokens"])
        for _, name, _ in todo
        for dest in (["train", "val"] if name == "train" else [name])
    }
    pipeline = Pipeline(tok.to_str(), val_fraction, [(name, w) for (name, _), w in zip(plan, withheld)])
    words: dict[str, int] = {}  # whitespace words of the raw documents: the per-word perplexity denominator
    overlap = 0
    bar = tqdm(desc="encoding", unit="tok", unit_scale=True, file=sys.stderr)
    if all(isinstance(rows, RowBatches) for _, _, rows in todo):  # materialised: read where the tasks run
        rows = {i: batches for i, _, batches in todo}
        ranges = ((i, a, b) for i, r in rows.items() for a, b in r.ranges(r.rows_of(TASK_BYTES)))
        on_rows = _OnRows(pipeline, rows)
        results = pool.map(on_rows, ranges) if pool else (on_rows(*task) for task in ranges)
    else:  # streamed: read here
        tasks = ((i, texts) for i, name, ds in todo for texts in text_batches(ds, column, source, name))
        results = ordered_map(pipeline, _as_tasks(tasks), workers)
    for routed, dropped in results:
        overlap += dropped
        for dest, (ids, n_docs, n_words) in routed.items():
            writers[dest].write(ids, n_docs)
            words[dest] = words.get(dest, 0) + n_words
            bar.update(len(ids))
    bar.close()
    return {
        "splits": {k: w.close() for k, w in writers.items()},
        "documents": {k: w.documents for k, w in writers.items()},
        "words": words,
        "dropped_overlap": overlap,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": file_sha256(tmp / TOKENIZER),
            "vocab_size": vocab,
            "eos_id": eos,
            "dtype": dtype.name,
        },
    }
