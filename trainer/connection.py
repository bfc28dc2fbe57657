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
"""

from __future__ import annotations

import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from lensfeed.common.transport import set_heartbeats


class ProducerLost(Exception):
    """Internal signal: the connection to the producer is gone (``cause`` says how)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class Connection:
    """A connected DEALER; :meth:`recv` raises :class:`ProducerLost` when the peer is gone."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, heartbeat_s: float) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # credits bound what can arrive
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        set_heartbeats(sock, heartbeat_s)
        self.sock = sock
        self.monitor = sock.get_monitor_socket(_EVENTS)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.handshakes = 0
        self.broken: str | None = None
        self.last_recv = time.monotonic()
        sock.connect(endpoint)

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
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:
            self._check_monitor()
            if timeout_s <= 0:
                return None
            deadline = time.monotonic() + timeout_s
            while True:
                ready = dict(self.poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
                if sock in ready:
                    break
                if self.monitor in ready:
                    self._check_monitor()
                elif time.monotonic() >= deadline:
                    return None
        frames = sock.recv_multipart(copy=False)
        self.last_recv = time.monotonic()
        return frames

    def _check_monitor(self) -> None:
        if self.broken is not None:
            raise ProducerLost(self.broken)
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(self.monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
                if self.handshakes > 1:  # libzmq reconnected this socket behind our back
                    raise ProducerLost("the connection was re-established to a new producer")
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                silent = time.monotonic() - self.last_recv
                raise ProducerLost(
                    f"connection lost after {silent:.1f} s without a message (the producer "
                    "exited, was killed, or missed its heartbeats)"
                )

    def close(self, linger_ms: int = 0) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)


__all__ = ["Connection", "ProducerLost"]
