"""Self-healing costs: recovery time after a producer's kill -9, and the price of heartbeats.

``python -m benchmarks.recovery`` measures

* **recovery**: one rank served by ``lensfeed produce --ranks 0`` (the supervisor) to a
  FeedClient in this process; at a fixed batch the producer child is killed with SIGKILL, and
  the time from the kill to the first batch the loop receives afterwards is recorded (target:
  <= 2 s + ``feed.heartbeat_timeout_s``). The stream is checked against an uninterrupted run.
* **heartbeats**: steady-state samples/s of the standard token cases (shuffled (64, 128) and
  (64, 2048) int32) with ZMTP heartbeats on (``feed.heartbeat_timeout_s=3``) and off (``0``),
  alternating runs (target: within 2%).

Results go to ``benchmarks/results/recovery.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Workdir, child_env, write_json
from benchmarks.data import standard_datasets
from benchmarks.feed import run_feed
from benchmarks.settings import BATCH, CASES
from lensfeed.common.config import load_config
from lensfeed.trainer.client import FeedClient
from lensfeed.trainer.train import batch_digest

RESULTS = Path(__file__).resolve().parent / "results"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _stream(feed: FeedClient, cycles: int, kill_at: int | None, supervisor: int) -> dict:
    """Consume ``cycles``; SIGKILL the producer child after batch ``kill_at`` (global index)."""
    digests: list[str] = []
    t_kill = t_back = None
    for cycle in feed.cycles(cycles):
        for batch in cycle:
            # The first batch that needed the new producer (batches the client had already
            # received before the kill do not count).
            if t_kill is not None and t_back is None and feed.stats.reconnects:
                t_back = time.monotonic()
            digests.append(batch_digest(batch))
            if kill_at is not None and len(digests) == kill_at:
                (child,) = _children(supervisor)
                os.kill(child, signal.SIGKILL)
                t_kill = time.monotonic()
    return {
        "digests": digests,
        "recovery_s": None if t_kill is None or t_back is None else t_back - t_kill,
        "client_recovery_s": feed.stats.recovery_s,
        "reconnects": feed.stats.reconnects,
    }


def measure_recovery(work: Workdir, data: Path, *, repeats: int, heartbeat_s: float) -> dict:
    over = [
        f"dataset.path={data}",
        "world_size=1",
        f"batch_size={BATCH}",
        "dataset.on_the_fly.samples_per_regeneration_cycle=8192",
        f"feed.endpoint={work.endpoint('recovery')}",
        f"feed.heartbeat_timeout_s={heartbeat_s}",
        "feed.exit_on_bye=false",
    ]
    cfg = load_config(None, over)
    sup = subprocess.Popen(
        [sys.executable, "-m", "lensfeed.producer", "--ranks", "0", "--cpus-per-rank", "0", *over],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # prefetch=2: the producer is never far ahead, so the kill lands while data is owed.
        with FeedClient.from_config(cfg, 0, prefetch=2) as feed:
            reference = _stream(feed, 2, None, sup.pid)["digests"]
        runs = []
        for _ in range(repeats):
            with FeedClient.from_config(cfg, 0, prefetch=2) as feed:
                r = _stream(feed, 2, 150, sup.pid)
            if r["digests"] != reference:
                raise RuntimeError("the recovered stream differs from the uninterrupted one")
            runs.append(r["recovery_s"])
    finally:
        os.killpg(sup.pid, signal.SIGTERM)
        sup.wait(30)
    return {
        "heartbeat_timeout_s": heartbeat_s,
        "kill_to_first_batch_s": runs,
        "median_s": statistics.median(runs),
        "max_s": max(runs),
        "target_s": 2 + heartbeat_s,
        "ok": max(runs) <= 2 + heartbeat_s,
        "streams_identical": True,
    }


def measure_heartbeats(work: Workdir, datasets: dict[str, Path], *, repeats: int) -> list[dict]:
    rows = []
    for case in (c for c in CASES if c.key in ("tok128", "tok2048")):
        n = 400 if case.key == "tok128" else 60
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(repeats):
            for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                res = run_feed(
                    work,
                    f"hb-{mode}-{case.key}-{i}",
                    dataset=datasets[case.dataset],
                    initial_batches=n,
                    cycle_batches=5 * n + 1,
                    cycles=2,
                    warmup=1,
                    shuffle=True,
                    consumer_args=["--block", str(n)],
                    extra_overrides=[f"feed.heartbeat_timeout_s={3 if mode == 'on' else 0}"],
                )
                blocks = res.blocks()
                rates[mode].append(
                    statistics.median(b["batches"] * BATCH / b["seconds"] for b in blocks)
                )
        on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
        rows.append(
            {
                "case": case.label,
                "samples_per_s_on": on,
                "samples_per_s_off": off,
                "runs_on": rates["on"],
                "runs_off": rates["off"],
                "ratio": on / off,
                "ok": on / off >= 0.98,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recovery", description=__doc__)
    p.add_argument("--repeats", type=int, default=5, help="kills, and heartbeat on/off pairs")
    p.add_argument("--out", type=Path, default=RESULTS / "recovery.json")
    p.add_argument("--skip-heartbeats", action="store_true")
    args = p.parse_args(argv)
    datasets = standard_datasets()
    result: dict[str, Any] = {}
    with Workdir() as work:
        result["recovery"] = measure_recovery(
            work, datasets["tok128"], repeats=args.repeats, heartbeat_s=3.0
        )
        if not args.skip_heartbeats:
            result["heartbeats"] = measure_heartbeats(work, datasets, repeats=args.repeats)
    rec = result["recovery"]
    print(
        f"recovery (supervisor restart, tokens (64, 128)): kill -9 -> first batch median "
        f"{rec['median_s']:.2f} s, max {rec['max_s']:.2f} s over {args.repeats} kills "
        f"(target <= {rec['target_s']:.1f} s): {'ok' if rec['ok'] else 'MISSED'}; streams identical"
    )
    for row in result.get("heartbeats", []):
        print(
            f"heartbeats {row['case']}: on {row['samples_per_s_on']:,.0f} vs off "
            f"{row['samples_per_s_off']:,.0f} samples/s = {row['ratio']:.3f}x "
            f"(target >= 0.98): {'ok' if row['ok'] else 'MISSED'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
