"""Packing prepared batches into messages: consecutive, never reordered, split as views, stacked
only when that saves a message without copying a message's worth, a cycle's first batch alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from lensfeed.common.errors import ConfigError
from lensfeed.producer import source as source_module
from lensfeed.producer.ahead import Ready
from lensfeed.producer.packing import Packer, auto_batches_per_message, message_batches, stack
from lensfeed.producer.shard import load_shard
from lensfeed.producer.source import ShardSource
from tests._util import make_spec


def shape(groups: list[list[Ready]]) -> list[list[tuple[int, int]]]:
    return [[(g.batch, g.count) for g in grp] for grp in groups]


def test_consecutive_batches_are_packed_per_message() -> None:
    """Batches of one cycle share a message up to ``pack``; ends and errors travel alone."""
    items = [Ready("batch", 0, j, nbytes=10) for j in range(4)] + [Ready("end", 0)]
    items += [Ready("batch", 1, 0, nbytes=10), Ready("error", 1, 1)]
    groups = Packer(batches_per_message=3).groups(items)
    assert [[(g.kind, g.cycle, g.batch) for g in grp] for grp in groups] == [
        [("batch", 0, 0), ("batch", 0, 1), ("batch", 0, 2)],
        [("batch", 0, 3)],
        [("end", 0, 0)],
        [("batch", 1, 0)],
        [("error", 1, 1)],
    ]


@pytest.mark.parametrize(
    ("batch_nbytes", "sizes"),
    [(3 << 20, [1] * 6), (1 << 20, [1] * 6), (256 << 10, [4, 2]), (32 << 10, [6])],
)
def test_separate_batches_are_stacked_up_to_1_mib(batch_nbytes: int, sizes: list[int]) -> None:
    """Stacking batches built one by one is a copy: worth it for small ones only."""
    items = [Ready("batch", 0, j, nbytes=batch_nbytes) for j in range(6)]
    assert [len(g) for g in Packer().groups(items)] == sizes


def test_auto_pack_is_sized_from_the_first_batch() -> None:
    packer = Packer()
    packer.groups([Ready("batch", 0, 0, nbytes=(512 << 10) * 4, count=4)])
    assert packer.pack == 16  # ~8 MiB of 512 KiB batches


def test_auto_batches_per_message() -> None:
    assert auto_batches_per_message(64 * (2048 * 4 + 8)) == 16  # (64, 2048) int32 + sample_idx
    assert auto_batches_per_message(64 * (128 * 4 + 8)) == 64  # capped
    # 4 MiB batches: two per message when gathered together (a transform's separately built
    # outputs of that size still travel alone: they are not stacked, see above)
    assert auto_batches_per_message(64 * (16 * 1024 * 4 + 8)) == 2
    assert auto_batches_per_message(32 << 20) == 1
    assert message_batches(5, 1 << 30) == 5  # configured wins
    assert message_batches(0, 0) == 1  # unknown size: one until the first batch shows it


def test_chunks_are_split_to_the_message_size_as_views() -> None:
    rows = np.arange(10 * 4).reshape(10, 4)
    chunk = Ready("batch", 0, 0, {"x": rows}, nbytes=rows.nbytes, count=5)  # 5 batches of 2
    groups = Packer(batches_per_message=2).groups([chunk])
    assert shape(groups) == [[(0, 2)], [(2, 2)], [(4, 1)]]
    pieces = [g.data["x"] for grp in groups for g in grp]
    assert all(np.shares_memory(p, rows) for p in pieces)  # views, not copies
    np.testing.assert_array_equal(np.concatenate(pieces), rows)


def test_whole_small_chunks_are_stacked_but_pieces_of_split_ones_never() -> None:
    rows = np.arange(10 * 4).reshape(10, 4)
    packer = Packer(batches_per_message=2)
    ones = [Ready("batch", 0, j, {"x": rows[2 * j : 2 * j + 2]}, nbytes=32) for j in (0, 1)]
    assert [[g.batch for g in grp] for grp in packer.groups(ones)] == [[0, 1]]
    # The credit cut these chunks: gluing the pieces back would copy a message's worth.
    _, tail = Ready("batch", 0, 0, {"x": rows}, nbytes=rows.nbytes, count=5).split(3)
    head, _ = Ready("batch", 0, 5, {"x": rows}, nbytes=rows.nbytes, count=5).split(1)
    assert shape(packer.groups([tail, head])) == [[(3, 2)], [(5, 1)]]


def test_a_cycles_first_batch_travels_alone() -> None:
    """Right after NEXT_CYCLE the loop is blocked on batch 0: it is not held for a full pack."""
    rows = np.arange(8 * 2).reshape(8, 2)
    packer = Packer(batches_per_message=4)
    packer.first_alone = True
    chunk = Ready("batch", 3, 0, {"x": rows}, nbytes=rows.nbytes, count=8)
    assert shape(packer.groups([chunk])) == [[(0, 1)], [(1, 4)], [(5, 3)]]
    assert packer.first_alone is False
    packer.first_alone = True
    ones = [Ready("batch", 3, j, {"x": rows[2 * j : 2 * j + 2]}, nbytes=16) for j in range(3)]
    assert [[g.batch for g in grp] for grp in packer.groups(ones)] == [[0], [1, 2]]


def test_no_message_exceeds_the_trainers_limit() -> None:
    """libzmq drops a frame over the trainer's MAXMSGSIZE with the connection: packing (auto or
    configured, chunks or stacked batches) stays within the limit the hello states."""
    rows = np.arange(64 * 4, dtype=np.int64).reshape(64, 4)  # 32 bytes per row
    chunk = Ready("batch", 0, 0, {"x": rows}, nbytes=rows.nbytes, count=16)  # 16 x 128 bytes
    for packer in (Packer(max_bytes=300), Packer(16, 128, max_bytes=300)):
        groups = packer.groups([chunk])
        assert packer.pack == 2
        assert all(sum(g.nbytes for g in grp) <= 300 for grp in groups)
        assert sum(g.count for grp in groups for g in grp) == 16
    ones = [Ready("batch", 0, j, nbytes=100) for j in range(5)]  # stacked: 3 fit in 300
    assert [len(g) for g in Packer(max_bytes=300).groups(ones)] == [3, 2]
    assert Packer(16, 128, max_bytes=0).pack == 16  # no limit stated


def test_a_batch_over_the_trainers_limit_is_a_config_error() -> None:
    msg = "a batch of 128 bytes exceeds the trainer's message limit of 100 bytes"
    with pytest.raises(ConfigError, match=msg):
        Packer(0, 128, max_bytes=100)  # known before the first batch: refused at the hello
    with pytest.raises(ConfigError, match=msg):  # a transform's: at its first batch
        Packer(max_bytes=100).groups([Ready("batch", 0, 0, nbytes=128)])


def test_stack_concatenates_numpy_and_torch_along_dim0() -> None:
    a = {"x": np.arange(4).reshape(2, 2), "t": torch.arange(2)}
    b = {"x": np.arange(4, 8).reshape(2, 2), "t": torch.arange(2, 4)}
    out = stack([a, b])
    np.testing.assert_array_equal(out["x"], np.arange(8).reshape(4, 2))
    assert out["t"].tolist() == [0, 1, 2, 3]
    assert stack([a]) is a


@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
def test_big_sequential_chunks_are_views_cut_at_record_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shuffle: bool
) -> None:
    """In order, a chunk of big batches never spans two record batches of the dataset, so it is
    a view of the memory map; only a batch that straddles a boundary is copied, alone. The
    bytes are those of the one-batch-at-a-time stream either way; shuffled chunks keep their
    full size (a gather copies them anyway)."""
    ids = np.arange(100 * 8, dtype=np.int32).reshape(100, 8)
    table = pa.table({"input_ids": pa.array(list(ids), type=pa.list_(pa.int32()))})
    path = tmp_path / "d.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=10):  # record batches of 10 rows
            w.write_batch(batch)
    monkeypatch.setattr(source_module, "VIEW_MIN_BATCH_BYTES", 0)  # 4-row batches count as big
    spec = make_spec(b=4, s=60, s0=52, shuffle=shuffle)  # cycle 1 starts at row 52 and wraps
    shard = load_shard(path, rank=0, world_size=1, columns=["input_ids"])
    source = ShardSource(shard, spec)
    chunks = {c: list(source.iter_chunks(c, 0, 8)) for c in range(3)}
    for c, got in chunks.items():
        want = list(source.iter_batches(c, 0))
        assert sum(n for n, _ in got) == len(want)
        for name in ("input_ids", "sample_idx"):
            np.testing.assert_array_equal(
                np.concatenate([a[name] for _, a in got]), np.concatenate([w[name] for w in want])
            )
    counts = [n for n, _ in chunks[1]]
    if shuffle:
        assert counts == [8, 7]
        return
    # Cycle 1 is rows 52..111 (mod 100): views 52-59, 60-67; 68-71 straddles; 72-79, 80-87;
    # 88-91; 92-99, 0-7; 8-11 (the cycle's last batch, which straddles too).
    assert counts == [2, 2, 1, 2, 2, 1, 2, 2, 1]
    col = shard.columns["input_ids"].chunks
    for n, a in chunks[1]:
        record_batch = col[(int(a["sample_idx"][0]) % 100) // 10]
        assert np.shares_memory(a["input_ids"], record_batch) == (n > 1)
