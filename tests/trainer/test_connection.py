"""The client's connection: what has arrived is read before a loss is raised."""

from __future__ import annotations

import pytest
import zmq

from lensfeed.trainer.connection import Connection, ProducerLost

pytestmark = pytest.mark.timeout(30)


def test_last_words_that_arrive_with_the_loss_are_read_before_it(tmp_path) -> None:
    """A producer's last message (e.g. its fatal error) and its disconnect can both land while
    the client is between its 'anything queued?' and 'connection lost?' checks. Forced here by
    running the peer's send and close in that gap: the message must still come out first
    (docs/protocol.md 6.6), and the loss at the next receive."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_path}/p.sock"
    router.bind(endpoint)
    conn = Connection(ctx, endpoint, heartbeat_s=0)
    try:
        conn.send([b"hello"])
        peer, _ = router.recv_multipart()
        check = conn._check_monitor

        def descheduled() -> None:
            conn._check_monitor = check  # once
            router.send_multipart([peer, b"last words"])
            router.close(linger=1000)
            assert conn.sock.poll(5000, zmq.POLLIN)  # the message is queued ...
            while True:  # ... and the disconnect is read now
                assert conn.monitor.poll(5000)
                check()

        conn._check_monitor = descheduled
        frames = conn.recv(timeout_s=5)
        assert frames is not None
        assert frames[0].bytes == b"last words"
        with pytest.raises(ProducerLost):
            conn.recv(timeout_s=1)
    finally:
        conn.close()
        ctx.destroy(linger=0)
