"""Worker processes: results in order whatever the number of workers, errors raised in the caller, the tokenizers
library pinned to one thread per worker, and a preparation with 2 workers byte-identical to one with 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pascal_dist.data import parallel, prepare, sources
from pascal_dist.data.parallel import WorkerPool, ordered_map, tokenizer_threads
from tests.unit.data.test_merge import assert_same_files
from tests.unit.data.test_prepare import VOCAB, jsonl  # noqa: F401  (a fixture)


def test_results_come_back_in_order_and_errors_reach_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 3)
    tasks = [(i, 2) for i in range(60)]
    assert list(ordered_map(pow, tasks, 2)) == [i**2 for i in range(60)] == list(ordered_map(pow, tasks, 1))
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(pow, [*tasks, (0, -1), *tasks], 2))  # raised in a worker process


def test_workers_pin_the_tokenizers_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 0)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")
    seen = set(ordered_map(os.getenv, [("TOKENIZERS_PARALLELISM",), ("RAYON_NUM_THREADS",)] * 8, 2))
    assert seen == {"false", "1"}
    assert os.environ.get("TOKENIZERS_PARALLELISM") is None and os.environ["RAYON_NUM_THREADS"] == "7"  # caller's
    with tokenizer_threads(1):  # one worker: this process is the worker
        assert (os.environ["TOKENIZERS_PARALLELISM"], os.environ["RAYON_NUM_THREADS"]) == ("false", "1")
    assert os.environ.get("TOKENIZERS_PARALLELISM") is None and os.environ["RAYON_NUM_THREADS"] == "7"


def _imported(name: str) -> bool:
    return name in sys.modules


def test_pool_starts_its_workers_at_once_preloads_modules_and_runs_several_functions() -> None:
    with WorkerPool(2, preload=("colorsys",)) as pool:
        directory = pool._dir
        assert len(pool._pool._processes) == 2  # started when made, before any function is given
        assert set(pool.map(_imported, [("colorsys",)] * 8)) == {True}
        assert list(pool.map(pow, [(i, 3) for i in range(20)])) == [i**3 for i in range(20)]
        assert len(os.listdir(directory)) == 2  # each function pickled once, not once per task
    assert not os.path.exists(directory)


def _record_pool_and_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The order in which preparation starts its WorkerPool, loads its source (streamed or not) and trains its
    tokenizer in this process."""
    module = sys.modules["pascal_dist.data.prepare"]  # the package's `prepare` attribute is the function
    events: list[str] = []
    pool, load, train = module.WorkerPool, module.load_source, module.build_tokenizer

    def recording_pool(*args, **kwargs):
        events.append("pool")
        return pool(*args, **kwargs)

    def recording_load(*args, **kwargs):
        events.append("load streamed" if kwargs.get("streaming") else "load")
        return load(*args, **kwargs)

    def recording_train(*args, **kwargs):
        events.append("train here")
        return train(*args, **kwargs)

    monkeypatch.setattr(module, "WorkerPool", recording_pool)
    monkeypatch.setattr(module, "load_source", recording_load)
    monkeypatch.setattr(module, "build_tokenizer", recording_train)
    return events


def test_two_workers_write_the_bytes_one_writes(jsonl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:  # noqa: F811
    # Small batches, none in this process: 2 workers encode ~10 tasks of the 600 documents between them.
    monkeypatch.setattr(sources, "READ_BATCH", 64)
    monkeypatch.setattr(sys.modules["pascal_dist.data.prepare"], "TASK_BYTES", 64 * 130)
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 0)
    kw = dict(files=[str(jsonl[0])], vocab_size=VOCAB, val_fraction=0.2, shard_tokens=9000)
    prepare(tmp_path / "one", workers=1, **kw)
    assert "worker processes" not in capfd.readouterr().err
    events = _record_pool_and_load(monkeypatch)
    prepare(tmp_path / "two", workers=2, **kw)  # a small source: workers started once its rows are counted
    assert "[prepare] 2 worker processes" in capfd.readouterr().err
    assert_same_files(tmp_path / "one", tmp_path / "two")
    assert events == ["load", "pool", "train here"]  # the workers start while the tokenizer trains
    events.clear()
    # A large one: workers started before loading it, and the tokenizer trained in one of them on the sample read
    # streamed, while this process converts the source; the same tokenizer, the same bytes.
    monkeypatch.setattr(sources, "PARALLEL_CONVERSION_BYTES", 0)
    prepare(tmp_path / "early", workers=2, **kw)
    assert capfd.readouterr().err.count("[prepare] 2 worker processes") == 1
    assert_same_files(tmp_path / "one", tmp_path / "early")
    assert events == ["pool", "load streamed", "load"]
    prepare(tmp_path / "streamed", workers=2, streaming=True, **kw)  # rows read here and sent to the workers
    for shard in sorted((tmp_path / "one").glob("*.bin")) + [tmp_path / "one" / "tokenizer.json"]:
        assert shard.read_bytes() == (tmp_path / "streamed" / shard.name).read_bytes(), shard.name


def test_streamed_batches_become_tasks_of_one_entry_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    module = sys.modules["pascal_dist.data.prepare"]
    monkeypatch.setattr(parallel, "INLINE_BATCHES", 2)
    monkeypatch.setattr(module, "TASK_BYTES", 10)
    batches = [(0, ["aaaa", None]), (0, ["bb"]), (0, ["cccccc"]), (0, ["dddd", ""]), (0, ["e"]), (1, ["ffffffffffff"])]
    batches += [(1, ["g"])]
    tasks = list(module._as_tasks(iter(batches)))
    assert tasks[:2] == batches[:2]  # done in this process as they come
    assert tasks[2:] == [(0, ["cccccc", "dddd", ""]), (0, ["e"]), (1, ["ffffffffffff"]), (1, ["g"])]
