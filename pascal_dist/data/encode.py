"""Documents to token ids: cleaning, the document hash and the split rule, and `Pipeline`, which turns one batch of
raw rows into each destination split's token ids.

`Pipeline` is a pure function of its inputs (the tokenizer, the split rule, the withheld documents), so batches can
be processed in any process and their results concatenated in order (pascal_dist.data.parallel): one worker or
many write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

from pascal_dist.data.shards import dtype_for_vocab

MIN_CHARS = 50  # documents of this length or less are dropped (the reference recipe's cleaning)
_BLANK_RUNS = re.compile(r"\n\s*\n")


def clean(text: str) -> str:
    """Collapse runs of blank lines to one newline and strip."""
    return _BLANK_RUNS.sub("\n", text).strip()


def doc_hash(doc: str) -> bytes:
    return hashlib.sha256(doc.encode("utf-8")).digest()


def is_val(digest: bytes, val_fraction: float) -> bool:
    """Deterministic document-level split: the first 8 hash bytes as a fraction of 2**64."""
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def documents(texts: Iterable[str | None]) -> Iterator[tuple[str, bytes]]:
    """The kept documents of raw rows, cleaned, with their hashes."""
    for text in texts:
        if text and len(doc := clean(text)) > MIN_CHARS:
            yield doc, doc_hash(doc)


# The fast path. The recipe's tokenizer (NFKC, the Whitespace pre-tokenizer, BPE) never lets a token span whitespace:
# the pre-tokenizer drops every whitespace character and cuts there, and the model encodes each piece on its own. On
# text made only of printable ASCII, tab, newline and carriage return, NFKC changes nothing and Python's str.split()
# cuts at exactly those whitespace characters. So such a document's ids are the ids of its whitespace-separated
# chunks in order, each chunk encoded once by the tokenizer itself and then looked up as the bytes the shard stores:
# several times faster than encoding whole documents, where the tokenizer tracks offsets and alignments for every
# character. Any other document, and any that contains an added token's text ("[EOS]"), which the tokenizer matches
# before splitting, is encoded whole by the tokenizer. tests/unit/data/test_encode.py checks both against it.
_PLAIN = re.compile(r"[\t\n\r\x20-\x7e]*")
_DOC_END = "\x00"  # joins plain documents (never in one) and stands for [EOS]: a chunk of its own between spaces
CHUNK_CACHE = 1 << 20  # chunks kept per process (150 MB at most); frequent ones come early, so the bound costs little


def fast_path_applies(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer (its JSON) encodes plain-ASCII text chunk by chunk as the fast path assumes."""
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") in (None, {"type": "NFKC"})
        and spec.get("pre_tokenizer") == {"type": "Whitespace"}
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and spec.get("truncation") is None
        and spec.get("padding") is None
    )


class _ChunkIds(dict):
    """Whitespace-free chunk of plain text -> its token ids as shard bytes, filled on first use by the tokenizer."""

    def __init__(self, tok: Tokenizer, eos: int, dtype: np.dtype) -> None:
        super().__init__({_DOC_END: np.array([eos], dtype).tobytes()})
        self.tok, self.dtype = tok, dtype

    def __missing__(self, chunk: str) -> bytes:
        data = np.array(self.tok.encode(chunk, add_special_tokens=False).ids, self.dtype).tobytes()
        if len(self) < CHUNK_CACHE:
            self[chunk] = data
        return data


class Encoder:
    """Token ids of documents, each followed by [EOS] (exactly what the tokenizer gives, faster on plain text), and
    their whitespace word count."""

    def __init__(self, tokenizer_json: str) -> None:
        spec = json.loads(tokenizer_json)
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.eos = self.tok.token_to_id("[EOS]")
        self.dtype = dtype_for_vocab(self.tok.get_vocab_size())
        self.fast = fast_path_applies(spec)
        added = [re.escape(t["content"]) for t in spec.get("added_tokens") or []]
        self.added = re.compile("|".join(added)) if added else None
        self.chunks = _ChunkIds(self.tok, self.eos, self.dtype)

    def plain(self, doc: str) -> bool:
        """Whether the fast path encodes `doc`: plain characters only, and no added token's text."""
        return (
            self.fast and _PLAIN.fullmatch(doc) is not None and (self.added is None or self.added.search(doc) is None)
        )

    def __call__(self, docs: Sequence[str]) -> tuple[np.ndarray, int]:
        pieces: list[bytes] = []
        words = 0
        run: list[str] = []  # consecutive plain documents, split and looked up together
        for doc in docs:
            if self.plain(doc):
                run.append(doc)
                continue
            if run:
                words += self._plain(run, pieces)
                run = []
            pieces.append(
                np.array(self.tok.encode(doc, add_special_tokens=False).ids + [self.eos], self.dtype).tobytes()
            )
            words += len(doc.split())
        if run:
            words += self._plain(run, pieces)
        return np.frombuffer(b"".join(pieces), dtype=self.dtype), words

    def _plain(self, run: list[str], pieces: list[bytes]) -> int:
        """Append the ids of plain documents to `pieces`; returns their word count."""
        chunks = f" {_DOC_END} ".join(run).split()
        chunks.append(_DOC_END)
        pieces.append(b"".join(map(self.chunks.__getitem__, chunks)))
        return len(chunks) - len(run)


class Pipeline:
    """One batch of raw rows of one plan entry -> per destination split (token ids, documents, raw words), and the
    number of documents withheld because an earlier split holds them.

    `entries[i]` is (split name, hashes withheld from it); the entry named "train" is the source's training split,
    which the hash rule divides into train and val. Pickled to each worker process; the encoder is built there.
    """

    def __init__(self, tokenizer_json: str, val_fraction: float, entries: Sequence[tuple[str, frozenset]]) -> None:
        self.tokenizer_json, self.val_fraction, self.entries = tokenizer_json, val_fraction, list(entries)
        self._encoder: Encoder | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_encoder": None}

    def __call__(self, entry: int, texts: Sequence[str | None]) -> tuple[dict[str, tuple[np.ndarray, int, int]], int]:
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer_json)
        name, withheld = self.entries[entry]
        routed: dict[str, list[str]] = {}
        overlap = 0
        for doc, digest in documents(texts):
            if digest in withheld:
                overlap += 1
            elif name != "train":
                routed.setdefault(name, []).append(doc)
            else:
                routed.setdefault("val" if is_val(digest, self.val_fraction) else "train", []).append(doc)
        out = {}
        for dest, docs in routed.items():
            ids, words = self._encoder(docs)  # words: whitespace words, the per-word perplexity denominator
            out[dest] = (ids, len(docs), words)
        return out, overlap
