"""Shared helpers for the activation-builder tests: a token dataset, configs, served batches,
and a tiny Gemma-2 saved like a real checkpoint (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.spec import DataSpec
from lensfeed.producer.activations import ActivationBuilder, build_transform
from lensfeed.producer.shard import load_shard
from lensfeed.producer.source import ShardSource

SEQ = 16
ROWS = 40
CYCLE = 24  # 6 batches of 4; forward chunks of 8 straddle batch groups of 3
VOCAB = 256

#: bfloat16 unit roundoff (8 significant bits): the relative error of one rounding.
BF16_U = 2.0**-8
#: Two bfloat16 numbers one ulp apart differ by at most this fraction of the larger magnitude.
BF16_ULP = 2.0**-7


def write_token_dataset(path: Path, *, rows: int = ROWS, seq_len: int = SEQ, seed: int = 0) -> str:
    """A ``save_to_disk`` dataset of uniform random token ids in ``[0, VOCAB)`` (int64)."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, (rows, seq_len), dtype=np.int64)
    Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(path))
    return str(path)


def make_cfg(dataset: str, *overrides: str) -> LensfeedConfig:
    """An activation-builder config over ``dataset`` (tiny model unless overridden)."""
    base = [
        f"dataset.path={dataset}",
        "batch_size=4",
        f"dataset.on_the_fly.samples_per_regeneration_cycle={CYCLE}",
        "activations.builder=activations",
        "activations.forward_batch_size=8",
        "activations.layer=1",
        "activations.min_pos=1",
        "activations.tiny.d_model=32",
        "activations.tiny.n_heads=4",
        "activations.tiny.n_layers=2",
        "activations.tiny.max_seq_len=64",
    ]
    return load_config(None, [*base, *overrides])


def serve(
    cfg: LensfeedConfig,
    *,
    cycle: int = 0,
    start: int = 0,
    group: int = 1,
    seq_len: int | None = SEQ,
) -> tuple[list[dict[str, Any]], ActivationBuilder]:
    """All batches ``start ..`` of ``cycle`` from a fresh builder (a fresh producer)."""
    shard = load_shard(cfg.dataset.path, rank=0, world_size=1, columns=list(cfg.dataset.columns))
    builder = build_transform(cfg.activations, rank=0, seed=cfg.seed, seq_len=seq_len, group=group)
    source = ShardSource(shard, DataSpec.from_config(cfg), transform=builder)
    return list(source.iter_batches(cycle, start)), builder


def at(states: torch.Tensor, pos: Any) -> torch.Tensor:
    """Row ``i`` of ``states[i, pos[i]]``: one token's hidden state per sample."""
    return states[torch.arange(len(pos)), torch.as_tensor(pos)]


def save_tiny_gemma2(path: Path, *, layers: int = 4, seed: int = 0) -> nn.Module:
    """A seeded tiny ``Gemma2ForCausalLM`` saved with ``save_pretrained`` at ``path`` (eval,
    float32). Every Gemma-2 feature is on and made to matter at this size: grouped-query
    attention, alternating sliding (window 4 < SEQ) and full layers, attention-logit softcapping
    small enough to bite (1.0), the sqrt(hidden) embedding scale, the final norm.

    ``attn_implementation="eager"`` is what transformers picks for Gemma-2 anyway (it has no SDPA
    path, which could not softcap); it is set so the reference cannot silently differ.
    """
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=2 * SEQ,
        sliding_window=4,
        attn_logit_softcapping=1.0,
        initializer_range=0.2,  # 0.02 leaves every block a near-identity at hidden size 32
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Gemma2ForCausalLM(config).eval()
    model.save_pretrained(str(path))
    return model
