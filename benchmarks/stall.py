"""Cycle-boundary stall: how long the training loop waits for the first batch of each new cycle.

The producer runs a pass-through transform of fixed cost per batch (``Settings.stall_regen_s``,
a simulated regeneration forward) and the consumer a training step of fixed cost per batch
(``stall_step_s``); both sleep, so the two processes do not fight over this machine's two cores
and the numbers show the pipeline, not CPU contention. A cycle's regeneration time is what the
producer reports for it (``CYCLE_END.regen_s``: time spent building its batches).

Compared: lensfeed preparing the next cycle ahead (bounded by ``feed.max_ahead_batches``), not
preparing ahead, and the original loop, which regenerates the whole cache before training on it
(its boundary wait is the whole regeneration).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import baselines
from benchmarks.common import Workdir, summarize
from benchmarks.feed import run_feed
from benchmarks.settings import BATCH, Settings

#: (key, name, overrides): prepare_ahead with a large and a small bound, and without it.
VARIANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "ahead",
        "lensfeed prepare_ahead (max_ahead_batches=64)",
        ("feed.prepare_ahead=true", "feed.max_ahead_batches=64"),
    ),
    (
        "ahead16",
        "lensfeed prepare_ahead (max_ahead_batches=16)",
        ("feed.prepare_ahead=true", "feed.max_ahead_batches=16"),
    ),
    (
        "no-ahead",
        "lensfeed without prepare_ahead",
        ("feed.prepare_ahead=false", "feed.max_ahead_batches=64"),
    ),
)


def run(
    work: Workdir,
    settings: Settings,
    data: dict[str, Path],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    n = settings.stall_batches
    cycles = settings.stall_cycles
    params = {
        "batch_size": BATCH,
        "batches_per_cycle": n,
        "cycles": cycles,
        "regen_s_per_batch": settings.stall_regen_s,
        "step_s_per_batch": settings.stall_step_s,
        "mode": "sleep",
        "dataset": "tok128",
        "shuffle": True,
    }
    rows: list[dict[str, Any]] = []
    for key, name, overrides in VARIANTS:
        progress(f"stall {key}")
        res = run_feed(
            work,
            f"stall-{key}",
            dataset=data["tok128"],
            cycle_batches=n,
            cycles=cycles,
            warmup=0,
            transform=f"cost:{settings.stall_regen_s}:sleep",
            extra_overrides=overrides,
            consumer_args=["--step-s", str(settings.stall_step_s)],
        )
        cyc = res.consumer["cycles"]
        later = cyc[1:]  # cycle 0's start is the cold start, reported apart
        boundary = [c["boundary_s"] for c in later]
        regen = [c["regen_s"] for c in cyc]
        rows.append(
            {
                "name": name,
                "key": key,
                "first_batch_s": cyc[0]["boundary_s"],
                "boundary_s": summarize(boundary),
                "boundary_feed_wait_s": summarize([c["boundary_feed_wait_s"] for c in later]),
                "regen_s": summarize(regen),
                "boundary_over_regen": summarize(
                    [b / r for b, r in zip(boundary, [c["regen_s"] for c in later], strict=True)]
                ),
                "wait_in_cycle_s": summarize([c["in_cycle_wait_s"] for c in later]),
                "wall_s": res.consumer["wall_s"],
            }
        )
    progress("stall original")
    orig = baselines.stop_the_world(
        data["tok128"],
        samples=n * BATCH,
        batch_size=BATCH,
        cycles=cycles,
        transform_s=settings.stall_regen_s,
        step_s=settings.stall_step_s,
    )
    oc = orig["cycles"]
    rows.append(
        {
            "name": "original stop-the-world",
            "key": "original",
            "first_batch_s": oc[0]["boundary_s"],
            "boundary_s": summarize([c["boundary_s"] for c in oc[1:]]),
            "boundary_feed_wait_s": summarize([c["boundary_s"] for c in oc[1:]]),
            "regen_s": summarize([c["regen_s"] for c in oc]),
            "boundary_over_regen": summarize([1.0 for _ in oc[1:]]),
            "wait_in_cycle_s": summarize([0.0 for _ in oc[1:]]),
            "wall_s": orig["wall_s"],
        }
    )
    ideal = cycles * n * max(settings.stall_regen_s, settings.stall_step_s)
    return {"params": params, "ideal_wall_s": ideal, "rows": rows}


__all__ = ["run"]
