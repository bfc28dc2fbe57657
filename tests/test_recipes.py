"""The framework recipes in docs/recipes/ run as written: Lightning trains on the feed, one
cycle per epoch, every batch exactly once and as the producer made it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from lensfeed.common.config import load_config
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.fake import FakeProducer
from tests._util import REPO

pytestmark = pytest.mark.timeout(120)


def load_recipe(name: str) -> ModuleType:
    path = REPO / "docs" / "recipes" / name
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_lightning_datamodule_recipe_trains_on_every_batch_once(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    recipe = load_recipe("lightning_datamodule.py")
    cfg = load_config(
        None,
        [
            "batch_size=4",
            "dataset.on_the_fly.samples_per_regeneration_cycle=16",
            "training.num_cycles=2",
            f"feed.endpoint=ipc://{tmp_path}/ipc/r{{rank}}.sock",
        ],
    )
    spec = DataSpec.from_config(cfg)
    seen: list[list[int]] = []

    class Recording(recipe.TinyLM):
        def training_step(self, batch, idx):  # type: ignore[no-untyped-def]
            seen.append(batch["sample_idx"].tolist())
            return super().training_step(batch, idx)

    datamodule = recipe.FeedDataModule(cfg)
    trainer = L.Trainer(
        max_epochs=cfg.training.num_cycles,
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with FakeProducer(cfg.bind_for(0), spec=spec, shard_rows=23):
        trainer.fit(Recording(), datamodule=datamodule)
    cursor = CycleCursor(spec, rank=0, shard_rows=23)
    want = [cursor.batch_rows(c, j).tolist() for c in range(2) for j in range(4)]
    assert seen == want
    assert trainer.global_step == 8
    assert datamodule.state_dict()["cycle"] == 2  # what a Lightning checkpoint would store
