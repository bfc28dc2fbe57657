"""Run the lensfeed benchmark suite and write ``results.json``, ``results.md`` and
``throughput.png``.

::

    python -m benchmarks.run            # full run (< 10 min on 2 cores), writes benchmarks/results/
    python -m benchmarks.run --quick    # shorter run (~2 min), writes benchmarks/results/quick/
    python -m benchmarks.run --smoke    # every code path at toy sizes (the test suite runs it)

Sections: ``throughput`` (raw ZeroMQ limit, lensfeed, original loop, DataLoader), ``stall``
(cycle boundaries), ``memory`` (peak RSS vs cycle size), ``profile`` (py-spy summaries of the
lensfeed path and CPU per thread) and ``gpu`` (host -> device, or "no GPU"). A section that
fails is reported and the others still run. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import gpu, machine, memory, plot, profiling, report, stall, targets, throughput
from benchmarks.common import BENCH_DIR, Workdir, write_json
from benchmarks.data import DEFAULT_DATA_DIR, ensure_dataset
from benchmarks.feed import profiler
from benchmarks.settings import DATASETS, FULL, QUICK, SMOKE, Settings

SECTIONS = ("throughput", "stall", "memory", "profile", "gpu")
MODES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}
log = logging.getLogger("benchmarks")
Progress = Callable[[str], None]


def left_out(sections: Sequence[str]) -> list[str]:
    """What this run cannot produce for want of an optional tool (the ``bench`` extra), so it
    is said before the first measurement instead of as a crash at the end."""
    out = []
    if "profile" in sections and profiler() is None:
        out.append(f"profile hot spots: {report.NO_PROFILER}; per-thread CPU is still measured")
    if not plot.available():
        out.append("throughput.png: no matplotlib installed (`pip install -e '.[bench]'`)")
    return out


def _write(results: dict[str, Any], out: Path, *, readme: bool) -> None:
    """results.json, results.md, throughput.png (and the README table for a full run)."""
    md = report.markdown(results)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(md)
    if not plot.plot(results, out / "throughput.png"):
        log.warning("no throughput.png: matplotlib is not installed")
    if readme:
        report.update_readme(BENCH_DIR / "README.md", md)


def _measure(
    section: str,
    work: Workdir,
    settings: Settings,
    data: dict[str, Path],
    out: Path,
    progress: Progress,
) -> Any:
    if section == "throughput":
        rows = throughput.run(work, settings, data, progress)
        targets.add_ratios(rows)
        return rows
    if section == "stall":
        return stall.run(work, settings, data, progress)
    if section == "memory":
        return memory.run(work, settings, data, progress)
    if section == "profile":
        return profiling.run(work, settings, data, out, progress)
    return gpu.run(work, settings, data, progress)


def _args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller, faster run (~2 min)")
    size.add_argument("--smoke", action="store_true", help="every code path at toy sizes")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="dataset cache")
    p.add_argument(
        "--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    p.add_argument("--keep-work", action="store_true", help="keep child logs in /tmp")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="measure nothing: rebuild results.md, the plot and the README table from results.json",
    )
    return p.parse_args(argv), p


def main(argv: Sequence[str] | None = None) -> int:
    args, parser = _args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    settings = MODES[mode]
    out = args.out or (BENCH_DIR / "results" / ("" if mode == "full" else mode))
    readme = mode == "full" and args.out is None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.rebuild:
        results = json.loads((out / "results.json").read_text())
        results["targets"] = targets.evaluate_targets(results)
        _write(results, out, readme=readme)
        return 0
    sections = [s.strip() for s in (args.sections or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    if not settings.profile and args.sections is None:
        sections.remove("profile")
    readme = readme and sections == list(SECTIONS)
    missing = left_out(sections)
    for what in missing:
        log.warning("left out, for want of an optional tool: %s", what)
    t_start = time.perf_counter()

    def progress(what: str) -> None:
        log.info("[%5.0f s] %s", time.perf_counter() - t_start, what)

    out.mkdir(parents=True, exist_ok=True)
    progress(f"{mode} run -> {out}")
    # Datasets of other sizes than the standard ones get a folder of their own in the cache.
    data_dir = args.data_dir if settings.datasets == DATASETS else args.data_dir / mode
    data = {
        name: ensure_dataset(name, rows=rows, seq_len=seq, data_dir=data_dir).path.resolve()
        for name, (rows, seq) in settings.datasets.items()
    }
    work = Workdir(keep=args.keep_work)
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": machine.describe(),
        "datasets": {k: {"rows": r, "seq_len": s} for k, (r, s) in settings.datasets.items()},
        "left_out": missing,
        "section_s": {},
        "errors": {},
    }
    try:
        for section in sections:
            t0 = time.perf_counter()
            try:
                results[section] = _measure(section, work, settings, data, out, progress)
            except Exception as e:  # a broken section must not cost the others' results
                log.exception("section %s failed", section)
                results["errors"][section] = f"{type(e).__name__}: {e}"[:500]
            results["section_s"][section] = time.perf_counter() - t0
    finally:
        work.close()
    results["elapsed_s"] = time.perf_counter() - t_start
    results["within_budget"] = results["elapsed_s"] <= settings.budget_s
    results["targets"] = targets.evaluate_targets(results)
    _write(results, out, readme=readme and not results["errors"])
    progress(f"done in {results['elapsed_s']:.0f} s (budget {settings.budget_s:.0f} s)")
    for t in results["targets"]:
        print(f"[{'PASS' if t['ok'] else 'FAIL'}] {t['target']}: {t['value']}")
    for section, error in results["errors"].items():
        print(f"[ERROR] section {section}: {error}")
    print(f"results: {out / 'results.md'}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
