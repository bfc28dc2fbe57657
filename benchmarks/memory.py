"""Memory: peak RSS of the producer and the trainer for a small and a large cycle size ``S``.

Shuffled (64, 128) token batches. Both runs serve the same number of samples (one cycle of the
large ``S``; about a hundred cycles of the small one), so they touch the same shard rows and
only ``S`` differs (with prepare_ahead the producer has built into the next cycle by the end,
so two permutations are alive at the peak). Two numbers per process:

* ``VmHWM`` - the kernel's peak resident set, which includes memory-mapped dataset pages: those
  grow with the number of distinct shard rows touched (bounded by the shard's size) and are
  shared, clean page cache, not allocations;
* peak ``RssAnon`` (sampled every 20 ms) - private memory: the heap, the permutation, queues.

The original loop holds its whole cache as Python lists, so its RSS is measured at two smaller
``S`` in a child process and extrapolated linearly to the large ``S``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Proc, Workdir, py, read_report
from benchmarks.feed import run_feed
from benchmarks.settings import BATCH, Settings

PERM_BYTES_PER_SAMPLE = 8  # one int64 permutation entry per sample of a cycle


def _feed(work: Workdir, data: dict[str, Path], samples: int, cycles: int) -> dict[str, Any]:
    # Whole cycles only, and the peak must include the next cycle's permutation, which
    # prepare_ahead builds while the current cycle is still being served.
    n = samples // BATCH
    res = run_feed(
        work,
        f"mem-{samples}",
        dataset=data["tok128"],
        cycle_batches=n,
        cycles=cycles,
        warmup=0,
        shuffle=True,
        timeout_s=400,
    )
    return {
        "samples_per_cycle": n * BATCH,
        "batches_consumed": res.consumer["total_batches"],
        "producer": {k: v for k, v in res.producer.items() if "bytes" in k},
        "trainer": {k: v for k, v in res.consumer.items() if "bytes" in k},
    }


def _original(work: Workdir, data: dict[str, Path], samples: int) -> dict[str, Any]:
    report = work.path(f"orig-mem-{samples}.json")
    proc = Proc(
        py(
            "benchmarks.baselines",
            "original-memory",
            "--path",
            str(data["tok128"]),
            "--samples",
            str(samples),
            "--report",
            str(report),
        ),
        log=work.path(f"orig-mem-{samples}.log"),
    )
    try:
        if proc.wait(300) != 0:
            raise RuntimeError(f"original memory run failed:\n{proc.tail()}")
    finally:
        proc.kill()
    return read_report(report)


def run(
    work: Workdir,
    settings: Settings,
    data: dict[str, Path],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    small, large = settings.memory_samples
    # The same samples served at both sizes: a memory-mapped row that is touched is resident, so
    # serving fewer samples at the small S would credit it with the pages it never read.
    small_cycles = -(-large // (small // BATCH * BATCH))
    progress(f"memory lensfeed S={small} x {small_cycles} cycles")
    r_small = _feed(work, data, small, small_cycles)
    progress(f"memory lensfeed S={large}")
    r_large = _feed(work, data, large, 1)
    perm = PERM_BYTES_PER_SAMPLE * r_large["samples_per_cycle"]
    checks: dict[str, Any] = {}
    for side in ("producer", "trainer"):
        for metric in ("peak_rss_bytes", "peak_anon_bytes"):
            a, b = r_small[side][metric], r_large[side][metric]
            limit = 1.10 * a + perm
            checks[f"{side}.{metric}"] = {
                "small": a,
                "large": b,
                "growth_bytes": b - a,
                "ratio": b / a if a else float("nan"),
                "limit_bytes": limit,
                "ok": b <= limit,
            }
    orig: list[dict[str, Any]] = []
    for s in settings.original_memory_samples:
        progress(f"memory original S={s}")
        orig.append(_original(work, data, s))
    (s0, m0), (s1, m1) = [(o["samples"], o["peak_rss_bytes"]) for o in orig[:2]]
    per_sample = (m1 - m0) / (s1 - s0)
    return {
        "small": r_small,
        "large": r_large,
        "permutation_bytes": perm,
        "checks": checks,
        "original": orig,
        "original_bytes_per_sample": per_sample,
        "original_extrapolated_large_bytes": m0 + per_sample * (large - s0),
    }


__all__ = ["PERM_BYTES_PER_SAMPLE", "run"]
