"""A model factory that raises in one producer stops every trainer rank with its message."""

from __future__ import annotations

import pytest
from torch import nn

from tests._util import make_dataset, python_cmd, torchrun_cmd
from tests._util import read_records as records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def exploding_model() -> nn.Module:
    """Model factory (``activations.model=tests.trainer.test_activation_failure:...``)."""
    raise RuntimeError("boom: weights not found")


def test_factory_error_reaches_every_rank(procs, tmp_path):
    data = make_dataset(tmp_path / "ds", rows=64, seq_len=16)
    over = [
        "world_size=2",
        "batch_size=4",
        f"dataset.path={data}",
        "dataset.on_the_fly.samples_per_regeneration_cycle=16",
        "activations.builder=activations",
        "activations.tiny.d_model=16",
        "activations.tiny.n_heads=2",
        "activations.layer=1",
        f"feed.endpoint=ipc://{tmp_path}/ipc/p{{rank}}.sock",
        "feed.timeout_s=30",
        "feed.error_linger_s=60",
        "feed.reconnect_timeout_s=20",
        "training.collective_timeout_s=90",
        "training.progress=false",
        f"training.checkpoint_dir={tmp_path / 'ckpt'}",
        f"training.metrics_path={tmp_path / 'metrics.jsonl'}",
    ]
    bad = "activations.model=tests.trainer.test_activation_failure:exploding_model"
    producers = [
        procs.start(python_cmd("lensfeed.producer", "--rank", "0", *over)),
        procs.start(python_cmd("lensfeed.producer", "--rank", "1", *over, bad)),
    ]
    trainer = procs.start(torchrun_cmd(*over))
    code, out = procs.wait(trainer, timeout=120)
    assert code != 0
    assert procs.wait(producers[1], timeout=90)[0] == 1  # the failing producer exits non-zero
    for name in ("metrics.jsonl", "metrics.rank1.jsonl"):
        status = records(tmp_path / name, "status")[-1]
        assert status["failed_rank"] == 1
        assert "boom: weights not found" in status["message"]
        assert status["training_status"] == "error_transform"
    assert out.count("boom: weights not found") >= 2  # logged by both ranks
