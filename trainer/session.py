"""The client's side of one producer session: the hello that opens it, and its messages in order.

:class:`FeedClient` decides *what* to ask for (cursor, cycles, credits; recovery through its
:class:`~lensfeed.trainer.reconnect.Reconnector`); a :class:`Session` owns the socket and turns
what arrives into an ordered queue of ``(kind, payload)`` items, staging batches to the device
as they arrive. Each :meth:`open` starts over on a fresh
:class:`~lensfeed.trainer.connection.Connection` with a new session number, so nothing of an
earlier session can be mistaken for this one's (docs/protocol.md 6.2).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from typing import Any

import zmq

from lensfeed.common import protocol as P
from lensfeed.common.errors import ProducerTimeoutError, ProtocolError, RemoteError
from lensfeed.common.keyfiles import CurveKeys
from lensfeed.common.spec import DataSpec
from lensfeed.trainer.connection import Connection
from lensfeed.trainer.contract import TensorContract
from lensfeed.trainer.device import Stager

log = logging.getLogger("lensfeed.trainer")

#: Non-fatal errors a session tolerates from its producer before it is treated as broken, and
#: how many of them are logged in full.
MAX_WARNINGS = 1000
LOGGED_WARNINGS = 10


def _is_bye(frames: list[Any]) -> bool:
    try:
        return P.decode_header(frames[0])["kind"] == P.BYE
    except ProtocolError:
        return False


class Session:
    """One producer session at a time; :meth:`open` replaces it with a new one."""

    def __init__(
        self,
        endpoint: str,
        *,
        rank: int,
        spec: DataSpec,
        stager: Stager,
        heartbeat_s: float,
        max_message_bytes: int,
        contract: TensorContract,
        keys: CurveKeys | None = None,
        max_queued: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.rank = rank
        self.spec = spec
        self.stager = stager
        self.heartbeat_s = heartbeat_s
        self.max_message_bytes = max_message_bytes
        self.contract = contract
        self.keys = keys
        self.max_queued = max_queued
        #: Batches granted to, and received from, this session's producer: a producer that
        #: sends more than it was granted is broken or hostile, never buffered.
        self.granted = 0
        self.received = 0
        self.warnings = 0
        self.where = f"producer for rank {rank} at {endpoint}"
        self.conn: Connection | None = None
        self.items: deque[tuple[str, Any]] = deque()
        self.batches = 0  # batch items in ``items`` (staged to the device lazily, in order)
        # The producer echoes this number in every message of the session.
        self.number = secrets.randbits(31)
        self._ctx: zmq.Context | None = None

    def open(
        self, cursor: tuple[int, int], *, credits: int, deadline: float, timeout_s: float
    ) -> dict[str, Any]:
        """Say hello on a fresh connection with ``cursor``; returns the WELCOME fields.

        Raises :class:`~lensfeed.trainer.connection.ProducerLost` if the connection dies
        first, :class:`ProducerTimeoutError` at ``deadline`` (``timeout_s`` is only named).
        """
        if self._ctx is None:
            self._ctx = zmq.Context()
        if self.conn is not None:
            self.conn.close()
            self.conn = None  # a Connection that fails to open leaves none behind
        self.conn = Connection(
            self._ctx,
            self.endpoint,
            heartbeat_s=self.heartbeat_s,
            keys=self.keys,
            max_message_bytes=self.max_message_bytes,
            max_queued=self.max_queued,
        )
        self.items.clear()
        self.batches = 0
        self.granted = credits
        self.received = 0
        self.warnings = 0
        self.number = (self.number + 1) & 0x7FFFFFFF
        cycle, batch = cursor
        hello = {
            "rank": self.rank,
            "world_size": self.spec.world_size,
            "spec": self.spec.to_dict(),
            "fingerprint": self.spec.fingerprint(),
            "cycle": cycle,
            "batch": batch,
            "credits": credits,
            P.SESSION: self.number,
        }
        if 0 < self.max_message_bytes <= P.MAX_ROWS:  # so the producer packs to fit
            hello[P.MAX_MESSAGE_BYTES] = self.max_message_bytes
        self.send(P.HELLO, hello)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.receive(left):
                raise ProducerTimeoutError(
                    f"no answer to hello from the {self.where} within {timeout_s:g} s"
                )
            if not self.items:
                continue  # an earlier session's message, dropped
            kind, header = self.items.popleft()
            if kind == P.ERROR:  # any answer to a hello but welcome ends it: fail now
                raise RemoteError(
                    header["code"], f"{self.where}: {header['message']}", rank=self.rank
                )
            if kind == "fail":
                raise header
            if kind != P.WELCOME:
                raise ProtocolError(f"{self.where}: expected welcome, got {kind}")
            if header["fingerprint"] != self.spec.fingerprint() or header["rank"] != self.rank:
                raise ProtocolError(
                    f"{self.where}: welcome is for another data spec or rank (fingerprint "
                    f"{P.describe(header['fingerprint'])}, rank {header['rank']}; expected "
                    f"{self.spec.fingerprint()}, rank {self.rank})"
                )
            return dict(header)

    def send(self, kind: str, fields: dict[str, Any]) -> None:
        assert self.conn is not None
        if kind == P.CREDIT:
            self.granted += fields["n"]
        self.conn.send(P.encode(kind, fields))

    def receive(self, timeout_s: float) -> bool:
        """Move one message from the socket into ``items``; False on timeout.

        Raises :class:`~lensfeed.trainer.connection.ProducerLost` when the connection is gone
        and nothing is left to read, and :class:`ProtocolError` at once for a batch beyond the
        credits granted or outside the tensor contract. Messages of an earlier session are
        dropped.
        """
        assert self.conn is not None
        frames = self.conn.recv(timeout_s)
        if frames is None:
            return False
        try:
            msg = P.decode(frames, max_bytes=self.max_message_bytes)
        except ProtocolError as exc:
            self.items.append(("fail", ProtocolError(f"{self.where}: {exc}")))
            return True
        session = msg.header.get(P.SESSION)
        if session is not None and session != self.number:
            return True  # an earlier session's message, still in flight: not ours any more
        if msg.kind == P.BATCH:
            count = msg["count"]
            self.received += count
            try:
                if self.received > self.granted:
                    raise ProtocolError(
                        f"sent {self.received} batches but was granted {self.granted} credits"
                    )
                self.contract.check(msg.tensors, count)
            except ProtocolError as exc:
                raise ProtocolError(f"{self.where}: {exc}") from None
            self.items.append(("batch", [msg.header, msg.tensors, None]))
            self.batches += 1
        else:
            self.items.append((msg.kind, msg.header))
        return True

    def bound_queue(self, max_queued: int) -> None:
        """Let libzmq queue at most ``max_queued`` messages, on this connection (libzmq applies
        a new ``RCVHWM`` to a live pipe) and on those opened after it."""
        self.max_queued = max_queued
        if self.conn is not None:
            self.conn.sock.setsockopt(zmq.RCVHWM, max_queued)

    def drain(self) -> None:
        """Read everything already queued (checking each batch against the credits), before
        granting more: a producer that sent ahead of its credits is caught here, while the
        queue libzmq holds for it is bounded (``RCVHWM``), instead of being covered by the
        credits granted since."""
        while self.conn is not None and self.receive(0):
            pass

    def stage_ahead(self, n: int) -> None:
        """Start the device copy of the first ``n`` queued batches (CUDA: overlaps the step)."""
        k = 0
        for kind, payload in self.items:
            if k >= n:
                break
            if kind == "batch":
                if payload[2] is None:
                    payload[2] = self.stager.stage(payload[1])
                k += 1

    def pop(self) -> tuple[str, Any] | None:
        """The next item; None for a non-fatal ``error`` (logged and skipped). A fatal one is
        raised as :class:`RemoteError`, an undecodable message as :class:`ProtocolError`.
        A batch comes as ``(header, staged)``."""
        kind, payload = self.items.popleft()
        if kind == "batch":
            self.batches -= 1
            header, tensors, staged = payload
            return kind, (header, staged if staged is not None else self.stager.stage(tensors))
        elif kind == P.ERROR and not payload["fatal"]:
            self.warnings += 1
            if self.warnings > MAX_WARNINGS:
                raise ProtocolError(
                    f"{self.where}: sent more than {MAX_WARNINGS} errors in one session"
                )
            if self.warnings <= LOGGED_WARNINGS:
                log.warning("%s: %s (%s)", self.where, payload["message"], payload["code"])
            return None
        elif kind == P.ERROR:
            raise RemoteError(
                payload["code"], f"{self.where}: {payload['message']}", rank=self.rank
            )
        elif kind == "fail":
            raise payload
        return kind, payload

    def close(self, *, bye_wait_s: float) -> None:
        """Say goodbye and release the socket, waiting up to ``bye_wait_s`` for the producer's
        acknowledgement (draining what is in flight), so a connection never closes under a
        producer in the middle of sending."""
        if self.conn is not None:
            sock = self.conn.sock
            try:
                self.send(P.BYE, {P.SESSION: self.number})
                deadline = time.monotonic() + bye_wait_s
                while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000)):
                    if _is_bye(sock.recv_multipart()):
                        break
            except zmq.ZMQError:
                pass
            self.conn.close(linger_ms=1000)
            self.conn = None
        self.items.clear()
        self.batches = 0
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


__all__ = ["Session"]
