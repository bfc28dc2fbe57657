"""What the trainer writes to its JSONL metrics: the per-rank file, and the final status
record (``training_status``, the failing rank and its cause)."""

from __future__ import annotations

import json
import time
from typing import Any

from lensfeed.common.errors import LensfeedError, RankFailedError
from lensfeed.common.metrics import metrics_file

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


def failure_status(exc: LensfeedError, *, steps: int, rank: int = -1) -> dict[str, Any]:
    """The failure status record: the failing rank and its cause (this rank's own failure, or
    the one every rank learnt from the vote; an error that blames no rank says -1)."""
    failed = exc if isinstance(exc, RankFailedError) else None
    code = failed.failed_code if failed else exc.code
    return {
        "event": "status",
        "training_status": status_for(code),
        "failed_rank": getattr(exc, "failed_rank", rank),
        "code": code,
        "message": failed.failed_message if failed else str(exc),
        "steps": steps,
    }


__all__ = ["STATUS_OK", "Metrics", "failure_status", "status_for"]
