"""Run the lensfeed benchmark suite and write ``results.json``, ``results.md`` and
``throughput.png``.

::

    python -m benchmarks.run            # full run (< 10 min on 2 cores), writes benchmarks/results/
    python -m benchmarks.run --quick    # smoke run (< 2 min), writes benchmarks/results/quick/

Sections: ``throughput`` (raw ZeroMQ limit, lensfeed, original loop, DataLoader), ``stall``
(cycle boundaries), ``memory`` (peak RSS vs cycle size), ``profile`` (py-spy summaries of the
lensfeed path) and ``gpu`` (host -> device, or "no GPU"). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import gpu, machine, memory, patches, profiling, report, stall, throughput
from benchmarks.common import BENCH_DIR, Workdir, write_json
from benchmarks.data import DEFAULT_DATA_DIR, ensure_dataset
from benchmarks.settings import DATASETS, FULL, QUICK

SECTIONS = ("throughput", "stall", "memory", "profile", "gpu")
log = logging.getLogger("benchmarks")


def _write(results: dict[str, Any], out: Path, *, readme: bool) -> None:
    """results.json, results.md, throughput.png (and the README table for a full run)."""
    md = report.markdown(results)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(md)
    report.plot(results, out / "throughput.png")
    if readme:
        report.update_readme(BENCH_DIR / "README.md", md)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="smaller, faster run (< 2 min)")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="dataset cache")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument("--keep-work", action="store_true", help="keep child logs in /tmp")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="measure nothing: rebuild results.md, the plot and the README table from results.json",
    )
    args = p.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = args.out or (BENCH_DIR / "results" / ("quick" if args.quick else ""))
    if args.rebuild:
        results = json.loads((out / "results.json").read_text())
        results["targets"] = report.evaluate_targets(results)
        _write(results, out, readme=not args.quick and args.out is None)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    if not settings.profile and "profile" in sections and args.sections == ",".join(SECTIONS):
        sections.remove("profile")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t_start = time.perf_counter()

    def progress(what: str) -> None:
        log.info("[%5.0f s] %s", time.perf_counter() - t_start, what)

    out.mkdir(parents=True, exist_ok=True)
    progress(f"{settings.mode} run -> {out}")
    data = {
        name: ensure_dataset(name, rows=rows, seq_len=seq, data_dir=args.data_dir).path.resolve()
        for name, (rows, seq) in DATASETS.items()
    }
    work = Workdir()
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": machine.describe(),
        "datasets": {k: {"rows": r, "seq_len": s} for k, (r, s) in DATASETS.items()},
        "section_s": {},
        "prototypes": patches.status(),
    }
    try:
        for section in sections:
            t0 = time.perf_counter()
            if section == "throughput":
                rows = throughput.run(work, settings, data, progress)
                report.add_ratios(rows)
                results["throughput"] = rows
            elif section == "stall":
                results["stall"] = stall.run(work, settings, data, progress)
            elif section == "memory":
                results["memory"] = memory.run(work, settings, data, progress)
            elif section == "profile":
                results["profile"] = profiling.run(work, settings, data, out, progress)
            elif section == "gpu":
                results["gpu"] = gpu.run(work, settings, data, progress)
            results["section_s"][section] = time.perf_counter() - t0
    finally:
        if not args.keep_work:
            shutil.rmtree(work.root, ignore_errors=True)
        else:
            progress(f"child logs kept in {work.root}")
    results["elapsed_s"] = time.perf_counter() - t_start
    results["within_budget"] = results["elapsed_s"] <= settings.budget_s
    results["targets"] = report.evaluate_targets(results)
    full = not args.quick and args.out is None and sections == list(SECTIONS)
    _write(results, out, readme=full)
    progress(f"done in {results['elapsed_s']:.0f} s (budget {settings.budget_s:.0f} s)")
    for t in results["targets"]:
        print(f"[{'PASS' if t['ok'] else 'FAIL'}] {t['target']}: {t['value']}")
    print(f"results: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
