"""The expected bytes: which dataset rows each batch holds, computed from docs/protocol.md
section 8 alone (no product code), so a legitimate client's batches can be checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lensfeed.common.config import LensfeedConfig
from tests.fuzz.config import ROWS, SEQ_LEN


@dataclass(frozen=True)
class Oracle:
    """Which rows batch (k, j) holds, from docs/protocol.md section 8 alone (no product code),
    and the bytes make_dataset stored for them (row i: tokens ``i*1000 + t``)."""

    batch_size: int
    cycle_size: int
    initial_cycle_size: int
    seed: int
    shuffle: bool
    rank: int = 0
    shard_rows: int = ROWS
    shard_offset: int = 0
    seq_len: int = SEQ_LEN

    @classmethod
    def from_config(cls, cfg: LensfeedConfig) -> Oracle:
        s = cfg.dataset.on_the_fly.samples_per_regeneration_cycle
        s0 = cfg.training_initial_cache_size_per_rank
        return cls(
            cfg.batch_size, s, s if s0 is None else s0, cfg.seed, cfg.dataset.on_the_fly.shuffle
        )

    def batches(self, k: int) -> int:
        return (self.initial_cycle_size if k == 0 else self.cycle_size) // self.batch_size

    def cycle_start(self, k: int) -> int:
        b = self.batch_size
        return 0 if k == 0 else self.batches(0) * b + (k - 1) * self.batches(1) * b

    def sample_idx(self, k: int, j: int) -> np.ndarray:
        b = self.batch_size
        slots = np.arange(j * b, (j + 1) * b)
        if self.shuffle:
            n = self.batches(k) * b
            slots = np.random.default_rng([self.seed, self.rank, k]).permutation(n)[slots]
        return self.shard_offset + (self.cycle_start(k) + slots) % self.shard_rows

    def check(self, batch: Mapping[str, Any], k: int, j: int) -> None:
        """Raise AssertionError unless ``batch`` is byte for byte batch ``j`` of cycle ``k``."""
        idx = self.sample_idx(k, j).astype(np.int64)
        ids = (idx[:, None] * 1000 + np.arange(self.seq_len)[None, :]).astype(np.int32)
        got = {name: t.numpy().tobytes() for name, t in batch.items()}
        want = {"input_ids": ids.tobytes(), "sample_idx": idx.tobytes()}
        if got != want:
            raise AssertionError(
                f"cycle {k} batch {j}: wrong bytes; sample_idx "
                f"{batch['sample_idx'].tolist() if 'sample_idx' in batch else None}, "
                f"expected {idx.tolist()} (tensors {sorted(got)})"
            )
