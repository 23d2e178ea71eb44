"""Worker processes of a preparation: batches out to N processes, results back in submission order, with a bounded
number in flight; and the tokenizers library's own threads, pinned so that N workers use N cores.

The calling process reads the source and writes the shards; the workers clean, hash, route and encode. Results come
back in order, so the output does not depend on the number of workers. Workers are spawned, not forked: the calling
process already runs the tokenizers library's and Arrow's thread pools, which a fork would copy mid-flight.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

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


_function: Callable[..., Any] | None = None  # a worker's copy of the function it applies


def _start_worker(function: Callable[..., Any]) -> None:
    global _function
    pin_tokenizer_threads()
    _function = function


def _call(task: tuple) -> Any:
    return _function(*task)


def ordered_map(
    function: Callable[..., Any], tasks: Iterable[tuple], workers: int, inline: int | None = None
) -> Iterator[Any]:
    """function(*task) for every task, in order. With workers > 1, the first `inline` tasks (INLINE_BATCHES unless
    given) run here and the rest in `workers` spawned processes, each holding its own copy of `function` (pickled
    once) and at most IN_FLIGHT tasks queued; a worker's exception is raised here, and leaving early cancels what is
    queued."""
    tasks = iter(tasks)
    for task in itertools.islice(tasks, None if workers == 1 else INLINE_BATCHES if inline is None else inline):
        yield function(*task)
    first = next(tasks, None)
    if first is None:
        return
    # tqdm.write: a line of its own even while a progress bar is drawn
    tqdm.write(f"[prepare] {workers} worker processes (tokenizers pinned to 1 thread each)", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(function,)) as pool:
        pending = deque([pool.submit(_call, first)])
        try:
            for task in tasks:
                pending.append(pool.submit(_call, task))
                if len(pending) >= IN_FLIGHT * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
