"""Run one producer process and one FeedClient process against each other and collect both
JSON reports (optionally under a sampling profiler)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Proc, ThreadCpu, Workdir, py, read_report
from benchmarks.settings import BATCH


@dataclass
class FeedResult:
    consumer: dict[str, Any]
    producer: dict[str, Any]
    profiles: dict[str, Path]
    #: ``side -> thread -> CPU seconds`` over the timed cycles (``run_feed(thread_cpu=True)``)
    threads: dict[str, dict[str, float]] | None = None

    def timed_cycles(self) -> list[dict[str, Any]]:
        """Complete cycles after the warm-up."""
        cycles = self.consumer["cycles"][self.consumer["warmup"] :]
        return [c for c in cycles if c["complete"]]

    def blocks(self) -> list[dict[str, Any]]:
        """Steady-state blocks (``--block``) of the timed cycles."""
        return [b for c in self.timed_cycles() for b in c["blocks"]]


def profiler() -> str | None:
    """The ``py-spy`` executable (every thread, native sampling, no pause), on ``PATH`` or beside
    this interpreter (an unactivated venv); None without it: profiles are optional (the
    ``bench`` extra)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def _wrap(cmd: list[str], profile: Path | None) -> list[str]:
    spy = profiler()
    if profile is None or spy is None:
        return cmd
    rec = ["record", "--threads", "--nonblocking", "--rate", "250", "--format", "raw"]
    return [spy, *rec, "--output", str(profile), "--", *cmd]


def overrides(
    *,
    dataset: Path,
    endpoint: str,
    cycle_samples: int,
    shuffle: bool,
    batch_size: int = BATCH,
    extra: Sequence[str] = (),
) -> list[str]:
    """Config overrides both processes load (they must agree on the data spec)."""
    return [
        f"dataset.path={dataset}",
        f"batch_size={batch_size}",
        "world_size=1",
        "seed=0",
        f"dataset.on_the_fly.samples_per_regeneration_cycle={cycle_samples}",
        f"dataset.on_the_fly.shuffle={str(shuffle).lower()}",
        f"feed.endpoint={endpoint}",
        "feed.timeout_s=120",
        *extra,
    ]


def run_feed(
    work: Workdir,
    name: str,
    *,
    dataset: Path,
    cycle_batches: int,
    cycles: int,
    initial_batches: int | None = None,
    warmup: int,
    batch_size: int = BATCH,
    shuffle: bool = True,
    transform: str = "",
    extra_overrides: Sequence[str] = (),
    consumer_args: Sequence[str] = (),
    profile: bool = False,
    timeout_s: float = 300.0,
    producer_codes: Sequence[int] = (0,),
    thread_cpu: bool = False,
    endpoint: str | None = None,
) -> FeedResult:
    """Start ``benchmarks.producer_runner`` and ``benchmarks.consumer``; wait for both
    (over ``endpoint``, default a fresh ipc socket)."""
    ov = overrides(
        dataset=dataset,
        endpoint=endpoint or work.endpoint(name),
        cycle_samples=cycle_batches * batch_size,
        shuffle=shuffle,
        batch_size=batch_size,
        extra=[
            *(
                [f"training_initial_cache_size_per_rank={initial_batches * batch_size}"]
                if initial_batches
                else []
            ),
            *extra_overrides,
        ],
    )
    p_report, c_report = work.path(f"{name}-producer.json"), work.path(f"{name}-consumer.json")
    profiles: dict[str, Path] = {}
    if profile:
        for side in ("producer", "trainer"):
            profiles[side] = work.path(f"{name}-{side}.collapsed")
    p_cmd = py("benchmarks.producer_runner", "--report", str(p_report))
    if transform:
        p_cmd += ["--transform", transform]
    c_cmd = py(
        "benchmarks.consumer",
        "--report",
        str(c_report),
        "--cycles",
        str(cycles),
        "--warmup",
        str(warmup),
        *consumer_args,
        *_declared_tensors(transform),
    )
    producer = Proc(
        _wrap([*p_cmd, "--", *ov], profiles.get("producer")), log=work.path(f"{name}-p.log")
    )
    c_cmd += ["--producer-pid", str(producer.pid)]  # the consumer reads both CPU times
    consumer = Proc(
        _wrap([*c_cmd, "--", *ov], profiles.get("trainer")), log=work.path(f"{name}-c.log")
    )
    sampler = ThreadCpu({"producer": producer.pid, "trainer": consumer.pid}) if thread_cpu else None
    try:
        c_code = consumer.wait(timeout_s)
        p_code = producer.wait(30)
    finally:
        if sampler:
            sampler.stop()
        consumer.kill()
        producer.kill()
    if c_code != 0 or not c_report.is_file():
        raise RuntimeError(f"{name}: consumer failed ({c_code}):\n{consumer.tail()}")
    if p_code not in producer_codes or not p_report.is_file():
        raise RuntimeError(f"{name}: producer failed ({p_code}):\n{producer.tail()}")
    result = FeedResult(read_report(c_report), read_report(p_report), profiles)
    timed = result.timed_cycles()
    if sampler and timed:
        result.threads = sampler.between(timed[0]["wall_start"], timed[-1]["wall_end"])
    return result


def _declared_tensors(transform: str) -> list[str]:
    """The client declares what an ``act:DTYPE:SHAPE`` transform serves instead of tokens."""
    kind, _, rest = transform.partition(":")
    return ["--tensor", f"A:{rest}", "--tensor", "sample_idx:int64:"] if kind == "act" else []


__all__ = ["FeedResult", "overrides", "profiler", "run_feed"]
