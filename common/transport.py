"""Socket options both sides set the same way: ZMTP heartbeats for liveness."""

from __future__ import annotations

import zmq


def set_heartbeats(sock: zmq.Socket, timeout_s: float) -> None:
    """ZMTP heartbeats: libzmq's I/O thread pings the peer and closes a connection whose peer
    stays silent for ``timeout_s``. This is liveness, not progress: a peer busy in Python (a slow
    model forward) still answers, because its I/O thread does; a killed or SIGSTOPped one does
    not. ``HEARTBEAT_TTL`` asks the peer to apply the same bound to us. 0 leaves them off."""
    if timeout_s <= 0:
        return
    timeout_ms = max(100, int(timeout_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(100, min(1000, timeout_ms // 3)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, min(timeout_ms // 100 * 100, 6_553_500))


__all__ = ["set_heartbeats"]
