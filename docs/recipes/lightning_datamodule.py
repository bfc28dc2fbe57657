"""PyTorch Lightning: each rank's LightningDataModule reads that rank's lensfeed producer.

Copy this into your project. The points that matter:

* ``FeedDataset`` is already one rank's stream of whole batches: ``DataLoader(batch_size=None)``
  and ``Trainer(use_distributed_sampler=False)``, so Lightning neither re-batches nor shards it.
* One Lightning epoch is one regenerated cycle: ``max_epochs = training.num_cycles``.
* ``state_dict``/``load_state_dict`` put the feed cursor in Lightning's checkpoints, so
  ``trainer.fit(..., ckpt_path=...)`` resumes the stream where the model left it.
* Under ``torchrun``, ``devices``/``num_nodes`` must come from its environment: Lightning's
  default on a CPU host is one device, which makes every process global rank 0 (all reading
  producer 0). Checkpoints go under ``training.checkpoint_dir``, not the working directory;
  they hold rank 0's feed cursor, which every rank resumes at (the ranks are in lockstep).

Run it against running producers (``lensfeed produce --config CONFIG --ranks 0-1``):
``torchrun --nproc_per_node 2 docs/recipes/lightning_datamodule.py CONFIG``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lensfeed import load_config
from lensfeed.common.config import LensfeedConfig
from lensfeed.trainer.dataset import FeedDataset


class FeedDataModule(L.LightningDataModule):
    """Rank ``trainer.global_rank``'s feed, one cycle per epoch."""

    def __init__(self, cfg: LensfeedConfig, **client_kwargs: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.client_kwargs = client_kwargs
        self.dataset: FeedDataset | None = None
        self._state: dict[str, Any] | None = None

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        self.dataset = FeedDataset(self.cfg, rank, **self.client_kwargs)
        if self._state is not None:
            # A checkpoint holds rank 0's state and every rank loads it; ranks train in
            # lockstep, so rank 0's cursor is every rank's.
            self.dataset.load_state_dict({**self._state, "rank": rank})
        return DataLoader(self.dataset, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict() if self.dataset is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state or None

    def teardown(self, stage: str) -> None:
        if self.dataset is not None:
            self.dataset.close()


class TinyLM(L.LightningModule):
    """Stand-in model: next-token embedding regression on the token ids."""

    def __init__(self, vocab_size: int = 256, d_model: int = 32) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, d_model)
        self.out = torch.nn.Linear(d_model, vocab_size)

    def training_step(self, batch: dict[str, torch.Tensor], _idx: int) -> torch.Tensor:
        ids = batch["input_ids"].long() % self.emb.num_embeddings
        logits = self.out(self.emb(ids[:, :-1]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(config: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    # torchrun's processes, CPU or GPU: one device each, ranks as torchrun numbers them.
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    world = int(os.environ.get("WORLD_SIZE", 1))
    trainer = L.Trainer(
        max_epochs=cfg.training.num_cycles,  # one epoch = one cycle
        use_distributed_sampler=False,  # each rank already has its own stream
        accelerator="auto",
        devices=devices,
        num_nodes=world // devices,
        strategy="ddp" if world > 1 else "auto",
        default_root_dir=Path(cfg.training.checkpoint_dir) / "lightning",
        logger=False,
        enable_progress_bar=False,
    )
    trainer.fit(TinyLM(), datamodule=FeedDataModule(cfg))


if __name__ == "__main__":
    main(*sys.argv[1:])
