"""A producer that breaks the protocol on purpose, and the real client that has to survive it.

``python -m tests.rogue_producer ENDPOINT MODE`` binds a raw ROUTER at ENDPOINT, answers each
``hello`` (with a valid ``welcome`` unless MODE attacks the handshake) and then misbehaves the way
MODE says (see :data:`MODES`), again for every new ``hello`` (the client reconnects after a lost
connection), until it is killed. Valid frames come from :func:`lensfeed.common.protocol.encode`,
invalid ones are made by hand, so the rogue does not depend on the checks it is testing.

``python -m tests.rogue_producer --client ENDPOINT [--slow-steps K --step-s S]`` runs the real
:class:`~lensfeed.trainer.client.FeedClient` against it in a process of its own, so its memory is
measured alone, and prints one ``RESULT_PREFIX`` JSON line: how the client ended, how long it took
and how much its resident memory grew (see :func:`run_client`).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import logging
import random
import re
import resource
import sys
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from lensfeed.common import protocol as P
from lensfeed.common.spec import DataSpec
from tests._util import make_spec

#: What each mode does after (or instead of) the welcome.
MODES: dict[str, str] = {
    "credit_overrun": "200 valid 4 MiB batches at once, whatever the credits (~800 MiB)",
    "oversize_frame": "a batch declaring a 4 KiB tensor whose frame is 1 GiB",
    "wrong_names": "a whole cycle whose token tensor is called 'evil', not 'input_ids'",
    "wrong_dtype": "a whole cycle of float32 'input_ids'",
    "wrong_trailing_shape": "a whole cycle of [B, 8] 'input_ids', then [B, 9] from batch 1 on",
    "shape_overflow": "a batch of shapes [0, 2**62, 2**62] and [2**40, 2**40], tiny frames",
    "error_flood": "100,000 non-fatal errors right after the welcome, then a valid cycle",
    "garbage": "random bytes, truncated msgpack, non-map and empty headers",
    "wrong_version": "a welcome with v=2",
    "wrong_fingerprint": "a welcome with another fingerprint",
    "silent": "never answers",
    "huge_ints": "2**64-1 and -2**63 in cycle_start and batch counters",
    "deep_nesting": "headers with a field nested 1000 deep and a 1000-deep 'tensors' list",
    "extra_frames": "a batch with 10,000 tiny frames, then one with one frame too many",
    "wrong_cycle_end": "a valid cycle whose end names another cycle and batch count",
}

#: The client's data spec. 256 batches per cycle: the 200 batches of ``credit_overrun`` are all
#: valid members of the cycle, so only credit accounting can tell that they were not asked for.
SPEC = make_spec(b=4, s=1024)
#: The client's settings; its memory bound follows from ``prefetch_bytes`` + ``max_message_bytes``.
CLIENT_KWARGS: dict[str, Any] = {
    "timeout_s": 5,
    "heartbeat_s": 1,
    "reconnect_timeout_s": 3,
    "max_message_bytes": 64 << 20,
    "prefetch": 8,
    "prefetch_bytes": 32 << 20,
}
RESULT_PREFIX = "ROGUE-CLIENT-RESULT "
#: A correct client gives up within timeout_s + reconnect_timeout_s and change; one still
#: consuming after this many seconds is hung: it dumps its stacks and exits (status 1).
CLIENT_DEADLINE_S = 20.0
#: Time allowed on top of that for close() (at most 5 s for the producer's bye, 1 s linger).
CLOSE_S = 10.0
HANG_MARK = "Timeout ("  # how faulthandler.dump_traceback_later starts its dump

SEQ_LEN = 8
SHARD_ROWS = 1 << 20
OVERRUN_BATCHES = 200
OVERRUN_SEQ_LEN = 1 << 18  # int32 [4, 2**18] = 4 MiB per batch
# This machine has ~24 GiB; the buffer is zero pages that are only ever read, never resident.
OVERSIZE_BYTES = 1 << 30
FLOOD_ERRORS = 100_000
DEEP = 1000  # msgpack's unpacker gives up near 1024 levels: this one gets through it
MANY_FRAMES = 10_000
MAX_LINES = 40
BIG_U64 = 2**64 - 1
SMALL_I64 = -(2**63)

Frames = list[Any]


def nested(depth: int, leaf: Any) -> Any:
    """``leaf`` wrapped in ``depth`` one-element lists."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def tokens(
    first_row: int, rows: int, *, seq_len: int = SEQ_LEN, dtype: type = np.int32
) -> dict[str, np.ndarray]:
    """What a token producer sends: ``input_ids`` [rows, seq_len] then ``sample_idx`` [rows]."""
    idx = np.arange(first_row, first_row + rows, dtype=np.int64)
    ids = idx[:, None] * 1000 + np.arange(seq_len)[None, :]
    return {"input_ids": ids.astype(dtype), "sample_idx": idx}


class Rogue:
    """One ROUTER playing producer for whoever said hello last; see :data:`MODES`."""

    def __init__(self, endpoint: str, mode: str) -> None:
        self.mode = mode
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished peer is an error, not a black hole
        sock.setsockopt(zmq.SNDHWM, 0)
        if endpoint.startswith("ipc://"):
            Path(endpoint[len("ipc://") :]).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock.bind(endpoint)
        self.sock = sock
        self.peer: bytes | None = None
        self.session: int | None = None
        self.spec = SPEC
        self.credits = 0
        self.seq = 0
        self.hellos = 0
        self.lines = 0
        #: Messages waiting for credit: (credits they use, frames).
        self.pending: deque[tuple[int, Frames]] = deque()
        self._big: np.ndarray | None = None
        self._overrun: np.ndarray | None = None

    def say(self, text: str, *, force: bool = False) -> None:
        """Log a line, at most ``MAX_LINES`` of them unless forced: a client in a reconnect storm
        says hello hundreds of times a second, and a full stdout pipe would freeze the rogue."""
        self.lines += 1
        if self.lines <= MAX_LINES or force:
            print(f"rogue[{self.mode}] {text}", flush=True)
        elif self.lines == MAX_LINES + 1:
            print(f"rogue[{self.mode}] (no more lines)", flush=True)

    # ------------------------------------------------------------ sending

    def stamp(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """``fields`` with the session number of the latest hello, as a producer echoes it."""
        out = dict(fields)
        if self.session is not None:
            out[P.SESSION] = self.session
        return out

    def send(self, frames: Frames) -> bool:
        """Send to the current peer without blocking or copying; False once it is gone."""
        if self.peer is None:
            return False
        try:
            self.sock.send_multipart([self.peer, *frames], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            self.say(f"peer gone ({exc}); waiting for the next hello")
            self.peer = None
            self.pending.clear()
            return False

    def reply(
        self, kind: str, fields: Mapping[str, Any], tensors: Mapping[str, np.ndarray] = {}
    ) -> bool:
        return self.send(P.encode(kind, self.stamp(fields), tensors))

    def queue(self, cost: int, frames: Frames) -> None:
        """Send ``frames`` once ``cost`` credits are there (0: at once, in order)."""
        self.pending.append((cost, frames))

    def pump(self) -> None:
        while self.pending and self.pending[0][0] <= self.credits:
            cost, frames = self.pending.popleft()
            self.credits -= cost
            self.send(frames)

    def batch_fields(self, cycle: int, batch: int, count: int = 1) -> dict[str, Any]:
        fields = {"rank": 0, "cycle": cycle, "batch": batch, "count": count, "seq": self.seq}
        self.seq += 1
        return fields

    def batch(self, cycle: int, batch: int, tensors: Mapping[str, np.ndarray]) -> Frames:
        return P.encode(P.BATCH, self.stamp(self.batch_fields(cycle, batch)), tensors)

    def raw_batch(self, cycle: int, batch: int, descr: list[Any], extra: Frames) -> Frames:
        """A batch whose header and frames are made by hand: no check of ``encode`` applies."""
        header = {"v": 1, "kind": P.BATCH, **self.batch_fields(cycle, batch), "tensors": descr}
        return [msgpack.packb(self.stamp(header)), *extra]

    # ------------------------------------------------------------ the session

    def serve(self) -> None:
        """Answer messages until killed. The 1 s poll only bounds how stale ``pump`` can get."""
        self.say(f"bound; {MODES[self.mode]}")
        while True:
            self.pump()
            if not self.sock.poll(1000):
                continue
            peer, *frames = self.sock.recv_multipart()
            try:
                header = msgpack.unpackb(frames[0], raw=False)
            except Exception:
                continue
            if not isinstance(header, dict):
                continue
            kind = header.get("kind")
            if kind == P.HELLO:
                self.on_hello(peer, header)
            elif peer != self.peer:
                continue
            elif kind == P.CREDIT and type(header.get("n")) is int:
                self.credits += header["n"]
            elif kind == P.NEXT_CYCLE:
                self.on_next_cycle(int(header["cycle"]), int(header["batch"]))
            elif kind == P.BYE:
                self.reply(P.BYE, {})
                self.say("bye")
                self.peer = None

    def on_hello(self, peer: bytes, hello: dict[str, Any]) -> None:
        self.hellos += 1
        self.peer = peer
        self.session = hello.get(P.SESSION)
        self.credits = max(0, int(hello.get("credits", 0)))
        self.seq = 0
        self.pending.clear()
        self.spec = DataSpec.from_dict(hello["spec"])
        power_of_ten = self.hellos >= 10 and str(self.hellos).rstrip("0") == "1"
        self.say(
            f"hello #{self.hellos} (session {self.session}, credits {self.credits})",
            force=power_of_ten,
        )
        welcome = {
            "rank": hello["rank"],
            "shard_rows": SHARD_ROWS,
            "shard_offset": 0,
            "fingerprint": hello["fingerprint"],
            "dataset_fingerprint": f"rogue-{self.mode}",
        }
        if self.mode == "silent":
            return
        if self.mode == "wrong_version":
            self.send([msgpack.packb(self.stamp({"v": 2, "kind": P.WELCOME, **welcome}))])
            return
        if self.mode == "wrong_fingerprint":
            other = "0123456789abcdef" if hello["fingerprint"] != "0123456789abcdef" else "f" * 16
            self.reply(P.WELCOME, {**welcome, "fingerprint": other})
            return
        if self.mode == "deep_nesting":
            welcome["nested"] = nested(DEEP, 0)
        self.reply(P.WELCOME, welcome)
        if self.mode == "error_flood":
            self.flood()

    def flood(self) -> None:
        frames = P.encode(
            P.ERROR, self.stamp(P.error_fields("protocol", "rogue error flood", fatal=False))
        )
        for _ in range(FLOOD_ERRORS):
            if not self.send(frames):
                return
        self.say(f"sent {FLOOD_ERRORS} non-fatal errors")

    def on_next_cycle(self, cycle: int, start: int) -> None:
        batches = self.spec.batches_in_cycle(cycle)
        bsz = self.spec.batch_size
        start_fields: dict[str, Any] = {
            "rank": 0,
            "cycle": cycle,
            "batches": batches,
            "start_batch": start,
            "wraps": 0,
            "total_wraps": 0,
            "shard_pos": 0,
            "shard_rows": SHARD_ROWS,
            "prepared_ahead": False,
        }
        mode = self.mode
        if mode == "huge_ints":
            start_fields.update(
                wraps=BIG_U64, total_wraps=SMALL_I64, shard_pos=BIG_U64, shard_rows=SMALL_I64
            )
        if mode == "deep_nesting":
            start_fields["nested"] = nested(DEEP, {"k": 0})
        self.queue(0, P.encode(P.CYCLE_START, self.stamp(start_fields)))
        row = cycle * batches * bsz
        if mode == "credit_overrun":
            self.overrun(cycle, start, batches, row)
        elif mode == "oversize_frame":
            if self._big is None:
                self._big = np.zeros(OVERSIZE_BYTES, dtype=np.uint8)
            descr = [["input_ids", "int32", [bsz, 256]], ["sample_idx", "int64", [bsz]]]
            idx = tokens(row, bsz)["sample_idx"]
            self.queue(1, self.raw_batch(cycle, start, descr, [memoryview(self._big), idx]))
        elif mode == "shape_overflow":
            descr = [
                ["input_ids", "int32", [0, 2**62, 2**62]],
                ["sample_idx", "int64", [2**40] * 2],
            ]
            self.queue(1, self.raw_batch(cycle, start, descr, [b"", bytes(32)]))
        elif mode == "garbage":
            self.garbage(cycle, start)
        elif mode == "huge_ints":
            t = tokens(row + start * bsz, bsz)
            first = self.batch_fields(cycle, start)
            first.update(seq=BIG_U64, rank=SMALL_I64)
            self.queue(1, P.encode(P.BATCH, self.stamp(first), t))
            second = self.batch_fields(cycle, start + 1)
            second.update(count=BIG_U64, seq=SMALL_I64)
            self.queue(
                1, P.encode(P.BATCH, self.stamp(second), tokens(row + (start + 1) * bsz, bsz))
            )
        elif mode == "deep_nesting":
            t = tokens(row + start * bsz, bsz)
            descr = [
                nested(DEEP, ["input_ids", "int32", [bsz, SEQ_LEN]]),
                ["sample_idx", "int64", [bsz]],
            ]
            self.queue(1, self.raw_batch(cycle, start, descr, list(t.values())))
        elif mode == "extra_frames":
            t = tokens(row + start * bsz, bsz)
            descr = [["input_ids", "int32", [bsz, SEQ_LEN]], ["sample_idx", "int64", [bsz]]]
            tiny = [b"x"] * (MANY_FRAMES - len(t))
            self.queue(1, self.raw_batch(cycle, start, descr, [*t.values(), *tiny]))
            t = tokens(row + (start + 1) * bsz, bsz)
            self.queue(1, self.raw_batch(cycle, start + 1, descr, [*t.values(), b"x"]))
        else:  # a whole cycle, one batch per credit: wrong data, or a flood's valid aftermath
            self.whole_cycle(cycle, start, batches, row)
        self.pump()

    def overrun(self, cycle: int, start: int, batches: int, row: int) -> None:
        """Batches the cycle really has, but far more than granted, sent at once: zero-copy views
        of one 4 MiB buffer here, 4 MiB each at the client if it accepts them."""
        bsz = self.spec.batch_size
        if self._overrun is None:
            self._overrun = tokens(0, bsz, seq_len=OVERRUN_SEQ_LEN)["input_ids"]
        self.pump()  # the cycle_start
        last = min(batches, start + OVERRUN_BATCHES)
        for b in range(start, last):
            idx = np.arange(row + b * bsz, row + (b + 1) * bsz, dtype=np.int64)
            if not self.send(self.batch(cycle, b, {"input_ids": self._overrun, "sample_idx": idx})):
                return
        self.say(f"sent batches {start}..{last - 1} on {self.credits} credits")

    def garbage(self, cycle: int, start: int) -> None:
        """Frames no decoder may accept, each its own message."""
        rng = random.Random(0)
        header = msgpack.packb(
            self.stamp({"v": 1, "kind": P.BATCH, **self.batch_fields(cycle, start), "tensors": []})
        )
        for frames in (
            [rng.randbytes(64)],
            [header[: len(header) // 2]],
            [msgpack.packb(["v", 1, "kind", "batch"])],
            [msgpack.packb("batch")],
            [b""],
        ):
            self.queue(0, frames)

    def whole_cycle(self, cycle: int, start: int, batches: int, row: int) -> None:
        bsz = self.spec.batch_size
        for b in range(start, batches):
            t = tokens(row + b * bsz, bsz)
            if self.mode == "wrong_names":
                t = {"evil": t["input_ids"], "sample_idx": t["sample_idx"]}
            elif self.mode == "wrong_dtype":
                t["input_ids"] = t["input_ids"].astype(np.float32)
            elif self.mode == "wrong_trailing_shape" and b > start:
                t = tokens(row + b * bsz, bsz, seq_len=SEQ_LEN + 1)
            self.queue(1, self.batch(cycle, b, t))
        end = {"rank": 0, "cycle": cycle, "batches": batches, "regen_s": 0.0}
        if self.mode == "wrong_cycle_end":
            end.update(cycle=cycle + 7, batches=batches + 1)
        self.queue(0, P.encode(P.CYCLE_END, self.stamp(end)))


# ---------------------------------------------------------------- the client side


class _Counter(logging.Handler):
    """Counts the client's log records instead of printing them: a flood of 100,000 warnings
    must not flood the test's pipe, and the count itself is worth reporting."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = record.getMessage()[:300]


def _status_kib(key: str) -> int:
    """A ``/proc/self/status`` memory figure (kB)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else -1


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so import-time peaks do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_client(endpoint: str, *, slow_steps: int = 0, step_s: float = 0.0) -> dict[str, Any]:
    """Consume one cycle from ``endpoint`` with the real client and say how it ended.

    The first ``slow_steps`` batches each take a training step of ``step_s`` seconds (a model's
    slow first steps). It is workload, not synchronisation: libzmq keeps receiving meanwhile, so
    whatever a producer sends beyond the credits piles up unless the client bounds its queue.

    Memory is VmHWM (peak RSS of this process, reset right before connecting) minus VmRSS at that
    moment. ``ru_maxrss`` is reported too but not used: Linux carries the parent's peak across
    fork + exec into it, so under pytest it starts at the test runner's own size. A client that
    has not ended after ``CLIENT_DEADLINE_S`` (or closed after ``CLOSE_S`` more) prints its
    stacks and exits with status 1 instead.
    """
    from lensfeed.common.errors import LensfeedError
    from lensfeed.trainer.client import FeedClient

    counter = _Counter()
    logger = logging.getLogger("lensfeed")
    logger.addHandler(counter)
    logger.setLevel(logging.WARNING)
    logger.propagate = False

    client = FeedClient(endpoint, rank=0, spec=SPEC, **CLIENT_KWARGS)
    gc.collect()
    peak_reset = _reset_peak_rss()
    baseline_kib = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batches = 0
    seen: list[str] = []
    error: BaseException | None = None
    faulthandler.dump_traceback_later(CLIENT_DEADLINE_S, exit=True)
    t0 = time.monotonic()
    try:
        for cycle in client.cycles(1):
            for batch in cycle:
                batches += 1
                if batches <= slow_steps:
                    time.sleep(step_s)  # the step's compute; nothing waits on it
                sig = ", ".join(f"{k}:{v.dtype}{list(v.shape)}" for k, v in batch.items())
                if sig not in seen and len(seen) < 4:
                    seen.append(sig)
    except Exception as exc:  # every kind is reported; the test judges which are acceptable
        error = exc
    elapsed = time.monotonic() - t0
    faulthandler.dump_traceback_later(CLOSE_S, exit=True)
    close_error = None
    try:
        client.close()
    except Exception as exc:
        close_error = f"{type(exc).__name__}: {exc}"[:500]
    faulthandler.cancel_dump_traceback_later()
    message = str(error) if error is not None else ""
    return {
        "error": type(error).__name__ if error is not None else None,
        "mro": [c.__name__ for c in type(error).__mro__] if error is not None else [],
        "lensfeed": isinstance(error, LensfeedError),
        "message": message[:2000],
        "message_len": len(message),
        "elapsed_s": round(elapsed, 3),
        "baseline_rss_kib": baseline_kib,
        "peak_rss_kib": _status_kib("VmHWM"),
        "peak_reset": peak_reset,
        "ru_maxrss_before_kib": maxrss_before,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "batches": batches,
        "seen": seen,
        "warnings": counter.count,
        "first_warning": counter.first,
        "close_error": close_error,
        "reconnects": client.stats.reconnects,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.rogue_producer", description=__doc__)
    parser.add_argument("endpoint")
    parser.add_argument("mode", nargs="?", choices=sorted(MODES), help="rogue producer mode")
    parser.add_argument("--client", action="store_true", help="run the real client instead")
    parser.add_argument("--slow-steps", type=int, default=0, help="client: slow first batches")
    parser.add_argument("--step-s", type=float, default=0.0, help="client: seconds per slow step")
    args = parser.parse_args(argv)
    if args.client:
        res = run_client(args.endpoint, slow_steps=args.slow_steps, step_s=args.step_s)
        print(RESULT_PREFIX + json.dumps(res), flush=True)
    elif args.mode is None:
        parser.error("a rogue producer needs a MODE")
    else:
        Rogue(args.endpoint, args.mode).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
