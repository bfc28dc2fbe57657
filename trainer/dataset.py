"""The feed as a ``torch.utils.data.IterableDataset``: one cycle per epoch, batches already made.

::

    ds = FeedDataset(cfg, rank, device="cuda:0")
    loader = DataLoader(ds, batch_size=None)        # batches arrive batched: no re-batching
    for epoch in range(cfg.training.num_cycles):   # one epoch = one regenerated cycle
        for batch in loader:
            ...
        ckpt["data"] = ds.state_dict()             # the feed cursor (torchdata Stateful)

Each rank reads its own producer, so nothing may split or re-batch the stream: use
``batch_size=None``, ``num_workers=0`` (the feed already prefetches in the background; a worker
process would only add a copy) and no ``DistributedSampler``. ``state_dict``/
``load_state_dict`` carry the cursor, so a stateful loader (torchdata's
``StatefulDataLoader``) or a checkpoint resumes at the next batch, mid-epoch included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lensfeed.common.errors import LensfeedError
from lensfeed.common.spec import DataSpec
from lensfeed.trainer.client import Cycle, FeedClient

if TYPE_CHECKING:
    from lensfeed.common.config import LensfeedConfig


class FeedDataset(IterableDataset):
    """Rank ``rank``'s feed; each ``iter()`` yields the batches of the next cycle (the rest of
    the current one, if an epoch was cut short or the state was loaded mid-cycle).

    ``num_cycles`` (default ``cfg.training.num_cycles``) ends the stream: an ``iter()`` after
    the last cycle yields nothing. Keyword arguments go to :meth:`FeedClient.from_config`.
    """

    def __init__(
        self,
        cfg: LensfeedConfig,
        rank: int,
        *,
        device: torch.device | str = "cpu",
        num_cycles: int | None = None,
        **client_kwargs: Any,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.device = device
        self.num_cycles = cfg.training.num_cycles if num_cycles is None else num_cycles
        self.client_kwargs = client_kwargs
        self._client: FeedClient | None = None
        self._state: dict[str, Any] | None = None
        self._cycle: Cycle | None = None
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    @property
    def client(self) -> FeedClient:
        """The rank's :class:`FeedClient`, made on first use (in the process that iterates)."""
        if self._client is None:
            info = get_worker_info()
            if info is not None:
                raise LensfeedError(
                    "FeedDataset is one rank's stream: use DataLoader(..., num_workers=0) "
                    f"(got {info.num_workers} worker(s): a worker holds the cursor, so each "
                    "epoch would start again from a fresh copy and state_dict() would not move)"
                )
            client = FeedClient.from_config(
                self.cfg, self.rank, device=self.device, **self.client_kwargs
            )
            if self._state is not None:
                client.load_state_dict(self._state)
            self._client = client
        return self._client

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        client = self.client
        if self._cycle is not None and self._cycle.exhausted:  # cut short after its last batch
            for _ in self._batches or ():  # reads the cycle's end: nothing is left to yield
                pass
            self._batches = self._cycle = None
        if self._batches is None:  # no epoch cut short: start the next cycle
            if client.state_dict()["cycle"] >= self.num_cycles:
                return
            self._cycle = client.next_cycle()
            self._batches = iter(self._cycle)
        # A for loop, not ``yield from``: an epoch cut short (the loop broke out) must leave
        # the cycle's iterator open, so the next epoch continues it.
        for batch in self._batches:  # noqa: UP028 (see above)
            yield batch
        self._batches = self._cycle = None

    def state_dict(self) -> dict[str, Any]:
        """The feed cursor: the next batch the loop has not consumed (JSON-able)."""
        if self._client is not None:
            return self._client.state_dict()
        if self._state is not None:
            return dict(self._state)
        return FeedClient.feed_state(DataSpec.from_config(self.cfg), self.rank)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (before the first batch is taken)."""
        if self._client is not None:
            raise LensfeedError("load_state_dict() must be called before iterating the dataset")
        self._state = dict(state)

    def close(self) -> None:
        """Say goodbye to the producer and release the socket."""
        if self._client is not None:
            self._state = self._client.state_dict()  # still reported, and resumed from
            self._client.close()
            self._client = None
        self._batches = self._cycle = None


__all__ = ["FeedDataset"]
