"""The prefetcher hands out message-sized chunks, splits them to the credit it is given, keeps
its batch budget, and never changes which bytes a (cycle, batch) holds."""

from __future__ import annotations

import numpy as np
import pytest

from lensfeed.producer.ahead import Prefetcher, Ready
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.shard import load_shard
from lensfeed.producer.source import ShardSource
from tests._util import make_dataset, make_spec


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> ShardSource:
    path = make_dataset(tmp_path_factory.mktemp("ahead") / "ds", rows=50, seq_len=4)
    spec = make_spec(b=2, s=20, shuffle=True, seed=3)  # 10 batches per cycle
    return ShardSource(load_shard(path, rank=0, world_size=1, columns=["input_ids"]), spec)


def drain(ahead: Prefetcher, credits: list[int]) -> list[Ready]:
    """Take cycle 0, spending the given credits in turn (then unlimited), as the server does."""
    out: list[Ready] = []
    for n in [*credits, 1000]:
        while n > 0:
            items = ahead.get(5.0, max_batches=n)
            assert items, "the prefetcher produced nothing within 5 s"
            out += items
            n -= sum(i.count for i in items if i.kind == "batch")
            if out[-1].kind == "end":
                return out
    return out


@pytest.mark.timeout(30)
def test_chunks_are_split_to_the_credit_and_keep_the_bytes(source: ShardSource) -> None:
    ahead = Prefetcher(source, max_batches=16, chunk=4)
    try:
        ahead.reset(0, 0)
        ahead.request(0)
        items = drain(ahead, [3, 1, 2])
    finally:
        ahead.close()
    assert items[-1].kind == "end"
    batches = [i for i in items if i.kind == "batch"]
    counts = [i.count for i in batches]
    assert sum(counts) == 10
    assert counts[:3] == [3, 1, 2]  # a 4-batch chunk split 3 + 1, the next split 2 + ...
    assert all(c <= 4 for c in counts)
    # Consecutive and complete: item k starts where item k-1 ended.
    assert [i.batch for i in batches] == np.cumsum([0, *counts[:-1]]).tolist()
    want = list(source.iter_batches(0, 0))
    for name in ("input_ids", "sample_idx"):
        got = np.concatenate([i.data[name] for i in batches])
        np.testing.assert_array_equal(got, np.concatenate([w[name] for w in want]))
    assert all(i.data["input_ids"].shape[0] == 2 * i.count for i in batches)


def test_chunk_is_capped_so_two_fit_the_budget(source: ShardSource) -> None:
    ahead = Prefetcher(source, max_batches=6, chunk=64)
    try:
        assert ahead.chunk == 3
    finally:
        ahead.close()


@pytest.mark.timeout(30)
def test_ready_batches_never_exceed_the_budget(source: ShardSource) -> None:
    ahead = Prefetcher(source, max_batches=7, chunk=3)  # chunk 3: at most 2 chunks = 6 ready
    try:
        ahead.reset(0, 0)
        ahead.request(0)
        first = ahead.get(5.0, max_batches=1)
        assert first
        assert first[0].count == 1
        # Once the builder pauses, what is ready stays within the budget.
        with ahead._cv:
            ahead._cv.wait_for(lambda: ahead._building_paused, timeout=5.0)
            assert ahead._building_paused
            assert ahead._ready_batches <= 7
    finally:
        ahead.close()


class _GroupSource:
    """A source whose every build is a whole group of 32 batches, whatever ``chunk`` asks for:
    what a transform does (it builds ``transform.group`` batches per model call)."""

    def __init__(self) -> None:
        self.spec = make_spec(b=1, s=1024)
        self.cursor = CycleCursor(self.spec, rank=0, shard_rows=5000)

    def cycle_info(self, cycle: int):
        return self.cursor.info(cycle)

    def iter_chunks(self, cycle: int, start: int, max_batches: int):
        n = self.spec.batches_in_cycle(cycle)
        for b in range(start, n, 32):
            k = min(32, n - b)
            yield k, {"A": np.zeros((k, 256), np.float32)}  # 1 KiB per batch

    def end_cycle(self, cycle: int) -> None:
        pass


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("budget", "ready"),
    [({"max_batches": 100}, 96), ({"max_batches": 1000, "max_bytes": 80 << 10}, 64)],
    ids=["batches", "bytes"],
)
def test_the_budget_holds_when_a_build_is_a_whole_transform_group(budget, ready) -> None:
    """feed.max_ahead_batches / max_ahead_bytes are the most a producer holds ready: with
    32-batch builds it stops at the last whole group that fits, not one group past it."""
    ahead = Prefetcher(_GroupSource(), chunk=1, **budget)
    try:
        ahead.reset(0, 0)
        ahead.request(0)
        with ahead._cv:
            assert ahead._cv.wait_for(lambda: ahead._ready_batches >= ready, timeout=10)
            assert ahead._ready_batches == ready
            assert not ahead._may_build()  # the builder waits: the next group would not fit
    finally:
        ahead.close()
