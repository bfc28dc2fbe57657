"""A trainer-side process for the benchmarks: a :class:`lensfeed.trainer.client.FeedClient`
loop that times cycles, batches and cycle boundaries and writes a JSON report when it exits.

::

    python -m benchmarks.consumer --report out.json --cycles 6 --warmup 1 [--step-s 0.003]
        -- dataset.path=... batch_size=64 ...   # the producer's overrides, same data spec

With ``--block N``, each cycle after the warm-up is also cut into blocks of ``N`` batches timed
from the arrival of batch ``i*N`` to the arrival of batch ``(i+1)*N``: steady-state streaming,
without the cycle boundary.

Timeline: ``t_end[k]`` is when the loop finished cycle ``k`` (CUDA synchronised); cycle ``k``
takes ``t_end[k] - t_end[k-1]``, so the NEXT_CYCLE handshake and the per-cycle cleanup are
counted, as a training loop would see them. The *boundary* of cycle ``k`` is the wall time from
the end of the last training step of cycle ``k-1`` to the moment the first batch of cycle ``k``
is in the loop's hands; ``boundary_feed_wait_s`` is the part of it spent waiting on the producer
(``FeedStats.wait_s``), the rest is the client's own work there (cycle-end cleanup).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import AnonSampler, cpu_s, self_report, spend, write_json
from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.logs import setup_logging
from lensfeed.common.malloc import tune_for_large_messages
from lensfeed.common.spec import DataSpec
from lensfeed.producer.fake import tensor_arg
from lensfeed.trainer.client import FeedClient


def run(args: argparse.Namespace, cfg: LensfeedConfig) -> dict[str, Any]:
    spec = DataSpec.from_config(cfg)
    device = torch.device(args.device)
    feed = FeedClient.from_config(
        cfg,
        0,
        device=device,
        tensors=dict(args.tensor) or None,
    )
    cuda = device.type == "cuda"
    t_conn = time.perf_counter()
    feed.connect()
    t_start = time.perf_counter()
    cycles: list[dict[str, Any]] = []
    total_batches = 0
    t_prev = t_start  # end of the previous cycle (or of the connect)
    t_last_step = t_start
    wait_at_last_step = feed.stats.wait_s
    for cycle in feed.cycles(args.cycles):
        wall_start = time.time()  # wall clock: lines up with /proc samples taken outside
        wait0 = feed.stats.wait_s
        bytes0 = feed.stats.bytes
        n = 0
        boundary_s = boundary_wait = float("nan")
        wait_first = feed.stats.wait_s
        marks: list[tuple[int, float, int]] = []
        timed = args.block > 0 and len(cycles) >= args.warmup
        for batch in cycle:
            now = time.perf_counter()
            if n == 0:
                boundary_s = now - t_last_step
                boundary_wait = feed.stats.wait_s - wait_at_last_step
                wait_first = feed.stats.wait_s
            if timed and n % args.block == 0:
                cpu = cpu_s() + (cpu_s(args.producer_pid) if args.producer_pid else 0.0)
                marks.append((n, now, feed.stats.bytes, cpu))
            if args.step_s:
                spend(args.step_s, args.step_mode)
            elif cuda:
                next(iter(batch.values())).sum()  # make the stream depend on the copy
            n += 1
            total_batches += 1
            t_last_step = time.perf_counter()
            wait_at_last_step = feed.stats.wait_s
        if cuda:
            torch.cuda.synchronize(device)
        t_end = time.perf_counter()
        cycles.append(
            {
                "cycle": cycle.index,
                "wall_start": wall_start,
                "wall_end": time.time(),
                "batches": n,
                "samples": n * spec.batch_size,
                "bytes": feed.stats.bytes - bytes0,
                "seconds": t_end - t_prev,
                "wait_s": feed.stats.wait_s - wait0,
                # after the first batch arrived (the boundary's wait is not counted again)
                "in_cycle_wait_s": feed.stats.wait_s - wait_first,
                "boundary_s": boundary_s,
                "boundary_feed_wait_s": boundary_wait,
                "regen_s": cycle.regen_s,
                "prepared_ahead": bool(cycle.meta.get("prepared_ahead")),
                "complete": cycle.done,
                "blocks": [
                    {
                        "batches": n1 - n0,
                        "seconds": t1 - t0,
                        "bytes": b1 - b0,
                        "cpu_s": c1 - c0,  # this process and the producer together
                    }
                    for (n0, t0, b0, c0), (n1, t1, b1, c1) in zip(
                        marks[:-1], marks[1:], strict=True
                    )
                ],
            }
        )
        t_prev = t_end
    wall = time.perf_counter() - t_start
    feed.close()
    return {
        "connect_s": t_start - t_conn,
        "wall_s": wall,
        "cycles": cycles,
        "warmup": args.warmup,
        "total_batches": total_batches,
        "wait_s": feed.stats.wait_s,
        "cleanups": feed.stats.cleanups,
        "device": str(device),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=Path, required=True)
    p.add_argument("--cycles", type=int, default=3, help="cycles to request (warm-up included)")
    p.add_argument("--warmup", type=int, default=1, help="leading cycles not to be summarised")
    p.add_argument(
        "--block",
        type=int,
        default=0,
        help="also time every BLOCK batches inside each cycle (arrival to arrival), so "
        "steady-state throughput excludes the cycle boundary",
    )
    p.add_argument("--step-s", type=float, default=0.0, help="simulated training step per batch")
    p.add_argument("--step-mode", choices=("sleep", "busy"), default="sleep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--producer-pid", type=int, default=0, help="its CPU is read at block marks")
    p.add_argument(
        "--tensor",
        action="append",
        type=tensor_arg,
        default=[],
        help="a tensor the producer serves, name:dtype:shape (its transform's output)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    AnonSampler.start()
    setup_logging("bench-consumer", rank=0, level=logging.WARNING)
    cfg = load_config(None, args.overrides)
    if cfg.feed.tune_malloc:  # what `lensfeed train` does at start
        tune_for_large_messages()
    report = run(args, cfg)
    report.update(self_report())
    write_json(args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
