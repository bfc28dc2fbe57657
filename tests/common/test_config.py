"""Configuration: YAML + overrides -> dataclasses, validation messages, warnings, DataSpec."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lensfeed.common.config import LensfeedConfig, LensfeedWarning, load_config, shard_size_warnings
from lensfeed.common.errors import ConfigError, LensfeedError
from lensfeed.common.spec import DataSpec
from tests._util import REPO

DEMO = REPO / "conf" / "demo.yaml"
GEMMA = REPO / "conf" / "gemma2_2b_unfrozen_nopostfix.yaml"

#: The seed-era keys exactly as the original training configs spell them.
SEED_ERA_YAML = """\
seed: 7
world_size: 4
batch_size: 16
dataset:
  path: /data/corpus
  on_the_fly:
    samples_per_regeneration_cycle: 5000
training_initial_cache_size_per_rank: ${dataset.on_the_fly.samples_per_regeneration_cycle}
feed:
  endpoint: ipc:///tmp/lensfeed/seed-era-{rank}.sock
"""


def _spec(**kw: object) -> DataSpec:
    base: dict[str, object] = dict(
        dataset="data/demo",
        columns=("input_ids",),
        world_size=2,
        batch_size=32,
        cycle_size=2048,
        initial_cycle_size=2048,
        seed=0,
        shuffle=True,
    )
    base.update(kw)
    return DataSpec(**base)  # type: ignore[arg-type]


def _config_error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as exc_info:
        load_config(path, list(overrides))
    return str(exc_info.value)


# --------------------------------------------------------------------------- loading


def test_demo_config_loads() -> None:
    cfg = load_config(DEMO)
    assert isinstance(cfg, LensfeedConfig)
    assert cfg.world_size == 2
    assert cfg.dataset.columns == ["input_ids"]
    # training_initial_cache_size_per_rank is an interpolation of the seed-era key.
    assert cfg.initial_cycle_size == cfg.cycle_size == 2048
    assert cfg.endpoint_for(1).endswith("rank1.sock")


def test_gemma_config_loads_with_seed_era_keys() -> None:
    cfg = load_config(GEMMA)
    assert cfg.world_size == 8
    assert cfg.dataset.on_the_fly.samples_per_regeneration_cycle == 100_000
    assert cfg.training_initial_cache_size_per_rank == 100_000
    assert cfg.dataset.columns == ["input_ids", "attention_mask"]
    assert cfg.activations.builder == "activations"
    assert cfg.activations.dtype == "bfloat16"
    assert cfg.feed.max_ahead_bytes == 4 * 2**30
    spec = DataSpec.from_config(cfg)
    assert "model=/models/gemma-2-2b" in spec.builder_args
    assert "layer=12" in spec.builder_args


def test_seed_era_yaml_loads_unchanged_and_interpolates(tmp_path: Path) -> None:
    path = tmp_path / "seed_era.yaml"
    path.write_text(SEED_ERA_YAML)
    cfg = load_config(path)
    assert cfg.cycle_size == 5000
    assert cfg.initial_cycle_size == 5000
    # The interpolation follows an override of the key it points at.
    cfg = load_config(path, ["dataset.on_the_fly.samples_per_regeneration_cycle=640"])
    assert cfg.cycle_size == 640
    assert cfg.training_initial_cache_size_per_rank == 640
    # ... and an explicit value for the seed-era initial size wins.
    cfg = load_config(path, ["training_initial_cache_size_per_rank=96"])
    assert (cfg.initial_cycle_size, cfg.cycle_size) == (96, 5000)


def test_initial_cycle_size_defaults_to_cycle_size() -> None:
    cfg = load_config(None, ["dataset.on_the_fly.samples_per_regeneration_cycle=300"])
    assert cfg.training_initial_cache_size_per_rank is None
    assert cfg.initial_cycle_size == 300


def test_overrides_apply_to_nested_keys_and_types() -> None:
    cfg = load_config(
        DEMO,
        [
            "batch_size=8",
            "seed=11",
            "dataset.path=/elsewhere",
            "dataset.on_the_fly.shuffle=false",
            "feed.timeout_s=2.5",
            "feed.endpoint=tcp://127.0.0.1:6000",
            "world_size=1",
            "dataset.columns=[input_ids,attention_mask]",
        ],
    )
    assert cfg.batch_size == 8
    assert cfg.seed == 11
    assert cfg.dataset.path == "/elsewhere"
    assert cfg.dataset.on_the_fly.shuffle is False
    assert cfg.feed.timeout_s == 2.5
    assert cfg.dataset.columns == ["input_ids", "attention_mask"]
    assert cfg.bind_for(0) == "tcp://127.0.0.1:6000"


def test_tcp_bind_defaults_to_loopback_and_can_differ() -> None:
    cfg = load_config(None, ["feed.endpoint=tcp://10.1.2.3:5{rank}0", "world_size=2"])
    assert cfg.endpoint_for(1) == "tcp://10.1.2.3:510"
    assert cfg.bind_for(1) == "tcp://127.0.0.1:510"  # loopback unless feed.bind says otherwise
    ipc = load_config(None, ["feed.endpoint=ipc:///tmp/x{rank}.sock", "world_size=2"])
    assert ipc.bind_for(1) == "ipc:///tmp/x1.sock"
    cfg = load_config(
        None,
        ["feed.endpoint=tcp://10.1.2.3:5{rank}0", "feed.bind=tcp://*:5{rank}0", "world_size=2"],
    )
    assert cfg.bind_for(1) == "tcp://*:510"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("batch_size=0", "batch_size"),
        ("batch_size=-4", "batch_size"),
        ("world_size=0", "world_size"),
        (
            "dataset.on_the_fly.samples_per_regeneration_cycle=0",
            "dataset.on_the_fly.samples_per_regeneration_cycle",
        ),
        ("training_initial_cache_size_per_rank=-1", "training_initial_cache_size_per_rank"),
        ("feed.prefetch=0", "feed.prefetch"),
        ("feed.max_ahead_batches=0", "feed.max_ahead_batches"),
        ("training.num_cycles=0", "training.num_cycles"),
    ],
)
def test_non_positive_sizes_name_key_and_value(override: str, key: str) -> None:
    value = override.split("=", 1)[1]
    msg = _config_error(override)
    assert f"'{key}'" in msg
    assert "positive" in msg
    assert f"(got {value})" in msg


def test_batch_size_larger_than_cycle_names_both_values() -> None:
    msg = _config_error("batch_size=64", "dataset.on_the_fly.samples_per_regeneration_cycle=48")
    assert "'batch_size'" in msg
    assert "samples_per_regeneration_cycle" in msg
    assert "64 > 48" in msg


def test_batch_size_larger_than_initial_cycle_names_both_values() -> None:
    msg = _config_error("batch_size=64", "training_initial_cache_size_per_rank=40")
    assert "'training_initial_cache_size_per_rank'" in msg
    assert "64 > 40" in msg


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("batch_sise=3", "batch_size"),
        ("seeed=3", "seed"),
        (
            "dataset.on_the_fly.samples_per_regeneration_cylce=3",
            "dataset.on_the_fly.samples_per_regeneration_cycle",
        ),
        ("feed.prefech=4", "feed.prefetch"),
        ("training_initial_cache_size_per_rnk=4", "training_initial_cache_size_per_rank"),
    ],
)
def test_unknown_key_suggests_the_closest_one(override: str, suggestion: str) -> None:
    msg = _config_error(override)
    key = override.split("=", 1)[0]
    assert f"unknown config key '{key}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_without_close_match_lists_known_keys() -> None:
    msg = _config_error("dataset.on_the_fly.zzz=1")
    assert "unknown config key 'dataset.on_the_fly.zzz'" in msg
    assert "did you mean" not in msg
    assert "samples_per_regeneration_cycle" in msg
    assert "shuffle" in msg


def test_unknown_key_in_yaml_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(SEED_ERA_YAML.replace("samples_per_regeneration_cycle: 5000", "samples: 5000"))
    msg = _config_error(path=path)
    assert "unknown config key 'dataset.on_the_fly.samples'" in msg


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("batch_size=abc", "batch_size", "abc"),
        ("batch_size=3.5", "batch_size", "3.5"),
        ("batch_size=true", "batch_size", "True"),
        ("seed=1.5", "seed", "1.5"),
        ("feed.timeout_s=soon", "feed.timeout_s", "soon"),
        ("dataset.on_the_fly.shuffle=maybe", "dataset.on_the_fly.shuffle", "maybe"),
        ("world_size=null", "world_size", "None"),
    ],
)
def test_bad_type_names_key_and_value(override: str, key: str, value: str) -> None:
    msg = _config_error(override)
    assert f"'{key}'" in msg
    assert value in msg


@pytest.mark.parametrize(("override", "key", "value"), [("feed=abc", "feed", "abc")])
def test_scalar_for_a_section_names_key_and_value(override: str, key: str, value: str) -> None:
    msg = _config_error(override)
    assert f"'{key}'" in msg
    assert value in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("dataset.columns=[attention_mask]", "'dataset.columns' must start with 'input_ids'"),
        ("dataset.columns=[input_ids,input_ids]", "duplicates"),
        ("activations.builder=magic", "'magic'"),
        ("activations.dtype=int8", "'int8'"),
        ("feed.endpoint=http://x", "'http://x'"),
        ("feed.timeout_s=0", "'feed.timeout_s' must be > 0 seconds (got 0"),
        ("training.max_steps=-1", "'training.max_steps' must be >= 0 (got -1)"),
        # what would fail later: inside libzmq (a C int of ms), torch's timedelta, the handshake
        ("feed.heartbeat_timeout_s=inf", "'feed.heartbeat_timeout_s' must be a number"),
        ("feed.heartbeat_timeout_s=1e7", "in [0, 2147483] (got 10000000.0)"),
        ("feed.error_linger_s=nan", "'feed.error_linger_s' must be a number"),
        ("feed.idle_timeout_s=-1", "'feed.idle_timeout_s' must be a number"),
        ("training.collective_timeout_s=inf", "'training.collective_timeout_s' must be a"),
        ("seed=4611686018427387904", "'seed' must be in [0, 4611686018427387903]"),
        ("world_size=1048577", "'world_size' must be <= 1048576"),
        # a dataset column the producer would overwrite with what it adds itself
        ("dataset.columns=[input_ids,sample_idx]", "names ['sample_idx'], which the producer"),
        ("batch_size=[1", "cannot read the overrides"),
        ("dataset.columns.0=foo", "cannot read the overrides"),
        ("dataset.on_the_fly=3", "not a subclass of OnTheFlyConfig"),
    ],
)
def test_other_invalid_values_are_named(override: str, needle: str) -> None:
    assert needle in _config_error(override)


def test_multi_rank_endpoint_needs_rank_placeholder() -> None:
    msg = _config_error("world_size=2", "feed.endpoint=ipc:///tmp/x.sock")
    assert "{rank}" in msg
    assert "ipc:///tmp/x.sock" in msg


def test_collective_timeout_must_outlast_the_longest_next() -> None:
    """A rank's next() can wait timeout_s, reconnect for reconnect_timeout_s, then wait
    timeout_s again; the other ranks must still be in their collective when it is done."""
    base = ["world_size=2", "feed.endpoint=ipc:///tmp/x-{rank}.sock"]
    sizes = ["feed.timeout_s=100", "feed.reconnect_timeout_s=150"]
    msg = _config_error(*base, *sizes, "training.collective_timeout_s=300")
    assert "300 <= 2 * 100 + 150 = 350" in msg
    assert load_config(None, [*base, *sizes, "training.collective_timeout_s=351"])
    # With one rank nobody waits in a collective: a slow model's timeout needs nothing more.
    assert load_config(None, [*sizes, "training.collective_timeout_s=300"])


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    assert "key=value" in _config_error("batch_size")
    assert "config file not found" in _config_error(path=Path("/nonexistent/x.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [1,\n")
    assert f"cannot read config file {bad}" in _config_error(path=bad)
    # A good file with a bad override: the override is at fault, not the file.
    good = tmp_path / "good.yaml"
    good.write_text("dataset:\n  columns: [input_ids]\n")
    msg = _config_error("dataset.columns.0=a", path=good)
    assert msg.startswith("cannot read the overrides (overrides ['dataset.columns.0=a'])"), msg


def test_config_error_is_a_lensfeed_error_and_value_error() -> None:
    with pytest.raises(LensfeedError):
        load_config(None, ["batch_size=0"])
    with pytest.raises(ValueError, match="batch_size"):
        load_config(None, ["batch_size=0"])
    assert ConfigError.code == "config"


def test_negative_seed_is_rejected_at_load_or_works() -> None:
    from lensfeed.producer.cycle import CycleCursor

    try:
        cfg = load_config(None, ["seed=-1", "batch_size=4"])
    except ConfigError as exc:
        refused = str(exc)
    else:
        refused = ""
        cursor = CycleCursor(DataSpec.from_config(cfg), rank=0, shard_rows=10)
        assert len(cursor.batch_rows(0, 0)) == 4
    assert not refused or "seed" in refused


# --------------------------------------------------------------------------- warnings


def _cfg(cycle: int, initial: int | None = None) -> LensfeedConfig:
    ov = [f"dataset.on_the_fly.samples_per_regeneration_cycle={cycle}", "batch_size=4"]
    if initial is not None:
        ov.append(f"training_initial_cache_size_per_rank={initial}")
    return load_config(None, ov)


def test_shard_smaller_than_cycle_warns_with_wrap_count() -> None:
    with pytest.warns(LensfeedWarning) as record:
        msgs = shard_size_warnings(shard_rows=300, cfg=_cfg(1000), rank=3)
    assert len(msgs) == 1
    assert [str(w.message) for w in record] == msgs
    (msg,) = msgs
    assert "rank 3" in msg
    assert "300 rows" in msg
    assert "1000" in msg
    # 1000 samples over 300 rows: rows 0..299 then 3 more times from row 0 (ceil(3.33) - 1).
    assert "wraps the shard about 3 time(s)" in msg
    assert "~3.3x" in msg


def test_initial_cycle_counts_when_larger() -> None:
    with pytest.warns(LensfeedWarning):
        (msg,) = shard_size_warnings(shard_rows=300, cfg=_cfg(100, initial=700), rank=0)
    assert "samples_per_regeneration_cycle=700" in msg
    assert "about 2 time(s)" in msg


def test_very_small_dataset_warns_twice_and_names_path() -> None:
    cfg = _cfg(2048)
    with pytest.warns(LensfeedWarning) as record:
        msgs = shard_size_warnings(shard_rows=5, cfg=cfg, rank=1)
    assert len(msgs) == 2 == len(record)
    assert all(issubclass(w.category, LensfeedWarning) for w in record)
    assert "about 409 time(s)" in msgs[0]
    assert "very small" in msgs[1]
    assert "5 rows per rank" in msgs[1]
    assert repr(cfg.dataset.path) in msgs[1]


@pytest.mark.parametrize("rows", [1000, 5000, 0])
def test_no_warning_when_shard_covers_the_cycle(rows: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert shard_size_warnings(shard_rows=rows, cfg=_cfg(1000), rank=0) == []


def test_lensfeed_warning_is_a_user_warning() -> None:
    assert issubclass(LensfeedWarning, UserWarning)


# --------------------------------------------------------------------------- DataSpec


def test_fingerprint_is_sha256_of_canonical_json_and_stable() -> None:
    spec = _spec()
    blob = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    assert blob == (
        '{"batch_size":32,"builder":"tokens","builder_args":"","columns":["input_ids"],'
        '"cycle_size":2048,"dataset":"data/demo","initial_cycle_size":2048,"seed":0,'
        '"shuffle":true,"world_size":2}'
    )
    assert spec.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    # Pinned: this value is on the wire (HELLO/WELCOME) and in checkpoints; docs/protocol.md
    # uses it in its worked example.
    assert spec.fingerprint() == "b46805dc2d29b13a"
    assert re.fullmatch(r"[0-9a-f]{16}", spec.fingerprint())
    # Equal specs, however built, give equal fingerprints.
    assert DataSpec.from_dict(spec.to_dict()).fingerprint() == spec.fingerprint()
    assert _spec(columns=("input_ids",)).fingerprint() == spec.fingerprint()


def test_fingerprint_from_config_is_deterministic() -> None:
    a = DataSpec.from_config(load_config(DEMO))
    b = DataSpec.from_config(load_config(DEMO))
    assert a == b
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"batch_size": 16},
        {"seed": 1},
        {"shuffle": False},
        {"cycle_size": 1024},
        {"initial_cycle_size": 1024},
        {"world_size": 4},
        {"dataset": "data/other"},
        {"columns": ("input_ids", "attention_mask")},
        {"builder": "activations"},
    ],
)
def test_every_field_changes_the_fingerprint(change: dict[str, object]) -> None:
    assert _spec(**change).fingerprint() != _spec().fingerprint()


def test_differences_name_both_values() -> None:
    ours, theirs = _spec(), _spec(batch_size=16, seed=5)
    diffs = ours.differences(theirs)
    assert diffs == ["batch_size: 32 vs 16", "seed: 0 vs 5"]
    assert theirs.differences(ours) == ["batch_size: 16 vs 32", "seed: 5 vs 0"]
    assert ours.differences(_spec()) == []
    assert _spec(dataset="a").differences(_spec(dataset="b")) == ["dataset: 'a' vs 'b'"]


def test_spec_from_config_and_dict_round_trip() -> None:
    cfg = load_config(DEMO)
    spec = DataSpec.from_config(cfg)
    assert spec.batch_size == cfg.batch_size
    assert spec.cycle_size == cfg.cycle_size
    assert spec.initial_cycle_size == cfg.initial_cycle_size
    assert spec.builder_args == ""
    d = spec.to_dict()
    assert isinstance(d["columns"], list)
    assert json.loads(json.dumps(d)) == d
    assert DataSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="expected"):
        DataSpec.from_dict({**d, "extra": 1})
    d.pop("seed")
    with pytest.raises(ValueError, match="seed"):
        DataSpec.from_dict(d)


def test_batches_in_cycle_and_cycle_start_carry_the_remainder() -> None:
    spec = _spec(batch_size=3, initial_cycle_size=10, cycle_size=7)
    assert [spec.batches_in_cycle(k) for k in range(4)] == [3, 2, 2, 2]
    # 10 // 3 * 3 = 9 positions in cycle 0; then 7 // 3 * 3 = 6 per cycle. The S % B samples
    # that do not fill a batch are not skipped: the next cycle starts with them.
    assert [spec.cycle_start(k) for k in range(5)] == [0, 9, 15, 21, 27]


@settings(max_examples=200, deadline=None, database=None)
@given(
    b=st.integers(1, 50),
    s=st.integers(1, 500),
    s0=st.integers(1, 500),
    k=st.integers(0, 40),
)
def test_cycles_tile_the_stream_without_gaps(b: int, s: int, s0: int, k: int) -> None:
    if b > s or b > s0:
        return
    spec = _spec(batch_size=b, cycle_size=s, initial_cycle_size=s0)
    n = spec.batches_in_cycle(k)
    assert n == (s0 if k == 0 else s) // b >= 1
    # No stream position is skipped or served twice: each cycle starts where the last ended.
    assert spec.cycle_start(k + 1) == spec.cycle_start(k) + n * b
    assert spec.cycle_start(k) == sum(spec.batches_in_cycle(j) * b for j in range(k))
