"""The reference DDP trainer against fake producers: 1 rank in-process, 2 ranks under torchrun."""

from __future__ import annotations

from pathlib import Path

import pytest

from lensfeed.common.config import load_config
from lensfeed.trainer.train import run_training
from tests._util import python_cmd, run_in_process, run_ranks
from tests._util import read_records as records
from tests._util import trainer_overrides as overrides

pytestmark = pytest.mark.timeout(120)


def test_single_rank_in_process(tmp_path):
    code, metrics = run_in_process(tmp_path)
    assert code == 0
    cycles = records(metrics, "cycle")
    assert [c["cycle"] for c in cycles] == [0, 1, 2]
    assert all(c["batches"] == 5 for c in cycles)
    assert [c["total_wraps"] for c in cycles] == [1, 3, 4]  # 20 samples/cycle, 13 rows
    status = records(metrics, "status")[-1]
    assert status["training_status"] == "ok"
    assert status["samples"] == 60
    assert (tmp_path / "ckpt" / "step_00000015" / "rank0.pt").is_file()


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir(mode=0o700)  # holds the ipc sockets too: private
    part_dir.mkdir(mode=0o700)
    code, full_metrics = run_in_process(full_dir)
    assert code == 0
    code, part_metrics = run_in_process(part_dir, **{"training.max_steps": 7})
    assert code == 0
    code, _ = run_in_process(part_dir, **{"training.resume": str(part_dir / "ckpt")})
    assert code == 0
    full = [
        (b["step"], b["cycle"], b["batch"], b["digest"]) for b in records(full_metrics, "batch")
    ]
    part = [
        (b["step"], b["cycle"], b["batch"], b["digest"]) for b in records(part_metrics, "batch")
    ]
    assert len(full) == 15
    assert part == full  # steps 1..7 from the first run, 8..15 from the resumed run
    assert [b["sample_idx"] for b in records(part_metrics, "batch")][7:] == [
        b["sample_idx"] for b in records(full_metrics, "batch")
    ][7:]


def test_absent_producer_fails_with_endpoint_in_status(tmp_path):
    cfg = load_config(None, overrides(tmp_path, **{"feed.timeout_s": 1}))
    assert run_training(cfg) == 1
    status = records(Path(cfg.training.metrics_path), "status")[-1]
    assert status["training_status"] == "error_timeout"
    assert cfg.endpoint_for(0) in status["message"]


def start_fakes(procs, tmp_path: Path, world: int, *fake_args: str, **extra: object) -> list:
    return [
        procs.start(
            python_cmd(
                "lensfeed.producer.fake",
                "--rank",
                str(r),
                *(fake_args if r == world - 1 else ()),
                *overrides(tmp_path, world, **extra),
            )
        )
        for r in range(world)
    ]


def torchrun(procs, tmp_path: Path, world: int, **extra: object):
    return procs.start(
        python_cmd(
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(world),
            "-m",
            "lensfeed.trainer",
            *overrides(tmp_path, world, **extra),
        )
    )


@pytest.mark.slow
def test_two_ranks_under_torchrun(procs, tmp_path):
    fakes = start_fakes(procs, tmp_path, 2)
    code, out = procs.wait(torchrun(procs, tmp_path, 2), timeout=100)
    assert code == 0, out
    for rank, name in ((0, "metrics.jsonl"), (1, "metrics.rank1.jsonl")):
        cycles = records(tmp_path / name, "cycle")
        assert [c["batches"] for c in cycles] == [5, 5, 5]
        batches = records(tmp_path / name, "batch")
        # The fake producer's rank r serves rows r*13 .. r*13+12.
        assert {i for b in batches for i in b["sample_idx"]} <= set(
            range(rank * 13, rank * 13 + 13)
        )
        assert records(tmp_path / name, "status")[-1]["training_status"] == "ok"
    for f in fakes:  # the trainer's goodbye ends each producer cleanly
        assert procs.wait(f, timeout=20)[0] == 0


@pytest.mark.slow
def test_producer_error_stops_every_rank(procs, tmp_path):
    start_fakes(procs, tmp_path, 2, "--error-at-cycle", "1", "--error-code", "empty_shard")
    code, out = procs.wait(torchrun(procs, tmp_path, 2), timeout=100)
    assert code != 0
    message = "fake producer rank 1: injected error at cycle 1"
    for name in ("metrics.jsonl", "metrics.rank1.jsonl"):
        status = records(tmp_path / name, "status")[-1]
        assert status["training_status"] == "error_empty_cache_regen"
        assert status["failed_rank"] == 1
        assert message in status["message"]
        assert status["steps"] == 5  # both ranks finished cycle 0 and stopped together
    assert out.count(message) >= 2  # logged by both ranks


def _rank_with_setup(rank: int, port: int, tmp: str, q) -> None:
    """One DDP rank of test_a_rank_that_cannot_set_up_stops_every_rank (spawned)."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    os.environ["LOCAL_RANK"] = str(rank)
    from lensfeed.common.spec import DataSpec
    from lensfeed.producer.fake import FakeProducer

    extra: dict[str, object] = {"training.collective_timeout_s": 35, "feed.timeout_s": 10}
    extra["feed.reconnect_timeout_s"] = 10
    if rank == 1:  # this rank's node lacks the key files: a ConfigError in its set-up
        extra["feed.keys_dir"] = f"{tmp}/no-keys-on-this-node"
    cfg = load_config(None, overrides(Path(tmp), 2, **extra))
    tensors = {"input_ids": ("int32", (8,))}
    spec = DataSpec.from_config(cfg)
    with FakeProducer(cfg.endpoint_for(rank), spec=spec, rank=rank, tensors=tensors, shard_rows=13):
        q.put((rank, run_training(cfg)))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rank_that_cannot_set_up_stops_every_rank(tmp_path):
    """A failure after init_process_group but before training (e.g. missing key files on one
    node) is voted on: every rank exits 1 with a status record naming rank 1 and its cause,
    instead of the others dying in a collective with a backend error."""
    tmp_path.chmod(0o700)
    codes = run_ranks(_rank_with_setup, tmp_path, timeout_s=100)
    assert codes == {0: 1, 1: 1}
    for name in ("metrics.jsonl", "metrics.rank1.jsonl"):
        status = records(tmp_path / name, "status")[-1]
        assert (status["failed_rank"], status["code"]) == (1, "config")
        assert "no-keys-on-this-node not found" in status["message"]


def test_a_disagreement_of_the_ranks_blames_no_rank() -> None:
    """Ranks that hold different values (e.g. batches in a cycle) all fail, none at fault: the
    status says so instead of every rank naming itself."""
    from lensfeed.common.errors import RanksDisagreeError
    from lensfeed.trainer.records import failure_status

    status = failure_status(RanksDisagreeError("ranks disagree on x"), steps=3, rank=1)
    assert (status["failed_rank"], status["code"]) == (-1, "ranks_disagree")
    assert status["training_status"] == "error_ranks_disagree"
