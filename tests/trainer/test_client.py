"""FeedClient against the in-process fake producer: batches, cursor, resume, errors, cleanup."""

from __future__ import annotations

import gc
import hashlib
import json

import pytest
import torch
import zmq

from lensfeed.common.config import FeedConfig, load_config
from lensfeed.common.errors import (
    ConfigError,
    LensfeedError,
    ProducerTimeoutError,
    RemoteError,
    StateMismatchError,
)
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.fake import FakeProducer
from lensfeed.trainer.client import FeedClient
from lensfeed.trainer.credits import QUEUE_SLACK

pytestmark = pytest.mark.timeout(60)


def make_spec(**over: object) -> DataSpec:
    base = {"batch_size": 4, "dataset.on_the_fly.samples_per_regeneration_cycle": 18, "seed": 3}
    base.update(over)
    return DataSpec.from_config(load_config(None, [f"{k}={v}" for k, v in base.items()]))


def digest(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(batch):
        h.update(name.encode() + batch[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def consume(feed: FeedClient, num_cycles: int, stop_after: int | None = None) -> list[tuple]:
    """(cycle, batch, sample_idx, digest) for each consumed batch, optionally stopping early."""
    seen: list[tuple] = []
    for cycle in feed.cycles(num_cycles):
        for j, batch in enumerate(cycle):
            b = cycle.start_batch + j
            seen.append((cycle.index, b, batch["sample_idx"].tolist(), digest(batch)))
            if stop_after is not None and len(seen) == stop_after:
                return seen
    return seen


@pytest.fixture
def spec() -> DataSpec:
    return make_spec()


@pytest.fixture
def fake(tmp_path, spec):
    with FakeProducer(f"ipc://{tmp_path}/fake.sock", spec=spec, rank=0, shard_rows=7) as fp:
        yield fp


def test_batches_follow_the_cursor(fake, spec):
    cursor = CycleCursor(spec, rank=0, shard_rows=7)
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        seen = consume(feed, 3)
        meta = [feed.welcome["shard_rows"]]
    assert meta == [7]
    assert [(c, b) for c, b, _, _ in seen] == [(c, b) for c in range(3) for b in range(4)]
    for c, b, idx, _ in seen:
        assert idx == cursor.batch_rows(c, b).tolist()  # fake shard offset is 0 for rank 0


def test_cycle_metadata_reports_wraps(fake, spec):
    cursor = CycleCursor(spec, rank=0, shard_rows=7)
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        for cycle in feed.cycles(2):
            info = cursor.info(cycle.index)
            assert cycle.num_batches == 18 // 4
            assert cycle.wraps == info.wraps
            assert cycle.meta["total_wraps"] == info.total_wraps
            assert cycle.meta["shard_pos"] == info.shard_pos
            list(cycle)


def test_state_dict_is_flat_json_and_counts_only_consumed(fake, spec):
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10, prefetch=4) as feed:
        cycle = feed.next_cycle()
        it = iter(cycle)
        next(it)
        # Up to `prefetch` batches are already received, but only one was consumed.
        state = feed.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["cycle"] == 0
    assert state["batch"] == 1
    assert state["fingerprint"] == spec.fingerprint()


def test_resume_midway_equals_uninterrupted_run(fake, spec):
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        full = consume(feed, 3)
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        first = consume(feed, 3, stop_after=6)  # cycle 1, batch 1
        state = feed.state_dict()
    assert (state["cycle"], state["batch"]) == (1, 2)
    resumed = FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    with resumed:
        rest = consume(resumed, 3)
    assert first + rest == full


def test_resume_at_cycle_boundary(fake, spec):
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        full = consume(feed, 2)
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        first = consume(feed, 1)
        state = feed.state_dict()
    assert (state["cycle"], state["batch"]) == (1, 0)
    feed = FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10)
    feed.load_state_dict(state)
    with feed:
        assert first + consume(feed, 2) == full


def test_state_from_other_config_is_refused(spec):
    other = make_spec(seed=4)
    feed = FeedClient("ipc:///nonexistent", rank=0, spec=spec)
    state = FeedClient("ipc:///nonexistent", rank=0, spec=other).state_dict()
    with pytest.raises(StateMismatchError, match="fingerprint"):
        feed.load_state_dict(state)


def test_mismatched_spec_is_refused_naming_both_values(fake):
    other = make_spec(batch_size=2)
    with (
        FeedClient(fake.endpoint, rank=0, spec=other, timeout_s=10) as feed,
        pytest.raises(RemoteError, match=r"batch_size: 2 vs 4") as info,
    ):
        feed.next_cycle()
    assert info.value.code == "state_mismatch"


def test_asking_for_next_cycle_before_finishing_is_an_error(fake, spec):
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        cycle = feed.next_cycle()
        next(iter(cycle))
        with pytest.raises(LensfeedError, match="unconsumed"):
            feed.next_cycle()


def test_absent_producer_times_out_naming_endpoint_and_rank(tmp_path, spec):
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    with (
        FeedClient(endpoint, rank=0, spec=spec, timeout_s=0.5) as feed,
        pytest.raises(ProducerTimeoutError) as info,
    ):
        feed.next_cycle()
    assert endpoint in str(info.value)
    assert "rank 0" in str(info.value)


def test_silent_producer_times_out(tmp_path, spec):
    with (
        FakeProducer(f"ipc://{tmp_path}/slow.sock", spec=spec, delay_s=5.0) as fp,
        FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=0.5) as feed,
    ):
        cycle = feed.next_cycle()
        with pytest.raises(ProducerTimeoutError, match="batch 0 of cycle 0"):
            next(iter(cycle))


def test_producer_error_in_cycle_k_surfaces_after_earlier_cycles(tmp_path, spec):
    with (
        FakeProducer(f"ipc://{tmp_path}/err.sock", spec=spec, error_at_cycle=2) as fp,
        FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=10) as feed,
    ):
        consumed: list[int] = []

        def run() -> None:
            for cycle in feed.cycles(4):
                consumed.extend(cycle.index for _ in cycle)

        with pytest.raises(RemoteError, match="injected error at cycle 2") as info:
            run()
    assert info.value.code == "empty_shard"
    assert set(consumed) == {0, 1}


def test_cleanup_runs_gc_and_empty_cache_each_cycle(fake, spec, monkeypatch):
    full_collections = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full_collections.append(1)

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    gc.unfreeze()  # other tests' clients froze the set-up objects already
    gc.callbacks.append(on_gc)
    try:
        with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
            feed.connect()
            # set-up objects frozen at connect: the first boundary need not rescan them
            assert gc.get_freeze_count() > 0
            consume(feed, 3)
            assert feed.stats.cleanups == 3
    finally:
        gc.callbacks.remove(on_gc)
    assert len(emptied) == 3
    assert len(full_collections) >= 3


def test_cleanup_can_be_disabled(fake, spec, monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    gc.unfreeze()
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10, cleanup_each_cycle=False) as f:
        consume(f, 2)
        assert f.stats.cleanups == 0
    assert emptied == []
    assert gc.get_freeze_count() == 0  # nor frozen anything


def test_wait_time_is_recorded(tmp_path, spec):
    with (
        FakeProducer(f"ipc://{tmp_path}/delay.sock", spec=spec, delay_s=0.02) as fp,
        FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=10) as feed,
    ):
        consume(feed, 1)
        # 4 batches at 20 ms each cannot arrive before the loop asks for them.
        assert feed.stats.wait_s >= 0.04
        assert feed.stats.batches == 4
        assert feed.stats.samples == 16


@pytest.mark.parametrize("per_message", [0, 1, 3])
def test_packed_messages_yield_the_same_batches(tmp_path, spec, per_message):
    """Several batches per message (auto or fixed) are split back into identical batches."""
    feed_cfg = FeedConfig(exit_on_bye=False, batches_per_message=per_message)
    with (
        FakeProducer(f"ipc://{tmp_path}/a.sock", spec=spec, shard_rows=7) as plain,
        FeedClient(plain.endpoint, rank=0, spec=spec, prefetch=1, timeout_s=10) as feed,
    ):
        reference = consume(feed, 3)  # prefetch 1: one batch per message
    with (
        FakeProducer(f"ipc://{tmp_path}/b.sock", spec=spec, shard_rows=7, feed=feed_cfg) as fp,
        FeedClient(fp.endpoint, rank=0, spec=spec, prefetch=8, timeout_s=10) as feed,
    ):
        assert consume(feed, 3) == reference
        assert feed.stats.batches == 12


def test_the_queue_libzmq_may_hold_follows_the_credit_window(fake, spec):
    """libzmq's receive queue (RCVHWM) is the credit window plus a few control messages: small
    until the first batch shows its size, then what ``prefetch_bytes`` allows, on the live
    socket and on any opened after a loss."""

    def rcvhwm(feed: FeedClient) -> int:
        return feed._session.conn.sock.getsockopt(zmq.RCVHWM)

    with FeedClient(
        fake.endpoint, rank=0, spec=spec, timeout_s=10, prefetch=1000, prefetch_bytes=4096
    ) as feed:
        feed.connect()
        assert rcvhwm(feed) == 4 + QUEUE_SLACK  # hello grants min(prefetch, 4)
        first = next(iter(feed.next_cycle()))
        nbytes = sum(t.numel() * t.element_size() for t in first.values())
        window = min(1000, 4096 // nbytes)
        assert 4 < window < 1000
        assert rcvhwm(feed) == window + QUEUE_SLACK
        assert feed._session.max_queued == window + QUEUE_SLACK  # for the next connection


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1", "ipc:///tmp/" + "d" * 120 + "/x.sock"])
def test_an_endpoint_libzmq_refuses_is_a_config_error_and_close_returns(spec, endpoint):
    """Given straight to FeedClient (no config check): a ConfigError naming the endpoint, again
    at every later call, and close() returns instead of waiting on sockets left open."""
    feed = FeedClient(endpoint, rank=0, spec=spec, timeout_s=5)
    for _ in range(2):
        with pytest.raises(ConfigError, match="cannot connect to"):
            feed.next_cycle()
    feed.close()


def test_stopping_right_after_a_cycles_last_batch_then_next_cycle_goes_on(fake, spec):
    """A loop that breaks out right after the last batch (e.g. max_steps at a boundary) has
    consumed the cycle; next_cycle() takes the pending end itself, and the stream goes on
    exactly as an uninterrupted one."""
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        reference = consume(feed, 2)
    seen = []
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        cycle = feed.next_cycle()
        for j, batch in enumerate(cycle):
            seen.append((0, j, batch["sample_idx"].tolist(), digest(batch)))
            if j == cycle.num_batches - 1:
                break  # the generator never reads the cycle's end
        assert feed.state_dict()["cycle"] == 1
        assert not cycle.done
        nxt = feed.next_cycle()
        assert cycle.done
        assert nxt.index == 1
        seen += [(1, j, b["sample_idx"].tolist(), digest(b)) for j, b in enumerate(nxt)]
    assert seen == reference


def test_a_second_iterator_over_a_cycle_is_refused_and_the_first_goes_on(fake, spec):
    """A second iter() would restart at a batch the producer already sent: refused at once as
    misuse (not blamed on the producer), and the first iterator still ends the cycle."""
    with FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
        cycle = feed.next_cycle()
        it = iter(cycle)
        next(it)
        with pytest.raises(LensfeedError, match="can only be iterated once") as exc_info:
            iter(cycle)
        assert type(exc_info.value) is LensfeedError
        assert sum(1 for _ in it) == cycle.num_batches - 1
        assert cycle.done
        assert feed.next_cycle().index == 1


def test_messages_fit_the_clients_max_message_bytes(tmp_path, spec):
    """The hello states the client's limit and the producer packs to it: auto packing alone
    would send messages of up to 64 batches, which libzmq drops with the connection (a lost
    producer, again at every reconnect). A batch that can never fit is a config error."""
    with (
        FakeProducer(f"ipc://{tmp_path}/a.sock", spec=spec, shard_rows=7) as plain,
        FeedClient(plain.endpoint, rank=0, spec=spec, timeout_s=10) as feed,
    ):
        reference = consume(feed, 3)
        first = next(iter(feed.next_cycle()))
    batch_bytes = sum(t.numel() * t.element_size() for t in first.values())
    feed_cfg = FeedConfig(exit_on_bye=False)
    with (
        FakeProducer(f"ipc://{tmp_path}/b.sock", spec=spec, shard_rows=7, feed=feed_cfg) as fp,
        FeedClient(
            fp.endpoint,
            rank=0,
            spec=spec,
            timeout_s=10,
            reconnect_timeout_s=2,
            max_message_bytes=2 * batch_bytes + 1,
        ) as feed,
    ):
        assert consume(feed, 3) == reference
        assert feed.stats.reconnects == 0
    with FakeProducer(f"ipc://{tmp_path}/c.sock", spec=spec, shard_rows=7, feed=feed_cfg) as fp:
        small = FeedClient(
            fp.endpoint, rank=0, spec=spec, timeout_s=10, max_message_bytes=batch_bytes - 1
        )
        with small, pytest.raises(RemoteError, match=f"a batch of {batch_bytes} bytes exceeds"):
            consume(small, 1)
        # That session ends, not the producer: the next trainer gets the whole stream, from
        # its own cursor (what was read ahead for the refused one was never sent).
        with FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=10) as feed:
            assert consume(feed, 3) == reference
