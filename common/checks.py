"""The rules a loaded configuration must satisfy, each naming the key and the value at fault.

Run by :func:`lensfeed.common.config.load_config` after the types were checked (OmegaConf), so a
bad setting stops a job at start, before a producer binds or a GPU is touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lensfeed.common import endpoints
from lensfeed.common.errors import ConfigError
from lensfeed.common.limits import MAX_RANK, MAX_TENSORS
from lensfeed.common.spec import MAX_COLUMN_NAME, MAX_SPEC_INT, added_tensors

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
    if not 0 <= cfg.seed <= MAX_SPEC_INT:
        raise ConfigError(f"'seed' must be in [0, {MAX_SPEC_INT}] (got {cfg.seed})")
    for key, value in {
        "world_size": cfg.world_size,
        "batch_size": cfg.batch_size,
        "dataset.on_the_fly.samples_per_regeneration_cycle": cfg.cycle_size,
        "training_initial_cache_size_per_rank": cfg.initial_cycle_size,
    }.items():
        if value > MAX_SPEC_INT:  # what the handshake accepts (docs/protocol.md section 5)
            raise ConfigError(f"'{key}' must be <= {MAX_SPEC_INT} (got {value})")
    if cfg.world_size > MAX_RANK + 1:
        raise ConfigError(f"'world_size' must be <= {MAX_RANK + 1} (got {cfg.world_size})")
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


#: Longest timeout any setting may have: ZeroMQ takes milliseconds as a C int, and every wait
#: must end (about 24 days).
MAX_TIMEOUT_S = float((1 << 31) - 1) // 1000


def _check_timeouts(cfg: LensfeedConfig) -> None:
    for key, value in {
        "feed.timeout_s": cfg.feed.timeout_s,
        "feed.heartbeat_timeout_s": cfg.feed.heartbeat_timeout_s,
        "feed.reconnect_timeout_s": cfg.feed.reconnect_timeout_s,
        "feed.error_linger_s": cfg.feed.error_linger_s,
        "feed.idle_timeout_s": cfg.feed.idle_timeout_s,
        "training.collective_timeout_s": cfg.training.collective_timeout_s,
    }.items():
        if not 0 <= value <= MAX_TIMEOUT_S:  # NaN and infinity fail here too
            raise ConfigError(
                f"'{key}' must be a number of seconds in [0, {MAX_TIMEOUT_S:.0f}] (got {value})"
            )
    for key, value in {
        "feed.timeout_s": cfg.feed.timeout_s,
        "training.collective_timeout_s": cfg.training.collective_timeout_s,
    }.items():
        if not value > 0:
            raise ConfigError(f"'{key}' must be > 0 seconds (got {value})")
    if 0 < cfg.feed.heartbeat_timeout_s < 0.2:
        raise ConfigError(
            f"'feed.heartbeat_timeout_s' must be 0 (off) or >= 0.2 s (got "
            f"{cfg.feed.heartbeat_timeout_s})"
        )
    # The longest a rank's next() can take: a wait that ends in a loss just before its
    # timeout, the reconnect window, then a full wait on the new session (a restarted producer
    # regenerating its first cycle). The other ranks sit in a collective all that time.
    feed = cfg.feed
    longest = 2 * feed.timeout_s + feed.reconnect_timeout_s
    if cfg.world_size > 1 and cfg.training.collective_timeout_s <= longest:
        raise ConfigError(
            "'training.collective_timeout_s' must exceed 2 * 'feed.timeout_s' + "
            f"'feed.reconnect_timeout_s' (got {cfg.training.collective_timeout_s:g} <= "
            f"2 * {feed.timeout_s:g} + {feed.reconnect_timeout_s:g} = {longest:g}): the other "
            "ranks wait in a collective while one rank waits for its producer, reconnects and "
            "waits for the new session's first batch"
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
    columns = list(cfg.dataset.columns)
    if len(set(columns)) != len(columns):
        raise ConfigError(f"'dataset.columns' has duplicates (got {columns})")
    if any(not 0 < len(c) <= MAX_COLUMN_NAME for c in columns):
        raise ConfigError(
            f"'dataset.columns' names must have 1-{MAX_COLUMN_NAME} characters (got {columns})"
        )
    # The tensors a producer adds itself would overwrite a dataset column of the same name.
    required, optional = added_tensors(cfg.activations.builder)
    added = {*required, *optional}
    clash = sorted(added & set(columns))
    if clash:
        raise ConfigError(
            f"'dataset.columns' {columns} names {clash}, which the producer adds to every "
            f"batch itself ({cfg.activations.builder} builder): rename the dataset column"
        )
    if len(columns) + len(added) > MAX_TENSORS:
        raise ConfigError(
            f"'dataset.columns' has {len(columns)} columns: with the {len(added)} tensor(s) the "
            f"producer adds, a batch would exceed {MAX_TENSORS} tensors"
        )


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
