"""The client's credit window: how many batches its producer may have sent ahead of the loop.

It starts small and, once the first batch shows its size, becomes ``prefetch_bytes / batch
size`` (at most ``prefetch``): deep for small batches, shallow for 32 MiB activations. Credit
is topped up in groups of a quarter window, and always before the client blocks.
"""

from __future__ import annotations

#: Messages libzmq may queue for the client beyond its credit window (``RCVHWM`` = window +
#: this, set again when the first batch sizes the window). Every batch message spends >= 1
#: credit, so a conforming producer never has more than the window queued, plus a few control
#: messages. Not smaller: at ``RCVHWM`` libzmq stops reading the connection, heartbeats
#: included, so a long training step over a full queue would end in a heartbeat timeout. A rogue
#: producer is stopped at its first batch beyond its credits; by then libzmq holds at most this
#: many messages (of at most ``feed.max_message_bytes`` per frame).
QUEUE_SLACK = 16


class CreditWindow:
    """Batches granted to and consumed from the producer, and how many more to grant."""

    def __init__(self, prefetch: int, prefetch_bytes: int) -> None:
        self.prefetch = prefetch
        self.prefetch_bytes = prefetch_bytes
        self.window = min(prefetch, 4)
        self.sized = False
        self.granted = self.window
        self.consumed = 0

    def restart(self) -> int:
        """A new session: what the old one was granted died with it. Returns hello's credits."""
        self.granted = self.consumed + self.window
        return self.window

    def due(self, *, force: bool) -> int:
        """Credit to grant now (0: none yet): the deficit, once it reaches a quarter window."""
        deficit = self.window - (self.granted - self.consumed)
        if deficit > 0 and (force or deficit >= max(1, self.window // 4)):
            return deficit
        return 0

    @property
    def max_queued(self) -> int:
        """Messages libzmq may queue for this window (``RCVHWM``)."""
        return self.window + QUEUE_SLACK

    def size(self, batch_bytes: int) -> bool:
        """The first batch's size sets the window (once); True when that happened now."""
        if self.sized:
            return False
        self.sized = True
        fit = self.prefetch_bytes // max(1, batch_bytes)
        self.window = max(1, min(self.prefetch, fit))
        return True


__all__ = ["QUEUE_SLACK", "CreditWindow"]
