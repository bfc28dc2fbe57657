"""Containment: no message from any peer ends or stalls a producer, and a flood of bad ones costs
a bounded number of replies and log lines. Raw DEALER peers against the real server."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from lensfeed.common import protocol as P
from lensfeed.common.config import load_config
from lensfeed.common.spec import DataSpec
from lensfeed.producer.fake import FakeProducer
from lensfeed.producer.peers import PeerGuard
from tests._peer import WAIT_S, RawPeer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def spec() -> DataSpec:
    return DataSpec.from_config(
        load_config(None, ["batch_size=2", "dataset.on_the_fly.samples_per_regeneration_cycle=8"])
    )


@pytest.fixture
def fake(tmp_path: Path, spec: DataSpec):
    with FakeProducer(f"ipc://{tmp_path}/srv.sock", spec=spec, shard_rows=20) as fp:
        yield fp


@pytest.fixture
def peers(fake: FakeProducer):
    made: list[RawPeer] = []

    def make() -> RawPeer:
        made.append(RawPeer(fake.endpoint))
        return made[-1]

    yield make
    for p in made:
        p.close()


def served(peer: RawPeer, spec: DataSpec) -> None:
    """A legitimate session still gets a whole cycle."""
    peer.hello(spec)
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=0, batch=0)
    assert peer.expect(P.CYCLE_START)["batches"] == 4
    got = 0
    while got < 4:
        got += peer.expect(P.BATCH)["count"]
    peer.expect(P.CYCLE_END)


def _nested(depth: int) -> Any:
    value: Any = ["x"]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("shuffle", 1, "'shuffle' must be a bool"),
        ("seed", 0.0, "'seed' must be an int"),
        ("batch_size", True, "'batch_size' must be an int"),
        ("columns", "input_ids", "'columns' must be a list"),
        ("columns", _nested(600), "'columns' must be a list"),
        ("dataset", _nested(900), "'dataset' must be a string"),
    ],
)
def test_spec_values_of_the_wrong_type_are_refused_even_with_our_fingerprint(
    fake: FakeProducer, peers, spec: DataSpec, field: str, value: Any, needle: str
) -> None:
    """``shuffle: 1 == True`` used to compare equal and be welcomed; a list nested 600 deep
    raised RecursionError while being compared, which ended the producer."""
    bad = peers()
    bad.hello(spec, spec={**spec.to_dict(), field: value}, fingerprint=spec.fingerprint())
    err = bad.expect(P.ERROR)
    assert err["fatal"] is True
    assert needle in err["message"]
    served(peers(), spec)
    assert fake._thread.is_alive()


def test_a_session_that_is_taken_over_is_told(fake: FakeProducer, peers, spec: DataSpec) -> None:
    """The old session fails at once with the reason instead of waiting for data forever."""
    first, second = peers(), peers()
    first.hello(spec, session=1)
    first.expect(P.WELCOME)
    second.hello(spec, session=2)
    second.expect(P.WELCOME)
    err = first.expect(P.ERROR)
    assert (err["code"], err["fatal"], err[P.SESSION]) == ("state_mismatch", True, 1)
    assert "took over this producer's session" in err["message"]
    second.send(P.NEXT_CYCLE, cycle=0, batch=0)
    assert second.expect(P.CYCLE_START)["cycle"] == 0


def test_the_largest_cursor_in_range_is_served_or_refused_never_fatal(
    fake: FakeProducer, peers, spec: DataSpec
) -> None:
    peer = peers()
    peer.hello(spec, cycle=P.MAX_COUNTER)
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=P.MAX_COUNTER, batch=3)
    start = peer.expect(P.CYCLE_START)
    assert start["cycle"] == P.MAX_COUNTER
    served(peers(), spec)


def test_an_unexpected_exception_is_answered_and_contained(
    fake: FakeProducer, peers, spec: DataSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = fake.server._next_cycle

    def broken_once(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        real(*args)

    monkeypatch.setattr(fake.server, "_next_cycle", broken_once)
    peer = peers()
    peer.hello(spec)
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=0, batch=0)
    err = peer.expect(P.ERROR)
    assert (err["code"], err["fatal"]) == ("protocol", False)
    assert "could not handle 'next_cycle' (RuntimeError)" in err["message"]
    peer.send(P.NEXT_CYCLE, cycle=0, batch=0)
    assert peer.expect(P.CYCLE_START)["cycle"] == 0
    assert fake._thread.is_alive()


def test_a_flood_gets_bounded_replies_and_log_lines_and_never_stalls_the_session(
    fake: FakeProducer, peers, spec: DataSpec, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lensfeed.producer")
    legit, flooder = peers(), peers()
    legit.hello(spec, credits=4)
    legit.expect(P.WELCOME)
    t0 = time.monotonic()
    garbage = [msgpack.packb({"v": 1, "kind": "credit", "n": "x"}), b"\xc1", b"\x00" * 64]
    for i in range(3000):
        flooder.sock.send_multipart([garbage[i % 3]])
    # The session is served while the flood is being handled.
    legit.send(P.NEXT_CYCLE, cycle=0, batch=0)
    assert legit.expect(P.CYCLE_START)["cycle"] == 0
    assert legit.expect(P.BATCH)["count"] >= 1
    # Every bad message is counted once handled; then look at what the flooder got.
    deadline = time.monotonic() + WAIT_S
    while fake.server.guard.total_bad < 3000 and time.monotonic() < deadline:
        flooder.sock.poll(50)
    assert fake.server.guard.total_bad == 3000
    elapsed = time.monotonic() - t0
    replies = flooder.drain()
    guard = fake.server.guard
    assert 0 < replies <= guard.burst + guard.rate * elapsed + 1
    lines = [r for r in caplog.records if r.name == "lensfeed.producer"]
    assert len(lines) <= guard.log_budget + 1  # the detailed lines, then "counted, not logged"


def test_peer_guard_summarises_what_it_did_not_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lensfeed.producer")
    now = [0.0]
    guard = PeerGuard(log_lines_per_min=2, summary_every_s=60, clock=lambda: now[0])
    for i in range(10):
        guard.bad(b"\x01", "bad %d", i)
    assert len(caplog.records) == 3  # 2 detailed + "counted, not logged"
    now[0] = 61.0
    guard.tick()
    summary = caplog.records[-1].message
    assert "10 bad messages from 1 peers in the last 61 s (8 not logged" in summary
    guard.tick()  # nothing new: no line
    assert len(caplog.records) == 4
    # Per-peer state is bounded whatever the number of identities.
    small = PeerGuard(max_peers=8, clock=lambda: now[0])
    for i in range(1000):
        small.may_reply(i.to_bytes(4, "big"))
    assert len(small._buckets) == 8


def test_a_frame_bigger_than_any_header_is_dropped_with_its_connection(
    peers, spec: DataSpec
) -> None:
    """A producer only ever receives headers: libzmq drops a bigger frame (MAXMSGSIZE), and the
    connection, before allocating it, so no peer can make it hold 1000 frames of any size. The
    legitimate session is served as before."""
    bad = peers()
    monitor = bad.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        bad.send_raw(msgpack.packb({"v": 1, "kind": "credit", "n": 1, "pad": b"x" * (1 << 20)}))
        assert monitor.poll(int(WAIT_S * 1000)), "the producer kept the connection"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        bad.sock.disable_monitor()
        monitor.close(linger=0)
    served(peers(), spec)
