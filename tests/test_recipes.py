"""The framework recipes in docs/recipes/ run as written: Lightning trains on the feed, one
cycle per epoch, every batch exactly once and as the producer made it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from lensfeed.common.config import load_config
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.fake import FakeProducer
from tests._util import REPO, Procs, python_cmd

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


#: Runs the recipe's ``main`` as its ``__main__`` does, with a TinyLM that also records the
#: ``sample_idx`` of every batch it trains on, per Lightning global rank.
_RECORDING_DRIVER = """
import json, sys, importlib.util
spec = importlib.util.spec_from_file_location("recipe", {recipe!r})
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
seen = []

class Recording(recipe.TinyLM):
    def training_step(self, batch, idx):
        seen.append(batch["sample_idx"].tolist())
        return super().training_step(batch, idx)

    def on_train_end(self):
        with open({out!r} + f"/seen.rank{{self.global_rank}}.json", "w") as f:
            json.dump(seen, f)

recipe.TinyLM = Recording
recipe.main(*sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lightning_recipe_under_torchrun_gives_each_rank_its_own_producer(
    tmp_path: Path, procs: Procs
) -> None:
    """``torchrun --nproc_per_node 2`` on a CPU host: two Lightning ranks (not two rank 0s
    that both read producer 0), each training on exactly its producer's batches, and nothing
    written to the working directory (checkpoints go under training.checkpoint_dir)."""
    pytest.importorskip("lightning")
    ipc = tmp_path / "ipc"
    ipc.mkdir(mode=0o700)
    settings = {
        "world_size": 2,
        "batch_size": 4,
        "dataset": {"on_the_fly": {"samples_per_regeneration_cycle": 16}},
        "feed": {"endpoint": f"ipc://{ipc}/r{{rank}}.sock", "timeout_s": 60},
        "training": {"num_cycles": 2, "checkpoint_dir": str(tmp_path / "ckpt")},
        "fake": {"seq_len": 8, "shard_rows": 23},
    }
    config = tmp_path / "lensfeed.yaml"
    config.write_text(json.dumps(settings))  # JSON is YAML
    driver = tmp_path / "driver.py"
    recipe = REPO / "docs" / "recipes" / "lightning_datamodule.py"
    driver.write_text(_RECORDING_DRIVER.format(recipe=str(recipe), out=str(tmp_path)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    fakes = [
        procs.start(python_cmd("lensfeed.producer.fake", "--config", str(config), "--rank", r))
        for r in ("0", "1")
    ]
    torchrun = python_cmd(
        "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)
    )
    code, out = procs.wait(procs.start([*torchrun, str(config)], cwd=cwd), timeout=150)
    assert code == 0, out
    for fake in fakes:
        assert procs.wait(fake, timeout=20)[0] == 0
    spec = DataSpec.from_config(load_config(config))
    for rank in (0, 1):
        cursor = CycleCursor(spec, rank=rank, shard_rows=23)
        offset = rank * 23  # sample_idx is the row in the whole dataset: rank r's shard is r's
        want = [(offset + cursor.batch_rows(c, j)).tolist() for c in range(2) for j in range(4)]
        assert json.loads((tmp_path / f"seen.rank{rank}.json").read_text()) == want
    assert list(cwd.iterdir()) == []
    assert list((tmp_path / "ckpt").rglob("*.ckpt"))


def test_lightning_recipe_resumes_every_rank_from_the_checkpoints_feed_state(
    tmp_path: Path,
) -> None:
    """A Lightning checkpoint holds rank 0's datamodule state only, and every rank loads it:
    rank 1 resumes at that cursor (all ranks are in lockstep) as itself, not as rank 0."""
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from lensfeed.trainer.client import FeedClient

    recipe = load_recipe("lightning_datamodule.py")
    cfg = load_config(
        None,
        [
            "world_size=2",
            "batch_size=4",
            "dataset.on_the_fly.samples_per_regeneration_cycle=16",
            f"feed.endpoint=ipc://{tmp_path}/ipc/r{{rank}}.sock",
        ],
    )
    saved = FeedClient.feed_state(DataSpec.from_config(cfg), 0, (1, 2))  # rank 0's, saved
    datamodule = recipe.FeedDataModule(cfg)
    datamodule.trainer = SimpleNamespace(global_rank=1)
    datamodule.load_state_dict(saved)
    datamodule.train_dataloader()
    try:
        state = datamodule.dataset.client.state_dict()
    finally:
        datamodule.teardown("fit")
    assert (state["rank"], state["cycle"], state["batch"]) == (1, 1, 2)
