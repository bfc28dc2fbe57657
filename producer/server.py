"""The producer's ZeroMQ side: handshake, credit-based sending, cycle requests, errors.

One ROUTER socket serves one trainer rank at a time (a new HELLO replaces a dead session, which
is how a restarted trainer resumes). Batches leave only while the trainer has granted credits,
so at most ``prefetch`` batches are ever in flight and neither side's memory grows.

Every message is hostile until validated: no message from any peer ends or stalls the producer.
A bad one is answered (at a bounded rate) and logged (within a budget, :mod:`.peers`); an
unexpected exception while handling one is contained to that message.
"""

from __future__ import annotations

import logging
import time

import zmq

from lensfeed.common import protocol as P
from lensfeed.common.config import MAX_PREFETCH, FeedConfig
from lensfeed.common.errors import ConfigError, LensfeedError, ProtocolError, StateMismatchError
from lensfeed.common.spec import DataSpec
from lensfeed.producer.ahead import Prefetcher, Ready
from lensfeed.producer.listener import bind_socket
from lensfeed.producer.packing import Packer, message_batches, stack
from lensfeed.producer.peers import PeerGuard
from lensfeed.producer.replies import (
    peers_trusted,
    send_error,
    send_frames,
    session_of,
    user_id_of,
)
from lensfeed.producer.source import BatchSource

log = logging.getLogger("lensfeed.producer")

#: Poll interval of the server loop; bounds how late a shutdown or idle check can be.
_TICK_S = 0.05
#: Most incoming messages handled before the loop serves batches again: a flood of messages
#: (from anyone) cannot stall the trainer being served.
_MAX_MESSAGES_PER_TICK = 256


class ProducerServer:
    """Serves ``source`` to one trainer rank; :meth:`serve` returns the process exit code."""

    def __init__(self, source: BatchSource, *, sock: zmq.Socket, feed: FeedConfig) -> None:
        self.source = source
        self.spec: DataSpec = source.spec
        self.rank = source.rank
        self.sock = sock
        self.feed = feed
        self.ahead = Prefetcher(
            source,
            max_batches=feed.max_ahead_batches,
            max_bytes=feed.max_ahead_bytes,
            prepare_ahead=feed.prepare_ahead,
            chunk=message_batches(feed.batches_per_message, self._batch_nbytes),
        )
        self.peer: bytes | None = None
        self.last_peer: bytes | None = None  # a dropped session may still say goodbye
        self.packer = Packer()  # replaced at each hello
        self.session: int | None = None  # the hello's ``session``, echoed in every message
        self.credits = 0
        self.seq = 0
        self.serving: int | None = None  # cycle being sent
        self.expected: tuple[int, int] | None = None  # next (cycle, batch) the prefetcher yields
        self.batches_sent = 0
        self.bytes_sent = 0
        self._stop: int | None = None
        #: Whether peers are authenticated (CURVE or a private ipc directory): refusals to
        #: others name the fields that differ, never this producer's values or paths.
        self.trusted = peers_trusted(sock)
        #: The authenticated key (CURVE User-Id) that owns the session; only it may take over.
        self.owner: str | None = None
        self.guard = PeerGuard()

    @property
    def _batch_nbytes(self) -> int:
        """The source's batch size in bytes when known before building one (else 0)."""
        return int(getattr(self.source, "batch_nbytes", 0))

    def stop(self) -> None:
        """Ask :meth:`serve` to return 0 at its next tick (used by in-process fakes)."""
        self._stop = 0

    def close(self) -> None:
        self.ahead.close()
        self.source.close()

    # ---------------------------------------------------------------- main loop

    def serve(self) -> int:
        try:
            return self._serve()
        except Exception as exc:  # tell the trainer before dying, never leave it waiting
            log.exception("rank %d: producer failed", self.rank)
            if self.peer is not None:
                try:
                    send_error(self.sock, self.peer, exc, fatal=True, session=self.session)
                except zmq.ZMQError:
                    pass
            return 1

    def _serve(self) -> int:
        last_msg = time.monotonic()
        try:
            while self._stop is None:
                timeout_ms = int(_TICK_S * 1000)
                if self.peer is not None and self.serving is not None:
                    # Without credit only a cycle end or an error may go out: don't wait then.
                    wait = _TICK_S if self.credits > 0 else 0.0
                    items = self.ahead.get(wait, max_batches=self.credits)
                    try:
                        groups = self.packer.groups(items)
                    except ConfigError as exc:  # a batch over this trainer's message limit
                        self._end_session(exc)
                        groups = []
                    for group in groups:
                        self._emit(group)
                        if self.peer is None or self._stop is not None:
                            break
                    if items or self.credits > 0:
                        timeout_ms = 0
                handled = 0
                while (
                    self._stop is None
                    and handled < _MAX_MESSAGES_PER_TICK
                    and self.sock.poll(timeout_ms)
                ):
                    timeout_ms = 0
                    handled += 1
                    frames = self.sock.recv_multipart(copy=False)
                    last_msg = time.monotonic()
                    self._handle(frames[0].bytes, frames[1:])
                self.guard.tick()
                idle = self.feed.idle_timeout_s
                if idle > 0 and time.monotonic() - last_msg > idle:
                    log.error("rank %d: no trainer message for %.0f s; exiting", self.rank, idle)
                    return 2
            return self._stop
        finally:
            self.close()

    def _emit(self, group: list[Ready]) -> None:
        assert self.peer is not None
        item = group[0]
        if item.kind == "error":
            err = item.error
            assert err is not None
            log.error("rank %d: regeneration failed in cycle %d: %s", self.rank, item.cycle, err)
            send_error(self.sock, self.peer, err, fatal=True, session=self.session)
            self._stop = 1
            return
        if item.kind == "end":
            info = self.source.cycle_info(item.cycle)
            fields = {
                "rank": self.rank,
                "cycle": item.cycle,
                "batches": info.batches,
                "regen_s": item.regen_s,
            }
            self._deliver(P.encode(P.CYCLE_END, self._stamp(fields)))
            self.expected = (item.cycle + 1, 0)
            self.serving = None
            return
        data = stack([g.data for g in group if g.data is not None])
        count = sum(g.count for g in group)
        fields = {
            "rank": self.rank,
            "cycle": item.cycle,
            "batch": item.batch,
            "count": count,
            "seq": self.seq,
        }
        self._deliver(P.encode(P.BATCH, self._stamp(fields), data))
        self.seq += 1
        self.credits -= count
        self.batches_sent += count
        self.bytes_sent += sum(g.nbytes for g in group)
        self.expected = (item.cycle, item.batch + count)

    def _stamp(self, fields: dict) -> dict:
        """Echo the session's number (when its hello gave one) in a message of the session."""
        if self.session is not None:
            fields[P.SESSION] = self.session
        return fields

    def _end_session(self, exc: ConfigError) -> None:
        """End a session this producer cannot serve (its trainer's limits), telling it why, and
        go on serving others: the next hello starts over at its cursor, since what was taken
        from the read-ahead for this one was never sent."""
        assert self.peer is not None
        log.error("rank %d: cannot serve this trainer: %s", self.rank, exc)
        send_error(self.sock, self.peer, exc, fatal=True, session=self.session)
        self.peer = None
        self.serving = None
        self.expected = None

    def _deliver(self, frames: list) -> None:
        assert self.peer is not None
        if not send_frames(self.sock, self.peer, frames):
            log.warning("rank %d: trainer went away; waiting for a new hello", self.rank)
            self.peer = None
            self.serving = None

    # ---------------------------------------------------------------- incoming

    def _refuse(self, peer: bytes, err: BaseException, *, fatal: bool, session: int | None) -> None:
        """Answer a bad message (at the peer's allowed rate) and count it."""
        self.guard.bad(peer, "%s", err)
        if self.guard.may_reply(peer):
            send_error(self.sock, peer, err, fatal=fatal, session=session)

    def _handle(self, peer: bytes, frames: list) -> None:
        """One message from one peer; nothing it holds can end or stall the service."""
        try:
            msg = P.decode(frames, max_bytes=P.MAX_HEADER_BYTES)
        except Exception as exc:  # garbage from a peer must never take the producer down
            if not isinstance(exc, ProtocolError):
                exc = ProtocolError(f"undecodable message ({type(exc).__name__})")
            # A malformed hello is refused for good: its client must fail now, not time out.
            fatal = P.peek_kind(frames) == P.HELLO
            self._refuse(peer, exc, fatal=fatal, session=session_of(frames))
            return
        try:
            self._dispatch(peer, msg, frames)
        except Exception as exc:  # a bug or a corner case: contain it to this one message
            log.exception(
                "rank %d: error handling '%s' from peer %s", self.rank, msg.kind, peer.hex()
            )
            err = ProtocolError(
                f"the producer could not handle '{msg.kind}' ({type(exc).__name__})"
            )
            self._refuse(peer, err, fatal=msg.kind == P.HELLO, session=msg.header.get(P.SESSION))

    def _dispatch(self, peer: bytes, msg: P.Message, frames: list) -> None:
        session = msg.header.get(P.SESSION)
        if msg.kind == P.HELLO:
            self._hello(peer, msg, frames)
            return
        if msg.kind == P.BYE and peer in (self.peer, self.last_peer):
            # Also from a session already dropped (its socket closed mid-send): still goodbye.
            log.info("rank %d: trainer said goodbye", self.rank)
            # nothing follows: it may close now
            send_frames(
                self.sock, peer, P.encode(P.BYE, {} if session is None else {P.SESSION: session})
            )
            if peer == self.peer:
                self.peer = None
                self.serving = None
            self.last_peer = None
            self.owner = None  # the session ended: any allowlisted key may start the next one
            if self.feed.exit_on_bye:
                self._stop = 0
            return
        if peer != self.peer:
            err = ProtocolError(f"'{msg.kind}' before hello: say hello first")
            self._refuse(peer, err, fatal=False, session=session)
            return
        if msg.kind == P.CREDIT:
            # More outstanding credit than any client may hold is clamped: it cannot make the
            # producer queue more than MAX_PREFETCH batches for the trainer.
            self.credits = min(self.credits + msg["n"], MAX_PREFETCH)
        elif msg.kind == P.NEXT_CYCLE:
            self._next_cycle(peer, msg["cycle"], msg["batch"])
        else:
            err = ProtocolError(f"unexpected '{msg.kind}' from trainer")
            self._refuse(peer, err, fatal=False, session=session)

    def _check_cursor(self, cycle: int, batch: int) -> None:
        n = self.spec.batches_in_cycle(max(cycle, 0))
        if cycle < 0 or not 0 <= batch < n:
            raise ProtocolError(
                f"cursor (cycle {cycle}, batch {batch}) is invalid: cycle must be >= 0 and "
                f"batch in [0, {n})"
            )
        if self.spec.cycle_start(cycle + 1) > P.MAX_ROWS:
            raise ProtocolError(f"cursor cycle {cycle} is beyond any stream position")

    def _mismatch(self, msg: P.Message) -> str | None:
        """What differs between the hello and this producer, or None. To an unauthenticated
        peer only field names (and the peer's own values) are said, never ours."""
        if msg["world_size"] != self.spec.world_size:
            if not self.trusted:
                return f"world_size differs (trainer: {msg['world_size']})"
            return f"trainer world_size {msg['world_size']} vs producer {self.spec.world_size}"
        if msg["rank"] != self.rank:
            where = "" if not self.trusted else f" connected to the producer of rank {self.rank}"
            return f"trainer rank {msg['rank']}{where} is not served here; check feed.endpoint"
        try:
            theirs = DataSpec.from_dict(msg["spec"])
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"hello has a malformed data spec: {exc}") from None
        if theirs == self.spec and msg["fingerprint"] == self.spec.fingerprint():
            return None
        if self.trusted:
            detail = "; ".join(theirs.differences(self.spec))
            detail = detail or f"fingerprint {msg['fingerprint']} vs {self.spec.fingerprint()}"
            return (
                f"rank {self.rank}: trainer and producer configs differ (trainer vs producer): "
                f"{detail}"
            )
        ours, sent = self.spec.to_dict(), theirs.to_dict()
        fields = [k for k in ours if ours[k] != sent[k]] or ["fingerprint"]
        return f"rank {self.rank}: trainer and producer configs differ in: {', '.join(fields)}"

    def _hello(self, peer: bytes, msg: P.Message, frames: list) -> None:
        session = msg.header.get(P.SESSION)
        owner = user_id_of(frames)
        try:
            detail = self._mismatch(msg)
            if detail is not None:
                raise StateMismatchError(detail)
            self._check_cursor(msg["cycle"], msg["batch"])
            if self.owner is not None and owner != self.owner:
                raise StateMismatchError(
                    f"rank {self.rank}: the session belongs to another client key; only its "
                    "owner may take it over"
                )
            # Messages must fit the trainer's limit (its own word, else our config's): libzmq
            # drops a bigger frame with the connection, which reads as a lost producer.
            limit = msg.header.get(P.MAX_MESSAGE_BYTES) or self.feed.max_message_bytes
            packer = Packer(self.feed.batches_per_message, self._batch_nbytes, max_bytes=limit)
        except LensfeedError as exc:
            self.guard.bad(peer, "refused trainer: %s", exc)
            if self.guard.may_reply(peer):
                send_error(self.sock, peer, exc, fatal=True, session=session)
            return
        if self.peer is not None and peer != self.peer:
            log.warning("rank %d: a new trainer session replaces the previous one", self.rank)
            # Tell the old session, so a client that is still there fails with the reason
            # instead of waiting out feed.timeout_s (a restarted trainer's old socket is gone).
            err = StateMismatchError(
                f"rank {self.rank}: another trainer's hello took over this producer's session"
            )
            send_error(self.sock, self.peer, err, fatal=True, session=self.session)
        self.peer = self.last_peer = peer
        self.owner = owner
        self.session = session
        self.credits = min(msg["credits"], MAX_PREFETCH)
        self.packer = packer
        self.seq = 0
        self.serving = None
        welcome = {
            "rank": self.rank,
            "shard_rows": self.source.shard_rows,
            "shard_offset": self.source.shard_offset,
            "fingerprint": self.spec.fingerprint(),
            "dataset_fingerprint": self.source.dataset_fingerprint,
        }
        self._deliver(P.encode(P.WELCOME, self._stamp(welcome)))
        cursor = (msg["cycle"], msg["batch"])
        if self.expected != cursor:
            self.ahead.reset(*cursor)
            self.expected = cursor
        log.info("rank %d: trainer connected, resuming at cycle %d batch %d", self.rank, *cursor)

    def _next_cycle(self, peer: bytes, cycle: int, batch: int) -> None:
        try:
            self._check_cursor(cycle, batch)
        except ProtocolError as exc:
            self._refuse(peer, exc, fatal=False, session=self.session)
            return
        if self.expected != (cycle, batch):
            self.ahead.reset(cycle, batch)
            self.expected = (cycle, batch)
        prepared = self.ahead.request(cycle)
        info = self.source.cycle_info(cycle)
        fields = {
            "rank": self.rank,
            "cycle": cycle,
            "batches": info.batches,
            "start_batch": batch,
            "wraps": info.wraps,
            "total_wraps": info.total_wraps,
            "shard_pos": info.shard_pos,
            "shard_rows": info.shard_rows,
            "prepared_ahead": prepared,
        }
        self.serving = cycle
        # A cycle's first batch is what the training loop is blocked on: it travels alone, so
        # the loop starts while the rest of the cycle follows in full-size messages.
        self.packer.first_alone = True
        self._deliver(P.encode(P.CYCLE_START, self._stamp(fields)))


__all__ = ["ProducerServer", "bind_socket"]
