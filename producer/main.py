"""Run one producer process: bind, load the rank's shard, serve until the trainer says bye.

With ``--ranks`` the same command supervises one producer child per rank instead
(:mod:`lensfeed.producer.supervisor`); that parent must not import torch, so the serving modules
(the server imports torch) are imported where a producer runs, not at the top of this module.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lensfeed.common.config import (
    LensfeedConfig,
    add_config_arguments,
    load_config,
    shard_size_warnings,
)
from lensfeed.common.env import env_rank
from lensfeed.common.errors import LensfeedError, ShardError
from lensfeed.common.logs import setup_logging
from lensfeed.producer.supervisor import add_supervisor_arguments, parse_ranks, supervise

if TYPE_CHECKING:
    from lensfeed.producer.source import ShardSource

log = logging.getLogger("lensfeed.producer")


def build_source(cfg: LensfeedConfig, rank: int) -> ShardSource:
    """Open rank's shard and the configured transform; bad input raises LensfeedError."""
    from lensfeed.common.spec import DataSpec
    from lensfeed.producer.shard import load_shard
    from lensfeed.producer.source import ShardSource

    spec = DataSpec.from_config(cfg)
    shard = load_shard(
        cfg.dataset.path, rank=rank, world_size=cfg.world_size, columns=list(cfg.dataset.columns)
    )
    with warnings.catch_warnings(record=True):
        for msg in shard_size_warnings(shard_rows=shard.num_rows, cfg=cfg, rank=rank):
            log.warning("%s", msg)
    transform = None
    if cfg.activations.builder == "activations":
        from lensfeed.producer.activations import build_transform

        tokens = shard.columns.get("input_ids")
        if tokens is None or not tokens.row_shape:
            why = "not in dataset.columns" if tokens is None else "one int per row"
            raise ShardError(
                f"{cfg.dataset.path}: the activation builder reads sequences from an "
                f"'input_ids' column of list<int> rows (here: {why})"
            )
        seq_len = tokens.row_shape[0]
        transform = build_transform(cfg.activations, rank=rank, seed=cfg.seed, seq_len=seq_len)
        transform.group = max(1, cfg.activations.forward_batch_size // cfg.batch_size)
    return ShardSource(shard, spec, transform=transform)


def run_producer(cfg: LensfeedConfig, rank: int) -> int:
    """Serve rank's shard; returns the exit code (non-zero after a fatal error)."""
    import zmq

    from lensfeed.producer.listener import Listener
    from lensfeed.producer.replies import linger_with_error
    from lensfeed.producer.server import ProducerServer

    if not 0 <= rank < cfg.world_size:
        raise LensfeedError(f"--rank {rank} is outside world_size {cfg.world_size}")
    endpoint = cfg.bind_for(rank)
    ctx = zmq.Context()
    try:
        listener = Listener(ctx, endpoint, cfg.feed)
    except BaseException:
        ctx.term()
        raise
    sock = listener.sock
    try:
        try:
            source = build_source(cfg, rank)
        except Exception as exc:  # anything: the trainer must learn why, not time out
            if isinstance(exc, LensfeedError):
                log.error("rank %d: %s", rank, exc)
            else:
                log.exception("rank %d: could not start", rank)
            log.info(
                "rank %d: waiting up to %.0f s to tell the trainer", rank, cfg.feed.error_linger_s
            )
            linger_with_error(sock, exc, linger_s=cfg.feed.error_linger_s)
            return 1
        log.info(
            "rank %d/%d serving %s on %s: shard rows %d (global %d..%d), cycle size %d "
            "(first %d), batch %d, %d batches per cycle, shuffle=%s, builder=%s",
            rank,
            cfg.world_size,
            cfg.dataset.path,
            endpoint,
            source.shard_rows,
            source.shard_offset,
            source.shard_offset + source.shard_rows - 1,
            cfg.cycle_size,
            cfg.initial_cycle_size,
            cfg.batch_size,
            source.cycle_info(1).batches,
            cfg.dataset.on_the_fly.shuffle,
            cfg.activations.builder,
        )
        server = ProducerServer(source, sock=sock, feed=cfg.feed)
        # Everything alive now (modules, torch, the shard, a model) lives as long as the process.
        # Frozen, it is no longer rescanned by every automatic full collection: those held the
        # GIL for tens of ms at a time, stalling the server loop (~7% of all CPU, perf, shuffled
        # (64, 2048)).
        gc.collect()
        gc.freeze()
        code = server.serve()
        log.info(
            "rank %d: done (exit %d), sent %d batches, %.1f MB",
            rank,
            code,
            server.batches_sent,
            server.bytes_sent / 1e6,
        )
        return code
    finally:
        listener.close(linger_ms=2000)  # a final error or goodbye still leaves
        ctx.term()


def _pin_cpus(spec: str) -> None:
    cpus = {int(c) for c in spec.split(",") if c.strip()}
    os.sched_setaffinity(0, cpus)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensfeed produce",
        description="Serve one DDP rank's shard of a pretokenized Arrow dataset over ZeroMQ. "
        "Each cycle regenerates the next samples_per_regeneration_cycle samples of the rank's "
        "shard (wrapping at its end) and streams them as batches to the trainer rank.",
    )
    add_config_arguments(p, example="batch_size=64 dataset.path=/data/corpus")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--rank",
        type=int,
        default=None,
        help="DDP rank to serve (default: $RANK, then $LOCAL_RANK, then 0)",
    )
    which.add_argument(
        "--ranks",
        type=parse_ranks,
        default=None,
        metavar="LIST",
        help="serve these ranks, e.g. 0-7 or 0,2,5-6: one producer process per rank, pinned, "
        "restarted after a crash; exits 0 when all exited 0",
    )
    p.add_argument(
        "--cpus",
        default="",
        help="comma-separated CPU ids to pin this process to (e.g. 0,1)",
    )
    add_supervisor_arguments(p)
    return p


def _supervise(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--ranks``: one child per rank (``lensfeed.producer.supervisor``)."""
    if args.cpus:
        p.error("--cpus pins one producer; with --ranks use --cpus-per-rank")
    setup_logging("supervisor")
    try:
        cfg = load_config(args.config, args.overrides)
        return supervise(
            args.ranks,
            world_size=cfg.world_size,
            config=args.config,
            overrides=args.overrides,
            cpus_per_rank=args.cpus_per_rank,
            gpus=args.gpus or "auto",
            max_restarts=5 if args.max_restarts is None else args.max_restarts,
        )
    except LensfeedError as exc:
        log.error("%s", exc)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.ranks is not None:
        return _supervise(p, args)
    given = [o for o in ("cpus_per_rank", "gpus", "max_restarts") if getattr(args, o) is not None]
    if given:
        p.error(f"--{given[0].replace('_', '-')} needs --ranks")
    rank = args.rank if args.rank is not None else env_rank(0)
    setup_logging("producer", rank=rank)
    try:
        if args.cpus:
            _pin_cpus(args.cpus)
        cfg = load_config(args.config, args.overrides)
        if cfg.feed.tune_malloc:
            from lensfeed.common.malloc import tune_for_large_messages

            tune_for_large_messages()
        return run_producer(cfg, rank)
    except LensfeedError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["build_source", "main", "parser", "run_producer"]
