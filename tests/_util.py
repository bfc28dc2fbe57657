"""Test helpers: tiny datasets, endpoints, and processes that always get cleaned up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np

from lensfeed.common.spec import DataSpec

REPO = Path(__file__).resolve().parent.parent


def make_dataset(
    path: Path,
    *,
    rows: int,
    seq_len: int = 8,
    dtype: str = "int32",
    extra_columns: Sequence[str] = (),
) -> Path:
    """A ``save_to_disk`` dataset whose row ``i`` holds tokens ``i*1000 + j`` (easy to check)."""
    ids = (np.arange(rows)[:, None] * 1000 + np.arange(seq_len)[None, :]).astype(dtype)
    data = {"input_ids": ids.tolist()}
    for name in extra_columns:
        data[name] = np.ones((rows, seq_len), dtype=dtype).tolist()
    features = datasets.Features({k: datasets.Sequence(datasets.Value(dtype)) for k in data})
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(path))
    return path


def read_records(path: Path, event: str) -> list[dict]:
    """The JSONL metrics records of one ``event`` kind (``batch``, ``cycle``, ``status``)."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if r["event"] == event]


def ipc_endpoint(tmp_path: Path, name: str = "feed") -> str:
    """An ``ipc://`` endpoint template under ``tmp_path`` (``{rank}`` is filled in by callers)."""
    return f"ipc://{tmp_path}/{name}-{{rank}}.sock"


def free_port() -> int:
    """A tcp port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def torchrun_cmd(*args: str, nproc: int = 2, max_restarts: int = 0) -> list[str]:
    """``torchrun --standalone`` of the reference trainer with ``args`` (config overrides)."""
    return python_cmd(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "lensfeed.trainer",
        *args,
    )


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


class Procs:
    """Starts subprocesses and guarantees they are gone when the test ends (see ``procs``)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(
        self, cmd: Sequence[str], *, cwd: Path | None = None, **env: str
    ) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            list(cmd),
            cwd=cwd or REPO,
            env=child_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.started.append(p)
        return p

    def wait(self, p: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
        """Exit code and combined output; the test fails (not hangs) after ``timeout``."""
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out

    def cleanup(self) -> None:
        for p in self.started:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except ProcessLookupError:
                    pass
            try:
                p.communicate(timeout=10)
            except Exception:
                pass


def make_spec(
    *, b: int, s: int, s0: int | None = None, shuffle: bool = False, seed: int = 0, world: int = 1
) -> DataSpec:
    """A data spec with batch ``b``, cycle ``s`` and first cycle ``s0`` (default ``s``)."""
    return DataSpec(
        dataset="data/test",
        columns=("input_ids",),
        world_size=world,
        batch_size=b,
        cycle_size=s,
        initial_cycle_size=s if s0 is None else s0,
        seed=seed,
        shuffle=shuffle,
    )


def trainer_overrides(tmp_path: Path, world_size: int = 1, **extra: object) -> list[str]:
    """A small reference-trainer run in ``tmp_path``: 3 cycles of 5 batches of 4, batch logs."""
    base = {
        "world_size": world_size,
        "batch_size": 4,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 20,
        "feed.endpoint": f"ipc://{tmp_path}/feed-{{rank}}.sock",
        "feed.timeout_s": 20,
        "feed.reconnect_timeout_s": 20,
        "training.collective_timeout_s": 70,
        "training.num_cycles": 3,
        "training.progress": "false",
        "training.log_batches": "true",
        "training.checkpoint_dir": str(tmp_path / "ckpt"),
        "training.metrics_path": str(tmp_path / "metrics.jsonl"),
        "fake.seq_len": 8,
        "fake.shard_rows": 13,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_in_process(tmp_path: Path, **extra: object) -> tuple[int, Path]:
    """The reference trainer, 1 rank, in this process, against a FakeProducer of 13 rows."""
    from lensfeed.common.config import load_config
    from lensfeed.producer.fake import FakeProducer
    from lensfeed.trainer.train import run_training

    cfg = load_config(None, trainer_overrides(tmp_path, **extra))
    spec = DataSpec.from_config(cfg)
    with FakeProducer(
        cfg.endpoint_for(0), spec=spec, tensors={"input_ids": ("int32", (8,))}, shard_rows=13
    ):
        code = run_training(cfg)
    return code, Path(cfg.training.metrics_path)


def run_ranks(target: Callable[..., None], tmp: Path, *, world: int = 2, timeout_s: float = 90):
    """Run ``target(rank, port, str(tmp), queue)`` in ``world`` spawned processes (a gloo group
    on a free port); each puts ``(rank, result)`` on the queue. Returns ``{rank: result}`` and
    leaves no process behind."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    ps = [ctx.Process(target=target, args=(r, port, str(tmp), out)) for r in range(world)]
    for p in ps:
        p.start()
    try:
        return dict(out.get(timeout=timeout_s) for _ in ps)
    finally:
        for p in ps:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
