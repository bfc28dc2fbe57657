"""The path to the training device: batches staged ahead (pinned slots and a copy stream on
CUDA) reach the loop with the bytes the producer sent, and keep them while the stream goes on.

Each test runs on the CPU in CI (the same staging loop, ``stage_ahead`` included) and on CUDA
where a device is present, where a slow consumer stream makes every copy race the next one.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from lensfeed.common.config import load_config
from lensfeed.common.spec import DataSpec
from lensfeed.producer.fake import FakeProducer
from lensfeed.trainer.client import FeedClient

pytestmark = pytest.mark.timeout(120)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def make_spec() -> DataSpec:
    over = {"batch_size": 8, "dataset.on_the_fly.samples_per_regeneration_cycle": 96, "seed": 5}
    return DataSpec.from_config(load_config(None, [f"{k}={v}" for k, v in over.items()]))


def digest(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(batch):
        t = batch[name].detach().to("cpu").contiguous()
        h.update(name.encode() + str(t.dtype).encode() + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stream(endpoint: str, spec: DataSpec, device: str, cycles: int, **kw: object) -> list:
    """Every batch of ``cycles`` cycles, held until the end (nothing is copied on the way)."""
    held: list[dict[str, torch.Tensor]] = []
    busy = torch.randn(1024, 1024, device=device) if device == "cuda" else None
    with FeedClient(endpoint, rank=0, spec=spec, device=device, timeout_s=30, **kw) as feed:
        for cycle in feed.cycles(cycles):
            for batch in cycle:
                assert all(t.device.type == device for t in batch.values())
                held.append(batch)
                if busy is not None:  # a slow step on the loop's stream: copies run ahead of it
                    for _ in range(4):
                        busy = busy @ busy
                        busy /= busy.norm()
    return held


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage_ahead", [1, 4])
def test_staged_batches_carry_the_sent_bytes_and_keep_them(tmp_path, device, stage_ahead):
    """Against a one-batch-at-a-time CPU reference: the same batches in the same order, each
    byte right, and still right after the whole stream (no staging slot was reused under a
    batch the loop still holds)."""
    spec = make_spec()
    with FakeProducer(f"ipc://{tmp_path}/ref.sock", spec=spec, shard_rows=40) as fp:
        reference = [digest(b) for b in stream(fp.endpoint, spec, "cpu", 3, prefetch=1)]
    with FakeProducer(f"ipc://{tmp_path}/dev.sock", spec=spec, shard_rows=40) as fp:
        held = stream(fp.endpoint, spec, device, 3, stage_ahead=stage_ahead)
    assert len(reference) == 3 * 12
    assert [digest(b) for b in held] == reference
