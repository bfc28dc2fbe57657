"""The reference DDP trainer: rank r pulls rank r's batches and trains a toy model on them.

It shows how a real loop uses the feed: ask for each cycle explicitly, keep ranks in lockstep
(same batch count per cycle), stop all ranks together on any failure, checkpoint the feed cursor
with the model, and resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lensfeed.common.config import LensfeedConfig
from lensfeed.common.env import env_local_rank
from lensfeed.common.errors import ConfigError, LensfeedError, RankFailedError
from lensfeed.common.metrics import metrics_file
from lensfeed.common.spec import DataSpec
from lensfeed.trainer import checkpoint
from lensfeed.trainer.client import FeedClient
from lensfeed.trainer.device import resolve_device
from lensfeed.trainer.lockstep import agree, check_same, init_process_group
from lensfeed.trainer.models import build_model

log = logging.getLogger("lensfeed.trainer")

#: Status values of the final metrics record (the original's ``training_status``).
STATUS_OK = "ok"
_STATUS_BY_CODE = {"empty_shard": "error_empty_cache_regen"}


def status_for(code: str) -> str:
    return _STATUS_BY_CODE.get(code, f"error_{code}")


class Metrics:
    """Append-only JSONL metrics; rank 0 writes ``metrics_path``, rank r ``<stem>.rank<r>``."""

    def __init__(self, path: str, rank: int) -> None:
        p = metrics_file(path, rank)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self.rank = rank

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"rank": self.rank, "time": time.time(), **record}) + "\n")


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
        if self.world != cfg.world_size:
            raise ConfigError(
                f"'world_size' is {cfg.world_size} in the config but the trainer runs with "
                f"{self.world} processes; set world_size={self.world} or change --nproc_per_node"
            )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.spec = DataSpec.from_config(cfg)
        self.metrics = Metrics(cfg.training.metrics_path, self.rank)
        self.feed = FeedClient(
            cfg.endpoint_for(self.rank),
            rank=self.rank,
            spec=self.spec,
            device=self.device,
            prefetch=cfg.feed.prefetch,
            prefetch_bytes=cfg.feed.prefetch_bytes,
            timeout_s=cfg.feed.timeout_s,
            max_message_bytes=cfg.feed.max_message_bytes,
            cleanup_each_cycle=cfg.training.empty_cache_each_cycle,
        )
        self.model: torch.nn.Module | None = None
        self.ddp: torch.nn.Module | None = None
        self.optim: torch.optim.Optimizer | None = None
        self.step = 0
        self._resume_state: dict[str, Any] | None = None
        if cfg.training.resume:
            self._resume_state = checkpoint.load(cfg.training.resume, rank=self.rank)
            self.feed.load_state_dict(self._resume_state["feed"])
            self.step = int(self._resume_state["step"])
            log.info(
                "rank %d: resuming at step %d, feed %s",
                self.rank,
                self.step,
                self._resume_state["feed"],
            )

    # ---------------------------------------------------------------- pieces

    def _ensure_model(self, batch: dict[str, torch.Tensor]) -> None:
        if self.model is not None:
            return
        t = self.cfg.training
        self.model = build_model(batch, vocab_size=t.vocab_size, d_model=t.d_model).to(self.device)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=t.lr)
        if self._resume_state is not None:
            self.model.load_state_dict(self._resume_state["model"])
            self.optim.load_state_dict(self._resume_state["optim"])
        self.ddp = DDP(self.model) if dist.is_initialized() else self.model

    def _train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self._ensure_model(batch)
        assert self.ddp is not None
        assert self.optim is not None
        loss = self.ddp(batch)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        return float(loss.detach())

    def _save(self) -> None:
        if self.model is None or self.optim is None:
            return
        state = {
            "model": self.model.state_dict(),
            "optim": self.optim.state_dict(),
            "feed": self.feed.state_dict(),
            "step": self.step,
        }
        path = checkpoint.save(
            self.cfg.training.checkpoint_dir, step=self.step, rank=self.rank, state=state
        )
        log.info("rank %d: checkpoint %s", self.rank, path)

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
        t = self.cfg.training
        max_steps = t.max_steps or None
        t_start = time.perf_counter()
        samples = 0
        last_loss = float("nan")
        done = False
        while not done and self.feed.state_dict()["cycle"] < t.num_cycles:
            cycle = self._guard(self.feed.next_cycle)
            check_same(cycle.remaining, what=f"batches in cycle {cycle.index}", device=self.device)
            it = iter(cycle)
            c_start, c_wait0 = time.perf_counter(), self.feed.stats.wait_s
            bar = tqdm(
                total=cycle.remaining,
                desc=f"cycle {cycle.index}",
                disable=not t.progress or self.rank != 0,
                leave=False,
            )
            n = 0
            for j in range(cycle.remaining):
                batch = self._guard(lambda it=it: next(it))
                last_loss = self._train_step(batch)
                self.step += 1
                samples += self.spec.batch_size
                n += 1
                bar.update(1)
                if self.cfg.training.log_batches:
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
                if max_steps is not None and self.step >= max_steps:
                    done = True
                    break
            bar.close()
            if not done:
                self._guard(lambda it=it: next(it, None))  # reads the end of cycle, frees the cycle
            dt = time.perf_counter() - c_start
            waited = self.feed.stats.wait_s - c_wait0
            record = {
                "event": "cycle",
                "cycle": cycle.index,
                "batches": n,
                "samples_per_s": n * self.spec.batch_size / dt if dt > 0 else 0.0,
                "wait_s": waited,
                "wait_share": waited / dt if dt > 0 else 0.0,
                "wraps": cycle.wraps,
                "total_wraps": int(cycle.meta["total_wraps"]),
                "regen_s": cycle.regen_s,
                "prepared_ahead": bool(cycle.meta["prepared_ahead"]),
                "loss": last_loss,
            }
            self.metrics.write(record)
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
                last_loss,
            )
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
            "loss": last_loss,
        }
        self.metrics.write(summary)
        return summary

    def close(self) -> None:
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
        failed = exc if isinstance(exc, RankFailedError) else None
        code = failed.failed_code if failed else exc.code
        log.error("%s", exc)
        if trainer is not None:
            trainer.metrics.write(
                {
                    "event": "status",
                    "training_status": status_for(code),
                    "failed_rank": failed.failed_rank if failed else trainer.rank,
                    "code": code,
                    "message": failed.failed_message if failed else str(exc),
                    "steps": trainer.step,
                }
            )
        return 1
    finally:
        if trainer is not None:
            trainer.close()


__all__ = ["Metrics", "Trainer", "batch_digest", "run_training", "status_for"]
