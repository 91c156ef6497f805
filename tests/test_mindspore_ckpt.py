"""Tests of the protobuf-free MindSpore ``.ckpt`` reader/writer.

The files are built here by hand with a tiny encoder of the protobuf wire format (independent of the
module's own), following the layout MindSpore writes: one ``Checkpoint`` message per parameter, back
to back; ``Value { tag = 1; tensor = 2 }``; ``TensorProto { dims = 1; tensor_type = 2; content = 3 }``.
"""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import numpy as np
import pytest

from shufflenetv2 import mindspore_ckpt
from shufflenetv2.errors import CheckpointError
from shufflenetv2.mindspore_ckpt import detect_encryption, parse_ckpt, read_ckpt, serialize_ckpt

from .conftest import shared_file

# --------------------------------------------------------------------------- independent encoder


def varint(n: int) -> bytes:
    """Base-128 varint; negative int64 values are written as their 10-byte two's complement."""
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return key(number, 2) + varint(len(payload)) + payload


def tensor_msg(dims: list[int], type_name: str, content: bytes, packed: bool = False) -> bytes:
    if packed:
        dims_bytes = ld(1, b"".join(varint(d) for d in dims)) if dims else b""
    else:
        dims_bytes = b"".join(key(1, 0) + varint(d) for d in dims)
    return dims_bytes + ld(2, type_name.encode()) + ld(3, content)


def value_msg(tag: str, tensor: bytes) -> bytes:
    return ld(1, tag.encode()) + ld(2, tensor)


def checkpoint(*values: bytes) -> bytes:
    """One serialised ``Checkpoint`` holding the given ``Value`` messages."""
    return b"".join(ld(1, v) for v in values)


def entry(tag: str, dims: list[int], type_name: str, content: bytes, packed: bool = False) -> bytes:
    """One ``Checkpoint`` per parameter, as MindSpore writes them."""
    return checkpoint(value_msg(tag, tensor_msg(dims, type_name, content, packed)))


def with_crc(body: bytes) -> bytes:
    return body + b"crc_num" + zlib.crc32(body).to_bytes(10, "big")


def le(array: np.ndarray) -> bytes:
    """Raw little-endian C-order bytes, whatever the host byte order."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns of float32 values that bfloat16 represents exactly."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


# every tensor_type string MindSpore writes, with the numpy dtype it must read back as
TYPE_TABLE = [
    ("Float16", np.float16),
    ("Float32", np.float32),
    ("Float64", np.float64),
    ("Int8", np.int8),
    ("Int16", np.int16),
    ("Int32", np.int32),
    ("Int64", np.int64),
    ("UInt8", np.uint8),
    ("UInt16", np.uint16),
    ("UInt32", np.uint32),
    ("UInt64", np.uint64),
    ("Uint8", np.uint8),
    ("Uint16", np.uint16),
    ("Uint32", np.uint32),
    ("Uint64", np.uint64),
    ("Bool", np.bool_),
]
WRITABLE = [(name, dt) for name, dt in TYPE_TABLE if not name.startswith("Uint")]


def sample(dtype: type, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic values that use the extremes of integer types."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        flat = rng.integers(0, 2, size).astype(bool)
    elif dt.kind == "f":
        flat = (rng.standard_normal(size) * 100).astype(dt)
        if size >= 3:
            flat[:3] = [0.0, -0.0, np.finfo(dt).max]
    else:
        info = np.iinfo(dt)
        flat = rng.integers(info.min, info.max, size, dtype=dt, endpoint=True)
        if size >= 2:
            flat[:2] = [info.min, info.max]
    return flat.reshape(shape)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f")


# --------------------------------------------------------------------------- the encoder itself


def test_hand_encoder_matches_known_protobuf_bytes() -> None:
    # sanity of the test's own encoder against bytes worked out from the protobuf spec
    assert varint(0) == b"\x00"
    assert varint(1) == b"\x01"
    assert varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01"
    assert varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    assert ld(1, b"ab") == b"\x0a\x02ab"
    assert tensor_msg([2, 3], "Int8", b"\x01" * 6) == b"\x08\x02\x08\x03\x12\x04Int8\x1a\x06" + b"\x01" * 6
    assert tensor_msg([2, 300], "Int8", b"", packed=True) == b"\x0a\x03\x02\xac\x02\x12\x04Int8\x1a\x00"


# --------------------------------------------------------------------------- reading


def test_reads_several_concatenated_checkpoints_in_file_order() -> None:
    weight = sample(np.float32, (4, 3, 3, 3), seed=1)
    gamma = sample(np.float32, (4,), seed=2)
    steps = np.array([1, 2, 3], np.int64)
    data = (
        entry("first_conv.0.weight", [4, 3, 3, 3], "Float32", le(weight))
        + entry("first_conv.1.gamma", [4], "Float32", le(gamma))
        + entry("counts", [3], "Int64", le(steps))
    )
    got = parse_ckpt(data)
    assert list(got) == ["first_conv.0.weight", "first_conv.1.gamma", "counts"]
    assert_same(got["first_conv.0.weight"], weight)
    assert_same(got["first_conv.1.gamma"], gamma)
    assert_same(got["counts"], steps)


def test_several_values_inside_one_checkpoint_message() -> None:
    # protobuf merges concatenated messages, so values in one message read the same as in several
    a, b = sample(np.float32, (2, 2), 3), sample(np.int32, (5,), 4)
    one = checkpoint(
        value_msg("a", tensor_msg([2, 2], "Float32", le(a))), value_msg("b", tensor_msg([5], "Int32", le(b)))
    )
    several = entry("a", [2, 2], "Float32", le(a)) + entry("b", [5], "Int32", le(b))
    for data in (one, several):
        got = parse_ckpt(data)
        assert list(got) == ["a", "b"]
        assert_same(got["a"], a)
        assert_same(got["b"], b)


def test_returned_arrays_are_writable_copies() -> None:
    data = entry("w", [3], "Float32", le(np.arange(3, dtype=np.float32)))
    got = parse_ckpt(data)["w"]
    assert got.flags.writeable and got.flags.c_contiguous and got.flags.owndata
    got[0] = 42.0  # must not touch the (immutable) source bytes
    assert parse_ckpt(data)["w"][0] == 0.0


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked-dims", "packed-dims"])
@pytest.mark.parametrize(
    "cuts", [(28, 56), (1, 2), (0, 120), (13, 99)], ids=["by-element", "mid-element", "empty-first", "uneven"]
)
def test_tensor_split_into_three_values_with_the_same_tag(packed: bool, cuts: tuple[int, int]) -> None:
    full = sample(np.float32, (5, 6), seed=5)  # 30 elements, 120 bytes
    raw = le(full)
    parts = [raw[: cuts[0]], raw[cuts[0] : cuts[1]], raw[cuts[1] :]]
    data = (
        entry("before", [0], "Int32", le(np.int32(7)))
        + b"".join(entry("big", [5, 6], "Float32", part, packed) for part in parts)
        + entry("after", [2], "UInt8", b"\x01\x02")
    )
    got = parse_ckpt(data)
    assert list(got) == ["before", "big", "after"]
    assert_same(got["big"], full)
    assert_same(got["after"], np.array([1, 2], np.uint8))


@pytest.mark.parametrize("shape", [(7,), (2, 3), (2, 1, 300), (1, 1, 1, 1, 1)])
def test_dims_packed_and_unpacked_read_the_same(shape: tuple[int, ...]) -> None:
    array = sample(np.int16, shape, seed=6)
    unpacked = parse_ckpt(entry("x", list(shape), "Int16", le(array)))["x"]
    packed = parse_ckpt(entry("x", list(shape), "Int16", le(array), packed=True))["x"]
    assert_same(unpacked, array)
    assert_same(packed, array)


def test_dims_split_over_packed_and_unpacked_fields_accumulate() -> None:
    # protobuf parsers must accept both encodings of one repeated field, even mixed
    array = sample(np.uint8, (2, 3, 4), seed=7)
    tensor = key(1, 0) + varint(2) + ld(1, varint(3) + varint(4)) + ld(2, b"UInt8") + ld(3, le(array))
    assert_same(parse_ckpt(checkpoint(value_msg("x", tensor)))["x"], array)


@pytest.mark.parametrize("dims", [[], [0]], ids=["dims=[]", "dims=[0]"])
@pytest.mark.parametrize(
    ("type_name", "value"),
    [("Float32", np.float32(0.001)), ("Int32", np.int32(-5)), ("Float64", np.float64(np.pi)), ("Bool", np.bool_(True))],
)
def test_scalars_become_zero_dim_arrays(dims: list[int], type_name: str, value: np.generic) -> None:
    for packed in (False, True):
        got = parse_ckpt(entry("s", dims, type_name, le(np.asarray(value)), packed))["s"]
        assert got.shape == ()
        assert got.dtype == value.dtype
        assert got.item() == value.item()


@pytest.mark.parametrize(("type_name", "dtype"), TYPE_TABLE, ids=[name for name, _ in TYPE_TABLE])
def test_every_dtype_string(type_name: str, dtype: type) -> None:
    array = sample(dtype, (3, 4), seed=8)
    got = parse_ckpt(entry("t", [3, 4], type_name, le(array)))["t"]
    assert_same(got, array)
    assert got.dtype.isnative


def test_bfloat16_reads_as_float32_with_exact_values() -> None:
    # all exactly representable in bfloat16 (8 significant bits), subnormals and infinities included
    values = np.array(
        [
            [1.0, -2.5, 0.15625],
            [1.5 * 2.0**127, -0.0, np.inf],
            [-np.inf, 2.0**-126, 2.0**-130],
            [1.0078125, 65280.0, 0.0],
        ],
        np.float32,
    )
    bits = bf16_bits(values)
    assert np.array_equal(bits.astype(np.uint32) << 16, values.view(np.uint32))  # the test data is exact
    got = parse_ckpt(entry("b", [4, 3], "BFloat16", le(bits)))["b"]
    assert got.dtype == np.float32
    assert got.shape == (4, 3)
    assert np.array_equal(got.view(np.uint32), values.view(np.uint32))  # bit-exact, -0.0 included
    nan = parse_ckpt(entry("n", [0], "BFloat16", le(np.uint16(0x7FC0))))["n"]
    assert nan.shape == () and nan.dtype == np.float32 and np.isnan(nan)


def test_bfloat16_split_over_several_values() -> None:
    values = np.arange(-8, 8, dtype=np.float32) / 4  # exact in bfloat16
    raw = le(bf16_bits(values))
    data = entry("b", [4, 4], "BFloat16", raw[:10]) + entry("b", [4, 4], "BFloat16", raw[10:])
    assert_same(parse_ckpt(data)["b"], values.reshape(4, 4))


def test_unknown_fields_are_skipped() -> None:
    a = sample(np.float32, (2, 3), seed=9)
    junk = b"".join(
        [
            key(5, 0) + varint(123456789),  # varint
            ld(6, b"\x00\xff junk \x08\x01"),  # length-delimited
            key(7, 5) + b"\x01\x02\x03\x04",  # fixed32
            key(8, 1) + b"\x01\x02\x03\x04\x05\x06\x07\x08",  # fixed64
            key(2000, 0) + varint(1),  # large field number
        ]
    )
    tensor = tensor_msg([2, 3], "Float32", le(a)) + key(9, 0) + varint(1) + ld(10, b"ignored")
    value = value_msg("a", tensor) + key(11, 5) + b"\0\0\0\0"
    data = junk + checkpoint(value) + junk + entry("b", [1], "Int8", b"\x05") + junk
    got = parse_ckpt(data)
    assert list(got) == ["a", "b"]
    assert_same(got["a"], a)
    assert_same(got["b"], np.array([5], np.int8))


def test_training_checkpoint_names_survive() -> None:
    w = sample(np.float32, (8, 4, 1, 1), seed=10)
    m = sample(np.float32, (8, 4, 1, 1), seed=11)
    e = sample(np.float32, (8, 4, 1, 1), seed=12)
    data = (
        entry("features.0.branch_main.0.weight", [8, 4, 1, 1], "Float32", le(w))
        + entry("moments.features.0.branch_main.0.weight", [8, 4, 1, 1], "Float32", le(m))
        + entry("ema.features.0.branch_main.0.weight", [8, 4, 1, 1], "Float32", le(e))
        + entry("learning_rate", [], "Float32", le(np.float32(0.35)))
        + entry("momentum", [0], "Float32", le(np.float32(0.9)))
        + entry("global_step", [0], "Int32", le(np.int32(150150)))
    )
    got = parse_ckpt(data)
    assert list(got) == [
        "features.0.branch_main.0.weight",
        "moments.features.0.branch_main.0.weight",
        "ema.features.0.branch_main.0.weight",
        "learning_rate",
        "momentum",
        "global_step",
    ]
    assert_same(got["moments.features.0.branch_main.0.weight"], m)
    assert_same(got["ema.features.0.branch_main.0.weight"], e)
    assert_same(got["global_step"], np.array(150150, np.int32))
    assert_same(got["learning_rate"], np.array(0.35, np.float32))
    assert_same(got["momentum"], np.array(0.9, np.float32))


def test_unicode_tag() -> None:
    got = parse_ckpt(entry("层.权重", [1], "Float32", le(np.float32([1.5]))))
    assert list(got) == ["层.权重"]


def test_read_ckpt_from_a_path(tmp_path: Path) -> None:
    a = sample(np.float64, (3,), seed=13)
    path = tmp_path / "model.ckpt"
    path.write_bytes(with_crc(entry("a", [3], "Float64", le(a))))
    assert_same(read_ckpt(path)["a"], a)
    assert_same(read_ckpt(str(path), verify_crc=False)["a"], a)


def test_read_ckpt_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        read_ckpt(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_ckpt(tmp_path)  # a directory


# --------------------------------------------------------------------------- CRC trailer


def small_file() -> bytes:
    return (
        entry("w", [2, 3], "Float32", le(sample(np.float32, (2, 3), seed=14)))
        + entry("b", [2], "Float16", le(np.float16([0.5, -1.0])))
        + entry("global_step", [0], "Int32", le(np.int32(3)))
    )


def test_crc_trailer_correct_reads() -> None:
    body = small_file()
    data = with_crc(body)
    assert data[-17:-10] == b"crc_num"
    got = parse_ckpt(data)
    want = parse_ckpt(body)
    assert list(got) == list(want)
    for k in want:
        assert_same(got[k], want[k])


@pytest.mark.parametrize("where", ["body", "stored-crc"])
def test_crc_mismatch_is_refused(where: str) -> None:
    body = small_file()
    good = with_crc(body)
    positions = range(len(body)) if where == "body" else range(len(good) - 10, len(good))
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 0x01
        with pytest.raises(CheckpointError, match="CRC"):
            parse_ckpt(bytes(bad), name="f.ckpt")


def test_crc_not_verified_when_disabled() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = entry("a", [2, 3], "Float32", le(a))
    bad = bytearray(with_crc(body))
    bad[len(body) - 1] ^= 0x40  # a byte of the last float's content: still parses
    with pytest.raises(CheckpointError, match="CRC"):
        parse_ckpt(bytes(bad))
    got = parse_ckpt(bytes(bad), verify_crc=False)["a"]
    assert got.shape == (2, 3)
    assert np.array_equal(got.reshape(-1)[:5], a.reshape(-1)[:5])
    assert got[1, 2] != a[1, 2]


def test_only_a_crc_trailer_is_empty() -> None:
    with pytest.raises(CheckpointError, match="empty"):
        parse_ckpt(with_crc(b""))


# --------------------------------------------------------------------------- encrypted files


@pytest.mark.parametrize(
    ("magic", "cipher"), [(0x7F3A5ED8, "AES-GCM"), (0x7F3A5ED9, "AES-CBC"), (0x7F3A5EDA, "SM4-CBC")]
)
def test_encrypted_files_are_refused(magic: int, cipher: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(magic)
    data = magic.to_bytes(4, "little") + rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    assert detect_encryption(data) == cipher
    with pytest.raises(CheckpointError, match="encrypted") as info:
        parse_ckpt(data, name="secret.ckpt")
    assert cipher in str(info.value)
    assert "secret.ckpt" in str(info.value)
    path = tmp_path / "secret.ckpt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="encrypted"):
        read_ckpt(path, verify_crc=False)
    # the 4 magic bytes alone are enough
    with pytest.raises(CheckpointError, match="encrypted"):
        parse_ckpt(magic.to_bytes(4, "little"))


def test_plain_checkpoints_are_not_taken_for_encrypted() -> None:
    assert detect_encryption(small_file()) is None
    assert detect_encryption(b"") is None
    assert detect_encryption(b"\xd8\x5e\x3a") is None  # too short for a magic number


# --------------------------------------------------------------------------- corrupt files


def boundaries(chunks: list[bytes]) -> dict[int, int]:
    """Byte offset of each message boundary -> number of whole messages before it."""
    out, pos = {}, 0
    for i, chunk in enumerate(chunks, 1):
        pos += len(chunk)
        out[pos] = i
    return out


TRUNC_CHUNKS = [
    entry("w", [2, 3], "Float32", le(sample(np.float32, (2, 3), seed=15))),
    entry("big", [2, 2], "Int16", le(np.int16([1, 2]))) + entry("big", [2, 2], "Int16", le(np.int16([3, 4]))),
    entry("s", [0], "UInt8", b"\x09", packed=True),
    entry("bf", [2], "BFloat16", le(bf16_bits([1.0, 2.0]))),
]


@pytest.mark.parametrize("crc", [False, True], ids=["plain", "crc"])
def test_every_truncation_is_a_checkpoint_error(crc: bool) -> None:
    body = b"".join(TRUNC_CHUNKS)
    data = with_crc(body) if crc else body
    full = parse_ckpt(data)
    whole = boundaries(TRUNC_CHUNKS)
    tags = list(full)
    for cut in range(len(data)):
        if cut in whole:  # a clean message boundary is a valid, shorter checkpoint
            got = parse_ckpt(data[:cut])
            assert list(got) == tags[: whole[cut]]
            continue
        with pytest.raises(CheckpointError):
            parse_ckpt(data[:cut], name="cut.ckpt")


def test_random_corruption_never_escapes_as_another_exception() -> None:
    rng = np.random.default_rng(1234)
    base = bytearray(b"".join(TRUNC_CHUNKS))
    for _ in range(1500):
        bad = bytearray(base)
        for pos in rng.integers(0, len(bad), rng.integers(1, 4)):
            bad[pos] = int(rng.integers(0, 256))
        with contextlib.suppress(CheckpointError):  # anything else fails the test
            parse_ckpt(bytes(bad))


def test_length_claiming_2_to_the_40_bytes() -> None:
    huge = 1 << 40
    # at the top level
    with pytest.raises(CheckpointError, match="runs past the end"):
        parse_ckpt(key(1, 2) + varint(huge) + b"\x0a\x01x")
    # inside a tensor: tensor_content claims a terabyte
    tensor = key(1, 0) + varint(4) + ld(2, b"Float32") + key(3, 2) + varint(huge) + b"\0" * 16
    with pytest.raises(CheckpointError):
        parse_ckpt(checkpoint(value_msg("x", tensor)))


def test_varint_longer_than_ten_bytes() -> None:
    with pytest.raises(CheckpointError, match="varint"):
        parse_ckpt(b"\x0a" + b"\xff" * 11 + b"\x01")


@pytest.mark.parametrize(
    ("dims", "type_name", "content"),
    [
        ([2, 3], "Float32", b"\0" * 20),  # 5 values for 6
        ([2, 3], "Float32", b"\0" * 28),  # 7 values for 6
        ([2, 3], "Float32", b"\0" * 23),  # not a whole number of float32
        ([4], "Float64", b"\0" * 12),
        ([], "Int32", b"\0" * 8),  # a scalar with 2 values
        ([0], "Int32", b"\0" * 8),
        ([], "Int32", b""),  # a scalar with no value
        ([1 << 62, 1 << 62], "Int8", b"\0" * 4),  # product overflows int64
        ([3, 0], "Int8", b"\0"),  # an empty shape but one value
    ],
)
def test_content_size_not_matching_dims(dims: list[int], type_name: str, content: bytes) -> None:
    with pytest.raises(CheckpointError, match="'x'"):
        parse_ckpt(entry("x", dims, type_name, content))


def test_negative_dimension() -> None:
    with pytest.raises(CheckpointError, match="negative"):
        parse_ckpt(entry("x", [-1, 4], "Float32", b"\0" * 16))


def test_more_dims_than_numpy_supports() -> None:
    with pytest.raises(CheckpointError, match="'x'"):
        parse_ckpt(entry("x", [1] * 100, "Float32", b"\0" * 4))


def test_empty_shape_numpy_cannot_represent() -> None:
    with pytest.raises(CheckpointError, match="'x'"):
        parse_ckpt(entry("x", [0, 1 << 62, 1 << 62], "Float32", b""))


@pytest.mark.parametrize("type_name", ["str", "Complex64", "Float8", "float32", "", "Int4"])
def test_unknown_tensor_type(type_name: str) -> None:
    with pytest.raises(CheckpointError, match="tensor_type"):
        parse_ckpt(entry("x", [0], type_name, b"abcd"))


def test_empty_file() -> None:
    with pytest.raises(CheckpointError, match="empty"):
        parse_ckpt(b"", name="empty.ckpt")


def test_empty_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_ckpt(path)


def test_duplicate_non_consecutive_tags() -> None:
    data = entry("a", [1], "Int8", b"\x01") + entry("b", [1], "Int8", b"\x02") + entry("a", [1], "Int8", b"\x03")
    with pytest.raises(CheckpointError, match="'a'"):
        parse_ckpt(data)


def test_slices_disagreeing_on_dtype() -> None:
    data = entry("a", [2], "Int16", b"\x01\x00") + entry("a", [2], "UInt16", b"\x02\x00")
    with pytest.raises(CheckpointError, match="dtype"):
        parse_ckpt(data)


@pytest.mark.parametrize(
    "value",
    [
        ld(2, tensor_msg([1], "Int8", b"\x01")),  # no tag
        ld(1, b"x"),  # no tensor
        ld(1, b"x") + ld(2, ld(2, b"Int8")),  # tensor without content
        ld(1, b"x") + ld(2, ld(3, b"\x01")),  # tensor without tensor_type
        ld(1, b"x") + key(2, 0) + varint(5),  # tensor as a varint
        ld(1, b"x") + ld(2, key(2, 0) + varint(1) + ld(3, b"\x01")),  # tensor_type as a varint
        ld(1, b"x") + ld(2, ld(2, b"Int8") + key(3, 0) + varint(1)),  # content as a varint
        ld(1, b"\xff\xfe") + ld(2, tensor_msg([1], "Int8", b"\x01")),  # tag not UTF-8
        key(1, 0) + varint(1) + ld(2, tensor_msg([1], "Int8", b"\x01")),  # tag as a varint
        ld(1, b"x") + ld(3, ld(1, b"")),  # a MapTensor
    ],
    ids=[
        "no-tag",
        "no-tensor",
        "no-content",
        "no-type",
        "tensor-varint",
        "type-varint",
        "content-varint",
        "tag-not-utf8",
        "tag-varint",
        "maptensor",
    ],
)
def test_malformed_values(value: bytes) -> None:
    with pytest.raises(CheckpointError):
        parse_ckpt(entry("ok", [1], "Int8", b"\x01") + checkpoint(value))


@pytest.mark.parametrize(
    "data",
    [
        key(1, 0) + varint(1),  # Checkpoint.value as a varint
        b"\x00\x00",  # field number 0
        key(1, 3) + key(1, 4),  # group wire types
        key(1, 6) + b"\x00",
        key(1, 7) + b"\x00",
        b"\x80",  # truncated varint key
        b"crc_num" + b"\x00" * 10,  # only a trailer-looking thing, with a wrong CRC
        b"PK\x03\x04" + b"\x00" * 40,  # a zip file (torch .pt / .npz)
        b"\x80\x02}q\x00.",  # a pickle
    ],
    ids=["value-varint", "field-0", "groups", "wire-6", "wire-7", "truncated-key", "bad-trailer", "zip", "pickle"],
)
def test_not_a_checkpoint(data: bytes) -> None:
    with pytest.raises(CheckpointError):
        parse_ckpt(data)


def test_error_messages_name_the_file() -> None:
    with pytest.raises(CheckpointError, match=r"weights\.ckpt"):
        parse_ckpt(entry("x", [2], "Float32", b"\0" * 4), name="weights.ckpt")
    with pytest.raises(CheckpointError, match=r"weights\.ckpt"):
        parse_ckpt(b"\x0a\x05ab", name="weights.ckpt")


# --------------------------------------------------------------------------- writing

SHAPES = [(), (1,), (5,), (2, 3), (2, 3, 4), (1, 1, 3, 1), (0,), (3, 0), (0, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize(("type_name", "dtype"), WRITABLE, ids=[name for name, _ in WRITABLE])
def test_serialize_then_parse_round_trips(type_name: str, dtype: type, shape: tuple[int, ...]) -> None:
    array = sample(dtype, shape, seed=len(shape))
    data = serialize_ckpt({"before": np.float32(1.0), "x": array, "after": np.int8([7])})
    got = parse_ckpt(data)
    assert list(got) == ["before", "x", "after"]
    assert_same(got["x"], array)
    # the same bytes MindSpore would write for it
    dims = list(shape) if shape else [0]
    assert entry("x", dims, type_name, le(array)) in data


def test_writer_bytes_equal_hand_built_bytes() -> None:
    tensors = {
        "first_conv.0.weight": sample(np.float32, (4, 3, 3, 3), seed=16),
        "first_conv.1.moving_mean": sample(np.float32, (4,), seed=17),
        "global_step": np.array(1000, np.int32),
        "learning_rate": np.float32(0.125),
        "mask": np.array([[True, False], [False, True]]),
        "codes": np.arange(300, dtype=np.uint16),  # a dimension over 127: a 2-byte varint
        "half": np.float16([1.5, -2.0]),
        "bytes": np.arange(4, dtype=np.uint8),
    }
    expected = (
        entry("first_conv.0.weight", [4, 3, 3, 3], "Float32", le(tensors["first_conv.0.weight"]))
        + entry("first_conv.1.moving_mean", [4], "Float32", le(tensors["first_conv.1.moving_mean"]))
        + entry("global_step", [0], "Int32", le(np.int32(1000)))
        + entry("learning_rate", [0], "Float32", le(np.float32(0.125)))
        + entry("mask", [2, 2], "Bool", b"\x01\x00\x00\x01")
        + entry("codes", [300], "UInt16", le(tensors["codes"]))
        + entry("half", [2], "Float16", le(tensors["half"]))
        + entry("bytes", [4], "UInt8", b"\x00\x01\x02\x03")
    )
    assert serialize_ckpt(tensors) == expected
    assert serialize_ckpt(tensors, crc=True) == with_crc(expected)


def test_writer_crc_trailer_present_and_verifies() -> None:
    tensors = {"a": sample(np.float64, (3, 2), seed=18), "b": np.int64(-3)}
    plain = serialize_ckpt(tensors)
    data = serialize_ckpt(tensors, crc=True)
    assert data[: len(plain)] == plain
    assert data[len(plain) :] == b"crc_num" + zlib.crc32(plain).to_bytes(10, "big")
    got = parse_ckpt(data)
    assert_same(got["a"], tensors["a"])
    assert_same(got["b"], np.array(-3, np.int64))
    bad = bytearray(data)
    bad[5] ^= 0xFF
    with pytest.raises(CheckpointError, match="CRC"):
        parse_ckpt(bytes(bad))


def test_writer_accepts_big_endian_and_non_contiguous_arrays() -> None:
    base = sample(np.float32, (4, 6), seed=19)
    tensors = {
        "big_endian": base.astype(">f4"),
        "big_endian_int": np.arange(-3, 3, dtype=">i8"),
        "fortran": np.asfortranarray(base),
        "strided": base[::2, ::3],
        "transposed": base.T,
        "python_list": [[1.0, 2.0], [3.0, 4.0]],
    }
    got = parse_ckpt(serialize_ckpt(tensors))
    assert_same(got["big_endian"], base)
    assert_same(got["big_endian_int"], np.arange(-3, 3, dtype=np.int64))
    assert_same(got["fortran"], base)
    assert_same(got["strided"], np.ascontiguousarray(base[::2, ::3]))
    assert_same(got["transposed"], np.ascontiguousarray(base.T))
    assert_same(got["python_list"], np.array([[1.0, 2.0], [3.0, 4.0]]))
    assert serialize_ckpt({"x": base.astype(">f4")}) == serialize_ckpt({"x": base})


@pytest.mark.parametrize(
    "array",
    [np.zeros(2, np.complex64), np.array(["ab"]), np.array([object()]), np.zeros(2, np.dtype("V4"))],
    ids=["complex64", "str", "object", "void"],
)
def test_writer_refuses_dtypes_mindspore_cannot_hold(array: np.ndarray) -> None:
    with pytest.raises(CheckpointError, match="'x'"):
        serialize_ckpt({"x": array})


def test_writer_empty_mapping_writes_nothing() -> None:
    assert serialize_ckpt({}) == b""


# --------------------------------------------------------------------------- 512 MiB slices


@pytest.mark.parametrize(
    ("shape", "dtype", "slice_bytes"),
    [
        ((40,), np.float32, 64),  # 160 bytes -> 3 slices
        ((1, 40), np.float32, 64),  # a leading dimension of 1 must still be split
        ((2, 3, 5), np.int16, 16),  # 60 bytes -> 4 slices
        ((7, 3), np.float64, 100),  # 168 bytes -> 2 slices
        ((3,), np.uint8, 1),  # one byte per slice
    ],
)
def test_large_tensors_are_split_like_mindspore(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], dtype: type, slice_bytes: int
) -> None:
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", slice_bytes)
    array = sample(dtype, shape, seed=20)
    small = np.int8([5])  # one byte: never split
    data = serialize_ckpt({"small": small, "big": array})
    # MindSpore: np.array_split(data.reshape(-1), ceil(nbytes / SLICE)), one Checkpoint per slice
    count = -(-array.nbytes // slice_bytes)
    assert count >= 2
    parts = np.array_split(array.reshape(-1), count)
    assert all(part.nbytes <= slice_bytes + array.itemsize for part in parts)
    expected = entry("small", [1], "Int8", le(small)) + b"".join(
        entry("big", list(shape), mindspore_ckpt.TYPE_NAMES[np.dtype(dtype)], le(part)) for part in parts
    )
    assert data == expected
    got = parse_ckpt(data)
    assert list(got) == ["small", "big"]
    assert_same(got["big"], array)


def test_tensor_at_exactly_the_slice_size_is_not_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 64)
    array = sample(np.float32, (16,), seed=21)  # exactly 64 bytes
    assert serialize_ckpt({"x": array}) == entry("x", [16], "Float32", le(array))
    array = sample(np.float32, (17,), seed=21)  # one element over
    assert serialize_ckpt({"x": array}).count(b"\x0a\x01x") == 2


def test_scalars_are_never_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 1)
    assert serialize_ckpt({"s": np.float64(2.5)}) == entry("s", [0], "Float64", le(np.float64(2.5)))
    assert_same(parse_ckpt(serialize_ckpt({"s": np.float64(2.5)}))["s"], np.array(2.5))


def test_default_slice_size_is_512_mib() -> None:
    assert mindspore_ckpt.SLICE_BYTES == 512 * 1024 * 1024


# --------------------------------------------------------------------------- a real MindCV file


def test_real_mindcv_checkpoint() -> None:
    fixture = shared_file("fixtures/mindcv/shufflenet_v2_x0_5_c10.ckpt")
    tensors = read_ckpt(fixture)
    assert len(tensors) == 281
    first = next(iter(tensors))
    assert first == "first_conv.0.weight"
    assert tensors[first].shape == (24, 3, 3, 3)
    assert tensors[first].dtype == np.float32
    assert "classifier.weight" in tensors
    assert all(np.isfinite(t).all() for t in tensors.values())
    assert serialize_ckpt(tensors) == fixture.read_bytes()
