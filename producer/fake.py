"""A fake producer: the real protocol and server, synthetic deterministic batches, no dataset.

Use it to test a training loop without data (in-process, as a context manager)::

    spec = DataSpec.from_config(cfg)
    with FakeProducer("tcp://127.0.0.1:5555", spec=spec, rank=0) as fake:
        feed = FeedClient(fake.endpoint, rank=0, spec=spec)
        ...

or as a process: ``lensfeed fake-produce --config conf/demo.yaml --rank 0``. Knobs inject a
failure at cycle *k* (as the real producer reports an empty shard or a transform error) or a
delay per batch (a slow producer).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import zmq

from lensfeed.common.config import FeedConfig, add_config_arguments, load_config
from lensfeed.common.env import env_rank
from lensfeed.common.errors import LensfeedError
from lensfeed.common.logs import setup_logging
from lensfeed.common.spec import DataSpec
from lensfeed.producer.cycle import CycleCursor, CycleInfo
from lensfeed.producer.listener import Listener
from lensfeed.producer.server import ProducerServer
from lensfeed.producer.source import Batch, Chunk

log = logging.getLogger("lensfeed.producer")

#: name -> (dtype, per-sample shape). Integer tensors are drawn in [0, vocab_size).
TensorSpec = Mapping[str, tuple[str, tuple[int, ...]]]


class InjectedError(LensfeedError):
    """The failure a :class:`FakeSource` was told to raise."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeSource:
    """Synthetic batches whose ``sample_idx`` follow the real cursor (wraps, shuffle and all)."""

    def __init__(
        self,
        spec: DataSpec,
        *,
        rank: int = 0,
        tensors: TensorSpec | None = None,
        shard_rows: int = 1000,
        vocab_size: int = 256,
        error_at_cycle: int | None = None,
        error_code: str = "empty_shard",
        error_message: str = "",
        delay_s: float = 0.0,
    ) -> None:
        self.spec = spec
        self.rank = rank
        self.tensors = dict(tensors or {"input_ids": ("int32", (32,))})
        self.shard_rows = shard_rows
        self.shard_offset = rank * shard_rows
        self.dataset_fingerprint = f"fake-{shard_rows}"
        self.vocab_size = vocab_size
        self.error_at_cycle = error_at_cycle
        self.error_code = error_code
        self.error_message = error_message or (
            f"fake producer rank {rank}: injected error at cycle {error_at_cycle}"
        )
        self.delay_s = delay_s
        self.cursor = CycleCursor(spec, rank=rank, shard_rows=shard_rows)

    def cycle_info(self, cycle: int) -> CycleInfo:
        return self.cursor.info(cycle)

    def make_batch(self, cycle: int, batch: int) -> Batch:
        """Batch (cycle, batch): a pure function of (spec, rank, cycle, batch)."""
        rows = self.cursor.batch_rows(cycle, batch)
        rng = np.random.default_rng([self.spec.seed, self.rank, cycle, batch])
        n = len(rows)
        out: Batch = {}
        for name, (dtype, shape) in self.tensors.items():
            dt = np.dtype(dtype)
            if dt.kind in "iu":
                out[name] = rng.integers(0, self.vocab_size, size=(n, *shape)).astype(dt)
            else:
                out[name] = rng.standard_normal((n, *shape), dtype=np.float32).astype(dt)
        out["sample_idx"] = rows.astype(np.int64) + self.shard_offset
        return out

    def iter_batches(self, cycle: int, start: int) -> Iterator[Batch]:
        if self.error_at_cycle is not None and cycle >= self.error_at_cycle:
            raise InjectedError(self.error_code, self.error_message)
        for b in range(start, self.cycle_info(cycle).batches):
            if self.delay_s:
                time.sleep(self.delay_s)  # simulated regeneration cost
            yield self.make_batch(cycle, b)

    def iter_chunks(self, cycle: int, start: int, max_batches: int) -> Iterator[Chunk]:
        """One batch per chunk (the server packs them into messages)."""
        for batch in self.iter_batches(cycle, start):
            yield 1, batch

    def end_cycle(self, cycle: int) -> None:
        pass

    def close(self) -> None:
        pass


class FakeProducer:
    """Runs a :class:`FakeSource` behind the real server in a background thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        spec: DataSpec,
        rank: int = 0,
        feed: FeedConfig | None = None,
        **source_kwargs: object,
    ) -> None:
        self.endpoint = endpoint
        self.source = FakeSource(spec, rank=rank, **source_kwargs)  # type: ignore[arg-type]
        self.feed = feed or FeedConfig(exit_on_bye=False)
        self._ctx = zmq.Context()
        self._listener = Listener(self._ctx, endpoint, self.feed)
        self._sock = self._listener.sock
        if endpoint.endswith(":0") or endpoint.endswith(":*"):
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.server = ProducerServer(self.source, sock=self._sock, feed=self.feed)
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name="fake-producer", daemon=True)

    def _run(self) -> None:
        self.exit_code = self.server.serve()

    def start(self) -> FakeProducer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("fake producer did not stop")
        self._listener.close(linger_ms=0)
        self._ctx.term()

    def __enter__(self) -> FakeProducer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tensor_arg(text: str) -> tuple[str, tuple[str, tuple[int, ...]]]:
    """``name:dtype:d1xd2`` -> (name, (dtype, shape))."""
    try:
        name, dtype, dims = text.split(":")
        shape = tuple(int(d) for d in dims.split("x") if d)
        np.dtype(dtype)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"--tensor must look like name:dtype:DIMxDIM (got {text!r})"
        ) from None
    return name, (dtype, shape)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lensfeed fake-produce",
        description="Serve synthetic, deterministic batches over the lensfeed protocol "
        "(no dataset). Shapes come from the config's fake.* keys unless --tensor is given.",
    )
    add_config_arguments(p, example="fake.seq_len=128 batch_size=64")
    p.add_argument("--rank", type=int, default=None, help="rank (default $RANK or 0)")
    p.add_argument(
        "--tensor",
        action="append",
        type=tensor_arg,
        default=[],
        help="tensor to serve as name:dtype:shape, e.g. A:float32:2304 (repeatable)",
    )
    p.add_argument("--error-at-cycle", type=int, default=None, help="fail when cycle K starts")
    p.add_argument("--error-code", default="empty_shard", help="code of the injected error")
    p.add_argument("--delay-s", type=float, default=0.0, help="seconds to sleep per batch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rank = args.rank if args.rank is not None else env_rank(0)
    setup_logging("fake-producer", rank=rank)
    try:
        cfg = load_config(args.config, args.overrides)
        spec = DataSpec.from_config(cfg)
        tensors = dict(args.tensor) or {"input_ids": ("int32", (cfg.fake.seq_len,))}
        source = FakeSource(
            spec,
            rank=rank,
            tensors=tensors,
            shard_rows=cfg.fake.shard_rows,
            vocab_size=cfg.fake.vocab_size,
            error_at_cycle=args.error_at_cycle,
            error_code=args.error_code,
            delay_s=args.delay_s,
        )
        ctx = zmq.Context()
        listener = Listener(ctx, cfg.bind_for(rank), cfg.feed)
        log.info("fake producer rank %d on %s: %s", rank, cfg.bind_for(rank), tensors)
        try:
            return ProducerServer(source, sock=listener.sock, feed=cfg.feed).serve()
        finally:
            listener.close(linger_ms=2000)
            ctx.term()
    except LensfeedError as exc:
        log.error("%s", exc)
        return 1


__all__ = ["FakeProducer", "FakeSource", "InjectedError", "main", "parser"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
