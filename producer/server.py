"""The producer's ZeroMQ side: handshake, credit-based sending, cycle requests, errors.

One ROUTER socket serves one trainer rank at a time (a new HELLO replaces a dead session, which
is how a restarted trainer resumes). Batches leave only while the trainer has granted credits,
so at most ``prefetch`` batches are ever in flight and neither side's memory grows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import zmq

from lensfeed.common import protocol as P
from lensfeed.common.config import FeedConfig
from lensfeed.common.errors import LensfeedError, ProtocolError, StateMismatchError
from lensfeed.common.spec import DataSpec
from lensfeed.common.transport import set_heartbeats
from lensfeed.producer.ahead import Prefetcher, Ready
from lensfeed.producer.packing import Packer, message_batches, stack
from lensfeed.producer.source import BatchSource

log = logging.getLogger("lensfeed.producer")

#: Poll interval of the server loop; bounds how late a shutdown or idle check can be.
_TICK_S = 0.05


def bind_socket(ctx: zmq.Context, endpoint: str, *, heartbeat_s: float = 0.0) -> zmq.Socket:
    """A ROUTER bound to ``endpoint`` (creating the ipc directory); errors name the endpoint."""
    if endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://") :]).parent.mkdir(parents=True, exist_ok=True)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)  # credits bound what is queued; never drop or block here
    sock.setsockopt(zmq.RCVHWM, 1000)
    set_heartbeats(sock, heartbeat_s)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        raise LensfeedError(f"cannot bind producer endpoint {endpoint}: {exc}") from None
    return sock


def _send(sock: zmq.Socket, peer: bytes, frames: list) -> bool:
    """Send to ``peer``; False if the peer is gone (ROUTER_MANDATORY)."""
    try:
        sock.send_multipart([peer, *frames], copy=False)
        return True
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            return False
        raise


def send_error(
    sock: zmq.Socket, peer: bytes, err: BaseException, *, fatal: bool, session: int | None = None
) -> None:
    code = err.code if isinstance(err, LensfeedError) else "internal"
    text = str(err) if isinstance(err, LensfeedError) else f"{type(err).__name__}: {err}"
    fields = P.error_fields(code, text, fatal=fatal)
    if session is not None:
        fields[P.SESSION] = session
    _send(sock, peer, P.encode(P.ERROR, fields))


def _session_of(frames: list) -> int | None:
    """The ``session`` of a message, if it has a valid one (to echo it in an answer)."""
    try:
        return P.decode_header(frames[0]).get(P.SESSION) if frames else None
    except ProtocolError:
        return None


def linger_with_error(sock: zmq.Socket, err: BaseException, *, linger_s: float) -> None:
    """After a fatal start-up error: answer every message with it for ``linger_s`` seconds, so
    a trainer that starts, or retries, within that window learns the cause instead of waiting."""
    deadline = time.monotonic() + linger_s
    told: set[bytes] = set()
    while (remaining := deadline - time.monotonic()) > 0:
        if not sock.poll(int(remaining * 1000)):
            return
        peer, *frames = sock.recv_multipart()
        send_error(sock, peer, err, fatal=True, session=_session_of(frames))
        if peer not in told and len(told) < 1000:
            told.add(peer)
            log.info("told a trainer (peer %s) about the error", peer.hex())


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
                    for group in self.packer.groups(items):
                        self._emit(group)
                        if self.peer is None or self._stop is not None:
                            break
                    if items or self.credits > 0:
                        timeout_ms = 0
                while self._stop is None and self.sock.poll(timeout_ms):
                    timeout_ms = 0
                    frames = self.sock.recv_multipart(copy=False)
                    last_msg = time.monotonic()
                    self._handle(frames[0].bytes, frames[1:])
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

    def _deliver(self, frames: list) -> None:
        assert self.peer is not None
        if not _send(self.sock, self.peer, frames):
            log.warning("rank %d: trainer went away; waiting for a new hello", self.rank)
            self.peer = None
            self.serving = None

    # ---------------------------------------------------------------- incoming

    def _handle(self, peer: bytes, frames: list) -> None:
        try:
            msg = P.decode(frames, max_bytes=P.MAX_HEADER_BYTES)
        except Exception as exc:  # garbage from a peer must never take the producer down
            if not isinstance(exc, ProtocolError):
                exc = ProtocolError(f"undecodable message ({type(exc).__name__}: {exc})")
            log.warning("rank %d: rejected malformed message: %s", self.rank, exc)
            send_error(self.sock, peer, exc, fatal=False, session=_session_of(frames))
            return
        session = msg.header.get(P.SESSION)
        if msg.kind == P.HELLO:
            self._hello(peer, msg)
            return
        if msg.kind == P.BYE and peer in (self.peer, self.last_peer):
            # Also from a session already dropped (its socket closed mid-send): still goodbye.
            log.info("rank %d: trainer said goodbye", self.rank)
            # nothing follows: it may close now
            _send(self.sock, peer, P.encode(P.BYE, {} if session is None else {P.SESSION: session}))
            if peer == self.peer:
                self.peer = None
                self.serving = None
            self.last_peer = None
            if self.feed.exit_on_bye:
                self._stop = 0
            return
        if peer != self.peer:
            err = ProtocolError(f"'{msg.kind}' before hello: say hello first")
            send_error(self.sock, peer, err, fatal=False, session=session)
            return
        if msg.kind == P.CREDIT:
            if msg["n"] < 0:
                err = ProtocolError("negative credit")
                send_error(self.sock, peer, err, fatal=False, session=session)
                return
            self.credits += msg["n"]
        elif msg.kind == P.NEXT_CYCLE:
            self._next_cycle(peer, msg["cycle"], msg["batch"])
        else:
            err = ProtocolError(f"unexpected '{msg.kind}' from trainer")
            send_error(self.sock, peer, err, fatal=False, session=session)

    def _check_cursor(self, cycle: int, batch: int) -> None:
        n = self.spec.batches_in_cycle(max(cycle, 0))
        if cycle < 0 or not 0 <= batch < n:
            raise ProtocolError(
                f"cursor (cycle {cycle}, batch {batch}) is invalid: cycle must be >= 0 and "
                f"batch in [0, {n})"
            )

    def _hello(self, peer: bytes, msg: P.Message) -> None:
        try:
            if msg["world_size"] != self.spec.world_size:
                raise StateMismatchError(
                    f"trainer world_size {msg['world_size']} vs producer world_size "
                    f"{self.spec.world_size}"
                )
            if msg["rank"] != self.rank:
                raise StateMismatchError(
                    f"trainer rank {msg['rank']} connected to the producer of rank {self.rank}; "
                    "check feed.endpoint"
                )
            try:
                theirs = DataSpec.from_dict(msg["spec"])
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"hello has a malformed data spec: {exc}") from None
            diffs = theirs.differences(self.spec)
            if diffs or msg["fingerprint"] != self.spec.fingerprint():
                detail = "; ".join(diffs) or (
                    f"fingerprint {msg['fingerprint']} vs {self.spec.fingerprint()}"
                )
                raise StateMismatchError(
                    f"rank {self.rank}: trainer and producer configs differ (trainer vs "
                    f"producer): {detail}"
                )
            self._check_cursor(msg["cycle"], msg["batch"])
        except LensfeedError as exc:
            log.error("rank %d: refused trainer: %s", self.rank, exc)
            send_error(self.sock, peer, exc, fatal=True, session=msg.header.get(P.SESSION))
            return
        if self.peer is not None and peer != self.peer:
            log.warning("rank %d: a new trainer session replaces the previous one", self.rank)
        self.peer = self.last_peer = peer
        self.session = msg.header.get(P.SESSION)
        self.credits = max(0, msg["credits"])
        self.packer = Packer(self.feed.batches_per_message, self._batch_nbytes)
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
            send_error(self.sock, peer, exc, fatal=False, session=self.session)
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


__all__ = [
    "ProducerServer",
    "bind_socket",
    "linger_with_error",
    "send_error",
]
