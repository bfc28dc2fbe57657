"""The reference DDP trainer: rank r pulls rank r's batches and trains a toy model on them.

It shows how a real loop uses the feed: ask for each cycle explicitly, keep ranks in lockstep
(same batch count per cycle), stop all ranks together on any failure, checkpoint the feed cursor
with the model, and resume exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lensfeed.common.config import LensfeedConfig
from lensfeed.common.env import env_local_rank
from lensfeed.common.errors import ConfigError, LensfeedError, RankFailedError
from lensfeed.common.spec import DataSpec
from lensfeed.trainer import checkpoint
from lensfeed.trainer.client import FeedClient
from lensfeed.trainer.cycles import Cycle
from lensfeed.trainer.device import resolve_device
from lensfeed.trainer.lockstep import agree, check_same, init_process_group
from lensfeed.trainer.models import build_model
from lensfeed.trainer.records import STATUS_OK, Metrics, failure_status, status_for

log = logging.getLogger("lensfeed.trainer")


def batch_digest(batch: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name and bytes: proves two runs saw identical batches."""
    h = hashlib.sha256()
    for name in sorted(batch):
        t = batch[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class Trainer:
    """One rank of the reference training job."""

    def __init__(self, cfg: LensfeedConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.training.device, env_local_rank())
        self.rank, self.world = init_process_group(
            timeout_s=cfg.training.collective_timeout_s, device=self.device
        )
        self.metrics: Metrics | None = None
        self.feed: FeedClient | None = None
        try:
            self._setup_rank(cfg)
            err = None
        except LensfeedError as exc:
            err = exc
        try:  # a rank that cannot set up (e.g. its key files are missing) stops every rank
            agree(err, rank=self.rank, device=self.device)
        except RankFailedError as exc:
            if self.metrics is not None:
                self.metrics.write(failure_status(exc, steps=0))
            if self.feed is not None:
                self.feed.close()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        self.model: torch.nn.Module | None = None
        self.ddp: torch.nn.Module | None = None
        self.optim: torch.optim.Optimizer | None = None
        self.step = 0
        self._last_loss = float("nan")  # of the latest step, for the cycle and final records
        self._resume_state: dict[str, Any] | None = None
        self._resumed_from: Path | None = None
        #: Step of the newest checkpoint this run wrote (or resumed from) in checkpoint_dir.
        self._saved_step = -1

    def _setup_rank(self, cfg: LensfeedConfig) -> None:
        if self.world != cfg.world_size:
            raise ConfigError(
                f"'world_size' is {cfg.world_size} in the config but the trainer runs with "
                f"{self.world} processes; set world_size={self.world} or change --nproc_per_node"
            )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.spec = DataSpec.from_config(cfg)
        self.metrics = Metrics(cfg.training.metrics_path, self.rank)
        self.feed = FeedClient.from_config(cfg, self.rank, device=self.device)

    # ---------------------------------------------------------------- pieces

    def _ensure_model(self, batch: dict[str, torch.Tensor]) -> None:
        if self.model is not None:
            return
        t = self.cfg.training
        self.model = build_model(batch, vocab_size=t.vocab_size, d_model=t.d_model).to(self.device)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=t.lr)
        if self._resume_state is not None:
            self._guard(self._load_resumed)
            self._resume_state = None  # loaded: no second copy of model and optimizer in RAM
        self.ddp = DDP(self.model) if dist.is_initialized() else self.model

    def _load_resumed(self) -> None:
        """The checkpoint's model and optimizer into the ones built here; a checkpoint of
        another model (e.g. another training.d_model or activations.builder) is named."""
        assert self._resume_state is not None
        assert self.model is not None
        assert self.optim is not None
        try:
            self.model.load_state_dict(self._resume_state["model"])
            self.optim.load_state_dict(self._resume_state["optim"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise checkpoint.CheckpointError(
                f"{self._resumed_from} does not fit this run's model (was training.d_model, "
                f"training.vocab_size or activations.builder changed?): {first}"
            ) from None

    def _train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self._ensure_model(batch)
        assert self.ddp is not None
        assert self.optim is not None
        loss = self.ddp(batch)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        return float(loss.detach())

    def _resume(self) -> None:
        """Load ``training.resume`` (a path, or ``auto``); every rank must resume the same step."""
        t = self.cfg.training
        if not t.resume:
            found = checkpoint.latest(t.checkpoint_dir) if self.rank == 0 else None
            if found is not None:
                log.warning(
                    "starting fresh although %s holds a complete checkpoint (%s); set "
                    "training.resume=auto to continue from it",
                    t.checkpoint_dir,
                    found.name,
                )
            return

        def find() -> Path | None:
            if t.resume == "auto":
                d = checkpoint.latest(t.checkpoint_dir)
                return None if d is None else checkpoint.resolve(d, rank=self.rank)
            return checkpoint.resolve(t.resume, rank=self.rank)

        file = self._guard(find)
        step = -1 if file is None else checkpoint.step_of(file.parent)
        check_same(
            step,
            what="the checkpoint step to resume from (-1: none)",
            device=self.device,
            hint=f"training.resume={t.resume!r} must resolve to the same complete step on every "
            "rank; training.checkpoint_dir must be storage all ranks share",
        )
        if file is None:
            log.info(
                "rank %d: resume=auto: no complete checkpoint in %s, starting fresh",
                self.rank,
                t.checkpoint_dir,
            )
            return

        def restore() -> dict[str, Any]:
            state = checkpoint.read(file)
            if int(state["step"]) != step:
                raise checkpoint.CheckpointError(
                    f"{file} holds step {state['step']}, its directory says {step}"
                )
            self.feed.load_state_dict(state["feed"])
            return state

        self._resume_state = self._guard(restore)
        self.step = step
        self._resumed_from = file.parent
        if file.parent.resolve() == checkpoint.step_dir(t.checkpoint_dir, step).resolve():
            self._saved_step = step  # already on disk: the end of run won't write it again
        log.info(
            "rank %d: resuming from %s at step %d, feed %s",
            self.rank,
            file,
            self.step,
            self._resume_state["feed"],
        )

    def _save(self) -> None:
        """Checkpoint this step on every rank; complete only once every rank's file is durable.

        Each phase ends in a vote (:meth:`_guard`), which is also the barrier between phases and
        makes a failing save stop every rank together.
        """
        if self.model is None or self.optim is None or self.step == self._saved_step:
            return
        t = self.cfg.training
        root, step, lead = t.checkpoint_dir, self.step, self.rank == 0
        state = {
            "model": self.model.state_dict(),
            "optim": self.optim.state_dict(),
            "feed": self.feed.state_dict(),
            "step": step,
        }

        def discard() -> None:  # an earlier run's marker goes before any rank replaces a file
            if lead:
                checkpoint.discard_marker(root, step=step)

        def commit() -> None:  # every rank's file is durable: mark the step complete, prune
            if lead:
                checkpoint.commit(root, step=step, world_size=self.world, keep=t.keep_checkpoints)

        self._guard(discard)
        self._guard(lambda: checkpoint.save(root, step=step, rank=self.rank, state=state))
        self._guard(commit)
        self._saved_step = step
        path = checkpoint.step_dir(root, step)
        log.info("rank %d: checkpoint %s complete", self.rank, path)
        self.metrics.write({"event": "checkpoint", "step": step, "path": str(path)})

    def _guard(self, fn: Any) -> Any:
        """Run ``fn``; any lensfeed failure is voted on so every rank stops together."""
        try:
            result, err = fn(), None
        except LensfeedError as exc:
            result, err = None, exc
        agree(err, rank=self.rank, device=self.device)
        return result

    # ---------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        """Train ``training.num_cycles`` cycles (or ``max_steps``); returns the status record."""
        t = self.cfg.training
        self._resume()
        self.metrics.write(
            {
                "event": "start",
                "pid": os.getpid(),
                "world_size": self.world,
                "step": self.step,
                "resumed_from": str(self._resumed_from) if self._resumed_from else None,
            }
        )
        t_start = time.perf_counter()
        samples = 0
        self._last_loss = float("nan")
        done = bool(t.max_steps and self.step >= t.max_steps)  # resumed at or past the end
        while not done and self.feed.state_dict()["cycle"] < t.num_cycles:
            cycle = self._guard(self.feed.next_cycle)
            check_same(cycle.remaining, what=f"batches in cycle {cycle.index}", device=self.device)
            c_start, c_wait0 = time.perf_counter(), self.feed.stats.wait_s
            n, done = self._train_cycle(cycle)
            samples += n * self.spec.batch_size
            self._end_of_cycle(cycle, n, time.perf_counter() - c_start, c_wait0)
        self._save()
        wall = time.perf_counter() - t_start
        summary = {
            "event": "status",
            "training_status": STATUS_OK,
            "steps": self.step,
            "cycles": self.feed.state_dict()["cycle"],
            "samples": samples,
            "wall_s": wall,
            "samples_per_s": samples / wall if wall > 0 else 0.0,
            "wait_s": self.feed.stats.wait_s,
            "wait_share": self.feed.stats.wait_s / wall if wall > 0 else 0.0,
            "feed_reconnects": self.feed.stats.reconnects,
            "feed_recovery_s": self.feed.stats.recovery_s,
            "loss": self._last_loss,
        }
        self.metrics.write(summary)
        return summary

    def _train_cycle(self, cycle: Cycle) -> tuple[int, bool]:
        """Train on ``cycle``'s batches; returns (batches trained, whether max_steps ended it)."""
        t = self.cfg.training
        it = iter(cycle)
        bar = tqdm(
            total=cycle.remaining,
            desc=f"cycle {cycle.index}",
            disable=not t.progress or self.rank != 0,
            leave=False,
        )
        n, done = 0, False
        for j in range(cycle.remaining):
            batch = self._guard(lambda it=it: next(it))
            self._last_loss = self._train_step(batch)
            self.step += 1
            n += 1
            bar.update(1)
            if t.log_batches:
                self.metrics.write(
                    {
                        "event": "batch",
                        "step": self.step,
                        "cycle": cycle.index,
                        "batch": cycle.start_batch + j,
                        "digest": batch_digest(batch),
                        "sample_idx": batch["sample_idx"].tolist(),
                    }
                )
            del batch
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self._save()
            if t.max_steps and self.step >= t.max_steps:
                done = True
                break
        bar.close()
        if not done:
            self._guard(lambda it=it: next(it, None))  # reads the end of cycle, frees the cycle
        return n, done

    def _end_of_cycle(self, cycle: Cycle, n: int, dt: float, wait0: float) -> None:
        """The cycle's metrics record and log line, and its checkpoint when one is due."""
        t = self.cfg.training
        waited = self.feed.stats.wait_s - wait0
        record = {
            "event": "cycle",
            "cycle": cycle.index,
            "batches": n,
            "samples": n * self.spec.batch_size,
            "seconds": dt,  # with samples: what a failed run's totals add up (lensfeed metrics)
            "samples_per_s": n * self.spec.batch_size / dt if dt > 0 else 0.0,
            "wait_s": waited,
            "wait_share": waited / dt if dt > 0 else 0.0,
            "wraps": cycle.wraps,
            "feed_reconnects": self.feed.stats.reconnects,
            "feed_recovery_s": self.feed.stats.recovery_s,
            "total_wraps": int(cycle.meta["total_wraps"]),
            "regen_s": cycle.regen_s,
            "prepared_ahead": bool(cycle.meta["prepared_ahead"]),
            "loss": self._last_loss,
        }
        self.metrics.write(record)
        if t.checkpoint_every_cycles and (cycle.index + 1) % t.checkpoint_every_cycles == 0:
            self._save()
        log.info(
            "rank %d cycle %d: %d batches, %.0f samples/s, waited %.3f s on data (%.1f%%), "
            "wraps %d (total %d), loss %.4f",
            self.rank,
            cycle.index,
            n,
            record["samples_per_s"],
            waited,
            100 * record["wait_share"],
            cycle.wraps,
            record["total_wraps"],
            self._last_loss,
        )

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(cfg: LensfeedConfig) -> int:
    """Train; returns the exit code. Failures of any rank end every rank with code 1."""
    trainer = None
    try:
        trainer = Trainer(cfg)
        summary = trainer.run()
        if trainer.rank == 0:
            log.info(
                "done: %d steps, %d samples, %.0f samples/s, %.1f%% of the time waiting on data",
                summary["steps"],
                summary["samples"],
                summary["samples_per_s"],
                100 * summary["wait_share"],
            )
        return 0
    except LensfeedError as exc:
        log.error("%s", exc)
        if trainer is not None and trainer.metrics is not None:
            trainer.metrics.write(failure_status(exc, steps=trainer.step, rank=trainer.rank))
        return 1
    finally:
        if trainer is not None:
            trainer.close()


__all__ = ["Metrics", "Trainer", "batch_digest", "run_training", "status_for"]
