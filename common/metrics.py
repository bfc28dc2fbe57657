"""Where the trainer's JSONL metrics live: one file per rank, shared by trainer and demo."""

from __future__ import annotations

from pathlib import Path


def metrics_file(metrics_path: str | Path, rank: int) -> Path:
    """Rank 0 writes ``metrics_path``, rank r ``<stem>.rank<r><suffix>``
    (``trainer.records.Metrics``)."""
    p = Path(metrics_path)
    return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


__all__ = ["metrics_file"]
