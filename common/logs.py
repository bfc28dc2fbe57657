"""Logging set-up shared by the command-line entry points."""

from __future__ import annotations

import logging
import sys


def setup_logging(name: str, *, rank: int | None = None, level: int = logging.INFO) -> None:
    """One line per record on stderr, tagged with the process role and rank."""
    tag = name if rank is None else f"{name}[{rank}]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag} %(levelname)s %(message)s"))
    root = logging.getLogger("lensfeed")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


__all__ = ["setup_logging"]
