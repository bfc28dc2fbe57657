"""The cycle cursor and ShardSource against a slow reference of the original regeneration loop."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lensfeed.common.errors import TransformError
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.shard import load_shard, rank_slice
from lensfeed.producer.source import BatchContext, ShardSource
from tests._util import make_dataset, make_spec

# --------------------------------------------------------------------------- reference


@dataclass
class RefCycle:
    rows: list[int]  # shard-local rows in stream order
    wraps: int
    total_wraps: int
    shard_pos: int


def reference_cycles(rows: int, b: int, s: int, s0: int, cycles: int) -> list[RefCycle]:
    """The original loop, sample by sample: ``next(it)``, and on StopIteration start over.

    Each regeneration takes ``(size // B) * B`` samples (cycle 0: ``size = S0``, then ``S``);
    the ``size % B`` rest is not drawn, so the next cycle starts with it.
    """
    it = iter(range(rows))
    total = 0
    out = []
    for k in range(cycles):
        size = s0 if k == 0 else s
        served: list[int] = []
        wraps = 0
        for _ in range((size // b) * b):
            try:
                x = next(it)
            except StopIteration:
                it = iter(range(rows))
                wraps += 1
                total += 1
                x = next(it)
            served.append(x)
        out.append(RefCycle(served, wraps, total, served[0]))
    return out


def cursor_cycle_rows(cursor: CycleCursor, k: int) -> np.ndarray:
    n = cursor.spec.batches_in_cycle(k)
    return np.concatenate([cursor.batch_rows(k, j) for j in range(n)])


def check_against_reference(
    rows: int, b: int, s: int, s0: int, cycles: int, shuffle: bool, seed: int, rank: int
) -> None:
    spec = make_spec(b=b, s=s, s0=s0, shuffle=shuffle, seed=seed)
    cursor = CycleCursor(spec, rank=rank, shard_rows=rows)
    ref = reference_cycles(rows, b, s, s0, cycles)
    for k, want in enumerate(ref):
        got = cursor_cycle_rows(cursor, k)
        info = cursor.info(k)
        assert info.batches == len(want.rows) // b == spec.batches_in_cycle(k)
        if shuffle:
            # Exactly the reference's samples, reordered by the documented permutation.
            perm = np.random.default_rng([seed, rank, k]).permutation(len(want.rows))
            np.testing.assert_array_equal(got, np.asarray(want.rows)[perm])
            assert sorted(got.tolist()) == sorted(want.rows)
        else:
            assert got.tolist() == want.rows
        assert info.total_wraps == want.total_wraps
        assert info.shard_pos == want.shard_pos
        assert info.wraps == want.wraps


# --------------------------------------------------------------------------- cursor


@pytest.mark.parametrize(
    ("rows", "b", "s", "s0"),
    [
        (1, 1, 1, 1),  # one row
        (1, 4, 12, 8),  # one row, many wraps
        (3, 4, 8, 8),  # fewer rows than B
        (5, 2, 23, 23),  # fewer rows than S: several wraps per cycle
        (10, 5, 10, 10),  # exact multiples
        (10, 5, 20, 30),
        (100, 8, 30, 20),  # shard bigger than a cycle
        (7, 3, 10, 11),  # remainders everywhere
    ],
)
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_cursor_matches_reference(rows: int, b: int, s: int, s0: int, shuffle: bool) -> None:
    check_against_reference(rows, b, s, s0, cycles=6, shuffle=shuffle, seed=5, rank=1)


@settings(max_examples=150, deadline=None, database=None)
@given(
    rows=st.integers(1, 40),
    b=st.integers(1, 9),
    s=st.integers(1, 70),
    s0=st.integers(1, 70),
    cycles=st.integers(1, 6),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**32),
    rank=st.integers(0, 7),
)
def test_cursor_matches_reference_property(
    rows: int, b: int, s: int, s0: int, cycles: int, shuffle: bool, seed: int, rank: int
) -> None:
    s, s0 = max(s, b), max(s0, b)  # config validation guarantees B <= S and B <= S0
    check_against_reference(rows, b, s, s0, cycles, shuffle, seed, rank)


def test_unshuffled_serves_every_stream_position_once_in_order() -> None:
    rows, b = 7, 3
    spec = make_spec(b=b, s=10, s0=8)
    cursor = CycleCursor(spec, rank=0, shard_rows=rows)
    stream = np.concatenate([cursor_cycle_rows(cursor, k) for k in range(8)])
    # Cycle k covers positions [cycle_start(k), cycle_start(k+1)): one gap-free stream.
    n = spec.cycle_start(8)
    np.testing.assert_array_equal(stream, np.arange(n) % rows)
    for k in range(8):
        info = cursor.info(k)
        assert info.start == spec.cycle_start(k)
        assert info.end == spec.cycle_start(k + 1)
        assert info.samples == info.batches * b


def test_shuffled_cycle_is_a_permutation_of_the_unshuffled_cycle() -> None:
    ordered = CycleCursor(make_spec(b=4, s=30, s0=18), rank=2, shard_rows=11)
    shuffled = CycleCursor(make_spec(b=4, s=30, s0=18, shuffle=True, seed=9), rank=2, shard_rows=11)
    for k in range(5):
        a, c = cursor_cycle_rows(ordered, k), cursor_cycle_rows(shuffled, k)
        assert sorted(a.tolist()) == sorted(c.tolist())
        assert a.tolist() != c.tolist()


def test_wrap_counts_for_a_small_shard() -> None:
    # 5 rows, cycles of 12 (B=4): positions 0-11, 12-23, 24-35.
    cursor = CycleCursor(make_spec(b=4, s=12), rank=0, shard_rows=5)
    infos = [cursor.info(k) for k in range(3)]
    assert [i.shard_pos for i in infos] == [0, 2, 4]
    assert [i.wraps for i in infos] == [2, 2, 3]
    assert [i.total_wraps for i in infos] == [2, 4, 7]


def test_wraps_add_up_to_total_wraps_on_exact_multiples() -> None:
    # 4 rows, cycles of 4: every cycle after the first starts with a reset of the iterator.
    cursor = CycleCursor(make_spec(b=4, s=4), rank=0, shard_rows=4)
    ref = reference_cycles(4, 4, 4, 4, 4)
    assert [r.wraps for r in ref] == [0, 1, 1, 1]
    assert [cursor.info(k).total_wraps for k in range(4)] == [0, 1, 2, 3]
    assert [cursor.info(k).wraps for k in range(4)] == [0, 1, 1, 1]


def test_batches_per_cycle_is_the_same_on_every_rank_with_uneven_shards() -> None:
    spec = make_spec(b=3, s=10, s0=7, world=3)
    for rank in range(3):
        start, end = rank_slice(10, rank, 3)  # 4, 3, 3 rows
        cursor = CycleCursor(spec, rank=rank, shard_rows=end - start)
        assert [cursor.info(k).batches for k in range(4)] == [2, 3, 3, 3]


def test_cursor_is_deterministic_and_stateless() -> None:
    spec = make_spec(b=4, s=40, shuffle=True, seed=3)
    a = CycleCursor(spec, rank=1, shard_rows=13)
    forward = [a.batch_rows(k, j).tolist() for k in range(4) for j in range(10)]
    b = CycleCursor(spec, rank=1, shard_rows=13)
    backward = [
        b.batch_rows(k, j).tolist() for k in reversed(range(4)) for j in reversed(range(10))
    ]
    assert forward == backward[::-1]
    # Random access, no history needed.
    assert CycleCursor(spec, rank=1, shard_rows=13).batch_rows(3, 7).tolist() == forward[37]


def test_seed_rank_and_cycle_change_the_order() -> None:
    def rows(seed: int, rank: int, cycle: int) -> list[int]:
        spec = make_spec(b=8, s=64, shuffle=True, seed=seed)
        return cursor_cycle_rows(CycleCursor(spec, rank=rank, shard_rows=1000), cycle).tolist()

    base = rows(0, 0, 1)
    assert rows(0, 0, 1) == base
    assert rows(1, 0, 1) != base
    assert rows(0, 1, 1) != base
    # Same positions, other permutation, from one cycle to the next (different stream window).
    assert sorted(rows(0, 0, 2)) == [r + 64 for r in sorted(base)]
    assert rows(0, 0, 2) != [r + 64 for r in base]


def test_documented_worked_example() -> None:
    """docs/protocol.md section 8.5."""
    cursor = CycleCursor(make_spec(b=3, s=7, s0=10, shuffle=True, seed=0), rank=0, shard_rows=5)
    assert cursor.order(0).tolist() == [4, 5, 2, 6, 3, 8, 7, 0, 1]
    assert [cursor.batch_rows(0, j).tolist() for j in range(3)] == [[4, 0, 2], [1, 3, 3], [2, 0, 1]]
    assert cursor.order(1).tolist() == [1, 4, 5, 3, 2, 0]
    assert [cursor.batch_rows(1, j).tolist() for j in range(2)] == [[0, 3, 4], [2, 1, 4]]
    table = [
        (i.batches, i.start, i.wraps, i.total_wraps, i.shard_pos) for i in map(cursor.info, (0, 1))
    ]
    assert table == [(3, 0, 1, 1, 0), (2, 9, 1, 2, 4)]


def test_batch_index_out_of_range() -> None:
    cursor = CycleCursor(make_spec(b=4, s=10), rank=0, shard_rows=5)
    with pytest.raises(IndexError, match="outside cycle of 2"):
        cursor.batch_rows(0, 2)
    with pytest.raises(IndexError):
        cursor.batch_slots(0, -1)
    with pytest.raises(ValueError, match="shard_rows"):
        CycleCursor(make_spec(b=4, s=10), rank=0, shard_rows=0)


def test_huge_cycle_only_builds_a_permutation() -> None:
    s = 10_000_000
    spec = make_spec(b=32, s=s, shuffle=True, seed=1)
    cursor = CycleCursor(spec, rank=0, shard_rows=5)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        rows = cursor.batch_rows(3, 12345)
        again = cursor.batch_rows(3, 12346)  # cached permutation: no second build
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows.shape == again.shape == (32,)
    assert set(rows.tolist()) <= set(range(5))
    # One int64 permutation of S slots (80 MB) and nothing proportional to S per sample: a
    # materialised list of S Python ints alone would be > 280 MB.
    assert peak < 2 * 8 * s
    assert elapsed < 20  # generous: ~1 s on a loaded 2-core box
    assert set(cursor._perms) == {3}  # cycles 0..2 were never built
    assert cursor.info(3).batches == s // 32
    # Only the newest cycles' permutations are kept.
    cursor.batch_rows(5, 0)
    assert set(cursor._perms) <= {4, 5}


# --------------------------------------------------------------------------- ShardSource


@pytest.fixture(scope="module")
def ds10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cyc") / "ds10", rows=10, seq_len=4)


def make_source(path: Path, spec: DataSpec, rank: int, **kw) -> ShardSource:
    shard = load_shard(path, rank=rank, world_size=spec.world_size, columns=["input_ids"])
    return ShardSource(shard, spec, **kw)


def collect(source: ShardSource, cycles: int) -> list[list[dict[str, np.ndarray]]]:
    out = []
    for k in range(cycles):
        batches = list(source.iter_batches(k, 0))
        source.end_cycle(k)
        out.append(batches)
    return out


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_shard_source_serves_the_reference_rows(ds10: Path, shuffle: bool) -> None:
    spec = make_spec(b=3, s=10, s0=7, shuffle=shuffle, seed=4, world=3)
    for rank in range(3):
        source = make_source(ds10, spec, rank)
        offset = source.shard_offset
        ref = reference_cycles(source.shard_rows, 3, 10, 7, 4)
        for k, batches in enumerate(collect(source, 4)):
            assert len(batches) == spec.batches_in_cycle(k)
            idx = np.concatenate([bt["sample_idx"] for bt in batches])
            ids = np.concatenate([bt["input_ids"] for bt in batches])
            assert sorted(idx.tolist()) == sorted(r + offset for r in ref[k].rows)
            if not shuffle:
                assert idx.tolist() == [r + offset for r in ref[k].rows]
            # The tokens really are those rows' tokens.
            np.testing.assert_array_equal(ids[:, 0], idx * 1000)
            assert all(bt["input_ids"].shape == (3, 4) for bt in batches)
            assert all(bt["input_ids"].dtype == np.int32 for bt in batches)


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_chunks_hold_the_same_bytes_as_batches_whatever_their_size(
    ds10: Path, shuffle: bool
) -> None:
    """The producer gathers a message's worth of batches at once: same rows, same order."""
    spec = make_spec(b=3, s=10, s0=7, shuffle=shuffle, seed=4, world=2)
    source = make_source(ds10, spec, 1)
    for k in range(4):
        want = list(source.iter_batches(k, 0))
        for size in (1, 2, 3, 100):
            chunks = list(source.iter_chunks(k, 1, size))
            assert all(1 <= n <= size for n, _ in chunks)
            assert sum(n for n, _ in chunks) == len(want) - 1
            for name in ("input_ids", "sample_idx"):
                got = np.concatenate([c[name] for _, c in chunks])
                np.testing.assert_array_equal(got, np.concatenate([w[name] for w in want[1:]]))


def test_shard_source_is_deterministic_and_resumable(ds10: Path) -> None:
    spec = make_spec(b=2, s=9, shuffle=True, seed=1, world=2)
    first = collect(make_source(ds10, spec, 1), 3)
    second = collect(make_source(ds10, spec, 1), 3)
    for ca, cb in zip(first, second, strict=True):
        for ba, bb in zip(ca, cb, strict=True):
            assert ba.keys() == bb.keys()
            for k in ba:
                assert ba[k].tobytes() == bb[k].tobytes()
    # Starting mid-cycle gives the tail of the same cycle.
    tail = list(make_source(ds10, spec, 1).iter_batches(2, 3))
    assert [t["sample_idx"].tolist() for t in tail] == [
        b["sample_idx"].tolist() for b in first[2][3:]
    ]


def test_shard_source_differs_across_seeds_and_ranks(ds10: Path) -> None:
    def digest(seed: int, rank: int) -> list[int]:
        spec = make_spec(b=5, s=20, shuffle=True, seed=seed, world=2)
        src = make_source(ds10, spec, rank)
        return [i for bt in src.iter_batches(1, 0) for i in bt["sample_idx"].tolist()]

    base = digest(0, 0)
    assert digest(0, 0) == base
    assert digest(1, 0) != base
    assert set(digest(0, 1)).isdisjoint(base)  # other rank, other rows


class _Tripler:
    """A transform that groups 3 training batches per call and records its contexts."""

    group = 3

    def __init__(self) -> None:
        self.calls: list[BatchContext] = []
        self.ended: list[int] = []
        self.closed = False

    def __call__(self, arrays: dict[str, np.ndarray], ctx: BatchContext) -> dict[str, np.ndarray]:
        self.calls.append(ctx)
        return {"double": arrays["input_ids"] * 2, "sample_idx": arrays["sample_idx"]}

    def end_cycle(self, cycle: int) -> None:
        self.ended.append(cycle)

    def close(self) -> None:
        self.closed = True


def test_transform_groups_batches_and_is_split_back(ds10: Path) -> None:
    spec = make_spec(b=2, s=14, shuffle=True, seed=2)  # 7 batches: groups of 3, 3, 1
    plain = list(make_source(ds10, spec, 0).iter_batches(0, 0))
    tr = _Tripler()
    source = make_source(ds10, spec, 0, transform=tr)
    out = list(source.iter_batches(0, 0))
    source.end_cycle(0)
    source.close()
    assert [(c.batch, c.num_batches) for c in tr.calls] == [(0, 3), (3, 3), (6, 1)]
    assert all(c.cycle_len == 14 and c.seed == 2 and c.rank == 0 for c in tr.calls)
    assert len(out) == 7
    for got, want in zip(out, plain, strict=True):
        np.testing.assert_array_equal(got["double"], want["input_ids"] * 2)
        np.testing.assert_array_equal(got["sample_idx"], want["sample_idx"])
    # fetch() reaches any slot of the same cycle.
    again = tr.calls[0].fetch(np.array([0, 1]))
    np.testing.assert_array_equal(again["sample_idx"], plain[0]["sample_idx"])
    assert tr.ended == [0]
    assert tr.closed


def test_transform_failures_become_transform_errors(ds10: Path) -> None:
    spec = make_spec(b=2, s=6)

    class Broken:
        group = 1

        def __call__(self, arrays, ctx):
            raise ValueError("no GPU today")

    class WrongShape:
        group = 1

        def __call__(self, arrays, ctx):
            return {"x": arrays["input_ids"][:1]}

    with pytest.raises(TransformError, match=r"rank 0: transform failed on cycle 1 batch 0.*GPU"):
        next(make_source(ds10, spec, 0, transform=Broken()).iter_batches(1, 0))
    with pytest.raises(TransformError, match="'x' has shape"):
        next(make_source(ds10, spec, 0, transform=WrongShape()).iter_batches(0, 0))
