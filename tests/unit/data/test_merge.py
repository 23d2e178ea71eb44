"""Parts and their merge: N parts of a preparation, merged, are byte for byte the directory one process writes (shards,
tokenizer, manifest), with the source's own evaluation splits, streamed or not; incompatible parts are refused."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from pascal_dist.cli import main
from pascal_dist.data import DataError, parallel, prepare, read_manifest, sources
from pascal_dist.data.merge import merge_parts
from tests.unit.data.test_prepare import VOCAB, corpus, write_wikitext


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs"


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local dir with train, validation and test (eval splits that share documents with train)."""
    root = tmp_path_factory.mktemp("wt") / "wt"
    write_wikitext(root, np.random.default_rng(7))
    return root


@pytest.fixture(scope="module")
def single(wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    prepare(out, source=str(wikitext), config="wikitext-103-raw-v1", vocab_size=VOCAB, shard_tokens=3000, workers=1)
    return out


def prepare_parts(wikitext: Path, root: Path, n: int, **kw) -> list[Path]:
    parts = [root / f"part-{i}-of-{n}" for i in range(n)]
    for i, part in enumerate(parts):
        prepare(part, source=str(wikitext), config="wikitext-103-raw-v1", vocab_size=VOCAB, part=f"{i}/{n}", **kw)
    return parts


def test_merged_parts_equal_the_single_process_directory(wikitext: Path, single: Path, tmp_path: Path, capsys) -> None:
    parts = prepare_parts(wikitext, tmp_path, 3, shard_tokens=3000, workers=1)
    ms = [read_manifest(p) for p in parts]
    # The parts really divide the work: part 0 alone holds the eval splits, every part a share of train.
    assert [sorted(m["splits"]) for m in ms] == [["source_test", "source_validation", "train", "val"]] + [
        ["train", "val"]
    ] * 2
    assert all(m["documents"]["train"] > 0 for m in ms) and len({m["tokenizer"]["sha256"] for m in ms}) == 1
    assert sum(m["documents"]["train"] for m in ms) == read_manifest(single)["documents"]["train"]
    # ... and their shards are not the single run's (cut at other places), so only the merge can make them equal.
    assert [e["tokens"] for m in ms for e in m["splits"]["train"]] != [
        e["tokens"] for e in read_manifest(single)["splits"]["train"]
    ]

    shuffled = parts[:]
    random.Random(0).shuffle(shuffled)
    merged = tmp_path / "merged"
    merge_parts(shuffled, merged)
    assert_same_files(merged, single)
    assert read_manifest(merged)["dropped_overlap"] == 17  # as in test_local_wikitext_dir_keeps_source_splits_apart
    capsys.readouterr()
    assert main(["prepare", "--merge", *map(str, parts), "--out", str(merged)]) == 0  # the CLI, and idempotent
    assert "already prepared" in capsys.readouterr().out


def test_parts_prepared_by_workers_merge_to_the_single_process_directory(
    wikitext: Path, single: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each part's workers start first and train the tokenizer on the sample read streamed (the eval splits'
    # documents withheld), then read the part's rows from the whole split's cache files, a few rows a task.
    module = sys.modules["pascal_dist.data.prepare"]
    monkeypatch.setattr(sources, "PARALLEL_CONVERSION_BYTES", 0)
    monkeypatch.setattr(module, "TASK_BYTES", 2000)
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 0)
    trained_here = []
    monkeypatch.setattr(module, "build_tokenizer", lambda *a: trained_here.append(a))
    parts = prepare_parts(wikitext, tmp_path, 2, shard_tokens=3000, workers=2)
    assert trained_here == []  # every part's tokenizer came from a worker
    merge_parts(parts, tmp_path / "merged")
    assert_same_files(tmp_path / "merged", single)


def test_streamed_parts_divide_files_and_merge_to_the_streamed_single_run(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(3)
    files = []
    for i in range(3):  # one .txt and one .jsonl corpus, three files each
        docs = corpus(rng, 60)
        (tmp_path / f"d{i}.txt").write_text("\n\n".join(docs))
        (tmp_path / f"d{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        files.append(tmp_path / f"d{i}")
    for ext in (".txt", ".jsonl"):
        paths = [f"{f}{ext}" for f in files]
        kw = dict(files=paths, vocab_size=VOCAB, shard_tokens=2000, streaming=True, workers=1)
        prepare(tmp_path / f"single{ext}", **kw)
        parts = [tmp_path / f"p{ext}{i}" for i in range(2)]
        for i, part in enumerate(parts):
            prepare(part, part=f"{i}/2", **kw)
        # 3 files into 2 parts: datasets gives the first part 2 files, the second 1
        assert read_manifest(parts[0])["documents"]["train"] > read_manifest(parts[1])["documents"]["train"] > 0
        merge_parts(parts, tmp_path / f"merged{ext}")
        assert_same_files(tmp_path / f"merged{ext}", tmp_path / f"single{ext}")
    with pytest.raises(DataError, match=r"--part 0/4 with --streaming divides split 'train' by its source files, and"):
        prepare(tmp_path / "p", files=[f"{f}.txt" for f in files], streaming=True, part="0/4")


def test_refuses_parts_that_do_not_make_one_preparation(wikitext: Path, single: Path, tmp_path: Path, capsys) -> None:
    parts = prepare_parts(wikitext, tmp_path / "a", 2, shard_tokens=3000, workers=1)
    other = prepare_parts(wikitext, tmp_path / "b", 2, shard_tokens=5000, workers=1)
    thirds = prepare_parts(wikitext, tmp_path / "c", 3, shard_tokens=3000, workers=1)

    def refused(*args: str) -> str:
        capsys.readouterr()
        assert main(["prepare", "--merge", *args, "--out", str(tmp_path / "m")]) == 2
        assert not (tmp_path / "m").exists()
        return error_line(capsys)

    assert "missing part(s) 1/2 of 2" in refused(str(parts[0]))
    assert "part 0/2 given twice" in refused(str(parts[0]), str(parts[0]), str(parts[1]))
    assert "parts of different preparations" in refused(str(parts[0]), str(thirds[1]))
    line = refused(str(parts[0]), str(other[1]))
    assert "was prepared with other settings" in line and "shard_tokens=5000" in line
    assert "not a part (prepared without --part)" in refused(str(single), str(parts[1]))
    assert "no manifest" in refused(str(parts[0]), str(tmp_path / "nowhere"))
    flags = refused(str(parts[0]), str(parts[1]), "--vocab-size", "512")
    assert "drop --vocab-size" in flags

    (parts[1] / "train_00000.bin").write_bytes((parts[1] / "train_00000.bin").read_bytes()[:-2] + b"\xff\xff")
    assert "sha256 of the tokens does not match" in refused(str(parts[0]), str(parts[1]))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--part", "3/2"], "--part 3/2: expected I/N with 0 <= I < N"),
        (["--part", "1"], "--part 1: expected I/N"),
        (["--workers", "0"], "--workers 0: expected a whole number >= 1"),
        (["--tokenizer-sample", "0"], "--tokenizer-sample 0: expected a whole number >= 1 or 'all'"),
        (["--tokenizer", "tok.json", "--tokenizer-sample", "9"], "give --tokenizer or --tokenizer-sample, not both"),
    ],
)
def test_bad_scale_flags_are_one_error_line(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    (tmp_path / "tok.json").write_text("{}")
    args = [a if a != "tok.json" else str(tmp_path / "tok.json") for a in args]
    assert main(["prepare", "--out", str(tmp_path / "o"), *args]) == 2
    assert message in error_line(capsys) and not (tmp_path / "o").exists()
