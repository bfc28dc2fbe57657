"""The hostile values the generator puts into fields (huge ints, every other msgpack type,
nesting depths, odd encodings) and the short class names the report gives them.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from tests.fuzz.encoding import Raw

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
