"""Prototype changes to the data path, applied by monkeypatching inside benchmark processes.

Nothing here is used by lensfeed itself: each entry is a candidate change measured by the
benchmarks (``--patch NAME`` on :mod:`benchmarks.consumer` and
:mod:`benchmarks.producer_runner`), so the report can quote its effect before anyone edits
``producer/``, ``trainer/`` or ``common/``. Each docstring says which function it replaces and
what the real change would be. Once lensfeed contains a change (:data:`UPSTREAM` detects it),
the suite stops applying its prototype.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import sys
import warnings
from collections.abc import Callable

import numpy as np

# --------------------------------------------------------------------------- producer side


def _strided_gather() -> None:
    """``producer.shard.TokenColumn.gather``: one fancy-index per batch instead of one
    ``take`` per distinct Arrow chunk.

    ``datasets.save_to_disk`` writes record batches of 1000 rows, so a shard is hundreds of
    chunks and a shuffled batch of 64 rows touches ~60 of them: the current per-chunk loop
    (``searchsorted`` + ``np.unique`` + a boolean mask and a ``take`` per chunk) costs ~0.3 ms per
    batch. All chunks of one memory-mapped Arrow file live in one mapping, so the column can be
    addressed as a single read-only ``as_strided`` view of overlapping rows (row ``i`` = ``L``
    values starting at element ``i``) plus a per-chunk element offset; a gather is then
    ``searchsorted`` + one ``view[starts]``. Still zero-copy, O(chunks) extra memory.

    The real change would build the view per file in ``load_shard`` from the ``pa.memory_map``
    buffer (chunks of different files live in different mappings, so group rows by file);
    this prototype spans the address range of all chunks, which is only valid here because the
    benchmark datasets are a single file.
    """
    from lensfeed.producer.shard import TokenColumn

    plain = TokenColumn.gather
    views: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}

    def view_of(col: TokenColumn) -> tuple[np.ndarray, np.ndarray, int] | None:
        key = id(col)
        if key not in views:
            if len(col.chunks) == 1 or len(col.row_shape) != 1:
                return None
            length = col.row_shape[0]
            addrs = np.array([c.__array_interface__["data"][0] for c in col.chunks], np.int64)
            lo = int(addrs.min())
            hi = int(max(int(a) + c.nbytes for a, c in zip(addrs, col.chunks, strict=True)))
            raw = (ctypes.c_char * (hi - lo)).from_address(lo)
            stored = col.chunks[0].dtype  # col.dtype may be the widened serving dtype
            itemsize = stored.itemsize
            flat = np.frombuffer(raw, dtype=stored)
            rows = np.lib.stride_tricks.as_strided(
                flat,
                shape=(flat.size - length + 1, length),
                strides=(itemsize, itemsize),
                writeable=False,
            )
            views[key] = (rows, (addrs - lo) // itemsize, length)
            col._keepalive = col.chunks  # type: ignore[attr-defined]
        return views[key]

    def gather(self: TokenColumn, rows: np.ndarray) -> np.ndarray:
        v = view_of(self)
        if v is None:
            return plain(self, rows)
        view, base, length = v
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = view[base[which] + (rows - self.starts[which]) * length]
        return out.astype(self.dtype, copy=False)

    TokenColumn.gather = gather  # type: ignore[method-assign]


# --------------------------------------------------------------------------- trainer side


def _young_gc() -> None:
    """``trainer.client.FeedClient._end_cycle``: ``gc.collect(1)`` instead of ``gc.collect()``.

    A full collection walks every object in the process (~180k after ``import torch``; ~100 ms on
    this machine) at every cycle boundary, in the training loop's time. What a finished cycle
    leaves behind (batch dicts, headers, frames) is young; collecting generations 0-1 frees it in
    well under a millisecond. Alternatively ``gc.freeze()`` once after start-up.
    """
    import torch

    from lensfeed.trainer.client import FeedClient

    def _end_cycle(self: FeedClient) -> None:
        if not self.cleanup_each_cycle:
            return
        gc.collect(1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.stats.cleanups += 1

    FeedClient._end_cycle = _end_cycle  # type: ignore[method-assign]


def _frombuffer_nowarn() -> None:
    """``common.protocol.frombuffer``: no ``warnings.catch_warnings()`` per tensor.

    Entering/leaving ``catch_warnings`` copies the filter list and resets the warning registry,
    once per tensor frame. Installing one targeted ``filterwarnings("ignore", message="The given
    buffer is not writable")`` at import time has the same effect for a fraction of the cost.
    """
    import torch

    from lensfeed.common import protocol as P

    warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def frombuffer(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if buf.nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(shape)

    P.frombuffer = frombuffer  # type: ignore[assignment]


def tune_malloc() -> None:
    """glibc: serve large blocks from the heap and keep them (``mallopt(M_MMAP_MAX, 0)``,
    ``M_TRIM_THRESHOLD`` 1 GiB); the same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``.

    libzmq allocates every received message with ``malloc``. glibc's dynamic mmap threshold
    stops at 32 MiB, so each >= 32 MiB frame is a fresh ``mmap`` whose pages fault in on first
    write and are unmapped on free: measured here, a 32 MiB frame moves at ~1.2 GB/s against
    ~4.9 GB/s for a 16 MiB one. Keeping large blocks in the heap lets the next message reuse
    warm pages. The real change: the trainer entry point (or the docker image) sets these two
    environment variables, or the protocol splits tensors into <= 16 MiB frames.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _source_of(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _has_malloc_tuning() -> bool:
    import importlib.util

    return importlib.util.find_spec("lensfeed.common.malloc") is not None


def _has_strided_gather() -> bool:
    from lensfeed.producer.shard import TokenColumn

    return hasattr(TokenColumn, "_window")


def _has_cheap_cycle_gc() -> bool:
    from lensfeed.trainer.client import FeedClient

    src = _source_of(FeedClient._end_cycle)
    return "freeze" in src or "collect(1)" in src or "gc.collect()" not in src


def _has_frombuffer_without_catch() -> bool:
    from lensfeed.common import protocol as P

    return "catch_warnings" not in _source_of(P.frombuffer)


PATCHES: dict[str, Callable[[], None]] = {
    "strided-gather": _strided_gather,
    "young-gc": _young_gc,
    "frombuffer-nowarn": _frombuffer_nowarn,
    "malloc-no-mmap": tune_malloc,
}

#: Detects that lensfeed itself already does what a prototype does (then it is not applied).
UPSTREAM: dict[str, Callable[[], bool]] = {
    "malloc-no-mmap": _has_malloc_tuning,
    "strided-gather": _has_strided_gather,
    "young-gc": _has_cheap_cycle_gc,
    "frombuffer-nowarn": _has_frombuffer_without_catch,
}

#: Prototypes per side of the feed.
SIDES: dict[str, tuple[str, ...]] = {
    "producer": ("strided-gather",),
    "trainer": ("young-gc", "frombuffer-nowarn", "malloc-no-mmap"),
}


def upstream(name: str) -> bool:
    """Whether lensfeed already contains the change ``name`` prototypes."""
    check = UPSTREAM.get(name)
    return bool(check and check())


def pending(side: str) -> tuple[str, ...]:
    """The prototypes of ``side`` (``producer`` or ``trainer``) lensfeed does not have yet."""
    return tuple(n for n in SIDES[side] if not upstream(n))


def status() -> dict[str, str]:
    """``name -> "upstream" | "prototype"`` for the results file."""
    return {n: "upstream" if upstream(n) else "prototype" for n in PATCHES}


def apply(name: str) -> None:
    """Apply the prototype ``name`` to this process."""
    try:
        fn = PATCHES[name]
    except KeyError:
        raise SystemExit(f"unknown patch {name!r} (known: {', '.join(sorted(PATCHES))})") from None
    fn()


__all__ = ["PATCHES", "SIDES", "apply", "pending", "status", "tune_malloc", "upstream"]
