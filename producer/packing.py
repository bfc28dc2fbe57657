"""How prepared batches become messages: several consecutive batches per BATCH message.

Every message costs the same fixed work on both sides whatever its size (header, send, receive,
decode, a Python frame or two), so small batches travel together; large ones travel alone. The
prefetcher already gathers a message's worth of batches in one step (a *chunk*), so packing is
mostly cutting: chunks go out as they are, larger ones are split into views, and only small
whole chunks (one small batch each, from a transform) are stacked, a copy that saves a message
each.
"""

from __future__ import annotations

import numpy as np
import torch

from lensfeed.common.errors import ConfigError
from lensfeed.producer.ahead import Ready
from lensfeed.producer.source import Batch

#: With ``feed.batches_per_message: 0``, batches are packed up to about this many bytes ...
#: (measured, shuffled (64, 2048) tokens: 1/2/4/8/16/32 batches per message = 0.5-16 MiB gave
#: ~240k/290k/340k/370k/450k/360k samples/s; see docs/performance.md)
AUTO_MESSAGE_BYTES = 8 << 20
#: ... and at most this many batches.
AUTO_MAX_BATCHES = 64
#: Separately built batches are stacked into one message (a copy) only up to this many bytes:
#: beyond it the copy costs more than the messages it saves (two 4 MiB activation batches per
#: message ran ~8% slower than one).
STACK_MAX_BYTES = 1 << 20


def auto_batches_per_message(batch_nbytes: int) -> int:
    """What ``feed.batches_per_message: 0`` packs for batches of ``batch_nbytes``: about
    :data:`AUTO_MESSAGE_BYTES` (the nearest count, so 512 KiB token batches plus their
    ``sample_idx`` pack 16, not 15), at most :data:`AUTO_MAX_BATCHES`, at least 1."""
    n = (AUTO_MESSAGE_BYTES + batch_nbytes // 2) // max(1, batch_nbytes)
    return max(1, min(AUTO_MAX_BATCHES, n))


def message_batches(batches_per_message: int, batch_nbytes: int) -> int:
    """Batches per message for a configured ``feed.batches_per_message`` (0 = auto) and a
    batch size in bytes (0 = not known before the first batch: 1 until then)."""
    if batches_per_message:
        return batches_per_message
    return auto_batches_per_message(batch_nbytes) if batch_nbytes > 0 else 1


def stack(batches: list[Batch]) -> Batch:
    """One message's tensors: consecutive batches concatenated along dim 0."""
    if len(batches) == 1:
        return batches[0]
    out: Batch = {}
    for name, first in batches[0].items():
        parts = [b[name] for b in batches]
        out[name] = torch.cat(parts) if isinstance(first, torch.Tensor) else np.concatenate(parts)
    return out


class Packer:
    """Groups a stream of :class:`Ready` items into messages for one trainer session.

    ``batches_per_message`` 0 = auto: sized from ``batch_nbytes`` when the source knows it, else
    from the first batch that comes through.
    """

    def __init__(
        self, batches_per_message: int = 0, batch_nbytes: int = 0, *, max_bytes: int = 0
    ) -> None:
        self.auto = batches_per_message == 0 and batch_nbytes <= 0
        self.pack = (
            AUTO_MAX_BATCHES if self.auto else message_batches(batches_per_message, batch_nbytes)
        )
        #: the trainer's limit on a message's tensor bytes (0 = none): its libzmq drops a
        #: bigger frame with the connection, which looks like a lost producer, so no message
        #: may exceed it, whatever the packing asks for
        self.max_bytes = max_bytes
        if batch_nbytes > 0:
            self._fit(batch_nbytes)
        #: send the next batch in a message of its own (set when a cycle starts: the training
        #: loop is blocked on that batch, the rest follows in full-size messages)
        self.first_alone = False

    def _fit(self, batch_nbytes: int) -> None:
        """Cap ``pack`` at what the trainer's message limit holds; one batch over it cannot
        be sent at all."""
        if not self.max_bytes:
            return
        if batch_nbytes > self.max_bytes:
            raise ConfigError(
                f"a batch of {batch_nbytes} bytes exceeds the trainer's message limit of "
                f"{self.max_bytes} bytes (feed.max_message_bytes): raise it or lower batch_size"
            )
        self.pack = min(self.pack, self.max_bytes // batch_nbytes)

    def groups(self, items: list[Ready]) -> list[list[Ready]]:
        """Consecutive batches of one cycle, at most ``pack`` per message; cycle ends and
        errors travel alone. Never reorders."""
        out: list[list[Ready]] = []
        packed = 0  # batches in out[-1]
        packed_bytes = 0  # and their bytes
        for item in items:
            if item.kind != "batch":
                out.append([item])
                packed = packed_bytes = 0
                continue
            if self.auto and item.nbytes:
                self.pack = min(self.pack, auto_batches_per_message(item.nbytes // item.count))
                self.auto = False
            if self.max_bytes and item.nbytes:
                self._fit(-(-item.nbytes // item.count))
            if self.first_alone:
                self.first_alone = False
                if item.count > 1:
                    head, item = item.split(1)
                    out.append([head])
                else:
                    out.append([item])
                    packed = self.pack  # nothing joins it
                    continue
            while item.count > self.pack:
                head, item = item.split(self.pack)
                out.append([head])
                packed, packed_bytes = head.count, head.nbytes
            last = out[-1] if out else None
            if (
                last is not None
                and last[0].kind == "batch"
                and packed + item.count <= self.pack
                and last[-1].cycle == item.cycle
                and not (item.fragment or last[-1].fragment)
                and packed_bytes + item.nbytes <= STACK_MAX_BYTES
                and (not self.max_bytes or packed_bytes + item.nbytes <= self.max_bytes)
            ):
                last.append(item)
                packed += item.count
                packed_bytes += item.nbytes
            else:
                out.append([item])
                packed, packed_bytes = item.count, item.nbytes
        return out


__all__ = [
    "AUTO_MAX_BATCHES",
    "AUTO_MESSAGE_BYTES",
    "STACK_MAX_BYTES",
    "Packer",
    "auto_batches_per_message",
    "message_batches",
    "stack",
]
