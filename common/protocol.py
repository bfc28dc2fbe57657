"""The lensfeed wire protocol (version 1): message kinds, headers, tensor frames, validation.

A message is a ZeroMQ multipart message: frame 0 is a msgpack map (the header), frames 1..n are
raw C-contiguous tensor bytes described by the header's ``tensors`` list. ``docs/protocol.md``
is the normative description; this module is its only implementation, used by both sides.
Nothing here ever unpickles: a frame is either msgpack with size limits or raw bytes that are
checked against ``shape x itemsize`` before anything looks at them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from lensfeed.common.errors import ProtocolError
from lensfeed.common.limits import MAX_HEADER_BYTES, MAX_RANK, MAX_TENSORS

# ZeroMQ frames are read-only and so are the tensors made over them (documented); torch warns
# about that on every frombuffer. One filter, installed once and scoped to the warnings this
# module's own calls raise (``module=``): a per-call ``catch_warnings()`` cost more than the rest
# of decoding a message, and a process-wide filter would hide the warning from the user's code.
warnings.filterwarnings(
    "ignore",
    message="The given buffer is not writable",
    category=UserWarning,
    module=r"lensfeed\.common\.protocol\Z",
)

PROTOCOL_VERSION = 1
MAX_NDIM = 8

# trainer -> producer
HELLO = "hello"
NEXT_CYCLE = "next_cycle"
CREDIT = "credit"
BYE = "bye"  # also producer -> trainer: the acknowledgement, nothing follows it
# producer -> trainer
WELCOME = "welcome"
CYCLE_START = "cycle_start"
BATCH = "batch"
CYCLE_END = "cycle_end"
# producer -> trainer: a refusal or failure; ``fatal`` = the session cannot continue
ERROR = "error"

#: Wire dtype name -> (torch dtype, itemsize). Anything else is rejected.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "bool": (torch.bool, 1),
    "uint8": (torch.uint8, 1),
    "int8": (torch.int8, 1),
    "int16": (torch.int16, 2),
    "int32": (torch.int32, 4),
    "int64": (torch.int64, 8),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
    "float32": (torch.float32, 4),
    "float64": (torch.float64, 8),
}
_TORCH_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}

_INT = (int,)
_STR = (str,)
_DICT = (dict,)
_LIST = (list,)
_NUM = (int, float)
_BOOL = (bool,)

#: Required header fields per kind (besides ``v`` and ``kind``) and their msgpack types.
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    HELLO: {
        "rank": _INT,
        "world_size": _INT,
        "spec": _DICT,
        "fingerprint": _STR,
        "cycle": _INT,
        "batch": _INT,
        "credits": _INT,
    },
    NEXT_CYCLE: {"cycle": _INT, "batch": _INT},
    CREDIT: {"n": _INT},
    BYE: {},
    WELCOME: {
        "rank": _INT,
        "shard_rows": _INT,
        "shard_offset": _INT,
        "fingerprint": _STR,
        "dataset_fingerprint": _STR,
    },
    CYCLE_START: {
        "rank": _INT,
        "cycle": _INT,
        "batches": _INT,
        "start_batch": _INT,
        "wraps": _INT,
        "total_wraps": _INT,
        "shard_pos": _INT,
        "shard_rows": _INT,
        "prepared_ahead": _BOOL,
    },
    BATCH: {
        "rank": _INT,
        "cycle": _INT,
        "batch": _INT,
        "count": _INT,
        "seq": _INT,
        "tensors": _LIST,
    },
    CYCLE_END: {"rank": _INT, "cycle": _INT, "batches": _INT, "regen_s": _NUM},
    ERROR: {"code": _STR, "message": _STR, "fatal": _BOOL},
}

#: Inclusive ranges of integer fields (any kind). Everything a peer sends is range-checked here,
#: before use, so no counter can overflow a C long, a numpy index or a tensor shape downstream.
MAX_COUNTER = (1 << 31) - 1  # cycles, batches, credits: far beyond any real run
MAX_ROWS = (1 << 62) - 1  # rows, positions and wrap counts of a shard
MAX_DIM = (1 << 31) - 1  # one tensor dimension
#: Optional ``hello`` field: the most tensor bytes one message may carry for this trainer
#: (its ``feed.max_message_bytes``); the producer packs its messages to fit (section 4.1).
MAX_MESSAGE_BYTES = "max_message_bytes"

INT_RANGES: dict[str, tuple[int, int]] = {
    "rank": (0, MAX_RANK),
    "world_size": (1, MAX_RANK + 1),
    "cycle": (0, MAX_COUNTER),
    "batch": (0, MAX_COUNTER),
    "credits": (0, MAX_COUNTER),
    "n": (0, MAX_COUNTER),
    "count": (1, MAX_COUNTER),
    "batches": (0, MAX_COUNTER),
    "start_batch": (0, MAX_COUNTER),
    "seq": (0, MAX_ROWS),
    "wraps": (0, MAX_ROWS),
    "total_wraps": (0, MAX_ROWS),
    "shard_pos": (0, MAX_ROWS),
    "shard_rows": (0, MAX_ROWS),
    "shard_offset": (0, MAX_ROWS),
}
#: Longest string field (fingerprints are 16 hex digits; error messages are bounded text).
MAX_STR = MAX_HEADER_BYTES


def describe(value: Any, limit: int = 40) -> str:
    """A short, safe description of a peer's value for an error message: never the repr of a
    nested structure (unbounded and recursive), and strings and ints cut to ``limit``."""
    if isinstance(value, (bool, float)) or value is None:
        return repr(value)
    if isinstance(value, (int, str, bytes)):
        text = repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


#: Optional field of any kind, checked when present: the client's number for its current hello,
#: echoed by the producer in every message of that session, so a client can tell what an earlier
#: session still had in flight from the answers to its new hello.
SESSION = "session"
MAX_SESSION = (1 << 32) - 1


@dataclass
class Message:
    """A decoded, validated message. ``tensors`` maps name -> tensor (for BATCH only)."""

    kind: str
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]


def dtype_name(x: np.ndarray | torch.Tensor) -> str:
    """Wire name of an array's dtype; raises for anything outside :data:`DTYPES`."""
    name = _TORCH_NAMES.get(x.dtype) if isinstance(x, torch.Tensor) else np.dtype(x.dtype).name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {x.dtype} cannot be sent (allowed: {', '.join(DTYPES)})")
    return name


def _raw_buffer(x: np.ndarray | torch.Tensor) -> memoryview:
    """Zero-copy byte view of a C-contiguous CPU array or tensor."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ProtocolError(f"tensor on {x.device} must be moved to CPU before sending")
        if x.numel() == 0:
            return memoryview(b"")
        # numpy has no bfloat16: view the storage as bytes instead.
        arr = x.contiguous().reshape(-1).view(torch.uint8).numpy()
    else:
        arr = np.ascontiguousarray(x)
        if not arr.dtype.isnative:  # the wire is little-endian native order
            arr = arr.astype(arr.dtype.newbyteorder("="))
    return memoryview(arr).cast("B") if arr.size else memoryview(b"")


def encode(
    kind: str, fields: Mapping[str, Any], tensors: Mapping[str, np.ndarray | torch.Tensor] = {}
) -> list[bytes | memoryview]:
    """Build the frames of one message. Tensor frames are zero-copy views (send with copy=False)."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": kind, **fields}
    frames: list[bytes | memoryview] = []
    if kind == BATCH:
        descr = []
        for name, arr in tensors.items():
            descr.append([name, dtype_name(arr), [int(d) for d in arr.shape]])
            frames.append(_raw_buffer(arr))
        header["tensors"] = descr
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)
    return buf if buf is not None else memoryview(frame)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"ext type {code}")


def _unpack_header(frame: Any, *, strict_map_key: bool = True) -> Any:
    """Frame 0 as msgpack within the header limits (size, no bin/ext, bounded containers,
    string keys with ``strict_map_key``)."""
    buf = _buffer(frame)
    if buf.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {buf.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=strict_map_key,
            max_str_len=MAX_HEADER_BYTES,
            max_bin_len=0,  # an empty bin still passes these two limits: see _plain
            max_array_len=4096,
            max_map_len=256,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except Exception as exc:  # msgpack raises a zoo of exception types for garbage
        raise ProtocolError(f"header frame is not valid msgpack ({type(exc).__name__})") from None
    if strict_map_key:
        _plain(header)
    return header


def _plain(header: Any) -> None:
    """Refuse what msgpack's limits let through: an empty ``bin`` value, a ``bin`` map key
    (section 3.1). Iterative: nesting depth is the peer's choice."""
    stack = [header]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if not all(type(k) is str for k in value):
                raise ProtocolError("header map keys must be msgpack str")
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, bytes):
            raise ProtocolError("header must not contain msgpack bin values")


def decode_header(frame: Any) -> dict[str, Any]:
    """Unpack and validate frame 0: size limits, msgpack limits, version, kind, field types."""
    header = _unpack_header(frame)
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: peer speaks {describe(version)}, this side speaks "
            f"{PROTOCOL_VERSION}"
        )
    kind = header.get("kind")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise ProtocolError(f"unknown message kind {describe(kind)}")
    for key, types in SCHEMA[kind].items():
        value = header.get(key)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = "/".join(t.__name__ for t in types)
            raise ProtocolError(
                f"{kind} message: field '{key}' must be {want}, got {describe(value)}"
            )
        if types is _INT:
            lo, hi = INT_RANGES[key]
            if not lo <= value <= hi:
                raise ProtocolError(
                    f"{kind} message: field '{key}' must be in [{lo}, {hi}], got {describe(value)}"
                )
        elif types is _STR and len(value) > MAX_STR:
            raise ProtocolError(f"{kind} message: field '{key}' is longer than {MAX_STR} chars")
        elif types is _NUM and not (math.isfinite(value) and value >= 0):
            raise ProtocolError(
                f"{kind} message: field '{key}' must be finite and >= 0, got {describe(value)}"
            )
    session = header.get(SESSION)
    if session is not None and (type(session) is not int or not 0 <= session <= MAX_SESSION):
        raise ProtocolError(
            f"{kind} message: field '{SESSION}' must be an int in [0, {MAX_SESSION}], "
            f"got {describe(session)}"
        )
    limit = header.get(MAX_MESSAGE_BYTES) if kind == HELLO else None
    if limit is not None and (type(limit) is not int or not 1 <= limit <= MAX_ROWS):
        raise ProtocolError(
            f"hello message: field '{MAX_MESSAGE_BYTES}' must be an int in [1, {MAX_ROWS}], "
            f"got {describe(limit)}"
        )
    return header


def peek_kind(frames: Sequence[Any]) -> str | None:
    """The ``kind`` of a message that failed validation, if its header says one (so a producer
    can refuse a malformed hello for good); None when even that cannot be read."""
    try:
        header = _unpack_header(frames[0], strict_map_key=False) if frames else None
    except ProtocolError:  # garbage: no kind
        return None
    kind = header.get("kind") if isinstance(header, dict) else None
    return kind if isinstance(kind, str) and kind in SCHEMA else None


def _tensor_descr(header: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    descr = header["tensors"]
    if len(descr) > MAX_TENSORS:
        raise ProtocolError(f"batch has {len(descr)} tensors (limit {MAX_TENSORS})")
    out = []
    for item in descr:
        if not (isinstance(item, list) and len(item) == 3):
            raise ProtocolError(
                f"tensor descriptor must be [name, dtype, shape], got {describe(item)}"
            )
        name, dtype, shape = item
        if not isinstance(name, str) or not 0 < len(name) <= 256:
            raise ProtocolError(
                f"tensor name must be a string of 1-256 chars, got {describe(name)}"
            )
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"tensor '{name}': dtype {describe(dtype)} not in {sorted(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise ProtocolError(
                f"tensor '{name}': shape must be at most {MAX_NDIM} ints in [0, {MAX_DIM}], "
                f"got {describe(shape)}"
            )
        out.append((name, dtype, tuple(shape)))
    if len({n for n, _, _ in out}) != len(out):
        raise ProtocolError("batch has duplicate tensor names")
    return out


def decode(frames: Sequence[Any], *, max_bytes: int = 1 << 31) -> Message:
    """Validate a whole message and rebuild tensors as zero-copy CPU views of the frames.

    The tensors share memory with the received frames (read-only ZeroMQ buffers): they stay valid
    as long as they are referenced, and must be cloned before any in-place write.
    """
    if not frames:
        raise ProtocolError("empty message")
    header = decode_header(frames[0])
    kind = header["kind"]
    if kind != BATCH:
        if len(frames) != 1:
            raise ProtocolError(f"{kind} message must have 1 frame, got {len(frames)}")
        return Message(kind, header)
    descr = _tensor_descr(header)
    if len(frames) != 1 + len(descr):
        raise ProtocolError(
            f"batch header describes {len(descr)} tensors but {len(frames) - 1} frames followed"
        )
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    for (name, dtype, shape), frame in zip(descr, frames[1:], strict=True):
        buf = _buffer(frame)
        tdtype, itemsize = DTYPES[dtype]
        want = math.prod(shape) * itemsize
        if want > max_bytes or (want == 0 and math.prod(d for d in shape if d) > MAX_ROWS):
            # Checked before any allocation: torch.empty of an overflowing shape raises from C.
            raise ProtocolError(
                f"tensor '{name}': shape {list(shape)} is beyond the {max_bytes}-byte message limit"
            )
        if buf.nbytes != want:
            raise ProtocolError(
                f"tensor '{name}': shape {list(shape)} x {itemsize} bytes = {want}, "
                f"but its frame has {buf.nbytes} bytes"
            )
        total += want
        if total > max_bytes:
            raise ProtocolError(f"batch exceeds the {max_bytes}-byte message limit")
        tensors[name] = frombuffer(buf, tdtype, shape)
    return Message(kind, header, tensors)


def frombuffer(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-copy tensor over ``buf`` (kept alive by the tensor). Read-only buffers are fine."""
    if buf.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def error_fields(code: str, message: str, *, fatal: bool = True) -> dict[str, Any]:
    return {"code": code, "message": message, "fatal": fatal}


__all__ = [
    "BATCH",
    "BYE",
    "CREDIT",
    "CYCLE_END",
    "CYCLE_START",
    "DTYPES",
    "ERROR",
    "HELLO",
    "INT_RANGES",
    "MAX_HEADER_BYTES",
    "Message",
    "MAX_SESSION",
    "NEXT_CYCLE",
    "PROTOCOL_VERSION",
    "SCHEMA",
    "SESSION",
    "WELCOME",
    "decode",
    "decode_header",
    "describe",
    "dtype_name",
    "encode",
    "error_fields",
    "frombuffer",
    "peek_kind",
]
