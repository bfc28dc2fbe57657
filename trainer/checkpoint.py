"""Per-rank checkpoints: model, optimizer, feed cursor and step, one file per rank.

Layout: ``<checkpoint_dir>/step_00000042/rank0.pt``. ``resume=`` accepts a step directory or
the checkpoint directory itself (its newest complete step is used). Files are written to a
temporary name and renamed, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lensfeed.common.errors import LensfeedError


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def save(root: str | Path, *, step: int, rank: int, state: dict[str, Any]) -> Path:
    d = step_dir(root, step)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank{rank}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def resolve(path: str | Path, *, rank: int) -> Path:
    """The rank's checkpoint file under ``path`` (a step dir, or a root holding step dirs)."""
    p = Path(path)
    if (p / f"rank{rank}.pt").is_file():
        return p / f"rank{rank}.pt"
    steps = sorted(d for d in p.glob("step_*") if (d / f"rank{rank}.pt").is_file())
    if not steps:
        raise LensfeedError(f"resume={path}: no checkpoint for rank {rank} found there")
    return steps[-1] / f"rank{rank}.pt"


def load(path: str | Path, *, rank: int) -> dict[str, Any]:
    file = resolve(path, rank=rank)
    return torch.load(file, map_location="cpu", weights_only=True)


__all__ = ["load", "resolve", "save", "step_dir"]
