"""Shard loading: rank slices equal ``Dataset.shard(contiguous=True)``, every on-disk format,
chunk boundaries, dtypes, zero-copy memory-mapped views, and errors that name what is wrong."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lensfeed.common.errors import EmptyShardError, LensfeedError, ShardError
from lensfeed.producer.shard import load_shard, open_table, rank_slice
from tests._util import make_dataset

SEQ = 8


def tokens(
    rows: Sequence[int] | np.ndarray, seq_len: int = SEQ, dtype: str = "int32"
) -> np.ndarray:
    """The tokens ``make_dataset`` puts in global rows ``rows``: ``row*1000 + j``."""
    r = np.asarray(rows, dtype=np.int64)
    return (r[:, None] * 1000 + np.arange(seq_len)[None, :]).astype(dtype)


def token_table(start: int, stop: int, *, dtype: str = "int32", seq_len: int = SEQ) -> pa.Table:
    ids = tokens(range(start, stop), seq_len, dtype)
    typ = pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))
    return pa.table({"input_ids": pa.array(list(ids), type=typ), "row": np.arange(start, stop)})


def write_stream(path: Path, table: pa.Table, chunk: int = 3) -> Path:
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=chunk):
            w.write_batch(batch)
    return path


def write_file(path: Path, table: pa.Table, chunk: int = 3) -> Path:
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=chunk):
            w.write_batch(batch)
    return path


def all_rows(shard) -> dict[str, np.ndarray]:
    return shard.gather(np.arange(shard.num_rows))


def where(path: object, rank: int, world: int) -> str:
    return f"{path} (rank {rank} of {world})"


@pytest.fixture(scope="module")
def ten_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "ten", rows=10)


# --------------------------------------------------------------------------- rank slices


@pytest.mark.parametrize("rows", [10, 7])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_rows_equal_datasets_contiguous_shard(tmp_path: Path, rows: int, world: int) -> None:
    path = make_dataset(tmp_path / "ds", rows=rows)
    ds = datasets.load_from_disk(str(path))
    covered: list[int] = []
    for rank in range(world):
        expected = ds.shard(num_shards=world, index=rank, contiguous=True)
        shard = load_shard(path, rank=rank, world_size=world, columns=["input_ids"])
        got = all_rows(shard)
        np.testing.assert_array_equal(got["input_ids"], np.array(expected["input_ids"]))
        assert shard.num_rows == len(expected)
        assert shard.dataset_rows == rows
        assert shard.offset == len(covered)
        np.testing.assert_array_equal(got["sample_idx"], np.arange(shard.num_rows) + shard.offset)
        assert got["sample_idx"].dtype == np.int64
        covered.extend(got["sample_idx"].tolist())
    assert covered == list(range(rows))  # every row on exactly one rank, in order


def test_rank_slice_matches_datasets_for_many_sizes() -> None:
    for n in range(1, 24):
        ds = datasets.Dataset.from_dict({"i": list(range(n))})
        for world in range(1, 6):
            for rank in range(world):
                start, end = rank_slice(n, rank, world)
                if end == start:  # datasets refuses to build an empty shard; we report it
                    assert n < world
                    assert rank >= n
                    continue
                assert list(range(start, end)) == ds.shard(world, rank, contiguous=True)["i"]


def test_rank_slice_rejects_rank_outside_world() -> None:
    with pytest.raises(ShardError, match="rank 2 is outside world_size 2"):
        rank_slice(10, 2, 2)
    with pytest.raises(ShardError, match="rank -1"):
        rank_slice(10, -1, 2)


# --------------------------------------------------------------------------- formats


def _stream_file(d: Path) -> Path:
    return write_stream(d / "data.arrow", token_table(0, 11))


def _ipc_file(d: Path) -> Path:
    return write_file(d / "data.arrow", token_table(0, 11))


def _feather(d: Path) -> Path:
    return write_file(d / "data.feather", token_table(0, 11))


def _arrow_dir(d: Path) -> Path:
    root = d / "arrow_dir"
    root.mkdir()
    write_stream(root / "part-000.arrow", token_table(0, 4), chunk=2)
    write_file(root / "part-001.arrow", token_table(4, 5))
    write_stream(root / "part-002.ipc", token_table(5, 11), chunk=4)
    (root / "README.txt").write_text("not data; ignored")
    return root


def _parquet(d: Path) -> Path:
    path = d / "data.parquet"
    pq.write_table(token_table(0, 11), path, row_group_size=3)
    return path


def _parquet_dir(d: Path) -> Path:
    root = d / "pq_dir"
    root.mkdir()
    pq.write_table(token_table(0, 6), root / "a.parquet", row_group_size=4)
    pq.write_table(token_table(6, 11), root / "b.parquet", row_group_size=4)
    return root


def _save_to_disk_sharded(d: Path) -> Path:
    ds = datasets.Dataset.from_dict(
        {"input_ids": tokens(range(11)).tolist()},
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
    )
    ds.save_to_disk(str(d / "std"), num_shards=3)
    return d / "std"


def _save_to_disk_concatenated(d: Path) -> Path:
    feats = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    parts = [
        datasets.Dataset.from_dict({"input_ids": tokens(range(a, b)).tolist()}, features=feats)
        for a, b in [(0, 3), (3, 7), (7, 11)]
    ]
    datasets.concatenate_datasets(parts).save_to_disk(str(d / "cat"))
    return d / "cat"


FORMATS = {
    "arrow-stream": _stream_file,
    "arrow-file": _ipc_file,
    "feather": _feather,
    "arrow-dir": _arrow_dir,
    "parquet": _parquet,
    "parquet-dir": _parquet_dir,
    "save_to_disk-3-shards": _save_to_disk_sharded,
    "save_to_disk-concatenated": _save_to_disk_concatenated,
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_serves_the_same_rows(tmp_path: Path, fmt: str) -> None:
    path = FORMATS[fmt](tmp_path)
    table, fingerprint, _ = open_table(path)
    assert table.num_rows == 11
    assert len(fingerprint) == 16
    for world in (1, 2, 3):
        for rank in range(world):
            start, end = rank_slice(11, rank, world)
            shard = load_shard(path, rank=rank, world_size=world, columns=["input_ids"])
            got = all_rows(shard)
            np.testing.assert_array_equal(got["input_ids"], tokens(range(start, end)))
            assert got["input_ids"].dtype == np.int32
            np.testing.assert_array_equal(got["sample_idx"], np.arange(start, end))


@pytest.mark.parametrize(
    "fmt", ["arrow-stream", "arrow-file", "arrow-dir", "save_to_disk-3-shards"]
)
def test_gather_crosses_chunk_boundaries(tmp_path: Path, fmt: str) -> None:
    path = FORMATS[fmt](tmp_path)
    shard = load_shard(path, rank=0, world_size=1, columns=["input_ids"])
    col = shard.columns["input_ids"]
    assert len(col.chunks) > 1  # the point of this test
    assert col.starts[0] == 0
    assert col.starts.tolist() == np.cumsum([0] + [len(c) for c in col.chunks[:-1]]).tolist()
    rng = np.random.default_rng(0)
    for rows in (
        rng.permutation(11),
        np.array([10, 0, 10, 5, 5, 0, 1, 9]),  # repeats, both ends
        np.array([], dtype=np.int64),
        rng.integers(0, 11, size=50),
    ):
        got = shard.gather(rows)
        np.testing.assert_array_equal(got["input_ids"], tokens(rows).reshape(len(rows), SEQ))
        np.testing.assert_array_equal(got["sample_idx"], rows)


@pytest.mark.parametrize("fmt", ["arrow-stream", "save_to_disk-3-shards", "parquet"])
def test_consecutive_rows_of_one_chunk_are_served_without_a_copy(tmp_path: Path, fmt: str) -> None:
    """Unshuffled order: a run inside one chunk is a view of the mapping, the same bytes as a
    gather; a run across a chunk boundary, or any other order, is gathered (copied)."""
    path = FORMATS[fmt](tmp_path)
    shard = load_shard(path, rank=0, world_size=1, columns=["input_ids"])
    col = shard.columns["input_ids"]
    first = len(col.chunks[0])
    inside = np.arange(0, first)
    cases = [(inside, True), (inside[::-1].copy(), False)]
    if len(col.chunks) > 1:  # (Parquet is decoded into one chunk)
        cases.append((np.arange(first - 1, first + 1), False))
    for rows, shared in cases:
        got = col.gather(rows)
        np.testing.assert_array_equal(got, tokens(rows))
        assert np.shares_memory(got, col.chunks[0]) == shared
        assert not (shared and got.flags.writeable)


def test_rank_slice_starting_inside_a_chunk(tmp_path: Path) -> None:
    # 11 rows in chunks of 3 for 3 ranks: rank 1 is rows 4..7, starting mid-chunk.
    path = write_stream(tmp_path / "d.arrow", token_table(0, 11), chunk=3)
    shard = load_shard(path, rank=1, world_size=3, columns=["input_ids"])
    assert (shard.offset, shard.num_rows) == (4, 4)
    assert [len(c) for c in shard.columns["input_ids"].chunks] == [2, 2]
    rows = np.array([3, 0, 2, 1, 3])
    np.testing.assert_array_equal(shard.gather(rows)["input_ids"], tokens(rows + 4))


@pytest.mark.parametrize(
    ("dtype", "served"),
    [
        ("int32", "int32"),
        ("int64", "int64"),
        ("int16", "int16"),
        ("uint16", "int32"),  # the wire and torch lack uint16: widened once, on purpose
        ("uint32", "int64"),
    ],
)
def test_integer_dtype_is_kept(tmp_path: Path, dtype: str, served: str) -> None:
    path = make_dataset(tmp_path / "ds", rows=5, dtype=dtype)
    shard = load_shard(path, rank=0, world_size=1, columns=["input_ids"])
    col = shard.columns["input_ids"]
    assert col.dtype == np.dtype(served)
    assert all(c.dtype == np.dtype(dtype) for c in col.chunks)  # the mapped views stay as stored
    got = shard.gather(np.array([4, 1]))["input_ids"]
    assert got.dtype == np.dtype(served)  # no accidental widening to int64
    np.testing.assert_array_equal(got, tokens([4, 1], dtype=dtype))


def test_several_columns_and_plain_integer_columns(tmp_path: Path) -> None:
    t = token_table(0, 6).append_column(
        "attention_mask", pa.array([[1] * SEQ] * 6, type=pa.list_(pa.int8()))
    )
    path = write_stream(tmp_path / "d.arrow", t, chunk=4)
    shard = load_shard(path, rank=1, world_size=2, columns=["input_ids", "attention_mask", "row"])
    got = shard.gather(np.array([2, 0]))
    assert list(got) == ["input_ids", "attention_mask", "row", "sample_idx"]
    np.testing.assert_array_equal(got["input_ids"], tokens([5, 3]))
    assert got["attention_mask"].dtype == np.int8
    assert got["attention_mask"].shape == (2, SEQ)
    assert shard.columns["row"].row_shape == ()
    np.testing.assert_array_equal(got["row"], [5, 3])


def test_fixed_size_list_column(tmp_path: Path) -> None:
    ids = tokens(range(7))
    arr = pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), SEQ)
    path = write_stream(tmp_path / "d.arrow", pa.table({"input_ids": arr}), chunk=3)
    shard = load_shard(path, rank=1, world_size=2, columns=["input_ids"])
    np.testing.assert_array_equal(all_rows(shard)["input_ids"], tokens(range(4, 7)))


# --------------------------------------------------------------------------- zero copy


def _file_mappings(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of ``paths`` (Linux /proc/self/maps)."""
    names = {str(Path(p).resolve()) for p in paths}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in names:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
@pytest.mark.parametrize("fmt", ["save_to_disk", "arrow-stream", "arrow-file"])
def test_chunks_are_read_only_views_of_the_memory_mapped_files(tmp_path: Path, fmt: str) -> None:
    if fmt == "save_to_disk":
        path = make_dataset(tmp_path / "ds", rows=2000, seq_len=256)
        files = sorted(path.glob("*.arrow"))
    else:
        writer = write_stream if fmt == "arrow-stream" else write_file
        path = writer(tmp_path / "d.arrow", token_table(0, 2000, seq_len=256), chunk=700)
        files = [path]
    before = pa.total_allocated_bytes()
    shard = load_shard(path, rank=1, world_size=2, columns=["input_ids"])
    # 1000 rows x 256 x 4 bytes = 1 MB of tokens; nothing of it was copied into Arrow's pool...
    assert pa.total_allocated_bytes() - before < 64 * 1024
    maps = _file_mappings(files)
    assert maps, "dataset file is not memory-mapped"
    for chunk in shard.columns["input_ids"].chunks:
        # ... and every chunk's data lies inside a memory map of the dataset file.
        lo = chunk.__array_interface__["data"][0]
        hi = lo + chunk.nbytes
        assert any(a <= lo and hi <= b for a, b in maps), "chunk is not a view of the mmap"
        assert not chunk.flags.writeable
        assert not chunk.flags.owndata
    np.testing.assert_array_equal(
        shard.gather(np.array([0, 999]))["input_ids"], tokens([1000, 1999], seq_len=256)
    )


# --------------------------------------------------------------------------- errors


def _load_error(path: Path, *, rank: int = 0, world: int = 1, columns=("input_ids",)) -> str:
    with pytest.raises(ShardError) as exc_info:
        load_shard(path, rank=rank, world_size=world, columns=list(columns))
    assert isinstance(exc_info.value, LensfeedError)
    return str(exc_info.value)


def test_missing_path(tmp_path: Path) -> None:
    msg = _load_error(tmp_path / "nope")
    assert "not found" in msg
    assert str(tmp_path / "nope") in msg


@pytest.mark.parametrize("name", ["data.txt", "data.bin", "data"])
def test_a_random_file_is_not_a_dataset(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(os.urandom(100))
    msg = _load_error(tmp_path / name)
    assert "is not a dataset" in msg
    assert str(tmp_path / name) in msg


def test_empty_or_unrelated_directory_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    msg = _load_error(tmp_path / "empty")
    assert "is not a dataset" in msg
    assert str(tmp_path / "empty") in msg
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    assert "is not a dataset" in _load_error(tmp_path / "other")


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage" * 20, b"ARROW1\x00\x00" + bytes(range(256)), b"\xff\xff\xff\xff\x10\x00"],
    ids=["empty", "text", "bad-file-magic", "bad-stream-prefix"],
)
def test_corrupt_arrow_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.arrow"
    path.write_bytes(content)
    msg = _load_error(path)
    assert str(path) in msg
    assert "not a valid Arrow IPC file" in msg


def test_truncated_arrow_file(tmp_path: Path) -> None:
    good = write_file(tmp_path / "good.arrow", token_table(0, 20))
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a valid Arrow IPC file" in _load_error(bad)


def test_garbage_inside_a_save_to_disk_directory_names_the_file(tmp_path: Path) -> None:
    path = make_dataset(tmp_path / "ds", rows=10)
    (data,) = path.glob("*.arrow")
    data.write_bytes(b"\x00garbage\x00" * 50)
    msg = _load_error(path, rank=1, world=2)
    assert str(data) in msg


def test_corrupt_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1" + os.urandom(64))
    msg = _load_error(path)
    assert str(path) in msg
    assert "Parquet" in msg


def test_save_to_disk_state_json_problems(tmp_path: Path) -> None:
    path = make_dataset(tmp_path / "ds", rows=10)
    state = path / "state.json"
    original = state.read_text()
    state.write_text("{not json")
    assert "state.json is corrupt" in _load_error(path)
    info = json.loads(original)
    info["_data_files"].append({"filename": "data-missing.arrow"})
    state.write_text(json.dumps(info))
    msg = _load_error(path)
    assert "missing" in msg
    assert "data-missing.arrow" in msg


@pytest.mark.parametrize("case", ["missing", "not-a-dataset", "corrupt"])
def test_dataset_level_errors_name_the_rank(tmp_path: Path, case: str) -> None:
    path = tmp_path / {"missing": "nope", "not-a-dataset": "x.txt", "corrupt": "x.arrow"}[case]
    if case != "missing":
        path.write_bytes(b"garbage")
    assert "rank 1" in _load_error(path, rank=1, world=2)


def test_missing_column_lists_available_ones(ten_rows: Path) -> None:
    msg = _load_error(ten_rows, rank=1, world=2, columns=["input_ids", "attention_mask"])
    assert where(ten_rows, 1, 2) in msg
    assert "column 'attention_mask' not found" in msg
    assert "available columns: ['input_ids']" in msg


@pytest.mark.parametrize(
    ("array", "typename"),
    [
        (pa.array([[0.5] * 4] * 6, type=pa.list_(pa.float32())), "float"),
        (pa.array([["a"] * 4] * 6), "string"),
        (pa.array([0.5] * 6), "double"),
        (pa.array(["x"] * 6), "string"),
        (pa.array([[True] * 4] * 6), "bool"),
    ],
    ids=["list-float", "list-string", "float", "string", "list-bool"],
)
def test_non_integer_column(tmp_path: Path, array: pa.Array, typename: str) -> None:
    path = write_stream(tmp_path / "d.arrow", pa.table({"input_ids": array}))
    msg = _load_error(path, rank=1, world=2)
    assert where(path, 1, 2) in msg
    assert "column 'input_ids'" in msg
    assert typename in msg
    assert "must hold integers" in msg


def test_ragged_lengths_name_the_rows(tmp_path: Path) -> None:
    seqs = [[1, 2, 3]] * 4 + [[1, 2, 3, 4]] + [[1, 2, 3]] * 3
    path = write_stream(tmp_path / "d.arrow", pa.table({"input_ids": seqs}), chunk=100)
    msg = _load_error(path)
    assert where(path, 0, 1) in msg
    assert "column 'input_ids' has ragged sequence lengths" in msg
    assert "row 0 has 3 tokens, row 4 has 4" in msg
    assert "pack or pad" in msg


def test_ragged_lengths_across_files(tmp_path: Path) -> None:
    root = tmp_path / "dir"
    root.mkdir()
    write_stream(root / "a.arrow", token_table(0, 3, seq_len=8))
    write_stream(root / "b.arrow", token_table(3, 6, seq_len=9))
    msg = _load_error(root)
    assert "ragged sequence lengths across files" in msg
    assert "(8,) then (9,) at row 3" in msg


def test_ragged_lengths_name_dataset_rows_on_later_ranks(tmp_path: Path) -> None:
    seqs = [[1, 2, 3]] * 7 + [[1, 2, 3, 4]] + [[1, 2, 3]] * 2
    path = write_stream(tmp_path / "d.arrow", pa.table({"input_ids": seqs}), chunk=100)
    msg = _load_error(path, rank=1, world=2)  # rows 5..9
    assert "row 7 has 4" in msg


def test_schema_mismatch_between_files(tmp_path: Path) -> None:
    root = tmp_path / "dir"
    root.mkdir()
    write_stream(root / "a.arrow", token_table(0, 3))
    write_stream(root / "b.arrow", token_table(3, 6, dtype="int64"))
    msg = _load_error(root)
    assert str(root) in msg
    assert "different schemas" in msg


@pytest.mark.parametrize(("rows", "world", "rank"), [(1, 2, 1), (3, 5, 4), (0, 1, 0)])
def test_empty_shard(tmp_path: Path, rows: int, world: int, rank: int) -> None:
    path = write_stream(tmp_path / "d.arrow", token_table(0, rows))
    with pytest.raises(EmptyShardError) as exc_info:
        load_shard(path, rank=rank, world_size=world, columns=["input_ids"])
    err = exc_info.value
    assert isinstance(err, ShardError)
    assert err.code == "empty_shard"
    msg = str(err)
    assert where(path, rank, world) in msg
    assert "shard is empty" in msg
    assert f"{rows} rows for {world} ranks" in msg


def test_one_row_and_two_ranks_rank_zero_is_fine(tmp_path: Path) -> None:
    path = make_dataset(tmp_path / "ds", rows=1)
    shard = load_shard(path, rank=0, world_size=2, columns=["input_ids"])
    assert shard.num_rows == 1
    np.testing.assert_array_equal(all_rows(shard)["input_ids"], tokens([0]))


def test_null_rows(tmp_path: Path) -> None:
    arr = pa.array([[1, 2], [1, 2], None, [1, 2]], type=pa.list_(pa.int32()))
    path = write_stream(tmp_path / "d.arrow", pa.table({"input_ids": arr}))
    msg = _load_error(path)
    assert where(path, 0, 1) in msg
    assert "column 'input_ids' has 1 null rows" in msg


def test_null_tokens(tmp_path: Path) -> None:
    arr = pa.array([[1, 2], [1, None], [1, 2]], type=pa.list_(pa.int32()))
    path = write_stream(tmp_path / "d.arrow", pa.table({"input_ids": arr}))
    assert "column 'input_ids' has null tokens" in _load_error(path)


def test_nulls_outside_this_rank_do_not_matter(tmp_path: Path) -> None:
    arr = pa.array([[1, 2], None, [3, 4], [5, 6]], type=pa.list_(pa.int32()))
    path = write_stream(tmp_path / "d.arrow", pa.table({"input_ids": arr}))
    shard = load_shard(path, rank=1, world_size=2, columns=["input_ids"])
    np.testing.assert_array_equal(all_rows(shard)["input_ids"], [[3, 4], [5, 6]])


def test_dataset_fingerprint_tracks_content(tmp_path: Path) -> None:
    a = write_stream(tmp_path / "a.arrow", token_table(0, 10))
    _, fa, _ = open_table(a)
    assert open_table(a)[1] == fa
    b = write_stream(tmp_path / "b.arrow", token_table(0, 12))
    assert open_table(b)[1] != fa
