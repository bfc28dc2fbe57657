"""Benchmark datasets: pretokenized ``datasets.save_to_disk`` corpora of random int32 tokens.

Built once under ``benchmarks/.data`` (gitignored) and reused while the name, shape and format
version match. Columns are ``list<int32>`` exactly as a tokenizer + ``save_to_disk`` writes them,
so the same directory serves lensfeed (memory-mapped Arrow), the original per-row iterator and
``torch.utils.data.DataLoader`` over ``with_format("torch")``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import BENCH_DIR

DEFAULT_DATA_DIR = BENCH_DIR / ".data"
_FORMAT = 1
VOCAB = 50257  # GPT-2 sized vocabulary, so values need the full int32 range of a real corpus


@dataclass(frozen=True)
class TokenData:
    """One generated corpus."""

    name: str
    rows: int
    seq_len: int
    path: Path

    @property
    def nbytes(self) -> int:
        return self.rows * self.seq_len * 4


def ensure_dataset(name: str, *, rows: int, seq_len: int, data_dir: Path) -> TokenData:
    """Build (or reuse) ``data_dir/name``: ``rows`` x ``seq_len`` random int32 tokens."""
    import datasets
    import pyarrow as pa

    path = data_dir / name
    marker = path / "benchmark.json"
    want = {"format": _FORMAT, "rows": rows, "seq_len": seq_len, "vocab": VOCAB}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return TokenData(name, rows, seq_len, path)
    if path.exists():
        shutil.rmtree(path)
    datasets.disable_progress_bars()
    rng = np.random.default_rng(1234)
    flat = rng.integers(0, VOCAB, size=rows * seq_len, dtype=np.int32)
    offsets = np.arange(0, rows * seq_len + 1, seq_len, dtype=np.int32)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    table = pa.table({"input_ids": column})
    datasets.Dataset(table).save_to_disk(str(path))
    marker.write_text(json.dumps(want))
    return TokenData(name, rows, seq_len, path)


def standard_datasets(data_dir: Path = DEFAULT_DATA_DIR) -> dict[str, Path]:
    """The benchmark datasets of ``settings.DATASETS`` (made once, then reused), by name."""
    from benchmarks.settings import DATASETS

    return {
        name: ensure_dataset(name, rows=rows, seq_len=seq, data_dir=data_dir).path
        for name, (rows, seq) in DATASETS.items()
    }


__all__ = ["DEFAULT_DATA_DIR", "TokenData", "ensure_dataset", "standard_datasets"]
