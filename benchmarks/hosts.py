"""What crossing hosts costs one rank's stream: tcp over a veth link (plain and CURVE) vs ipc.

``python -m benchmarks.hosts [--repeats 3]`` streams each standard case (shuffled tokens
(64, 128) and (64, 2048) int32, 4 MiB activations) from one producer process to one FeedClient
process (``benchmarks.producer_runner`` / ``benchmarks.consumer``, as ``benchmarks.feed`` does)
four ways, in alternating order per repeat:

* ``ipc``: both on one simulated node, the default transport;
* ``tcp-lo``: both on one node over loopback tcp (what the veth hop adds, next to ``tcp``);
* ``tcp``: producer on host ``p``, client on host ``n0``, over the veth pair and bridge between
  their network namespaces (``feed.bind=tcp://0.0.0.0:PORT feed.insecure=true``);
* ``curve``: the same path with a ``lensfeed keys`` key set (``feed.keys_dir``), as a
  disaggregated deployment runs it.

Hosts are network namespaces (``tests/_netns.py``; needs root and iproute2) on one machine, so
the tcp numbers are the software path (kernel tcp stack, veth at the default 1500-byte MTU,
CurveZMQ crypto, both sides' copies) with the CPUs shared by both ends, not a real NIC's wire
rate: they bound what lensfeed itself adds per rank. Medians of the steady-state blocks, then
of the repeats. Results go to ``benchmarks/results/hosts.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from itertools import count
from pathlib import Path
from typing import Any

from benchmarks.common import Proc, Workdir, py, read_report, write_json
from benchmarks.data import standard_datasets
from benchmarks.feed import overrides
from benchmarks.settings import BATCH, CASES, Case, steady_stream
from lensfeed.common.keyfiles import create_keys
from tests._netns import IFNAME, Network, Unavailable

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("ipc", "tcp-lo", "tcp", "curve")
LABELS = {"ipc": "ipc", "tcp-lo": "loopback tcp", "tcp": "veth tcp", "curve": "veth tcp+CURVE"}
NODE, PRODUCER_HOST = "n0", "p"
CASE_KEYS = ("tok128", "tok2048", "act4")
_ports = count(52000)  # a fresh port per run: a restarted listener never meets TIME_WAIT


def stream(
    net: Network, work: Workdir, case: Case, mode: str, data: Path, keys: Path, tag: str
) -> float:
    """Samples/s of one producer -> FeedClient stream (median of its steady-state blocks)."""
    warm, n, blocks = steady_stream(case)
    extra = [f"training_initial_cache_size_per_rank={warm * BATCH}"]
    if mode == "ipc":
        endpoint, host = work.endpoint(tag), NODE
    elif mode == "tcp-lo":
        endpoint, host = f"tcp://127.0.0.1:{next(_ports)}", NODE
    else:
        port = next(_ports)
        endpoint, host = f"tcp://{net.addr[PRODUCER_HOST]}:{port}", PRODUCER_HOST
        extra.append(f"feed.bind=tcp://0.0.0.0:{port}")
        extra.append(f"feed.keys_dir={keys}" if mode == "curve" else "feed.insecure=true")
    ov = overrides(
        dataset=data,
        endpoint=endpoint,
        cycle_samples=(blocks * n + 1) * BATCH,  # cycle 0 warms up, cycle 1 is timed in blocks
        shuffle=True,
        extra=extra,
    )
    p_report, c_report = work.path(f"{tag}-producer.json"), work.path(f"{tag}-consumer.json")
    p_cmd = py("benchmarks.producer_runner", "--report", str(p_report))
    c_cmd = py(
        "benchmarks.consumer",
        *("--report", str(c_report), "--cycles", "2", "--warmup", "1", "--block", str(n)),
    )
    if case.transform:
        p_cmd += ["--transform", case.transform]
        # The client declares what the act:DTYPE:SHAPE transform serves instead of tokens.
        c_cmd += ["--tensor", f"A:{case.transform.partition(':')[2]}"]
        c_cmd += ["--tensor", "sample_idx:int64:"]
    producer = Proc(net.cmd(host, [*p_cmd, "--", *ov]), log=work.path(f"{tag}-p.log"))
    consumer = Proc(net.cmd(NODE, [*c_cmd, "--", *ov]), log=work.path(f"{tag}-c.log"))
    try:
        c_code = consumer.wait(300)
        p_code = producer.wait(30)
    finally:
        consumer.kill()
        producer.kill()
    if c_code != 0 or not c_report.is_file():
        raise RuntimeError(f"{tag}: consumer failed ({c_code}):\n{consumer.tail()}")
    if p_code != 0:
        raise RuntimeError(f"{tag}: producer failed ({p_code}):\n{producer.tail()}")
    report = read_report(c_report)
    timed = [c for c in report["cycles"][report["warmup"] :] if c["complete"]]
    rates = [b["batches"] * BATCH / b["seconds"] for c in timed for b in c["blocks"]]
    if not rates:
        raise RuntimeError(f"{tag}: no complete timed block in {c_report}")
    return statistics.median(rates)


def measure(
    net: Network, work: Workdir, datasets: dict[str, Path], *, repeats: int
) -> list[dict[str, Any]]:
    keys = work.path("keys")
    create_keys(keys)
    rows = []
    for case in (c for c in CASES if c.key in CASE_KEYS):
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for i in range(repeats):
            order = MODES if i % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                tag = f"hosts-{mode}-{case.key}-{i}"
                rates[mode].append(stream(net, work, case, mode, datasets[case.dataset], keys, tag))
        med = {m: statistics.median(r) for m, r in rates.items()}
        best = {m: max(r) for m, r in rates.items()}
        rows.append(
            {
                "case": case.label,
                "bytes_per_sample": case.bytes_per_sample,
                "samples_per_s": med,
                "gb_per_s": {m: v * case.bytes_per_sample / 1e9 for m, v in med.items()},
                # Other work on the machine only slows a run: the best is the least disturbed.
                "best_samples_per_s": best,
                "best_gb_per_s": {m: v * case.bytes_per_sample / 1e9 for m, v in best.items()},
                "runs": rates,
                "tcp_vs_ipc": med["tcp"] / med["ipc"],
                "curve_vs_tcp": med["curve"] / med["tcp"],
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hosts", description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="runs per case and transport")
    p.add_argument("--out", type=Path, default=RESULTS / "hosts.json")
    args = p.parse_args(argv)
    datasets = standard_datasets()
    try:
        net = Network([NODE, PRODUCER_HOST])
    except Unavailable as exc:
        print(f"cannot simulate hosts: {exc}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    with net, Workdir() as work:
        mtu = subprocess.run(
            net.cmd(NODE, ["cat", f"/sys/class/net/{IFNAME}/mtu"]), capture_output=True, text=True
        ).stdout.strip()
        rows = measure(net, work, datasets, repeats=args.repeats)
    shutil.rmtree(work.root, ignore_errors=True)  # logs, reports, keys; kept when a run fails
    load_after = os.getloadavg()
    print(f"{'':44}" + "".join(f" {LABELS[m]:>27}" for m in MODES) + "  veth/ipc CURVE/tcp")
    print(f"{'case':44}" + f" {'samples/s':>11} {'GB/s':>6} {'(best)':>8}" * len(MODES))
    for r in rows:
        s, g, b = r["samples_per_s"], r["gb_per_s"], r["best_gb_per_s"]
        cells = "".join(f" {s[m]:11,.0f} {g[m]:6.3f} ({b[m]:6.3f})" for m in MODES)
        print(f"{r['case']:44}{cells} {r['tcp_vs_ipc']:8.2f}x {r['curve_vs_tcp']:8.2f}x")
    meta = {
        "repeats": args.repeats,
        "modes": list(MODES),
        "veth_mtu": mtu,
        "cpus": os.cpu_count(),
        # A load above the CPU count means other work shared the machine: see "runs".
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    write_json(args.out, {**meta, "rows": rows})
    print(
        f"wrote {args.out}: per rank, one stream at a time; medians of {args.repeats} runs "
        f"(best GB/s in parentheses); load average {load_before[0]:.1f} -> {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
