"""ipc sockets: their only protection is their directory's permissions, so both sides make it
private before they bind or connect (:func:`check_ipc_dir`); and a producer's bind that would
take over a socket another process serves is refused (:func:`bind_endpoint`)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from pathlib import Path

import zmq

from lensfeed.common.endpoints import MAX_IPC_PATH_BYTES, ipc_path_problem
from lensfeed.common.errors import ConfigError

#: How long the probe of an existing ipc socket file waits for its connect.
IPC_PROBE_TIMEOUT_S = 1.0
#: How long a socket file may keep answering before it counts as served by someone else.
IPC_RELEASE_S = 0.2


def check_ipc_dir(endpoint: str) -> None:
    """Make an ipc socket's directory private (owned by this user, mode 0700) or refuse it:
    anyone who can open it can talk to the socket.

    Both sides create a missing directory (0700) before they bind or connect: a client that
    waited for it would let another user create it first, under a world-writable /tmp, and
    listen there. The directory is checked with lstat, so a symlink is refused, not followed
    to somewhere else.
    """
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://") :]
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        return  # libzmq refuses it at bind and connect: nothing listens there; make nothing
    problem = ipc_path_problem(path)
    if problem:
        raise ConfigError(f"ipc endpoint {endpoint!r} {problem}")
    d = Path(path).parent
    try:
        os.makedirs(d.parent, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create ipc directory {d} of {endpoint}: {exc}") from None
    try:
        os.mkdir(d, 0o700)  # the directory itself: private from its first moment
    except FileExistsError:
        pass  # ours or not, checked below
    except OSError as exc:
        raise ConfigError(f"cannot create ipc directory {d} of {endpoint}: {exc}") from None
    try:
        st = os.lstat(d)
    except OSError as exc:  # removed since: someone else is here
        raise ConfigError(f"ipc directory {d} of {endpoint} cannot be checked: {exc}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise ConfigError(
            f"ipc directory {d} of {endpoint} is {what}: it must be a real directory private "
            "to this user. Use another path"
        )
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"ipc directory {d} of {endpoint} must be private to this user (owner uid "
            f"{os.geteuid()}, mode 0700; it is uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}): other users could connect to the feed. "
            f"Use a private directory or chmod 700 {d}"
        )


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


__all__ = ["IPC_PROBE_TIMEOUT_S", "IPC_RELEASE_S", "bind_endpoint", "check_ipc_dir"]
