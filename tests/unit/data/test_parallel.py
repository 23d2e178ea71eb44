"""Worker processes: results in order whatever the number of workers, errors raised in the caller, the tokenizers
library pinned to one thread per worker, and a preparation with 2 workers byte-identical to one with 1."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pascal_dist.data import parallel, prepare, sources
from pascal_dist.data.parallel import ordered_map, tokenizer_threads
from tests.unit.data.test_merge import assert_same_files
from tests.unit.data.test_prepare import VOCAB, jsonl  # noqa: F401  (a fixture)


def test_results_come_back_in_order_and_errors_reach_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 3)
    tasks = [(i, 2) for i in range(60)]
    assert list(ordered_map(pow, tasks, 2)) == [i**2 for i in range(60)] == list(ordered_map(pow, tasks, 1))
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(pow, [*tasks, (0, -1), *tasks], 2))  # raised in a worker process


def _pid_and_env(name: str) -> tuple[int, str | None]:
    return os.getpid(), os.getenv(name)


def test_workers_pin_the_tokenizers_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 0)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    results = list(ordered_map(_pid_and_env, [("TOKENIZERS_PARALLELISM",), ("RAYON_NUM_THREADS",)] * 8, 2))
    in_workers = {value for pid, value in results if pid != os.getpid()}
    assert in_workers == {"false", "1"}
    assert os.environ.get("TOKENIZERS_PARALLELISM") is None and os.environ["RAYON_NUM_THREADS"] == "7"  # caller's
    with tokenizer_threads(1):  # one worker: this process is the worker
        assert (os.environ["TOKENIZERS_PARALLELISM"], os.environ["RAYON_NUM_THREADS"]) == ("false", "1")
    assert os.environ.get("TOKENIZERS_PARALLELISM") is None and os.environ["RAYON_NUM_THREADS"] == "7"


def _slow_square(i: int, wait: float) -> tuple[int, int]:
    time.sleep(wait)
    return i * i, os.getpid()


def test_this_process_takes_tasks_while_the_workers_are_full(monkeypatch: pytest.MonkeyPatch) -> None:
    # N workers are N processes: with 2, one spawned worker and this one share the tasks, in order.
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 0)
    results = list(ordered_map(_slow_square, [(i, 0.02) for i in range(80)], 2))
    assert [r for r, _ in results] == [i * i for i in range(80)]
    pids = {pid for _, pid in results}
    assert os.getpid() in pids and len(pids) == 2


def test_two_workers_write_the_bytes_one_writes(jsonl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:  # noqa: F811
    # Small batches, none before the pool starts: 2 workers encode ~10 batches of the 600 documents.
    monkeypatch.setattr(sources, "READ_BATCH", 64)
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 0)
    kw = dict(files=[str(jsonl[0])], vocab_size=VOCAB, val_fraction=0.2, shard_tokens=9000)
    prepare(tmp_path / "one", workers=1, **kw)
    assert "worker processes" not in capfd.readouterr().err
    prepare(tmp_path / "two", workers=2, **kw)
    assert "[prepare] 2 worker processes, this one and 1 spawned" in capfd.readouterr().err
    assert_same_files(tmp_path / "one", tmp_path / "two")
