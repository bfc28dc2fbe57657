"""Command line of the reference trainer."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from lensfeed.common.config import add_config_arguments, load_config
from lensfeed.common.env import env_rank
from lensfeed.common.errors import LensfeedError
from lensfeed.common.logs import setup_logging
from lensfeed.common.malloc import tune_for_large_messages
from lensfeed.trainer.train import run_training

log = logging.getLogger("lensfeed.trainer")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensfeed train",
        description="Reference DDP trainer: rank r pulls batches from producer r (feed.endpoint "
        "with {rank}) and trains a toy model. Run alone for world_size=1, or as "
        "`torchrun --nproc_per_node N -m lensfeed.trainer --config C world_size=N`.",
    )
    add_config_arguments(p, example="training.num_cycles=5 training.resume=checkpoints")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging("trainer", rank=env_rank(0))
    try:
        cfg = load_config(args.config, args.overrides)
    except LensfeedError as exc:
        log.error("%s", exc)
        return 1
    if cfg.feed.tune_malloc:
        tune_for_large_messages()
    return run_training(cfg)


__all__ = ["main", "parser"]
