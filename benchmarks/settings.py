"""What the suite measures (payload cases) and how much of it (full, quick and smoke sizes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.common import MiB
from lensfeed.common.config import FeedConfig

BATCH = 64
SAMPLE_IDX_BYTES = 8  # every lensfeed batch also carries sample_idx (int64) per sample


@dataclass(frozen=True)
class Case:
    """One payload: what a batch holds and where it comes from."""

    key: str
    label: str
    dataset: str  # benchmark dataset the producer reads (tokens are gathered in every case)
    tensor_bytes_per_sample: int
    transform: str = ""  # producer_runner --transform ("" = the plain producer)
    tokens: bool = True  # the token baselines (original loop, DataLoader) apply

    @property
    def bytes_per_sample(self) -> int:
        """Wire payload per sample (all tensor frames), the unit of every GB/s in the report."""
        return self.tensor_bytes_per_sample + SAMPLE_IDX_BYTES

    @property
    def batch_bytes(self) -> int:
        return BATCH * self.bytes_per_sample


CASES: tuple[Case, ...] = (
    Case("tok128", "tokens (64, 128) int32", "tok128", 128 * 4),
    Case("tok2048", "tokens (64, 2048) int32", "tok2048", 2048 * 4),
    Case(
        "act4",
        "activations (64, 16, 1024) float32 = 4 MiB",
        "tok128",
        16 * 1024 * 4,
        transform="act:float32:16x1024",
        tokens=False,
    ),
    Case(
        "act32",
        "activations (64, 128, 1024) float32 = 32 MiB",
        "tok128",
        128 * 1024 * 4,
        transform="act:float32:128x1024",
        tokens=False,
    ),
)


def steady_stream(
    case: Case, *, block_bytes: int = 128 * MiB, blocks: int = 4
) -> tuple[int, int, int]:
    """``(warm-up batches, batches per timed block, blocks)`` for one steady stream.

    The warm-up cycle must fill every buffer on the way before anything is timed: the
    producer's ready queue (``feed.max_ahead_batches`` / ``max_ahead_bytes``) and the credit
    window (``feed.prefetch_bytes``), plus as much again. Until then each gathered message
    lands in memory the kernel zeroes on first touch; over CURVE, whose ~1 GB/s lets both
    fill, that start-up cost was most of the producer's CPU in blocks timed right after a
    one-block warm-up (regeneration thread 416-541 vs 133 us per (64, 2048) batch).
    """
    feed = FeedConfig()
    ahead = min(feed.max_ahead_batches * case.batch_bytes, feed.max_ahead_bytes)
    warm = ahead + 2 * feed.prefetch_bytes
    return -(-warm // case.batch_bytes), max(1, block_bytes // case.batch_bytes), blocks


#: Benchmark datasets: name -> (rows, seq_len). ~100 MiB and ~128 MiB of int32 tokens.
DATASETS: dict[str, tuple[int, int]] = {"tok128": (200_000, 128), "tok2048": (16_384, 2048)}
ALL_CASES = tuple(c.key for c in CASES)


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one suite run."""

    mode: str
    repeats: int  # timed repeats (cycles / rounds / epochs) per measurement
    cycle_bytes: int  # lensfeed cycle and raw-limit round size, in payload bytes
    min_batches: int
    max_batches: int
    original_samples: dict[str, int] = field(default_factory=dict)
    dataloader_samples: dict[str, int] = field(default_factory=dict)
    cases: tuple[str, ...] = ALL_CASES  # keys of CASES to measure
    orders: tuple[bool, ...] = (True, False)  # shuffled, sequential
    tuned_limit: bool = True  # also the limit with glibc's mmap threshold lifted (limit+malloc)
    stall_cycles: int = 6
    stall_batches: int = 64  # batches per cycle in the stall section
    stall_regen_s: float = 0.002  # fixed transform cost per batch
    stall_step_s: float = 0.003  # fixed training step per batch
    memory_samples: tuple[int, int] = (10_000, 1_000_000)
    original_memory_samples: tuple[int, ...] = (10_000, 100_000)
    profile: bool = True
    budget_s: float = 600.0
    datasets: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DATASETS))

    def batches_per_cycle(self, case: Case) -> int:
        n = self.cycle_bytes // case.batch_bytes
        return int(min(self.max_batches, max(self.min_batches, n)))

    def selected(self) -> tuple[Case, ...]:
        """The cases this run measures, in report order."""
        return tuple(c for c in CASES if c.key in self.cases)


FULL = Settings(
    mode="full",
    repeats=7,
    cycle_bytes=256 * MiB,
    min_batches=32,
    max_batches=2048,
    original_samples={"tok128": 16_384, "tok2048": 2_048},
    dataloader_samples={"tok128": 8_192, "tok2048": 4_096},
)

QUICK = Settings(
    mode="quick",
    repeats=3,
    cycle_bytes=48 * MiB,
    min_batches=12,
    max_batches=768,
    original_samples={"tok128": 4_096, "tok2048": 512},
    dataloader_samples={"tok128": 2_048, "tok2048": 1_024},
    tuned_limit=False,
    stall_cycles=4,
    original_memory_samples=(10_000, 30_000),
    profile=False,
    budget_s=120.0,
)

#: Every section's code path at toy sizes, for the test suite (tests/test_benchmarks.py): one
#: token case (limit@msg, the baselines) and one transform case, shuffled, on a small dataset.
SMOKE = Settings(
    mode="smoke",
    repeats=2,
    cycle_bytes=2 * MiB,
    min_batches=4,
    max_batches=64,
    original_samples={"tok128": 512},
    dataloader_samples={"tok128": 256},
    cases=("tok128", "act4"),
    orders=(True,),
    stall_cycles=2,
    stall_batches=8,
    memory_samples=(640, 6_400),
    original_memory_samples=(1_000, 3_000),
    budget_s=90.0,
    datasets={"tok128": (8_192, 128)},
)

__all__ = ["BATCH", "CASES", "DATASETS", "FULL", "QUICK", "SMOKE", "Case", "Settings"]
