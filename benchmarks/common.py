"""Small helpers shared by the benchmark sections: statistics, processes, memory, timing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
GB = 1e9
MiB = 1 << 20
KiB = 1 << 10


# --------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and interquartile range of repeated measurements."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"n": 0, "median": float("nan"), "min": float("nan"), "max": float("nan")}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "values": xs,
    }


def fmt_rate(x: float) -> str:
    """Human number with a k/M suffix (samples/s)."""
    if x != x:  # NaN
        return "n/a"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_bytes(n: float) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------- timing


def spend(seconds: float, mode: str = "sleep") -> None:
    """Take ``seconds`` of wall time: ``sleep`` (releases the CPU, like a GPU kernel or a remote
    call) or ``busy`` (spins on the CPU, like host-side work)."""
    if seconds <= 0:
        return
    if mode == "sleep":
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# --------------------------------------------------------------------------- memory


def proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """``Vm*`` lines of ``/proc/<pid>/status`` in KiB (``VmHWM`` = peak RSS)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


class AnonSampler:
    """Samples this process's anonymous RSS (``RssAnon``: private heap, not the memory-mapped
    dataset pages that ``VmHWM`` also counts) every ``interval_s`` in a daemon thread; the
    kernel keeps no high-water mark for it."""

    _instance: AnonSampler | None = None

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @classmethod
    def start(cls, interval_s: float = 0.02) -> AnonSampler:
        if cls._instance is None:
            cls._instance = cls(interval_s)
            cls._instance._thread.start()
        return cls._instance

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> int:
        self.peak_kib = max(self.peak_kib, proc_status_kib().get("RssAnon", 0))
        return self.peak_kib


def self_report() -> dict[str, Any]:
    """Peak/current RSS and CPU seconds of this process, for a child's JSON report."""
    st = proc_status_kib()
    t = os.times()
    sampler = AnonSampler._instance
    return {
        "peak_rss_bytes": st.get("VmHWM", 0) * 1024,
        "rss_bytes": st.get("VmRSS", 0) * 1024,
        "rss_anon_bytes": st.get("RssAnon", 0) * 1024,
        "rss_file_bytes": st.get("RssFile", 0) * 1024,
        "peak_anon_bytes": (sampler.sample() if sampler else 0) * 1024,
        "cpu_user_s": t.user,
        "cpu_sys_s": t.system,
    }


def cpu_s(pid: int | str = "self") -> float:
    """CPU seconds of every live thread of ``pid``, to the nanosecond (the scheduler's own
    ``/proc/<pid>/task/*/schedstat``; ``stat``'s clock ticks are 10 ms, too coarse for the short
    windows of the fast cases). Threads that already ended are not counted; 0.0 once ``pid`` is
    gone."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


class ThreadCpu:
    """Samples the per-thread CPU time of running processes from ``/proc`` every 20 ms, so a
    report can say which thread spent the time in a window of the run (the producer's
    regeneration thread, either side's ZeroMQ I/O thread, the main loops)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        #: (wall time, {(side, tid): (thread name, CPU ticks)})
        self.series: list[tuple[float, dict[tuple[str, int], tuple[str, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        snap: dict[tuple[str, int], tuple[str, int]] = {}
        for side, pid in self.pids.items():
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1]
                except OSError:
                    continue
                utime, stime = (int(x) for x in fields.split()[11:13])
                snap[(side, int(tid))] = ("main" if int(tid) == pid else name, utime + stime)
        self.series.append((time.time(), snap))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> dict[str, dict[str, float]]:
        """``side -> thread name -> CPU seconds`` spent between wall times ``t0`` and ``t1``
        (to the nearest samples outside the window; a thread that ended inside it counts to its
        last sample; threads of one name summed)."""
        start: dict[tuple[str, int], int] = {}
        end: dict[tuple[str, int], tuple[str, int]] = {}
        for t, snap in self.series:
            if t <= t0:
                start.update((key, ticks) for key, (_, ticks) in snap.items())
                continue
            end.update(snap)  # the latest value of every thread seen so far
            if t >= t1:
                break
        hz = os.sysconf("SC_CLK_TCK")
        out: dict[str, dict[str, float]] = {}
        for key, (name, ticks) in end.items():
            spent = ticks - start.get(key, 0)
            if spent > 0:
                per = out.setdefault(key[0], {})
                per[name] = per.get(name, 0.0) + spent / hz
        return out


# --------------------------------------------------------------------------- processes


def child_env(**extra: str) -> dict[str, str]:
    """Environment for benchmark children: unbuffered, one BLAS thread, repo importable."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Proc:
    """A child process whose output goes to a log file and that is always reaped."""

    def __init__(self, cmd: Sequence[str], *, log: Path, **env: str) -> None:
        self.cmd = list(cmd)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = log.open("w")
        self.popen = subprocess.Popen(
            self.cmd,
            cwd=REPO,
            env=child_env(**env),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float) -> int:
        """Exit code; kills the child (and says so) if it outlives ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.cmd[:4]} did not finish in {timeout:.0f} s") from None
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, 9)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def read_report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


class Workdir:
    """Per-run scratch directory (0700, so it can hold a producer's ipc sockets): short socket
    paths, child logs and reports. A context manager that removes it on exit unless ``keep``
    (then it says where the logs are)."""

    def __init__(self, *, prefix: str = "lfb-", keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.keep = keep
        self._n = 0

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.keep:
            log.info("child logs kept in %s", self.root)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def endpoint(self, name: str) -> str:
        self._n += 1
        return f"ipc://{self.root}/{self._n}-{name}.sock"

    def path(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{self._n}-{name}"


__all__ = [
    "AnonSampler",
    "BENCH_DIR",
    "GB",
    "KiB",
    "MiB",
    "Proc",
    "REPO",
    "ThreadCpu",
    "Workdir",
    "child_env",
    "fmt_bytes",
    "fmt_rate",
    "proc_status_kib",
    "py",
    "read_report",
    "self_report",
    "spend",
    "summarize",
    "write_json",
]
