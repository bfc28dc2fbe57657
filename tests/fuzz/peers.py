"""Everything that talks to the producer: raw DEALER peers (attackers, probes, the session
state's own trainer) with the frames they wait on (a valid hello, the barrier), and
legitimate FeedClients that check every byte they get against the :class:`Oracle`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from lensfeed.common.spec import DataSpec
from tests.fuzz.oracle import Oracle

if TYPE_CHECKING:
    from lensfeed.trainer.client import FeedClient


class Peer:
    """A raw DEALER (an attacker, a probe, or the session state's own trainer). Sends wait at
    most 5 s (SNDTIMEO) and a small queue makes the producer set the pace."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, name: str, routing_id: bytes | None = None
    ) -> None:
        self.name = name
        self.routing_id = routing_id
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.setsockopt(zmq.SNDHWM, 200)  # backpressure: the producer sets the pace
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)

    def send(self, frames: Sequence[bytes]) -> bool:
        """False if it could not be queued in time (a producer that stopped reading)."""
        try:
            self.sock.send_multipart(list(frames))
            return True
        except zmq.Again:
            return False

    def answers(self, timeout_ms: int = 0, limit: int = 100000) -> Iterator[dict[str, Any]]:
        """Headers of what has arrived (frame 0, decoded leniently); waits only ``timeout_ms``
        for the first."""
        for _ in range(limit):
            if not self.sock.poll(timeout_ms):
                return
            timeout_ms = 0
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            try:
                header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
            except Exception:
                header = None
            yield header if isinstance(header, dict) else {"kind": "<undecodable>"}

    def wait_for(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        seen: Callable[[dict[str, Any]], None] | None = None,
        alive: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Drain answers (each passed to ``seen``) until one satisfies ``pred``, or
        ``timeout_s`` has passed, or ``alive()`` says the producer is gone."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0 and alive():
            for header in self.answers(int(min(left, 0.25) * 1000) + 1):
                if seen is not None:
                    seen(header)
                if pred(header):
                    return True
        return False

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)


def hello_frames(spec: DataSpec, session: int, *, credits: int = 8) -> list[bytes]:
    """A valid hello for ``spec`` at cursor (0, 0): the probe that is always answered."""
    fields = {"v": 1, "kind": "hello", "rank": 0, "world_size": spec.world_size}
    fields.update(spec=spec.to_dict(), fingerprint=spec.fingerprint(), cycle=0, batch=0)
    fields.update(credits=credits, session=session)
    return [msgpack.packb(fields, use_bin_type=True)]


def is_answer(kind: str, session: int) -> Callable[[dict[str, Any]], bool]:
    return lambda h: h.get("kind") == kind and h.get("session") == session


BARRIER = msgpack.packb({"v": 7777, "kind": "credit", "n": 0})


def _is_barrier_answer(h: dict[str, Any]) -> bool:
    return h.get("kind") == "error" and "7777" in str(h.get("message", ""))


# --------------------------------------------------------------------------- legitimate clients


def _client(endpoint: str, spec: DataSpec, timeout_s: float) -> FeedClient:
    """A legitimate trainer's client; giving up on a lost producer after 5 s, not 120."""
    from lensfeed.trainer.client import FeedClient  # imports torch: only where a client runs

    return FeedClient(
        endpoint,
        rank=0,
        spec=spec,
        timeout_s=timeout_s,
        heartbeat_s=3.0,
        reconnect_timeout_s=min(timeout_s, 5.0),
        cleanup_each_cycle=False,
    )


def check_service(endpoint: str, spec: DataSpec, oracle: Oracle, timeout_s: float) -> str | None:
    """A fresh FeedClient's cycle 0, byte for byte: None if right, else what went wrong."""
    try:
        with _client(endpoint, spec, timeout_s) as feed:
            cycle = feed.next_cycle()
            got = 0
            for j, batch in enumerate(cycle, start=cycle.start_batch):
                oracle.check(batch, cycle.index, j)
                got += 1
            if got != oracle.batches(0):
                return f"cycle 0 had {got} batches, expected {oracle.batches(0)}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class Streamer(threading.Thread):
    """A legitimate trainer receiving cycle after cycle (checking every byte) during an attack;
    it finishes its current cycle and says goodbye once ``stop`` is set."""

    def __init__(self, endpoint: str, spec: DataSpec, oracle: Oracle, timeout_s: float) -> None:
        super().__init__(name="fuzz-streamer", daemon=True)
        self.endpoint, self.spec, self.oracle, self.timeout_s = endpoint, spec, oracle, timeout_s
        self.stop = threading.Event()
        self.mid_cycle = threading.Event()
        self.batches = 0
        self.cycles = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            with _client(self.endpoint, self.spec, self.timeout_s) as feed:
                while True:
                    cycle = feed.next_cycle()
                    for j, batch in enumerate(cycle, start=cycle.start_batch):
                        self.oracle.check(batch, cycle.index, j)
                        self.batches += 1
                        self.mid_cycle.set()
                        self.stop.wait(0.002)  # pace: leave the CPUs to the attack
                    self.cycles += 1
                    if self.stop.is_set():
                        return
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.mid_cycle.set()
