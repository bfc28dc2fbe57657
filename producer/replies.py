"""How a producer answers a peer: sending without blocking, error replies, the start-up linger.

Every reply goes out with ``NOBLOCK``: a peer that never reads cannot stall the producer (its
queue is bounded by ``SNDHWM``; what does not fit is dropped). Error texts go only to peers that
are authenticated (:func:`peers_trusted`); others learn which fields differ, or a code.
"""

from __future__ import annotations

import logging
import time

import zmq

from lensfeed.common import protocol as P
from lensfeed.common.errors import LensfeedError, ProtocolError
from lensfeed.producer.peers import PeerGuard

log = logging.getLogger("lensfeed.producer")


def send_frames(sock: zmq.Socket, peer: bytes, frames: list) -> bool:
    """Send to ``peer`` without blocking; False if the peer is gone or its queue is full."""
    try:
        sock.send_multipart([peer, *frames], copy=False, flags=zmq.NOBLOCK)
        return True
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return False
        raise


def send_error(
    sock: zmq.Socket, peer: bytes, err: BaseException, *, fatal: bool, session: int | None = None
) -> None:
    code = err.code if isinstance(err, LensfeedError) else "internal"
    text = str(err) if isinstance(err, LensfeedError) else f"{type(err).__name__}: {err}"
    fields = P.error_fields(code, text[: P.MAX_STR], fatal=fatal)
    if session is not None:
        fields[P.SESSION] = session
    send_frames(sock, peer, P.encode(P.ERROR, fields))


def session_of(frames: list) -> int | None:
    """The ``session`` of a message, if it has a valid one (to echo it in an answer)."""
    try:
        return P.decode_header(frames[0]).get(P.SESSION) if frames else None
    except ProtocolError:
        return None


def peers_trusted(sock: zmq.Socket) -> bool:
    """Whether every peer that can reach ``sock`` is authenticated: a CURVE server (ZAP checks
    each key) or an ipc socket in a private directory. Refusals to others carry no values."""
    if sock.getsockopt(zmq.CURVE_SERVER):
        return True
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return endpoint.startswith(("ipc://", "inproc://"))


def linger_with_error(sock: zmq.Socket, err: BaseException, *, linger_s: float) -> None:
    """After a fatal start-up error: answer every message with it for ``linger_s`` seconds, so
    a trainer that starts, or retries, within that window learns the cause instead of waiting.
    Peers that are not authenticated learn only the error's code (its text may name paths)."""
    if not peers_trusted(sock):
        code = err.code if isinstance(err, LensfeedError) else "internal"
        err = LensfeedError(f"the producer failed at start ({code}); its log has the details")
        err.code = code
    guard = PeerGuard()
    deadline = time.monotonic() + linger_s
    told: set[bytes] = set()
    while (remaining := deadline - time.monotonic()) > 0:
        if not sock.poll(int(remaining * 1000)):
            return
        peer, *frames = sock.recv_multipart()
        if guard.may_reply(peer):
            send_error(sock, peer, err, fatal=True, session=session_of(frames))
        if peer not in told and len(told) < 100:
            told.add(peer)
            log.info("told a trainer (peer %s) about the error", peer.hex())


def user_id_of(frames: list) -> str | None:
    """The CURVE key (ZAP User-Id) a message came from; None without authentication."""
    try:
        return frames[0].get("User-Id") or None
    except (zmq.ZMQError, AttributeError):
        return None


__all__ = [
    "linger_with_error",
    "peers_trusted",
    "send_error",
    "send_frames",
    "session_of",
    "user_id_of",
]
