"""The one place that reads the launcher's environment (torchrun / docker) for rank settings."""

from __future__ import annotations

import os


def env_rank(default: int | None = None) -> int | None:
    """``RANK``, else ``LOCAL_RANK``, else ``default`` (torchrun sets both)."""
    for key in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value not in (None, ""):
            return int(value)
    return default


def env_world_size(default: int = 1) -> int:
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else default


def env_local_rank(default: int = 0) -> int:
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value else default


__all__ = ["env_local_rank", "env_rank", "env_world_size"]
