"""The per-rank cursor: which shard rows make up batch ``j`` of cycle ``k``.

The rank's samples form one endless *stream* that walks the shard and wraps to row 0 when it
runs out (the original ``StopIteration -> reset`` loop). Cycle ``k`` serves the next
``batches(k) * B`` stream positions; an ``S % B`` remainder is not dropped, it is where cycle
``k + 1`` starts. Because the position of every cycle is a closed formula of ``k`` (see
:meth:`common.spec.DataSpec.cycle_start`), the cursor needs no saved state: any process can
regenerate any (cycle, batch) bit-for-bit, which is what makes restarts exact.

Shuffling permutes the positions *within* a cycle with a generator seeded by
``(seed, rank, cycle)``; memory is one int64 permutation per cycle, nothing proportional to
the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lensfeed.common.spec import DataSpec


@dataclass(frozen=True)
class CycleInfo:
    """Where a cycle sits on the stream."""

    cycle: int
    batches: int
    batch_size: int
    start: int  # stream position of the cycle's first sample
    shard_rows: int

    @property
    def samples(self) -> int:
        return self.batches * self.batch_size

    @property
    def end(self) -> int:
        return self.start + self.samples

    @property
    def shard_pos(self) -> int:
        """Shard row the cursor points at when the cycle starts."""
        return self.start % self.shard_rows

    @property
    def wraps(self) -> int:
        """How many times the cursor went back to row 0 while serving this cycle.

        A wrap happens when a sample is needed and the shard is exhausted, so a cycle that
        starts exactly at a shard boundary counts the wrap at its first sample.
        """
        if self.samples == 0:
            return 0
        before = (self.start - 1) // self.shard_rows if self.start > 0 else 0
        return self.total_wraps - before

    @property
    def total_wraps(self) -> int:
        """Wraps since cycle 0, up to the end of this cycle."""
        return 0 if self.end == 0 else (self.end - 1) // self.shard_rows


class CycleCursor:
    """Maps (cycle, batch) to shard-local rows for one rank.

    The permutation of the most recent cycles is cached (the producer touches at most the
    current and the next cycle), so batch lookup is one slice and one modulo.
    """

    def __init__(self, spec: DataSpec, *, rank: int, shard_rows: int) -> None:
        if shard_rows <= 0:
            raise ValueError("shard_rows must be positive")
        self.spec = spec
        self.rank = rank
        self.shard_rows = shard_rows
        self._perms: dict[int, np.ndarray] = {}

    def info(self, cycle: int) -> CycleInfo:
        return CycleInfo(
            cycle=cycle,
            batches=self.spec.batches_in_cycle(cycle),
            batch_size=self.spec.batch_size,
            start=self.spec.cycle_start(cycle),
            shard_rows=self.shard_rows,
        )

    def order(self, cycle: int) -> np.ndarray | None:
        """Cycle-local sample order (a permutation), or None when not shuffling."""
        if not self.spec.shuffle:
            return None
        perm = self._perms.get(cycle)
        if perm is None:
            n = self.spec.batches_in_cycle(cycle) * self.spec.batch_size
            rng = np.random.default_rng([self.spec.seed, self.rank, cycle])
            perm = rng.permutation(n)
            self._perms = {k: v for k, v in self._perms.items() if k >= cycle - 1}
            self._perms[cycle] = perm
        return perm

    def slot_rows(self, cycle: int, slots: np.ndarray) -> np.ndarray:
        """Shard rows of cycle-local *slots* (slot ``s`` = the s-th sample the cycle serves)."""
        order = self.order(cycle)
        local = slots if order is None else order[slots]
        return (self.spec.cycle_start(cycle) + local) % self.shard_rows

    def batch_slots(self, cycle: int, first: int, count: int = 1) -> np.ndarray:
        """Slots of batches ``first .. first + count - 1`` of ``cycle``."""
        b = self.spec.batch_size
        n = self.spec.batches_in_cycle(cycle)
        if not (first >= 0 and first + count <= n):
            raise IndexError(f"batches {first}..{first + count - 1} outside cycle of {n}")
        return np.arange(first * b, (first + count) * b, dtype=np.int64)

    def batch_rows(self, cycle: int, batch: int) -> np.ndarray:
        return self.slot_rows(cycle, self.batch_slots(cycle, batch))


__all__ = ["CycleCursor", "CycleInfo"]
