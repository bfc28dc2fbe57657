"""The activation builder: the producer runs a frozen LM and serves its hidden states.

Selected by ``activations.builder: activations``. For each served sample it emits

``A``
    the hidden state at ``activations.layer`` (see :mod:`producer.models` for the indexing) at
    one token position, ``(n, d_model)``, a CPU ``torch`` tensor in ``activations.dtype``;
``token_pos``
    that position (int64), drawn uniformly from ``[min_pos, max_pos or seq_len)``;
``A_prime``, ``pair_sample_idx``, ``pair_token_pos`` (when ``activations.pairs``)
    the same quantities for a partner sample of the same cycle;

and passes ``input_ids``, ``sample_idx`` and any other column through unchanged.

Determinism: every output of a slot (cycle-local position) is a function of (config, rank,
cycle, slot) only, never of how calls group batches, so a restarted producer or one with a
different ``group`` serves the same bytes:

* positions: ``token_positions`` draws one array per cycle from
  ``default_rng([seed, rank, cycle, POS])``; slot ``s`` gets entry ``s``;
* partners: ``partner_slots`` draws a permutation ``p`` of the cycle from
  ``default_rng([seed, rank, cycle, PAIRS])`` and pairs ``p[i]`` with ``p[i + 1]`` (one cycle
  through every slot: nobody is its own partner when the cycle has > 1 slot, and every sample
  is someone's partner exactly once);
* the forward itself: GPU kernels (and some CPU ones) give bitwise different rows for
  different batch shapes, so slots are never run in call-shaped batches. The cycle is cut into
  fixed chunks ``[k * F, (k + 1) * F)`` (``F = forward_batch_size``); a chunk always runs as a
  whole, its missing rows fetched with ``ctx.fetch``, and its ``A`` rows are cached until the
  calls have moved past it (with ``pairs``, until ``end_cycle``, because any slot may be a
  partner: at most ``cycle_len x d_model`` values per cycle). Each chunk runs once per cycle.

Precision: on CUDA the weights are cast to ``activations.dtype`` and the forward runs in it. On
CPU the forward always runs in float32 (CPU low-precision kernels are slow and incomplete; CPU
runs are for tests and demos) and ``A`` is rounded to ``activations.dtype`` afterwards.

For the tiny model and Hugging Face causal LMs, whose hidden state at position ``p`` depends only
on tokens ``<= p``, the sequence is cut at the top of the position range before the forward.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lensfeed.common.config import ActivationsConfig
from lensfeed.common.errors import ConfigError, TransformError
from lensfeed.producer import models
from lensfeed.producer.source import Array, BatchContext

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_POS_STREAM = 0x706F73  # "pos": keeps these draws independent of the cursor's shuffle
_PAIR_STREAM = 0x70616972  # "pair"
_OUTPUTS = ("A", "token_pos", "A_prime", "pair_sample_idx", "pair_token_pos")


def token_positions(
    *, seed: int, rank: int, cycle: int, cycle_len: int, lo: int, hi: int
) -> np.ndarray:
    """Token position of every slot of a cycle: uniform in ``[lo, hi)``, int64."""
    rng = np.random.default_rng([seed, rank, cycle, _POS_STREAM])
    return rng.integers(lo, hi, size=cycle_len, dtype=np.int64)


def partner_slots(*, seed: int, rank: int, cycle: int, cycle_len: int) -> np.ndarray:
    """Partner slot of every slot of a cycle (a single cycle through a random permutation)."""
    perm = np.random.default_rng([seed, rank, cycle, _PAIR_STREAM]).permutation(cycle_len)
    partners = np.empty(cycle_len, dtype=np.int64)
    partners[perm] = np.roll(perm, -1)
    return partners


def position_range(act: ActivationsConfig, seq_len: int | None) -> tuple[int, int | None]:
    """``[lo, hi)`` of token positions; ``hi`` is None while ``seq_len`` is unknown.

    Raises :class:`ConfigError` naming the key, its value and the valid range.
    """
    lo, mx = act.min_pos, act.max_pos
    top = "seq_len" if seq_len is None else str(seq_len)
    if lo < 0:
        raise ConfigError(
            f"'activations.min_pos' must be >= 0 (got {lo}); valid: 0 <= min_pos < max_pos <= {top}"
        )
    if mx < 0:
        raise ConfigError(
            f"'activations.max_pos' must be >= 0 (got {mx}); valid: 0 (= seq_len) or "
            f"min_pos < max_pos <= {top}"
        )
    if seq_len is not None and mx > seq_len:
        raise ConfigError(
            f"'activations.max_pos' = {mx} exceeds the sequence length {seq_len}; valid: 0 "
            f"(= seq_len) or {lo} < max_pos <= {seq_len}"
        )
    hi = mx if mx else seq_len
    if hi is not None and lo >= hi:
        what = f"max_pos {mx}" if mx else f"seq_len {seq_len} (max_pos is 0)"
        raise ConfigError(
            f"'activations.min_pos' = {lo} must be < {what}; valid: 0 <= min_pos < {hi}"
        )
    return lo, hi


@dataclass
class _Cycle:
    """Per-cycle state: derived slot tables and the cached rows of computed chunks."""

    length: int
    positions: np.ndarray
    partners: np.ndarray | None
    chunks: dict[int, tuple[torch.Tensor, np.ndarray]] = field(default_factory=dict)


class ActivationBuilder:
    """A :class:`producer.source.BatchTransform` that turns token batches into activations.

    ``group`` is how many training batches the source hands over per call; it changes only the
    call pattern, never the output bytes.
    """

    def __init__(
        self,
        act: ActivationsConfig,
        *,
        rank: int,
        seed: int,
        seq_len: int | None = None,
        group: int = 1,
    ) -> None:
        self.act = act
        self.rank = rank
        self.seed = seed
        self.group = max(1, int(group))
        self.spec = act.model
        if act.dtype not in _DTYPES:
            raise ConfigError(
                f"'activations.dtype' must be one of {sorted(_DTYPES)} (got {act.dtype!r})"
            )
        if act.forward_batch_size <= 0:
            raise ConfigError(
                f"'activations.forward_batch_size' must be positive (got {act.forward_batch_size})"
            )
        self.dtype = _DTYPES[act.dtype]
        self.device = _parse_device(act.device)
        self.compute_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self._lo, self._hi = position_range(act, seq_len)
        self._seq_len = seq_len
        self.model: torch.nn.Module | None = models.load_model(
            self.spec,
            tiny=act.tiny,
            device=self.device,
            dtype=self.compute_dtype,
            trust_remote_code=act.trust_remote_code,
        )
        self.num_layers = models.model_layers(self.model, spec=self.spec)
        layer = models.resolve_layer(act.layer, self.num_layers)
        if layer is None:
            n = self.num_layers
            raise ConfigError(
                f"'activations.layer' = {act.layer} is out of range for model {self.spec!r} "
                f"with {n} blocks: valid layers are {-(n + 1)}..{n} (0 = embedding output, "
                f"{n} = last block, negative counts from the end)"
            )
        self.layer = layer
        # Known-causal models need no tokens after the last position we read.
        self._causal = self.spec == "tiny" or (
            not models.is_factory_spec(self.spec) and Path(self.spec).is_dir()
        )
        self._vocab = models.vocab_size(self.model)
        self._max_len = models.max_positions(self.model)
        if seq_len is not None:
            self._check_seq_len(seq_len)
        self._cycles: dict[int, _Cycle] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ BatchTransform

    def __call__(self, arrays: Mapping[str, Array], ctx: BatchContext) -> dict[str, Array]:
        """Outputs for the ``len(ctx.slots)`` samples in ``arrays`` (see the module docstring)."""
        with self._lock:
            if self.model is None:
                raise TransformError(f"rank {self.rank}: activation builder is closed")
            ids = np.asarray(arrays["input_ids"])
            if ids.ndim != 2:
                raise TransformError(
                    f"activation builder needs 2-D input_ids (rows, seq_len); got {ids.shape}"
                )
            if self._hi is None or self._seq_len != ids.shape[1]:
                self._lo, self._hi = position_range(self.act, ids.shape[1])
                self._check_seq_len(ids.shape[1])
                self._seq_len = ids.shape[1]
                self._cycles.clear()  # their positions were drawn for the old range
            clash = sorted(set(arrays) & set(_OUTPUTS))
            if clash:
                raise ConfigError(
                    f"dataset columns {clash} clash with activation builder outputs {_OUTPUTS}"
                )
            slots = np.asarray(ctx.slots, dtype=np.int64)
            state = self._cycle(ctx)
            out: dict[str, Array] = dict(arrays)
            out["A"], _ = self._rows(state, slots, arrays, ctx)
            out["token_pos"] = state.positions[slots]
            if state.partners is not None:
                partners = state.partners[slots]
                out["A_prime"], out["pair_sample_idx"] = self._rows(state, partners, arrays, ctx)
                out["pair_token_pos"] = state.positions[partners]
            else:  # calls move forward: chunks wholly before this call's end are done
                done = (int(slots.max()) + 1) // self.act.forward_batch_size
                for k in [k for k in state.chunks if k < done]:
                    del state.chunks[k]
            return out

    def end_cycle(self, cycle: int) -> None:
        """Drop everything kept for ``cycle`` (and older) and give memory back to the system."""
        with self._lock:
            self._cycles = {c: s for c, s in self._cycles.items() if c > cycle}
        self._release()

    def close(self) -> None:
        """Free the model and all caches; later calls raise :class:`TransformError`."""
        with self._lock:
            self._cycles.clear()
            self.model = None
        self._release()

    # ------------------------------------------------------------------ internals

    def _release(self) -> None:
        gc.collect()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_seq_len(self, seq_len: int) -> None:
        used = self._used_len(seq_len)
        if self._max_len is not None and used > self._max_len:
            key = "'activations.tiny.max_seq_len'" if self.spec == "tiny" else "its config"
            raise ConfigError(
                f"model {self.spec!r} handles sequences up to {self._max_len} tokens ({key}), "
                f"but positions up to {used - 1} are read (seq_len {seq_len}, "
                f"'activations.max_pos' = {self.act.max_pos}); lower max_pos or use a model "
                "with longer context"
            )

    def _used_len(self, seq_len: int) -> int:
        assert self._hi is not None
        return self._hi if self._causal else seq_len

    def _cycle(self, ctx: BatchContext) -> _Cycle:
        state = self._cycles.get(ctx.cycle)
        if state is None or state.length != ctx.cycle_len:
            assert self._hi is not None
            key = {"seed": self.seed, "rank": self.rank, "cycle": ctx.cycle}
            state = _Cycle(
                length=ctx.cycle_len,
                positions=token_positions(**key, cycle_len=ctx.cycle_len, lo=self._lo, hi=self._hi),
                partners=partner_slots(**key, cycle_len=ctx.cycle_len) if self.act.pairs else None,
            )
            # The producer touches the current and the next cycle; keep no more than that.
            self._cycles = {c: s for c, s in self._cycles.items() if c >= ctx.cycle - 1}
            self._cycles[ctx.cycle] = state
        return state

    def _rows(
        self,
        state: _Cycle,
        slots: np.ndarray,
        arrays: Mapping[str, Array],
        ctx: BatchContext,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """``A`` and ``sample_idx`` of ``slots``, running whichever chunks are not cached."""
        f = self.act.forward_batch_size
        which = slots // f
        for k in np.unique(which).tolist():
            if k not in state.chunks:
                state.chunks[k] = self._run_chunk(state, k, arrays, ctx)
        first = state.chunks[int(which[0])][0]
        a = torch.empty((len(slots), *first.shape[1:]), dtype=first.dtype)
        idx = np.empty(len(slots), dtype=np.int64)
        for k in np.unique(which).tolist():
            rows = np.flatnonzero(which == k)
            chunk_a, chunk_idx = state.chunks[k]
            local = slots[rows] - k * f
            a[torch.from_numpy(rows)] = chunk_a[torch.from_numpy(local)]
            idx[rows] = chunk_idx[local]
        return a, idx

    def _run_chunk(
        self, state: _Cycle, k: int, arrays: Mapping[str, Array], ctx: BatchContext
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Forward chunk ``k`` (always the same rows, in the same order) and keep its ``A``."""
        f = self.act.forward_batch_size
        chunk = np.arange(k * f, min((k + 1) * f, state.length), dtype=np.int64)
        ids, sample_idx = _gather(chunk, arrays, ctx)
        assert self._seq_len is not None
        assert self.model is not None
        if self._vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= self._vocab):
            bad = int(ids.max()) if ids.max() >= self._vocab else int(ids.min())
            key = "'activations.tiny.vocab_size'" if self.spec == "tiny" else "its vocab_size"
            raise ConfigError(
                f"rank {self.rank} cycle {ctx.cycle}: input_ids contain token id {bad}, outside "
                f"model {self.spec!r}'s vocabulary 0..{self._vocab - 1} ({key})"
            )
        ids = ids[:, : self._used_len(self._seq_len)]
        pos = torch.from_numpy(state.positions[chunk])
        try:
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(ids)).to(self.device, torch.long)
                h = models.hidden_state(self.model, x, self.layer)
                a = h[torch.arange(len(chunk), device=h.device), pos.to(h.device)]
                a = a.to(device="cpu", dtype=self.dtype).contiguous()
        except torch.cuda.OutOfMemoryError:
            self._release()
            raise TransformError(
                f"rank {self.rank}: CUDA out of memory running model {self.spec!r} on "
                f"{self.device} ({len(chunk)} rows x {ids.shape[1]} tokens, {self.act.dtype}); "
                f"lower 'activations.forward_batch_size' (now {f}) or 'activations.max_pos'"
            ) from None
        return a, sample_idx


def _gather(
    chunk: np.ndarray, arrays: Mapping[str, Array], ctx: BatchContext
) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``sample_idx`` of ``chunk`` slots: from this call's rows when present,
    else fetched from the source (same bytes either way)."""
    have = np.asarray(ctx.slots, dtype=np.int64)
    order = np.argsort(have, kind="stable")
    at = np.minimum(np.searchsorted(have[order], chunk), len(have) - 1)
    found = have[order][at] == chunk
    src = order[at]
    ids_in = np.asarray(arrays["input_ids"])
    idx_in = np.asarray(arrays["sample_idx"])
    if found.all():
        return ids_in[src], idx_in[src]
    fetched = ctx.fetch(chunk[~found])
    ids = np.empty((len(chunk), ids_in.shape[1]), dtype=ids_in.dtype)
    idx = np.empty(len(chunk), dtype=np.int64)
    ids[found], idx[found] = ids_in[src[found]], idx_in[src[found]]
    ids[~found] = np.asarray(fetched["input_ids"])
    idx[~found] = np.asarray(fetched["sample_idx"])
    return ids, idx


def _parse_device(spec: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``, checked against what this machine has."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"'activations.device' = {spec!r} is not a device; use 'cpu' or 'cuda:N'"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"'activations.device' = {spec!r} but CUDA is not available on this machine"
            )
        count = torch.cuda.device_count()
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= count:
            raise ConfigError(
                f"'activations.device' = {spec!r} but this machine has {count} CUDA device(s) "
                f"(valid: cuda:0..cuda:{count - 1})"
            )
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ConfigError(f"'activations.device' = {spec!r}: only 'cpu' and 'cuda:N' are supported")
    return device


def build_transform(
    act: ActivationsConfig,
    *,
    rank: int,
    seed: int,
    seq_len: int | None = None,
    group: int = 1,
) -> ActivationBuilder:
    """The activation builder for one producer rank; loads the model now so errors show at start.

    ``seq_len`` (the shard's sequence length) lets position errors show now too; without it
    they show at the first batch.
    """
    return ActivationBuilder(act, rank=rank, seed=seed, seq_len=seq_len, group=group)


__all__ = [
    "ActivationBuilder",
    "build_transform",
    "partner_slots",
    "position_range",
    "token_positions",
]
