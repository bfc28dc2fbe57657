"""Activation-cache regeneration: stop-the-world (the original) vs lensfeed's overlapped producer.

C cycles of a fixed-cost training step (a sleep, standing in for a GPU step that leaves the
CPU free) over activations of the frozen tiny model:

* **original**: one process; each cycle first regenerates the whole cache (forward passes over
  the cycle's samples), then trains over it: wall = C x (regen + train).
* **lensfeed**: a producer process runs the same builder and regenerates cycle k+1 while the
  trainer consumes cycle k (``feed.prepare_ahead``); also measured without preparing ahead.

The step cost is set to the measured per-batch regeneration cost, the case where overlap
matters most (ideal speed-up 2x). Run: ``python -m benchmarks.overlap [--cycles C]``; writes
``benchmarks/results/overlap.json`` and ``overlap.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.spec import DataSpec
from lensfeed.producer.main import build_source
from lensfeed.trainer.client import FeedClient

RESULTS = Path(__file__).resolve().parent / "results"


def make_dataset(path: Path, *, rows: int, seq_len: int) -> None:
    import datasets

    ids = np.random.default_rng(0).integers(0, 256, (rows, seq_len)).astype(np.int32)
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(path))


def overrides(data: Path, sock_dir: Path, *, cycle: int, batch: int, ahead: bool) -> list[str]:
    return [
        f"dataset.path={data}",
        "world_size=1",
        f"batch_size={batch}",
        f"dataset.on_the_fly.samples_per_regeneration_cycle={cycle}",
        "activations.builder=activations",
        "activations.model=tiny",
        "activations.tiny.d_model=128",
        "activations.tiny.n_layers=4",
        "activations.layer=3",
        f"activations.forward_batch_size={batch}",
        f"feed.endpoint=ipc://{sock_dir}/overlap-{{rank}}.sock",
        f"feed.prepare_ahead={str(ahead).lower()}",
        f"feed.max_ahead_batches={2 * cycle // batch}",
        "feed.timeout_s=120",
        "training.collective_timeout_s=300",
    ]


def regen_cost(cfg: LensfeedConfig, cycles: int) -> list[float]:
    """Seconds to regenerate each cycle in-process (the original's stop-the-world phase)."""
    source = build_source(cfg, 0)
    out = []
    for c in range(cycles):
        t0 = time.perf_counter()
        for _ in source.iter_batches(c, 0):
            pass
        source.end_cycle(c)
        out.append(time.perf_counter() - t0)
    source.close()
    return out


def original(cfg: LensfeedConfig, cycles: int, step_s: float) -> dict[str, Any]:
    source = build_source(cfg, 0)
    t0 = time.perf_counter()
    regen = 0.0
    for c in range(cycles):
        r0 = time.perf_counter()
        cache = list(source.iter_batches(c, 0))  # training stops while the cache is rebuilt
        source.end_cycle(c)
        regen += time.perf_counter() - r0
        for _ in cache:
            time.sleep(step_s)
    wall = time.perf_counter() - t0
    source.close()
    return {"wall_s": wall, "wait_s": regen, "wait_share": regen / wall}


def lensfeed(over: list[str], cycles: int, step_s: float) -> dict[str, Any]:
    cfg = load_config(None, over)
    prod = subprocess.Popen(
        [sys.executable, "-m", "lensfeed.producer", "--rank", "0", *over],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        feed = FeedClient(
            cfg.endpoint_for(0), rank=0, spec=DataSpec.from_config(cfg), timeout_s=120
        )
        feed.connect()  # the producer loads its model first: not part of the timed run
        boundary: list[float] = []
        w0 = feed.stats.wait_s  # the handshake waited for the model to load: not training
        t0 = time.perf_counter()
        for cycle in feed.cycles(cycles):
            for j, _batch in enumerate(cycle):
                if j == 0 and cycle.index > 0:
                    boundary.append(cycle.wait_s)
                time.sleep(step_s)
        wall = time.perf_counter() - t0
        wait = feed.stats.wait_s - w0
        feed.close()
        prod.wait(timeout=60)
    finally:
        if prod.poll() is None:
            prod.kill()
    return {
        "wall_s": wall,
        "wait_s": wait,
        "wait_share": wait / wall,
        "boundary_wait_ms": [1e3 * b for b in boundary],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overlap", description=__doc__)
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--cycle-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lf-overlap-"))
    data = work / "ds"
    make_dataset(data, rows=4096, seq_len=64)
    ahead = overrides(data, work, cycle=args.cycle_size, batch=args.batch, ahead=True)
    cfg = load_config(None, ahead)
    per_cycle = statistics.median(regen_cost(cfg, 2)[1:] + regen_cost(cfg, 2)[1:])
    batches = args.cycle_size // args.batch
    step_s = per_cycle / batches  # training per cycle == regeneration per cycle
    runs: dict[str, list[dict[str, Any]]] = {"original": [], "lensfeed": [], "no_ahead": []}
    no_ahead = overrides(data, work, cycle=args.cycle_size, batch=args.batch, ahead=False)
    for _ in range(args.repeats):
        runs["original"].append(original(cfg, args.cycles, step_s))
        runs["lensfeed"].append(lensfeed(ahead, args.cycles, step_s))
        runs["no_ahead"].append(lensfeed(no_ahead, args.cycles, step_s))
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "wait_share")}
        for k, v in runs.items()
    }
    result = {
        "cycles": args.cycles,
        "cycle_size": args.cycle_size,
        "batch": args.batch,
        "regen_per_cycle_s": per_cycle,
        "step_s": step_s,
        "runs": runs,
        "median": med,
        "speedup": med["original"]["wall_s"] / med["lensfeed"]["wall_s"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap.json").write_text(json.dumps(result, indent=2) + "\n")
    ideal = args.cycles * per_cycle
    lines = [
        f"C = {args.cycles} cycles x {batches} batches of {args.batch}; tiny model d=128, 4 layers,"
        f" seq 64, CPU. Regeneration {per_cycle * 1e3:.0f} ms/cycle; training step "
        f"{step_s * 1e3:.1f} ms/batch (sleep) = the same per cycle. Ideal overlapped wall "
        f"{ideal:.2f} s, stop-the-world {2 * ideal:.2f} s. Median of {args.repeats}.",
        "",
        "| approach | wall s | data-wait share | boundary wait ms (cycles 1..) |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("original", "original stop-the-world"),
        ("lensfeed", "lensfeed, prepare_ahead"),
        ("no_ahead", "lensfeed, no prepare_ahead"),
    ):
        b = [x for r in runs[name] for x in r.get("boundary_wait_ms", [])]
        bs = f"{statistics.median(b):.1f} (max {max(b):.1f})" if b else "-"
        lines.append(
            f"| {label} | {med[name]['wall_s']:.2f} | {100 * med[name]['wait_share']:.1f}% | {bs} |"
        )
    lines += ["", f"Speed-up of lensfeed over the original: {result['speedup']:.2f}x."]
    (args.out / "overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
