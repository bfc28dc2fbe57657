"""FeedDataset under a plain DataLoader: one cycle per epoch, nothing re-batched, and a cursor
that a stateful loader can save and resume mid-epoch. Against the real server (FakeProducer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.errors import LensfeedError
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.fake import FakeProducer
from lensfeed.trainer.dataset import FeedDataset

pytestmark = pytest.mark.timeout(90)

ROWS = 11


@pytest.fixture
def cfg(tmp_path: Path) -> LensfeedConfig:
    return load_config(
        None,
        [
            "batch_size=3",
            "dataset.on_the_fly.samples_per_regeneration_cycle=9",
            "training.num_cycles=3",
            f"feed.endpoint=ipc://{tmp_path}/ipc/r{{rank}}.sock",
        ],
    )


@pytest.fixture
def fake(cfg: LensfeedConfig):
    spec = DataSpec.from_config(cfg)
    with FakeProducer(cfg.bind_for(0), spec=spec, shard_rows=ROWS) as fp:
        yield fp


def expected(cfg: LensfeedConfig) -> list[list[list[int]]]:
    """sample_idx of every batch of every cycle (docs/protocol.md section 8)."""
    spec = DataSpec.from_config(cfg)
    cursor = CycleCursor(spec, rank=0, shard_rows=ROWS)
    return [
        [cursor.batch_rows(c, j).tolist() for j in range(spec.batches_in_cycle(c))]
        for c in range(cfg.training.num_cycles)
    ]


def test_one_epoch_is_one_cycle_of_whole_batches(cfg: LensfeedConfig, fake: FakeProducer) -> None:
    ds = FeedDataset(cfg, 0)
    loader = DataLoader(ds, batch_size=None)
    try:
        epochs = [[b["sample_idx"].tolist() for b in loader] for _ in range(4)]
    finally:
        ds.close()
    assert epochs[:3] == expected(cfg)
    assert epochs[3] == []  # num_cycles reached
    assert all(len(b) == 3 for e in epochs for b in e)  # the producer's batches, as they came


def test_state_saved_mid_epoch_resumes_at_the_next_batch(
    cfg: LensfeedConfig, fake: FakeProducer
) -> None:
    first = FeedDataset(cfg, 0)
    seen: list[list[int]] = []
    for i, batch in enumerate(DataLoader(first, batch_size=None)):
        seen.append(batch["sample_idx"].tolist())
        if i == 1:
            state = first.state_dict()
            break
    first.close()
    assert state["cycle"] == 0
    assert state["batch"] == 2
    resumed = FeedDataset(cfg, 0)
    resumed.load_state_dict(state)
    loader = DataLoader(resumed, batch_size=None)
    try:
        for _ in range(3):
            seen += [b["sample_idx"].tolist() for b in loader]
    finally:
        resumed.close()
    assert seen == [b for cycle in expected(cfg) for b in cycle]


def test_an_epoch_cut_short_is_continued_by_the_next(
    cfg: LensfeedConfig, fake: FakeProducer
) -> None:
    ds = FeedDataset(cfg, 0)
    loader = DataLoader(ds, batch_size=None)
    try:
        seen = []
        for batch in loader:
            seen.append(batch["sample_idx"].tolist())
            break
        seen += [b["sample_idx"].tolist() for b in loader]  # the rest of cycle 0
        assert seen == expected(cfg)[0]
        with pytest.raises(LensfeedError, match="before iterating"):
            ds.load_state_dict({"cycle": 0, "batch": 0})
    finally:
        ds.close()


def test_an_epoch_cut_right_after_its_last_batch_is_a_whole_epoch(
    cfg: LensfeedConfig, fake: FakeProducer
) -> None:
    """Breaking out after a cycle's last batch (its end not read yet) finishes the epoch: the
    next one is the next cycle, as state_dict() says and as a resumed run would see it."""
    ds = FeedDataset(cfg, 0)
    loader = DataLoader(ds, batch_size=None)
    try:
        epochs = []
        for _ in range(2):
            seen = []
            for batch in loader:
                seen.append(batch["sample_idx"].tolist())
                if len(seen) == 3:  # the cycle's last batch
                    break
            epochs.append(seen)
            assert ds.state_dict()["cycle"] == len(epochs)
        epochs.append([b["sample_idx"].tolist() for b in loader])
    finally:
        ds.close()
    assert epochs == expected(cfg)


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_are_refused(cfg: LensfeedConfig, fake: FakeProducer, workers) -> None:
    """Even one worker: it would hold the cursor, so every epoch would start again from the
    main process's fresh copy (cycle 0) and state_dict() would never move."""
    ds = FeedDataset(cfg, 0)
    with pytest.raises(Exception, match="num_workers=0"):
        next(iter(DataLoader(ds, batch_size=None, num_workers=workers)))
