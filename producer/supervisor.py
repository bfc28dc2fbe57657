"""Serve a node's ranks from one command: one producer child per rank, pinned, restarted, stopped
together (``lensfeed produce --ranks 0-7``).

The supervisor only starts, watches and signals processes: it never imports torch, so it holds
no CUDA context and no GPU memory, and the producers stay separate processes (one GIL each).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from lensfeed.common.errors import ConfigError

log = logging.getLogger("lensfeed.supervisor")

#: The first restart is immediate (a crash costs the trainer the restart time, nothing more);
#: a rank that keeps failing waits BACKOFF_S, then twice as long each time, up to BACKOFF_MAX_S.
BACKOFF_S = 0.5
BACKOFF_MAX_S = 8.0
#: A child that ran this long was healthy: its next failure starts the back-off afresh.
HEALTHY_S = 60.0
#: How long stopping children may take before SIGKILL.
STOP_S = 10.0
#: Poll interval of the wait loop (exits and signals are noticed within this).
TICK_S = 0.1

_PR_SET_PDEATHSIG = 1


def parse_ranks(text: str) -> list[int]:
    """``0-7`` or ``0,2,5-6`` -> sorted distinct ranks (an argparse ``type``)."""
    ranks: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise argparse.ArgumentTypeError(f"bad rank list {text!r} (e.g. 0-7 or 0,2,5-6)")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad rank range {part.strip()!r} in {text!r}")
        ranks.extend(range(lo, hi + 1))
    if len(set(ranks)) != len(ranks):
        raise argparse.ArgumentTypeError(f"rank list {text!r} names a rank twice")
    return sorted(ranks)


def _cpus_per_rank(text: str) -> int | None:
    """``auto`` -> None, else a count >= 0 (an argparse ``type``)."""
    if text == "auto":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a CPU count or 'auto', got {text!r}")
    return int(text)


def add_supervisor_arguments(p: argparse.ArgumentParser) -> None:
    """The options that only make sense with ``--ranks`` (``lensfeed produce``'s parser)."""
    g = p.add_argument_group("serving several ranks (with --ranks)")
    g.add_argument(
        "--cpus-per-rank",
        type=_cpus_per_rank,
        default=None,
        metavar="N|auto",
        help="CPUs pinned per rank, contiguous blocks of this process's CPUs; 0: no pinning "
        "(default auto: the CPUs split evenly among the ranks, shared if fewer than ranks)",
    )
    g.add_argument(
        "--gpus",
        default=None,
        metavar="LIST|auto|none",
        help="CUDA_VISIBLE_DEVICES per rank: the i-th served rank gets entry i mod length of "
        "e.g. 0,1,2,3 (default auto: the entries of $CUDA_VISIBLE_DEVICES, else /dev/nvidiaN, "
        "else unset); none: leave it alone",
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="N",
        help="restarts per rank after a crash before everything stops with exit 1 (default 5)",
    )


def plan_cpus(available: Sequence[int], n: int, per_rank: int | None) -> list[list[int]]:
    """CPU ids for each of ``n`` ranks; ``per_rank`` None = split evenly, 0 = no pinning.

    Contiguous blocks keep a producer's threads on neighbouring cores; with fewer CPUs than
    needed the blocks wrap around, so ranks share CPUs round-robin rather than fail.
    """
    cpus = sorted(available)
    if per_rank == 0 or not cpus:
        return [[] for _ in range(n)]
    if per_rank is None:
        if len(cpus) < n:
            return [[cpus[i % len(cpus)]] for i in range(n)]
        base, extra = divmod(len(cpus), n)
        blocks, start = [], 0
        for i in range(n):
            size = base + (i < extra)
            blocks.append(cpus[start : start + size])
            start += size
        return blocks
    return [
        sorted({cpus[(i * per_rank + k) % len(cpus)] for k in range(per_rank)}) for i in range(n)
    ]


def plan_gpus(
    spec: str, n: int, *, environ: Mapping[str, str] = os.environ, dev: Path = Path("/dev")
) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of ``n`` ranks (None: inherit the environment as is)."""
    if spec == "none":
        return [None] * n
    if spec == "auto":
        if "CUDA_VISIBLE_DEVICES" in environ:
            entries = [e for e in environ["CUDA_VISIBLE_DEVICES"].split(",") if e.strip()]
        else:
            count = sum(1 for d in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", d.name))
            entries = [str(i) for i in range(count)]
    else:
        entries = [e.strip() for e in spec.split(",") if e.strip()]
        if not entries:
            raise ConfigError(f"--gpus {spec!r}: expected a list like 0,1,2,3, 'auto' or 'none'")
    if not entries:
        return [None] * n
    return [entries[i % len(entries)] for i in range(n)]


def _pdeathsig(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the supervisor dies, even by SIGKILL (a
    supervisor that is gone must not leave producers holding sockets, CPUs and GPU memory)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Child:
    """One rank's producer: its command, and where it stands in its restart budget."""

    rank: int
    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None
    done: bool = False
    note: str = ""


class Supervisor:
    """Starts the children, restarts crashed ones, and stops all of them together."""

    def __init__(self, children: Sequence[Child], *, max_restarts: int) -> None:
        self.children = list(children)
        self.max_restarts = max_restarts
        self.signum: int | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def _start(self, c: Child) -> None:
        c.proc = subprocess.Popen(c.cmd, env=c.env, preexec_fn=_pdeathsig(os.getpid()))
        c.started, c.restart_at = time.monotonic(), None
        log.info("rank %d: started producer pid %d%s", c.rank, c.proc.pid, c.note)

    def _on_exit(self, c: Child, code: int, now: float) -> bool:
        """Handle ``c``'s exit; False when its restart budget is spent."""
        assert c.proc is not None
        pid, c.proc = c.proc.pid, None
        if code == 0:
            c.done = True
            log.info("rank %d: producer pid %d finished (exit 0)", c.rank, pid)
            return True
        if c.restarts >= self.max_restarts:
            log.error(
                "rank %d: producer pid %d %s; restart budget spent (%d restarts), stopping all",
                c.rank,
                pid,
                _describe(code),
                self.max_restarts,
            )
            return False
        if now - c.started >= HEALTHY_S:
            c.backoff = 0.0
        c.restarts += 1
        c.restart_at = now + c.backoff
        log.warning(
            "rank %d: producer pid %d %s; restart %d of %d in %.1f s",
            c.rank,
            pid,
            _describe(code),
            c.restarts,
            self.max_restarts,
            c.backoff,
        )
        c.backoff = min(max(BACKOFF_S, c.backoff * 2), BACKOFF_MAX_S)
        return True

    def _stop_all(self, signum: int) -> None:
        """Send ``signum`` to every running child, wait up to STOP_S, then SIGKILL the rest."""
        live = [c.proc for c in self.children if c.proc is not None]
        for p in live:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_S
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("producer pid %d did not stop within %.0f s: SIGKILL", p.pid, STOP_S)
                p.kill()
                p.wait()

    def run(self) -> int:
        """Supervise until every child exited 0 (0), a budget is spent (1) or a signal (128+n)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for c in self.children:
                self._start(c)
            while True:
                if self.signum is not None:
                    log.info("%s: stopping all producers", signal.Signals(self.signum).name)
                    self._stop_all(self.signum)
                    return 128 + self.signum
                now = time.monotonic()
                for c in self.children:
                    code = c.proc.poll() if c.proc is not None else None
                    if code is not None and not self._on_exit(c, code, now):
                        self._stop_all(signal.SIGTERM)
                        return 1
                    if c.restart_at is not None and now >= c.restart_at:
                        self._start(c)
                if all(c.done for c in self.children):
                    log.info("all %d producers finished", len(self.children))
                    return 0
                time.sleep(TICK_S)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def supervise(
    ranks: Sequence[int],
    *,
    world_size: int,
    config: str | None,
    overrides: Sequence[str],
    cpus_per_rank: int | None = None,
    gpus: str = "auto",
    max_restarts: int = 5,
) -> int:
    """Run ``python -m lensfeed.producer --rank r`` for each rank until done; the exit code."""
    bad = [r for r in ranks if not 0 <= r < world_size]
    if bad:
        raise ConfigError(
            f"--ranks: rank {bad[0]} is outside world_size {world_size} "
            f"(valid ranks 0..{world_size - 1}; set world_size=N or serve fewer ranks)"
        )
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0 (got {max_restarts})")
    available = os.sched_getaffinity(0)
    cpu_plan = plan_cpus(available, len(ranks), cpus_per_rank)
    if (cpus_per_rank or 1) * len(ranks) > len(available) and cpus_per_rank != 0:
        log.warning("%d CPUs for %d ranks: ranks share CPUs", len(available), len(ranks))
    gpu_plan = plan_gpus(gpus, len(ranks))
    children = []
    for rank, cpus, gpu in zip(ranks, cpu_plan, gpu_plan, strict=True):
        cmd = [sys.executable, "-m", "lensfeed.producer", "--rank", str(rank)]
        cmd += ["--config", config] if config else []
        cmd += ["--cpus", ",".join(map(str, cpus))] if cpus else []
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        note = f" (cpus {','.join(map(str, cpus)) or 'any'}, CUDA_VISIBLE_DEVICES={gpu or '-'})"
        children.append(Child(rank, [*cmd, *overrides], env, note=note))
    log.info(
        "serving ranks %s of %d, max %d restarts per rank",
        ",".join(map(str, ranks)),
        world_size,
        max_restarts,
    )
    return Supervisor(children, max_restarts=max_restarts).run()


__all__ = ["add_supervisor_arguments", "parse_ranks", "plan_cpus", "plan_gpus", "supervise"]
