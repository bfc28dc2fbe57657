"""The transport limit: raw pyzmq PUSH -> PULL between two processes, no lensfeed code.

Each message is ``[msgpack header, raw payload]`` sent with ``copy=False``, the same bytes per
batch as the lensfeed message (all tensor frames together) over the same transport (``ipc://``).
The sender binds (like the producer), the receiver connects (like the trainer). High-water marks
on both sides equal the lensfeed prefetch depth, so neither side buffers more than lensfeed may.
The receiver reads both processes' CPU time at each round's end, so the sender, once done,
waits idle until it is stopped. With ``--keys DIR`` (a ``lensfeed keys`` set) both sockets run
CurveZMQ as lensfeed's do (the sender is the CURVE server), over a tcp endpoint: what encryption
costs the transport itself, with no lensfeed code in the way.

::

    python -m benchmarks.limit send --endpoint E --nbytes N --count C --rounds R
    python -m benchmarks.limit recv --endpoint E --count C --rounds R --report out.json

Round ``r`` takes from the last message of round ``r-1`` to the last message of round ``r``
(round 0 is the warm-up); the receiver writes one time per round.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgpack
import numpy as np
import zmq

from benchmarks.common import cpu_s, self_report, write_json
from lensfeed.common.curve import apply_client, apply_server
from lensfeed.common.keyfiles import client_keys, server_keys
from lensfeed.common.malloc import tune_for_large_messages


def send(
    endpoint: str, nbytes: int, count: int, rounds: int, hwm: int, keys: Path | None = None
) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, -1)
    if keys is not None:
        apply_server(sock, server_keys(keys))  # no ZAP handler here: every client is let in
    sock.bind(endpoint)
    payload = np.random.default_rng(0).integers(0, 255, size=nbytes, dtype=np.uint8)
    view = memoryview(payload)
    seq = 0
    for r in range(rounds):
        for i in range(count):
            header = {
                "v": 1,
                "kind": "batch",
                "rank": 0,
                "cycle": r,
                "batch": i,
                "seq": seq,
                "tensors": [["payload", "uint8", [nbytes]]],
            }
            sock.send_multipart([msgpack.packb(header, use_bin_type=True), view], copy=False)
            seq += 1
    # Stay alive, idle, with the socket and its I/O thread open, until stopped: the receiver
    # reads this process's CPU time (every live thread's) at the end of each round, the last
    # one included, and a thread that ended would take its time with it.
    signal.pause()


def recv(
    endpoint: str,
    count: int,
    rounds: int,
    hwm: int,
    report: Path,
    peer_pid: int = 0,
    keys: Path | None = None,
) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if keys is not None:
        apply_client(sock, client_keys(keys))
    sock.connect(endpoint)
    times: list[float] = []
    cpus: list[float] = []  # CPU seconds of both processes at each round's end
    nbytes = 0
    t_prev = 0.0
    for r in range(rounds):
        for _ in range(count):
            frames = sock.recv_multipart(copy=False)
            header = msgpack.unpackb(frames[0].buffer, raw=False)
            assert header["cycle"] == r
            nbytes = len(frames[1].buffer)
        now = time.perf_counter()
        cpus.append(cpu_s() + (cpu_s(peer_pid) if peer_pid else 0.0))
        if r > 0:
            times.append(now - t_prev)
        t_prev = now
    sock.close(linger=0)
    ctx.term()
    write_json(
        report,
        {"round_s": times, "round_cpu_s": cpus, "count": count, "nbytes": nbytes, **self_report()},
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("role", choices=("send", "recv"))
    p.add_argument("--endpoint", required=True)
    p.add_argument("--nbytes", type=int, default=0)
    p.add_argument("--count", type=int, required=True, help="messages per round")
    p.add_argument("--rounds", type=int, required=True, help="rounds, the first is warm-up")
    p.add_argument("--hwm", type=int, default=8)
    p.add_argument("--report", type=Path)
    p.add_argument("--peer-pid", type=int, default=0, help="the sender, whose CPU is read too")
    p.add_argument("--keys", type=Path, help="a `lensfeed keys` directory: CurveZMQ on both ends")
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="receiver keeps large blocks in the heap (what feed.tune_malloc does)",
    )
    a = p.parse_args(argv)
    if a.tune_malloc and a.role == "recv":
        tune_for_large_messages()
    if a.role == "send":
        send(a.endpoint, a.nbytes, a.count, a.rounds, a.hwm, a.keys)
    else:
        assert a.report is not None
        recv(a.endpoint, a.count, a.rounds, a.hwm, a.report, a.peer_pid, a.keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
