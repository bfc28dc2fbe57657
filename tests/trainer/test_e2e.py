"""End to end: two real producers over a real Arrow dataset, a 2-rank torchrun trainer."""

from __future__ import annotations

import pytest

from lensfeed.producer.shard import rank_slice
from tests._util import make_dataset, python_cmd, torchrun_cmd
from tests._util import read_records as records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def test_two_producers_two_ranks_three_cycles(procs, tmp_path):
    rows, batch, cycle = 45, 4, 30  # 22/23 rows per rank < 30 per cycle: every cycle wraps
    data = make_dataset(tmp_path / "ds", rows=rows, seq_len=16)
    over = [
        "world_size=2",
        f"batch_size={batch}",
        f"dataset.path={data}",
        f"dataset.on_the_fly.samples_per_regeneration_cycle={cycle}",
        f"feed.endpoint=ipc://{tmp_path}/ipc/p{{rank}}.sock",
        "feed.timeout_s=30",
        "feed.reconnect_timeout_s=20",
        "training.collective_timeout_s=90",
        "training.num_cycles=3",
        "training.progress=false",
        "training.log_batches=true",
        f"training.checkpoint_dir={tmp_path / 'ckpt'}",
        f"training.metrics_path={tmp_path / 'metrics.jsonl'}",
    ]
    # Trainer first: the producers may start in either order.
    trainer = procs.start(torchrun_cmd(*over))
    producers = [
        procs.start(python_cmd("lensfeed.producer", "--rank", str(r), *over)) for r in (0, 1)
    ]
    code, out = procs.wait(trainer, timeout=120)
    assert code == 0, out
    for p in producers:
        pcode, pout = procs.wait(p, timeout=20)
        assert pcode == 0, pout
        assert "batches per cycle" in pout
        assert "wraps the shard" in pout  # the shard-smaller-than-a-cycle warning
    for r, name in ((0, "metrics.jsonl"), (1, "metrics.rank1.jsonl")):
        cycles = records(tmp_path / name, "cycle")
        assert [c["batches"] for c in cycles] == [cycle // batch] * 3
        assert all(c["wraps"] >= 1 for c in cycles)
        start, end = rank_slice(rows, r, 2)
        seen = [i for b in records(tmp_path / name, "batch") for i in b["sample_idx"]]
        assert len(seen) == 3 * (cycle // batch) * batch
        assert set(seen) == set(range(start, end))  # only (and all of) this rank's rows
    assert "wraps 1" in out or "wraps 2" in out  # the per-cycle log line shows the wraps
