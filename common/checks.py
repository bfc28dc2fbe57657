"""The rules a loaded configuration must satisfy, each naming the key and the value at fault.

Run by :func:`lensfeed.common.config.load_config` after the types were checked (OmegaConf), so a
bad setting stops a job at start, before a producer binds or a GPU is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lensfeed.common import endpoints
from lensfeed.common.errors import ConfigError

if TYPE_CHECKING:
    from lensfeed.common.config import LensfeedConfig

#: Most batches a client may have in flight; a producer honours no more credit than this.
MAX_PREFETCH = 1 << 16


def validate(cfg: LensfeedConfig) -> None:
    """Raise :class:`ConfigError` naming key and value for settings that cannot work."""
    _check_sizes(cfg)
    _check_timeouts(cfg)
    _check_data(cfg)
    endpoints.validate(cfg.feed, cfg.world_size)
    _check_activations(cfg)


def _check_sizes(cfg: LensfeedConfig) -> None:
    positive = {
        "world_size": cfg.world_size,
        "batch_size": cfg.batch_size,
        "dataset.on_the_fly.samples_per_regeneration_cycle": cfg.cycle_size,
        "training_initial_cache_size_per_rank": cfg.initial_cycle_size,
        "feed.prefetch": cfg.feed.prefetch,
        "feed.prefetch_bytes": cfg.feed.prefetch_bytes,
        "feed.max_ahead_batches": cfg.feed.max_ahead_batches,
        "feed.max_message_bytes": cfg.feed.max_message_bytes,
        "activations.forward_batch_size": cfg.activations.forward_batch_size,
        "training.num_cycles": cfg.training.num_cycles,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be positive (got {value})")
    if cfg.feed.prefetch > MAX_PREFETCH:
        raise ConfigError(f"'feed.prefetch' must be <= {MAX_PREFETCH} (got {cfg.feed.prefetch})")
    if cfg.seed < 0:
        raise ConfigError(f"'seed' must be >= 0 (got {cfg.seed})")
    for key, value in {
        "feed.batches_per_message": cfg.feed.batches_per_message,
        "training.max_steps": cfg.training.max_steps,
        "training.checkpoint_every": cfg.training.checkpoint_every,
        "training.checkpoint_every_cycles": cfg.training.checkpoint_every_cycles,
    }.items():
        if value < 0:
            raise ConfigError(f"'{key}' must be >= 0 (got {value})")
    if cfg.training.keep_checkpoints < 1:
        raise ConfigError(
            f"'training.keep_checkpoints' must be >= 1 (got {cfg.training.keep_checkpoints})"
        )


def _check_timeouts(cfg: LensfeedConfig) -> None:
    for key, value in {
        "feed.timeout_s": cfg.feed.timeout_s,
        "training.collective_timeout_s": cfg.training.collective_timeout_s,
    }.items():
        if not value > 0:
            raise ConfigError(f"'{key}' must be > 0 seconds (got {value})")
    for key, value in {
        "feed.heartbeat_timeout_s": cfg.feed.heartbeat_timeout_s,
        "feed.reconnect_timeout_s": cfg.feed.reconnect_timeout_s,
    }.items():
        if not value >= 0:
            raise ConfigError(f"'{key}' must be >= 0 seconds (got {value})")
    if 0 < cfg.feed.heartbeat_timeout_s < 0.2:
        raise ConfigError(
            f"'feed.heartbeat_timeout_s' must be 0 (off) or >= 0.2 s (got "
            f"{cfg.feed.heartbeat_timeout_s})"
        )
    for key, value in {
        "feed.timeout_s": cfg.feed.timeout_s,
        "feed.reconnect_timeout_s": cfg.feed.reconnect_timeout_s,
    }.items():
        if cfg.training.collective_timeout_s <= value:
            raise ConfigError(
                f"'training.collective_timeout_s' must exceed '{key}' (got "
                f"{cfg.training.collective_timeout_s} <= {value}): the other ranks wait in a "
                "collective while one rank waits for, or reconnects to, its producer"
            )


def _check_data(cfg: LensfeedConfig) -> None:
    if cfg.batch_size > cfg.cycle_size:
        raise ConfigError(
            "'batch_size' must be <= 'dataset.on_the_fly.samples_per_regeneration_cycle' "
            f"(got {cfg.batch_size} > {cfg.cycle_size})"
        )
    if cfg.batch_size > cfg.initial_cycle_size:
        raise ConfigError(
            "'batch_size' must be <= 'training_initial_cache_size_per_rank' "
            f"(got {cfg.batch_size} > {cfg.initial_cycle_size})"
        )
    if not cfg.dataset.columns or cfg.dataset.columns[0] != "input_ids":
        raise ConfigError(
            f"'dataset.columns' must start with 'input_ids' (got {list(cfg.dataset.columns)})"
        )
    if len(set(cfg.dataset.columns)) != len(cfg.dataset.columns):
        raise ConfigError(f"'dataset.columns' has duplicates (got {list(cfg.dataset.columns)})")


def _check_activations(cfg: LensfeedConfig) -> None:
    if cfg.activations.builder not in ("tokens", "activations"):
        raise ConfigError(
            "'activations.builder' must be 'tokens' or 'activations' "
            f"(got {cfg.activations.builder!r})"
        )
    if cfg.activations.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            "'activations.dtype' must be float32, bfloat16 or float16 "
            f"(got {cfg.activations.dtype!r})"
        )


__all__ = ["MAX_PREFETCH", "validate"]
