"""Socket options both sides set the same way (ZMTP heartbeats for liveness), and the
producer's bind, which refuses an ipc endpoint another process serves."""

from __future__ import annotations

import errno
import os
import socket
import stat
import time

import zmq

#: How long the probe of an existing ipc socket file waits for its connect.
IPC_PROBE_TIMEOUT_S = 1.0
#: How long a socket file may keep answering before it counts as served by someone else.
IPC_RELEASE_S = 0.2


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


def bind_endpoint(sock: zmq.Socket, endpoint: str) -> None:
    """``sock.bind(endpoint)``, refusing an ``ipc://`` path that another process serves with
    the ``EADDRINUSE`` a tcp port in use gets: libzmq's ipc bind unlinks an existing socket
    file, so a second producer would silently take the endpoint over and leave the first one
    unreachable. A file nobody listens on (its producer died) is reused as before. A check,
    then a bind: two producers binding at the same instant can still both succeed."""
    if endpoint.startswith("ipc://") and _still_served(endpoint[len("ipc://") :]):
        raise zmq.ZMQError(
            errno.EADDRINUSE,
            f"something is serving on it ({os.strerror(errno.EADDRINUSE)})",
        )
    sock.bind(endpoint)


def _still_served(path: str) -> bool:
    """:func:`_ipc_served`, asked again for up to :data:`IPC_RELEASE_S`: a listener closed a
    moment ago (by this process, say) is torn down by libzmq's I/O thread after ``close()``
    returns, and accepts connections until then (gone within ~2.4 ms, measured)."""
    deadline = time.monotonic() + IPC_RELEASE_S
    while _ipc_served(path):
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.01)
    return False


def _ipc_served(path: str) -> bool:
    """Whether a process listens on the unix socket file ``path``: a plain connect succeeds
    (or finds its backlog full). Refused means a stale file; an abstract name (``@...``), no
    file or another error leaves the decision to libzmq's bind."""
    if path.startswith("@"):
        return False  # Linux abstract namespace: libzmq's bind itself fails when it is in use
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(IPC_PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except TimeoutError:
            return True
        except OSError as exc:
            return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)  # a full backlog: alive
    return True


__all__ = ["IPC_PROBE_TIMEOUT_S", "IPC_RELEASE_S", "bind_endpoint", "set_heartbeats"]
