"""Bounded bookkeeping of misbehaving peers: how often they are answered, how much is logged.

A peer that floods a producer with bad messages must not grow its log, its memory or its send
queues without bound, nor crowd out the trainer it serves. Each peer gets a token bucket of
error replies (and all peers together a second one), and bad messages are logged in detail only
up to a per-minute budget; the rest are counted and summarised once a minute.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict

log = logging.getLogger("lensfeed.producer")


class _Bucket:
    __slots__ = ("tokens", "last")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.last = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class PeerGuard:
    """Rate limits for answering and logging bad messages, with bounded state per peer."""

    def __init__(
        self,
        *,
        replies_per_s: float = 20.0,
        reply_burst: float = 50.0,
        total_replies_per_s: float = 200.0,
        log_lines_per_min: int = 20,
        summary_every_s: float = 60.0,
        max_peers: int = 1024,
        clock=time.monotonic,
    ) -> None:
        self.rate, self.burst = replies_per_s, reply_burst
        self.total_rate = total_replies_per_s
        self.log_budget = log_lines_per_min
        self.summary_every_s = summary_every_s
        self.max_peers = max_peers
        self.clock = clock
        now = clock()
        self._buckets: OrderedDict[bytes, _Bucket] = OrderedDict()
        self._total = _Bucket(total_replies_per_s, now)
        self._window_start = now
        self._logged = 0
        self._counts: Counter[bytes] = Counter()  # bad messages this window, per peer (bounded)
        self._bad = 0
        self._unlogged = 0
        self._dropped_replies = 0
        #: Every bad message seen since start (for tests and the final log line).
        self.total_bad = 0

    def may_reply(self, peer: bytes) -> bool:
        """Whether ``peer`` may get an error reply now (else it is dropped and counted)."""
        now = self.clock()
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(self.burst, now)
            if len(self._buckets) > self.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        if bucket.take(self.rate, self.burst, now) and self._total.take(
            self.total_rate, self.total_rate, now
        ):
            return True
        self._dropped_replies += 1
        return False

    def bad(self, peer: bytes, what: str, *args: object) -> None:
        """Count one bad message from ``peer``; log it (``what % args``) while the budget lasts."""
        self.total_bad += 1
        self._bad += 1
        if peer in self._counts or len(self._counts) < self.max_peers:
            self._counts[peer] += 1
        self.tick()
        if self._logged < self.log_budget:
            self._logged += 1
            log.warning("peer %s: " + what, peer.hex(), *args)
            if self._logged == self.log_budget:
                log.warning(
                    "more bad messages are counted, not logged, until the next summary (%.0f s)",
                    self.summary_every_s,
                )
        else:
            self._unlogged += 1

    def tick(self) -> None:
        """Log the window's summary when it is due and anything was suppressed; cheap otherwise."""
        now = self.clock()
        if now - self._window_start < self.summary_every_s:
            return
        if self._unlogged or self._dropped_replies:
            top = ", ".join(f"{p.hex()}: {n}" for p, n in self._counts.most_common(3))
            log.warning(
                "%d bad messages from %d peers in the last %.0f s (%d not logged, %d not "
                "answered); most from %s",
                self._bad,
                len(self._counts),
                now - self._window_start,
                self._unlogged,
                self._dropped_replies,
                top,
            )
        self._window_start = now
        self._logged = self._bad = self._unlogged = self._dropped_replies = 0
        self._counts.clear()


__all__ = ["PeerGuard"]
