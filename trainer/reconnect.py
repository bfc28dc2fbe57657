"""Reaching the producer, first and after every loss, and resuming where the training loop is.

A module of its own because recovery runs on rules the rest of the client never sees: a
deadline of its own (``reconnect_timeout_s``, shared by recoveries that make no progress), a
backoff between attempts, repeated handshake failures read as a key mismatch
(:func:`~lensfeed.trainer.connection.count_failed_handshake`), and the memory of what the lost
session still owed the loop (an unanswered ``next_cycle``, the rest of the current cycle).
:class:`~lensfeed.trainer.client.FeedClient` reports losses and progress to a
:class:`Reconnector` and hands it the cursor; :class:`~lensfeed.trainer.session.Session` opens
each new session (docs/protocol.md 6.6).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Protocol

from lensfeed.common import protocol as P
from lensfeed.common.errors import ProducerLostError, ProducerTimeoutError
from lensfeed.trainer.connection import ProducerLost, backoff, count_failed_handshake
from lensfeed.trainer.credits import CreditWindow
from lensfeed.trainer.cursor import Cursor, resume_point
from lensfeed.trainer.cycles import Cycle, FeedStats
from lensfeed.trainer.session import Session

log = logging.getLogger("lensfeed.trainer")

#: Losses in a row without a batch that are all logged; after them, every _LOG_EVERY-th.
_LOUD_LOSSES = 3
_LOG_EVERY = 20


class Settings(Protocol):
    """What a :class:`Reconnector` reads from its client, at each use (so changes apply)."""

    timeout_s: float
    reconnect_timeout_s: float
    stats: FeedStats


class Reconnector:
    """Opens the client's sessions: the first one (:meth:`connect`), and a new one whenever the
    producer is lost (:meth:`recover`). See the module docstring."""

    def __init__(self, session: Session, credits: CreditWindow, settings: Settings) -> None:
        self.session = session
        self.credits = credits
        self.settings = settings
        #: When the producer was lost with no batch handed to the loop since: recoveries
        #: without progress share one reconnect_timeout_s (a producer that keeps dying, or
        #: keeps being dropped, cannot hold the loop forever). The client clears it on progress.
        self.lost_since: float | None = None
        #: recoveries since then that reached a producer but got no batch to the loop
        self.fruitless = 0
        self.asked: Cursor | None = None  # next_cycle sent, its cycle_start not taken
        self.resent: Cursor | None = None  # cycle_start owed to a recovery, not the loop

    def _open(self, cursor: Cursor, deadline: float) -> dict[str, Any]:
        """A new session from the cursor; whatever the old one was granted died with it."""
        return self.session.open(
            resume_point(self.session.spec, cursor),
            credits=self.credits.restart(),
            deadline=deadline,
            timeout_s=self.settings.timeout_s,
        )

    def connect(self, cursor: Cursor, current: Cycle | None) -> dict[str, Any]:
        """The first session, from ``cursor``; returns the producer's WELCOME fields.

        While nothing listens yet (the producer may start after us) it retries, with
        :func:`~lensfeed.trainer.connection.backoff`, for ``timeout_s``; a producer that was
        reached and lost again is recovered (:meth:`recover`).
        """
        deadline = time.monotonic() + self.settings.timeout_s
        failed_handshakes = 0
        for attempt in itertools.count():
            try:
                return self._open(cursor, deadline)
            except ProducerLost as lost:
                failed_handshakes = count_failed_handshake(lost, failed_handshakes)
                if lost.connected:
                    return self.recover(lost.cause, cursor, current)
                # Nothing listens there yet: the producer may start after us.
                if not backoff(attempt, deadline):
                    raise ProducerTimeoutError(
                        f"no answer to hello from the {self.session.where} within "
                        f"{self.settings.timeout_s:g} s ({lost.cause})"
                    ) from None
        raise AssertionError("unreachable")  # itertools.count() never ends

    def recover(self, cause: str, cursor: Cursor, current: Cycle | None) -> dict[str, Any]:
        """Reach the producer again and put the session back where the loop is (``cursor``,
        ``current``); returns the new WELCOME fields.

        The new hello carries the cursor (the next batch not yet handed to the loop), so the
        producer regenerates from there; what the old connection still had in flight died with
        its socket. The cycle being iterated is asked for again from the cursor (its
        ``cycle_start`` is owed to :attr:`resent`, not the loop), or an outstanding
        ``next_cycle`` is sent again. Gives up after ``reconnect_timeout_s`` with
        :class:`ProducerLostError`.
        """
        session, settings = self.session, self.settings
        t0 = time.monotonic()
        if self.lost_since is None:
            self.lost_since, self.fruitless = t0, 0
        else:  # lost again before a batch reached the loop
            self.fruitless += 1
        deadline = self.lost_since + settings.reconnect_timeout_s
        first = cause
        failed_handshakes = 0
        # A producer that drops every new session at once (e.g. sends a message over this
        # trainer's MAXMSGSIZE) must cost neither a reconnect storm nor a log line each time.
        loud = self.fruitless < _LOUD_LOSSES or self.fruitless % _LOG_EVERY == 0
        (log.warning if loud else log.debug)(
            "rank %d: lost the %s: %s; reconnecting (cursor: cycle %d, batch %d)%s",
            session.rank,
            session.where,
            cause,
            *resume_point(session.spec, cursor),
            f" [lost {self.fruitless} times since the last batch; every {_LOG_EVERY}th is logged]"
            if self.fruitless >= _LOUD_LOSSES
            else "",
        )
        if self.fruitless:
            backoff(self.fruitless - 1, deadline)
        for attempt in itertools.count():
            if time.monotonic() >= deadline or settings.reconnect_timeout_s <= 0:
                again = (
                    f"; it was reached {self.fruitless} times and lost again each time before "
                    "serving a batch (a producer whose messages exceed this trainer's "
                    "feed.max_message_bytes is dropped like that)"
                    if self.fruitless
                    else ""
                )
                raise ProducerLostError(
                    f"lost the {session.where} ({first}) and no producer served a batch within "
                    f"feed.reconnect_timeout_s={settings.reconnect_timeout_s:g} s (last: {cause})"
                    f"{again}"
                )
            try:
                welcome = self._open(cursor, deadline)
                break
            except ProducerLost as lost:
                cause = lost.cause
                failed_handshakes = count_failed_handshake(lost, failed_handshakes)
            except ProducerTimeoutError:
                cause = "no answer to hello"
            backoff(attempt, deadline)
        if current is not None and not current.done:
            cycle, batch = cursor
            if batch < current.num_batches:
                session.send(P.NEXT_CYCLE, {"cycle": cycle, "batch": batch})
                self.resent = (cycle, batch)
            else:  # every batch was handed over; only the cycle's end was still to come
                end = {"rank": session.rank, "cycle": cycle, "batches": current.num_batches}
                session.items.append((P.CYCLE_END, {**end, "regen_s": 0.0}))
        elif self.asked is not None:
            session.send(P.NEXT_CYCLE, {"cycle": self.asked[0], "batch": self.asked[1]})
        lost_s = time.monotonic() - t0
        settings.stats.reconnects += 1
        settings.stats.recovery_s += lost_s
        (log.warning if loud else log.debug)(
            "rank %d: reconnected to the %s after %.2f s (cause: %s); resuming at cycle %d, "
            "batch %d",
            session.rank,
            session.where,
            lost_s,
            first,
            *resume_point(session.spec, cursor),
        )
        return welcome


__all__ = ["Reconnector", "Settings"]
