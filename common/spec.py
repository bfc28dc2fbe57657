"""The data spec: every setting that shapes the batch stream, which producer and trainer must
agree on. It travels in the handshake field by field (so a mismatch names both values) and its
fingerprint is stored in checkpoints (so a resume under another configuration is refused)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lensfeed.common.config import LensfeedConfig


@dataclass(frozen=True)
class DataSpec:
    """Every setting that shapes the batch stream; producer and trainer must agree on all of it.

    Sent in the handshake field by field, so a mismatch error can name both values.
    """

    dataset: str
    columns: tuple[str, ...]
    world_size: int
    batch_size: int
    cycle_size: int
    initial_cycle_size: int
    seed: int
    shuffle: bool
    builder: str = "tokens"
    builder_args: str = ""

    @classmethod
    def from_config(cls, cfg: LensfeedConfig) -> DataSpec:
        act = cfg.activations
        builder_args = ""
        if act.builder != "tokens":
            t = act.tiny
            tiny = (
                f",tiny=v{t.vocab_size}/d{t.d_model}/l{t.n_layers}/h{t.n_heads}"
                f"/s{t.max_seq_len}/seed{t.seed}"
                if act.model == "tiny"
                else ""
            )
            builder_args = (
                f"model={act.model},layer={act.layer},pos=[{act.min_pos},{act.max_pos}),"
                f"dtype={act.dtype},pairs={act.pairs},forward_batch={act.forward_batch_size}" + tiny
            )
        return cls(
            # One spelling per path ('data/demo', './data/demo', 'data/demo/'): the fingerprint
            # must not tell them apart.
            dataset=os.path.normpath(cfg.dataset.path) if cfg.dataset.path else "",
            columns=tuple(cfg.dataset.columns),
            world_size=cfg.world_size,
            batch_size=cfg.batch_size,
            cycle_size=cfg.cycle_size,
            initial_cycle_size=cfg.initial_cycle_size,
            seed=cfg.seed,
            shuffle=cfg.dataset.on_the_fly.shuffle,
            builder=act.builder,
            builder_args=builder_args,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["columns"] = list(self.columns)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        """The spec a peer sent, each field checked for its declared type and range first (a
        ``shuffle: 1`` or a nested list must be refused, not compared)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, Mapping) or set(d) != set(names):
            got = sorted(map(str, d)) if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"data spec keys {got} != expected {sorted(names)}")
        for name in names:
            _check_field(name, d[name])
        kw = dict(d)
        kw["columns"] = tuple(kw["columns"])
        return cls(**kw)

    def tensor_contract(self) -> tuple[dict[str, str], dict[str, str]]:
        """What a producer of this spec sends in every batch: ``(required, optional)`` maps of
        tensor name -> ``"int"`` or ``"float"``. The client holds each batch to it."""
        added, optional = added_tensors(self.builder)
        return {**{c: "int" for c in self.columns}, **added}, optional

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def differences(self, other: DataSpec) -> list[str]:
        """Human-readable ``key: ours vs theirs`` lines for each differing field."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]

    def batches_in_cycle(self, cycle: int) -> int:
        """Every rank's batch count for ``cycle``: S0 // B for cycle 0, S // B after."""
        size = self.initial_cycle_size if cycle == 0 else self.cycle_size
        return size // self.batch_size

    def cycle_start(self, cycle: int) -> int:
        """Stream position (samples already served) at the start of ``cycle``.

        A cycle serves ``batches * B`` samples; the ``S % B`` remainder is not dropped, it is
        simply where the next cycle starts, so no sample of the stream is ever skipped.
        """
        if cycle == 0:
            return 0
        b = self.batch_size
        return (self.initial_cycle_size // b) * b + (cycle - 1) * (self.cycle_size // b) * b


def added_tensors(builder: str) -> tuple[dict[str, str], dict[str, str]]:
    """The tensors a producer adds to every batch beside the dataset's columns, ``(required,
    optional)`` maps of name -> ``"int"`` or ``"float"``: a column may not be named like one."""
    if builder != "activations":
        return {"sample_idx": "int"}, {}
    required = {"sample_idx": "int", "A": "float", "token_pos": "int"}
    return required, {"A_prime": "float", "pair_sample_idx": "int", "pair_token_pos": "int"}


_MAX_TEXT = 4096
#: Largest seed and size a data spec may hold (a peer's hello is checked against it).
MAX_SPEC_INT = (1 << 62) - 1
#: Longest column name a data spec may hold.
MAX_COLUMN_NAME = 256


def _check_field(name: str, value: Any) -> None:
    """Type and range of one spec field as a peer sent it (``bool`` is not an ``int`` here)."""
    if name in ("dataset", "builder", "builder_args"):
        ok = isinstance(value, str) and len(value) <= _MAX_TEXT
        want = f"a string of at most {_MAX_TEXT} chars"
    elif name == "columns":
        ok = (
            isinstance(value, (list, tuple))
            and 0 < len(value) <= 64
            and all(isinstance(c, str) and 0 < len(c) <= MAX_COLUMN_NAME for c in value)
        )
        want = "a list of 1-64 column names"
    elif name == "shuffle":
        ok, want = type(value) is bool, "a bool"
    elif name == "seed":
        ok = type(value) is int and 0 <= value <= MAX_SPEC_INT
        want = f"an int in [0, {MAX_SPEC_INT}]"
    else:  # world_size, batch_size, cycle sizes
        ok = type(value) is int and 1 <= value <= MAX_SPEC_INT
        want = f"an int in [1, {MAX_SPEC_INT}]"
    if not ok:
        kind = type(value).__name__
        raise ValueError(f"data spec field '{name}' must be {want} (got a {kind})")


__all__ = ["DataSpec"]
