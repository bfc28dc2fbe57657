"""Batch sources: what a producer serves. ``ShardSource`` reads the rank's shard; the fake
producer has its own synthetic source with the same interface.

The per-batch transform hook turns token arrays into training tensors (default: pass-through).
The activation builder (``producer.activations``) is one such transform.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from lensfeed.common.errors import LensfeedError, TransformError
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor, CycleInfo
from lensfeed.producer.shard import Shard

Array = np.ndarray | torch.Tensor
Batch = dict[str, Array]
#: ``(count, arrays)``: ``count`` consecutive training batches whose arrays are concatenated
#: along dim 0 (leading dim ``count * batch_size``). The unit the producer builds and sends.
Chunk = tuple[int, Batch]
#: Sequential batches of at least this many bytes are cut at the dataset's record-batch
#: boundaries, so a message is a view of the memory map and its bytes go from the page cache to
#: the socket uncopied; the one batch that straddles a boundary is copied and travels alone.
#: Smaller batches are gathered across the boundary into one full message, as shuffled ones
#: are: there a copy costs less than the extra messages it would save (producer/packing.py).
VIEW_MIN_BATCH_BYTES = 256 << 10


@dataclass
class BatchContext:
    """What a transform may know about the samples it is given.

    ``slots`` are the cycle-local positions (0 .. ``cycle_len - 1``, in serving order) of the rows
    in this call; ``fetch(slots)`` returns the token arrays (and ``sample_idx``) of any other
    slots of the same cycle, e.g. to pair each sample with a partner.
    """

    rank: int
    cycle: int
    batch: int  # index of the first training batch in this call
    num_batches: int  # training batches in this call
    seed: int
    slots: np.ndarray
    cycle_len: int
    fetch: Callable[[np.ndarray], Batch]


@runtime_checkable
class BatchTransform(Protocol):
    """Turns a group of token batches into training tensors.

    Called with ``group`` training batches concatenated along dim 0 (fewer at a cycle's end);
    every returned tensor must keep that leading dimension so it can be split back. The input
    arrays may be read-only views of the memory-mapped dataset (unshuffled order): copy before
    writing in place. Optional methods: ``end_cycle(cycle)`` (release per-cycle memory) and
    ``close()``.
    """

    group: int

    def __call__(self, arrays: Batch, ctx: BatchContext) -> Mapping[str, Array]: ...


class BatchSource(Protocol):
    """What the producer server needs from its data."""

    spec: DataSpec
    rank: int
    shard_rows: int
    shard_offset: int
    dataset_fingerprint: str

    def cycle_info(self, cycle: int) -> CycleInfo: ...

    def iter_chunks(self, cycle: int, start: int, max_batches: int) -> Iterator[Chunk]: ...

    def end_cycle(self, cycle: int) -> None: ...

    def close(self) -> None: ...


def split_chunk(arrays: Mapping[str, Array], count: int, batch_size: int) -> list[Batch]:
    """A chunk's ``count`` training batches (views, no copies)."""
    if count == 1:
        return [dict(arrays)]
    return [
        {name: t[i * batch_size : (i + 1) * batch_size] for name, t in arrays.items()}
        for i in range(count)
    ]


class ShardSource:
    """Serves a rank's shard: cursor + vectorised gather + optional transform."""

    def __init__(
        self,
        shard: Shard,
        spec: DataSpec,
        *,
        transform: BatchTransform | None = None,
    ) -> None:
        self.shard = shard
        self.spec = spec
        self.rank = shard.rank
        self.shard_rows = shard.num_rows
        self.shard_offset = shard.offset
        self.dataset_fingerprint = shard.fingerprint
        self.cursor = CycleCursor(spec, rank=shard.rank, shard_rows=shard.num_rows)
        self.transform = transform

    def cycle_info(self, cycle: int) -> CycleInfo:
        return self.cursor.info(cycle)

    def fetch(self, cycle: int, slots: np.ndarray) -> Batch:
        return self.shard.gather(self.cursor.slot_rows(cycle, slots))

    @property
    def batch_nbytes(self) -> int:
        """Bytes of one served batch when known before building one (0 with a transform)."""
        if self.transform is not None:
            return 0
        per_sample = 8  # sample_idx
        for col in self.shard.columns.values():
            per_sample += col.row_nbytes
        return per_sample * self.spec.batch_size

    def iter_chunks(self, cycle: int, start: int, max_batches: int) -> Iterator[Chunk]:
        """Batches ``start ..`` of ``cycle`` in chunks; deterministic in (spec, rank, cycle,
        batch) whatever the chunking.

        Without a transform a chunk is up to ``max_batches`` batches gathered in one vectorised
        step (one copy straight into what is sent, no per-batch work); with one, a chunk is one
        call of the transform (``transform.group`` batches).
        """
        n = self.spec.batches_in_cycle(cycle)
        group = max(1, int(getattr(self.transform, "group", 1))) if self.transform else 1
        b = start
        # Sequential big batches: chunks are cut at record batches (VIEW_MIN_BATCH_BYTES).
        cut = (
            self.transform is None
            and self.batch_nbytes >= VIEW_MIN_BATCH_BYTES
            and self.cursor.order(cycle) is None
        )
        while b < n:
            count = min(group if self.transform else max(1, max_batches), n - b)
            if cut and count > 1:
                count = self._view_count(cycle, b, count)
            slots = self.cursor.batch_slots(cycle, b, count)
            arrays = self.fetch(cycle, slots)
            if self.transform is not None:
                arrays = self._transform(arrays, cycle, b, count, slots)
            yield count, arrays
            b += count

    def _view_count(self, cycle: int, b: int, count: int) -> int:
        """Batches from ``b`` (sequential order) to gather as one chunk: ``count`` if they lie
        in one record batch, else those that do (>= 1), so the chunk needs no copy."""
        size = self.spec.batch_size
        first = int(self.cursor.slot_rows(cycle, np.array([b * size]))[0])
        rows = self.shard.view_rows(first, count * size)
        return count if rows == count * size else max(1, rows // size)

    def iter_batches(self, cycle: int, start: int) -> Iterator[Batch]:
        """Batches ``start ..`` of ``cycle`` one at a time (views of the chunks)."""
        for count, arrays in self.iter_chunks(cycle, start, 1):
            yield from split_chunk(arrays, count, self.spec.batch_size)

    def _transform(self, arrays: Batch, cycle: int, b: int, count: int, slots: np.ndarray) -> Batch:
        assert self.transform is not None
        n = self.spec.batches_in_cycle(cycle)
        ctx = BatchContext(
            rank=self.rank,
            cycle=cycle,
            batch=b,
            num_batches=count,
            seed=self.spec.seed,
            slots=slots,
            cycle_len=n * self.spec.batch_size,
            fetch=lambda s, _c=cycle: self.fetch(_c, s),
        )
        try:
            out = self.transform(arrays, ctx)
        except LensfeedError:
            raise
        except Exception as exc:
            raise TransformError(
                f"rank {self.rank}: transform failed on cycle {cycle} batch {b}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        rows = count * self.spec.batch_size
        for name, t in out.items():
            if t.shape[:1] != (rows,):
                raise TransformError(
                    f"transform output '{name}' has shape {tuple(t.shape)}; leading dim must be "
                    f"{rows}"
                )
        return dict(out)

    def end_cycle(self, cycle: int) -> None:
        hook = getattr(self.transform, "end_cycle", None)
        if hook is not None:
            hook(cycle)

    def close(self) -> None:
        hook = getattr(self.transform, "close", None)
        if hook is not None:
            hook()


def describe(batch: Mapping[str, Any]) -> str:
    """``name:dtype[shape]`` list for logs."""
    return ", ".join(
        f"{k}:{np.dtype(v.dtype) if isinstance(v, np.ndarray) else v.dtype}{list(v.shape)}"
        for k, v in batch.items()
    )


__all__ = [
    "Batch",
    "BatchContext",
    "BatchSource",
    "BatchTransform",
    "Chunk",
    "ShardSource",
    "describe",
    "split_chunk",
]
