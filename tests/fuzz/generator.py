"""The messages of the attack: :class:`Generator` makes hostile messages (:class:`Case`) of
every family from one ``random.Random``, so a seed replays the same bytes, and judges
which of its hellos a conforming producer would accept.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lensfeed.common.spec import DataSpec
from tests.fuzz.config import ROWS, SEQ_LEN
from tests.fuzz.encoding import Raw, _plain, deep, pack, pack_pairs, wide_array, wide_map
from tests.fuzz.values import DEPTHS, HUGE_INTS, ODD_RAWS, ODD_VALUES, _describe, _int_class

MAX_SESSION = (1 << 32) - 1


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
