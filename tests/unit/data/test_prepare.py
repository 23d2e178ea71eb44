"""Preparation end to end: cleaning, hash split, source splits, round trip, idempotence, atomicity, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from pascal_dist.data import DataError, open_shard, open_split, prepare, read_manifest
from pascal_dist.data.loader import Windows
from tests.helpers import REPO

ROOT = Path(REPO)
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more out up into do any "
    "king queen river castle night morning letter battle garden winter city music stone bridge sailor "
    "quickly slowly bright silent ancient golden forgotten broken gentle"
).split()
SYLLABLES = "ka ren do mi sol tha ver un ing est lo qua bri sen tor al ex pen dor ly".split()
LEXICON = list(WORDS) + ["".join(np.random.default_rng(i).choice(SYLLABLES, 1 + i % 3)) for i in range(1500)]
ZIPF = 1.0 / np.arange(1, len(LEXICON) + 1)
VOCAB = 400


def english(rng: np.random.Generator, sentences: int) -> str:
    """English-like prose: common words plus made-up ones, Zipf-distributed, so BPE has merges to learn."""
    out = []
    for _ in range(sentences):
        words = rng.choice(LEXICON, rng.integers(4, 16), p=ZIPF / ZIPF.sum())
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ","]))
    return " ".join(out)


def corpus(rng: np.random.Generator, n: int) -> list[str]:
    """Varied documents: short ones (dropped), ones with blank-line runs (cleaned), and some duplicates."""
    docs = [english(rng, int(rng.integers(1, 12))) + "\n\n\n  \n" + english(rng, 2) for _ in range(n)]
    docs += ["Too short to keep.", "  \n\n  "] + docs[:20]
    return docs


def expected_docs(docs: list[str], val_fraction: float, withheld: set[str] = frozenset()) -> dict[str, list[str]]:
    """The split rule restated independently of the code under test."""
    out: dict[str, list[str]] = {"train": [], "val": []}
    for doc in docs:
        doc = re.sub(r"\n\s*\n", "\n", doc).strip()
        if len(doc) > 50 and doc not in withheld:
            h = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big")
            out["val" if h / 2**64 < val_fraction else "train"].append(doc)
    return out


def split_tokens(out: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in open_split(out, split, verify="checksum")])


def doc_set(out: Path, split: str) -> set[tuple[int, ...]]:
    """Documents of a split as token tuples, cut at [EOS]."""
    eos = read_manifest(out)["tokenizer"]["eos_id"]
    tokens = split_tokens(out, split).tolist()
    docs, cur = set(), []
    for t in tokens:
        if t == eos:
            docs.add(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "split does not end with [EOS]"
    return docs


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    docs = corpus(np.random.default_rng(0), 600)
    path = tmp_path_factory.mktemp("src") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path, docs


@pytest.fixture(scope="module")
def prepared(jsonl, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "out"
    prepare(out, files=[str(jsonl[0])], vocab_size=VOCAB, val_fraction=0.2, shard_tokens=9000)
    return out


def test_round_trip_documents_to_shards_to_loader(prepared: Path, jsonl) -> None:
    m = read_manifest(prepared)
    assert sorted(p.name for p in prepared.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json"] + [e["file"] for s in m["splits"].values() for e in s]
    )
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    eos = tok.token_to_id("[EOS]")
    assert m["tokenizer"]["eos_id"] == eos and m["tokenizer"]["vocab_size"] == VOCAB == tok.get_vocab_size()
    for split, docs in expected_docs(jsonl[1], 0.2).items():
        stream = [t for d in docs for t in tok.encode(d).ids + [eos]]
        np.testing.assert_array_equal(split_tokens(prepared, split), stream)
        assert m["documents"][split] == len(docs)
    entries = m["splits"]["train"]
    assert len(entries) > 1 and all(e["tokens"] <= 9000 for e in entries)
    assert all(open_shard(prepared / e["file"]).dtype == np.uint16 for e in entries)
    win = Windows(prepared, "train", 32)
    shards = [np.asarray(s) for s in open_split(prepared, "train")]
    want = np.concatenate([[s[i * 32 : i * 32 + 33] for i in range((len(s) - 1) // 32)] for s in shards])
    np.testing.assert_array_equal(win.gather(np.arange(win.num_samples)), want)


def test_train_and_val_are_disjoint_documents(prepared: Path) -> None:
    train, val = doc_set(prepared, "train"), doc_set(prepared, "val")
    assert len(val) > 20 and len(train) > 4 * len(val) and not train & val


def test_second_prepare_is_a_noop(prepared: Path, jsonl, capsys) -> None:
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.iterdir()}
    m = prepare(prepared, files=[str(jsonl[0])], vocab_size=VOCAB, val_fraction=0.2, shard_tokens=9000)
    assert "already prepared" in capsys.readouterr().out
    assert m == read_manifest(prepared)
    with pytest.raises(DataError, match=r"different settings: val_fraction=0\.2 \(now 0\.1\), vocab_size=400"):
        prepare(prepared, files=[str(jsonl[0])], vocab_size=512, val_fraction=0.1, shard_tokens=9000)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.iterdir()} == before
    assert [p.name for p in prepared.parent.iterdir()] == ["out"]


def test_given_tokenizer_reproduces_the_tokens(prepared: Path, jsonl, tmp_path: Path) -> None:
    out = tmp_path / "again"
    prepare(out, files=[str(jsonl[0])], tokenizer=str(prepared / "tokenizer.json"), val_fraction=0.2)
    assert read_manifest(out)["settings"]["tokenizer_sha256"] == read_manifest(prepared)["tokenizer"]["sha256"]
    np.testing.assert_array_equal(split_tokens(out, "train"), split_tokens(prepared, "train"))


def test_interrupted_prepare_leaves_nothing(jsonl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        import_module("pascal_dist.data.prepare"), "write_manifest", boom
    )  # after every shard is written, before the rename
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "out", files=[str(jsonl[0])], vocab_size=VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_refuses_foreign_directory_and_bad_input(jsonl, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=f"{tmp_path}: exists, is not empty and has no manifest.json"):
        prepare(tmp_path, files=[str(jsonl[0])], vocab_size=VOCAB)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    with pytest.raises(DataError, match=r"no column 'body'; available: \['text', 'id'\]"):
        prepare(tmp_path / "o", files=[str(jsonl[0])], text_column="body")
    with pytest.raises(DataError, match="expected files of one type"):
        prepare(tmp_path / "o", files=[str(jsonl[0]), str(tmp_path / "notes.txt")])
    with pytest.raises(DataError, match="val_fraction=1.5"):
        prepare(tmp_path / "o", val_fraction=1.5)


def write_wikitext(root: Path, rng: np.random.Generator) -> dict[str, list[str]]:
    """WikiText's layout and row style: ' = Title = ', paragraphs, blank rows; val/test share some train rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list[str]] = {}
    for split, n in (("train", 300), ("validation", 40), ("test", 40)):
        rows[split] = []
        for _ in range(n):
            rows[split] += [" = " + english(rng, 1)[:20] + " = \n", "", " " + english(rng, 6) + " \n", ""]
    rows["validation"] += rows["train"][2:40:4]  # train paragraphs that must only be in validation
    rows["test"] += rows["train"][42:60:4] + rows["validation"][2:10:4]
    (root / "wikitext-103-raw-v1").mkdir(parents=True)
    for split, texts in rows.items():
        pq.write_table(pa.table({"text": texts}), root / "wikitext-103-raw-v1" / f"{split}-00000-of-00001.parquet")
    return rows


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "launcher/prepare_data.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_local_wikitext_dir_keeps_source_splits_apart(tmp_path: Path) -> None:
    write_wikitext(tmp_path / "wt", np.random.default_rng(1))
    out = tmp_path / "out"
    r = cli(
        "--source",
        str(tmp_path / "wt"),
        "--config",
        "wikitext-103-raw-v1",
        "--out",
        str(out),
        "--vocab-size",
        str(VOCAB),
        home=tmp_path / "hf",
    )
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    names = ["source_test", "source_validation", "train", "val"]
    assert sorted(m["splits"]) == names and m["source"]["kind"] == "local_dir"
    assert set(m["source"]["dataset_fingerprints"]) == {"test", "train", "validation"}
    assert m["dropped_overlap"] == 10 + 5 + 2  # planted duplicates removed from train and from test
    docs = {n: doc_set(out, n) for n in names}
    assert all(docs[n] for n in names)
    assert all(not docs[a] & docs[b] for a in names for b in names if a < b)


def test_hub_source_offline_fails_fast_with_hint(tmp_path: Path) -> None:
    start = time.monotonic()
    r = cli(
        "--source", "wikitext", "--config", "wikitext-103-raw-v1", "--out", str(tmp_path / "o"), home=tmp_path / "hf"
    )
    assert time.monotonic() - start < 10
    assert r.returncode == 2 and not (tmp_path / "o").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'wikitext'" in lines[0] and "--source embedded" in lines[0], r.stderr


def test_cli_defaults_on_the_embedded_corpus(tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    r = cli("--out", str(out), home=tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    m = read_manifest(out)
    assert m["source"]["kind"] == "embedded" and len(m["source"]["files"]) == 42
    assert m["tokenizer"]["vocab_size"] == 8192 and m["settings"]["sample_by"] == "paragraph"
    train, val = (sum(e["tokens"] for e in m["splits"][s]) for s in ("train", "val"))
    assert train > 1_000_000 and 0.03 < val / (train + val) < 0.07
    open_split(out, "train", verify="checksum", expected_vocab_size=8192)
    r = cli("--out", str(out), home=tmp_path / "hf")
    assert r.returncode == 0 and "already prepared" in r.stdout


def test_preparation_is_deterministic_and_counts_raw_words(tmp_path: Path, jsonl) -> None:
    """Two fresh preparations give the same tokenizer and shards byte for byte (a BPE trained with a
    continuing-subword prefix did not: tokenizers#1794), and the manifest counts the raw text's words."""
    a = prepare(tmp_path / "a", files=[str(jsonl[0])], vocab_size=300, val_fraction=0.2)
    b = prepare(tmp_path / "b", files=[str(jsonl[0])], vocab_size=300, val_fraction=0.2)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a["splits"] == b["splits"]  # same shard files, token counts and checksums
    expected = expected_docs(jsonl[1], 0.2)
    assert a["words"] == {split: sum(len(d.split()) for d in docs) for split, docs in expected.items()}
