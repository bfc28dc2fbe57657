"""The two baselines lensfeed replaces, over the same ``save_to_disk`` dataset.

original
    The seed code's regeneration: a per-row ``next(shard_iter)`` loop over a ``datasets``
    dataset that resets the iterator on ``StopIteration`` (wrap-around), building a Python list
    cache of ``S`` samples; then (optionally shuffled) the cache is iterated in batches with one
    ``torch.tensor`` per batch. Regeneration stops the world: no batch until the whole cache is
    built.
dataloader
    ``torch.utils.data.DataLoader`` over ``dataset.with_format("torch")``, batch 64, with 0 or 2
    worker processes (per-sample ``__getitem__`` + default collate).

``python -m benchmarks.baselines original-memory --path P --samples S --report R`` builds one
original cache in a fresh process and reports its peak RSS.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import self_report, spend, write_json


class OriginalCache:
    """The seed code's wrap-around per-row iterator and list cache."""

    def __init__(self, path: str | Path, *, seed: int = 0) -> None:
        import datasets

        datasets.disable_progress_bars()
        self.dataset = datasets.load_from_disk(str(path))
        self._it: Iterator[dict[str, Any]] = iter(self.dataset)
        self.wraps = 0
        self._rng = random.Random(seed)

    def _next_row(self) -> dict[str, Any]:
        try:
            return next(self._it)
        except StopIteration:
            self.wraps += 1
            self._it = iter(self.dataset)
            return next(self._it)

    def regenerate(
        self,
        samples: int,
        *,
        shuffle: bool,
        batch_size: int = 64,
        transform_s: float = 0.0,
        transform_mode: str = "sleep",
    ) -> list[list[int]]:
        """Build the whole cache (stop-the-world); ``transform_s`` per batch simulates a
        regeneration transform of fixed cost, as in the cycle-boundary benchmark."""
        cache: list[list[int]] = []
        for i in range(samples):
            cache.append(self._next_row()["input_ids"])
            if transform_s and (i + 1) % batch_size == 0:
                spend(transform_s, transform_mode)
        if shuffle:
            self._rng.shuffle(cache)
        return cache

    @staticmethod
    def batches(cache: list[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(cache) - batch_size + 1, batch_size):
            yield torch.tensor(cache[i : i + batch_size], dtype=torch.int32)


def run_original(
    path: str | Path, *, samples: int, batch_size: int, shuffle: bool, repeats: int
) -> list[dict[str, float]]:
    """Time ``repeats`` regenerate-then-iterate cycles (after one untimed warm-up cycle)."""
    orig = OriginalCache(path)
    out: list[dict[str, float]] = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        cache = orig.regenerate(samples, shuffle=shuffle, batch_size=batch_size)
        t1 = time.perf_counter()
        n = 0
        for _ in orig.batches(cache, batch_size):
            n += 1
        t2 = time.perf_counter()
        del cache
        if r:
            out.append(
                {
                    "samples": n * batch_size,
                    "seconds": t2 - t0,
                    "regen_s": t1 - t0,
                    "iterate_s": t2 - t1,
                }
            )
    return out


def run_dataloader(
    path: str | Path,
    *,
    samples: int,
    batch_size: int,
    shuffle: bool,
    workers: int,
    repeats: int,
) -> list[dict[str, float]]:
    """Time ``repeats`` epochs of ``samples`` samples (after one warm-up epoch that also starts
    the persistent workers)."""
    import datasets
    from torch.utils.data import DataLoader, RandomSampler

    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(str(path)).with_format("torch")
    gen = torch.Generator().manual_seed(0)
    sampler: Any = (
        RandomSampler(ds, num_samples=samples, generator=gen) if shuffle else range(samples)
    )
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    out: list[dict[str, float]] = []
    try:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            n = 0
            for batch in loader:
                assert batch["input_ids"].shape[0] == batch_size
                n += 1
            dt = time.perf_counter() - t0
            if r:
                out.append({"samples": n * batch_size, "seconds": dt})
    finally:
        del loader  # stops persistent workers
    return out


def stop_the_world(
    path: str | Path,
    *,
    samples: int,
    batch_size: int,
    cycles: int,
    transform_s: float,
    step_s: float,
    mode: str = "sleep",
) -> dict[str, Any]:
    """The original loop with a fixed-cost transform and training step, for the stall section:
    each cycle regenerates the whole cache, then trains over it."""
    orig = OriginalCache(path)
    per_cycle: list[dict[str, float]] = []
    t_start = time.perf_counter()
    for _ in range(cycles):
        t0 = time.perf_counter()
        cache = orig.regenerate(
            samples,
            shuffle=True,
            batch_size=batch_size,
            transform_s=transform_s,
            transform_mode=mode,
        )
        t1 = time.perf_counter()
        for _batch in orig.batches(cache, batch_size):
            spend(step_s, mode)
        t2 = time.perf_counter()
        per_cycle.append({"regen_s": t1 - t0, "train_s": t2 - t1, "boundary_s": t1 - t0})
    return {"wall_s": time.perf_counter() - t_start, "cycles": per_cycle}


def _memory_main(args: argparse.Namespace) -> int:
    orig = OriginalCache(args.path)
    t0 = time.perf_counter()
    cache = orig.regenerate(args.samples, shuffle=True)
    n = sum(1 for _ in orig.batches(cache, 64))
    write_json(
        args.report,
        {"samples": args.samples, "batches": n, "seconds": time.perf_counter() - t0}
        | self_report(),
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("original-memory", help="peak RSS of one original cache of S samples")
    m.add_argument("--path", required=True)
    m.add_argument("--samples", type=int, required=True)
    m.add_argument("--report", type=Path, required=True)
    args = p.parse_args(argv)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {"original-memory": _memory_main}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
