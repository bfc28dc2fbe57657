"""Profiles of the lensfeed path: producer and trainer processes under a sampling profiler.

``py-spy record --threads --nonblocking`` samples every thread of both processes at 250 Hz
without pausing them; idle samples (a thread blocked in a syscall: poll, condition wait) are
dropped by py-spy, so percentages are shares of *on-CPU* samples. The raw collapsed stacks are
reduced to text summaries (per process: top functions by self and inclusive samples; per thread:
top self) written to ``results/profile_<case>_<process>.txt``. Without py-spy (the ``bench``
extra) the section measures only the per-thread CPU, which needs no profiler.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Workdir
from benchmarks.feed import profiler
from benchmarks.settings import Settings
from benchmarks.throughput import steady_feed

_LINE = re.compile(r":\d+\)$")
_THREAD = re.compile(r"^thread \((\d+)\)(?::\s*(.*))?$")
#: A sample belongs to the data path if one of its frames is one of these (producer serving
#: loop and regeneration thread; the trainer's cycle iteration; libzmq background threads).
_DATA_PATH = (
    "ProducerServer.",
    "Prefetcher.",
    "FeedClient.",
    "Cycle.",
    "_iter_cycle",
    "run (benchmarks/consumer.py",
)


def _frame(f: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)`` style key without the line."""
    f = _LINE.sub(")", f)
    m = re.match(r"^(.*) \((.*)\)$", f)
    if not m:
        return f
    func, path = m.groups()
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{func} ({short})"


def summarize_collapsed(path: Path, *, title: str, top: int = 25) -> str:
    """Text summary of py-spy ``--format raw`` output (one ``stack count`` per line)."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    per_thread: dict[str, Counter[str]] = defaultdict(Counter)
    thread_total: Counter[str] = Counter()
    total = startup = frameless = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        parts = stack.split(";")
        m = _THREAD.match(parts[0])
        thread = (m.group(2) or f"tid {m.group(1)}") if m else "?"
        if thread == "rss-sampler":  # the benchmark's own memory sampler
            continue
        frames = parts[1:] if m else parts
        if not frames:
            frameless += n
            continue
        if not any(f.startswith(_DATA_PATH) for f in frames):
            startup += n  # imports, start-up, set-up: not the data path
            continue
        total += n
        leaf = _frame(frames[-1])
        self_c[leaf] += n
        per_thread[thread][leaf] += n
        thread_total[thread] += n
        for f in {_frame(x) for x in frames}:
            incl[f] += n
    out = [
        title,
        "=" * len(title),
        f"on-CPU samples on the data path: {total} (excluded: {startup} start-up/import/set-up, "
        f"{frameless} without a Python frame)",
        "",
        f"Top {top} by self samples (where the CPU time is spent):",
    ]
    pct = (lambda v: f"{100.0 * v / total:5.1f}%") if total else (lambda v: "  n/a")
    out += [f"  {pct(v)}  {k}" for k, v in self_c.most_common(top)]
    out += ["", f"Top {top} by inclusive samples (time under each function):"]
    skip = ("Thread.", "_bootstrap", "_run_code", "<module>", "main (")
    inc = [(k, v) for k, v in incl.most_common() if not k.startswith(skip)]
    out += [f"  {pct(v)}  {k}" for k, v in inc[:top]]
    for thread, cnt in sorted(thread_total.items(), key=lambda kv: -kv[1]):
        out += ["", f"Thread {thread}: {pct(cnt)} of samples; top self:"]
        out += [f"  {pct(v)}  {k}" for k, v in per_thread[thread].most_common(12)]
    return "\n".join(out) + "\n"


def top_self(path: Path, n: int = 8) -> list[tuple[str, float]]:
    """The ``n`` hottest functions of a saved summary, for the Markdown report."""
    rows: list[tuple[str, float]] = []
    lines = path.read_text().splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Top") and "self" in ln)
    except StopIteration:
        return rows
    for ln in lines[start + 1 :]:
        m = re.match(r"^\s+([\d.]+)%\s+(.*)$", ln)
        if not m:
            break
        rows.append((m.group(2), float(m.group(1))))
        if len(rows) >= n:
            break
    return rows


def thread_costs(
    work: Workdir, settings: Settings, data: dict[str, Path], progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """CPU per batch of every thread of both processes (``/proc``, no profiler attached), for
    each case shuffled: where a batch's cost goes when two cores carry the whole pipeline."""
    out = []
    for case in settings.selected():
        progress(f"thread CPU {case.key}")
        res, rates, _ = steady_feed(
            work, f"threads-{case.key}", case, settings, data, shuffle=True, thread_cpu=True
        )
        timed = res.timed_cycles()
        batches = sum(c["batches"] for c in timed)
        wall = timed[-1]["wall_end"] - timed[0]["wall_start"]
        threads = {
            f"{side} {name}": cpu / batches * 1e6
            for side, per in (res.threads or {}).items()
            for name, cpu in per.items()
        }
        out.append(
            {
                "case": case.key,
                "label": case.label,
                "batches": batches,
                "samples_per_s": statistics.median(rates),
                "wall_us_per_batch": wall / batches * 1e6,
                "cpu_us_per_batch": threads,
            }
        )
    return out


#: Cases profiled (shuffled), where their hot spots differ: per-message work, big frames, gather.
PROFILED = ("tok128", "act32", "tok2048")


def run(
    work: Workdir,
    settings: Settings,
    data: dict[str, Path],
    out_dir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    tool = "py-spy" if profiler() else None
    results: dict[str, Any] = {"profiler": tool, "runs": []}
    if tool is None:
        progress("profile: no py-spy installed, so per-thread CPU only")
    cases = [c for c in settings.selected() if c.key in PROFILED] if tool else []
    for case in sorted(cases, key=lambda c: PROFILED.index(c.key)):
        name = f"{case.key}_shuffled"
        progress(f"profile {name}")
        res, rates, _ = steady_feed(
            work, f"prof-{name}", case, settings, data, shuffle=True, profile=True
        )
        rate = statistics.median(rates)
        entry: dict[str, Any] = {"name": name, "case": case.key, "files": {}, "top": {}}
        entry["samples_per_s_under_profiler"] = rate
        for side, raw in res.profiles.items():
            if not raw.is_file():
                continue
            dest = out_dir / f"profile_{name}_{side}.txt"
            title = f"{side} process, {case.label}, shuffled (py-spy; {rate:,.0f} samples/s)"
            dest.write_text(summarize_collapsed(raw, title=title))
            entry["files"][side] = dest.name
            entry["top"][side] = top_self(dest)
        results["runs"].append(entry)
    results["threads"] = thread_costs(work, settings, data, progress)
    return results


__all__ = ["run", "summarize_collapsed", "top_self"]
