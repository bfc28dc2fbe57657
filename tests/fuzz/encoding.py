"""Raw msgpack building: headers that ``msgpack.packb`` refuses to build (nesting past its
recursion limit, ext, bin keys, lying lengths, duplicate keys) spliced in as :class:`Raw`,
and whether a conforming decoder accepts such a value (``_plain``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack


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
