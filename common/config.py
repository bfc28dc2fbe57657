"""Typed configuration: OmegaConf YAML (``conf/``) plus ``key=value`` overrides -> dataclasses.

The YAML is read once, at an entry point, by :func:`load_config`; library code only sees the
dataclasses. Unknown keys are errors with a did-you-mean, because a misspelt key in a training
config otherwise silently falls back to a default and costs a day of GPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lensfeed.common import endpoints
from lensfeed.common.checks import MAX_PREFETCH, validate
from lensfeed.common.errors import ConfigError


class LensfeedWarning(UserWarning):
    """A configuration that works but is probably not what the user meant."""


@dataclass
class OnTheFlyConfig:
    """Seed-era section: how many samples each cache regeneration produces per rank."""

    samples_per_regeneration_cycle: int = 1024
    shuffle: bool = True


@dataclass
class DatasetConfig:
    """Where the pretokenized corpus lives and which integer columns to serve."""

    #: ``datasets.save_to_disk`` directory, Arrow IPC file or directory, or Parquet file/dir.
    path: str = "data/demo"
    #: Token columns served as tensors; ``input_ids`` first. All must have one fixed length.
    columns: list[str] = field(default_factory=lambda: ["input_ids"])
    on_the_fly: OnTheFlyConfig = field(default_factory=OnTheFlyConfig)


@dataclass
class FeedConfig:
    """The producer <-> trainer channel."""

    #: Endpoint template the trainer connects to: ``{rank}``, ``{node_rank}``, ``{local_rank}``,
    #: ``{host}``, ``{port}`` are filled in per rank (``common/endpoints.py``).
    endpoint: str = "ipc:///tmp/lensfeed/rank{rank}.sock"
    #: Endpoint template the producer binds; empty = ``endpoint`` (tcp: on 127.0.0.1).
    bind: str = ""
    #: Ranks whose producers share a node (``{node_rank}``, ``{local_rank}``); 0 = one node.
    ranks_per_node: int = 0
    #: Producer host of each node, for ``{host}``.
    hosts: list[str] = field(default_factory=list)
    #: ``{port}`` is ``base_port + rank``.
    base_port: int = 50000
    #: One endpoint per rank, in rank order, instead of the template ...
    endpoints: list[str] = field(default_factory=list)
    #: ... or from a file with one endpoint per line (``#`` comments).
    endpoints_file: str = ""
    #: Most batches in flight to a trainer rank (credits granted to the producer) ...
    prefetch: int = 1024
    #: ... and at most this many bytes of them (the window is sized from the first batch).
    prefetch_bytes: int = 128 << 20
    #: Most training batches packed into one message (consecutive, same cycle). Every message
    #: has a fixed cost on both sides, so small batches travel together; 0 = auto: up to
    #: ~8 MiB and 64 batches per message.
    batches_per_message: int = 0
    #: Progress bound: seconds a wait on a *live* producer may take before it is an error.
    timeout_s: float = 60.0
    #: Liveness bound: a producer that stops answering ZMTP heartbeats (killed, frozen, cut off)
    #: for this long is declared lost and the client reconnects; 0 = no heartbeats (a crash is
    #: still noticed when its connection closes). A producer busy regenerating still answers.
    heartbeat_timeout_s: float = 3.0
    #: Seconds a client keeps trying to reach a lost producer (a supervisor restart plus a model
    #: load) before the run stops; 0 = never reconnect, a lost producer is an error at once.
    reconnect_timeout_s: float = 120.0
    #: Regenerate the next cycle before the trainer asks for it (bounded below).
    prepare_ahead: bool = True
    #: Most batches the producer holds ready (current + next cycle).
    max_ahead_batches: int = 256
    #: Most bytes the producer holds ready; 0 = no byte cap.
    max_ahead_bytes: int = 1 << 30
    #: Largest message accepted from the peer (bytes of tensor data). It is also libzmq's
    #: ``ZMQ_MAXMSGSIZE`` on the client, so an oversized frame is dropped before it is allocated.
    max_message_bytes: int = 256 << 20
    #: CURVE key set (``lensfeed keys DIR``): tcp is authenticated and encrypted, the client
    #: pins the producer's key and the producer accepts only keys in ``DIR/authorized``.
    keys_dir: str = ""
    #: Let a producer bind a non-loopback tcp address without ``keys_dir`` (anyone who can
    #: reach the port can then read the feed); logs a warning at start.
    insecure: bool = False
    #: Seconds a producer that failed at start waits for a trainer to tell before it exits.
    error_linger_s: float = 10.0
    #: Seconds a producer waits without any trainer message before it exits; 0 = forever.
    idle_timeout_s: float = 0.0
    #: The producer exits when its trainer says goodbye (the end of training).
    exit_on_bye: bool = True
    #: Entry points set glibc malloc to reuse heap memory for big messages (common/malloc.py).
    tune_malloc: bool = True


@dataclass
class TinyModelConfig:
    """A seeded toy transformer for tests and the demo (no download)."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 4096
    seed: int = 0


@dataclass
class ActivationsConfig:
    """What the producer turns token batches into (``tokens`` = pass-through)."""

    builder: str = "tokens"
    #: ``tiny``, a local Hugging Face model directory, or ``package.module:function``.
    model: str = "tiny"
    #: Hidden-state layer: 0 = embeddings, i = output of block i (negative counts from the end).
    layer: int = 1
    #: Token positions are drawn per sample from ``[min_pos, max_pos)``; max_pos 0 = seq_len.
    min_pos: int = 1
    max_pos: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    forward_batch_size: int = 32
    #: Also emit ``A_prime``, the same activation of a partner sample of the same cycle.
    pairs: bool = False
    #: Run a model directory's own Python code (Hugging Face ``auto_map``); off: only the
    #: architectures transformers ships load.
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class TrainingConfig:
    """The reference DDP trainer (``python -m trainer``)."""

    num_cycles: int = 3
    #: Stop after this many optimizer steps; 0 = run ``num_cycles``.
    max_steps: int = 0
    lr: float = 1e-3
    #: ``auto`` = ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``.
    device: str = "auto"
    d_model: int = 64
    vocab_size: int = 256
    checkpoint_dir: str = "checkpoints"
    #: Also save a checkpoint every N steps (0 = off). One is always saved at the end.
    checkpoint_every: int = 0
    #: Save a checkpoint at the end of every N-th cycle (0 = off).
    checkpoint_every_cycles: int = 1
    #: Complete checkpoints kept in ``checkpoint_dir`` (older ones are deleted).
    keep_checkpoints: int = 3
    #: Resume from a checkpoint: a step directory, a checkpoint directory (its newest complete
    #: step), ``auto`` (the newest complete one in ``checkpoint_dir``, else start fresh) or
    #: "" (start fresh).
    resume: str = ""
    metrics_path: str = "metrics.jsonl"
    #: Run ``gc.collect()`` and ``torch.cuda.empty_cache()`` at each cycle boundary.
    empty_cache_each_cycle: bool = True
    #: Bound on any collective; a dead rank turns into an error after this long.
    collective_timeout_s: float = 300.0
    #: Show a tqdm progress bar on rank 0.
    progress: bool = True
    #: Write one metrics record per batch (sample_idx and a digest of its bytes).
    log_batches: bool = False


@dataclass
class FakeConfig:
    """Shape of the synthetic batches ``lensfeed fake-produce`` serves."""

    seq_len: int = 32
    vocab_size: int = 256
    shard_rows: int = 1000


@dataclass
class LensfeedConfig:
    """Everything one lensfeed job needs; producers and trainer load the same file."""

    seed: int = 0
    world_size: int = 1
    batch_size: int = 32
    #: Size of cycle 0 (seed-era key); ``null`` = ``samples_per_regeneration_cycle``.
    training_initial_cache_size_per_rank: int | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)

    @property
    def cycle_size(self) -> int:
        return self.dataset.on_the_fly.samples_per_regeneration_cycle

    @property
    def initial_cycle_size(self) -> int:
        s0 = self.training_initial_cache_size_per_rank
        return self.cycle_size if s0 is None else s0

    def endpoint_for(self, rank: int) -> str:
        """Where rank ``rank``'s trainer connects (``common/endpoints.py``)."""
        return endpoints.endpoint_for(self.feed, self.world_size, rank)

    def bind_for(self, rank: int) -> str:
        """Where producer ``rank`` binds: ``feed.bind``, else ``feed.endpoint`` with any tcp
        host replaced by 127.0.0.1 (loopback unless a bind address is configured)."""
        return endpoints.bind_for(self.feed, self.world_size, rank)


# --------------------------------------------------------------------------- loading


def _unknown_key(exc: ConfigKeyError) -> ConfigError:
    """OmegaConf found the unknown key (structured config); name it in full, with the closest
    known key of its section and the section's keys."""
    dotted = str(exc.full_key)
    prefix, _, key = dotted.rpartition(".")
    known = [f.name for f in dataclasses.fields(exc.object_type)] if exc.object_type else []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown config key '{dotted}'{hint} (known here: {', '.join(sorted(known))})"
    )


def _check_sections(raw: DictConfig) -> None:
    """A scalar where a section belongs (``feed=3``) gets a message naming the key."""
    given = OmegaConf.to_container(raw, resolve=False)  # unresolved: no interpolation yet
    assert isinstance(given, dict)
    for f in dataclasses.fields(LensfeedConfig):
        value = given.get(f.name)
        if value is None or isinstance(value, dict) or not callable(f.default_factory):
            continue
        example = dataclasses.fields(f.default_factory())[0].name
        raise ConfigError(
            f"'{f.name}' is a section, not a value (got {value!r}); set its keys, "
            f"e.g. {f.name}.{example}=..."
        )


def add_config_arguments(parser: argparse.ArgumentParser, *, example: str) -> None:
    """``--config`` and trailing ``key=value`` overrides: the same on every entry point."""
    parser.add_argument("--config", "-c", default=None, help="YAML config (e.g. conf/demo.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"config overrides in dotted form, e.g. {example}",
    )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> LensfeedConfig:
    """Load YAML ``path`` (optional), apply ``key=value`` overrides, validate, return dataclasses.

    ``${...}`` interpolation is resolved; unknown keys and bad values raise :class:`ConfigError`.
    """
    parts: list[DictConfig] = []
    what = "the overrides"  # what a read error is blamed on: the file only while it is read
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            what = f"config file {p}"
            loaded = OmegaConf.load(p)
            what = "the overrides"
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file {p} must hold a mapping at the top level")
            parts.append(loaded)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value (got {bad[0]!r})")
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.merge(*parts) if parts else OmegaConf.create({})
        _check_sections(raw)
        merged = OmegaConf.merge(OmegaConf.structured(LensfeedConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except ConfigKeyError as exc:
        raise _unknown_key(exc) from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = (str(exc.msg) if exc.msg else str(exc)).splitlines()[0]
        where = f"'{key}'" if key else f"{path or 'the overrides'} {list(overrides)}"
        raise ConfigError(f"invalid config value for {where}: {msg}") from None
    except (yaml.YAMLError, OSError, TypeError, ValueError) as exc:
        # Unparseable YAML (in the file or an override), an unreadable file, an override that
        # indexes into a list or a scalar: a config error, never a traceback.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"cannot read {what} (overrides {list(overrides)}): {type(exc).__name__}: {first}"
        ) from None
    assert isinstance(cfg, LensfeedConfig)
    validate(cfg)
    return cfg


def shard_size_warnings(*, shard_rows: int, cfg: LensfeedConfig, rank: int) -> list[str]:
    """Warn (and return the messages) when a rank's shard is small relative to one cycle."""
    msgs: list[str] = []
    s = max(cfg.cycle_size, cfg.initial_cycle_size)
    if 0 < shard_rows < s:
        msgs.append(
            f"rank {rank}: shard has {shard_rows} rows < samples_per_regeneration_cycle={s}; "
            f"each cycle wraps the shard about {math.ceil(s / shard_rows) - 1} time(s), so every "
            f"sample appears ~{s / shard_rows:.1f}x per cycle"
        )
    if 0 < shard_rows * 100 <= s:
        msgs.append(
            f"rank {rank}: dataset is very small for this cycle ({shard_rows} rows per rank vs "
            f"{s} samples per cycle); check dataset.path={cfg.dataset.path!r}"
        )
    for m in msgs:
        warnings.warn(m, LensfeedWarning, stacklevel=2)
    return msgs


__all__ = [
    "MAX_PREFETCH",
    "ActivationsConfig",
    "DatasetConfig",
    "add_config_arguments",
    "FakeConfig",
    "FeedConfig",
    "LensfeedConfig",
    "LensfeedWarning",
    "OnTheFlyConfig",
    "TinyModelConfig",
    "TrainingConfig",
    "load_config",
    "shard_size_warnings",
    "validate",
]
