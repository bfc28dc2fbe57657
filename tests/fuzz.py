"""Seeded protocol fuzzer that attacks a real ``python -m lensfeed.producer`` process.

Garbage on the wire must never take a producer down, grow its memory or its log without bound,
or stop it serving its trainer: the producer trusts nothing it receives (docs/protocol.md 3.1,
5). This module generates hostile messages from a ``random.Random(seed)`` (mutated messages of
every kind, wrong types, huge ints, deep nesting, oversized strings, broken msgpack, odd
framing, floods from many peers), sends them from several DEALERs in three protocol states
(``idle``: no session; ``session``: a trainer said hello and sends bad messages itself;
``streaming``: a FeedClient is receiving batches meanwhile), and after each state checks that
the process is alive, its RSS and log grew within bounds and a fresh FeedClient still gets a
full cycle whose bytes match the dataset (docs/protocol.md 8, computed here independently).

Nothing waits unboundedly: every receive polls with a timeout, an answer to a bad message is
never waited for (the producer may rate-limit them), and the producer is killed at the end.

    python -m tests.fuzz --messages 100000 --seed 0 [--states idle,session,streaming]

``tests/producer/test_fuzz.py`` runs a short version in CI.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import zmq

from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.spec import DataSpec
from tests._util import REPO, child_env, make_dataset, python_cmd

if TYPE_CHECKING:
    from lensfeed.trainer.client import FeedClient

STATES = ("idle", "session", "streaming")
ROWS = 37  # dataset rows: the 64-sample cycles wrap the shard
SEQ_LEN = 8
MAX_SESSION = (1 << 32) - 1

#: msgpack-encodable ints that break fixed-width code: beyond int64/C long, at the edges, < 0.
HUGE_INTS = (
    2**63,
    2**64 - 1,
    -(2**63),
    2**63 - 1,
    2**62,
    2**58,
    2**53 + 1,
    10**18,
    2**32,
    2**31,
    -(2**31) - 1,
    -(2**40),
    -1,
)
#: Values of every other msgpack type, for fields that want an int, str, map or bool.
ODD_VALUES: tuple[Any, ...] = (
    1.0,
    7.0,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    5e-324,
    True,
    False,
    None,
    "1",
    "",
    "hello",
    b"\x01",
    [],
    [1],
    {},
    {"n": 1},
)
DEPTHS = (64, 600, 1000, 1023, 1024, 1025, 5000, 60000)


# --------------------------------------------------------------------------- msgpack pieces


@dataclass(frozen=True)
class Raw:
    """Pre-encoded msgpack spliced into a header: what msgpack.packb refuses to build
    (nesting past its recursion limit, ext, bin keys, float32, lying lengths)."""

    data: bytes
    #: whether a conforming decoder accepts it as an (ignored) extra value; None: the docs
    #: leave it open (nesting deeper than msgpack's default limit of 1024)
    valid: bool | None = False


_PLACEHOLDER = "\x00raw{}\x00"


def pack(obj: Any) -> bytes:
    """msgpack of ``obj`` with every :class:`Raw` (as a value or a map key) spliced in."""
    raws: list[bytes] = []

    def sub(x: Any) -> Any:
        if isinstance(x, Raw):
            raws.append(x.data)
            return _PLACEHOLDER.format(len(raws) - 1)
        if isinstance(x, dict):
            return {sub(k): sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        return x

    out = msgpack.packb(sub(obj), use_bin_type=True)
    for i, data in enumerate(raws):
        out = out.replace(msgpack.packb(_PLACEHOLDER.format(i)), data, 1)
    return out


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return b"\xde" + n.to_bytes(2, "big") if n <= 0xFFFF else b"\xdf" + n.to_bytes(4, "big")


def pack_pairs(pairs: Sequence[tuple[Any, Any]]) -> bytes:
    """A map from key/value pairs as given: duplicate keys stay duplicated."""
    return map_header(len(pairs)) + b"".join(pack(k) + pack(v) for k, v in pairs)


def deep(shape: str, depth: int) -> Raw:
    """``depth`` nested one-element lists/maps around ``1``; msgpack decodes up to 1024."""
    level = {"list": b"\x91", "map": b"\x81\xa1k", "mixed": b"\x91\x81\xa1k"}[shape]
    reps = depth // 2 if shape == "mixed" else depth
    return Raw(level * reps + b"\x01", valid=True if depth <= 1000 else None)


def wide_array(n: int) -> Raw:
    return Raw(b"\xdd" + n.to_bytes(4, "big") + b"\xc0" * n, valid=n <= 4096)


def wide_map(n: int) -> Raw:
    return Raw(map_header(n) + b"".join(pack(f"k{i}") + b"\xc0" for i in range(n)), n <= 256)


#: Encodings a conforming header never contains (bin, ext, float32, broken UTF-8, lying lengths).
ODD_RAWS = (
    Raw(b"\xc4\x03abc"),  # bin
    Raw(b"\xd4\x01\x00"),  # fixext 1
    Raw(b"\xd6\xff\x00\x00\x00\x00"),  # timestamp ext
    Raw(b"\xca" + struct.pack(">f", math.nan), valid=True),  # float32 NaN
    Raw(b"\xca" + struct.pack(">f", 4.0), valid=True),  # float32 where an int is wanted
    Raw(b"\xa3\xff\xfe\xfd"),  # str that is not UTF-8
    Raw(b"\xc1"),  # never-used type byte
    Raw(b"\xdd\xff\xff\xff\xff"),  # array32 of 2**32-1 entries, none present
    Raw(b"\xdf\xff\xff\xff\xff"),  # map32 likewise
    Raw(b"\xdb\xff\xff\xff\xffab"),  # str32 of 4 GiB, two bytes present
)


# --------------------------------------------------------------------------- generator


@dataclass
class Case:
    """One attack message: ``label`` is its class (``family:detail``), for the report."""

    label: str
    frames: list[bytes]
    #: the session number it carries (answers echo it), if any
    session: int | None = None
    #: a hello that a conforming producer accepts (docs/protocol.md 6.1); None: undecided
    valid_hello: bool | None = False


INT_FIELDS = {
    "hello": ("rank", "world_size", "cycle", "batch", "credits"),
    "next_cycle": ("cycle", "batch"),
    "credit": ("n",),
}
WRONG_WAY = ("welcome", "cycle_start", "batch", "cycle_end", "error")


class Generator:
    """Hostile messages for one producer, reproducible from ``rng``.

    With ``must_refuse`` every hello is made certain to be refused (a wrong fingerprint, or an
    invalid cursor when the cursor is what is being fuzzed), so no attacker can take the
    session over: the states that must keep their session (``idle``, ``streaming``) use it.
    """

    def __init__(
        self,
        rng: random.Random,
        spec: DataSpec,
        *,
        must_refuse: bool,
        only: re.Pattern[str] | None = None,
        skip: re.Pattern[str] | None = None,
    ) -> None:
        self.rng = rng
        self.only, self.skip = only, skip
        self.spec = spec.to_dict()
        self.spec["columns"] = list(self.spec["columns"])
        self.fp = spec.fingerprint()
        self.world_size = spec.world_size
        self._batches = (spec.batches_in_cycle(0), spec.batches_in_cycle(1))
        self.must_refuse = must_refuse
        self.session = rng.randrange(1 << 20, 1 << 30)
        self.families: list[tuple[Callable[[], Case], int]] = [
            (lambda: self._kind_case("hello"), 26),
            (lambda: self._kind_case("next_cycle"), 12),
            (lambda: self._kind_case("credit"), 10),
            (lambda: self._kind_case("bye"), 4),
            (lambda: self._kind_case(self.rng.choice(WRONG_WAY)), 8),
            (self._garbage, 12),
            (self._non_map, 5),
            (self._version, 5),
            (self._kind_field, 5),
            (self._session_field, 4),
            (self._framing, 6),
            (self._keys, 3),
        ]

    # ---------------------------------------------------------------- valid templates

    def batches(self, cycle: int) -> int:
        return self._batches[0 if cycle == 0 else 1]

    def next_session(self) -> int:
        self.session = (self.session + 1) & 0x7FFFFFFF
        return self.session

    def cursor(self) -> tuple[int, int]:
        cycle = self.rng.choice((0, 0, 1, 2, 7))
        return cycle, self.rng.randrange(self.batches(cycle))

    def template(self, kind: str) -> tuple[dict[str, Any], list[bytes]]:
        """A well-formed header of ``kind`` (with a fresh session) and its tensor frames."""
        h: dict[str, Any] = {"v": 1, "kind": kind, "session": self.next_session()}
        frames: list[bytes] = []
        cycle, batch = self.cursor()
        if kind == "hello":
            h.update(rank=0, world_size=self.world_size, spec=dict(self.spec))
            h["spec"]["columns"] = list(self.spec["columns"])
            h.update(fingerprint=self.fp, cycle=cycle, batch=batch)
            h["credits"] = self.rng.choice((0, 1, 4, 16, 1000))
        elif kind == "next_cycle":
            h.update(cycle=cycle, batch=batch)
        elif kind == "credit":
            h["n"] = self.rng.choice((0, 1, 2, 8))
        elif kind == "welcome":
            h.update(rank=0, shard_rows=ROWS, shard_offset=0, fingerprint=self.fp)
            h["dataset_fingerprint"] = "0123456789abcdef"
        elif kind == "cycle_start":
            h.update(rank=0, cycle=cycle, batches=self.batches(cycle), start_batch=batch)
            h.update(wraps=1, total_wraps=1, shard_pos=0, shard_rows=ROWS, prepared_ahead=False)
        elif kind == "cycle_end":
            h.update(rank=0, cycle=cycle, batches=self.batches(cycle), regen_s=0.01)
        elif kind == "error":
            h.update(code="protocol", message="from a trainer?", fatal=False)
        elif kind == "batch":
            h.update(rank=0, cycle=cycle, batch=batch, count=1, seq=0)
            h["tensors"] = [["input_ids", "int32", [4, SEQ_LEN]], ["sample_idx", "int64", [4]]]
            frames = [bytes(4 * SEQ_LEN * 4), bytes(4 * 8)]
        return h, frames

    # ---------------------------------------------------------------- helpers

    def _case(
        self, label: str, header: Any, extra: Sequence[bytes] = (), *, touched: str = ""
    ) -> Case:
        """Pack ``header``; a hello is checked against the oracle and poisoned if need be."""
        valid = self.poison(header, touched)
        session = header.get("session") if isinstance(header, dict) else None
        return Case(label, [pack(header), *extra], session if type(session) is int else None, valid)

    def poison(self, header: Any, touched: str = "") -> bool | None:
        """Whether ``header`` is an acceptable hello; with ``must_refuse`` one that could be
        accepted is made unacceptable in a field other than the one being fuzzed (``touched``):
        an invalid cursor when the cursor is fuzzed, else a wrong fingerprint."""
        if not (isinstance(header, dict) and header.get("kind") == "hello"):
            return False
        valid = self.valid_hello(header)
        if self.must_refuse and header.get("fingerprint") == self.fp:
            if touched == "cycle":
                header["batch"] = -1
            elif touched == "batch":
                header["cycle"] = -1
            else:
                header["fingerprint"] = "f" * 16
            return False
        return valid

    def valid_hello(self, h: Mapping[Any, Any]) -> bool | None:
        """Whether a conforming producer accepts ``h`` (docs/protocol.md 3.1, 4.1, 6.1, 7)."""

        def is_int(x: Any) -> bool:
            return type(x) is int

        if any(type(k) is not str for k in h) or h.get("v") != 1 or not is_int(h.get("v")):
            return False
        if not all(is_int(h.get(f)) for f in INT_FIELDS["hello"]):
            return False
        if "session" in h and not (is_int(h["session"]) and 0 <= h["session"] <= MAX_SESSION):
            return False
        spec = h.get("spec")
        if type(spec) is not dict or set(spec) != set(self.spec):
            return False
        for key, ours in self.spec.items():
            theirs = spec[key]
            if type(theirs) is not type(ours) or theirs != ours:
                return False
            if key == "columns" and not all(type(c) is str for c in theirs):
                return False
        if type(h.get("fingerprint")) is not str or h["fingerprint"] != self.fp:
            return False
        if h["rank"] != 0 or h["world_size"] != self.world_size:
            return False
        if not (h["cycle"] >= 0 and 0 <= h["batch"] < self.batches(h["cycle"])):
            return False
        extras = [_plain(v) for k, v in h.items() if k not in INT_FIELDS["hello"]]
        return False if False in extras else None if None in extras else True

    def odd_value(self) -> tuple[Any, str]:
        """A value of the wrong type or size for almost any field, and its class."""
        r = self.rng.random()
        if r < 0.35:
            v = self.rng.choice(HUGE_INTS)
        elif r < 0.75:
            v = self.rng.choice(ODD_VALUES)
        elif r < 0.9:
            return self.deep_value()
        else:
            v = self.rng.choice(ODD_RAWS)
        return v, _describe(v)

    def deep_value(self) -> tuple[Raw, str]:
        shape, depth = self.rng.choice(("list", "map", "mixed")), self.rng.choice(DEPTHS)
        return deep(shape, depth), f"deep-{shape}-{depth}"

    def big_string(self) -> tuple[str, str]:
        n = self.rng.choice((4096, 60000, 70000))
        if self.rng.random() < 0.3:
            return "\u00e9" * (n // 2), f"big-utf8-{n}"
        return "A" * n, f"big-str-{n}"

    # ---------------------------------------------------------------- families

    def case(self) -> Case:
        """The next hostile message."""
        return self.family()()

    def family(self) -> Callable[[], Case]:
        """A maker of messages of one family, for a flood of one kind of message; with
        ``only``/``skip``, of any family whose messages match."""
        families = [f for f, _ in self.families]
        weights = [w for _, w in self.families]
        if self.only is None and self.skip is None:
            return self.rng.choices(families, weights)[0]

        def make() -> Case:
            for _ in range(10000):
                c = self.rng.choices(families, weights)[0]()
                if (self.only is None or self.only.search(c.label)) and not (
                    self.skip and self.skip.search(c.label)
                ):
                    return c
            raise ValueError("no message class matches --only/--skip")

        return make

    def _kind_case(self, kind: str) -> Case:
        """A message of ``kind`` with one mutation (or none: valid messages belong too)."""
        h, frames = self.template(kind)
        fields = [k for k in h if k not in ("v", "kind", "session")]
        ops = {"valid": 8, "int": 25, "odd": 25, "missing": 8, "extra": 8, "big": 8, "deep": 18}
        if kind not in INT_FIELDS:
            ops["int"] = 0
        if kind == "hello":
            ops["spec"] = 40
        if kind == "batch":
            ops["tensors"] = 25
        if not fields:
            ops = {"valid": 1, "extra": 1}
        op = self.rng.choices(list(ops), list(ops.values()))[0]
        name = self.rng.choice(INT_FIELDS[kind] if op == "int" else fields or ["-"])
        if op == "valid":
            return self._case(f"{kind}:valid", h, frames)
        if op == "spec":
            return self._spec_case(h)
        if op == "tensors":
            return self._bad_tensors(h, frames)
        if op == "extra":
            for i in range(self.rng.choice((1, 3, 40))):
                h[f"x{i}_{self.rng.randrange(1000)}"] = self.odd_value()[0]
            return self._case(f"{kind}:extra-keys", h, frames)
        if op == "missing":
            del h[name]
            return self._case(f"{kind}.{name}:missing", h, frames, touched=name)
        if op == "int":
            h[name] = v = self.rng.choice(HUGE_INTS)
            return self._case(f"{kind}.{name}:{_int_class(v)}", h, frames, touched=name)
        if op == "big":
            h[name], what = self.big_string()
        elif op == "deep":
            h[name], what = self.deep_value()
        else:
            h[name], what = self.odd_value()
        return self._case(f"{kind}.{name}:{what}", h, frames, touched=name)

    def _spec_case(self, h: dict[str, Any]) -> Case:
        """A hello whose data spec is broken (docs/protocol.md 7: exactly 10 typed keys)."""
        spec = h["spec"]
        key = self.rng.choice(list(spec))
        r = self.rng.random()
        if r < 0.3:
            wrong: list[tuple[str, Any]] = [
                ("shuffle", 1),
                ("shuffle", 0),
                ("shuffle", "true"),
                ("seed", float(spec["seed"])),
                ("seed", 7.0),
                ("seed", 2**64 - 1),
                ("seed", -1),
                ("columns", "input_ids"),
                ("columns", [1]),
                ("columns", [["input_ids"]]),
                ("columns", []),
                ("columns", ["input_ids"] * 4096),
                ("batch_size", float(spec["batch_size"])),
                ("batch_size", "4"),
                ("batch_size", True),
                ("batch_size", 0),
                ("dataset", 5),
                ("dataset", None),
                ("world_size", 2**64 - 1),
                ("cycle_size", -(2**63)),
                ("initial_cycle_size", math.nan),
                ("builder", ["tokens"]),
                ("builder_args", {}),
            ]
            key, value = self.rng.choice(wrong)
            spec[key] = value
            label = f"hello.spec.{key}:{_describe(value)}"
        elif r < 0.55:
            spec[key], what = self.deep_value()
            label = f"hello.spec.{key}:{what}"
        elif r < 0.62:
            spec[f"extra{self.rng.randrange(100)}"] = self.odd_value()[0]
            label = "hello.spec:extra-key"
        elif r < 0.69:
            del spec[key]
            label = f"hello.spec.{key}:missing"
        elif r < 0.76:
            spec[key], what = self.big_string()
            label = f"hello.spec.{key}:{what}"
        elif r < 0.82:
            spec[self.rng.choice((1, -1, 2**64 - 1, Raw(b"\xc4\x01k"), Raw(b"\xc0")))] = 1
            label = "hello.spec:non-str-key"
        else:
            options: list[tuple[str, Any]] = [
                ("string", "dataset=data/demo"),
                ("list", list(spec.values())),
                ("int", 10),
                ("nil", None),
                ("empty", {}),
                ("deep-map-600", deep("map", 600)),
                ("deep-list-1000", deep("list", 1000)),
                ("wide-256", wide_map(256)),
                ("wide-257", wide_map(257)),
            ]
            what, h["spec"] = self.rng.choice(options)
            label = f"hello.spec:{what}"
        return self._case(label, h, touched="spec")

    def _bad_tensors(self, h: dict[str, Any], frames: list[bytes]) -> Case:
        """A (wrong-way) batch whose descriptors and frames disagree or overflow."""
        options: list[tuple[str, Any, list[bytes]]] = [
            ("frames-short", h["tensors"], frames[:1]),
            ("frames-long", h["tensors"], [*frames, b"x"]),
            ("size-mismatch", h["tensors"], [b"\x00" * 3, frames[1]]),
            ("huge-shape", [["a", "int64", [2**64 - 1] * 8]], [b""]),
            ("shape-ndim-9", [["a", "uint8", [1] * 9]], [b"\x00"]),
            ("negative-dim", [["a", "uint8", [-1]]], [b""]),
            ("bad-dtype", [["a", "complex64", [1]]], [b"\x00" * 8]),
            ("dup-names", [["a", "uint8", [1]], ["a", "uint8", [1]]], [b"\x00", b"\x00"]),
            ("65-tensors", [[f"t{i}", "uint8", [0]] for i in range(65)], [b""] * 65),
            ("descr-not-list", ["input_ids"], [b""]),
            ("tensors-string", "input_ids", frames),
        ]
        what, h["tensors"], extra = self.rng.choice(options)
        return self._case(f"batch.tensors:{what}", h, extra)

    def _garbage(self) -> Case:
        """Bytes that are not one msgpack map: random, cut short, bit-flipped, lying."""
        h, _ = self.template(self.rng.choice(("hello", "credit", "next_cycle")))
        good = self._case("", h).frames[0]
        r = self.rng.random()
        if r < 0.25:
            n = self.rng.choice((0, 1, 2, 7, 64, 300, 4000, 70000))
            return Case(f"garbage:random-{n}", [self.rng.randbytes(n)])
        if r < 0.5:
            return Case("garbage:truncated", [good[: self.rng.randrange(1, len(good))]])
        if r < 0.7:
            data = bytearray(good)
            for _ in range(self.rng.choice((1, 2, 4))):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            return Case("garbage:bit-flip", [bytes(data)])
        if r < 0.8:
            return Case("garbage:trailing-bytes", [good + self.rng.randbytes(3)])
        raw = self.rng.choice(ODD_RAWS)
        return Case(f"garbage:raw-{raw.data[:1].hex()}", [raw.data])

    def _non_map(self) -> Case:
        """A header that is valid msgpack but not a map (docs/protocol.md 3.1)."""
        h, _ = self.template("credit")
        options: list[tuple[str, Any]] = [
            ("list", list(h.items())),
            ("list-of-headers", [h, h]),
            ("int", 1),
            ("huge-int", 2**64 - 1),
            ("str", "hello"),
            ("nil", None),
            ("bool", True),
            ("float", math.nan),
            ("bin", b"\x81\xa1v\x01"),
            ("ext", Raw(b"\xd4\x01\x00")),
            ("deep-list-1024", deep("list", 1024)),
            ("wide-array-4096", wide_array(4096)),
        ]
        what, value = self.rng.choice(options)
        return Case(f"non-map:{what}", [pack(value)])

    def _version(self) -> Case:
        h, frames = self.template(self.rng.choice(("hello", "credit", "next_cycle", "bye")))
        v = self.rng.choice((0, 2, 999, -1, 2**64 - 1, "1", 1.0, True, None, [1], "missing"))
        if v == "missing":
            del h["v"]
            return self._case("version:missing", h, frames)
        if self.rng.random() < 0.15:
            h["v"], what = self.deep_value()
            return self._case(f"version:{what}", h, frames)
        h["v"] = v
        return self._case(f"version:{_describe(v)}", h, frames)

    def _kind_field(self) -> Case:
        h, _ = self.template("credit")
        big = "k" * 60000
        kind = self.rng.choice(("", "HELLO", "hello ", "credits", 0, 1.5, None, [], ["hello"], big))
        h["kind"] = kind
        if self.rng.random() < 0.3:
            h["kind"], what = self.deep_value()
            return self._case(f"kind:{what}", h)
        if self.rng.random() < 0.2:
            h["kind"] = {"hello": 1}  # unhashable: a set lookup raises TypeError
            return self._case("kind:map", h)
        return self._case(f"kind:{_describe(kind)}", h)

    def _session_field(self) -> Case:
        h, frames = self.template(self.rng.choice(("hello", "credit", "next_cycle", "bye")))
        s = self.rng.choice((-1, MAX_SESSION + 1, 2**64 - 1, -(2**63), "1", True, 1.5, [], None))
        what = _describe(s)
        if self.rng.random() < 0.15:
            s, what = self.deep_value()
        h["session"] = s
        return self._case(f"session:{what}", h, frames, touched="session")

    def _framing(self) -> Case:
        """Valid or empty headers with frames that should not be there, or none at all."""
        kind = self.rng.choice(("credit", "next_cycle", "bye", "hello", "welcome"))
        h, _ = self.template(kind)
        good = self._case("", h).frames[0]
        r = self.rng.random()
        if r < 0.3:
            extra = [self.rng.randbytes(self.rng.choice((0, 1, 100))) for _ in range(3)]
            return Case(f"frames:{kind}+extra", [good, *extra[: self.rng.randint(1, 3)]])
        if r < 0.45:
            n = self.rng.choice((100, 1000))
            return Case(f"frames:{kind}+{n}-frames", [good] + [b"x"] * n)
        if r < 0.6:
            return Case("frames:empty", [b""])
        if r < 0.75:
            return Case("frames:empty-x3", [b"", b"", b""])
        if r < 0.9:
            return Case(f"frames:empty+{kind}", [b"", good])
        return Case(
            "frames:oversized-header", [pack({"v": 1, "kind": "credit", "pad": "A" * 70000})]
        )

    def _keys(self) -> Case:
        """Maps with non-string or duplicated keys (docs/protocol.md 3.1: string keys)."""
        h, _ = self.template(self.rng.choice(("credit", "hello", "next_cycle")))
        r = self.rng.random()
        if r < 0.3:
            h[self.rng.choice((1, -1, 2**64 - 1, Raw(b"\xc4\x01k"), Raw(b"\xc0")))] = 1
            return self._case("keys:non-str-key", h)
        if r < 0.5:
            h["nested"] = Raw(b"\x81\x01\x01")
            return self._case("keys:nested-int-key", h)
        # Duplicates: the first copy holds the odd value, the last the template's (msgpack
        # keeps the last), unless a wrong version follows. The docs do not forbid duplicates.
        valid = self.poison(h)
        pairs = list(h.items())
        key = self.rng.choice([k for k in h if k != "session"])
        pairs.insert(0, (key, self.odd_value()[0]))
        if self.rng.random() < 0.5:
            pairs.append(("v", 2))
            valid = False
        return Case(f"keys:duplicate-{key}", [pack_pairs(pairs)], h["session"], valid)


def _plain(x: Any) -> bool | None:
    """Whether a conforming decoder accepts a value: no bin, ext, broken Raw, non-str key
    (None: the docs leave it open)."""
    if isinstance(x, Raw):
        return x.valid
    if isinstance(x, bytes):
        return False
    if isinstance(x, dict):
        if any(type(k) is not str for k in x):
            return False
        x = list(x.values())
    if isinstance(x, list):
        parts = [_plain(v) for v in x]
        return False if False in parts else None if None in parts else True
    return True


def _int_class(v: int) -> str:
    if v >= 2**63:
        return "beyond-int64"
    if v == -(2**63):
        return "int64-min"
    if v < -(2**31):
        return "below-int32"
    if v < 0:
        return "negative-int"
    return "beyond-int32" if v >= 2**31 else f"int-{v}"


def _describe(v: Any) -> str:
    """A short class name for a value, used in labels."""
    if isinstance(v, Raw):
        return f"raw-{v.data[:1].hex()}"
    if isinstance(v, bool):
        return f"bool-{str(v).lower()}"
    if isinstance(v, int):
        return _int_class(v)
    if isinstance(v, float):
        return f"float-{v}"
    if isinstance(v, str):
        return f"str-{len(v)}" if len(v) > 12 or not v.isprintable() else f"str-{v!r}"
    if isinstance(v, bytes):
        return "bin"
    if v is None:
        return "nil"
    return f"{type(v).__name__}-{len(v)}"


# --------------------------------------------------------------------------- oracle


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


# --------------------------------------------------------------------------- processes


class ProducerProcess:
    """A real producer (its own process group), output to a log file; killed by :meth:`kill`."""

    def __init__(self, overrides: Sequence[str], workdir: Path) -> None:
        self.overrides = list(overrides)
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self._scanned = 0

    def start(self) -> None:
        self.kill()
        log_path = self.workdir / f"producer-{len(self.logs)}.log"
        self.logs.append(log_path)
        self._scanned = 0
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                python_cmd("lensfeed.producer", "--rank", "0", *self.overrides),
                cwd=REPO,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """The exit status, waiting up to ``wait_s`` for it (None if still running)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=wait_s) if wait_s > 0 else self.proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes; (0, 0) once the process is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except (OSError, AssertionError):
            return 0, 0
        kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
        return int(kb.get("VmRSS", 0)) * 1024, int(kb.get("VmHWM", 0)) * 1024

    def thread_states(self) -> str:
        """``name:state`` of each thread (R running, S sleeping, ...), for a hang report."""
        out = []
        for task in sorted(Path(f"/proc/{self.pid}/task").glob("*")):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
            out.append(f"{name}:{rest[0]}")
        return " ".join(out)

    def cpu_s(self) -> float:
        """CPU seconds the process has used (user + system); 0 once it is gone."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AssertionError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_bytes(self) -> int:
        """Bytes logged by every producer started so far."""
        return sum(p.stat().st_size for p in self.logs if p.exists())

    def new_traceback(self) -> bool:
        """Whether a traceback was logged since the last call: the first sign of a crash,
        seconds before the process has closed its socket and exited."""
        if not self.logs or not self.logs[-1].exists():
            return False
        with open(self.logs[-1], "rb") as f:
            f.seek(max(0, self._scanned - 64))
            chunk = f.read()
        self._scanned = max(0, self._scanned - 64) + len(chunk)
        return b"Traceback (most recent call last)" in chunk

    def log_tail(self, n: int = 20, max_bytes: int = 16384) -> list[str]:
        """The last ``n`` lines of the current producer's log (each cut to 400 characters)."""
        if not self.logs or not self.logs[-1].exists():
            return []
        with open(self.logs[-1], "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            lines = f.read().decode(errors="replace").splitlines()
        return [line[:400] for line in lines[-n:]]

    def crash_site(self) -> str:
        """The project's own frames of the last traceback logged (not the stdlib or site
        packages), innermost last: where a crash happened, past any deep recursion."""
        lines = self.log_tail(100000, max_bytes=1 << 20)
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
        if not starts:
            return ""
        frames: list[str] = []
        for line in lines[starts[-1] :]:
            m = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', line)
            if m and "/lib/python3" not in m.group(1) and "site-packages" not in m.group(1):
                path = Path(m.group(1))
                frame = f"{path.parent.name}/{path.name}:{m.group(2)} {m.group(3)}"
                if not frames or frames[-1] != frame:
                    frames.append(frame)
        return " > ".join(frames[-5:])

    def kill(self) -> None:
        """SIGKILL the producer's process group (it may have children) and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class Peer:
    """A raw DEALER (an attacker, a probe, or the session state's own trainer). Sends wait at
    most 5 s (SNDTIMEO) and a small queue makes the producer set the pace."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, name: str, routing_id: bytes | None = None
    ) -> None:
        self.name = name
        self.routing_id = routing_id
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 5000)
        self.sock.setsockopt(zmq.SNDHWM, 200)  # backpressure: the producer sets the pace
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)

    def send(self, frames: Sequence[bytes]) -> bool:
        """False if it could not be queued in time (a producer that stopped reading)."""
        try:
            self.sock.send_multipart(list(frames))
            return True
        except zmq.Again:
            return False

    def answers(self, timeout_ms: int = 0, limit: int = 100000) -> Iterator[dict[str, Any]]:
        """Headers of what has arrived (frame 0, decoded leniently); waits only ``timeout_ms``
        for the first."""
        for _ in range(limit):
            if not self.sock.poll(timeout_ms):
                return
            timeout_ms = 0
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            try:
                header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
            except Exception:
                header = None
            yield header if isinstance(header, dict) else {"kind": "<undecodable>"}

    def wait_for(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        seen: Callable[[dict[str, Any]], None] | None = None,
        alive: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Drain answers (each passed to ``seen``) until one satisfies ``pred``, or
        ``timeout_s`` has passed, or ``alive()`` says the producer is gone."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0 and alive():
            for header in self.answers(int(min(left, 0.25) * 1000) + 1):
                if seen is not None:
                    seen(header)
                if pred(header):
                    return True
        return False

    def close(self) -> None:
        self.sock.close(linger=0)


def hello_frames(spec: DataSpec, session: int, *, credits: int = 8) -> list[bytes]:
    """A valid hello for ``spec`` at cursor (0, 0): the probe that is always answered."""
    fields = {"v": 1, "kind": "hello", "rank": 0, "world_size": spec.world_size}
    fields.update(spec=spec.to_dict(), fingerprint=spec.fingerprint(), cycle=0, batch=0)
    fields.update(credits=credits, session=session)
    return [msgpack.packb(fields, use_bin_type=True)]


def is_answer(kind: str, session: int) -> Callable[[dict[str, Any]], bool]:
    return lambda h: h.get("kind") == kind and h.get("session") == session


# --------------------------------------------------------------------------- legitimate clients


def _client(endpoint: str, spec: DataSpec, timeout_s: float) -> FeedClient:
    """A legitimate trainer's client; giving up on a lost producer after 5 s, not 120."""
    from lensfeed.trainer.client import FeedClient  # imports torch: only where a client runs

    return FeedClient(
        endpoint,
        rank=0,
        spec=spec,
        timeout_s=timeout_s,
        heartbeat_s=3.0,
        reconnect_timeout_s=min(timeout_s, 5.0),
        cleanup_each_cycle=False,
    )


def check_service(endpoint: str, spec: DataSpec, oracle: Oracle, timeout_s: float) -> str | None:
    """A fresh FeedClient's cycle 0, byte for byte: None if right, else what went wrong."""
    try:
        with _client(endpoint, spec, timeout_s) as feed:
            cycle = feed.next_cycle()
            got = 0
            for j, batch in enumerate(cycle, start=cycle.start_batch):
                oracle.check(batch, cycle.index, j)
                got += 1
            if got != oracle.batches(0):
                return f"cycle 0 had {got} batches, expected {oracle.batches(0)}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class Streamer(threading.Thread):
    """A legitimate trainer receiving cycle after cycle (checking every byte) during an attack;
    it finishes its current cycle and says goodbye once ``stop`` is set."""

    def __init__(self, endpoint: str, spec: DataSpec, oracle: Oracle, timeout_s: float) -> None:
        super().__init__(name="fuzz-streamer", daemon=True)
        self.endpoint, self.spec, self.oracle, self.timeout_s = endpoint, spec, oracle, timeout_s
        self.stop = threading.Event()
        self.mid_cycle = threading.Event()
        self.batches = 0
        self.cycles = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            with _client(self.endpoint, self.spec, self.timeout_s) as feed:
                while True:
                    cycle = feed.next_cycle()
                    for j, batch in enumerate(cycle, start=cycle.start_batch):
                        self.oracle.check(batch, cycle.index, j)
                        self.batches += 1
                        self.mid_cycle.set()
                        self.stop.wait(0.002)  # pace: leave the CPUs to the attack
                    self.cycles += 1
                    if self.stop.is_set():
                        return
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.mid_cycle.set()


# --------------------------------------------------------------------------- results


@dataclass
class Limits:
    """What "bounded" means. Log: ``log_slack`` + ``log_per_message`` bytes per message
    (the unthrottled producer logs ~320 bytes per bad message; a rate-limited one a few
    lines a minute). RSS: growth of VmRSS over the state and of VmHWM."""

    rss_growth: int = 200 << 20
    log_slack: int = 64 << 10
    log_per_message: int = 20
    client_timeout_s: float = 20.0
    probe_timeout_s: float = 10.0
    #: how long the producer may take to work through what was sent before it answers
    drain_timeout_s: float = 60.0

    def log_limit(self, messages: int) -> int:
        return self.log_slack + self.log_per_message * messages


@dataclass
class Sent:
    """A message as sent: by which peer (``legit``: the session's own), for a replay."""

    peer: str
    legit: bool
    case: Case


@dataclass
class Crash:
    """The producer died: when, its exit status and last log lines, and (after triage) the
    message it died of."""

    state: str
    message_index: int
    exit_code: int | None
    suspects: list[str]
    log_tail: list[str]
    signature: str = ""
    site: str = ""
    culprit: str = ""
    #: what the culprit needs to kill a fresh producer (see ``Fuzz._alone``)
    reproduces: str = ""
    recent: list[Sent] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        lines = [
            f"[{self.state}] producer died (exit {self.exit_code}) by message #{self.message_index}"
            f"; signature: {self.signature or '?'}",
        ]
        if self.site:
            lines.append(f"  at: {self.site}")
        if self.culprit:
            lines.append(f"  culprit (replayed): {self.culprit}")
            lines.append(f"  kills a fresh producer: {self.reproduces or 'not tried'}")
        lines.append(f"  last messages sent: {', '.join(self.suspects)}")
        lines += [f"  | {line}" for line in self.log_tail]
        return "\n".join(lines)


@dataclass
class StateResult:
    """What one state's attack did to the producer; :meth:`failures` judges it."""

    state: str
    messages: int = 0
    answers: int = 0
    answer_kinds: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    crashes: list[Crash] = field(default_factory=list)
    probes: int = 0
    probe_failures: int = 0
    send_timeouts: int = 0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    rss_growth: int = 0
    hwm_growth: int = 0
    hwm_end: int = 0
    log_bytes: int = 0
    elapsed_s: float = 0.0
    service_error: str | None = "not checked"
    stream_batches: int = 0
    stream_cycles: int = 0
    stream_error: str | None = None
    #: hellos a conforming producer must refuse that got a welcome (class -> count)
    accepted_invalid: Counter[str] = field(default_factory=Counter)
    #: welcomes to attackers in a state where every hello was made certain to be refused
    unexpected_welcomes: int = 0
    #: what was seen when a probe failed
    notes: list[str] = field(default_factory=list)

    def failures(self, limits: Limits) -> list[str]:
        out = [c.describe() for c in self.crashes]
        if self.probe_failures or self.send_timeouts:
            out.append(
                f"{self.probe_failures} liveness probe(s) got no welcome, {self.send_timeouts} "
                "message(s) were not taken within 5 s (a hang?)"
            )
        if self.rss_growth > limits.rss_growth or self.hwm_growth > limits.rss_growth:
            out.append(
                f"RSS grew {_mib(self.rss_growth)} (VmHWM {_mib(self.hwm_growth)}), "
                f"limit {_mib(limits.rss_growth)}"
            )
        if self.log_bytes > limits.log_limit(self.messages):
            out.append(
                f"log grew {self.log_bytes} bytes for {self.messages} messages "
                f"({self.log_bytes / max(1, self.messages):.0f} B/message), limit "
                f"{limits.log_limit(self.messages)}"
            )
        if self.service_error:
            out.append(f"legitimate client after the attack: {self.service_error}")
        if self.stream_error:
            out.append(f"streaming client during the attack: {self.stream_error}")
        if self.unexpected_welcomes:
            out.append(f"{self.unexpected_welcomes} attacker hello(s) took the session")
        return [f"[{self.state}] {line}" if not line.startswith("[") else line for line in out]


@dataclass
class FuzzReport:
    """The results of every state, with the limits they were judged by."""

    seed: int
    limits: Limits
    results: list[StateResult]
    elapsed_s: float
    producer_starts: int

    @property
    def failures(self) -> list[str]:
        return [f for r in self.results for f in r.failures(self.limits)]

    @property
    def ok(self) -> bool:
        return not self.failures

    def result(self, state: str) -> StateResult:
        return next(r for r in self.results if r.state == state)

    def summary(self) -> str:
        head = (
            f"{'state':10} {'messages':>8} {'answers':>8} {'crashes':>7} {'probes':>7} "
            f"{'RSS start':>9} {'peak':>9} {'growth':>8} {'VmHWM':>9} {'log bytes':>10} "
            f"{'B/msg':>6} {'log limit':>10} {'elapsed':>8} service"
        )
        lines = [f"lensfeed protocol fuzz, seed {self.seed}", head]
        for r in self.results:
            service = "ok" if r.service_error is None else "FAILED"
            lines.append(
                f"{r.state:10} {r.messages:8d} {r.answers:8d} {len(r.crashes):7d} "
                f"{r.probes - r.probe_failures:3d}/{r.probes:<3d} {_mib(r.rss_start):>9} "
                f"{_mib(r.rss_peak):>9} {_mib(r.rss_growth):>8} {_mib(r.hwm_end):>9} "
                f"{r.log_bytes:10d} {r.log_bytes / max(1, r.messages):6.0f} "
                f"{self.limits.log_limit(r.messages):10d} {r.elapsed_s:7.1f}s {service}"
            )
        for r in self.results:
            kinds = ", ".join(f"{k} {n}" for k, n in r.answer_kinds.most_common(8))
            lines.append(f"[{r.state}] answers: {kinds or 'none'}")
            if r.state == "streaming":
                lines.append(
                    f"[{r.state}] streaming client: {r.stream_batches} batches, "
                    f"{r.stream_cycles} cycles, {r.stream_error or 'every byte right'}"
                )
            if r.accepted_invalid:
                acc = ", ".join(f"{k} x{n}" for k, n in r.accepted_invalid.most_common(10))
                lines.append(f"[{r.state}] non-conforming hellos accepted (welcome): {acc}")
            lines += [f"[{r.state}] note: {note}" for note in r.notes[:10]]
        families = Counter[str]()
        for r in self.results:
            for label, n in r.classes.items():
                families[label.split(":")[0]] += n
        top = ", ".join(f"{k} {n}" for k, n in families.most_common())
        distinct = len({c for r in self.results for c in r.classes})
        lines.append(f"message classes ({distinct} distinct): {top}")
        failures = self.failures
        lines.append(
            f"{sum(r.messages for r in self.results)} messages, "
            f"{sum(len(r.crashes) for r in self.results)} crashes, "
            f"{self.producer_starts} producer start(s), {self.elapsed_s:.1f} s: "
            + ("OK" if not failures else f"{len(failures)} FAILURE(S)")
        )
        lines += failures
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}M"


# --------------------------------------------------------------------------- the attack


BARRIER = msgpack.packb({"v": 7777, "kind": "credit", "n": 0})
BARRIER_LABEL = "<barrier>"
Owners = dict[int, tuple[str, bool | None]]  # session number -> (label, valid hello) of its message


def _is_barrier_answer(h: dict[str, Any]) -> bool:
    return h.get("kind") == "error" and "7777" in str(h.get("message", ""))


def _signature(lines: Sequence[str]) -> str:
    """What the producer died of, from its log tail: the exception line of the last traceback
    (``RecursionError: ...``), else its last ERROR line; long numbers become N."""
    for line in reversed(lines):
        m = re.match(r"^([A-Za-z_.]*(Error|Exception)\b.*)", line)
        if m:
            return re.sub(r"\d{3,}", "N", m.group(1))[:160]
    for line in reversed(lines):
        m = re.search(r" (ERROR|CRITICAL) (.*)", line)
        if m:
            return re.sub(r"\d{3,}", "N", m.group(2))[:160]
    return ""


def fuzz_overrides(data: Path, workdir: Path, **extra: object) -> list[str]:
    """The producer (and client) config: small cycles that wrap the shard, shuffled."""
    base: dict[str, object] = {
        "world_size": 1,
        "batch_size": 4,
        "seed": 3,
        "dataset.path": data,
        "dataset.on_the_fly.samples_per_regeneration_cycle": 64,
        "training_initial_cache_size_per_rank": 40,
        "dataset.on_the_fly.shuffle": "true",
        "feed.endpoint": f"ipc://{workdir}/feed-{{rank}}.sock",
        "feed.exit_on_bye": "false",
        "feed.error_linger_s": 0,
        "feed.idle_timeout_s": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


class Fuzz:
    """One producer, attacked state by state. Use as a context manager: the producer and
    every socket are gone afterwards, also after an exception."""

    def __init__(
        self,
        *,
        seed: int,
        workdir: Path,
        limits: Limits | None = None,
        max_crashes: int = 1,
        triage: bool = False,
        probe_every: int = 500,
        peers: int = 4,
        only: str | None = None,
        skip: str | None = None,
        log: Callable[[str], None] = lambda s: None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.limits = limits or Limits()
        self.max_crashes = max_crashes
        self.triage = triage
        self.probe_every = probe_every
        self.n_peers = peers
        self.only = re.compile(only) if only else None
        self.skip = re.compile(skip) if skip else None
        self.say = log
        shutil.rmtree(workdir / "ds", ignore_errors=True)  # a kept directory is reused
        data = make_dataset(workdir / "ds", rows=ROWS, seq_len=SEQ_LEN)
        self.overrides = fuzz_overrides(data, workdir)
        cfg = load_config(None, self.overrides)
        self.spec = DataSpec.from_config(cfg)
        self.oracle = Oracle.from_config(cfg)
        self.endpoint = cfg.endpoint_for(0)
        self.producer = ProducerProcess(self.overrides, workdir)
        self.ctx = zmq.Context()
        self.triaged: set[str] = set()
        self._base = (0, 0, 0)  # (pid, VmRSS, VmHWM) growth is measured from
        self._survived_traceback = 0  # pid of a producer that logged a traceback and lived
        self._peer_count = 0

    def __enter__(self) -> Fuzz:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.producer.kill()
        self.ctx.destroy(linger=0)

    # ---------------------------------------------------------------- producer

    def start_producer(self) -> None:
        """(Re)start the producer and wait (bounded) until it serves a correct cycle."""
        self.producer.start()
        error = check_service(self.endpoint, self.spec, self.oracle, timeout_s=60.0)
        if error is not None:
            tail = "\n".join(self.producer.log_tail())
            raise RuntimeError(f"the producer did not start serving: {error}\n{tail}")
        self._rebase()

    def _rebase(self) -> None:
        """Memory baseline of the running process: growth is only measured within one."""
        self._base = (self.producer.pid, *self.producer.memory())

    def _sample(self, res: StateResult) -> None:
        rss, hwm = self.producer.memory()
        pid, rss0, hwm0 = self._base
        if pid != self.producer.pid or not rss:
            return
        res.rss_peak = max(res.rss_peak, rss)
        res.rss_growth = max(res.rss_growth, rss - rss0)
        res.hwm_growth = max(res.hwm_growth, hwm - hwm0)
        res.rss_end, res.hwm_end = rss, hwm

    def _peer(self, prefix: str = "a") -> Peer:
        self._peer_count += 1
        rid = None
        if self.rng.random() < 0.2:  # an explicit routing id, up to the longest (255 bytes)
            # Long enough never to collide: the ROUTER would refuse a second peer with one.
            size = self.rng.choice((4, 16, 255))
            rid = bytes([self.rng.randrange(1, 256)]) + self.rng.randbytes(size - 1)
        return Peer(self.ctx, self.endpoint, f"{prefix}{self._peer_count}", rid)

    # ---------------------------------------------------------------- one state

    def run_state(self, state: str, messages: int) -> StateResult:
        """Attack in ``state`` until ``messages`` were sent (on a restarted producer after a
        crash, at most ``max_crashes`` times), then check liveness, memory, log and service.

        Log growth counts the attack and the check, not restarts or triage replays.
        """
        if state not in STATES:
            raise ValueError(f"unknown state {state!r} (known: {', '.join(STATES)})")
        res = StateResult(state)
        t0 = time.monotonic()
        if not self.producer.alive():
            self.start_producer()
        self._rebase()
        res.rss_start = res.rss_peak = res.rss_end = self._base[1]
        while res.messages < messages:
            crash = self._attack(state, messages - res.messages, res)
            if crash is None:
                break
            self._triage(crash)
            self.start_producer()
            if len(res.crashes) >= self.max_crashes:
                self.say(f"[{state}] moving on after {len(res.crashes)} crash(es)")
                break
        log0 = self.producer.log_bytes()
        if self.producer.alive() or not self._settle_dead():
            res.service_error = check_service(
                self.endpoint, self.spec, self.oracle, self.limits.client_timeout_s
            )
        if res.service_error is not None and self._settle_dead():
            self._crash(state, res, [])
        res.log_bytes += self.producer.log_bytes() - log0
        if res.service_error is not None and not self.producer.alive():
            self.start_producer()
        elif res.service_error is not None:
            res.service_error += " (the producer is alive)"
        self._sample(res)
        res.elapsed_s = time.monotonic() - t0
        return res

    def _settle_dead(self) -> bool:
        """Whether the producer is exiting: after a crash it takes a moment to close."""
        return self.producer.exit_code(wait_s=5.0) is not None

    def _dying(self, res: StateResult) -> bool:
        """A traceback in the log is the first sign of a crash, seconds before the process has
        exited: wait for that exit then. A producer that logs one and lives on (a contained
        error) is noted, and from then on only its exit counts."""
        if self._survived_traceback == self.producer.pid or not self.producer.new_traceback():
            return False
        if self._settle_dead():
            return True
        self._survived_traceback = self.producer.pid
        site = self.producer.crash_site()
        res.notes.append(f"the producer logged a traceback and lived on (at {site})")
        return False

    def _attack(self, state: str, budget: int, res: StateResult) -> Crash | None:
        """Send up to ``budget`` messages in ``state``; the crash if the producer died."""
        gen = Generator(
            self.rng, self.spec, must_refuse=state != "session", only=self.only, skip=self.skip
        )
        recent: deque[Sent] = deque(maxlen=4000)
        owners: Owners = {}
        attackers = [self._peer() for _ in range(self.n_peers)]
        legit: Peer | None = None
        streamer: Streamer | None = None
        log0 = self.producer.log_bytes()
        try:
            if state == "session":
                legit = Peer(self.ctx, self.endpoint, "L")
                if not self._probe(gen, res, owners, legit):
                    return self._crash(state, res, recent) if self._settle_dead() else None
            elif state == "streaming":
                streamer = Streamer(
                    self.endpoint, self.spec, self.oracle, self.limits.client_timeout_s
                )
                streamer.start()
                if not streamer.mid_cycle.wait(30.0) or streamer.error:
                    res.stream_error = streamer.error or "no batch within 30 s"
                    return None
            flood: tuple[Peer, Callable[[], Case], int] | None = None
            sent = 0
            while sent < budget:
                if flood is None and self.rng.random() < 0.004:
                    flood = (self.rng.choice(attackers), gen.family(), self.rng.randint(100, 500))
                if flood is not None:  # hundreds from one peer, answers unread
                    peer, make, left = flood
                    case = make()
                    flood = (peer, make, left - 1) if left > 1 else None
                elif legit is not None and self.rng.random() < 0.35:
                    peer, case = legit, gen.case()
                else:
                    peer, case = self.rng.choice(attackers), gen.case()
                if case.session is not None:
                    owners[case.session] = (case.label, case.valid_hello)
                recent.append(Sent(peer.name, peer is legit, case))
                res.classes[case.label] += 1
                sent += 1
                res.messages += 1
                if not peer.send(case.frames):
                    if self._settle_dead():
                        return self._crash(state, res, recent)
                    res.send_timeouts += 1
                    res.notes.append(
                        f"{peer.name}: message {res.messages} not taken within 5 s; producer "
                        f"threads {self.producer.thread_states()}"
                    )
                if flood is not None and sent < budget:
                    continue
                if sent % 32 == 0 or sent == budget:
                    for p in attackers:
                        self._drain(p, res, owners)
                    if legit is not None:
                        self._drain(legit, res, owners, legit=True)
                    self._sample(res)
                    if not self.producer.alive() or self._dying(res):
                        return self._crash(state, res, recent)
                if sent % 256 == 0:  # new identities each round
                    for i in self.rng.sample(range(len(attackers)), k=2):
                        # Where attackers' hellos may be accepted, what a closed peer still
                        # had queued would take the session over later: let it be handled.
                        old = attackers[i]
                        if legit is not None and not self._barrier([old], gen, res, owners):
                            return self._crash(state, res, recent) if self._settle_dead() else None
                        old.close()
                        attackers[i] = self._peer()
                probe_due = sent % self.probe_every == 0 or sent == budget
                if probe_due and not self._probe(gen, res, owners, legit, streamer):
                    return self._crash(state, res, recent) if self._settle_dead() else None
            if streamer is not None and self._stop(streamer, res) and self._settle_dead():
                return self._crash(state, res, recent)
            if not self._barrier([*attackers, *([legit] if legit else [])], gen, res, owners):
                return self._crash(state, res, recent) if self._settle_dead() else None
            return None
        except Exception:
            if self.producer.alive():
                raise
            return self._crash(state, res, recent)
        finally:
            for p in attackers:
                self._drain(p, res, owners)
                p.close()
            if legit is not None:
                self._drain(legit, res, owners, legit=True)
                legit.close()
            if streamer is not None:
                self._stop(streamer, res)
            res.log_bytes += self.producer.log_bytes() - log0

    def _stop(self, streamer: Streamer, res: StateResult) -> bool:
        """Let the streaming client finish its cycle (bounded); True if it failed."""
        if not streamer.stop.is_set():
            streamer.stop.set()
            streamer.join(self.limits.client_timeout_s + 15)
            res.stream_batches += streamer.batches
            res.stream_cycles += streamer.cycles
            if streamer.is_alive():
                res.stream_error = "the streaming client did not finish its cycle"
            elif streamer.error and res.stream_error is None:
                res.stream_error = streamer.error
        return res.stream_error is not None

    def _drain(self, peer: Peer, res: StateResult, owners: Owners, *, legit: bool = False) -> None:
        for h in peer.answers():
            self._count(h, res, owners, legit=legit)

    def _count(
        self, h: dict[str, Any], res: StateResult, owners: Owners, *, legit: bool = False
    ) -> None:
        """Count an answer; a welcome is matched to its hello by the echoed session."""
        kind = str(h.get("kind"))
        res.answers += 1
        res.answer_kinds[f"{kind}/{h.get('code')}" if kind == "error" else kind] += 1
        if kind != "welcome":
            return
        label, valid = owners.get(h.get("session"), ("?", True))  # type: ignore[arg-type]
        if valid is False:
            res.accepted_invalid[label] += 1
        if res.state != "session" and not legit and label != BARRIER_LABEL:
            res.unexpected_welcomes += 1

    def _barrier(
        self, peers: Sequence[Peer], gen: Generator, res: StateResult, owners: Owners
    ) -> bool:
        """Wait (bounded) until the producer has handled all that each peer sent, so that its
        log and memory are measured after the attack, not halfway through its backlog: a
        valid hello is answered (welcome: never rate-limited) after the peer's earlier
        messages. Where no attacker can hold the session, a bye then ends it again."""
        for peer in peers:
            s = gen.next_session()
            owners[s] = (BARRIER_LABEL, True)
            seen = functools.partial(self._count, res=res, owners=owners, legit=peer.name == "L")
            t0 = time.monotonic()
            failed = "its hello could not be queued"
            if peer.send(hello_frames(self.spec, s, credits=0)):
                failed = "no welcome"
                wait = self.limits.drain_timeout_s
                if peer.wait_for(is_answer("welcome", s), wait, seen, self.producer.alive):
                    if res.state == "session":
                        continue  # another's queued hello may take over any moment: no bye
                    failed = "no bye"
                    peer.send([msgpack.packb({"v": 1, "kind": "bye", "session": s})])
                    wait = self.limits.probe_timeout_s
                    if peer.wait_for(is_answer("bye", s), wait, seen, self.producer.alive):
                        continue
            if self.producer.alive():
                res.probe_failures += 1
                rid = peer.routing_id.hex()[:20] if peer.routing_id else "automatic"
                res.notes.append(
                    f"barrier by {peer.name} (routing id {rid}) after {res.messages} messages: "
                    f"{failed} within {time.monotonic() - t0:.1f} s; producer threads "
                    f"{self.producer.thread_states()}"
                )
            return False
        return True

    def _probe(
        self,
        gen: Generator,
        res: StateResult,
        owners: Owners,
        legit: Peer | None = None,
        streamer: Streamer | None = None,
    ) -> bool:
        """Is the producer still serving? A hello is always answered (only answers to bad
        messages may be rate-limited): in ``session`` the legitimate peer says hello again
        (it may have lost the session to an attacker or said a fuzzed bye); in ``idle`` a
        fresh peer says hello and bye; in ``streaming`` the streaming client must be fine."""
        if streamer is not None:
            return streamer.error is None
        res.probes += 1
        s = gen.next_session()
        owners[s] = (BARRIER_LABEL, True)
        peer = legit or Peer(self.ctx, self.endpoint, "probe")
        seen = functools.partial(self._count, res=res, owners=owners, legit=True)
        cpu0, t0 = self.producer.cpu_s(), time.monotonic()
        try:
            wait, alive = self.limits.probe_timeout_s, self.producer.alive
            queued = ok = peer.send(hello_frames(self.spec, s, credits=8 if legit else 0))
            ok = ok and peer.wait_for(is_answer("welcome", s), wait, seen, alive)
            if ok and legit is None:
                peer.send([msgpack.packb({"v": 1, "kind": "bye", "session": s})])
                ok = peer.wait_for(is_answer("bye", s), wait, seen, alive)
        finally:
            if legit is None:
                peer.close()
        if not ok and self.producer.alive():
            res.probe_failures += 1
            busy = (self.producer.cpu_s() - cpu0) / max(1e-3, time.monotonic() - t0)
            res.notes.append(
                f"probe {res.probes} by {peer.name} after {res.messages} messages: "
                f"{'no welcome' if queued else 'the hello could not be queued'} within "
                f"{time.monotonic() - t0:.1f} s; producer CPU {busy:.0%} meanwhile, "
                f"threads {self.producer.thread_states()}"
            )
        return ok

    def _crash(self, state: str, res: StateResult, recent: Sequence[Sent]) -> Crash:
        """Record that the producer died (waiting briefly for its exit and last words)."""
        self._settle_dead()
        tail = self.producer.log_tail(15)
        suspects = [f"{s.peer}:{s.case.label}" for s in list(recent)[-12:]]
        crash = Crash(state, res.messages, self.producer.exit_code(), suspects, tail)
        crash.signature = _signature(tail)
        crash.site = self.producer.crash_site()
        crash.recent = list(recent)
        res.crashes.append(crash)
        self.say(f"[{state}] CRASH by message {res.messages}: {crash.signature or 'exit'}")
        return crash

    # ---------------------------------------------------------------- triage

    def _triage(self, crash: Crash) -> None:
        """Replay the messages sent before a crash one by one on a fresh producer, each
        followed by a barrier from the same peer (a wrong-version message, answered after it),
        to find the one the producer died of. Once per crash signature; needs ``triage``."""
        if not self.triage or not crash.recent or crash.signature in self.triaged:
            return
        self.triaged.add(crash.signature)
        self.say(f"[{crash.state}] triage: replaying up to {len(crash.recent)} messages")
        self.start_producer()
        peers: dict[str, Peer] = {}
        silent = 0
        try:
            if any(s.legit for s in crash.recent):
                peers["L"] = Peer(self.ctx, self.endpoint, "L")
                peers["L"].send(hello_frames(self.spec, 1))
                peers["L"].wait_for(is_answer("welcome", 1), self.limits.probe_timeout_s)
            for sent in crash.recent:
                name = "L" if sent.legit else sent.peer
                if name not in peers:
                    peers[name] = Peer(self.ctx, self.endpoint, name)
                peers[name].send(sent.case.frames)
                peers[name].send([BARRIER])
                if peers[name].wait_for(_is_barrier_answer, 1.0):
                    silent = 0
                    continue
                if self._settle_dead():
                    who = "the session" if sent.legit else "an attacker"
                    crash.culprit = (
                        f"{sent.case.label} from {who}: {sent.case.frames[0][:100]!r}"
                        f"{'...' if len(sent.case.frames[0]) > 100 else ''} "
                        f"({len(sent.case.frames[0])} bytes, {len(sent.case.frames)} frame(s))"
                    )
                    crash.reproduces = self._alone(sent)
                    if crash.reproduces == "no":  # e.g. a regeneration thread's failure
                        crash.culprit = f"(timing-dependent) last handled: {crash.culprit}"
                    return
                silent += 1
                if silent > 20:
                    crash.culprit = "(triage gave up: barriers unanswered)"
                    return
            crash.culprit = "(not reproduced by replaying the recent messages)"
        finally:
            for p in peers.values():
                p.close()

    def _alone(self, sent: Sent) -> str:
        """What it takes ``sent`` to kill a fresh producer: nothing ("alone"), its sender's
        session ("after a valid hello") or more ("no": it needs the preceding messages)."""
        for hello_first in (False, True):
            self.start_producer()
            peer = Peer(self.ctx, self.endpoint, "alone")
            try:
                if hello_first:
                    peer.send(hello_frames(self.spec, 1))
                    peer.wait_for(is_answer("welcome", 1), self.limits.probe_timeout_s)
                    peer.send([pack({"v": 1, "kind": "next_cycle", "cycle": 0, "batch": 0})])
                peer.send(sent.case.frames)
                peer.send([BARRIER])
                if not peer.wait_for(_is_barrier_answer, 2.0) and self._settle_dead():
                    return "after a valid hello" if hello_first else "alone"
            finally:
                peer.close()
        return "no"


def run_fuzz(
    *,
    messages: int,
    seed: int = 0,
    states: Sequence[str] = STATES,
    workdir: Path | None = None,
    log: Callable[[str], None] = lambda s: None,
    **options: Any,
) -> FuzzReport:
    """Fuzz a fresh producer with ``messages`` per state in ``states`` (``options``: those of
    :class:`Fuzz`); the report says what failed. A ``workdir`` is kept, a temporary one not."""
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="lf-fuzz-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # the producer refuses an ipc directory others could reach
    try:
        with Fuzz(seed=seed, workdir=root, log=log, **options) as fz:
            fz.start_producer()
            results = []
            for state in states:
                log(f"[{state}] attacking with {messages} messages")
                results.append(fz.run_state(state, messages))
                log(f"[{state}] done in {results[-1].elapsed_s:.1f} s")
            elapsed = time.monotonic() - t0
            return FuzzReport(seed, fz.limits, results, elapsed, len(fz.producer.logs))
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10000, help="messages per state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--states", default=",".join(STATES), help="comma-separated, in this order")
    p.add_argument("--only", help="regex: send only message classes matching it")
    p.add_argument("--skip", help="regex: never send message classes matching it")
    p.add_argument("--max-crashes", type=int, default=5, help="per state; then the next state")
    p.add_argument("--no-triage", action="store_true", help="do not replay to find culprits")
    p.add_argument("--rss-limit-mib", type=int, default=200)
    p.add_argument("--log-bytes-per-message", type=int, default=20)
    p.add_argument("--keep", type=Path, help="work (dataset, producer logs) in this directory")
    args = p.parse_args(argv)
    states = [s for s in args.states.split(",") if s]
    if unknown := set(states) - set(STATES):
        p.error(f"unknown state(s) {sorted(unknown)}; known: {', '.join(STATES)}")
    import datasets

    datasets.disable_progress_bars()
    report = run_fuzz(
        messages=args.messages,
        seed=args.seed,
        states=states,
        workdir=args.keep,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        limits=Limits(
            rss_growth=args.rss_limit_mib << 20, log_per_message=args.log_bytes_per_message
        ),
        max_crashes=args.max_crashes,
        triage=not args.no_triage,
        only=args.only,
        skip=args.skip,
    )
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
