"""Self-healing under DDP: a 2-rank torchrun trainer whose producers run under the supervisor
(``lensfeed produce --ranks 0-1``). A producer child killed with SIGKILL is restarted by the
supervisor and every rank's per-step stream equals an uninterrupted run; a producer that never
comes back stops every rank within ``feed.reconnect_timeout_s``, naming the rank."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests._util import Procs, make_dataset, python_cmd, read_records, torchrun_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def overrides(tmp_path: Path, data: Path, **extra: object) -> list[str]:
    base: dict[str, object] = {
        "world_size": 2,
        "batch_size": 4,
        "dataset.path": data,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 160,
        "feed.endpoint": f"ipc://{tmp_path}/ipc/p{{rank}}.sock",
        "feed.prefetch": 4,  # the producers are never far ahead: a kill is felt at once
        "feed.timeout_s": 30,
        "feed.heartbeat_timeout_s": 1,
        "feed.reconnect_timeout_s": 30,
        "feed.exit_on_bye": "true",
        "training.collective_timeout_s": 100,
        "training.num_cycles": 3,
        "training.progress": "false",
        "training.log_batches": "true",
        "training.checkpoint_dir": tmp_path / "ckpt",
        "training.metrics_path": tmp_path / "metrics.jsonl",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def supervisor_cmd(over: list[str]) -> list[str]:
    return python_cmd("lensfeed.producer", "--ranks", "0-1", "--cpus-per-rank", "0", *over)


def child_of(supervisor: subprocess.Popen[str], rank: int) -> int:
    """The pid of the producer child serving ``rank`` (from its command line in /proc)."""
    pid = supervisor.pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"--rank" in cmd and cmd[cmd.index(b"--rank") + 1] == str(rank).encode():
            return int(child)
    raise AssertionError(f"no producer child for rank {rank}")


def wait_for_line(p: subprocess.Popen[str], text: str) -> None:
    """Read the trainer's output until ``text`` appears (its progress, not a timer)."""
    assert p.stdout is not None
    for line in p.stdout:
        if text in line:
            return
    raise AssertionError(f"trainer ended before printing {text!r}")


def steps(path: Path) -> dict[int, tuple[list[int], str]]:
    return {r["step"]: (r["sample_idx"], r["digest"]) for r in read_records(path, "batch")}


def run_reference(procs: Procs, tmp_path: Path, data: Path) -> Path:
    ref = tmp_path / "ref"
    over = overrides(ref, data)
    sup = procs.start(supervisor_cmd(over))
    code, out = procs.wait(procs.start(torchrun_cmd(*over)), timeout=120)
    assert code == 0, out
    assert procs.wait(sup, timeout=30)[0] == 0
    return ref


def test_supervisor_restarts_a_killed_producer_and_streams_are_identical(procs, tmp_path):
    data = make_dataset(tmp_path / "ds", rows=203, seq_len=16)
    ref = run_reference(procs, tmp_path, data)
    run = tmp_path / "run"
    over = overrides(run, data)
    sup = procs.start(supervisor_cmd(over))
    trainer = procs.start(torchrun_cmd(*over))
    wait_for_line(trainer, "rank 1 cycle 0:")
    subprocess.run(["kill", "-9", str(child_of(sup, 1))], check=True)
    code, out = procs.wait(trainer, timeout=150)
    assert code == 0, out
    assert "reconnected to the producer for rank 1" in out
    scode, sout = procs.wait(sup, timeout=30)
    assert scode == 0, sout
    assert "restart" in sout
    for name in ("metrics.jsonl", "metrics.rank1.jsonl"):
        want, got = steps(ref / name), steps(run / name)
        assert len(want) == 3 * 40
        assert got == want, name
    status = read_records(run / "metrics.rank1.jsonl", "status")[-1]
    assert status["training_status"] == "ok"
    assert status["feed_reconnects"] >= 1
    assert read_records(run / "metrics.jsonl", "status")[-1]["feed_reconnects"] == 0


def test_a_producer_that_never_comes_back_stops_every_rank_in_time(procs, tmp_path):
    data = make_dataset(tmp_path / "ds", rows=203, seq_len=16)
    over = overrides(tmp_path, data, **{"feed.reconnect_timeout_s": 3})
    producers = [
        procs.start(python_cmd("lensfeed.producer", "--rank", str(r), *over)) for r in (0, 1)
    ]
    trainer = procs.start(torchrun_cmd(*over))
    wait_for_line(trainer, "rank 1 cycle 0:")
    producers[1].kill()
    t_kill = time.monotonic()
    code, out = procs.wait(trainer, timeout=120)
    elapsed = time.monotonic() - t_kill
    assert code != 0, out
    assert elapsed < 3 + 15, elapsed  # reconnect_timeout_s, plus torchrun's teardown
    for name in ("metrics.jsonl", "metrics.rank1.jsonl"):
        status = read_records(tmp_path / name, "status")[-1]
        assert status["training_status"] == "error_producer_lost", status
        assert status["failed_rank"] == 1
        assert "rank 1" in status["message"]
        assert "reconnect_timeout_s" in status["message"]
