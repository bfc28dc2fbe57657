"""Background regeneration: batches are built before they are needed, within a budget.

The generator thread walks (cycle, batch) in order and keeps at most ``max_batches`` batches
(and ``max_bytes`` bytes) ready. It never runs more than one cycle past the newest cycle the
trainer asked for (``prepare_ahead=True``) or past that cycle at all (``False``), so memory is
bounded by the budget whatever the cycle size. Which batch is built never depends on timing,
only on (spec, rank, cycle, batch): preparing ahead changes when bytes are made, not which.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from lensfeed.producer.source import Batch, BatchSource


@dataclass
class Ready:
    """One item the generator made: ``count`` consecutive batches starting at ``batch``
    (arrays concatenated along dim 0), the end of a cycle, or a failure."""

    kind: str  # "batch" | "end" | "error"
    cycle: int
    batch: int = 0
    data: Batch | None = None
    nbytes: int = 0
    regen_s: float = 0.0
    error: BaseException | None = None
    count: int = 1
    #: a piece of a split chunk: it already had message size, so it is never stacked again
    fragment: bool = False

    def split(self, k: int) -> tuple[Ready, Ready]:
        """The first ``k`` batches and the rest, as views of the same arrays."""
        assert 0 < k < self.count
        assert self.data is not None
        rows = next(iter(self.data.values())).shape[0] // self.count * k
        head = {name: a[:rows] for name, a in self.data.items()}
        tail = {name: a[rows:] for name, a in self.data.items()}
        nb = self.nbytes * k // self.count
        return (
            Ready("batch", self.cycle, self.batch, head, nbytes=nb, count=k, fragment=True),
            Ready(
                "batch",
                self.cycle,
                self.batch + k,
                tail,
                nbytes=self.nbytes - nb,
                count=self.count - k,
                fragment=True,
            ),
        )


def _name_os_thread(name: str) -> None:
    """Give the calling thread an OS-visible name (``top -H``, ``/proc/*/task/*/comm``), so
    the regeneration thread can be told apart from the server loop when profiling."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _nbytes(batch: Batch) -> int:
    total = 0
    for v in batch.values():
        total += v.nbytes if hasattr(v, "nbytes") else v.numel() * v.element_size()
    return total


class Prefetcher:
    """Runs ``source.iter_chunks`` in a daemon thread and hands out :class:`Ready` items.

    ``chunk`` is how many batches one gather builds (a message's worth): fewer, larger numpy
    calls and no copy to pack them into a message later.
    """

    def __init__(
        self,
        source: BatchSource,
        *,
        max_batches: int,
        max_bytes: int = 0,
        prepare_ahead: bool = True,
        chunk: int = 1,
    ) -> None:
        self.source = source
        self.max_batches = max(1, max_batches)
        # At least two chunks fit the budget, so building the next overlaps sending the last.
        self.chunk = max(1, min(chunk, self.max_batches // 2))
        self.max_bytes = max_bytes
        self.prepare_ahead = prepare_ahead
        # Once full, the builder resumes only below this mark: one wake-up per several batches.
        self._low_water = self.max_batches - max(1, self.max_batches // 4)
        self._building_paused = False
        self._cv = threading.Condition()
        self._items: deque[Ready] = deque()
        self._ready_batches = 0
        self._ready_bytes = 0
        self._gen: tuple[int, int] | None = None  # next (cycle, batch) to build; None = idle
        # What one build adds: a chunk, or a transform's whole group (it ignores ``chunk``);
        # learned from the last build, so the budgets hold for either.
        self._step_batches = self.chunk
        self._step_bytes = 0
        self._requested = -1  # newest cycle the trainer asked for
        self._epoch = 0
        self._failed = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lensfeed-regen", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- control (server thread)

    def reset(self, cycle: int, batch: int) -> None:
        """Drop everything prepared and restart generation at (cycle, batch)."""
        with self._cv:
            self._items.clear()
            self._ready_batches = self._ready_bytes = 0
            self._gen = (cycle, batch)
            self._requested = cycle - 1
            self._epoch += 1
            self._failed = False
            self._building_paused = False
            self._cv.notify_all()

    def request(self, cycle: int) -> bool:
        """The trainer asked for ``cycle``; returns whether some of it was already prepared."""
        with self._cv:
            self._requested = max(self._requested, cycle)
            ready = any(it.cycle == cycle for it in self._items)
            self._cv.notify_all()
            return ready

    def get(self, timeout: float, max_batches: int = 1) -> list[Ready]:
        """The next items in (cycle, batch) order, holding at most ``max_batches`` batches.

        Stops after a cycle end or an error (those need no credit, so they come even when
        ``max_batches`` is 0). Returns [] if nothing fits within ``timeout``. Taking several
        items at once keeps lock traffic off the per-batch path.
        """
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._items or (max_batches == 0 and self._items[0].kind == "batch"):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed or max_batches == 0:
                    return []
                self._cv.wait(remaining)
            out: list[Ready] = []
            batches = 0
            while self._items:
                item = self._items[0]
                if item.kind == "batch":
                    if batches == max_batches:
                        break
                    if item.count > max_batches - batches:  # take what the credit allows
                        item, self._items[0] = item.split(max_batches - batches)
                    else:
                        self._items.popleft()
                    batches += item.count
                    self._ready_batches -= item.count
                    self._ready_bytes -= item.nbytes
                    out.append(item)
                    continue
                out.append(self._items.popleft())
                break  # a cycle boundary: the caller decides what follows
            if self._ready_batches <= self._low_water:
                self._cv.notify_all()
            return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # ---------------------------------------------------------------- generator thread

    def _may_build(self) -> bool:
        if self._gen is None or self._failed:
            return False
        limit = self._requested + (1 if self.prepare_ahead else 0)
        if self._gen[0] > limit:
            return False
        if not self._ready_batches:  # nothing ready: always build (one build may exceed both)
            self._building_paused = False
            return True
        if self._ready_batches + self._step_batches > self.max_batches:
            self._building_paused = True
            return False
        if self._building_paused and self._ready_batches > self._low_water:
            return False
        self._building_paused = False
        return not (self.max_bytes and self._ready_bytes + self._step_bytes > self.max_bytes)

    def _run(self) -> None:
        _name_os_thread(self._thread.name)
        it: Any = None
        it_key: tuple[int, int] | None = None  # (epoch, cycle) the iterator belongs to
        regen_s = 0.0
        while True:
            with self._cv:
                while not self._closed and not self._may_build():
                    self._cv.wait()
                if self._closed:
                    return
                assert self._gen is not None
                epoch, (cycle, batch) = self._epoch, self._gen
            try:
                if it_key != (epoch, cycle):
                    it = self.source.iter_chunks(cycle, batch, self.chunk)
                    it_key, regen_s = (epoch, cycle), 0.0
                t0 = time.perf_counter()
                count, data = next(it, (0, None))
                dt = time.perf_counter() - t0
                regen_s += dt
                end = None
                if data is None or batch + count >= self.source.cycle_info(cycle).batches:
                    self.source.end_cycle(cycle)
                    end = Ready("end", cycle, regen_s=regen_s)
            except BaseException as exc:  # reported to the trainer, never swallowed
                with self._cv:
                    if epoch == self._epoch:
                        self._items.append(Ready("error", cycle, batch, error=exc))
                        self._failed = True
                        self._cv.notify_all()
                it_key = None
                continue
            with self._cv:
                if epoch != self._epoch:  # reset while we were building: discard
                    continue
                if data is not None:
                    nb = _nbytes(data)
                    self._items.append(Ready("batch", cycle, batch, data, nbytes=nb, count=count))
                    self._ready_batches += count
                    self._ready_bytes += nb
                    self._step_batches = max(self.chunk, count)
                    self._step_bytes = nb
                if end is not None:
                    self._items.append(end)
                    self._gen = (cycle + 1, 0)
                    it_key = None
                else:
                    self._gen = (cycle, batch + count)
                self._cv.notify_all()


__all__ = ["Prefetcher", "Ready"]
