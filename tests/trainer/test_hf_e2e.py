"""End to end with a Hugging Face model: ``lensfeed.producer --ranks 0-1`` runs a tiny Gemma-2
checkpoint over a real dataset, and two consumer processes (one ``FeedClient`` per rank, as
each trainer rank holds one) receive over the real protocol exactly their shard's rows, with
the activations a direct ``output_hidden_states`` forward gives at the served positions."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn

from lensfeed.common.config import load_config
from lensfeed.producer.activations import token_positions
from lensfeed.producer.shard import rank_slice
from lensfeed.trainer.client import FeedClient
from tests._activations import BF16_ULP, at, save_tiny_gemma2, write_token_dataset
from tests._util import Procs, python_cmd

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROWS, SEQ, BATCH, CYCLE, CYCLES, LAYER = 24, 16, 4, 8, 2, 2  # 12 rows per rank: cycle 1 wraps
#: Runs :func:`consume` in a fresh interpreter (the repository root is the working directory).
CONSUMER = "import sys; from tests.trainer.test_hf_e2e import consume; consume(sys.argv[1:])"


def consume(argv: list[str]) -> None:
    """Consumer process ``OUT RANK OVERRIDE...``: every batch of ``training.num_cycles`` cycles
    of rank ``RANK``, copied out of the receive buffers, saved with ``torch.save`` to ``OUT``."""
    out, rank, overrides = argv[0], int(argv[1]), argv[2:]
    cfg = load_config(None, overrides)
    got: list[dict[str, object]] = []
    with FeedClient.from_config(cfg, rank) as feed:
        for cycle in feed.cycles(cfg.training.num_cycles):
            for j, batch in enumerate(cycle):
                tensors = {k: v.clone() for k, v in batch.items()}
                got.append({"cycle": cycle.index, "batch": cycle.start_batch + j, **tensors})
    torch.save(got, out)


def reference(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``hidden_states[LAYER]`` of a direct float32 forward of every dataset row."""
    with torch.inference_mode():
        return model(ids, output_hidden_states=True).hidden_states[LAYER]


def test_two_ranks_receive_gemma2_activations(procs: Procs, tmp_path: Path) -> None:
    data = write_token_dataset(tmp_path / "ds", rows=ROWS, seq_len=SEQ)
    model = save_tiny_gemma2(tmp_path / "gemma2")
    over = [
        "world_size=2",
        f"batch_size={BATCH}",
        f"dataset.path={data}",
        f"dataset.on_the_fly.samples_per_regeneration_cycle={CYCLE}",
        f"feed.endpoint=ipc://{tmp_path}/ipc/p{{rank}}.sock",
        "feed.timeout_s=90",  # producers import transformers and load the model first
        "feed.reconnect_timeout_s=30",
        f"training.num_cycles={CYCLES}",
        "activations.builder=activations",
        f"activations.model={tmp_path / 'gemma2'}",
        f"activations.layer={LAYER}",
        "activations.min_pos=1",  # max_pos 0: positions in [1, SEQ)
        "activations.forward_batch_size=8",
        "activations.dtype=bfloat16",
        "activations.pairs=true",
    ]
    # Consumers first: the producers may come up in either order.
    consumers = [
        procs.start([sys.executable, "-c", CONSUMER, str(tmp_path / f"rank{r}.pt"), str(r), *over])
        for r in (0, 1)
    ]
    producer = procs.start(python_cmd("lensfeed.producer", "--ranks", "0-1", *over))
    deadline = time.monotonic() + 150  # both consumers run at once: one bound for both
    for r, p in enumerate(consumers):
        code, out = procs.wait(p, timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, f"consumer {r}:\n{out}"
    code, out = procs.wait(producer, timeout=30)  # each rank's producer exits on goodbye
    assert code == 0, out

    ids = torch.from_numpy(
        np.stack(list(Dataset.load_from_disk(data).with_format("numpy")["input_ids"]))
    )
    states = reference(model, ids)
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        per_cycle = CYCLE // BATCH
        assert [(b["cycle"], b["batch"]) for b in got] == [
            (c, j) for c in range(CYCLES) for j in range(per_cycle)
        ]
        start, end = rank_slice(ROWS, r, 2)
        seen = torch.cat([b["sample_idx"] for b in got])
        assert set(seen.tolist()) == set(range(start, end))  # only (and all of) this rank's rows
        for b in got:
            idx, pair_idx = b["sample_idx"].long(), b["pair_sample_idx"].long()
            assert torch.equal(b["input_ids"].long(), ids[idx])
            assert ((pair_idx >= start) & (pair_idx < end)).all()
            # This rank's own position draws, slot by slot.
            drawn = token_positions(seed=0, rank=r, cycle=b["cycle"], cycle_len=CYCLE, lo=1, hi=SEQ)
            slots = slice(b["batch"] * BATCH, (b["batch"] + 1) * BATCH)
            assert b["token_pos"].tolist() == drawn[slots].tolist()
            for a, rows, pos in (
                (b["A"], idx, b["token_pos"]),
                (b["A_prime"], pair_idx, b["pair_token_pos"]),
            ):
                assert a.dtype == torch.bfloat16
                # The CPU producer computes in float32 and rounds to bfloat16: at most one
                # bfloat16 ulp from the rounded float32 reference (float32 noise at a boundary).
                expected = at(states[rows], pos).to(torch.bfloat16).float()
                torch.testing.assert_close(a.float(), expected, atol=0.0, rtol=BF16_ULP)
