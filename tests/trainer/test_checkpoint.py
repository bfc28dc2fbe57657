"""Checkpoints: atomic and complete (COMPLETE marker), keep-last pruning, resume=auto, and a
trainer rank killed under torchrun that resumes exactly where the last complete step was."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lensfeed.common.config import load_config
from lensfeed.common.errors import ConfigError, LensfeedError
from lensfeed.trainer import checkpoint
from tests._util import (
    make_dataset,
    python_cmd,
    run_in_process,
    run_ranks,
    torchrun_cmd,
)
from tests._util import read_records as records

pytestmark = pytest.mark.timeout(120)


def write_step(root: Path, step: int, ranks=(0, 1), *, complete: bool = True) -> Path:
    for r in ranks:
        checkpoint.save(root, step=step, rank=r, state={"step": step, "rank": r})
    if complete:
        checkpoint.commit(root, step=step, world_size=len(ranks))
    return checkpoint.step_dir(root, step)


# --------------------------------------------------------------------------- unit


def test_save_commit_resolve_load(tmp_path):
    d = write_step(tmp_path, 8)
    assert sorted(p.name for p in d.iterdir()) == ["COMPLETE", "rank0.pt", "rank1.pt"]
    assert json.loads((d / "COMPLETE").read_text()) == {"step": 8, "world_size": 2}
    for r in (0, 1):
        assert checkpoint.resolve(tmp_path, rank=r) == d / f"rank{r}.pt"
        assert checkpoint.resolve(d, rank=r) == d / f"rank{r}.pt"
        assert checkpoint.load(tmp_path, rank=r) == {"step": 8, "rank": r}
    with pytest.raises(LensfeedError, match="written by 2 ranks"):
        checkpoint.resolve(tmp_path, rank=2)


def test_interrupted_rank_write_is_ignored(tmp_path):
    good = write_step(tmp_path, 8)
    # Step 16: rank 0's file is in place, rank 1 died while writing (only its .tmp exists).
    write_step(tmp_path, 16, ranks=(0,), complete=False)
    (checkpoint.step_dir(tmp_path, 16) / "rank1.pt.tmp").write_bytes(b"half a pickle")
    assert checkpoint.latest(tmp_path) == good
    assert checkpoint.resolve(tmp_path, rank=0) == good / "rank0.pt"
    assert checkpoint.resolve(tmp_path, rank=1) == good / "rank1.pt"
    with pytest.raises(LensfeedError, match="step_00000016.*not a complete checkpoint"):
        checkpoint.resolve(checkpoint.step_dir(tmp_path, 16), rank=0)


def test_crash_between_rank_writes_and_marker_is_ignored(tmp_path):
    good = write_step(tmp_path, 8)
    write_step(tmp_path, 16, complete=False)  # both rank files, no marker: not a step
    assert [s for s, _ in checkpoint.complete_steps(tmp_path)] == [8]
    assert checkpoint.resolve(tmp_path, rank=1) == good / "rank1.pt"


@pytest.mark.parametrize(
    "damage", ["missing_rank_file", "bad_json", "wrong_step", "tmp_marker_only"]
)
def test_damaged_marker_does_not_count(tmp_path, damage):
    good = write_step(tmp_path, 8)
    bad = write_step(tmp_path, 16)
    marker = bad / "COMPLETE"
    if damage == "missing_rank_file":  # e.g. a half-finished prune
        (bad / "rank1.pt").unlink()
    elif damage == "bad_json":
        marker.write_text("{")
    elif damage == "wrong_step":
        marker.write_text(json.dumps({"step": 24, "world_size": 2}))
    else:
        marker.rename(bad / "COMPLETE.tmp")
    assert checkpoint.latest(tmp_path) == good


def test_explicit_path_without_complete_checkpoint_names_it(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(LensfeedError, match=re.escape(f"resume={empty}: holds no complete")):
        checkpoint.load(empty, rank=0)
    write_step(tmp_path / "ck", 8, complete=False)
    with pytest.raises(LensfeedError, match="holds no complete checkpoint"):
        checkpoint.resolve(tmp_path / "ck", rank=0)
    assert checkpoint.latest(tmp_path / "absent") is None


def test_prune_keeps_last_complete_and_drops_older_incomplete(tmp_path):
    for s in (2, 4, 6, 8):
        write_step(tmp_path, s)
    write_step(tmp_path, 5, complete=False)  # incomplete, older than the newest complete
    write_step(tmp_path, 12, complete=False)  # incomplete, newer: left alone
    write_step(tmp_path, 20)  # another run's, after the current step: left alone
    write_step(tmp_path, 10, complete=False)
    checkpoint.commit(tmp_path, step=10, world_size=2, keep=3)
    left = sorted(d.name for d in tmp_path.iterdir())
    assert left == [f"step_{s:08d}" for s in (6, 8, 10, 12, 20)]
    checkpoint.prune(tmp_path, keep=1, current=10)
    assert sorted(d.name for d in tmp_path.iterdir()) == [f"step_{s:08d}" for s in (10, 12, 20)]


def test_rewriting_a_step_drops_its_old_marker_first(tmp_path):
    d = write_step(tmp_path, 8)
    checkpoint.discard_marker(tmp_path, step=8)
    assert not (d / "COMPLETE").exists()
    assert checkpoint.latest(tmp_path) is None
    checkpoint.discard_marker(tmp_path, step=99)  # nothing there: no error


def test_failed_write_is_a_lensfeed_error_and_leaves_no_tmp(tmp_path):
    with pytest.raises(LensfeedError, match="cannot write checkpoint file"):
        checkpoint.save(tmp_path, step=1, rank=0, state={"bad": lambda: 0})
    assert list(checkpoint.step_dir(tmp_path, 1).iterdir()) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.keep_checkpoints=0", "'training.keep_checkpoints' must be >= 1"),
        ("training.checkpoint_every_cycles=-1", "'training.checkpoint_every_cycles' must be >= 0"),
        ("training.checkpoint_every=-2", "'training.checkpoint_every' must be >= 0"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_config_defaults():
    t = load_config(None, []).training
    assert (t.checkpoint_every_cycles, t.keep_checkpoints, t.checkpoint_every) == (1, 3, 0)


# --------------------------------------------------------------------------- in-process trainer


def test_resume_auto_with_nothing_there_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lensfeed.trainer"):
        code, metrics = run_in_process(tmp_path, **{"training.resume": "auto"})
    assert code == 0
    assert "no complete checkpoint" in caplog.text
    assert "starting fresh" in caplog.text
    start = records(metrics, "start")
    assert [(s["step"], s["resumed_from"]) for s in start] == [(0, None)]
    # Every cycle (5 batches) is checkpointed once; the end of run adds no second save.
    assert [c["step"] for c in records(metrics, "checkpoint")] == [5, 10, 15]
    assert [s for s, _ in checkpoint.complete_steps(tmp_path / "ckpt")] == [5, 10, 15]


@pytest.mark.parametrize(
    ("every", "every_cycles", "steps"),
    [(0, 0, [15]), (5, 1, [5, 10, 15]), (3, 2, [3, 6, 9, 10, 12, 15])],
)
def test_checkpoint_cadence_saves_each_step_once(tmp_path, every, every_cycles, steps):
    code, metrics = run_in_process(
        tmp_path,
        **{"training.checkpoint_every": every, "training.checkpoint_every_cycles": every_cycles},
    )
    assert code == 0
    assert [c["step"] for c in records(metrics, "checkpoint")] == steps  # 5 batches per cycle
    assert [s for s, _ in checkpoint.complete_steps(tmp_path / "ckpt")] == steps[-3:]


def test_resume_auto_skips_interrupted_step_and_continues_exactly(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir(mode=0o700)  # holds the ipc sockets too: private
    part_dir.mkdir(mode=0o700)
    code, full_metrics = run_in_process(full_dir)
    assert code == 0
    # Stop at step 7: checkpoints at 5 (end of cycle 0) and 7 (end of run).
    code, part_metrics = run_in_process(
        part_dir, **{"training.max_steps": 7, "training.keep_checkpoints": 1}
    )
    assert code == 0
    ckpt = part_dir / "ckpt"
    assert [s for s, _ in checkpoint.complete_steps(ckpt)] == [7]
    assert not checkpoint.step_dir(ckpt, 5).exists()  # pruned (keep_checkpoints=1)
    # A crash while writing step 10: the rank file's tmp is all there is.
    checkpoint.step_dir(ckpt, 10).mkdir()
    (checkpoint.step_dir(ckpt, 10) / "rank0.pt.tmp").write_bytes(b"torn")
    code, _ = run_in_process(part_dir, **{"training.resume": "auto"})
    assert code == 0
    start = records(part_metrics, "start")
    assert [s["step"] for s in start] == [0, 7]
    assert start[1]["resumed_from"] == str(checkpoint.step_dir(ckpt, 7))

    def key(b):
        return (b["step"], b["cycle"], b["batch"], b["digest"], b["sample_idx"])

    assert [key(b) for b in records(part_metrics, "batch")] == [
        key(b) for b in records(full_metrics, "batch")
    ]
    # Checkpoints of the resumed run: 10 (rewritten over the torn one) and 15; 7 is not re-saved.
    assert [c["step"] for c in records(part_metrics, "checkpoint")] == [5, 7, 10, 15]
    assert [s for s, _ in checkpoint.complete_steps(ckpt)] == [7, 10, 15]  # keep 3 by default
    assert sorted(p.name for p in checkpoint.step_dir(ckpt, 10).iterdir()) == [
        "COMPLETE",
        "rank0.pt",
    ]


def test_explicit_resume_without_complete_checkpoint_fails_clearly(tmp_path):
    write_step(tmp_path / "ck", 5, ranks=(0,), complete=False)
    code, metrics = run_in_process(tmp_path, **{"training.resume": str(tmp_path / "ck")})
    assert code == 1
    status = records(metrics, "status")[-1]
    assert status["code"] == "checkpoint"
    assert f"resume={tmp_path / 'ck'}: holds no complete checkpoint" in status["message"]


# --------------------------------------------------------------------------- ranks disagree


def _resume_rank(rank: int, port: int, tmp: str, out: mp.Queue) -> None:
    """One rank whose checkpoint_dir differs from the other's (storage that is not shared)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from lensfeed.trainer.train import Trainer

    cfg = load_config(
        None,
        [
            "world_size=2",
            "training.device=cpu",
            "training.collective_timeout_s=30",
            "feed.timeout_s=5",
            "feed.reconnect_timeout_s=5",
            f"feed.endpoint=ipc://{tmp}/never-{{rank}}.sock",
            f"training.checkpoint_dir={tmp}/ck{rank}",
            f"training.metrics_path={tmp}/metrics.jsonl",
            "training.resume=auto",
        ],
    )
    trainer = Trainer(cfg)
    try:
        trainer._resume()
        out.put((rank, "resumed"))
    except LensfeedError as exc:
        out.put((rank, f"{type(exc).__name__} ({exc.code}): {exc}"))
    finally:
        trainer.close()


@pytest.mark.slow
def test_ranks_that_resolve_different_steps_fail_together(tmp_path):
    write_step(tmp_path / "ck0", 8)  # rank 0 sees step 8, rank 1 sees nothing
    got = run_ranks(_resume_rank, tmp_path)
    for r in (0, 1):
        assert "ranks disagree on the checkpoint step to resume from" in got[r], got
        assert "values range from -1 to 8" in got[r]
        assert got[r].startswith("RanksDisagreeError (ranks_disagree)")  # no rank to blame


# --------------------------------------------------------------------------- a killed rank


def last_per_step(path: Path) -> dict[int, tuple[list[int], str]]:
    return {b["step"]: (b["sample_idx"], b["digest"]) for b in records(path, "batch")}


class Drain:
    """Reads a child's output line by line in the background (a full pipe never blocks the
    child), so a test can wait for a line instead of polling files against the clock."""

    def __init__(self, p) -> None:
        self.lines: list[str] = []
        self.done = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(p,), daemon=True)
        self.thread.start()

    def _read(self, p) -> None:
        for line in p.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait_for(
        self, pattern: str, timeout: float, accept: Callable[[re.Match[str]], bool] = bool
    ) -> re.Match[str] | None:
        """The first line matching ``pattern`` whose match ``accept`` takes (None if the child
        ended or time ran out)."""
        rx = re.compile(pattern)

        def found() -> re.Match[str] | None:
            matches = (rx.search(line) for line in self.lines)
            return next((m for m in matches if m and accept(m)), None)

        with self.cond:
            self.cond.wait_for(lambda: found() is not None or self.done, timeout)
            return found()

    def __str__(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def _run_job(procs, tmp: Path, data: Path, *, restarts: int):
    over = [
        "world_size=2",
        "batch_size=8",
        f"dataset.path={data}",
        "dataset.on_the_fly.samples_per_regeneration_cycle=64",
        f"feed.endpoint=ipc://{tmp}/ipc/p{{rank}}.sock",
        "feed.timeout_s=30",
        "feed.reconnect_timeout_s=20",
        "feed.exit_on_bye=false",  # the producers keep serving across the trainer's restart
        "training.collective_timeout_s=90",
        "training.num_cycles=6",
        # Heavier steps (a 1024-token vocabulary over 512-token rows): a few seconds of training
        # remain after the checkpoint the test waits for, so the kill lands mid-run.
        "training.vocab_size=1024",
        "training.d_model=128",
        "training.progress=false",
        "training.log_batches=true",
        "training.resume=auto",
        f"training.checkpoint_dir={tmp / 'ckpt'}",
        f"training.metrics_path={tmp / 'metrics.jsonl'}",
    ]
    for r in (0, 1):
        Drain(procs.start(python_cmd("lensfeed.producer", "--rank", str(r), *over)))
    trainer = procs.start(
        torchrun_cmd(*over, max_restarts=restarts),
        # torchrun's restarts reuse its rendezvous TCPStore, where the restarted ranks find the
        # old ranks' addresses (pytorch/pytorch#135712): a fresh store per restart avoids that.
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    return trainer, Drain(trainer)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killed_rank_restarts_and_resumes_from_last_complete_step(procs, tmp_path):
    data = make_dataset(tmp_path / "ds", rows=200, seq_len=512)
    run, ref = tmp_path / "run", tmp_path / "ref"
    metrics = {0: run / "metrics.jsonl", 1: run / "metrics.rank1.jsonl"}

    trainer, out = _run_job(procs, run, data, restarts=1)
    # Wait (on the trainer's own log, not the clock) for the checkpoint of step 16 to complete.
    done = out.wait_for(
        r"rank 0: checkpoint \S*step_(\d+) complete", 120, accept=lambda m: int(m[1]) >= 16
    )
    assert done is not None, f"no checkpoint of step >= 16 ({trainer.poll()}): {out}"
    assert trainer.poll() is None, f"trainer ended early: {out}"
    victim = records(metrics[1], "start")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert trainer.wait(timeout=150) == 0, str(out)
    log = str(out)

    trainer_ref, out_ref = _run_job(procs, ref, data, restarts=0)
    assert trainer_ref.wait(timeout=150) == 0, str(out_ref)
    for r in (0, 1):
        ref_metrics = ref / metrics[r].name
        # Fresh start (resume=auto found nothing), then a restart that resumed step >= 16.
        starts = records(metrics[r], "start")
        assert [s["resumed_from"] is None for s in starts] == [True, False], (starts, log)
        resumed = starts[1]["step"]
        assert 16 <= resumed < 48, starts
        assert resumed % 8 == 0, starts
        assert starts[1]["resumed_from"] == str(checkpoint.step_dir(run / "ckpt", resumed))
        assert [s["step"] for s in records(ref_metrics, "start")] == [0]
        # The restarted run's batches are exactly the uninterrupted run's, from the resume on.
        lines = [json.loads(line) for line in metrics[r].read_text().splitlines()]
        restart = lines.index(starts[1])
        after = [b["step"] for b in lines[restart:] if b["event"] == "batch"]
        assert after == list(range(resumed + 1, 49))
        got, want = last_per_step(metrics[r]), last_per_step(ref_metrics)
        assert sorted(want) == list(range(1, 49))
        assert got == want
        assert records(metrics[r], "status")[-1]["training_status"] == "ok"
    # Keep-last-3 complete checkpoints, all of them readable and at the same step on both ranks.
    steps = checkpoint.complete_steps(run / "ckpt")
    assert [s for s, _ in steps] == [32, 40, 48]
    assert sorted(d.name for d in (run / "ckpt").iterdir()) == [d.name for _, d in steps]
    for r in (0, 1):
        state = checkpoint.load(run / "ckpt", rank=r)
        assert state["step"] == 48
        assert state["feed"]["cycle"] == 6
        assert isinstance(state["model"]["out.weight"], torch.Tensor)


def test_a_resume_at_max_steps_trains_nothing_more(tmp_path):
    """A run restarted after its final save (torchrun --max-restarts, resume=auto) is done: no
    extra step, no new checkpoint."""
    code, metrics = run_in_process(tmp_path, **{"training.max_steps": 7})
    assert code == 0
    saved = [s for s, _ in checkpoint.complete_steps(tmp_path / "ckpt")]
    code, metrics = run_in_process(tmp_path, **{"training.max_steps": 7, "training.resume": "auto"})
    assert code == 0
    assert records(metrics, "status")[-1]["steps"] == 7
    assert len(records(metrics, "batch")) == 7  # the first run's, none from the second
    assert [s for s, _ in checkpoint.complete_steps(tmp_path / "ckpt")] == saved


def test_a_checkpoint_of_another_model_is_a_checkpoint_error(tmp_path):
    """Neither training.d_model nor the builder is part of the data fingerprint: the resume
    must name the checkpoint and the likely cause, with a status record, not a traceback."""
    code, _ = run_in_process(tmp_path, **{"training.max_steps": 5, "training.d_model": 64})
    assert code == 0
    code, metrics = run_in_process(
        tmp_path,
        **{"training.max_steps": 8, "training.d_model": 32, "training.resume": "auto"},
    )
    assert code == 1
    status = records(metrics, "status")[-1]
    assert status["training_status"] == "error_checkpoint"
    assert "does not fit this run's model" in status["message"]
    assert "size mismatch" in status["message"]
