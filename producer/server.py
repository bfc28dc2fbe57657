"""The producer's ZeroMQ side: handshake, credit-based sending, cycle requests, errors.

One ROUTER socket serves one trainer rank at a time (a new HELLO replaces a dead session, which
is how a restarted trainer resumes). Batches leave only while the trainer has granted credits,
so at most ``prefetch`` batches are ever in flight and neither side's memory grows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from common import protocol as P
from common.config import FeedConfig
from common.errors import LensfeedError, ProtocolError, StateMismatchError
from common.spec import DataSpec
from producer.ahead import Prefetcher, Ready
from producer.source import BatchSource

log = logging.getLogger("lensfeed.producer")

#: Poll interval of the server loop; bounds how late a shutdown or idle check can be.
_TICK_S = 0.05
#: With ``feed.batches_per_message: 0``, batches are packed up to about this many bytes ...
_AUTO_MESSAGE_BYTES = 4 << 20
#: ... and at most this many batches.
_AUTO_MAX_PACK = 64


def auto_batches_per_message(batch_nbytes: int) -> int:
    """What ``feed.batches_per_message: 0`` packs for batches of ``batch_nbytes``: about
    ``_AUTO_MESSAGE_BYTES`` (the nearest count, so 512 KiB token batches plus their
    ``sample_idx`` pack 8, not 7), at most ``_AUTO_MAX_PACK``, at least 1."""
    n = (_AUTO_MESSAGE_BYTES + batch_nbytes // 2) // max(1, batch_nbytes)
    return max(1, min(_AUTO_MAX_PACK, n))


def bind_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A ROUTER bound to ``endpoint`` (creating the ipc directory); errors name the endpoint."""
    if endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://") :]).parent.mkdir(parents=True, exist_ok=True)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 0)  # credits bound what is queued; never drop or block here
    sock.setsockopt(zmq.RCVHWM, 1000)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        raise LensfeedError(f"cannot bind producer endpoint {endpoint}: {exc}") from None
    return sock


def _stack(batches: list[dict]) -> dict:
    """One message's tensors: consecutive batches concatenated along dim 0."""
    if len(batches) == 1:
        return batches[0]
    out = {}
    for name, first in batches[0].items():
        parts = [b[name] for b in batches]
        out[name] = torch.cat(parts) if isinstance(first, torch.Tensor) else np.concatenate(parts)
    return out


def _send(sock: zmq.Socket, peer: bytes, frames: list) -> bool:
    """Send to ``peer``; False if the peer is gone (ROUTER_MANDATORY)."""
    try:
        sock.send_multipart([peer, *frames], copy=False)
        return True
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EHOSTUNREACH:
            return False
        raise


def send_error(sock: zmq.Socket, peer: bytes, err: BaseException, *, fatal: bool) -> None:
    code = err.code if isinstance(err, LensfeedError) else "internal"
    text = str(err) if isinstance(err, LensfeedError) else f"{type(err).__name__}: {err}"
    _send(sock, peer, P.encode(P.ERROR, P.error_fields(code, text, fatal=fatal)))


def linger_with_error(sock: zmq.Socket, err: BaseException, *, linger_s: float) -> None:
    """After a fatal start-up error: answer every message for up to ``linger_s`` seconds, and
    return as soon as a trainer's hello has been answered (it knows; nothing more to wait for)."""
    deadline = time.monotonic() + linger_s
    while (remaining := deadline - time.monotonic()) > 0:
        if not sock.poll(int(remaining * 1000)):
            return
        frames = sock.recv_multipart()
        send_error(sock, frames[0], err, fatal=True)
        log.info("told trainer %r about the error", frames[0])
        try:
            told = P.decode_header(frames[1])["kind"] == P.HELLO if len(frames) > 1 else False
        except ProtocolError:
            told = False
        if told:
            return


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
            chunk=self._message_batches(int(getattr(source, "batch_nbytes", 0))),
        )
        self.peer: bytes | None = None
        self.last_peer: bytes | None = None  # a dropped session may still say goodbye
        self.pack = 1  # most training batches per message for this session
        self._auto_pack = False  # size ``pack`` from the first batch of the session
        self._first_alone = False  # send the next batch in a message of its own
        self.credits = 0
        self.seq = 0
        self.serving: int | None = None  # cycle being sent
        self.expected: tuple[int, int] | None = None  # next (cycle, batch) the prefetcher yields
        self.batches_sent = 0
        self.bytes_sent = 0
        self._stop: int | None = None

    def _message_batches(self, batch_nbytes: int) -> int:
        """Batches per message: ``feed.batches_per_message``, or (auto) about
        ``_AUTO_MESSAGE_BYTES`` worth, when the batch size is known (else sized on the first)."""
        if self.feed.batches_per_message:
            return self.feed.batches_per_message
        if batch_nbytes <= 0:
            return 1
        return auto_batches_per_message(batch_nbytes)

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
                    send_error(self.sock, self.peer, exc, fatal=True)
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
                    for group in self._groups(items):
                        self._emit(group)
                        if self.peer is None or self._stop is not None:
                            break
                    if items or self.credits > 0:
                        timeout_ms = 0
                while self._stop is None and self._readable(timeout_ms):
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

    def _readable(self, timeout_ms: int) -> bool:
        """A message is waiting (asking ``ZMQ_EVENTS`` first: one C call, where a ``poll``
        builds a Poller per call; the server loop asks once per message it sends)."""
        if self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            return True
        return timeout_ms > 0 and bool(self.sock.poll(timeout_ms))

    def _groups(self, items: list[Ready]) -> list[list[Ready]]:
        """Consecutive batches packed up to ``pack`` per message; ends and errors travel alone.

        Chunks the prefetcher built at message size go out as they are; larger ones are split
        (views). Small whole chunks (one batch each, from a transform) are stacked, a copy that
        saves a message each; pieces of a split chunk never are, since copying a message's
        worth of bytes costs more than the message it would save.
        """
        out: list[list[Ready]] = []
        packed = 0  # batches in out[-1]
        for item in items:
            if item.kind != "batch":
                out.append([item])
                packed = 0
                continue
            if self._auto_pack and item.nbytes:
                per_batch = max(1, item.nbytes // item.count)
                self.pack = min(self.pack, auto_batches_per_message(per_batch))
                self._auto_pack = False
            if self._first_alone:  # the trainer is waiting: its first batch goes out at once
                self._first_alone = False
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
                packed = head.count
            last = out[-1] if out else None
            if (
                last is not None
                and last[0].kind == "batch"
                and packed + item.count <= self.pack
                and last[-1].cycle == item.cycle
                and not (item.fragment or last[-1].fragment)
            ):
                last.append(item)
                packed += item.count
            else:
                out.append([item])
                packed = item.count
        return out

    def _emit(self, group: list[Ready]) -> None:
        assert self.peer is not None
        item = group[0]
        if item.kind == "error":
            err = item.error
            assert err is not None
            log.error("rank %d: regeneration failed in cycle %d: %s", self.rank, item.cycle, err)
            send_error(self.sock, self.peer, err, fatal=True)
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
            self._deliver(P.encode(P.CYCLE_END, fields))
            self.expected = (item.cycle + 1, 0)
            self.serving = None
            return
        data = _stack([g.data for g in group if g.data is not None])
        count = sum(g.count for g in group)
        fields = {
            "rank": self.rank,
            "cycle": item.cycle,
            "batch": item.batch,
            "count": count,
            "seq": self.seq,
        }
        self._deliver(P.encode(P.BATCH, fields, data))
        self.seq += 1
        self.credits -= count
        self.batches_sent += count
        self.bytes_sent += sum(g.nbytes for g in group)
        self.expected = (item.cycle, item.batch + count)

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
            send_error(self.sock, peer, exc, fatal=False)
            return
        if msg.kind == P.HELLO:
            self._hello(peer, msg)
            return
        if msg.kind == P.BYE and peer in (self.peer, self.last_peer):
            # Also from a session already dropped (its socket closed mid-send): still goodbye.
            log.info("rank %d: trainer said goodbye", self.rank)
            _send(self.sock, peer, P.encode(P.BYE, {}))  # nothing follows: it may close now
            if peer == self.peer:
                self.peer = None
                self.serving = None
            self.last_peer = None
            if self.feed.exit_on_bye:
                self._stop = 0
            return
        if peer != self.peer:
            err = ProtocolError(f"'{msg.kind}' before hello: say hello first")
            send_error(self.sock, peer, err, fatal=False)
            return
        if msg.kind == P.CREDIT:
            if msg["n"] < 0:
                send_error(self.sock, peer, ProtocolError("negative credit"), fatal=False)
                return
            self.credits += msg["n"]
        elif msg.kind == P.NEXT_CYCLE:
            self._next_cycle(peer, msg["cycle"], msg["batch"])
        else:
            send_error(
                self.sock, peer, ProtocolError(f"unexpected '{msg.kind}' from trainer"), fatal=False
            )

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
            send_error(self.sock, peer, exc, fatal=True)
            return
        if self.peer is not None and peer != self.peer:
            log.warning("rank %d: a new trainer session replaces the previous one", self.rank)
        self.peer = self.last_peer = peer
        self.credits = max(0, msg["credits"])
        known = int(getattr(self.source, "batch_nbytes", 0))
        self.pack = self._message_batches(known) if known else _AUTO_MAX_PACK
        self._auto_pack = self.feed.batches_per_message == 0 and not known
        self.seq = 0
        self.serving = None
        welcome = {
            "rank": self.rank,
            "shard_rows": self.source.shard_rows,
            "shard_offset": self.source.shard_offset,
            "fingerprint": self.spec.fingerprint(),
            "dataset_fingerprint": self.source.dataset_fingerprint,
        }
        self._deliver(P.encode(P.WELCOME, welcome))
        cursor = (msg["cycle"], msg["batch"])
        if self.expected != cursor:
            self.ahead.reset(*cursor)
            self.expected = cursor
        log.info("rank %d: trainer connected, resuming at cycle %d batch %d", self.rank, *cursor)

    def _next_cycle(self, peer: bytes, cycle: int, batch: int) -> None:
        try:
            self._check_cursor(cycle, batch)
        except ProtocolError as exc:
            send_error(self.sock, peer, exc, fatal=False)
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
        self._first_alone = True
        self._deliver(P.encode(P.CYCLE_START, fields))


__all__ = [
    "ProducerServer",
    "auto_batches_per_message",
    "bind_socket",
    "linger_with_error",
    "send_error",
]
