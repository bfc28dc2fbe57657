"""Wire protocol v1: encode/decode round trips and rejection of everything malformed."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lensfeed.common import protocol as P
from lensfeed.common.errors import ProtocolError

#: A valid value for every field of every message kind (see ``P.SCHEMA``).
SAMPLE_FIELDS: dict[str, dict[str, Any]] = {
    P.HELLO: {
        "rank": 1,
        "world_size": 2,
        "spec": {"batch_size": 4, "columns": ["input_ids"]},
        "fingerprint": "0123456789abcdef",
        "cycle": 3,
        "batch": 2,
        "credits": 8,
    },
    P.NEXT_CYCLE: {"cycle": 4, "batch": 0},
    P.CREDIT: {"n": 1},
    P.BYE: {},
    P.WELCOME: {
        "rank": 1,
        "shard_rows": 500,
        "shard_offset": 500,
        "fingerprint": "0123456789abcdef",
        "dataset_fingerprint": "fedcba9876543210",
    },
    P.CYCLE_START: {
        "rank": 1,
        "cycle": 4,
        "batches": 10,
        "start_batch": 0,
        "wraps": 2,
        "total_wraps": 9,
        "shard_pos": 17,
        "shard_rows": 500,
        "prepared_ahead": True,
    },
    P.BATCH: {"rank": 1, "cycle": 4, "batch": 3, "count": 1, "seq": 12},
    P.CYCLE_END: {"rank": 1, "cycle": 4, "batches": 10, "regen_s": 0.25},
    P.ERROR: {"code": "empty_shard", "message": "rank 1: shard is empty", "fatal": True},
}

BATCH_FIELDS = SAMPLE_FIELDS[P.BATCH]


def _header(kind: str, **over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"v": P.PROTOCOL_VERSION, "kind": kind, **SAMPLE_FIELDS[kind]}
    h.update(over)
    return h


def _pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _batch_frames(descr: list[Any], *frames: bytes, **over: Any) -> list[bytes]:
    return [_pack(_header(P.BATCH, tensors=descr, **over)), *frames]


def _reject(frames: list[Any], match: str, **kw: Any) -> str:
    with pytest.raises(ProtocolError, match=match) as exc_info:
        P.decode(frames, **kw)
    return str(exc_info.value)


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


# --------------------------------------------------------------------------- round trips


def test_schema_covers_every_kind() -> None:
    assert set(P.SCHEMA) == set(SAMPLE_FIELDS)
    for kind, fields in SAMPLE_FIELDS.items():
        if kind != P.BATCH:
            assert set(fields) == set(P.SCHEMA[kind]), kind
    assert set(P.SCHEMA[P.BATCH]) == {*BATCH_FIELDS, "tensors"}


@pytest.mark.parametrize("kind", sorted(SAMPLE_FIELDS))
def test_every_kind_round_trips(kind: str) -> None:
    tensors = (
        {"input_ids": torch.arange(6, dtype=torch.int32).view(2, 3)} if kind == P.BATCH else {}
    )
    frames = P.encode(kind, SAMPLE_FIELDS[kind], tensors)
    assert len(frames) == 1 + len(tensors)
    msg = P.decode(frames)
    assert msg.kind == kind
    assert msg.header["v"] == P.PROTOCOL_VERSION == 1
    for key, value in SAMPLE_FIELDS[kind].items():
        assert msg[key] == value
    if kind == P.BATCH:
        assert msg["tensors"] == [["input_ids", "int32", [2, 3]]]
        assert torch.equal(msg.tensors["input_ids"], tensors["input_ids"])
    else:
        assert msg.tensors == {}


def test_header_is_a_plain_msgpack_map() -> None:
    frames = P.encode(P.CREDIT, {"n": 3})
    assert msgpack.unpackb(frames[0]) == {"v": 1, "kind": "credit", "n": 3}


@pytest.mark.parametrize("name", sorted(P.DTYPES))
@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 1, 4)], ids=str)
def test_every_dtype_round_trips_bit_exact(name: str, shape: tuple[int, ...]) -> None:
    tdtype, itemsize = P.DTYPES[name]
    x = _sample(tdtype, shape)
    frames = P.encode(P.BATCH, BATCH_FIELDS, {"x": x})
    assert msgpack.unpackb(frames[0])["tensors"] == [["x", name, list(shape)]]
    assert memoryview(frames[1]).nbytes == x.numel() * itemsize
    y = P.decode(frames).tensors["x"]
    assert y.dtype == tdtype
    assert y.shape == x.shape
    assert torch.equal(y.view(-1).view(torch.uint8), x.view(-1).view(torch.uint8))


@pytest.mark.parametrize("name", sorted(set(P.DTYPES) - {"bfloat16"}))
def test_numpy_arrays_round_trip(name: str) -> None:
    x = _sample(P.DTYPES[name][0], (4, 3), seed=1).numpy()
    msg = P.decode(P.encode(P.BATCH, BATCH_FIELDS, {"a": x, "b": x[:, ::2]}))
    np.testing.assert_array_equal(msg.tensors["a"].numpy(), x)
    # Non-contiguous inputs are sent C-contiguous.
    np.testing.assert_array_equal(msg.tensors["b"].numpy(), x[:, ::2])


def test_frames_are_c_contiguous_little_endian() -> None:
    x = torch.tensor([[1, 2], [3, 256]], dtype=torch.int32).t()  # non-contiguous view
    frames = P.encode(P.BATCH, BATCH_FIELDS, {"x": x})
    assert bytes(frames[1]) == np.array([[1, 3], [2, 256]], dtype="<i4").tobytes()
    bf = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    frames = P.encode(P.BATCH, BATCH_FIELDS, {"x": bf})
    # bfloat16 = the top 16 bits of the float32, little-endian.
    assert bytes(frames[1]) == bytes([0x80, 0x3F, 0x00, 0xC0])


def test_several_tensors_keep_names_and_order() -> None:
    tensors = {
        "input_ids": torch.arange(8, dtype=torch.int64).view(2, 4),
        "A": torch.randn(2, 3).bfloat16(),
        "sample_idx": torch.tensor([5, 9]),
    }
    msg = P.decode(P.encode(P.BATCH, BATCH_FIELDS, tensors))
    assert list(msg.tensors) == list(tensors)
    for k, v in tensors.items():
        assert torch.equal(msg.tensors[k], v)


@pytest.mark.parametrize("name", sorted(set(P.DTYPES) - {"bfloat16"}))
@pytest.mark.parametrize("shape", [(0,), (0, 16), (4, 0)], ids=str)
def test_zero_size_tensors_round_trip(name: str, shape: tuple[int, ...]) -> None:
    x = torch.zeros(shape, dtype=P.DTYPES[name][0])
    frames = P.encode(P.BATCH, BATCH_FIELDS, {"x": x, "y": torch.ones(2, dtype=torch.int8)})
    assert memoryview(frames[1]).nbytes == 0
    msg = P.decode(frames)
    assert msg.tensors["x"].shape == x.shape
    assert msg.tensors["x"].dtype == x.dtype
    assert torch.equal(msg.tensors["y"], torch.ones(2, dtype=torch.int8))


def test_zero_size_bfloat16_round_trips() -> None:
    x = torch.zeros(0, 16, dtype=torch.bfloat16)
    msg = P.decode(P.encode(P.BATCH, BATCH_FIELDS, {"x": x}))
    assert msg.tensors["x"].shape == (0, 16)
    assert msg.tensors["x"].dtype == torch.bfloat16


def test_zero_size_tensor_is_decoded_from_an_empty_frame() -> None:
    frames = _batch_frames([["x", "bfloat16", [0, 16]]], b"")
    x = P.decode(frames).tensors["x"]
    assert x.shape == (0, 16)
    assert x.dtype == torch.bfloat16


def test_zero_dim_torch_tensor_round_trips() -> None:
    msg = P.decode(P.encode(P.BATCH, BATCH_FIELDS, {"x": torch.tensor(7, dtype=torch.int32)}))
    assert msg.tensors["x"].item() == 7


def test_zero_dim_shape_on_the_wire() -> None:
    frames = _batch_frames([["x", "int32", []]], np.array(7, dtype="<i4").tobytes())
    assert P.decode(frames).tensors["x"].item() == 7


def test_big_endian_numpy_is_sent_little_endian() -> None:
    x = np.arange(3, dtype=">i4")
    msg = P.decode(P.encode(P.BATCH, BATCH_FIELDS, {"x": x}))
    assert msg.tensors["x"].tolist() == [0, 1, 2]


def test_decoded_tensors_are_zero_copy_views_of_frames() -> None:
    payload = bytearray(np.arange(6, dtype="<i4").tobytes())
    msg = P.decode(_batch_frames([["x", "int32", [2, 3]]], payload))  # type: ignore[list-item]
    payload[0] = 42
    assert msg.tensors["x"][0, 0].item() == 42


def test_decode_accepts_zmq_frames() -> None:
    zmq = pytest.importorskip("zmq")
    frames = [zmq.Frame(bytes(f)) for f in P.encode(P.BATCH, BATCH_FIELDS, {"x": torch.ones(3)})]
    assert torch.equal(P.decode(frames).tensors["x"], torch.ones(3))


def test_error_fields_helper() -> None:
    assert P.error_fields("shard", "boom") == {"code": "shard", "message": "boom", "fatal": True}
    assert P.error_fields("protocol", "x", fatal=False)["fatal"] is False


# --------------------------------------------------------------------------- rejection


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=512), extra=st.lists(st.binary(max_size=64), max_size=3))
def test_random_bytes_are_rejected_with_protocol_error(data: bytes, extra: list[bytes]) -> None:
    try:
        msg = P.decode([data, *extra])
    except ProtocolError:
        return
    # Random bytes that happen to be a valid message are fine, as long as they validate.
    assert msg.kind in P.SCHEMA


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=8,
)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kind=st.sampled_from(sorted(P.SCHEMA)),
    mutations=st.dictionaries(
        # Every field but ``tensors`` (descriptors have their own tests below).
        st.sampled_from(sorted({k for f in P.SCHEMA.values() for k in f} - {"tensors"} | {"x"})),
        _values,
        max_size=4,
    ),
    drop=st.sets(st.sampled_from(sorted({k for f in P.SCHEMA.values() for k in f}))),
)
def test_mutated_headers_validate_or_raise_protocol_error(
    kind: str, mutations: dict[str, Any], drop: set[str]
) -> None:
    header = _header(kind, tensors=[["x", "int8", [2]]]) if kind == P.BATCH else _header(kind)
    header.update(mutations)
    for key in drop:
        header.pop(key, None)
    frames: list[Any] = [_pack(header)]
    if kind == P.BATCH:
        frames.append(b"\x01\x02")
    try:
        msg = P.decode(frames)
    except ProtocolError:
        return
    for key, types in P.SCHEMA[kind].items():
        assert isinstance(msg[key], types)
        assert not (isinstance(msg[key], bool) and bool not in types)


def test_empty_message_is_rejected() -> None:
    _reject([], "empty message")


def test_non_map_header_is_rejected() -> None:
    _reject([_pack([1, "hello"])], "must be a msgpack map")


def test_not_msgpack_is_rejected() -> None:
    _reject([b"\xc1"], "not valid msgpack")


def test_binary_values_in_the_header_are_rejected() -> None:
    _reject([_pack({**_header(P.BYE), "blob": b"raw"})], "not valid msgpack")


def test_non_string_map_keys_are_rejected() -> None:
    _reject([_pack({1: 2, "v": 1, "kind": "bye"})], "not valid msgpack")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({b"": 1}, "map keys must be msgpack str"),  # an empty bin key passes max_bin_len=0
        ({"blob": b""}, "must not contain msgpack bin"),
        ({"deep": [[{"x": [b""]}]]}, "must not contain msgpack bin"),
        ({"deep": {"x": {b"": 1}}}, "map keys must be msgpack str"),
        ({"ext": msgpack.ExtType(1, b"")}, "not valid msgpack"),  # and so does an empty ext
    ],
)
def test_empty_bin_and_ext_are_rejected_too(extra: dict[Any, Any], match: str) -> None:
    _reject([_pack({**_header(P.BYE), **extra})], match)


@pytest.mark.parametrize("version", [0, 2, 999, "1", None])
def test_wrong_version_names_both_versions(version: Any) -> None:
    header = _header(P.HELLO, v=version)
    if version is None:
        header.pop("v")
    msg = _reject([_pack(header)], "protocol version mismatch")
    assert f"peer speaks {version!r}" in msg
    assert "this side speaks 1" in msg


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_one(version: Any) -> None:
    _reject([_pack(_header(P.BYE, v=version))], "version")


@pytest.mark.parametrize("kind", ["helo", "HELLO", "", 7, None])
def test_unknown_kind_is_rejected(kind: Any) -> None:
    msg = _reject([_pack({"v": 1, "kind": kind})], "unknown message kind")
    assert repr(kind) in msg


@pytest.mark.parametrize(
    "frames",
    [
        [_pack({"v": 1, "kind": ["hello"]})],
        [_pack({"v": 1, "kind": {}})],
        _batch_frames([["x", ["int8"], [1]]], b"\x00"),
    ],
    ids=["kind-list", "kind-map", "dtype-list"],
)
def test_unhashable_kind_or_dtype_is_a_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        P.decode(frames)


@pytest.mark.parametrize(("kind", "field"), [(k, f) for k in P.SCHEMA for f in P.SCHEMA[k]])
def test_missing_field_is_rejected(kind: str, field: str) -> None:
    header = _header(kind, tensors=[]) if kind == P.BATCH else _header(kind)
    header.pop(field)
    msg = _reject([_pack(header)], f"field '{field}' must be")
    assert kind in msg
    assert "None" in msg


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (P.HELLO, "rank", "0"),
        (P.HELLO, "spec", [1, 2]),
        (P.HELLO, "fingerprint", 123),
        (P.HELLO, "credits", 1.5),
        (P.CREDIT, "n", None),
        (P.CYCLE_START, "prepared_ahead", 1),
        (P.CYCLE_END, "regen_s", "0.1"),
        (P.ERROR, "fatal", "yes"),
        (P.ERROR, "message", None),
        (P.BATCH, "tensors", {"x": 1}),
    ],
)
def test_mistyped_field_is_rejected(kind: str, field: str, value: Any) -> None:
    header = _header(kind, tensors=[]) if kind == P.BATCH else _header(kind)
    header[field] = value
    msg = _reject([_pack(header)], f"{kind} message: field '{field}' must be")
    assert P.describe(value) in msg


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        (P.HELLO, "cycle", 1 << 63),
        (P.HELLO, "cycle", (1 << 64) - 1),
        (P.HELLO, "batch", -(1 << 63)),
        (P.HELLO, "credits", -1),
        (P.HELLO, "rank", 1 << 20),
        (P.HELLO, "world_size", 0),
        (P.NEXT_CYCLE, "cycle", 1 << 31),
        (P.CREDIT, "n", -5),
        (P.BATCH, "count", 0),
        (P.CYCLE_START, "shard_pos", 1 << 62),
    ],
)
def test_int_out_of_its_range_is_rejected(kind: str, field: str, value: int) -> None:
    """Every int is range-checked at decode, before it can reach a C long or a numpy index."""
    header = _header(kind, tensors=[]) if kind == P.BATCH else _header(kind)
    header[field] = value
    _reject([_pack(header)], rf"field '{field}' must be in \[")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_seconds_are_rejected(value: float) -> None:
    _reject([_pack(_header(P.CYCLE_END, regen_s=value))], "must be finite and >= 0")


def test_a_deeply_nested_value_is_described_without_recursion() -> None:
    deep: Any = 1
    for _ in range(900):
        deep = [deep]
    header = _header(P.HELLO, spec=deep)
    msg = _reject([_pack(header)], "field 'spec' must be dict, got a list of 1")
    assert len(msg) < 200


@pytest.mark.parametrize(
    "shape", [[0, 1 << 31], [0, (1 << 31) - 1, (1 << 31) - 1, (1 << 31) - 1], [1 << 40, 1 << 40]]
)
def test_overflowing_shapes_are_protocol_errors(shape: list[int]) -> None:
    """A shape whose product overflows (even with zero bytes) never reaches torch."""
    header = _header(P.BATCH, count=1, tensors=[["x", "int8", shape]])
    _reject([_pack(header), b""], "shape")


def test_peek_kind_reads_the_kind_of_an_invalid_message() -> None:
    assert P.peek_kind([_pack({"v": 9, "kind": "hello"})]) == P.HELLO
    assert P.peek_kind([b"\xc1garbage"]) is None
    assert P.peek_kind([_pack({"kind": "nonsense"})]) is None
    assert P.peek_kind([]) is None


@pytest.mark.parametrize(
    ("kind", "field"),
    [(P.HELLO, "rank"), (P.HELLO, "credits"), (P.CREDIT, "n"), (P.NEXT_CYCLE, "batch")],
)
def test_bool_where_int_expected_is_rejected(kind: str, field: str) -> None:
    msg = _reject([_pack(_header(kind, **{field: True}))], f"field '{field}' must be int")
    assert "True" in msg


def test_int_is_accepted_where_number_expected() -> None:
    msg = P.decode([_pack(_header(P.CYCLE_END, regen_s=2))])
    assert msg["regen_s"] == 2


def test_unknown_extra_fields_are_ignored() -> None:
    assert P.decode([_pack(_header(P.CREDIT, future_field=[1, 2]))])["n"] == 1


def test_shape_times_itemsize_must_match_frame_length() -> None:
    msg = _reject(_batch_frames([["x", "int32", [2, 3]]], bytes(20)), "tensor 'x'")
    assert "[2, 3] x 4 bytes = 24" in msg
    assert "20 bytes" in msg
    _reject(_batch_frames([["x", "float64", [1]]], bytes(9)), "= 8, but its frame has 9")
    _reject(_batch_frames([["x", "int8", [0]]], b"\x00"), "= 0, but its frame has 1")


@pytest.mark.parametrize(("described", "sent"), [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_frame_count_must_match_tensor_count(described: int, sent: int) -> None:
    descr = [[f"t{i}", "int8", [1]] for i in range(described)]
    msg = _reject(_batch_frames(descr, *[b"\x00"] * sent), "frames followed")
    assert f"describes {described} tensors but {sent} frames" in msg


@pytest.mark.parametrize("kind", [P.HELLO, P.BYE, P.ERROR])
def test_non_batch_messages_have_one_frame(kind: str) -> None:
    _reject([_pack(_header(kind)), b"extra"], f"{kind} message must have 1 frame, got 2")


def test_oversize_header_is_rejected() -> None:
    header = _header(P.ERROR, message="x" * P.MAX_HEADER_BYTES)
    msg = _reject([_pack(header)], "header frame of")
    assert f"exceeds {P.MAX_HEADER_BYTES}" in msg
    # Just under the limit is fine.
    ok = _header(P.ERROR, message="")
    room = P.MAX_HEADER_BYTES - len(_pack(ok)) - 8
    assert P.decode([_pack(_header(P.ERROR, message="y" * room))])["message"] == "y" * room


def test_batch_over_max_bytes_is_rejected() -> None:
    frames = P.encode(P.BATCH, BATCH_FIELDS, {"a": torch.zeros(64), "b": torch.zeros(64)})
    assert P.decode(frames, max_bytes=512).tensors["a"].shape == (64,)
    _reject(frames, "exceeds the 511-byte message limit", max_bytes=511)
    _reject(frames, "the 100-byte message limit", max_bytes=100)


@pytest.mark.parametrize("dtype", ["object", "complex64", "float8", "uint32", "str", "int"])
def test_disallowed_dtype_on_the_wire_is_rejected(dtype: str) -> None:
    msg = _reject(_batch_frames([["x", dtype, [1]]], b"\x00" * 8), f"dtype '{dtype}' not in")
    assert "bfloat16" in msg  # lists what is allowed


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(2, dtype=np.complex64),
        np.array(["a"], dtype=object),
        np.zeros(2, dtype=np.uint32),
        torch.zeros(2, dtype=torch.complex64),
    ],
    ids=["np-complex64", "np-object", "np-uint32", "torch-complex64"],
)
def test_disallowed_dtype_cannot_be_encoded(array: Any) -> None:
    with pytest.raises(ProtocolError, match="cannot be sent"):
        P.encode(P.BATCH, BATCH_FIELDS, {"x": array})


def test_duplicate_tensor_names_are_rejected() -> None:
    descr = [["x", "int8", [1]], ["x", "int8", [1]]]
    _reject(_batch_frames(descr, b"\x00", b"\x00"), "duplicate tensor names")


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ([-1], "negative dim"),
        ([2, -3], "negative dim"),
        ([True], "bool dim"),
        ([1.0], "float dim"),
        (["2"], "str dim"),
        (7, "not a list"),
        ([1] * (P.MAX_NDIM + 1), "too many dims"),
    ],
)
def test_bad_shapes_are_rejected(shape: Any, why: str) -> None:
    _reject(_batch_frames([["x", "int8", shape]], b"\x00"), "shape must be")


@pytest.mark.parametrize(
    ("item", "match"),
    [
        (["x", "int8"], "descriptor must be"),
        ("x:int8:1", "descriptor must be"),
        (["", "int8", [1]], "string of 1-256 chars"),
        ([3, "int8", [1]], "string of 1-256 chars"),
    ],
)
def test_bad_tensor_descriptors_are_rejected(item: Any, match: str) -> None:
    _reject(_batch_frames([item], b"\x00"), match)


def test_too_many_tensors_are_rejected() -> None:
    n = P.MAX_TENSORS + 1
    descr = [[f"t{i}", "int8", [0]] for i in range(n)]
    _reject(_batch_frames(descr, *[b""] * n), f"{n} tensors")


def test_cpu_only() -> None:
    meta = torch.empty(2, device="meta")
    with pytest.raises(ProtocolError, match="moved to CPU"):
        P.encode(P.BATCH, BATCH_FIELDS, {"x": meta})


# --------------------------------------------------------------------------- docs


def test_worked_hello_example_in_the_docs_matches_the_encoder() -> None:
    """docs/protocol.md section 9 shows the exact bytes; keep them true."""
    import json
    import re

    from lensfeed.common.spec import DataSpec
    from tests._util import REPO

    doc = (REPO / "docs" / "protocol.md").read_text()
    spec = DataSpec(
        dataset="data/demo",
        columns=("input_ids",),
        world_size=2,
        batch_size=32,
        cycle_size=2048,
        initial_cycle_size=2048,
        seed=0,
        shuffle=True,
    )
    canonical = json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))
    assert canonical in doc
    assert spec.fingerprint() == "b46805dc2d29b13a"
    hello = {
        "rank": 1,
        "world_size": 2,
        "spec": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "cycle": 0,
        "batch": 0,
        "credits": 8,
    }
    frames = P.encode(P.HELLO, hello)
    assert len(frames) == 1
    dump = re.findall(r"^[0-9a-f]{4}: ((?:[0-9a-f]{2} ?)+)$", doc, flags=re.MULTILINE)
    documented = bytes.fromhex("".join(dump))
    assert documented == bytes(frames[0])
    assert f"the {len(documented)} bytes of frame 0" in doc
    assert P.decode([documented])["spec"] == spec.to_dict()
