"""What a training loop holds while it consumes the feed: its counters and the current cycle."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lensfeed.trainer.client import FeedClient


@dataclass
class FeedStats:
    """Counters a training loop reports: how much it got, and how long it waited for it.

    Cumulative since the client was created, and only plain numbers, so any logger takes them
    as a dict: ``feed.stats.as_dict("feed/")`` (or ``dataclasses.asdict(feed.stats)``) for
    ``wandb.log``, TensorBoard's ``add_scalar`` per key, or a JSON metrics record.
    """

    batches: int = 0
    samples: int = 0
    bytes: int = 0
    wait_s: float = 0.0
    cleanups: int = 0
    #: Times a lost producer was reached again, and the seconds those recoveries took.
    reconnects: int = 0
    recovery_s: float = 0.0

    def as_dict(self, prefix: str = "") -> dict[str, int | float]:
        """A snapshot of the counters, each key ``prefix + name`` (e.g. ``feed/wait_s``)."""
        return {prefix + name: value for name, value in vars(self).items()}


@dataclass
class Cycle:
    """One regenerated cycle: iterate it for its batches (from ``start_batch`` on a resume)."""

    index: int
    num_batches: int
    start_batch: int
    meta: dict[str, Any]
    _client: FeedClient = field(repr=False)
    wait_s: float = 0.0
    regen_s: float = 0.0
    done: bool = False
    #: ``iter()`` was called: a cycle has one iterator (a second would replay sent batches).
    opened: bool = field(default=False, repr=False)

    @property
    def remaining(self) -> int:
        return self.num_batches - self.start_batch

    @property
    def wraps(self) -> int:
        return int(self.meta["wraps"])

    @property
    def exhausted(self) -> bool:
        """Every batch has been handed to the loop (only the producer's end may be pending)."""
        return self.done or self._client._normalized_cursor()[0] > self.index

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._client._open_cycle(self)


__all__ = ["Cycle", "FeedStats"]
