"""A producer bind refuses an ipc endpoint another process serves, as tcp refuses a port in use.

libzmq's ipc bind unlinks an existing socket file, so without the check a second producer on
the same ``ipc://`` path silently takes it over and the first becomes unreachable for good.
A socket file left behind by a dead process is still reused.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from lensfeed.common.errors import LensfeedError
from lensfeed.common.ipc import bind_endpoint
from lensfeed.producer.listener import bind_socket
from tests._util import free_port

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def ipc(tmp_path: Path) -> str:
    d = tmp_path / "ipc"
    d.mkdir(mode=0o700)
    return f"ipc://{d}/feed-0.sock"


def _router(ctx: zmq.Context) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def _reaches(ctx: zmq.Context, endpoint: str, server: zmq.Socket) -> bool:
    """Whether a message sent to ``endpoint`` arrives at ``server``."""
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    try:
        client.connect(endpoint)
        client.send(b"hello")
        return bool(server.poll(5000)) and server.recv_multipart()[-1] == b"hello"
    finally:
        client.close()


def test_a_live_ipc_endpoint_is_refused_like_a_tcp_port_in_use(ctx: zmq.Context, ipc: str) -> None:
    tcp = f"tcp://127.0.0.1:{free_port()}"
    for endpoint in (tcp, ipc):
        first, second = _router(ctx), _router(ctx)
        bind_endpoint(first, endpoint)
        with pytest.raises(zmq.ZMQError) as err:
            bind_endpoint(second, endpoint)
        assert err.value.errno == errno.EADDRINUSE
        assert "Address already in use" in str(err.value)
        second.close()
        assert _reaches(ctx, endpoint, first)  # the first one still serves it
        first.close()


def test_a_stale_ipc_socket_file_is_reused(ctx: zmq.Context, ipc: str) -> None:
    path = ipc[len("ipc://") :]
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # a producer that died: its socket file stays, nobody listens
    dead.close()
    assert Path(path).is_socket()
    sock = _router(ctx)
    bind_endpoint(sock, ipc)
    assert _reaches(ctx, ipc, sock)
    sock.close()


def test_a_second_producer_on_a_live_ipc_endpoint_is_refused(ctx: zmq.Context, ipc: str) -> None:
    first = bind_socket(ctx, ipc)
    try:
        with pytest.raises(
            LensfeedError,
            match=rf"cannot bind producer endpoint {ipc}: something is serving on it "
            r"\(Address already in use\)",
        ):
            bind_socket(ctx, ipc).close()
        assert _reaches(ctx, ipc, first)
    finally:
        first.close()


def test_an_endpoint_closed_a_moment_ago_can_be_bound_again(ctx: zmq.Context, ipc: str) -> None:
    """libzmq tears a closed listener down in its I/O thread, after close() returns: the probe
    may still reach it for a few milliseconds, which is not another process serving (46 of 300
    immediate rebinds in one context were refused before the probe waited for it)."""
    for _ in range(100):
        sock = _router(ctx)
        bind_endpoint(sock, ipc)
        sock.close()
    sock = _router(ctx)
    bind_endpoint(sock, ipc)
    assert _reaches(ctx, ipc, sock)
    sock.close()
