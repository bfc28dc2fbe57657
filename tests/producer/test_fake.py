"""The fake producer: deterministic synthetic batches over the real server, injected failures
and delays, in-process and as ``python -m producer.fake``."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lensfeed.common.config import FeedConfig, load_config
from lensfeed.common.errors import ProducerTimeoutError, RemoteError
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.fake import FakeProducer, FakeSource, InjectedError, parser, tensor_arg
from lensfeed.trainer.client import FeedClient
from tests._util import ipc_endpoint, python_cmd

pytestmark = pytest.mark.timeout(90)


def make_spec(**over: object) -> DataSpec:
    base = {
        "batch_size": 3,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 10,
        "training_initial_cache_size_per_rank": 7,
        "seed": 5,
    }
    base.update(over)
    return DataSpec.from_config(load_config(None, [f"{k}={v}" for k, v in base.items()]))


def digest(batch: dict[str, torch.Tensor] | dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(batch):
        t = batch[name]
        arr = t.numpy() if isinstance(t, torch.Tensor) else t
        h.update(name.encode() + str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def consume(feed: FeedClient, num_cycles: int) -> list[tuple[int, int, str, list[int]]]:
    out = []
    for cycle in feed.cycles(num_cycles):
        for j, batch in enumerate(cycle):
            out.append(
                (cycle.index, cycle.start_batch + j, digest(batch), batch["sample_idx"].tolist())
            )
    return out


def drain(feed: FeedClient, num_cycles: int, seen: list[tuple[int, int]], check=None) -> None:
    """Consume ``num_cycles`` cycles, recording (cycle, batch) in ``seen`` as they arrive."""
    for cycle in feed.cycles(num_cycles):
        for j, batch in enumerate(cycle):
            if check is not None:
                check(cycle.index, cycle.start_batch + j, batch)
            seen.append((cycle.index, cycle.start_batch + j))


@pytest.fixture
def spec() -> DataSpec:
    return make_spec()  # cycle 0: 2 batches, then 3


def test_fake_serves_deterministic_batches(tmp_path: Path, spec: DataSpec) -> None:
    tensors = {"input_ids": ("int32", (5,)), "A": ("float32", (2, 3)), "m": ("uint8", ())}
    with FakeProducer(
        f"ipc://{tmp_path}/f.sock", spec=spec, rank=1, shard_rows=4, tensors=tensors
    ) as fp:
        with FeedClient(fp.endpoint, rank=1, spec=spec, timeout_s=20, tensors=tensors) as feed:
            first = consume(feed, 3)
            assert feed.welcome["shard_offset"] == 4
            assert feed.welcome["dataset_fingerprint"] == "fake-4"
        with FeedClient(fp.endpoint, rank=1, spec=spec, timeout_s=20, tensors=tensors) as feed:
            second = consume(feed, 3)
    assert first == second  # same bytes twice
    assert [(c, b) for c, b, _, _ in first] == [(0, 0), (0, 1)] + [
        (k, j) for k in (1, 2) for j in range(3)
    ]
    # The same bytes as a fresh source makes directly: a pure function of (spec, rank, c, b).
    src = FakeSource(spec, rank=1, shard_rows=4, tensors=tensors)
    cursor = CycleCursor(spec, rank=1, shard_rows=4)
    for c, b, d, idx in first:
        assert d == digest(src.make_batch(c, b))
        assert idx == (cursor.batch_rows(c, b) + 4).tolist()
    # Different cycles carry different synthetic data.
    assert len({d for _, _, d, _ in first}) == len(first)


def test_fake_tensor_shapes_dtypes_and_vocab(spec: DataSpec) -> None:
    src = FakeSource(
        spec,
        tensors={"ids": ("int64", (6,)), "A": ("float16", (2,)), "flag": ("bool", ())},
        vocab_size=7,
    )
    batch = src.make_batch(1, 2)
    assert batch["ids"].shape == (3, 6)
    assert batch["ids"].dtype == np.int64
    assert batch["ids"].min() >= 0
    assert batch["ids"].max() < 7
    assert batch["A"].shape == (3, 2)
    assert batch["A"].dtype == np.float16
    assert batch["flag"].shape == (3,)
    assert batch["sample_idx"].dtype == np.int64
    assert list(batch) == ["ids", "A", "flag", "sample_idx"]
    other_seed = FakeSource(make_spec(seed=6), tensors={"ids": ("int64", (6,))}, vocab_size=7)
    assert not np.array_equal(other_seed.make_batch(1, 2)["ids"], batch["ids"])


def test_default_fake_tensor_is_int32_input_ids(spec: DataSpec) -> None:
    batch = FakeSource(spec).make_batch(0, 0)
    assert batch["input_ids"].shape == (3, 32)
    assert batch["input_ids"].dtype == np.int32


@pytest.mark.parametrize("k", [0, 2])
def test_error_at_cycle_k_after_cycles_before_k(tmp_path: Path, spec: DataSpec, k: int) -> None:
    fp = FakeProducer(
        f"ipc://{tmp_path}/e.sock",
        spec=spec,
        error_at_cycle=k,
        error_code="transform",
        error_message="the model fell over",
    ).start()
    seen: list[tuple[int, int]] = []
    try:
        with FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=20) as feed:
            with pytest.raises(RemoteError) as exc_info:
                drain(feed, 5, seen)
            state = feed.state_dict()
        err = exc_info.value
        assert err.code == "transform"
        assert err.rank == 0
        assert "the model fell over" in str(err)
        assert fp.endpoint in str(err)
        expected = [(c, j) for c in range(k) for j in range(spec.batches_in_cycle(c))]
        assert seen == expected  # every batch before cycle k, nothing of cycle k
        assert (state["cycle"], state["batch"]) == (k, 0)
        fp._thread.join(20)
        assert fp.exit_code == 1  # a regeneration failure ends the server
    finally:
        fp.stop()


def test_default_injected_error_is_an_empty_shard(spec: DataSpec) -> None:
    src = FakeSource(spec, rank=2, error_at_cycle=1)
    assert len(list(src.iter_batches(0, 0))) == 2
    with pytest.raises(InjectedError) as exc_info:
        next(src.iter_batches(1, 0))
    assert exc_info.value.code == "empty_shard"
    assert "rank 2" in str(exc_info.value)
    assert "cycle 1" in str(exc_info.value)
    with pytest.raises(InjectedError):
        next(src.iter_batches(3, 0))  # and every later cycle


def test_delay_slows_every_batch(tmp_path: Path, spec: DataSpec) -> None:
    delay = 0.08
    feed_cfg = FeedConfig(exit_on_bye=False, prepare_ahead=False)
    with FakeProducer(f"ipc://{tmp_path}/d.sock", spec=spec, feed=feed_cfg, delay_s=delay) as fp:
        t0 = time.monotonic()
        with FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=20) as feed:
            n = len(consume(feed, 2))
            waited = feed.stats.wait_s
        elapsed = time.monotonic() - t0
    assert n == 5
    assert elapsed >= n * delay
    assert waited >= (n - 1) * delay  # the trainer saw the producer as slow


def test_delay_longer_than_the_client_timeout(tmp_path: Path, spec: DataSpec) -> None:
    with (
        FakeProducer(f"ipc://{tmp_path}/t.sock", spec=spec, delay_s=1.0) as fp,
        FeedClient(fp.endpoint, rank=0, spec=spec, timeout_s=0.3) as feed,
    ):
        cycle = feed.next_cycle()
        with pytest.raises(ProducerTimeoutError, match=r"batch 0 of cycle 0.*within 0\.3 s"):
            next(iter(cycle))


def test_tensor_argument_parsing() -> None:
    assert tensor_arg("A:float32:2304") == ("A", ("float32", (2304,)))
    assert tensor_arg("x:int64:4x8") == ("x", ("int64", (4, 8)))
    assert tensor_arg("s:uint8:") == ("s", ("uint8", ()))
    for bad in ["A:float32", "A:nosuchtype:3", "A:float32:3xq"]:
        with pytest.raises(argparse.ArgumentTypeError, match="name:dtype"):
            tensor_arg(bad)


def test_fake_cli_help_lists_every_option() -> None:
    text = parser().format_help()
    for action in parser()._actions:
        for opt in action.option_strings:
            assert opt in text


@pytest.mark.slow
def test_fake_cli_serves_and_fails_on_request(procs, tmp_path: Path) -> None:
    over = [
        "world_size=2",
        "batch_size=3",
        "seed=5",
        "dataset.on_the_fly.samples_per_regeneration_cycle=10",
        "fake.shard_rows=6",
        "fake.seq_len=5",
        f"feed.endpoint={ipc_endpoint(tmp_path)}",
    ]
    cfg = load_config(None, over)
    spec = DataSpec.from_config(cfg)
    cmd = python_cmd(
        "lensfeed.producer.fake",
        "--tensor",
        "input_ids:int32:5",
        "--tensor",
        "A:float16:2x2",
        "--error-at-cycle",
        "2",
        "--error-code",
        "transform",
        *over,
    )
    p = procs.start(cmd, RANK="1")
    seen: list[tuple[int, int]] = []
    cursor = CycleCursor(spec, rank=1, shard_rows=6)

    def check(c: int, b: int, batch: dict[str, torch.Tensor]) -> None:
        assert batch["input_ids"].shape == (3, 5)
        assert batch["A"].dtype == torch.float16
        assert batch["A"].shape == (3, 2, 2)
        assert batch["sample_idx"].tolist() == (cursor.batch_rows(c, b) + 6).tolist()

    with (
        FeedClient(
            cfg.endpoint_for(1),
            rank=1,
            spec=spec,
            timeout_s=30,
            tensors={"input_ids": ("int32", (5,)), "A": ("float16", (2, 2))},
        ) as feed,
        pytest.raises(RemoteError) as exc_info,
    ):
        drain(feed, 4, seen, check)
    assert seen == [(c, j) for c in range(2) for j in range(3)]
    assert exc_info.value.code == "transform"
    assert "injected error at cycle 2" in str(exc_info.value)
    code, out = procs.wait(p, timeout=30)
    assert code == 1, out
    assert "fake producer rank 1" in out
