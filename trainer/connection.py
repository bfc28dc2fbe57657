"""One connection attempt to a producer: a DEALER socket plus a monitor that reports its death.

Liveness comes from ZeroMQ itself. ZMTP heartbeats (``HEARTBEAT_IVL/TIMEOUT/TTL``) are answered
by libzmq's I/O thread, so a producer that is busy in Python (a big model's first cycle) stays
alive, while one that was killed or frozen (SIGSTOP) misses them and its connection is closed
within ``heartbeat_s``; a crash closes the connection at once. The socket monitor turns either
into an ``EVENT_DISCONNECTED`` that :meth:`Connection.recv` raises as :class:`ProducerLost`.
No protocol-level heartbeat is needed on top.

A reconnect opens a *new* :class:`Connection` rather than reusing the socket: libzmq keeps a
connecting socket's queue across its automatic reconnects, so credits and requests meant for
the dead producer would reach the new one. A fresh socket starts empty, and so does its peer.
libzmq's own reconnect is therefore pushed out of a connection's life (``RECONNECT_IVL`` 10
min): a failed or closed connection is reported (``EVENT_CLOSED``/``EVENT_DISCONNECTED``) and
the caller opens a new one. Not -1: with reconnecting off, libzmq drops what was already
received when the connection closes, and a producer's last words (a fatal error) would be lost.
Never reconnecting within a socket's life also keeps clear of a libzmq abort
(zeromq/libzmq#3937: a bounded receive queue that stalls past the heartbeat timeout and is then
reconnected trips an assertion in the I/O thread).
"""

from __future__ import annotations

import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from lensfeed.common.curve import apply_client
from lensfeed.common.errors import AuthenticationError, ConfigError
from lensfeed.common.ipc import check_ipc_dir
from lensfeed.common.keyfiles import CurveKeys
from lensfeed.common.transport import set_heartbeats


class ProducerLost(Exception):
    """Internal signal: the connection to the producer is gone (``cause`` says how);
    ``connected`` is False when it never got as far as a handshake."""

    def __init__(self, cause: str, *, connected: bool = True, handshake: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.connected = connected
        #: The handshake failed: a key or CURVE mismatch if it keeps happening (a producer
        #: killed mid-handshake fails one too).
        self.handshake = handshake


_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
)


def _handshake_failure(event: int, *, curve: bool) -> str:
    """Why a handshake failed, in terms of what the user configured."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            "the producer refused this trainer's CURVE key (it is not in the producer's "
            "allowlist, DIR/authorized)"
        )
    if curve:
        return (
            "the CURVE handshake failed: the producer's key is not the one pinned in "
            "feed.keys_dir (producer.key), or the producer does not use CURVE"
        )
    return (
        "the handshake failed: the producer requires CURVE and this trainer has no "
        "feed.keys_dir (one side uses CURVE and the other does not)"
    )


#: Reconnect interval that outlives any Connection: libzmq never reconnects one behind our back.
_NO_RECONNECT_MS = 600_000
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
for _event in _FAILED:
    _EVENTS |= _event


class Connection:
    """A connected DEALER; :meth:`recv` raises :class:`ProducerLost` when the peer is gone."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        *,
        heartbeat_s: float,
        keys: CurveKeys | None = None,
        max_message_bytes: int = -1,
        max_queued: int = 0,
    ) -> None:
        check_ipc_dir(endpoint)  # creates a missing directory private: see its docstring
        sock = ctx.socket(zmq.DEALER)
        monitor = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Credits bound what a conforming producer sends; these bound what any producer can
            # make us hold in whole messages: libzmq drops a frame over MAXMSGSIZE (and the
            # connection) before allocating it, and stops reading from the network at RCVHWM queued
            # messages. Not the frames of one unfinished message: libzmq has no limit for those, so
            # feed.timeout_s is what ends such a peer (docs/protocol.md section 11).
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
            sock.setsockopt(zmq.RCVHWM, max_queued)
            sock.setsockopt(zmq.RECONNECT_IVL, _NO_RECONNECT_MS)  # see the module docstring
            set_heartbeats(sock, heartbeat_s)
            if keys is not None:
                apply_client(sock, keys)
            self.endpoint = endpoint
            self.curve = keys is not None
            self.sock = sock
            self.monitor = monitor = sock.get_monitor_socket(_EVENTS)
            self.poller = zmq.Poller()
            self.poller.register(sock, zmq.POLLIN)
            self.poller.register(self.monitor, zmq.POLLIN)
            self.handshakes = 0
            self.broken: str | None = None
            self.lost: Exception | None = None  # what the monitor reported, raised at every check
            self.last_recv = time.monotonic()
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            # An endpoint libzmq refuses (a config check bypassed: a FeedClient given one
            # directly): close what was opened, or the context's term() would wait forever.
            if monitor is not None:
                monitor.close(linger=0)
            sock.close(linger=0)
            raise ConfigError(f"cannot connect to {endpoint!r}: {exc}") from None

    def send(self, frames: list[Any]) -> None:
        """Queue a message; never blocks. If it cannot be queued (no pipe to any peer), the
        connection counts as lost at the next wait, where the caller handles that."""
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.broken = "a message to the producer could not be queued"

    def recv(self, timeout_s: float) -> list[zmq.Frame] | None:
        """The next message, or None after ``timeout_s``; raises :class:`ProducerLost`.

        What has already arrived is returned before the monitor is looked at: complete
        messages from a connection that died since are still valid messages of the session.
        """
        sock = self.sock
        # ZMQ_EVENTS first: no poll, and no zmq.Again raised, for what has already arrived
        # (~2.2 vs ~3.5 us per check, measured here).
        if not sock.get(zmq.EVENTS) & zmq.POLLIN and not self._check_monitor_unless_data():
            if timeout_s <= 0:
                return None
            deadline = time.monotonic() + timeout_s
            while True:
                ready = dict(self.poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
                if sock in ready:
                    break
                if self.monitor in ready:
                    if self._check_monitor_unless_data():
                        break
                elif time.monotonic() >= deadline:
                    return None
        frames = sock.recv_multipart(copy=False)
        self.last_recv = time.monotonic()
        return frames

    def _check_monitor_unless_data(self) -> bool:
        """:meth:`_check_monitor`, except that a message which arrived while the loss was being
        read is returned first (True: one is queued); the loss is raised at the next check."""
        try:
            self._check_monitor()
        except ProducerLost:
            if self.sock.get(zmq.EVENTS) & zmq.POLLIN:
                return True
            raise
        return False

    def _check_monitor(self) -> None:
        """Raise what the monitor reported; a loss is remembered, so it is raised again at
        every later check (a caller may look, and carry on, before the one that handles it)."""
        if self.lost is None and self.broken is not None:
            self.lost = ProducerLost(self.broken)
        if self.lost is not None:
            raise self.lost
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            lost = self._lost(recv_monitor_message(self.monitor)["event"])
            if lost is not None:
                self.lost = lost
                raise lost

    def _lost(self, event: int) -> Exception | None:
        """The exception a monitor event means, if any."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.handshakes += 1
            if self.handshakes > 1:  # libzmq reconnected this socket behind our back
                return ProducerLost("the connection was re-established to a new producer")
        elif event in _FAILED:
            why = f"{self.endpoint}: {_handshake_failure(event, curve=self.curve)}"
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return AuthenticationError(why)  # the producer's ZAP said no: final
            return ProducerLost(why, connected=False, handshake=True)
        elif event == zmq.EVENT_CLOSED and self.handshakes == 0:
            return ProducerLost("no producer is listening there yet", connected=False)
        elif event == zmq.EVENT_DISCONNECTED:
            silent = time.monotonic() - self.last_recv
            return ProducerLost(
                f"connection lost after {silent:.1f} s without a message (the producer "
                "exited, was killed, or missed its heartbeats)",
                connected=self.handshakes > 0,
            )
        return None

    def close(self, linger_ms: int = 0) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)


#: Consecutive failed handshakes that make a CURVE/key mismatch, not a producer that died in
#: the middle of one.
HANDSHAKE_ATTEMPTS = 3


def count_failed_handshake(lost: ProducerLost, failed: int) -> int:
    """Count consecutive failed handshakes; raise :class:`AuthenticationError` at the limit."""
    if not lost.handshake:
        return 0
    if failed + 1 >= HANDSHAKE_ATTEMPTS:
        raise AuthenticationError(f"{lost.cause} ({HANDSHAKE_ATTEMPTS} handshakes failed)")
    return failed + 1


def backoff(attempt: int, deadline: float) -> bool:
    """Back off before connection attempt ``attempt + 1`` (50 ms doubling to 1.6 s), never past
    ``deadline``; False when the deadline has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    time.sleep(min(left, 0.05 * 2 ** min(attempt, 5)))
    return True


__all__ = ["HANDSHAKE_ATTEMPTS", "Connection", "ProducerLost", "backoff", "count_failed_handshake"]
