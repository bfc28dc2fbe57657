"""A hand-written ZMTP/3.0 peer that sends one multipart message and never finishes it.

libzmq bounds what a receiver holds per frame (``ZMQ_MAXMSGSIZE``) and in complete messages
(``ZMQ_RCVHWM``), but not the frames of one message: it delivers a multipart message only whole,
so the frames of an unfinished one pile up in the receiving pipe without limit. A pyzmq sender
cannot show this (libzmq keeps an unfinished message on the sending side and never transmits
it), hence this peer on a plain socket (RFC 23/ZMTP, https://rfc.zeromq.org/spec/23/, NULL
mechanism only).

``python -m tests.zmtp_rogue ENDPOINT --frame-bytes N --total-bytes M`` listens at ENDPOINT
(``ipc://PATH`` or ``tcp://127.0.0.1:PORT``), accepts one connection and stops listening, does
the handshake as a ROUTER, reads the peer's first message (lensfeed's ``hello``), sends frames of
N bytes, every one with MORE set, until at least M bytes are on the wire, then idles: it answers
PINGs (the connection stays alive) and exits 0 when the peer closes it. With ``--connect`` it
does the same to a producer: connects to ENDPOINT as a DEALER and streams the frames to it.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
from pathlib import Path

MORE, LONG, COMMAND = 0x01, 0x02, 0x04
#: signature (0xFF, 8 bytes padding, 0x7F), version 3.0, mechanism, as-server 0, filler.
GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)
assert len(GREETING) == 64


def frame_header(size: int, flags: int = 0) -> bytes:
    """A frame's flags and size: one size octet up to 255, else LONG and eight."""
    if size > 255:
        return struct.pack("!BQ", flags | LONG, size)
    return struct.pack("!BB", flags, size)


def command(name: bytes, data: bytes = b"") -> bytes:
    """A whole command frame: ``name`` (length-prefixed) then ``data``."""
    body = bytes([len(name)]) + name + data
    return frame_header(len(body), COMMAND) + body


def ready(socket_type: bytes) -> bytes:
    """READY with the one property ``Socket-Type``."""
    prop = b"\x0bSocket-Type" + struct.pack("!I", len(socket_type)) + socket_type
    return command(b"READY", prop)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    """``n`` bytes, or EOFError once the peer has closed."""
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("the peer closed the connection")
        buf += chunk
    return bytes(buf)


def read_frame(conn: socket.socket) -> tuple[int, bytes]:
    """The next frame's flags and body; a PING is answered with its PONG on the way."""
    while True:
        flags = recv_exact(conn, 1)[0]
        size_bytes = recv_exact(conn, 8 if flags & LONG else 1)
        size = struct.unpack("!Q", size_bytes)[0] if flags & LONG else size_bytes[0]
        body = recv_exact(conn, size)
        if flags & COMMAND and body[: body[0] + 1] == b"\x04PING":
            conn.sendall(command(b"PONG", body[7:]))  # after the name: TTL (2), then context
            continue
        return flags, body


def listen(endpoint: str) -> socket.socket:
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://") :])
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
    elif endpoint.startswith("tcp://127.0.0.1:"):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
    else:
        raise ValueError(f"only ipc://PATH and tcp://127.0.0.1:PORT are supported: {endpoint}")
    srv.listen(1)
    return srv


def _handshake(conn: socket.socket, socket_type: bytes) -> None:
    conn.sendall(GREETING)
    greeting = recv_exact(conn, 64)
    if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[12:16] != b"NULL":
        raise ValueError(f"not a ZMTP/3 NULL greeting: {greeting!r}")
    conn.sendall(ready(socket_type))
    flags, body = read_frame(conn)
    if not flags & COMMAND or not body.startswith(b"\x05READY"):
        raise ValueError(f"expected READY, got {body[:32]!r}")


def _stream(conn: socket.socket, *, frame_bytes: int, total_bytes: int) -> int:
    """Frames with MORE set until ``total_bytes`` are out, then idle until the peer closes."""
    one = frame_header(frame_bytes, MORE) + bytes(frame_bytes)
    chunk = one * max(1, (1 << 20) // len(one))  # small frames go out ~1 MiB at a time
    sent = 0
    print(f"zmtp_rogue: streaming {frame_bytes}-byte frames", flush=True)
    while sent < total_bytes:
        conn.sendall(chunk)
        sent += len(chunk)
    frames = sent // len(one)
    print(f"zmtp_rogue: streamed {sent} bytes in {frames} frames; idle", flush=True)
    try:
        while True:
            read_frame(conn)
    except (EOFError, ConnectionError):  # a PING already read may meet a closed socket
        print("zmtp_rogue: the peer closed the connection", flush=True)
    return sent


def serve(endpoint: str, *, frame_bytes: int, total_bytes: int) -> int:
    """As a producer: one connection, as the module docstring says; the data bytes sent."""
    with listen(endpoint) as srv:
        print(f"zmtp_rogue: listening at {endpoint}", flush=True)
        conn, _ = srv.accept()  # and no other: a reconnect finds nobody listening
    with conn:
        _handshake(conn, b"ROUTER")
        while read_frame(conn)[0] & (MORE | COMMAND):
            pass  # the rest of the first message (the hello)
        print("zmtp_rogue: hello read", flush=True)
        return _stream(conn, frame_bytes=frame_bytes, total_bytes=total_bytes)


def attack(endpoint: str, *, frame_bytes: int, total_bytes: int) -> int:
    """As a trainer: connect to a producer's ROUTER and stream the unfinished message to it."""
    if endpoint.startswith("ipc://"):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(endpoint[len("ipc://") :])
    elif endpoint.startswith("tcp://127.0.0.1:"):
        conn = socket.create_connection(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
    else:
        raise ValueError(f"only ipc://PATH and tcp://127.0.0.1:PORT are supported: {endpoint}")
    with conn:
        _handshake(conn, b"DEALER")
        return _stream(conn, frame_bytes=frame_bytes, total_bytes=total_bytes)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.zmtp_rogue", description=__doc__)
    parser.add_argument("endpoint")
    parser.add_argument("--frame-bytes", type=int, default=1 << 20)
    parser.add_argument("--total-bytes", type=int, default=64 << 20)
    parser.add_argument(
        "--connect", action="store_true", help="attack the producer at ENDPOINT instead"
    )
    args = parser.parse_args(argv)
    run = attack if args.connect else serve
    run(args.endpoint, frame_bytes=args.frame_bytes, total_bytes=args.total_bytes)


if __name__ == "__main__":
    main(sys.argv[1:])
