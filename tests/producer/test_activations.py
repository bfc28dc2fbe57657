"""The activation builder: correct hidden states, deterministic positions/pairs, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.errors import ConfigError, TransformError
from lensfeed.common.spec import DataSpec
from lensfeed.producer.activations import (
    build_transform,
    partner_slots,
    token_positions,
)
from lensfeed.producer.models import TinyCausalLM, load_model
from lensfeed.producer.shard import load_shard
from lensfeed.producer.source import BatchTransform, ShardSource
from tests._activations import CYCLE, SEQ, at, make_cfg, serve

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- factories
# Referenced as f"{__name__}:name", which resolves under any pytest import mode.


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class BlockLM(nn.Module):
    """A user model with the documented shape: blocks in ``.layers``, run in order."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 8)
        self.layers = nn.ModuleList(_Block(8) for _ in range(3))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def make_block_lm() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return BlockLM()


def broken_factory() -> nn.Module:
    raise RuntimeError("weights missing")


def not_a_module() -> Any:
    return 42


def _oom(*_args: Any) -> Any:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def oom_factory() -> nn.Module:
    return _oom()


def make_oom_at_forward() -> nn.Module:
    model = make_block_lm()
    model.layers[1].register_forward_pre_hook(_oom)
    return model


# --------------------------------------------------------------------------- helpers


def token_batches(cfg: LensfeedConfig, cycle: int = 0) -> list[dict[str, Any]]:
    shard = load_shard(cfg.dataset.path, rank=0, world_size=1, columns=list(cfg.dataset.columns))
    return list(ShardSource(shard, DataSpec.from_config(cfg)).iter_batches(cycle, 0))


def cat(batches: list[dict[str, Any]], key: str) -> Any:
    parts = [b[key] for b in batches]
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def raw(x: Any) -> bytes:
    if isinstance(x, torch.Tensor):
        return x.contiguous().view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(x).tobytes()


def tiny_states(model: nn.Module, ids: np.ndarray) -> list[torch.Tensor]:
    """Every hidden state of the tiny model (full sequence, full forward), HF-style list."""
    states: list[torch.Tensor] = []
    hooks = [model.blocks[0].register_forward_pre_hook(lambda _m, a: states.append(a[0]))]
    hooks += [b.register_forward_hook(lambda _m, _a, o: states.append(o)) for b in model.blocks]
    with torch.inference_mode():
        model(torch.as_tensor(ids, dtype=torch.long))
    for h in hooks:
        h.remove()
    return states


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -3])
def test_A_is_the_hidden_state_at_token_pos(dataset: str, layer: int) -> None:
    cfg = make_cfg(dataset, f"activations.layer={layer}")
    batches, builder = serve(cfg)
    assert isinstance(builder, BatchTransform)
    model = TinyCausalLM(cfg.activations.tiny).eval()
    plain = token_batches(cfg)
    assert len(batches) == CYCLE // 4
    for batch, tokens in zip(batches, plain, strict=True):
        np.testing.assert_array_equal(batch["input_ids"], tokens["input_ids"])
        np.testing.assert_array_equal(batch["sample_idx"], tokens["sample_idx"])
        assert batch["A"].dtype == torch.float32
        assert batch["A"].shape == (4, 32)
        assert batch["token_pos"].dtype == np.int64
        expected = at(tiny_states(model, batch["input_ids"])[layer], batch["token_pos"])
        torch.testing.assert_close(batch["A"], expected, atol=1e-5, rtol=1e-4)
        assert "A_prime" not in batch


def test_positions_are_uniform_in_range_and_a_function_of_the_cycle(dataset: str) -> None:
    cfg = make_cfg(
        dataset,
        "activations.min_pos=2",
        "activations.max_pos=9",
        "dataset.on_the_fly.samples_per_regeneration_cycle=96",
    )
    first, _ = serve(cfg)
    again, _ = serve(cfg)
    pos = cat(first, "token_pos")
    assert pos.min() >= 2
    assert pos.max() < 9
    assert set(pos.tolist()) == set(range(2, 9))
    np.testing.assert_array_equal(pos, cat(again, "token_pos"))
    next_cycle, _ = serve(cfg, cycle=1)
    assert not np.array_equal(pos, cat(next_cycle, "token_pos"))
    kw = {"seed": 0, "cycle": 0, "cycle_len": 96, "lo": 2, "hi": 9}
    np.testing.assert_array_equal(pos, token_positions(rank=0, **kw))
    assert not np.array_equal(pos, token_positions(rank=1, **kw))


def test_default_max_pos_is_seq_len(dataset: str) -> None:
    batches, _ = serve(make_cfg(dataset), seq_len=None)
    pos = cat(batches, "token_pos")
    assert pos.min() >= 1
    assert pos.max() < SEQ


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_bytes_for_any_grouping_and_after_restart(dataset: str, dtype: str) -> None:
    cfg = make_cfg(dataset, f"activations.dtype={dtype}", "activations.pairs=true")
    reference, _ = serve(cfg, group=1)
    assert reference[0]["A"].dtype == getattr(torch, dtype)
    for group in (3, 4):
        other, _ = serve(cfg, group=group)
        for a, b in zip(reference, other, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert raw(a[key]) == raw(b[key]), (group, key)
    resumed, _ = serve(cfg, start=3, group=2)  # a producer restarted mid-cycle
    for a, b in zip(reference[3:], resumed, strict=True):
        for key in a:
            assert raw(a[key]) == raw(b[key]), key


@pytest.mark.parametrize("cycle", [0, 1])
def test_pairs_are_a_partner_of_the_same_cycle(dataset: str, cycle: int) -> None:
    cfg = make_cfg(dataset, "activations.pairs=true")
    batches, _ = serve(cfg, cycle=cycle)
    partners = partner_slots(seed=0, rank=0, cycle=cycle, cycle_len=CYCLE)
    assert (partners != np.arange(CYCLE)).all()
    np.testing.assert_array_equal(np.sort(partners), np.arange(CYCLE))
    assert raw(cat(batches, "A_prime")) == raw(cat(batches, "A")[torch.from_numpy(partners)])
    np.testing.assert_array_equal(
        cat(batches, "pair_sample_idx"), cat(batches, "sample_idx")[partners]
    )
    np.testing.assert_array_equal(
        cat(batches, "pair_token_pos"), cat(batches, "token_pos")[partners]
    )
    other = partner_slots(seed=0, rank=0, cycle=1 - cycle, cycle_len=CYCLE)
    assert not np.array_equal(partners, other)


def test_end_cycle_and_close_release_state(dataset: str) -> None:
    cfg = make_cfg(dataset, "activations.pairs=true")
    _, builder = serve(cfg)
    assert 0 in builder._cycles
    builder.end_cycle(0)
    assert builder._cycles == {}
    builder.close()
    builder.close()  # idempotent
    shard = load_shard(cfg.dataset.path, rank=0, world_size=1, columns=["input_ids"])
    source = ShardSource(shard, DataSpec.from_config(cfg), transform=builder)
    with pytest.raises(TransformError, match="closed"):
        next(source.iter_batches(0, 0))


def test_tiny_model_is_seeded_and_leaves_global_rng_alone(dataset: str) -> None:
    tiny = make_cfg(dataset).activations.tiny
    state = torch.random.get_rng_state()
    a = load_model("tiny", tiny=tiny, device="cpu", dtype=torch.float32)
    b = load_model("tiny", tiny=tiny, device="cpu", dtype=torch.float32)
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not any(p.requires_grad for p in a.parameters())
    assert not a.training
    tiny.seed = 1
    c = load_model("tiny", tiny=tiny, device="cpu", dtype=torch.float32)
    assert not torch.equal(a.embed.weight, c.embed.weight)


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("layer", [3, -4, 99])
def test_layer_out_of_range_names_the_valid_range(dataset: str, layer: int) -> None:
    cfg = make_cfg(dataset, f"activations.layer={layer}")
    with pytest.raises(ConfigError, match=rf"'activations.layer' = {layer}.*-3\.\.2"):
        build_transform(cfg.activations, rank=0, seed=0, seq_len=SEQ)


@pytest.mark.parametrize(
    ("min_pos", "max_pos", "match"),
    [
        (-1, 0, r"'activations.min_pos' must be >= 0 \(got -1\); valid: 0 <= min_pos"),
        (5, 5, r"'activations.min_pos' = 5 must be < max_pos 5; valid: 0 <= min_pos < 5"),
        (16, 0, r"'activations.min_pos' = 16 must be < seq_len 16.*valid: 0 <= min_pos < 16"),
        (0, 17, r"'activations.max_pos' = 17 exceeds the sequence length 16.*<= 16"),
        (0, -2, r"'activations.max_pos' must be >= 0 \(got -2\)"),
    ],
)
def test_bad_position_range_names_key_value_and_range(
    dataset: str, min_pos: int, max_pos: int, match: str
) -> None:
    cfg = make_cfg(dataset, f"activations.min_pos={min_pos}", f"activations.max_pos={max_pos}")
    with pytest.raises(ConfigError, match=match):
        build_transform(cfg.activations, rank=0, seed=0, seq_len=SEQ)


def test_bad_position_range_without_seq_len_fails_at_first_batch(dataset: str) -> None:
    cfg = make_cfg(dataset, "activations.max_pos=17")
    with pytest.raises(ConfigError, match="'activations.max_pos' = 17 exceeds"):
        serve(cfg, seq_len=None)


def test_positions_past_tiny_max_seq_len_are_a_config_error(dataset: str) -> None:
    cfg = make_cfg(dataset, "activations.tiny.max_seq_len=8")
    with pytest.raises(ConfigError, match=r"'activations.tiny.max_seq_len'"):
        build_transform(cfg.activations, rank=0, seed=0, seq_len=SEQ)
    # Reading only positions < 8 of a causal model needs only the first 8 tokens.
    batches, _ = serve(make_cfg(dataset, "activations.tiny.max_seq_len=8", "activations.max_pos=8"))
    assert cat(batches, "token_pos").max() < 8


def test_token_ids_outside_the_vocabulary_are_a_config_error(dataset: str) -> None:
    cfg = make_cfg(dataset, "activations.tiny.vocab_size=100")
    with pytest.raises(ConfigError, match=r"token id \d+.*'activations.tiny.vocab_size'"):
        serve(cfg)


def test_bad_device_is_a_config_error(dataset: str) -> None:
    cfg = make_cfg(dataset, "activations.device=tpu")
    with pytest.raises(ConfigError, match="'activations.device'"):
        build_transform(cfg.activations, rank=0, seed=0)


# --------------------------------------------------------------------------- model sources


def test_user_factory_with_layers(dataset: str) -> None:
    spec = f"{__name__}:make_block_lm"
    cfg = make_cfg(dataset, f"activations.model={spec}", "activations.layer=2")
    batches, builder = serve(cfg)
    assert builder.num_layers == 3
    model = make_block_lm().eval()
    for batch in batches:
        with torch.no_grad():
            x = model.embed(torch.as_tensor(batch["input_ids"], dtype=torch.long))
            for block in model.layers[:2]:
                x = block(x)
        torch.testing.assert_close(batch["A"], at(x, batch["token_pos"]))


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (
            "{mod}:broken_factory",
            TransformError,
            r"factory '{mod}:broken_factory' raised "
            r"RuntimeError: weights missing",
        ),
        ("{mod}:not_a_module", TransformError, r"'{mod}:not_a_module' returned int, not a torch"),
        ("{mod}:missing", ConfigError, r"'{mod}:missing': module '{mod}' has no callable"),
        ("lensfeed_no_such_module:f", ConfigError, r"module 'lensfeed_no_such_module' not found"),
        ("a:b:c", ConfigError, r"'a:b:c' is not a valid factory spec"),
        ("no/such/model_dir", ConfigError, r"'no/such/model_dir' is not 'tiny', an existing"),
    ],
)
def test_bad_model_specs(dataset: str, spec: str, error: type[Exception], match: str) -> None:
    spec = spec.format(mod=__name__)
    cfg = make_cfg(dataset, f"activations.model={spec}")
    with pytest.raises(error, match=match.format(mod=__name__)):
        build_transform(cfg.activations, rank=0, seed=0, seq_len=SEQ)


def test_out_of_memory_names_device_and_model(dataset: str) -> None:
    spec = f"{__name__}:oom_factory"
    cfg = make_cfg(dataset, f"activations.model={spec}")
    with pytest.raises(TransformError, match=f"out of memory loading model '{spec}' onto cpu"):
        build_transform(cfg.activations, rank=0, seed=0, seq_len=SEQ)
    spec = f"{__name__}:make_oom_at_forward"
    cfg = make_cfg(dataset, f"activations.model={spec}", "activations.layer=2")
    match = f"out of memory running model '{spec}' on cpu.*'activations.forward_batch_size'"
    with pytest.raises(TransformError, match=match):
        serve(cfg)


def test_model_directory_without_transformers_says_what_to_install(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    (tmp_path / "model").mkdir()
    cfg = make_cfg(dataset, f"activations.model={tmp_path / 'model'}")
    with pytest.raises(TransformError, match=r"pip install 'lensfeed\[models\]'"):
        build_transform(cfg.activations, rank=0, seed=0, seq_len=SEQ)


@pytest.mark.parametrize("layer", [1, -1])
def test_hugging_face_model_directory(dataset: str, tmp_path: Path, layer: int) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=256,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(str(tmp_path / "gpt2"))
    cfg = make_cfg(dataset, f"activations.model={tmp_path / 'gpt2'}", f"activations.layer={layer}")
    batches, builder = serve(cfg)
    assert builder.num_layers == 2
    for batch in batches:
        with torch.inference_mode():
            ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
            states = model(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(
            batch["A"], at(states[layer], batch["token_pos"]), atol=1e-5, rtol=1e-4
        )


def test_demo_config_builds() -> None:
    cfg = load_config(REPO / "conf" / "demo_activations.yaml")
    assert cfg.activations.builder == "activations"
    builder = build_transform(cfg.activations, rank=1, seed=cfg.seed)
    assert builder.layer == 1
    assert builder.num_layers == cfg.activations.tiny.n_layers
    builder.close()
