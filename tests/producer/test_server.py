"""The producer server: protocol behaviour against a raw DEALER (in-process, real server with a
fake source) and the real ``python -m producer`` process with a FeedClient."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from lensfeed.common import protocol as P
from lensfeed.common.config import FeedConfig, load_config
from lensfeed.common.errors import LensfeedError, RemoteError, ShardError
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.fake import FakeProducer
from lensfeed.producer.listener import bind_socket
from lensfeed.producer.main import build_source, parser, run_producer
from lensfeed.producer.replies import linger_with_error
from lensfeed.producer.server import ProducerServer
from lensfeed.producer.shard import rank_slice
from lensfeed.trainer.client import FeedClient
from tests._peer import WAIT_S, RawPeer
from tests._util import ipc_endpoint, make_dataset, python_cmd

pytestmark = pytest.mark.timeout(90)

WELCOME_FIELDS: dict[str, Any] = {
    "rank": 0,
    "shard_rows": 1,
    "shard_offset": 0,
    "fingerprint": "x",
    "dataset_fingerprint": "y",
}


def small_spec(**over: object) -> DataSpec:
    base = {
        "batch_size": 2,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 7,
        "training_initial_cache_size_per_rank": 4,
        "seed": 3,
    }
    base.update(over)
    return DataSpec.from_config(load_config(None, [f"{k}={v}" for k, v in base.items()]))


@pytest.fixture
def spec() -> DataSpec:
    return small_spec()  # cycle 0: 2 batches, then 3 batches per cycle


@pytest.fixture
def fake(tmp_path: Path, spec: DataSpec):
    with FakeProducer(f"ipc://{tmp_path}/srv.sock", spec=spec, rank=0, shard_rows=5) as fp:
        yield fp


@pytest.fixture
def peer(fake: FakeProducer):
    p = RawPeer(fake.endpoint)
    yield p
    p.close()


def serve_in_thread(fp: FakeProducer) -> None:
    """Wait (bounded) until the fake's serve loop returned."""
    fp._thread.join(WAIT_S)
    assert not fp._thread.is_alive(), "server did not stop"


# --------------------------------------------------------------------------- handshake


def test_hello_gets_welcome(peer: RawPeer, spec: DataSpec) -> None:
    peer.hello(spec)
    w = peer.expect(P.WELCOME)
    assert w["rank"] == 0
    assert w["shard_rows"] == 5
    assert w["shard_offset"] == 0
    assert w["fingerprint"] == spec.fingerprint()
    assert w["dataset_fingerprint"] == "fake-5"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"batch_size": 4}, "batch_size: 4 vs 2"),
        ({"seed": 9}, "seed: 9 vs 3"),
        ({"dataset.on_the_fly.shuffle": "false"}, "shuffle: False vs True"),
        ({"dataset.path": "other"}, "dataset: 'other' vs 'data/demo'"),
    ],
)
def test_mismatched_spec_is_refused_naming_both_values(
    peer: RawPeer, change: dict[str, object], needle: str
) -> None:
    peer.hello(small_spec(**change))
    err = peer.expect(P.ERROR)
    assert err["code"] == "state_mismatch"
    assert err["fatal"] is True
    assert "(trainer vs producer)" in err["message"]
    assert needle in err["message"]


def test_same_spec_with_wrong_fingerprint_is_refused(peer: RawPeer, spec: DataSpec) -> None:
    peer.hello(spec, fingerprint="0000000000000000")
    err = peer.expect(P.ERROR)
    assert err["code"] == "state_mismatch"
    assert f"fingerprint 0000000000000000 vs {spec.fingerprint()}" in err["message"]


def test_wrong_rank_is_refused(peer: RawPeer, spec: DataSpec) -> None:
    peer.hello(spec, rank=1)
    err = peer.expect(P.ERROR)
    assert err["code"] == "state_mismatch"
    assert "trainer rank 1 connected to the producer of rank 0" in err["message"]


@pytest.mark.parametrize(
    ("spec_field", "needle"),
    [({"batch_size": 2}, "malformed data spec"), ({"columns": 5}, "malformed data spec")],
)
def test_malformed_spec_is_a_protocol_error(
    peer: RawPeer, spec: DataSpec, spec_field: dict[str, Any], needle: str
) -> None:
    bad = spec.to_dict() if "columns" in spec_field else {}
    bad.update(spec_field)
    peer.hello(spec, spec=bad)
    err = peer.expect(P.ERROR)
    assert err["code"] == "protocol"
    assert needle in err["message"]


@pytest.mark.parametrize(("cycle", "batch"), [(-1, 0), (0, 2), (1, 3), (0, -1)])
def test_invalid_resume_cursor_is_refused(
    peer: RawPeer, spec: DataSpec, cycle: int, batch: int
) -> None:
    peer.hello(spec, cycle=cycle, batch=batch)
    err = peer.expect(P.ERROR)
    assert err["code"] == "protocol"
    assert err["fatal"] is True
    if cycle < 0 or batch < 0:  # out of the protocol's range: refused while decoding
        field = "cycle" if cycle < 0 else "batch"
        assert f"field '{field}' must be in [0, " in err["message"]
    else:
        assert f"cursor (cycle {cycle}, batch {batch}) is invalid" in err["message"]


def test_messages_before_hello_are_refused(peer: RawPeer) -> None:
    for kind, fields in [(P.CREDIT, {"n": 1}), (P.NEXT_CYCLE, {"cycle": 0, "batch": 0})]:
        peer.send(kind, **fields)
        err = peer.expect(P.ERROR)
        assert err["code"] == "protocol"
        assert err["fatal"] is False
        assert f"'{kind}' before hello" in err["message"]


def test_wrong_version_and_garbage_get_errors_and_serving_goes_on(
    peer: RawPeer, spec: DataSpec
) -> None:
    peer.send_raw(msgpack.packb({"v": 999, "kind": "hello"}))
    err = peer.expect(P.ERROR)
    # A hello that cannot be read is refused for good: its client must fail now, not time out.
    assert (err["code"], err["fatal"]) == ("protocol", True)
    assert "peer speaks 999" in err["message"]
    assert "this side speaks 1" in err["message"]
    peer.send_raw(b"\x00\xffgarbage", b"more")
    assert peer.expect(P.ERROR)["code"] == "protocol"
    peer.send(P.WELCOME, **WELCOME_FIELDS)
    assert "before hello" in peer.expect(P.ERROR)["message"]
    peer.hello(spec)
    peer.expect(P.WELCOME)
    peer.send(P.WELCOME, **WELCOME_FIELDS)
    assert "unexpected 'welcome' from trainer" in peer.expect(P.ERROR)["message"]
    peer.send(P.CREDIT, n=-1)
    assert "field 'n' must be in [0, " in peer.expect(P.ERROR)["message"]
    peer.send(P.NEXT_CYCLE, cycle=0, batch=7)
    err = peer.expect(P.ERROR)
    assert err["fatal"] is False
    assert "batch in [0, 2)" in err["message"]
    peer.send(P.NEXT_CYCLE, cycle=0, batch=0)
    assert peer.expect(P.CYCLE_START)["cycle"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_unhashable_kind_does_not_kill_the_server(
    fake: FakeProducer, peer: RawPeer, spec: DataSpec
) -> None:
    peer.send_raw(msgpack.packb({"v": 1, "kind": ["hello"]}))
    peer.hello(spec)
    # Either an ERROR for the bad message then a WELCOME, or just the WELCOME: the server lives.
    kinds = [peer.recv(2).kind]
    if kinds[0] == P.ERROR:
        kinds.append(peer.recv(2).kind)
    assert kinds[-1] == P.WELCOME


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_uint16_token_column_is_served_or_reported(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", rows=8, dtype="uint16")
    over = [
        "world_size=1",
        "batch_size=2",
        f"dataset.path={data}",
        "dataset.on_the_fly.samples_per_regeneration_cycle=4",
        f"feed.endpoint=ipc://{tmp_path}/u16.sock",
    ]
    cfg = load_config(None, over)
    spec = DataSpec.from_config(cfg)
    try:
        source = build_source(cfg, 0)
    except ShardError as exc:  # refusing the column up front is fine, if it says why
        refused = str(exc)
    else:
        refused = ""
    if refused:
        assert "uint16" in refused
        return
    ctx = zmq.Context()
    sock = bind_socket(ctx, cfg.bind_for(0))
    server = ProducerServer(source, sock=sock, feed=cfg.feed)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with FeedClient(cfg.endpoint_for(0), rank=0, spec=spec, timeout_s=3) as feed:
            try:
                batches = list(feed.next_cycle())
            except RemoteError as exc:  # or the trainer is told, not left to time out
                told = str(exc)
            else:
                told = ""
                assert batches[0]["input_ids"].shape == (2, 8)
        assert not told or "uint16" in told
    finally:
        server.stop()
        thread.join(WAIT_S)
        sock.close(linger=0)
        ctx.term()


# --------------------------------------------------------------------------- streaming


def test_cycle_start_batches_and_cycle_end(peer: RawPeer, spec: DataSpec) -> None:
    cursor = CycleCursor(spec, rank=0, shard_rows=5)
    peer.hello(spec)
    peer.expect(P.WELCOME)
    seq = 0
    for k in range(3):
        peer.send(P.NEXT_CYCLE, cycle=k, batch=0)
        start = peer.expect(P.CYCLE_START)
        info = cursor.info(k)
        assert start.header == {
            "v": 1,
            "kind": P.CYCLE_START,
            "rank": 0,
            "cycle": k,
            "batches": info.batches,
            "start_batch": 0,
            "wraps": info.wraps,
            "total_wraps": info.total_wraps,
            "shard_pos": info.shard_pos,
            "shard_rows": 5,
            "prepared_ahead": start["prepared_ahead"],
        }
        assert isinstance(start["prepared_ahead"], bool)
        j = 0
        while j < info.batches:  # consecutive batches may share a message ("count")
            b = peer.expect(P.BATCH)
            n = b["count"]
            assert (b["rank"], b["cycle"], b["batch"], b["seq"]) == (0, k, j, seq)
            seq += 1
            want = [r for i in range(n) for r in cursor.batch_rows(k, j + i).tolist()]
            assert b.tensors["sample_idx"].tolist() == want
            assert b.tensors["input_ids"].shape == (2 * n, 32)
            j += n
        assert j == info.batches
        end = peer.expect(P.CYCLE_END)
        assert (end["rank"], end["cycle"], end["batches"]) == (0, k, info.batches)
        assert end["regen_s"] >= 0
        assert peer.quiet()  # nothing more until the next cycle is asked for


def test_credits_bound_what_is_in_flight(peer: RawPeer, spec: DataSpec) -> None:
    peer.hello(spec, credits=1, cycle=1)  # cycle 1: 3 batches
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=1, batch=0)
    peer.expect(P.CYCLE_START)
    assert peer.expect(P.BATCH)["batch"] == 0
    assert peer.quiet()  # credit spent: the server waits
    peer.send(P.CREDIT, n=2)
    got: list[int] = []
    while len(got) < 2:  # two credits: batches 1 and 2, possibly packed in one message
        b = peer.expect(P.BATCH)
        got += range(b["batch"], b["batch"] + b["count"])
    assert got == [1, 2]
    # CYCLE_END (like ERROR) costs no credit and is sent with none left.
    peer.expect(P.CYCLE_END)
    peer.send(P.NEXT_CYCLE, cycle=2, batch=0)
    peer.expect(P.CYCLE_START)
    assert peer.quiet()  # no credit: no batch of the new cycle either
    peer.send(P.CREDIT, n=1)
    assert peer.expect(P.BATCH)["batch"] == 0
    assert peer.quiet()


def test_zero_credits_send_nothing(peer: RawPeer, spec: DataSpec) -> None:
    peer.hello(spec, credits=0)
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=0, batch=0)
    peer.expect(P.CYCLE_START)
    assert peer.quiet()
    peer.send(P.CREDIT, n=0)
    assert peer.quiet()
    peer.send(P.CREDIT, n=1)
    assert peer.expect(P.BATCH)["batch"] == 0


def test_resume_mid_cycle(peer: RawPeer, spec: DataSpec) -> None:
    cursor = CycleCursor(spec, rank=0, shard_rows=5)
    peer.hello(spec, cycle=2, batch=1, credits=1)  # one credit at a time: one batch per message
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=2, batch=1)
    start = peer.expect(P.CYCLE_START)
    assert (start["cycle"], start["batches"], start["start_batch"]) == (2, 3, 1)
    got = [peer.expect(P.BATCH)]
    peer.send(P.CREDIT, n=1)
    got.append(peer.expect(P.BATCH))
    assert [b["batch"] for b in got] == [1, 2]
    assert [b["seq"] for b in got] == [0, 1]  # seq restarts with each session
    for b in got:
        assert b.tensors["sample_idx"].tolist() == cursor.batch_rows(2, b["batch"]).tolist()
    peer.expect(P.CYCLE_END)


def test_new_hello_replaces_the_session(fake: FakeProducer, spec: DataSpec) -> None:
    a, b = RawPeer(fake.endpoint), RawPeer(fake.endpoint)
    try:
        a.hello(spec, credits=1)
        a.expect(P.WELCOME)
        a.send(P.NEXT_CYCLE, cycle=0, batch=0)
        a.expect(P.CYCLE_START)
        first = a.expect(P.BATCH)
        # A restarted trainer says hello from a new socket with its resume cursor.
        b.hello(spec, cycle=0, batch=1)
        b.expect(P.WELCOME)
        b.send(P.NEXT_CYCLE, cycle=0, batch=1)
        assert b.expect(P.CYCLE_START)["start_batch"] == 1
        second = b.expect(P.BATCH)
        assert (second["batch"], second["seq"]) == (1, 0)
        assert first["batch"] == 0
        b.expect(P.CYCLE_END)
        # The old session is gone, and was told so.
        told = a.expect(P.ERROR)
        assert told["fatal"]
        assert "took over this producer's session" in told["message"]
        a.send(P.CREDIT, n=1)
        assert "before hello" in a.expect(P.ERROR)["message"]
    finally:
        a.close()
        b.close()


def test_next_cycle_out_of_order_restarts_generation(peer: RawPeer, spec: DataSpec) -> None:
    cursor = CycleCursor(spec, rank=0, shard_rows=5)
    peer.hello(spec)
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=3, batch=2)  # skip ahead: what was prepared is dropped
    assert peer.expect(P.CYCLE_START)["start_batch"] == 2
    b = peer.expect(P.BATCH)
    assert (b["cycle"], b["batch"]) == (3, 2)
    assert b.tensors["sample_idx"].tolist() == cursor.batch_rows(3, 2).tolist()
    peer.expect(P.CYCLE_END)


def test_session_is_echoed_and_a_rehello_on_one_connection_is_told_apart(
    peer: RawPeer, spec: DataSpec
) -> None:
    """Docs 6.6: after a second hello on the same connection, what the first session still had
    in flight arrives before the new welcome; the echoed ``session`` tells them apart."""
    peer.hello(spec, credits=2, session=7)
    assert peer.expect(P.WELCOME)[P.SESSION] == 7
    peer.send(P.NEXT_CYCLE, cycle=1, batch=0)
    assert peer.expect(P.CYCLE_START)[P.SESSION] == 7
    peer.hello(spec, cycle=1, batch=1, credits=100, session=8)
    seen = []
    while True:
        msg = peer.recv()
        seen.append((msg.kind, msg[P.SESSION]))
        if msg.kind == P.WELCOME:
            break
    assert all(sess == 7 for kind, sess in seen[:-1]), seen
    assert seen[-1] == (P.WELCOME, 8)
    peer.send(P.NEXT_CYCLE, cycle=1, batch=1)
    start = peer.expect(P.CYCLE_START)
    assert (start["start_batch"], start[P.SESSION]) == (1, 8)
    first = peer.expect(P.BATCH)
    assert (first["cycle"], first["batch"], first["seq"], first[P.SESSION]) == (1, 1, 0, 8)


def test_a_hello_without_session_gets_none_back(peer: RawPeer, spec: DataSpec) -> None:
    peer.hello(spec)
    assert P.SESSION not in peer.expect(P.WELCOME).header


@pytest.mark.parametrize("session", [-1, 1 << 32, "7", True])
def test_an_invalid_session_is_refused(peer: RawPeer, spec: DataSpec, session: object) -> None:
    peer.hello(spec, session=session)
    err = peer.expect(P.ERROR)
    assert "session" in err["message"]
    assert err["fatal"]  # a malformed hello is refused for good


def test_next_cycle_while_a_cycle_is_unfinished_abandons_it(peer: RawPeer, spec: DataSpec) -> None:
    """Docs 6.3: the unfinished cycle gets no more batches and no cycle_end; what it had already
    sent precedes the new cycle_start, and everything after it belongs to the new cycle."""
    cursor = CycleCursor(spec, rank=0, shard_rows=5)
    peer.hello(spec, credits=1)
    peer.expect(P.WELCOME)
    peer.send(P.NEXT_CYCLE, cycle=1, batch=0)
    peer.expect(P.CYCLE_START)
    assert peer.expect(P.BATCH)["batch"] == 0  # one credit: batches 1, 2 of cycle 1 are owed
    peer.send(P.NEXT_CYCLE, cycle=2, batch=0)
    peer.send(P.CREDIT, n=100)
    start = peer.expect(P.CYCLE_START)
    assert (start["cycle"], start["start_batch"]) == (2, 0)
    after = []
    while (msg := peer.recv()).kind != P.CYCLE_END:
        after.append(msg)
    assert msg["cycle"] == 2
    assert [(m["cycle"], m["batch"]) for m in after] == [(2, b) for b in range(len(after))]
    got = [r for m in after for r in m.tensors["sample_idx"].tolist()]
    assert got == [r for b in range(3) for r in cursor.batch_rows(2, b).tolist()]
    assert peer.quiet()


def test_startup_error_linger_answers_every_message_until_it_ends(
    tmp_path: Path, spec: DataSpec
) -> None:
    """Docs 6.5: a producer that cannot start answers *every* message, from every peer, for
    the whole linger (a trainer that retries learns the cause), then returns."""
    ctx = zmq.Context()
    sock = bind_socket(ctx, f"ipc://{tmp_path}/linger.sock")
    peers = [RawPeer(f"ipc://{tmp_path}/linger.sock") for _ in range(2)]
    err = ShardError("dataset /nope not found")
    t = threading.Thread(target=linger_with_error, args=(sock, err), kwargs={"linger_s": 3.0})
    t.start()
    try:
        for i in range(3):  # a hello, then a retry, from each of two trainers
            for peer in peers:
                peer.hello(spec, session=i)
                got = peer.expect(P.ERROR)
                assert (got["code"], got["fatal"], got[P.SESSION]) == ("shard", True, i)
                assert "/nope" in got["message"]
        t.join(WAIT_S)
        assert not t.is_alive()
    finally:
        for peer in peers:
            peer.close()
        sock.close(linger=0)
        ctx.term()


def test_bye_stops_a_producer_that_exits_on_bye(tmp_path: Path, spec: DataSpec) -> None:
    fp = FakeProducer(f"ipc://{tmp_path}/bye.sock", spec=spec, feed=FeedConfig(exit_on_bye=True))
    fp.start()
    peer = RawPeer(fp.endpoint)
    try:
        peer.send(P.BYE)  # before hello: refused, and the server keeps going
        assert "before hello" in peer.expect(P.ERROR)["message"]
        peer.hello(spec)
        peer.expect(P.WELCOME)
        peer.send(P.BYE)
        serve_in_thread(fp)
        assert fp.exit_code == 0
    finally:
        peer.close()
        fp.stop()


def test_bye_keeps_a_shared_producer_serving(fake: FakeProducer, spec: DataSpec) -> None:
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=WAIT_S) as feed:
        list(feed.next_cycle())
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=WAIT_S) as feed:
        assert len(list(feed.next_cycle())) == 2
    assert fake._thread.is_alive()


def test_idle_timeout_exits_with_code_2(tmp_path: Path, spec: DataSpec) -> None:
    fp = FakeProducer(
        f"ipc://{tmp_path}/idle.sock",
        spec=spec,
        feed=FeedConfig(idle_timeout_s=0.2, exit_on_bye=False),
    )
    fp.start()
    try:
        serve_in_thread(fp)
        assert fp.exit_code == 2
    finally:
        fp.stop()


def test_tcp_loopback_with_an_ephemeral_port(spec: DataSpec) -> None:
    with FakeProducer("tcp://127.0.0.1:0", spec=spec, shard_rows=5) as fp:
        assert fp.endpoint.startswith("tcp://127.0.0.1:")
        assert not fp.endpoint.endswith(":0")
        with FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=WAIT_S) as feed:
            assert [len(list(c)) for c in feed.cycles(2)] == [2, 3]


def test_bind_failure_names_the_endpoint(tmp_path: Path) -> None:
    ctx = zmq.Context()
    try:
        with pytest.raises(
            LensfeedError, match=r"cannot bind producer endpoint tcp://256\.1\.1\.1"
        ):
            bind_socket(ctx, "tcp://256.1.1.1:5555")
        sock = bind_socket(ctx, f"ipc://{tmp_path}/deep/er/x.sock")  # creates the directory
        sock.close()
    finally:
        ctx.term()


def test_the_activation_builder_refuses_input_ids_that_are_not_sequences(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "flat"
    datasets.Dataset.from_dict({"input_ids": list(range(20))}).save_to_disk(str(path))
    cfg = load_config(None, [f"dataset.path={path}", "activations.builder=activations"])
    with pytest.raises(ShardError, match="list<int> rows \\(here: one int per row\\)"):
        build_source(cfg, 0)


def test_an_unexpected_start_up_error_is_told_to_the_trainer_too(
    tmp_path: Path, spec: DataSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docs 6.5 for any exception, not only lensfeed's own: the trainer learns it (code
    'internal') instead of timing out, and the producer exits 1 after the linger."""
    import lensfeed.producer.main as producer_main

    def broken(cfg: Any, rank: int) -> Any:
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(producer_main, "build_source", broken)
    endpoint = f"ipc://{tmp_path}/start.sock"
    cfg = load_config(None, ["world_size=1", f"feed.endpoint={endpoint}", "feed.error_linger_s=2"])
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(run_producer(cfg, 0)))
    t.start()
    peer = RawPeer(endpoint)
    try:
        peer.hello(spec)
        got = peer.expect(P.ERROR)
        assert (got["code"], got["fatal"]) == ("internal", True)
        assert "IndexError" in got["message"]
        t.join(WAIT_S)
        assert codes == [1]
    finally:
        peer.close()


def test_rank_outside_world_size_is_refused() -> None:
    cfg = load_config(None, ["world_size=2", "feed.endpoint=ipc:///tmp/lensfeed-t/{rank}.sock"])
    with pytest.raises(LensfeedError, match="--rank 2 is outside world_size 2"):
        run_producer(cfg, 2)


def test_help_lists_every_option_in_process() -> None:
    text = parser().format_help()
    for action in parser()._actions:
        for opt in action.option_strings:
            assert opt in text
    assert "key=value" in text


# --------------------------------------------------------------------------- real process


def overrides(data: Path, tmp_path: Path, **extra: object) -> list[str]:
    base: dict[str, object] = {
        "world_size": 2,
        "batch_size": 4,
        "seed": 3,
        "dataset.path": data,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 10,
        "training_initial_cache_size_per_rank": 12,
        "feed.endpoint": ipc_endpoint(tmp_path),
        "feed.timeout_s": 30,
        "feed.error_linger_s": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.slow
def test_producer_process_serves_two_cycles(procs, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", rows=11, seq_len=6)
    over = overrides(data, tmp_path)
    cfg = load_config(None, over)
    spec = DataSpec.from_config(cfg)
    # The rank comes from $RANK (torchrun's variable) when --rank is not given.
    p = procs.start(python_cmd("lensfeed.producer", *over), RANK="1")
    start, end = rank_slice(11, 1, 2)  # rows 6..10
    cursor = CycleCursor(spec, rank=1, shard_rows=end - start)
    seen: list[tuple[int, int, list[int]]] = []
    with FeedClient(cfg.endpoint_for(1), rank=1, spec=spec, timeout_s=30) as feed:
        for cycle in feed.cycles(2):
            assert cycle.meta["wraps"] == cursor.info(cycle.index).wraps
            for j, batch in enumerate(cycle):
                idx = batch["sample_idx"].tolist()
                seen.append((cycle.index, j, idx))
                ids = batch["input_ids"].numpy()
                assert ids.shape == (4, 6)
                np.testing.assert_array_equal(ids[:, 0], np.asarray(idx) * 1000)
        assert feed.welcome["shard_offset"] == start
        assert feed.welcome["shard_rows"] == end - start
    expected = [
        (k, j, (cursor.batch_rows(k, j) + start).tolist())
        for k in range(2)
        for j in range(spec.batches_in_cycle(k))
    ]
    assert seen == expected
    assert len(seen) == 3 + 2  # 12 // 4, then 10 // 4
    code, out = procs.wait(p, timeout=30)  # the client's BYE ends the producer
    assert code == 0, out
    assert cfg.endpoint_for(1) in out
    assert "rank 1/2" in out
    assert "shard rows 5 (global 6..10)" in out
    assert "cycle size 10 (first 12)" in out
    assert "2 batches per cycle" in out
    assert "wraps the shard" in out  # 5 rows < 12 samples per cycle
    assert "trainer said goodbye" in out
    assert "exit 0" in out


@pytest.mark.slow
def test_empty_shard_is_reported_to_the_trainer(procs, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", rows=1)
    over = overrides(data, tmp_path)
    cfg = load_config(None, over)
    p = procs.start(python_cmd("lensfeed.producer", "--rank", "1", *over))
    with (
        FeedClient(
            cfg.endpoint_for(1), rank=1, spec=DataSpec.from_config(cfg), timeout_s=30
        ) as feed,
        pytest.raises(RemoteError) as exc_info,
    ):
        feed.connect()
    err = exc_info.value
    assert err.code == "empty_shard"
    assert err.rank == 1
    msg = str(err)
    assert str(data) in msg
    assert "rank 1 of 2" in msg
    assert "shard is empty" in msg
    code, out = procs.wait(p, timeout=30)
    assert code == 1, out
    assert "shard is empty" in out
    assert "told a trainer" in out


@pytest.mark.slow
def test_producer_process_refuses_bad_peers_and_keeps_serving(procs, tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", rows=8)
    over = overrides(data, tmp_path, world_size=1)
    cfg = load_config(None, over)
    spec = DataSpec.from_config(cfg)
    endpoint = cfg.endpoint_for(0)
    p = procs.start(python_cmd("lensfeed.producer", *over))
    # 1. A client from the future: HELLO with v=999.
    raw = RawPeer(endpoint)
    try:
        hello = {"v": 999, "kind": "hello", "rank": 0, "spec": spec.to_dict(), "credits": 4}
        raw.send_raw(msgpack.packb(hello))
        err = raw.expect(P.ERROR, timeout=30)
        assert err["code"] == "protocol"
        assert "peer speaks 999" in err["message"]
        assert "this side speaks 1" in err["message"]
        # 2. Garbage frames.
        raw.send_raw(b"\x93\x01\x02", b"\x00" * 10)
        assert raw.expect(P.ERROR)["code"] == "protocol"
    finally:
        raw.close()
    # 3. Clients whose config differs: the error names both values.
    for change, needle in [("batch_size=2", "batch_size: 2 vs 4"), ("seed=8", "seed: 8 vs 3")]:
        other = DataSpec.from_config(load_config(None, [*over, change]))
        with (
            FeedClient(endpoint, rank=0, spec=other, timeout_s=30) as bad,
            pytest.raises(RemoteError) as exc_info,
        ):
            bad.connect()
        assert exc_info.value.code == "state_mismatch"
        assert needle in str(exc_info.value)
    # 4. A proper client is still served.
    with FeedClient(endpoint, rank=0, spec=spec, timeout_s=30) as feed:
        cycle = feed.next_cycle()
        idx = [b["sample_idx"].tolist() for b in cycle]
    cursor = CycleCursor(spec, rank=0, shard_rows=8)
    assert idx == [cursor.batch_rows(0, j).tolist() for j in range(3)]
    code, out = procs.wait(p, timeout=30)
    assert code == 0, out
    assert "protocol version mismatch" in out
    assert "refused trainer" in out


@pytest.mark.slow
def test_producer_help_mentions_every_option(procs) -> None:
    p = procs.start(python_cmd("lensfeed.producer", "--help"))
    code, out = procs.wait(p, timeout=60)
    assert code == 0, out
    for opt in ["--config", "-c", "--rank", "--cpus", "key=value", "$RANK", "-h", "--help"]:
        assert opt in out
    for action in parser()._actions:
        for opt in action.option_strings:
            assert opt in out
