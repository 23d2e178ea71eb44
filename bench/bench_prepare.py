"""Benchmark: prepare the embedded corpus (42 plays) into a temp dir; tokenizer training and encoding timed apart (the
tokenizer's own `encode_batch` and the preparation's encoder side by side). bench/bench_prepare_scale.py measures
preparation at scale: workers, streaming, parts."""

from __future__ import annotations

import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pascal_dist.data.encode import Encoder  # noqa: E402
from pascal_dist.data.prepare import build_tokenizer, clean, load_source, prepare  # noqa: E402
from pascal_dist.data.sources import READ_BATCH  # noqa: E402


def main() -> None:
    t0 = time.perf_counter()
    splits, _ = load_source("embedded", None, None, "paragraph")
    docs = [d for t in splits["train"]["text"] if len(d := clean(t)) > 50]
    t_load = time.perf_counter() - t0
    chars = sum(map(len, docs))

    t0 = time.perf_counter()
    tok = build_tokenizer(8192, 2, iter(docs))
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), READ_BATCH):
        encs = tok.encode_batch(docs[i : i + READ_BATCH], add_special_tokens=False)
        tokens += len(np.fromiter(itertools.chain.from_iterable(e.ids + [2] for e in encs), dtype=np.uint16))
    t_encode = time.perf_counter() - t0

    t0 = time.perf_counter()
    encoder = Encoder(tok.to_str())
    fast_tokens = sum(len(encoder(docs[i : i + READ_BATCH])[0]) for i in range(0, len(docs), READ_BATCH))
    t_fast = time.perf_counter() - t0
    assert fast_tokens == tokens

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prepare(Path(tmp) / "embedded")
        t_prepare = time.perf_counter() - t0

    print(
        f"\nembedded corpus: {len(docs):,} documents, {chars / 1e6:.2f} M characters, {tokens:,} tokens (vocab 8192)\n"
    )
    print("| stage | seconds | tokens/s |")
    print("|---|---|---|")
    print(f"| load + clean (datasets `text` builder, cached) | {t_load:.2f} | |")
    print(f"| BPE training (vocab 8192) | {t_train:.2f} | {tokens / t_train / 1e6:.2f} M |")
    print(
        f"| encoding (`encode_batch`, {READ_BATCH} docs/batch, all cores) | {t_encode:.2f} | "
        f"{tokens / t_encode / 1e6:.2f} M |"
    )
    print(
        f"| encoding (the preparation's encoder, chunk-by-chunk fast path, 1 core) | {t_fast:.2f} | "
        f"{tokens / t_fast / 1e6:.2f} M |"
    )
    print(
        f"| whole `prepare()` (load, split, train, encode, write shards) | {t_prepare:.2f} | "
        f"{tokens / t_prepare / 1e6:.2f} M |"
    )


if __name__ == "__main__":
    main()
