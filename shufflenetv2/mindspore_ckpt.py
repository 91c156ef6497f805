"""MindSpore ``.ckpt`` files, read and written without MindSpore or protobuf.

A checkpoint is a proto2 stream::

    Checkpoint  { repeated Value value = 1; }
    Value       { required string tag = 1; oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

MindSpore serialises one ``Checkpoint`` per parameter and writes them back to back; protobuf merges
them into one message, so the file is simply a sequence of ``value`` fields.  Tensors larger than
512 MiB are split into consecutive values with the same tag whose contents are concatenated.  With
``crc_check=True`` the stream is followed by ``b"crc_num"`` and a 10-byte big-endian CRC32 of
everything before it.  Encrypted files start with a 32-bit magic number and are refused.

The parser works on a memoryview of the file and checks every length against the bytes that remain,
so a corrupt length field can never make it allocate more than the file holds.  Nor can a count: a
tensor may have at most ``MAX_DIMS`` dimensions, and the slices of a tensor are joined as they are
read, so the memory for a file grows with its bytes and its number of tensors, not its number of fields.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .errors import CheckpointError

CRC_MARKER = b"crc_num"
CRC_TRAILER_LEN = len(CRC_MARKER) + 10
ENCRYPTION_MAGICS = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}
# MindSpore splits tensors above 512 MiB into several values with the same tag
SLICE_BYTES = 512 * 1024 * 1024
# numpy 2's limit (numpy 1 allows 32; reshape reports those): more dims are refused while parsing,
# before a corrupt file's packed dims field can grow a list of millions of them
MAX_DIMS = 64

DTYPES: dict[str, np.dtype] = {
    "Float16": np.dtype("<f2"),
    "Float32": np.dtype("<f4"),
    "Float64": np.dtype("<f8"),
    "Int8": np.dtype("i1"),
    "Int16": np.dtype("<i2"),
    "Int32": np.dtype("<i4"),
    "Int64": np.dtype("<i8"),
    "UInt8": np.dtype("u1"),
    "UInt16": np.dtype("<u2"),
    "UInt32": np.dtype("<u4"),
    "UInt64": np.dtype("<u8"),
    "Bool": np.dtype("?"),
}
# older MindSpore releases spell the unsigned types "Uint"
DTYPES.update({name.replace("UInt", "Uint"): dt for name, dt in list(DTYPES.items()) if name.startswith("UInt")})
BFLOAT16 = "BFloat16"  # numpy has no bfloat16: kept as raw uint16 bits, widened to float32 on read
TYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items() if not name.startswith("Uint")}


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Reader:
    """Just enough of the protobuf wire format: varints and length-delimited fields."""

    def __init__(self, buf: memoryview, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def done(self) -> bool:
        return self.pos >= len(self.buf)

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.where}: {what} at byte {self.pos}; the file is corrupt or not a MindSpore checkpoint"
        )

    def varint(self) -> int:
        result = shift = 0
        buf, pos = self.buf, self.pos
        while True:
            if pos >= len(buf):
                raise self.fail("truncated varint")
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return result
            shift += 7
            if shift >= 70:
                raise self.fail("varint longer than 10 bytes")

    def field(self) -> tuple[int, int, int | memoryview]:
        """The next (field number, wire type, value); length-delimited values are memoryviews."""
        key = self.varint()
        number, wire = key >> 3, key & 7
        if number == 0:
            raise self.fail("field number 0")
        if wire == 0:
            return number, wire, self.varint()
        if wire in (1, 5):
            size = 8 if wire == 1 else 4
            return number, wire, self.take(size)
        if wire == 2:
            return number, wire, self.take(self.varint())
        raise self.fail(f"unsupported wire type {wire}")

    def take(self, size: int) -> memoryview:
        if size > len(self.buf) - self.pos:
            raise self.fail(f"length {size} runs past the end ({len(self.buf) - self.pos} bytes left)")
        out = self.buf[self.pos : self.pos + size]
        self.pos += size
        return out


def _text(raw: int | memoryview, reader: _Reader, what: str) -> str:
    if not isinstance(raw, memoryview):
        raise reader.fail(f"{what} is not length-delimited")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise reader.fail(f"{what} is not UTF-8") from None


def _parse_tensor(buf: memoryview, name: str, tag: str | None) -> tuple[list[int], str, memoryview]:
    where = f"{name} [{tag or '?'}]"
    reader = _Reader(buf, where)
    dims: list[int] = []
    dtype: str | None = None
    content: memoryview | None = None
    while not reader.done():
        number, wire, value = reader.field()
        if number == 1:
            if wire == 0:
                dims.append(int(value))
            elif wire == 2:  # packed repeated int64
                packed = _Reader(value, where)
                while not packed.done() and len(dims) <= MAX_DIMS:
                    dims.append(packed.varint())
            if len(dims) > MAX_DIMS:
                raise CheckpointError(
                    f"{name}: parameter {tag or '?'!r} has more than {MAX_DIMS} dimensions; the file is corrupt"
                )
        elif number == 2:
            dtype = _text(value, reader, "tensor_type")
        elif number == 3:
            if not isinstance(value, memoryview):
                raise reader.fail("tensor_content is not length-delimited")
            content = value
    if dtype is None or content is None:
        raise CheckpointError(f"{where}: tensor without tensor_type or tensor_content; the file is corrupt")
    if any(d >= 1 << 63 for d in dims):
        raise CheckpointError(f"{where}: negative dimension {dims}; the file is corrupt")
    return dims, dtype, content


def _values(buf: memoryview, name: str) -> Iterator[tuple[str, list[int], str, memoryview]]:
    reader = _Reader(buf, name)
    while not reader.done():
        number, wire, value = reader.field()
        if number != 1:
            continue  # unknown top-level field: protobuf semantics say skip it
        if wire != 2:
            raise reader.fail("Checkpoint.value is not length-delimited")
        inner = _Reader(value, name)
        tag: str | None = None
        tensor: tuple[list[int], str, memoryview] | None = None
        while not inner.done():
            f_number, _, f_value = inner.field()
            if f_number == 1:
                tag = _text(f_value, inner, "tag")
            elif f_number == 2:
                if not isinstance(f_value, memoryview):
                    raise inner.fail("tensor is not length-delimited")
                tensor = _parse_tensor(f_value, name, tag)
            elif f_number == 3:
                raise CheckpointError(
                    f"{name}: parameter {tag!r} is a MapTensor (embedding hash table); "
                    "ShuffleNetV2 checkpoints never contain one, so this file is not a ShuffleNetV2 checkpoint"
                )
        if tag is None or tensor is None:
            raise CheckpointError(f"{name}: a value without tag or tensor at byte {reader.pos}; the file is corrupt")
        yield (tag, *tensor)


def _decode(tag: str, dims: list[int], dtype: str, content: memoryview | bytearray, name: str) -> np.ndarray:
    if dtype == BFLOAT16:
        np_dtype = np.dtype("<u2")
    elif dtype in DTYPES:
        np_dtype = DTYPES[dtype]
    else:
        raise CheckpointError(f"{name}: parameter {tag!r} has tensor_type {dtype!r}, which is not a numeric type")
    if len(content) % np_dtype.itemsize:
        raise CheckpointError(
            f"{name}: parameter {tag!r} holds {len(content)} bytes, not a multiple of {dtype}'s "
            f"{np_dtype.itemsize}; the file is truncated or corrupt"
        )
    flat = np.frombuffer(content, np_dtype)
    if dims == [0] and flat.size == 0:  # an empty 1-d tensor: MindSpore writes it with dims [0] too
        array = flat
    elif dims in ([], [0]):  # MindSpore writes scalars with dims [] or [0]
        if flat.size != 1:
            raise CheckpointError(f"{name}: scalar {tag!r} holds {flat.size} values; the file is corrupt")
        array = flat.reshape(())
    else:
        expected = 0 if 0 in dims else 1
        for d in dims:
            expected *= d
            if expected > flat.size:
                break
        if expected != flat.size:
            raise CheckpointError(
                f"{name}: parameter {tag!r} has shape {dims} but holds {flat.size} values; "
                "the file is truncated or corrupt"
            )
        try:
            array = flat.reshape(dims)
        except ValueError as exc:  # more than numpy's 64 dimensions, or an unrepresentable empty shape
            raise CheckpointError(f"{name}: parameter {tag!r} has shape {dims}: {exc}; the file is corrupt") from None
    if dtype == BFLOAT16:
        array = bfloat16_bits_to_float32(array)
    return array.copy()


def detect_encryption(head: bytes) -> str | None:
    """The cipher name if ``head`` starts with one of MindSpore's encryption magic numbers."""
    if len(head) < 4:
        return None
    for order in ("little", "big"):
        cipher = ENCRYPTION_MAGICS.get(int.from_bytes(head[:4], order))
        if cipher:
            return cipher
    return None


def parse_ckpt(data: bytes, name: str = "checkpoint", verify_crc: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a checkpoint's bytes, in file order; slices of one tag are joined."""
    cipher = detect_encryption(data)
    if cipher:
        raise CheckpointError(
            f"{name} is an encrypted MindSpore checkpoint ({cipher}); it cannot be read without its key. "
            "Decrypt it in MindSpore (load_checkpoint(..., dec_key=...) then save_checkpoint without enc_key) "
            "and try again"
        )
    view = memoryview(data)
    if len(view) >= CRC_TRAILER_LEN and bytes(view[-CRC_TRAILER_LEN:-10]) == CRC_MARKER:
        stored = int.from_bytes(view[-10:], "big")
        view = view[:-CRC_TRAILER_LEN]
        if verify_crc and binascii.crc32(view) != stored:
            raise CheckpointError(
                f"{name}: CRC32 check failed (stored {stored:#010x}, computed {binascii.crc32(view):#010x}); "
                "the file was modified or damaged after MindSpore wrote it: download or copy it again"
            )
    if len(view) == 0:
        raise CheckpointError(f"{name} is empty; it holds no parameters")
    # join consecutive slices with the same tag, as MindSpore's loader does; each tensor is decoded as
    # soon as the next tag starts, so no per-slice objects pile up however many slices a file has
    tensors: dict[str, np.ndarray] = {}
    group: tuple[str, list[int], str] | None = None
    content: memoryview | bytearray = memoryview(b"")
    for tag, dims, dtype, part in _values(view, name):
        if group is not None and group[0] == tag:
            if group[2] != dtype:
                raise CheckpointError(f"{name}: slices of {tag!r} disagree on dtype; the file is corrupt")
            if isinstance(content, memoryview):
                content = bytearray(content)
            content += part
            continue
        if group is not None:
            _store(tensors, group, content, name)
        group, content = (tag, dims, dtype), part
    if group is not None:
        _store(tensors, group, content, name)
    return tensors


def _store(
    tensors: dict[str, np.ndarray], group: tuple[str, list[int], str], content: memoryview | bytearray, name: str
) -> None:
    tag, dims, dtype = group
    if tag in tensors:
        raise CheckpointError(f"{name}: parameter {tag!r} appears twice; the file is corrupt")
    tensors[tag] = _decode(tag, dims, dtype, content, name)


def read_ckpt(path: str | os.PathLike[str], verify_crc: bool = True) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_ckpt(data, str(path), verify_crc)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_value(tag: str, array: np.ndarray) -> list[bytes]:
    """One serialised ``Checkpoint`` per slice, as MindSpore writes them (dims unpacked, C order)."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    type_name = TYPE_NAMES.get(array.dtype)
    if type_name is None:
        raise CheckpointError(f"cannot write {tag!r}: dtype {array.dtype} has no MindSpore tensor_type")
    dims = list(array.shape) if array.ndim else [0]  # MindSpore's own scalar convention
    flat = np.ascontiguousarray(array).reshape(-1)  # MindSpore splits the flattened data, not axis 0
    slices = [flat]
    if flat.nbytes > SLICE_BYTES and array.ndim:
        slices = np.array_split(flat, -(-flat.nbytes // SLICE_BYTES))
    head = b"".join(_varint(1 << 3 | 0) + _varint(d) for d in dims) + _len_field(2, type_name.encode())
    return [
        _len_field(1, _len_field(1, tag.encode()) + _len_field(2, head + _len_field(3, part.tobytes())))
        for part in slices
    ]


def serialize_ckpt(tensors: Mapping[str, np.ndarray], crc: bool = False) -> bytes:
    chunks = [chunk for tag, array in tensors.items() for chunk in encode_value(tag, array)]
    body = b"".join(chunks)
    if crc:
        body += CRC_MARKER + binascii.crc32(body).to_bytes(10, "big")
    return body
