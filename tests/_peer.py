"""A raw DEALER peer for protocol tests: drives a producer message by message, by hand."""

from __future__ import annotations

from typing import Any

import zmq

from lensfeed.common import protocol as P
from lensfeed.common.spec import DataSpec

#: How long a test waits for something that must arrive (bounded; never a sleep).
WAIT_S = 20.0
#: How long a test listens to show that something does *not* arrive.
QUIET_S = 0.3


class RawPeer:
    """A bare DEALER speaking the protocol by hand, to drive the server message by message."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, kind: str, **fields: Any) -> None:
        self.sock.send_multipart(P.encode(kind, fields))

    def send_raw(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def hello(self, ds: DataSpec, *, rank: int = 0, cycle: int = 0, batch: int = 0, **kw: Any):
        """HELLO for ``ds``; keyword arguments replace any field (e.g. ``spec=...``)."""
        fields = {
            "rank": rank,
            "world_size": ds.world_size,
            "spec": ds.to_dict(),
            "fingerprint": ds.fingerprint(),
            "cycle": cycle,
            "batch": batch,
            "credits": 100,
        }
        fields.update(kw)
        self.send(P.HELLO, **fields)

    def recv(self, timeout: float = WAIT_S) -> P.Message:
        assert self.sock.poll(int(timeout * 1000)), f"nothing received within {timeout} s"
        return P.decode(self.sock.recv_multipart())

    def expect(self, kind: str, timeout: float = WAIT_S) -> P.Message:
        msg = self.recv(timeout)
        assert msg.kind == kind, msg.header
        return msg

    def quiet(self, timeout: float = QUIET_S) -> bool:
        return not self.sock.poll(int(timeout * 1000))

    def drain(self) -> int:
        """Read (and count) everything already queued for this peer."""
        n = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            n += 1
        return n

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
