"""What authentication and encryption cost: the standard cases over ipc, tcp and tcp + CURVE.

``python -m benchmarks.curve [--repeats 3]`` streams each standard case (shuffled tokens
(64, 128) and (64, 2048) int32, 4 MiB activations) from a producer process to a FeedClient
process three ways, in alternating order per repeat:

* ``ipc``: the default transport (no CURVE there, a private directory instead);
* ``tcp``: loopback tcp without CURVE;
* ``curve``: loopback tcp with a ``lensfeed keys`` key set (CurveZMQ encrypts every frame);

and, beside them, the raw pyzmq limit (``benchmarks.limit``, no lensfeed code) at lensfeed's
message size over loopback tcp, plain and with CURVE (``raw-tcp``, ``raw-curve``): the ceiling
of any CurveZMQ transport on the machine, with the CPU seconds per GB it costs.

Targets: ``curve`` within 10% of ``tcp`` (samples/s), and ``ipc`` unaffected (it never runs
CURVE: compare with the throughput section's lensfeed rows). Results go to
``benchmarks/results/curve.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import GB, Workdir, write_json
from benchmarks.data import standard_datasets
from benchmarks.feed import run_feed
from benchmarks.settings import BATCH, CASES, FULL, Case, steady_stream
from benchmarks.throughput import measure_limit, message_batches
from lensfeed.common.keyfiles import create_keys
from tests._util import free_port

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("ipc", "tcp", "curve")
CASE_KEYS = ("tok128", "tok2048", "act4")


def _run(work: Workdir, case: Case, mode: str, i: int, data: Path, keys: Path) -> list[float]:
    """lensfeed over ``mode``: samples/s and CPU s/GB (both processes), medians of the blocks."""
    warm, n, blocks = steady_stream(case)
    endpoint = None if mode == "ipc" else f"tcp://127.0.0.1:{free_port()}"
    res = run_feed(
        work,
        f"curve-{mode}-{case.key}-{i}",
        dataset=data,
        initial_batches=warm,
        cycle_batches=blocks * n + 1,
        cycles=2,
        warmup=1,
        shuffle=True,
        transform=case.transform,
        consumer_args=["--block", str(n)],
        extra_overrides=[f"feed.keys_dir={keys}"] if mode == "curve" else [],
        endpoint=endpoint,
    )
    b = res.blocks()
    rate = statistics.median(x["batches"] * BATCH / x["seconds"] for x in b)
    return [rate, statistics.median(x["cpu_s"] / (x["bytes"] / GB) for x in b)]


def _raw(work: Workdir, case: Case, mode: str, keys: Path) -> list[float]:
    """The raw pyzmq limit at lensfeed's message size over loopback tcp, plain or with CURVE:
    the ceiling any CurveZMQ transport has on this machine."""
    _, n, blocks = steady_stream(case)
    pack = message_batches(case)
    per_round = max(n, 8 * pack)  # >= 8 messages per timed round
    settings = replace(FULL, repeats=blocks, min_batches=per_round, max_batches=per_round)
    row = measure_limit(
        work,
        case,
        settings,
        tuned=True,
        pack=pack,
        endpoint=f"tcp://127.0.0.1:{free_port()}",
        keys=keys if mode == "curve" else None,
        method=f"limit-{mode}",
    )
    return [row["samples_per_s"]["median"], row["cpu_s_per_gb"]["median"]]


def measure(work: Workdir, datasets: dict[str, Path], *, repeats: int) -> list[dict[str, Any]]:
    keys = work.path("keys")
    create_keys(keys)
    rows = []
    for case in (c for c in CASES if c.key in CASE_KEYS):
        runs: dict[str, list[list[float]]] = {m: [] for m in (*MODES, "raw-tcp", "raw-curve")}
        for i in range(repeats):
            order = MODES if i % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                runs[mode].append(_run(work, case, mode, i, datasets[case.dataset], keys))
            for mode in ("tcp", "curve") if i % 2 == 0 else ("curve", "tcp"):
                runs[f"raw-{mode}"].append(_raw(work, case, mode, keys))
        med = {m: statistics.median(r[0] for r in v) for m, v in runs.items()}
        cpu = {m: statistics.median(r[1] for r in v) for m, v in runs.items()}
        rows.append(
            {
                "case": case.label,
                "samples_per_s": med,
                "gb_per_s": {m: v * case.bytes_per_sample / 1e9 for m, v in med.items()},
                "cpu_s_per_gb": cpu,
                "runs": runs,
                "curve_vs_tcp": med["curve"] / med["tcp"],
                "raw_curve_vs_tcp": med["raw-curve"] / med["raw-tcp"],
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
    datasets = standard_datasets()
    with Workdir() as work:
        rows = measure(work, datasets, repeats=args.repeats)
    cols = ("ipc", "tcp", "curve", "raw-tcp", "raw-curve")
    print(f"GB/s (CPU s/GB of both processes), medians of {args.repeats} runs")
    print(f"{'case':28}" + "".join(f" {c:>16}" for c in cols) + "  CURVE/tcp  raw CURVE/tcp")
    for r in rows:
        g, c = r["gb_per_s"], r["cpu_s_per_gb"]
        cells = "".join(f" {g[m]:7.2f} ({c[m]:5.2f})" for m in cols)
        print(
            f"{r['case'][:28]:28}{cells} {r['curve_vs_tcp']:9.2f}x {r['raw_curve_vs_tcp']:13.2f}x"
            f" {'ok' if r['ok'] else 'MISSED'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"repeats": args.repeats, "rows": rows})
    print(f"wrote {args.out} (samples/s, medians of {args.repeats} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
