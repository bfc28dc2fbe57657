"""The fuzzed producer's set-up: the protocol states attacked, the shape of the dataset and
the config overrides the producer and every legitimate client run with.
"""

from __future__ import annotations

from pathlib import Path

STATES = ("idle", "session", "streaming")
ROWS = 37  # dataset rows: the 64-sample cycles wrap the shard
SEQ_LEN = 8


def fuzz_overrides(data: Path, workdir: Path, **extra: object) -> list[str]:
    """The producer (and client) config: small cycles that wrap the shard, shuffled."""
    base: dict[str, object] = {
        "world_size": 1,
        "batch_size": 4,
        "seed": 3,
        "dataset.path": data,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 64,
        "training_initial_cache_size_per_rank": 40,
        "dataset.on_the_fly.shuffle": "true",
        "feed.endpoint": f"ipc://{workdir}/feed-{{rank}}.sock",
        "feed.exit_on_bye": "false",
        "feed.error_linger_s": 0,
        "feed.idle_timeout_s": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
