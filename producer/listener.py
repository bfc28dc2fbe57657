"""The producer's bound socket and who may reach it.

ipc sockets live in a private (0700) directory; tcp binds to loopback unless configured
otherwise, and a non-loopback tcp address needs CURVE keys (``feed.keys_dir``: the ZAP handler
admits only allowlisted trainer keys) or an explicit ``feed.insecure``.
"""

from __future__ import annotations

import logging

import zmq
from zmq.auth.thread import ThreadAuthenticator

from lensfeed.common.config import MAX_PREFETCH, FeedConfig
from lensfeed.common.curve import apply_server, configure_zap, is_loopback
from lensfeed.common.errors import ConfigError, LensfeedError
from lensfeed.common.ipc import bind_endpoint, check_ipc_dir
from lensfeed.common.keyfiles import CurveKeys, server_keys
from lensfeed.common.limits import MAX_HEADER_BYTES
from lensfeed.common.transport import set_heartbeats

log = logging.getLogger("lensfeed.producer")


def bind_socket(
    ctx: zmq.Context, endpoint: str, *, heartbeat_s: float = 0.0, keys: CurveKeys | None = None
) -> zmq.Socket:
    """A ROUTER bound to ``endpoint`` (creating a private ipc directory); errors name it.

    ``keys`` makes it a CURVE server; the context must then run a ZAP handler (:class:`Listener`).
    """
    check_ipc_dir(endpoint)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # Credits bound what is queued for the trainer (at most MAX_PREFETCH batches, so messages);
    # the bound keeps a peer that never reads its error replies from growing a queue forever.
    sock.setsockopt(zmq.SNDHWM, MAX_PREFETCH + 1024)
    sock.setsockopt(zmq.RCVHWM, 1000)
    # Every message a producer receives is a header alone (no tensor frames): a bigger frame is
    # dropped by libzmq, with its connection, before it is allocated (a stranger on a tcp port
    # cannot make the producer allocate 1000 frames of any size).
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_HEADER_BYTES)
    try:
        set_heartbeats(sock, heartbeat_s)
        if keys is not None:
            apply_server(sock, keys)
        bind_endpoint(sock, endpoint)  # refuses a live ipc socket, as tcp refuses a port
    except Exception as exc:  # closed, or the context's term() would wait for it forever
        sock.close()
        raise LensfeedError(f"cannot bind producer endpoint {endpoint}: {exc}") from None
    return sock


class Listener:
    """A producer's socket with its security applied; :meth:`close` stops the ZAP handler too."""

    def __init__(self, ctx: zmq.Context, endpoint: str, feed: FeedConfig) -> None:
        keys = server_keys(feed.keys_dir) if feed.keys_dir else None
        if keys is None and not is_loopback(endpoint):
            if not feed.insecure:
                raise ConfigError(
                    f"refusing to bind {endpoint} without CURVE: anyone who can reach it could "
                    "read the feed. Create keys (lensfeed keys DIR) and set feed.keys_dir=DIR, "
                    "bind to loopback, or set feed.insecure=true on a network you trust"
                )
            log.warning(
                "feed.insecure: serving %s without authentication or encryption; anyone who "
                "can reach it can read the feed or take over the session",
                endpoint,
            )
        self.endpoint = endpoint
        self.auth: ThreadAuthenticator | None = None
        if keys is not None:
            self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("lensfeed.producer.zap"))
            self.auth.start()
            configure_zap(self.auth, keys)  # the keys server_keys checked, not a second read
        try:
            self.sock = bind_socket(ctx, endpoint, heartbeat_s=feed.heartbeat_timeout_s, keys=keys)
        except BaseException:
            self._stop_auth()
            raise
        if keys is not None:
            log.info("CURVE on %s: clients must hold a key in %s", endpoint, keys.authorized)

    def _stop_auth(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)
        self._stop_auth()


__all__ = ["Listener", "bind_socket"]
