"""Streamed sources and the tokenizer sample, offline on local .jsonl and .txt files: streaming writes the same shards
and tokenizer as materialising; the tokenizer is trained on exactly the first DOCS train documents; directories
prepared before the sample setting existed are still recognised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pascal_dist.data import DataError, prepare, read_manifest
from pascal_dist.data.prepare import build_tokenizer, fingerprint
from tests.unit.data.test_prepare import VOCAB, expected_docs, jsonl  # noqa: F401  (a fixture)


def tokenizer_json(out: Path) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out / "tokenizer.json")).to_str()


def test_streaming_writes_what_materialising_writes(jsonl, tmp_path: Path) -> None:  # noqa: F811
    docs = jsonl[1]
    (tmp_path / "a.txt").write_text("\n\n".join(docs[:300]))
    (tmp_path / "b.txt").write_text("\n\n".join(docs[300:]))
    for name, files in (("jsonl", [str(jsonl[0])]), ("txt", [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])):
        kw = dict(files=files, vocab_size=VOCAB, val_fraction=0.2, shard_tokens=7000, workers=1)
        cached, streamed = (prepare(tmp_path / f"{name}-{s}", streaming=s, **kw) for s in (False, True))
        for f in ["tokenizer.json"] + [e["file"] for entries in cached["splits"].values() for e in entries]:
            assert (tmp_path / f"{name}-False" / f).read_bytes() == (tmp_path / f"{name}-True" / f).read_bytes()
        assert streamed["splits"] == cached["splits"] and streamed["documents"] == cached["documents"]
        assert streamed["source"]["streaming"] is True and "streaming" not in cached["source"]
        assert set(streamed["source"]["dataset_fingerprints"].values()) == {None}
        assert None not in cached["source"]["dataset_fingerprints"].values()
    with pytest.raises(DataError, match=r"has no column 'body'; available: "):
        prepare(tmp_path / "o", files=[str(jsonl[0])], text_column="body", streaming=True)
    assert not (tmp_path / "o").exists()


def test_tokenizer_trains_on_the_first_sample_documents(jsonl, tmp_path: Path) -> None:  # noqa: F811
    train = expected_docs(jsonl[1], 0.2)["train"]
    kw = dict(files=[str(jsonl[0])], vocab_size=VOCAB, val_fraction=0.2, workers=1)
    sampled = prepare(tmp_path / "sampled", tokenizer_sample=40, **kw)
    assert sampled["settings"]["tokenizer_sample"] == 40
    want = build_tokenizer(VOCAB, 2, iter(train[:40])).to_str()
    assert tokenizer_json(tmp_path / "sampled") == want != build_tokenizer(VOCAB, 2, iter(train[:41])).to_str()
    assert sampled["documents"]["train"] == len(train)  # the sample trains the tokenizer; every document is encoded
    # The default sample (50,000) covers this corpus: the same tokenizer as training on every train document.
    default, everything = prepare(tmp_path / "default", **kw), prepare(tmp_path / "all", tokenizer_sample="all", **kw)
    assert default["tokenizer"]["sha256"] == everything["tokenizer"]["sha256"] != sampled["tokenizer"]["sha256"]
    assert tokenizer_json(tmp_path / "all") == build_tokenizer(VOCAB, 2, iter(train)).to_str()


def test_directories_from_before_the_sample_setting_are_still_recognised(jsonl, tmp_path: Path, capsys) -> None:  # noqa: F811
    kw = dict(files=[str(jsonl[0])], vocab_size=VOCAB, val_fraction=0.2, workers=1)
    out = tmp_path / "old"
    m = prepare(out, **kw)
    # What the previous version wrote: no tokenizer_sample or part setting, fingerprinted without them.
    for key in ("tokenizer_sample", "part"):
        del m["settings"][key]
    m["fingerprint"] = fingerprint(m["source"], m["settings"])
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    capsys.readouterr()
    prepare(out, **kw)
    assert "already prepared" in capsys.readouterr().out
    assert read_manifest(out) == m
    # It trained on all its train documents: a smaller sample now is a different setting.
    n = m["documents"]["train"]
    with pytest.raises(DataError, match=rf"different settings: tokenizer_sample='all' \(now {n - 1}\)"):
        prepare(out, tokenizer_sample=n - 1, **kw)
    prepare(out, tokenizer_sample=n, **kw)
    assert "already prepared" in capsys.readouterr().out


def test_row_batches_read_by_range_what_text_batches_read_in_order(jsonl, monkeypatch) -> None:  # noqa: F811
    import pickle

    from pascal_dist.data import sources

    monkeypatch.setattr(sources, "READ_BATCH", 64)  # 10 batches of the 600 rows, the last one short
    splits, _ = sources.load_source("files", None, [str(jsonl[0])], "paragraph")
    rows = pickle.loads(pickle.dumps(sources.RowBatches(splits["train"], "text")))  # as a worker process gets it
    assert len(pickle.dumps(rows)) < 10_000  # a reference to the cache, not the rows
    by_range = [rows(start, stop) for start, stop in rows.ranges(64)]
    assert len(by_range) == 10
    assert by_range == list(sources.text_batches(splits["train"], "text", "files", "train"))


def test_row_batches_of_parts_read_the_cache_files_in_a_process_without_datasets(jsonl, tmp_path, monkeypatch) -> None:  # noqa: F811
    import pickle
    import subprocess
    import sys

    from pascal_dist.data import sources

    docs = jsonl[1]
    for name, piece in (("a", docs[:250]), ("b", docs[250:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in piece))
    monkeypatch.setattr(sources, "PARALLEL_CONVERSION_BYTES", 0)  # converted by 2 processes: 2 cache files
    splits, _ = sources.load_source(
        "files", None, [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], "line", workers=2
    )
    whole = splits["train"]
    assert len(whole.cache_files) == 2
    parts = [sources.part_of(whole, "text", i, 3, "train") for i in range(3)]
    assert all(p.ds is None for p in parts)  # read by pyarrow, not through datasets
    (tmp_path / "parts.pkl").write_bytes(pickle.dumps(parts))
    read = (  # what a worker process does: unpickle, read its ranges, and never import datasets
        "import pickle, sys; parts = pickle.load(open(sys.argv[1], 'rb'));"
        "print(repr([[p(a, b) for a, b in p.ranges(7)] for p in parts])); print('datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", read, str(tmp_path / "parts.pkl")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    by_range, imported = out.stdout.splitlines()
    assert imported == "False"
    expected = [
        [
            t
            for texts in sources.text_batches(
                whole.select(range(*sources.part_range(len(whole), i, 3))), "text", "f", "t"
            )
            for t in texts
        ]
        for i in range(3)
    ]
    assert [[t for texts in part for t in texts] for part in eval(by_range)] == expected  # noqa: S307
    assert [t for part in expected for t in part] == docs  # the parts, in order, are the whole split


def test_part_range_divides_rows_as_datasets_shard_does() -> None:
    import datasets

    from pascal_dist.data.sources import part_range

    for rows in (1, 5, 17):
        ds = datasets.Dataset.from_dict({"i": list(range(rows))})
        for count in (c for c in (1, 2, 3, 6) if c <= rows):  # datasets refuses empty pieces
            for index in range(count):
                start, stop = part_range(rows, index, count)
                assert ds.shard(num_shards=count, index=index, contiguous=True)["i"] == list(range(start, stop))
    assert [part_range(2, i, 3) for i in range(3)] == [(0, 1), (1, 2), (2, 2)]  # more parts than rows: empty ones


def test_row_batches_of_a_split_held_in_memory_read_through_datasets() -> None:
    import datasets

    from pascal_dist.data.sources import RowBatches

    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(10)], "n": list(range(10))})
    rows = RowBatches(ds, "text", 2, 9)
    assert rows.ds is not None  # no cache files to read
    assert [rows(a, b) for a, b in rows.ranges(3)] == [
        ["row 2", "row 3", "row 4"],
        ["row 5", "row 6", "row 7"],
        ["row 8"],
    ]
