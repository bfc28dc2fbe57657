"""Memory-mapped access to one rank's slice of a pretokenized Arrow dataset.

Rank ``r`` of ``W`` gets exactly the rows of
``datasets.Dataset.shard(num_shards=W, index=r, contiguous=True)``: the first ``N % W`` ranks get
``N // W + 1`` consecutive rows, the rest ``N // W``. Token columns become ``(rows, seq_len)``
numpy views of the Arrow value buffers: nothing is copied and no per-row Python object exists,
so opening a 100 GB corpus costs page-table entries, not RAM.

Sequences must have one fixed length per column (pack or pad when tokenizing); ragged columns
are rejected with the first offending row, rather than silently padded or truncated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lensfeed.common.errors import EmptyShardError, ShardError

_ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def rank_slice(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, end)`` of rank's rows, identical to ``Dataset.shard(..., contiguous=True)``."""
    if not 0 <= rank < world_size:
        raise ShardError(f"rank {rank} is outside world_size {world_size}")
    div, mod = divmod(num_rows, world_size)
    start = div * rank + min(rank, mod)
    return start, start + div + (1 if rank < mod else 0)


def _read_arrow_file(path: Path) -> tuple[pa.Table, pa.Buffer]:
    """Memory-map one Arrow IPC file: stream format (``save_to_disk``) or file format.

    Returns the table and a zero-copy buffer of the whole mapping (the region every column
    buffer of the table points into), which lets a gather span record batches in one step.
    """
    try:
        source = pa.memory_map(str(path), "r")
        region = source.read_buffer(source.size())
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(f"cannot open {path}: {exc}") from None
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            source.seek(0)
            return opener(source).read_all(), region
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError):
            continue
    raise ShardError(f"{path} is not a valid Arrow IPC file (corrupt or wrong format)")


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(str(path), memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path} is not a readable Parquet file: {exc}") from None


def _dataset_files(path: Path) -> list[Path]:
    """The data files of a dataset path, in row order."""
    if not path.exists():
        raise ShardError(f"dataset path not found: {path}")
    if path.is_file():
        if path.suffix in _ARROW_SUFFIXES + _PARQUET_SUFFIXES:
            return [path]
        raise ShardError(
            f"{path} is not a dataset: expected .arrow/.feather/.ipc or .parquet, or a directory"
        )
    state = path / "state.json"
    if state.is_file():  # datasets.save_to_disk layout; state.json lists files in row order
        try:
            files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ShardError(f"{state} is corrupt ({exc!r})") from None
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ShardError(f"{path}: data files listed in state.json are missing: {missing}")
        return files
    files = sorted(p for p in path.iterdir() if p.suffix in _ARROW_SUFFIXES + _PARQUET_SUFFIXES)
    if not files:
        raise ShardError(
            f"{path} is not a dataset: no state.json (datasets.save_to_disk) and no .arrow or "
            ".parquet files inside"
        )
    return files


def open_table(path: str | Path) -> tuple[pa.Table, str, list[pa.Buffer]]:
    """Memory-map the whole dataset as one (chunked) table.

    Returns the table, a content fingerprint, and the mapped regions of its Arrow files.
    Parquet must be decoded, so a Parquet dataset lives in memory (one contiguous copy).
    """
    p = Path(path)
    files = _dataset_files(p)
    tables: list[pa.Table] = []
    regions: list[pa.Buffer] = []
    for f in files:
        if f.suffix in _PARQUET_SUFFIXES:
            tables.append(_read_parquet(f).combine_chunks())
        else:
            table, region = _read_arrow_file(f)
            tables.append(table)
            regions.append(region)
    try:
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    except pa.ArrowInvalid as exc:
        raise ShardError(f"{p}: data files have different schemas: {exc}") from None
    h = hashlib.sha256()
    state = p / "state.json" if p.is_dir() else None
    if state is not None and state.is_file():
        h.update(str(json.loads(state.read_text()).get("_fingerprint", "")).encode())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    h.update(f"{table.num_rows};{table.schema}".encode())
    return table, h.hexdigest()[:16], regions


@dataclass
class TokenColumn:
    """One integer column of the shard: zero-copy ``(rows, seq_len)`` views, one per chunk.

    ``save_to_disk`` writes a record batch (an Arrow chunk) every 1,000 rows, so a shuffled
    batch touches as many chunks as it has rows. Looping over chunks would make gathering
    cost one numpy call per row; instead each chunk is located inside its file's memory
    mapping (a *region*), and a sliding-window view of the region turns "row r of chunk c" into
    one element offset. A batch is then a single fancy-index over that view, whatever the
    number of chunks, still without copying the dataset.
    """

    name: str
    chunks: list[np.ndarray]
    starts: np.ndarray  # row at which each chunk starts (len = len(chunks))
    row_shape: tuple[int, ...]
    dtype: np.dtype  # served dtype: uint16/uint32 are widened to int32/int64
    regions: list[pa.Buffer] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._row_len = int(np.prod(self.row_shape, dtype=np.int64)) if self.row_shape else 1
        self._windows: list[np.ndarray] = []
        region_of: list[int] = []
        elem0: list[int] = []
        located: dict[int, int] = {}  # index in self.regions -> index in self._windows
        for chunk in self.chunks:
            addr = chunk.__array_interface__["data"][0]
            item = chunk.dtype.itemsize
            hit = None
            for i, reg in enumerate(self.regions):
                off = addr - reg.address
                if 0 <= off < reg.size and off % item == 0:
                    hit = i
                    break
            if hit is None:  # not inside a known mapping (e.g. decoded Parquet): its own region
                flat = chunk.reshape(-1)
                region_of.append(len(self._windows))
                elem0.append(0)
                self._windows.append(self._window(flat))
                continue
            if hit not in located:
                reg = self.regions[hit]
                flat = np.frombuffer(reg, dtype=chunk.dtype, count=reg.size // item)
                located[hit] = len(self._windows)
                self._windows.append(self._window(flat))
            region_of.append(located[hit])
            elem0.append((addr - self.regions[hit].address) // item)
        self._region_of = np.asarray(region_of, dtype=np.int64)
        self._elem0 = np.asarray(elem0, dtype=np.int64)

    def _window(self, flat: np.ndarray) -> np.ndarray:
        if not self.row_shape:
            return flat
        # Row starting at element e = win[e]; a read-only view, nothing is copied.
        return np.lib.stride_tricks.sliding_window_view(flat, self._row_len)

    @property
    def row_nbytes(self) -> int:
        """Bytes of one served row (after widening)."""
        return self._row_len * self.dtype.itemsize

    def view_rows(self, first: int, n: int) -> int:
        """How many of the ``n`` consecutive rows from ``first`` :meth:`gather` can return as
        one view: those in ``first``'s record batch (0 when rows are widened, a copy anyway)."""
        if self.dtype != self.chunks[0].dtype:
            return 0
        c = int(np.searchsorted(self.starts, first, side="right")) - 1
        return max(0, min(n, int(self.starts[c]) + len(self.chunks[c]) - first))

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the given order, in one vectorised step (no per-row or per-chunk Python).

        Consecutive rows of one chunk (unshuffled order) come back as a read-only view of the
        mapping itself: no copy at all, the bytes go from the page cache to the socket.
        """
        if len(self.chunks) == 1:
            which = np.zeros(len(rows), dtype=np.int64)
        else:
            which = np.searchsorted(self.starts, rows, side="right") - 1
        first = int(rows[0]) if len(rows) else 0
        if (
            len(rows) > 1
            and which[0] == which[-1]
            and int(rows[-1]) - first == len(rows) - 1
            and self.dtype == self.chunks[0].dtype
            and bool((np.diff(rows) == 1).all())
        ):
            c = int(which[0])
            local = first - int(self.starts[c])
            return self.chunks[c][local : local + len(rows)]
        el = self._elem0[which] + (rows - self.starts[which]) * self._row_len
        if len(self._windows) == 1:
            out = self._windows[0][el]
        else:
            out = np.empty((len(rows), self._row_len), dtype=self.chunks[0].dtype)
            reg = self._region_of[which]
            for r in np.unique(reg):
                mask = reg == r
                out[mask] = self._windows[r][el[mask]].reshape(-1, self._row_len)
        return out.reshape(len(rows), *self.row_shape).astype(self.dtype, copy=False)


#: Unsigned token dtypes the wire (and torch) lack are widened once, deliberately, at gather.
_WIDEN = {np.dtype("uint16"): np.dtype("int32"), np.dtype("uint32"): np.dtype("int64")}


def _column_chunks(
    col: pa.ChunkedArray, *, name: str, where: str, first_row: int = 0
) -> tuple[list[np.ndarray], tuple[int, ...], np.dtype]:
    """Zero-copy numpy views of a list<int> (or int) column; errors name column and location."""
    t = col.type
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    value_type = t.value_type if is_list else t
    if pa.types.is_uint64(value_type):
        raise ShardError(
            f"{where}: column '{name}' is uint64, which torch cannot hold; store token ids as "
            "int32 (or int64)"
        )
    if not pa.types.is_integer(value_type):
        raise ShardError(
            f"{where}: column '{name}' has type {t}; token columns must hold integers "
            "(list<int32> or list<int64>, or a plain integer column)"
        )
    views: list[np.ndarray] = []
    row_shape: tuple[int, ...] | None = None
    seen = first_row  # dataset row of the chunk's first row, for error messages
    for chunk in col.chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count:
            raise ShardError(f"{where}: column '{name}' has {chunk.null_count} null rows")
        if is_list:
            if pa.types.is_fixed_size_list(t):
                length = t.list_size
            else:
                offsets = chunk.offsets.to_numpy()
                lengths = np.diff(offsets)
                length = int(lengths[0])
                bad = np.flatnonzero(lengths != length)
                if bad.size:
                    r = int(bad[0])
                    raise ShardError(
                        f"{where}: column '{name}' has ragged sequence lengths (dataset row "
                        f"{seen} has {length} tokens, row {seen + r} has {int(lengths[r])}); "
                        "lensfeed serves fixed-length sequences: pack or pad when tokenizing"
                    )
            flat = chunk.flatten()
            if flat.null_count:
                raise ShardError(f"{where}: column '{name}' has null tokens")
            view = flat.to_numpy(zero_copy_only=True).reshape(n, length)
            shape: tuple[int, ...] = (length,)
        else:
            view = chunk.to_numpy(zero_copy_only=True)
            shape = ()
        if row_shape is not None and shape != row_shape:
            raise ShardError(
                f"{where}: column '{name}' has ragged sequence lengths across files "
                f"({row_shape} then {shape} at row {seen})"
            )
        row_shape = shape
        views.append(view)
        seen += n
    assert row_shape is not None
    dtype = views[0].dtype
    return views, row_shape, _WIDEN.get(dtype, dtype)


@dataclass
class Shard:
    """One rank's contiguous slice of the dataset, as zero-copy column views."""

    path: str
    rank: int
    world_size: int
    offset: int  # global row index of this shard's first row
    num_rows: int
    dataset_rows: int
    fingerprint: str
    columns: dict[str, TokenColumn] = field(default_factory=dict)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Token arrays for shard-local ``rows`` plus ``sample_idx`` (global int64 row index)."""
        out = {name: col.gather(rows) for name, col in self.columns.items()}
        out["sample_idx"] = rows.astype(np.int64) + self.offset
        return out

    def view_rows(self, first: int, n: int) -> int:
        """Leading rows of the ``n`` consecutive rows from ``first`` that every column serves
        without a copy (see :meth:`TokenColumn.view_rows`)."""
        return min((col.view_rows(first, n) for col in self.columns.values()), default=n)


def load_shard(path: str | Path, *, rank: int, world_size: int, columns: list[str]) -> Shard:
    """Open ``path`` and slice rank's rows; raise :class:`ShardError` naming path/rank/column."""
    where = f"{path} (rank {rank} of {world_size})"
    try:
        table, fingerprint, regions = open_table(path)
    except ShardError as exc:
        raise ShardError(f"rank {rank} of {world_size}: {exc}") from None
    start, end = rank_slice(table.num_rows, rank, world_size)
    if end <= start:
        raise EmptyShardError(
            f"{where}: this rank's shard is empty (the dataset has {table.num_rows} rows for "
            f"{world_size} ranks; columns {columns}); use a larger dataset or fewer ranks"
        )
    available = table.column_names
    shard_table = table.slice(start, end - start)
    out: dict[str, TokenColumn] = {}
    for name in columns:
        if name not in available:
            raise ShardError(f"{where}: column '{name}' not found; available columns: {available}")
        chunks, row_shape, dtype = _column_chunks(
            shard_table.column(name), name=name, where=where, first_row=start
        )
        lengths = np.array([len(c) for c in chunks])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        out[name] = TokenColumn(name, chunks, starts, row_shape, dtype, regions)
    return Shard(
        path=str(path),
        rank=rank,
        world_size=world_size,
        offset=start,
        num_rows=end - start,
        dataset_rows=table.num_rows,
        fingerprint=fingerprint,
        columns=out,
    )


__all__ = ["Shard", "TokenColumn", "load_shard", "open_table", "rank_slice"]
