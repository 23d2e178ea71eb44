"""The encoder gives exactly the tokenizer's ids: chunk by chunk on plain-ASCII documents (the fast path), whole on any
other; both checked against `Tokenizer.encode` on real text, on every ASCII character and on the cases that must
leave the fast path (non-ASCII, control characters, special tokens' text), for the recipe's tokenizer and others."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from pascal_dist.data.encode import Encoder, Pipeline, clean, documents, fast_path_applies
from pascal_dist.data.prepare import build_tokenizer
from pascal_dist.data.sources import embedded_files
from tests.unit.data.test_prepare import corpus

TRICKY = [
    "snake_case_names and ALLCAPS, digits 3.14159 and 1,000,000 -- dashes; (brackets) [square] {curly} <angle>!",
    "tabs\tand\r\nwindows line ends\rand bare returns ... ?!?! ''quotes'' \"double\" `backticks` ~tilde^caret|pipe",
    "a document with the special token's text [EOS] inside, and [PAD] and [UNK] too, which the tokenizer matches",
    "Café naïve façade: accented letters (NFKC composes them) and the ligature ﬁne, full-width ＡＢＣ, ① and ²",
    "non-breaking\u00a0space, em dash \u2014 and ellipsis \u2026, a zero-width\u200bspace and a BOM \ufeff here",
    "control characters: vertical\x0btab, form\x0cfeed, file\x1cseparator, unit\x1fseparator, and\x00null, del\x7f",
    "emoji 🙂 and CJK 漢字 and Greek αβγ and Cyrillic жизнь mixed with plain words for the remaining characters",
]


def reference(tok: Tokenizer, docs: list[str]) -> tuple[np.ndarray, int]:
    """The tokenizer's own ids, [EOS] after each document, and Python's whitespace word count."""
    eos = tok.token_to_id("[EOS]")
    ids = np.array([i for d in docs for i in tok.encode(d, add_special_tokens=False).ids + [eos]])
    return ids, sum(len(d.split()) for d in docs)


def assert_encodes_like_the_tokenizer(encoder: Encoder, tok: Tokenizer, docs: list[str]) -> None:
    (ids, words), (want_ids, want_words) = encoder(docs), reference(tok, docs)
    np.testing.assert_array_equal(ids, want_ids)
    assert words == want_words


def random_ascii(rng: random.Random, n: int) -> list[str]:
    """Documents of words and every ASCII character: printable ones, tab, newline and return mostly, the other
    control characters rarely (a document with one leaves the fast path)."""
    alphabet = [chr(c) for c in range(128)]
    weights = [1.0 if chr(c) in "\t\n\r" else 0.05 if c < 32 or c == 127 else 3.0 for c in range(128)]
    words = "the of and king queen river _under_score x1 42 3rd".split()
    return [
        "".join(rng.choice(words) + " " if rng.random() < 0.5 else rng.choices(alphabet, weights)[0] for _ in range(80))
        for _ in range(300)
    ]


@pytest.fixture(scope="module")
def recipe_tokenizer() -> Tokenizer:
    # trained without "~", "`" or "^" in its text, so those become [UNK]: the fast path must agree there too
    docs = [d.replace("~", "").replace("`", "").replace("^", "") for d in corpus(np.random.default_rng(0), 300)]
    return build_tokenizer(300, 2, iter(docs))


def test_fast_path_equals_the_tokenizer_on_real_and_adversarial_text(recipe_tokenizer: Tokenizer) -> None:
    encoder = Encoder(recipe_tokenizer.to_str())
    assert encoder.fast
    plays = [doc for path in embedded_files()[:3] for doc, _ in documents(open(path).read().split("\n\n"))]
    mixed = random_ascii(random.Random(0), 300) + [clean(t) for t in TRICKY]
    random.Random(1).shuffle(mixed)
    for docs in (plays, mixed, TRICKY):
        assert_encodes_like_the_tokenizer(encoder, recipe_tokenizer, docs)
    # The test has teeth: most of the plays and random text took the fast path, the tricky documents did not.
    assert sum(map(encoder.plain, plays)) > 0.95 * len(plays) and sum(map(encoder.plain, mixed)) > 100
    assert [encoder.plain(clean(t)) for t in TRICKY] == [True, True] + [False] * 5
    assert len(encoder.chunks) > 1000


def test_other_tokenizers_are_encoded_whole() -> None:
    """A tokenizer whose normalizer or pre-tokenizer the fast path does not model is never split by it."""
    docs = [clean(t) for t in TRICKY] + random_ascii(random.Random(2), 50)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[EOS]"], show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    spec = json.loads(tok.to_str())
    assert not fast_path_applies(spec)
    encoder = Encoder(tok.to_str())
    assert not any(map(encoder.plain, docs))
    assert_encodes_like_the_tokenizer(encoder, tok, docs)
    recipe = json.loads(build_tokenizer(300, 2, iter(docs)).to_str())
    assert fast_path_applies(recipe)
    assert not fast_path_applies({**recipe, "truncation": {"max_length": 8}})


def test_pipeline_routes_counts_and_withholds(recipe_tokenizer: Tokenizer) -> None:
    texts = corpus(np.random.default_rng(5), 80) + [None, ""]
    kept = [d for d, _ in documents(texts)]
    withheld = frozenset(h for _, h in list(documents(texts))[:7])
    pipe = Pipeline(recipe_tokenizer.to_str(), 0.3, [("source_test", frozenset()), ("train", withheld)])
    out, dropped = pipe(1, texts)
    assert dropped == sum(1 for _, h in documents(texts) if h in withheld) >= 7
    assert sorted(out) == ["train", "val"] and sum(n for _, n, _ in out.values()) == len(kept) - dropped
    out, dropped = pipe(0, texts)
    assert list(out) == ["source_test"] and dropped == 0
    ids, n_docs, n_words = out["source_test"]
    want_ids, want_words = reference(recipe_tokenizer, kept)
    np.testing.assert_array_equal(ids, want_ids)
    assert (n_docs, n_words) == (len(kept), want_words)
