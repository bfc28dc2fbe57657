"""A tiny Gemma-2 checkpoint through the activation builder (the seed's real workload, Gemma-2
2B, in miniature): what a producer serves is Hugging Face's own ``output_hidden_states`` at the
drawn token positions, for the first, a middle and the last layer, with and without pairs, in
float32 and bfloat16.

Apples to apples: the producer reads ``model.base_model(input_ids, output_hidden_states=True,
use_cache=False).hidden_states[layer]`` of the checkpoint it loads (``producer/models.py``); the
reference here is the documented user-side call, ``model(ids, output_hidden_states=True)
.hidden_states[layer]``, on the very model that was saved, over each full dataset row. So
layer 0 is the embedding output *with* Gemma's sqrt(hidden) scale and the last layer is *after*
the final RMSNorm (transformers ties ``hidden_states[-1]`` to ``last_hidden_state``);
``test_layer_0_is_scaled_embedding_and_last_layer_is_final_norm`` pins both down.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn

from lensfeed.producer.models import resolve_layer
from tests._activations import (
    BF16_U,
    BF16_ULP,
    SEQ,
    at,
    make_cfg,
    save_tiny_gemma2,
    serve,
)

LAYERS = 4  # blocks of the tiny Gemma-2: hidden states 0 (embedding) .. 4 (after final norm)
HIDDEN = 32
#: float32 served vs float32 reference. The CPU producer runs the same float32 kernels, but on
#: chunks of ``forward_batch_size`` rows cut at ``max_pos``; those shapes move results by a few
#: float32 ulps (measured <= 5e-6 on values up to ~12).
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The matrices here are a few dozen wide: one thread runs them ~4x faster than OpenMP's
    hand-offs do on a loaded 2-core runner."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """The saved checkpoint's directory and the float32 model it was saved from."""
    path = tmp_path_factory.mktemp("gemma2") / "model"
    return path, save_tiny_gemma2(path, layers=LAYERS)


@pytest.fixture(scope="module")
def gemma2_bf16(gemma2: tuple[Path, nn.Module]) -> nn.Module:
    """The same weights in bfloat16: the forward a CUDA producer runs in bfloat16."""
    return copy.deepcopy(gemma2[1]).to(torch.bfloat16)


def dataset_ids(dataset: str) -> torch.Tensor:
    """Every row of the dataset, ``(rows, SEQ)`` int64, in global ``sample_idx`` order."""
    rows = Dataset.load_from_disk(dataset).with_format("numpy")["input_ids"]
    return torch.from_numpy(np.stack(list(rows)))


def hidden_states(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The reference: ``hidden_states[layer]`` of a direct full-sequence forward of ``ids``."""
    with torch.inference_mode():
        return model(ids, output_hidden_states=True).hidden_states[layer]


def served_rows(
    batches: list[dict[str, Any]], ids: torch.Tensor, *, pairs: bool
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every served activation (``A`` and, with pairs, ``A_prime``) with the dataset row and
    token position it claims to be; checks each batch carries the rows' real tokens."""
    values, rows, positions = [], [], []
    for batch in batches:
        np.testing.assert_array_equal(batch["input_ids"], ids[batch["sample_idx"]].numpy())
        assert ("A_prime" in batch) == pairs
        keys = [("A", "sample_idx", "token_pos")]
        if pairs:
            keys.append(("A_prime", "pair_sample_idx", "pair_token_pos"))
        for a, idx, pos in keys:
            assert batch[a].shape == (len(batch["sample_idx"]), HIDDEN)
            values.append(batch[a])
            rows.append(np.asarray(batch[idx]))
            positions.append(np.asarray(batch[pos]))
    return torch.cat(values), np.concatenate(rows), np.concatenate(positions)


def bf16_forward_tol(layer: int) -> float:
    """Row-relative L2 error allowed between a float32-computed and a bfloat16-computed hidden
    state after ``layer`` resolves to ``k`` blocks: 8u per block plus 8u for the embedding.

    A bfloat16 forward rounds the output of every op (matmuls, RMSNorms, GELU, softmax, the
    residual adds; ~10 per Gemma-2 block) to 8 significant bits, relative error <= u = 2^-8,
    and the errors compound block by block. ``8u (k + 1)`` is 3.1% at the embedding, 9.4% after
    2 blocks and 15.6% after 4; measured on this model and data: 0.4%, 2.2% and 2.5%. A wrong
    layer is off by >= 40% per row here and a wrong position by ~110%, so the check still
    discriminates.
    """
    k = resolve_layer(layer, LAYERS)
    assert k is not None
    return 8 * BF16_U * (k + 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pairs", [False, True], ids=["single", "pairs"])
@pytest.mark.parametrize("layer", [0, 2, -1])
def test_served_activations_are_hugging_face_hidden_states(
    dataset: str,
    gemma2: tuple[Path, nn.Module],
    gemma2_bf16: nn.Module,
    layer: int,
    pairs: bool,
    dtype: str,
) -> None:
    path, model = gemma2
    cfg = make_cfg(
        dataset,
        f"activations.model={path}",
        f"activations.layer={layer}",
        f"activations.pairs={str(pairs).lower()}",
        f"activations.dtype={dtype}",
    )
    batches, builder = serve(cfg)
    builder.close()
    assert builder.num_layers == LAYERS
    ids = dataset_ids(dataset)
    served, rows, pos = served_rows(batches, ids, pairs=pairs)
    assert served.dtype == getattr(torch, dtype)
    assert pos.min() >= 1
    assert pos.max() < SEQ
    expected = at(hidden_states(model, ids, layer)[rows], pos)
    if dtype == "float32":
        torch.testing.assert_close(served, expected, **F32_TOL)
        return
    # On CPU the producer computes in float32 and rounds A to bfloat16 (producer/activations.py,
    # "Precision"): equal to the rounded float32 reference up to one bfloat16 ulp, where float32
    # noise (F32_TOL) lands a value on the other side of a rounding boundary.
    torch.testing.assert_close(
        served.float(), expected.to(torch.bfloat16).float(), atol=0.0, rtol=BF16_ULP
    )
    # What a CUDA producer serves in bfloat16: a bfloat16 forward. Close, within the rounding
    # error such a forward accumulates (bf16_forward_tol).
    expected16 = at(hidden_states(gemma2_bf16, ids, layer)[rows], pos).float()
    err = (served.float() - expected16).norm(dim=-1)
    bound = bf16_forward_tol(layer) * expected16.norm(dim=-1)
    assert (err <= bound).all(), (err / expected16.norm(dim=-1)).max()


def test_positions_below_max_pos_need_no_later_tokens(
    dataset: str, gemma2: tuple[Path, nn.Module]
) -> None:
    """The producer cuts rows at ``max_pos`` before the forward (causal models need no later
    tokens); with sliding-window layers that still equals the full-sequence forward."""
    path, model = gemma2
    cfg = make_cfg(
        dataset,
        f"activations.model={path}",
        "activations.layer=-1",
        "activations.max_pos=9",
        "activations.pairs=true",
    )
    batches, builder = serve(cfg)
    builder.close()
    ids = dataset_ids(dataset)
    served, rows, pos = served_rows(batches, ids, pairs=True)
    assert pos.max() < 9
    expected = at(hidden_states(model, ids, -1)[rows], pos)
    torch.testing.assert_close(served, expected, **F32_TOL)


def test_layer_0_is_scaled_embedding_and_last_layer_is_final_norm(
    dataset: str, gemma2: tuple[Path, nn.Module]
) -> None:
    """Pins down what lensfeed's layer indexing means for Gemma-2, computed without
    ``output_hidden_states``: layer 0 includes the sqrt(hidden) embedding scale, layer -1 is the
    last block's output after the final RMSNorm (not the raw residual stream)."""
    path, model = gemma2
    ids = dataset_ids(dataset)
    base = model.model
    outputs: list[torch.Tensor] = []
    handle = base.layers[-1].register_forward_hook(
        lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            base(ids)  # the hook keeps the last block's output: the raw residual stream
            residual = outputs[0]
            normed = base.norm(residual)
            embedded = nn.functional.embedding(ids, base.embed_tokens.weight) * HIDDEN**0.5
    finally:
        handle.remove()
    served = {}
    for layer, expected in ((0, embedded), (-1, normed)):
        cfg = make_cfg(dataset, f"activations.model={path}", f"activations.layer={layer}")
        batches, builder = serve(cfg)
        builder.close()
        served[layer], rows, pos = served_rows(batches, ids, pairs=False)
        torch.testing.assert_close(served[layer], at(expected[rows], pos), **F32_TOL)
    # The final norm matters: the raw residual stream is far from what layer -1 serves.
    assert not torch.allclose(served[-1], at(residual[rows], pos), atol=0.1, rtol=0.1)
