"""A producer process for the benchmarks: exactly ``python -m lensfeed.producer``, plus an
optional benchmark transform, plus a JSON report (peak RSS, CPU time) written when it exits.

::

    python -m benchmarks.producer_runner --report out.json [--transform act:float32:16x1024]
        -- dataset.path=... batch_size=64 ...

``--transform`` is one of

``act:DTYPE:SHAPE``
    activation-sized outputs ``A`` of per-sample shape ``SHAPE`` (e.g. ``16x1024``), taken from a
    small pool of pre-generated CPU tensors, so the cost is the feed's, not a model's (a real
    builder would run a forward here). ``sample_idx`` is passed through.
``cost:SECONDS[:sleep|busy]``
    pass-through that takes a fixed time per batch (a simulated regeneration step).

Without ``--transform`` the producer is ``lensfeed.producer.main.run_producer`` untouched. The
transform is attached by wrapping ``lensfeed.producer.main.build_source``, the only seam needed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

import lensfeed.producer.main as producer_main
from benchmarks.common import AnonSampler, self_report, spend, write_json
from lensfeed.common.config import load_config
from lensfeed.common.logs import setup_logging
from lensfeed.common.malloc import tune_for_large_messages
from lensfeed.producer.source import Array, Batch, BatchContext, ShardSource

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PoolActivations:
    """Serves ``A`` batches of a fixed shape from a pool of pre-generated tensors."""

    group = 1

    def __init__(self, shape: tuple[int, ...], dtype: str, batch_size: int, pool: int = 2) -> None:
        g = torch.Generator().manual_seed(0)
        tdtype = _TORCH_DTYPES[dtype]
        self.pool = [torch.randn((batch_size, *shape), generator=g).to(tdtype) for _ in range(pool)]
        self._i = 0

    def __call__(self, arrays: Batch, ctx: BatchContext) -> Mapping[str, Array]:
        a = self.pool[self._i % len(self.pool)]
        self._i += 1
        return {"A": a, "sample_idx": arrays["sample_idx"]}


class FixedCost:
    """Pass-through transform that takes ``seconds`` per batch (sleep or busy-wait)."""

    group = 1

    def __init__(self, seconds: float, mode: str = "sleep") -> None:
        self.seconds = seconds
        self.mode = mode

    def __call__(self, arrays: Batch, ctx: BatchContext) -> Mapping[str, Array]:
        spend(self.seconds, self.mode)
        return arrays


def parse_transform(text: str, batch_size: int) -> PoolActivations | FixedCost | None:
    if not text:
        return None
    kind, _, rest = text.partition(":")
    if kind == "act":
        dtype, _, dims = rest.partition(":")
        shape = tuple(int(d) for d in dims.split("x") if d)
        return PoolActivations(shape, dtype, batch_size)
    if kind == "cost":
        seconds, _, mode = rest.partition(":")
        return FixedCost(float(seconds), mode or "sleep")
    raise SystemExit(f"unknown --transform {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", type=Path, required=True, help="JSON report written at exit")
    p.add_argument("--transform", default="", help="act:DTYPE:SHAPE or cost:SECONDS[:MODE]")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    AnonSampler.start()
    setup_logging("bench-producer", rank=0, level=logging.WARNING)
    cfg = load_config(None, args.overrides)
    if cfg.feed.tune_malloc:  # what `lensfeed produce` does at start
        tune_for_large_messages()
    transform = parse_transform(args.transform, cfg.batch_size)
    if transform is not None:
        plain = producer_main.build_source

        def build_source(cfg_: object, rank: int) -> ShardSource:
            source = plain(cfg_, rank)  # type: ignore[arg-type]
            source.transform = transform
            return source

        producer_main.build_source = build_source  # type: ignore[assignment]
    code = producer_main.run_producer(cfg, 0)
    report = {
        "exit_code": code,
        "transform": args.transform,
        **self_report(),
    }
    write_json(args.report, report)
    return code


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
