"""Landing received frames on the training device.

CPU: the decoded tensors already are zero-copy views of the ZeroMQ frames; nothing to do.
CUDA: each batch is copied into a reusable *pinned* staging slot (no per-batch pinned
allocation), then to the GPU with ``non_blocking=True`` on a dedicated copy stream, and an event
is recorded. The consumer's stream waits on that event before the batch is used (no
use-before-copy race) and a slot is only refilled once its previous copy has finished (no
premature reuse). Both paths run the same code in :class:`Stager`; only the branch differs.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch


@dataclass
class _Slot:
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # pinned uint8, grown on need
    event: torch.cuda.Event | None = None


@dataclass
class Staged:
    """A batch on its way to the device; :meth:`Stager.ready` makes it safe to use."""

    tensors: dict[str, torch.Tensor]
    event: torch.cuda.Event | None = None


class Stager:
    """Moves decoded CPU tensors to ``device`` through pinned slots (receiver-thread side)."""

    def __init__(self, device: torch.device | str, *, slots: int) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._slots = [_Slot() for _ in range(max(2, slots))]
        self._next = 0
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        if not self.cuda:
            return Staged(tensors)
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot.event is not None:
            slot.event.synchronize()  # the slot's last H2D copy must be done before we overwrite
        out: dict[str, torch.Tensor] = {}
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            for name, src in tensors.items():
                nbytes = src.numel() * src.element_size()
                buf = slot.buffers.get(name)
                if buf is None or buf.numel() < nbytes:
                    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                    slot.buffers[name] = buf
                host = buf[:nbytes]
                if nbytes:
                    host.copy_(src.reshape(-1).view(torch.uint8))
                dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                dev.copy_(host, non_blocking=True)
                out[name] = dev.view(src.dtype).view(src.shape)
            event = torch.cuda.Event()
            event.record(self._stream)
        slot.event = event
        return Staged(out, event)

    def ready(self, staged: Staged) -> dict[str, torch.Tensor]:
        """Consumer side: order the current stream after the copy and hand the tensors over."""
        if staged.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.event)
            for t in staged.tensors.values():
                t.record_stream(current)  # allocator must not reuse the memory under the consumer
        return staged.tensors


def release_cycle_memory(*, freeze: bool) -> None:
    """The original's per-regeneration cleanup: collect garbage and return cached CUDA blocks.

    A full collection rescans every live object: ~140 ms per cycle boundary once torch is
    imported. With ``freeze`` (the first time), objects that survive it (modules, model,
    optimizer) move to the permanent generation, so later collections scan only what training
    allocated since and the boundary costs ~1 ms (see docs/performance.md).
    """
    gc.collect()
    if freeze:
        gc.freeze()
    torch.cuda.empty_cache()  # a no-op unless CUDA was initialised


def freeze_setup_objects() -> None:
    """One full collection of everything the process has set up (modules, model, optimizer),
    and into the permanent generation with what survives: ~100 ms once torch is imported, paid
    when the client connects instead of at the first cycle boundary, whose collection then
    scans only what cycle 0 allocated (measured: the first boundary's 120-125 ms became
    6-14 ms, ``python -m benchmarks.run --quick --sections stall``)."""
    gc.collect()
    gc.freeze()


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


__all__ = ["Staged", "Stager", "freeze_setup_objects", "release_cycle_memory", "resolve_device"]
