"""What authentication and encryption cost: the standard cases over ipc, tcp and tcp + CURVE.

``python -m benchmarks.curve [--repeats 3]`` streams each standard case (shuffled tokens
(64, 128) and (64, 2048) int32, 4 MiB activations) from a producer process to a FeedClient
process three ways, in alternating order per repeat:

* ``ipc``: the default transport (no CURVE there, a private directory instead);
* ``tcp``: loopback tcp without CURVE;
* ``curve``: loopback tcp with a ``lensfeed keys`` key set (CurveZMQ encrypts every frame).

Targets: ``curve`` within 10% of ``tcp`` (samples/s), and ``ipc`` unaffected (it never runs
CURVE: compare with the throughput section's lensfeed rows). Results go to
``benchmarks/results/curve.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Workdir, write_json
from benchmarks.data import standard_datasets
from benchmarks.feed import run_feed
from benchmarks.settings import BATCH, CASES
from lensfeed.common.curve import create_keys
from tests._util import free_port

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("ipc", "tcp", "curve")
#: Batches per timed block and blocks per run, per case (a few seconds each on 2 cores).
BLOCKS = {"tok128": (400, 4), "tok2048": (60, 4), "act4": (24, 4)}


def _run(work: Workdir, case, mode: str, i: int, data: Path, keys: Path) -> float:
    n, blocks = BLOCKS[case.key]
    endpoint = None if mode == "ipc" else f"tcp://127.0.0.1:{free_port()}"
    res = run_feed(
        work,
        f"curve-{mode}-{case.key}-{i}",
        dataset=data,
        initial_batches=n,
        cycle_batches=blocks * n + 1,
        cycles=2,
        warmup=1,
        shuffle=True,
        transform=case.transform,
        consumer_args=["--block", str(n)],
        extra_overrides=[f"feed.keys_dir={keys}"] if mode == "curve" else [],
        endpoint=endpoint,
    )
    return statistics.median(b["batches"] * BATCH / b["seconds"] for b in res.blocks())


def measure(work: Workdir, datasets: dict[str, Path], *, repeats: int) -> list[dict[str, Any]]:
    keys = work.path("keys")
    create_keys(keys)
    rows = []
    for case in (c for c in CASES if c.key in BLOCKS):
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(repeats):
            order = MODES if i % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                rates[mode].append(_run(work, case, mode, i, datasets[case.dataset], keys))
        med = {m: statistics.median(r) for m, r in rates.items()}
        rows.append(
            {
                "case": case.label,
                "samples_per_s": med,
                "gb_per_s": {m: v * case.bytes_per_sample / 1e9 for m, v in med.items()},
                "runs": rates,
                "curve_vs_tcp": med["curve"] / med["tcp"],
                "tcp_vs_ipc": med["tcp"] / med["ipc"],
                "ok": med["curve"] / med["tcp"] >= 0.9,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.curve", description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="runs per case and transport")
    p.add_argument("--out", type=Path, default=RESULTS / "curve.json")
    args = p.parse_args(argv)
    work = Workdir()
    datasets = standard_datasets()
    rows = measure(work, datasets, repeats=args.repeats)
    print(f"{'case':45} {'ipc':>12} {'tcp':>12} {'tcp+CURVE':>12} {'CURVE/tcp':>10}")
    for r in rows:
        s = r["samples_per_s"]
        print(
            f"{r['case']:45} {s['ipc']:12,.0f} {s['tcp']:12,.0f} {s['curve']:12,.0f} "
            f"{r['curve_vs_tcp']:9.3f}x {'ok' if r['ok'] else 'MISSED'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"repeats": args.repeats, "rows": rows})
    print(f"wrote {args.out} (samples/s, medians of {args.repeats} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
