"""``lensfeed produce --ranks``: rank lists, CPU/GPU plans, and the supervisor as a real process
with real producer children (pinning, restarts, restart budget, signals, clean exit)."""

from __future__ import annotations

import argparse
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lensfeed.common.config import load_config
from lensfeed.common.spec import DataSpec
from lensfeed.producer.main import main
from lensfeed.producer.supervisor import parse_ranks, plan_cpus, plan_gpus
from lensfeed.trainer.client import FeedClient
from tests._util import Procs, child_env, ipc_endpoint, make_dataset, python_cmd

pytestmark = pytest.mark.timeout(60)

#: How long a test waits for something that must happen (bounded; never a sleep).
WAIT_S = 30.0

# --------------------------------------------------------------------------- pure parts


def test_parse_ranks() -> None:
    assert parse_ranks("0-7") == list(range(8))
    assert parse_ranks("0,2,5-6") == [0, 2, 5, 6]
    assert parse_ranks("3") == [3]
    assert parse_ranks("5-6, 0") == [0, 5, 6]


@pytest.mark.parametrize("bad", ["", "a", "1-", "3-1", "0,0", "0-2,1", "-1"])
def test_parse_ranks_rejects(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="rank"):
        parse_ranks(bad)


def test_plan_cpus() -> None:
    assert plan_cpus(range(8), 2, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_cpus(range(10), 4, None) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert plan_cpus([4, 5, 6], 5, None) == [[4], [5], [6], [4], [5]]  # shared round-robin
    assert plan_cpus(range(8), 3, 2) == [[0, 1], [2, 3], [4, 5]]
    assert plan_cpus(range(4), 3, 2) == [[0, 1], [2, 3], [0, 1]]  # wraps around
    assert plan_cpus(range(8), 2, 0) == [[], []]  # no pinning


def test_plan_gpus(tmp_path: Path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert plan_gpus("3,5", 3, environ={}) == ["3", "5", "3"]
    assert plan_gpus("none", 2, environ={"CUDA_VISIBLE_DEVICES": "1"}) == [None, None]
    auto = {"environ": {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, "dev": tmp_path}
    assert plan_gpus("auto", 3, **auto) == ["GPU-a", "GPU-b", "GPU-a"]
    assert plan_gpus("auto", 4, environ={}, dev=tmp_path) == ["0", "1", "2", "0"]
    assert plan_gpus("auto", 2, environ={}, dev=tmp_path / "none") == [None, None]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rank", "0", "--ranks", "0-1"], "not allowed with argument"),
        (["--ranks", "0-1", "--cpus", "0"], "use --cpus-per-rank"),
        (["--gpus", "0,1"], "--gpus needs --ranks"),
        (["--ranks", "0-x"], "bad rank list"),
    ],
)
def test_bad_command_lines_are_usage_errors(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


def test_ranks_outside_world_size_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ranks", "0-3", "world_size=2", "feed.endpoint=ipc:///x/{rank}.sock"]) == 1
    assert "rank 2 is outside world_size 2 (valid ranks 0..1" in capsys.readouterr().err


def test_the_supervisor_does_not_import_torch() -> None:
    script = (
        "import sys, lensfeed.producer.main, lensfeed.producer.supervisor; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- real processes


class Lines:
    """The supervisor's output (its log and its children's), read as it comes."""

    def __init__(self, p: subprocess.Popen[str]) -> None:
        self.p, self.q, self.seen = p, queue.Queue[str](), []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.q.put(line)
        self.q.put("")

    def wait_for(self, pattern: str, timeout: float = WAIT_S) -> re.Match[str]:
        """The first line (after those already matched) that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text}") from None
            if line == "":
                raise AssertionError(f"output ended before {pattern!r}:\n{self.text}")
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def rest(self, timeout: float = WAIT_S) -> str:
        """Everything until the process exits."""
        deadline = time.monotonic() + timeout
        while (line := self.q.get(timeout=max(0.0, deadline - time.monotonic()))) != "":
            self.seen.append(line)
        return self.text

    @property
    def text(self) -> str:
        return "".join(self.seen)


def overrides(data: Path, tmp_path: Path, **extra: object) -> list[str]:
    base: dict[str, object] = {
        "world_size": 2,
        "batch_size": 4,
        "seed": 3,
        "dataset.path": data,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 8,
        "training_initial_cache_size_per_rank": 8,
        "feed.endpoint": ipc_endpoint(tmp_path),
        "feed.timeout_s": 30,
        "feed.error_linger_s": 0.2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def start(procs: Procs, over: list[str], *args: str) -> tuple[subprocess.Popen[str], Lines]:
    p = procs.start(python_cmd("lensfeed.producer", "--ranks", "0-1", *args, *over))
    return p, Lines(p)


def started(lines: Lines, rank: int) -> int:
    """The pid of the next producer the supervisor starts for ``rank``."""
    return int(lines.wait_for(rf"rank {rank}: started producer pid (\d+)")[1])


def serving(lines: Lines, *ranks: int) -> None:
    """Wait until each of ``ranks`` logged that it serves (in any order)."""
    left = set(ranks)
    while left:
        left.discard(int(lines.wait_for(r"producer\[(\d+)\] INFO rank \d+/\d+ serving")[1]))


def gone(pid: int) -> bool:
    """``pid`` no longer exists (the supervisor reaps its children)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def one_cycle(over: list[str], rank: int) -> int:
    """Batches of cycle 0 that a real client gets from ``rank``; closing says bye."""
    cfg = load_config(None, over)
    spec = DataSpec.from_config(cfg)
    with FeedClient(cfg.endpoint_for(rank), rank=rank, spec=spec, timeout_s=WAIT_S) as feed:
        return sum(1 for _ in feed.next_cycle())


def cpus_allowed(pid: int) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    spec = re.search(r"^Cpus_allowed_list:\s*(\S+)$", status, re.M)
    assert spec, status
    out: set[int] = set()
    for part in spec[1].split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


@pytest.mark.slow
def test_each_child_is_pinned_and_gets_its_gpu(procs: Procs, tmp_path: Path) -> None:
    over = overrides(make_dataset(tmp_path / "ds", rows=8), tmp_path)
    sup, lines = start(procs, over, "--gpus", "3,5")
    pids = [started(lines, 0), started(lines, 1)]
    serving(lines, 0, 1)  # each child pins itself (--cpus) before it serves
    plan = plan_cpus(os.sched_getaffinity(0), 2, None)
    for pid, cpus, gpu in zip(pids, plan, ["3", "5"], strict=True):
        assert cpus_allowed(pid) == set(cpus)
        assert environ(pid)["CUDA_VISIBLE_DEVICES"] == gpu
    assert "libtorch" not in Path(f"/proc/{sup.pid}/maps").read_text()


@pytest.mark.slow
def test_a_killed_child_is_restarted_and_serves(procs: Procs, tmp_path: Path) -> None:
    over = overrides(make_dataset(tmp_path / "ds", rows=8), tmp_path)
    sup, lines = start(procs, over)
    started(lines, 0)
    victim = started(lines, 1)
    serving(lines, 0, 1)
    os.kill(victim, signal.SIGKILL)
    m = lines.wait_for(r"rank 1: producer pid (\d+) killed by SIGKILL; restart 1 of 5 in 0.0 s")
    assert int(m[1]) == victim
    assert started(lines, 1) != victim
    assert one_cycle(over, 1) == 2  # the new child serves rank 1
    assert sup.poll() is None


@pytest.mark.slow
def test_spent_restart_budget_stops_everything(procs: Procs, tmp_path: Path) -> None:
    # One row for two ranks: rank 1's shard is empty, so its producer always exits 1.
    over = overrides(make_dataset(tmp_path / "ds", rows=1), tmp_path)
    sup, lines = start(procs, over, "--max-restarts", "2")
    healthy = started(lines, 0)
    m = lines.wait_for(r"rank 1: producer pid \d+ exited with code 1; restart budget spent")
    sup.wait(timeout=WAIT_S)
    out = lines.rest()
    assert sup.returncode == 1, out
    assert "restart 2 of 2 in 0.5 s" in out
    assert "(2 restarts)" in m.string
    assert gone(healthy), out
    assert "rank 0: producer pid" not in out  # rank 0 was never restarted


@pytest.mark.slow
def test_sigterm_stops_all_children(procs: Procs, tmp_path: Path) -> None:
    over = overrides(make_dataset(tmp_path / "ds", rows=8), tmp_path)
    sup, lines = start(procs, over)
    pids = [started(lines, 0), started(lines, 1)]
    serving(lines, 0, 1)
    sup.send_signal(signal.SIGTERM)
    sup.wait(timeout=WAIT_S)
    assert sup.returncode == 128 + signal.SIGTERM == 143, lines.rest()
    assert all(gone(pid) for pid in pids)


@pytest.mark.slow
def test_exits_0_when_every_trainer_said_bye(procs: Procs, tmp_path: Path) -> None:
    over = overrides(make_dataset(tmp_path / "ds", rows=8), tmp_path)
    sup, lines = start(procs, over, "--cpus-per-rank", "0", "--gpus", "none")
    assert one_cycle(over, 0) == 2
    assert one_cycle(over, 1) == 2
    sup.wait(timeout=WAIT_S)
    out = lines.rest()
    assert sup.returncode == 0, out
    for rank in (0, 1):
        assert re.search(rf"rank {rank}: producer pid \d+ finished \(exit 0\)", out), out
    assert "all 2 producers finished" in out
    assert "restart 1 of" not in out


@pytest.mark.slow
def test_children_die_with_a_killed_supervisor(procs: Procs, tmp_path: Path) -> None:
    over = overrides(make_dataset(tmp_path / "ds", rows=8), tmp_path)
    sup, lines = start(procs, over)
    pids = [started(lines, 0), started(lines, 1)]
    sup.kill()  # no chance to stop them: PR_SET_PDEATHSIG does
    sup.wait(timeout=WAIT_S)
    lines.rest()  # end of output: every child closed the pipe, i.e. is exiting
    assert all(exited(pid, WAIT_S) for pid in pids)


def exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (a zombie awaiting init, or reaped): its pidfd turns
    readable then. A process closes its files a moment before it becomes a zombie, so the end
    of its output alone does not mean it has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
