"""Worker processes of a preparation: batches out to N processes, results back in submission order, with a bounded
number in flight; and the tokenizers library's own threads, pinned so that N workers use N cores.

The calling process writes the shards; the workers clean, hash, route and encode, and read their batches' rows
themselves where the source is materialised (a streamed one is read by the calling process). Results come
back in order, so the output does not depend on the number of workers. Workers are spawned, not forked: the calling
process already runs the tokenizers library's and Arrow's thread pools, which a fork would copy mid-flight.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

INLINE_BATCHES = 100  # batches done here before workers start (about their start-up time): small corpora skip it
IN_FLIGHT = 4  # batches queued per worker: keeps each one busy while bounding memory to a few batches


def default_workers() -> int:
    """The CPUs this process may run on (a Slurm task's or a container's share, not the whole machine)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pin_tokenizer_threads() -> None:
    """One thread for the tokenizers library in this process: it parallelises batch encoding and training with its
    own thread pool (Rust rayon, one thread per core), which would put N workers' threads N-fold on each core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read at each call: serial encoding and training from now on
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when the pool first starts, should anything start it


@contextlib.contextmanager
def tokenizer_threads(workers: int) -> Iterator[None]:
    """While preparing with `workers`: one worker means one core, the tokenizers library's threads included; with
    several, tokenizer training in this process may use that many threads (if its pool has not started yet and
    RAYON_NUM_THREADS is not set). The environment is restored afterwards."""
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    if workers == 1:
        pin_tokenizer_threads()
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(workers))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_functions: dict[str, Callable[..., Any]] = {}  # a worker's copies of the functions it applies, by file


def _start_worker(modules: Sequence[str]) -> None:
    pin_tokenizer_threads()
    for module in modules:  # imported now, while the caller works, rather than on the first task
        importlib.import_module(module)


def _ready() -> None:
    """A task that only makes a worker exist."""


def _call(path: str, task: tuple) -> Any:
    function = _functions.get(path)
    if function is None:  # the first task of this function in this worker
        with open(path, "rb") as f:
            function = _functions[path] = pickle.load(f)
    return function(*task)


class WorkerPool:
    """`workers` spawned processes, started when the pool is made, so that their start-up overlaps the caller's own
    work (a preparation makes it before loading its source). Each function given to `map` is pickled once, to a file
    every worker loads on its first task of it; `submit` runs one call in a worker (a preparation's tokenizer
    training); `preload` names modules the workers import as they start."""

    def __init__(self, workers: int, preload: Sequence[str] = ()) -> None:
        self.workers, self._said = workers, False
        self._dir = tempfile.mkdtemp(prefix="pascal-dist-workers-")
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start_worker, initargs=(tuple(preload),)
        )
        for _ in range(workers):  # a spawning pool starts a process for each task submitted while none is idle
            self._pool.submit(_ready)

    def map(self, function: Callable[..., Any], tasks: Iterable[tuple]) -> Iterator[Any]:
        """function(*task) for every task, in order, at most IN_FLIGHT tasks queued per worker; a worker's exception
        is raised here, and leaving early cancels what is queued."""
        if not self._said:  # said when used, not when started: bad input found meanwhile is the only line printed
            # tqdm.write: a line of its own even while a progress bar is drawn
            said = f"[prepare] {self.workers} worker processes (tokenizers pinned to 1 thread each)"
            tqdm.write(said, file=sys.stderr)
            self._said = True
        fd, path = tempfile.mkstemp(suffix=".pkl", dir=self._dir)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(function, f, protocol=pickle.HIGHEST_PROTOCOL)
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append(self._pool.submit(_call, path, task))
                if len(pending) >= IN_FLIGHT * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future:
        """function(*args) in a worker, as soon as one is free; its result (or exception) through the future."""
        return self._pool.submit(function, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ordered_map(function: Callable[..., Any], tasks: Iterable[tuple], workers: int) -> Iterator[Any]:
    """function(*task) for every task, in order. With workers > 1, the first INLINE_BATCHES tasks run here and the
    rest in a WorkerPool of `workers`, started when they are reached."""
    tasks = iter(tasks)
    for task in itertools.islice(tasks, None if workers == 1 else INLINE_BATCHES):
        yield function(*task)
    first = next(tasks, None)
    if first is None:
        return
    with WorkerPool(workers) as pool:
        yield from pool.map(function, itertools.chain([first], tasks))
