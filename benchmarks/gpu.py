"""GPU section: host -> device throughput of ``FeedClient(device='cuda')`` against a plain pinned
``copy_`` of the same bytes. Recorded as "no GPU on this machine" where CUDA is unavailable."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import GB, Workdir, summarize
from benchmarks.feed import run_feed
from benchmarks.settings import BATCH, Settings


def pinned_copy(nbytes: int, count: int, repeats: int) -> list[float]:
    """GB/s of ``count`` non-blocking pinned host -> device copies of ``nbytes``, per repeat."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out: list[float] = []
    for r in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(count):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        if r:
            out.append(nbytes * count / (time.perf_counter() - t0) / GB)
    return out


def run(
    work: Workdir,
    settings: Settings,
    data: dict[str, Path],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"available": False, "note": "no GPU on this machine (torch.cuda.is_available())"}
    rows: list[dict[str, Any]] = []
    for case in settings.selected():
        if case.key == "tok128":
            continue
        n = settings.batches_per_cycle(case)
        progress(f"gpu {case.key}")
        res = run_feed(
            work,
            f"gpu-{case.key}",
            dataset=data[case.dataset],
            cycle_batches=n,
            cycles=settings.repeats + 1,
            warmup=1,
            shuffle=True,
            transform=case.transform,
            consumer_args=["--device", "cuda"],
        )
        feed = [c["bytes"] / c["seconds"] / GB for c in res.timed_cycles()]
        copy = pinned_copy(case.batch_bytes, n, settings.repeats)
        rows.append(
            {
                "case": case.key,
                "label": case.label,
                "batch_bytes": case.batch_bytes,
                "feed_gb_per_s": summarize(feed),
                "feed_samples_per_s": summarize([g * GB / case.bytes_per_sample for g in feed]),
                "pinned_copy_gb_per_s": summarize(copy),
                "batch": BATCH,
            }
        )
    return {"available": True, "device": torch.cuda.get_device_name(0), "rows": rows}


__all__ = ["pinned_copy", "run"]
