"""The feed client: rank r's connection to its producer, as an iterator of cycles of batches.

::

    feed = FeedClient(cfg.endpoint_for(rank), rank=rank, spec=DataSpec.from_config(cfg))
    for cycle in feed.cycles(num_cycles=3):      # asking for a cycle = "regenerate it"
        for batch in cycle:                      # dict[str, Tensor] on the target device
            loss = step(batch)
        ckpt["feed"] = feed.state_dict()         # flat JSON-able cursor
    feed.close()

Prefetching happens in the background without a Python thread: the producer may send up to
``prefetch`` batches ahead (the credits it was granted), and libzmq's I/O thread receives them
into its queue while the training step runs. On CUDA the client additionally keeps up to
``stage_ahead`` received batches in flight to the GPU (pinned staging, copy stream), so the
host-to-device copy of the next batches overlaps the current step. A step only waits when the
producer falls behind; the time it waited is recorded in :attr:`FeedClient.stats`. Keeping the
socket in the consuming thread removes every thread hand-off from the per-batch path (see
``docs/performance.md`` for the measurements that motivated this).

CPU tensors are zero-copy, *read-only* views of the received frames: they stay valid as long as
you hold them, but clone before writing in place. Small batches arrive several to a message
(up to about 8 MiB, see ``feed.batches_per_message``), so a batch you keep keeps its whole message
alive: clone what you store beyond the step. CUDA tensors are ordinary device memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lensfeed.common import protocol as P
from lensfeed.common.config import MAX_PREFETCH
from lensfeed.common.errors import LensfeedError, ProducerTimeoutError, ProtocolError
from lensfeed.common.keyfiles import client_keys
from lensfeed.common.spec import DataSpec
from lensfeed.trainer.connection import ProducerLost
from lensfeed.trainer.contract import TensorContract, TensorSpec
from lensfeed.trainer.credits import CreditWindow
from lensfeed.trainer.cursor import cursor_state, resume_point, state_cursor
from lensfeed.trainer.cycles import Cycle, FeedStats
from lensfeed.trainer.device import Staged, Stager, freeze_setup_objects, release_cycle_memory
from lensfeed.trainer.reconnect import Reconnector
from lensfeed.trainer.session import Session

if TYPE_CHECKING:
    from lensfeed.common.config import LensfeedConfig


class FeedClient:
    """Connects rank ``rank`` to its producer at ``endpoint``. See the module docstring.

    ``state_dict()`` keys: ``cycle`` and ``batch`` (the next batch to consume), ``fingerprint``
    (of the data spec), ``rank``, ``world_size``. Prefetched batches are never counted.

    A producer that dies or stops answering heartbeats (``heartbeat_s``) is reconnected to
    within ``reconnect_timeout_s``, resuming at the next batch not yet handed to the loop: the
    loop sees neither an exception nor a missing or repeated batch (docs/protocol.md 6.6).

    Nothing from the producer is trusted: every batch must fit the credits granted and the
    tensors the spec implies (``tensors`` declares a custom producer's, as
    :class:`~lensfeed.producer.fake.FakeProducer` takes them), or it is a ``ProtocolError``.
    ``keys_dir`` (``lensfeed keys DIR``) turns on CURVE and pins the producer's key.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        rank: int,
        spec: DataSpec,
        device: torch.device | str = "cpu",
        prefetch: int = 1024,
        prefetch_bytes: int = 128 << 20,
        timeout_s: float = 60.0,
        heartbeat_s: float = 3.0,
        reconnect_timeout_s: float = 120.0,
        max_message_bytes: int = 256 << 20,
        cleanup_each_cycle: bool = True,
        stage_ahead: int | None = None,
        keys_dir: str | Path = "",
        tensors: TensorSpec | None = None,
    ) -> None:
        if not 0 < prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be in [1, {MAX_PREFETCH}] (got {prefetch})")
        self.endpoint = endpoint
        self.rank = rank
        self.spec = spec
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.prefetch_bytes = prefetch_bytes
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.max_message_bytes = max_message_bytes
        self.cleanup_each_cycle = cleanup_each_cycle
        self.stats = FeedStats()
        self.welcome: dict[str, Any] = {}
        self._cursor = (0, 0)  # next (cycle, batch) the loop will consume
        self._current: Cycle | None = None
        #: Batches staged to the device ahead of use (CUDA: overlap H2D with compute; CPU: 0).
        self.stage_ahead = (
            stage_ahead if stage_ahead is not None else (2 if self.device.type == "cuda" else 0)
        )
        self._credits = CreditWindow(prefetch, prefetch_bytes)
        self._stager = Stager(self.device, slots=self.stage_ahead + 2)
        self._session = Session(
            endpoint,
            rank=rank,
            spec=spec,
            stager=self._stager,
            heartbeat_s=heartbeat_s,
            max_message_bytes=max_message_bytes,
            contract=TensorContract(spec, tensors),
            keys=client_keys(keys_dir) if keys_dir else None,
            max_queued=self._credits.max_queued,
        )
        #: Opens each session (the first, and after a loss) and resends what a lost one owed.
        self._reconnect = Reconnector(self._session, self._credits, self)
        self._connected = False
        self._failed: LensfeedError | None = None
        self._gc_frozen = False

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return self.feed_state(self.spec, self.rank, self._normalized_cursor())

    @staticmethod
    def feed_state(spec: DataSpec, rank: int, cursor: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """The ``state_dict`` of rank ``rank``'s feed at ``cursor`` (a fresh run: ``(0, 0)``)."""
        return cursor_state(spec, rank, cursor)

    @classmethod
    def from_config(
        cls, cfg: LensfeedConfig, rank: int, *, device: torch.device | str = "cpu", **overrides: Any
    ) -> FeedClient:
        """A client for ``rank`` with every ``feed`` setting of ``cfg`` (keywords override)."""
        feed = cfg.feed
        kwargs: dict[str, Any] = {
            "device": device,
            "prefetch": feed.prefetch,
            "prefetch_bytes": feed.prefetch_bytes,
            "timeout_s": feed.timeout_s,
            "heartbeat_s": feed.heartbeat_timeout_s,
            "reconnect_timeout_s": feed.reconnect_timeout_s,
            "max_message_bytes": feed.max_message_bytes,
            "cleanup_each_cycle": cfg.training.empty_cache_each_cycle,
            "keys_dir": feed.keys_dir,
        }
        kwargs.update(overrides)
        return cls(cfg.endpoint_for(rank), rank=rank, spec=DataSpec.from_config(cfg), **kwargs)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``; must be called before the first cycle is requested."""
        if self._connected:
            raise LensfeedError("load_state_dict() must be called before connecting")
        self._cursor = state_cursor(state, self.spec, self.rank)

    # ---------------------------------------------------------------- connection

    def _where(self) -> str:
        return self._session.where

    def _normalized_cursor(self) -> tuple[int, int]:
        """The cursor with a finished cycle rolled over to ``(cycle + 1, 0)``."""
        return resume_point(self.spec, self._cursor)

    def connect(self) -> dict[str, Any]:
        """Handshake (with the resume cursor); returns the producer's WELCOME fields."""
        if self._failed is not None:
            raise self._failed  # a failure is final, a failed handshake's too
        if self._connected:
            return self.welcome
        self._connected = True
        try:
            self.welcome = self._reconnect.connect(self._cursor, self._current)
        except LensfeedError as exc:
            self._failed = exc
            raise
        if self.cleanup_each_cycle:
            freeze_setup_objects()  # before training, not at the first cycle boundary
        return self.welcome

    def _recover(self, cause: str) -> None:
        """Reach the lost producer again and resume where the loop is (:class:`Reconnector`)."""
        self.welcome = self._reconnect.recover(cause, self._cursor, self._current)

    def close(self) -> None:
        """Say goodbye (the producer may exit) and release the socket.

        Waits (briefly) for the producer's acknowledgement, draining what is still in flight,
        so the connection never closes under a producer in the middle of sending. After a
        failure the producer is gone or has stopped: no acknowledgement is waited for.
        """
        wait_s = 0.0 if self._failed is not None else min(self.timeout_s, 5.0)
        self._session.close(bye_wait_s=wait_s)
        self._connected = False
        self._current = None

    def __enter__(self) -> FeedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- consuming

    def _take(self, what: str) -> tuple[str, Any]:
        """Next message in order; waits at most ``timeout_s`` for a live producer (recorded as
        data wait), and reconnects to a lost one (:meth:`_recover`). A failure is final."""
        if self._failed is not None:
            raise self._failed
        try:
            while True:
                try:
                    kind, payload = self._take_one(what)
                except ProducerLost as lost:
                    self._recover(lost.cause)
                    continue
                if kind == P.CYCLE_START and self._reconnect.resent is not None:
                    self._check_cycle_start(payload, *self._reconnect.resent)
                    self._reconnect.resent = None
                    continue
                return kind, payload
        except LensfeedError as exc:
            self._failed = exc
            raise

    def _take_one(self, what: str) -> tuple[str, Any]:
        session = self._session
        # One deadline for the item, however many messages that are not it (non-fatal errors,
        # an earlier session's) arrive meanwhile: only progress resets it.
        deadline = time.monotonic() + self.timeout_s
        while True:
            if not session.items:
                self._grant(force=True)  # never block holding back credit the producer needs
            if not session.items:  # (granting first reads what was already queued)
                t0 = time.monotonic()
                try:
                    got = session.receive(max(0.0, deadline - t0))
                finally:
                    waited = time.monotonic() - t0
                    self.stats.wait_s += waited
                    if self._current is not None:
                        self._current.wait_s += waited
                if not got:
                    alive = (
                        " (it is alive: its heartbeats are answered; raise feed.timeout_s for a "
                        "slow model)"
                        if self.heartbeat_s > 0
                        else ""
                    )
                    raise ProducerTimeoutError(
                        f"no {what} from the {self._where()} within {self.timeout_s:g} s{alive}"
                    )
                if not session.items:
                    continue  # an earlier session's message, dropped
            # Stage what has already arrived, so its device copy overlaps the coming step.
            try:
                while session.batches < self.stage_ahead and session.receive(0):
                    pass
                session.stage_ahead(self.stage_ahead)
            except ProducerLost:
                pass  # noticed again, with nothing queued, by the next wait
            item = session.pop()
            if item is not None:
                return item

    def _grant(self, *, force: bool) -> None:
        """Top the producer's credit back up to the window (:class:`CreditWindow`)."""
        deficit = self._credits.due(force=force)
        if deficit:
            try:  # what was sent on earlier credits is checked against them first
                self._session.drain()
            except ProducerLost:
                pass  # noticed again, with nothing queued, by the next wait
            except LensfeedError as exc:
                self._failed = exc
                raise
            self._session.send(P.CREDIT, {"n": deficit})
            self._credits.granted += deficit

    def next_cycle(self) -> Cycle:
        """Ask the producer for the next cycle (this is the regeneration signal) and return it."""
        current = self._current
        if current is not None and not current.done:
            if not current.exhausted:
                raise LensfeedError(
                    f"cycle {current.index} still has unconsumed batches; iterate it to the end "
                    "before asking for the next cycle"
                )
            self._finish_cycle(current)  # the loop stopped right after its last batch
        self.connect()
        cycle, batch = self._cursor = self._normalized_cursor()
        self._reconnect.asked = (cycle, batch)
        self._session.send(P.NEXT_CYCLE, {"cycle": cycle, "batch": batch})
        kind, header = self._take(f"start of cycle {cycle}")
        self._reconnect.asked = None
        if kind != P.CYCLE_START:
            raise ProtocolError(f"{self._where()}: expected start of cycle {cycle}, got {kind}")
        self._check_cycle_start(header, cycle, batch)
        self._current = Cycle(
            index=cycle,
            num_batches=header["batches"],
            start_batch=batch,
            meta=dict(header),
            _client=self,
        )
        return self._current

    def _check_cycle_start(self, header: dict[str, Any], cycle: int, batch: int) -> None:
        if header["cycle"] != cycle or header["start_batch"] != batch:
            raise ProtocolError(
                f"{self._where()}: expected start of cycle {cycle} at batch {batch}, got cycle "
                f"{header['cycle']} at batch {header['start_batch']}"
            )
        if header["batches"] != self.spec.batches_in_cycle(cycle):
            raise ProtocolError(
                f"{self._where()}: cycle {cycle} has {header['batches']} batches, expected "
                f"{self.spec.batches_in_cycle(cycle)}"
            )

    def cycles(self, num_cycles: int | None = None) -> Iterator[Cycle]:
        """Cycles in order from the resume cursor; ``num_cycles`` counts from cycle 0."""
        while num_cycles is None or self.state_dict()["cycle"] < num_cycles:
            cycle = self.next_cycle()
            yield cycle
            if not cycle.done:  # the loop broke out early (e.g. max_steps): stop here
                return

    def _open_cycle(self, cycle: Cycle) -> Iterator[dict[str, torch.Tensor]]:
        """``iter(cycle)``, checked when it is called rather than at the first ``next()``: a
        second iterator would start again at a batch the producer has already sent."""
        if cycle is not self._current or cycle.done or cycle.opened:
            raise LensfeedError(f"cycle {cycle.index} can only be iterated once, while current")
        cycle.opened = True
        return self._iter_cycle(cycle)

    def _iter_cycle(self, cycle: Cycle) -> Iterator[dict[str, torch.Tensor]]:
        bsz = self.spec.batch_size
        b = cycle.start_batch
        while b < cycle.num_batches:
            kind, payload = self._take(f"batch {b} of cycle {cycle.index}")
            if kind != P.BATCH:
                raise ProtocolError(f"{self._where()}: expected batch {b}, got {kind}")
            header, staged = payload
            count = header["count"]
            if header["cycle"] != cycle.index or header["batch"] != b:
                raise ProtocolError(
                    f"{self._where()}: out-of-order batch (cycle {header['cycle']}, batch "
                    f"{header['batch']}), expected (cycle {cycle.index}, batch {b})"
                )
            if not 1 <= count <= cycle.num_batches - b:
                raise ProtocolError(f"{self._where()}: batch count {count} is invalid at {b}")
            tensors = self._ready(staged)  # shapes were checked on arrival (TensorContract)
            batch_bytes = sum(t.numel() * t.element_size() for t in tensors.values()) // count
            if self._credits.size(batch_bytes):  # before the credits the new window grants
                self._session.bound_queue(self._credits.max_queued)
            if count == 1:
                batches: Any = (tensors,)
            else:  # one split per tensor (views), not one slice per batch and tensor
                names = list(tensors)
                parts = [t.split(bsz) for t in tensors.values()]
                batches = (dict(zip(names, ts, strict=True)) for ts in zip(*parts, strict=True))
            # Progress: a new loss gets a full reconnect_timeout_s.
            self._reconnect.lost_since = None
            for batch in batches:
                b += 1
                self._cursor = (cycle.index, b)
                self._credits.consumed += 1
                self._grant(force=False)
                self.stats.batches += 1
                self.stats.samples += bsz
                self.stats.bytes += batch_bytes
                yield batch
        if not cycle.done:  # next_cycle() may have read the end already
            self._finish_cycle(cycle)

    def _finish_cycle(self, cycle: Cycle) -> None:
        """Take the cycle's end (every batch has been handed out) and release the cycle."""
        kind, header = self._take(f"end of cycle {cycle.index}")
        if kind != P.CYCLE_END:
            raise ProtocolError(f"{self._where()}: expected end of cycle, got {kind}")
        if header["cycle"] != cycle.index or header["batches"] != cycle.num_batches:
            raise ProtocolError(
                f"{self._where()}: end of cycle {header['cycle']} with {header['batches']} "
                f"batches, expected cycle {cycle.index} with {cycle.num_batches}"
            )
        cycle.regen_s = float(header["regen_s"])
        cycle.done = True
        self._end_cycle()

    def _ready(self, staged: Staged) -> dict[str, torch.Tensor]:
        return self._stager.ready(staged)

    def _end_cycle(self) -> None:
        """Release the finished cycle (the original's per-regeneration cleanup)."""
        if not self.cleanup_each_cycle:
            return
        release_cycle_memory(freeze=not self._gc_frozen)
        self._gc_frozen = True
        self.stats.cleanups += 1


__all__ = ["Cycle", "FeedClient", "FeedStats"]
