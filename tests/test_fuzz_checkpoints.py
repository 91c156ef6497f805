"""Bad weight files, generated: whatever the bytes, readers fail with ``CheckpointError`` or succeed.

A user's download can be cut short, a disk can flip bits, and a file found online can be hostile.  The
``.ckpt`` parser is ours, so it is fuzzed hardest (1650 inputs a run): files built by the
package's own writer and then damaged where a real file breaks (length fields, counts, chunk
boundaries), well-formed protobuf with the wrong structure, and plain random bytes.  Every input must
parse or raise ``CheckpointError`` naming the file, within ``TIME_LIMIT`` seconds and with a peak
allocation bounded by the input's size, so no length field read from the file is ever trusted before
it is checked.  safetensors and ``.pth`` files go through ``read_weights`` the same way (fewer inputs:
their parsers are not ours, but what escapes from them is).  Pickles that carry code must be refused
without the code running, and tensors of the wrong shape must be reported by name with both shapes.

Hypothesis runs derandomized and without its example database, so CI sees the same inputs every run
(its caches in .hypothesis/ ignore themselves in git).
"""

from __future__ import annotations

import binascii
import builtins
import contextlib
import json
import os
import pickle
import re
import shlex
import signal
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from shufflenetv2 import CheckpointError, create_model, load_weights, mindspore_ckpt, read_weights, save_weights
from shufflenetv2.mindspore_ckpt import parse_ckpt, serialize_ckpt

TIME_LIMIT = 2.0  # seconds per input; the largest generated input parses in milliseconds
SLACK = 64 << 10  # fixed overhead on top of the proportional bound: an error with its traceback is ~5 kB
# no "explain" phase: on a failure it reruns thousands of variants (minutes), the shrunk input is enough
FUZZ = {"deadline": None, "derandomize": True, "database": None, "phases": [Phase.generate, Phase.shrink]}
# tmp_path is shared by the examples of one test; each example overwrites its file before reading it
FILES = {**FUZZ, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}

# torch.load warns about the pickle protocol of damaged and hand-made pickles; the tests check the outcome
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

# --------------------------------------------------------------------------- limits on one call


class Overtime(BaseException):  # not an Exception, so no reader under test can swallow it
    """Raised by SIGALRM inside a call that ran past ``TIME_LIMIT``."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (where SIGALRM exists), and fail if it took longer."""
    armed = hasattr(signal, "setitimer")
    if armed:

        def on_alarm(signum: int, frame: object) -> None:
            raise Overtime(f"still running after {seconds} s: a hang")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s"


def outcome(call: Callable[[], Any], name: str) -> Any:
    """``call()``'s result, or the ``CheckpointError`` it raised; any other exception fails the test.

    The error must name the file (``name``), so a user knows which file is bad.
    """
    try:
        return call()
    except CheckpointError as exc:
        assert name in str(exc), str(exc)
        return exc


def bounded(call: Callable[[], Any], size: int, name: str, seconds: float = TIME_LIMIT) -> Any:
    """``outcome(call, name)`` under the fuzz limits: prompt, and a peak allocation within
    ``4 * size + SLACK`` bytes, i.e. proportional to the input whatever its length fields claim.

    tracemalloc sees Python objects and numpy's buffers (numpy reports its allocations to it), which is
    all the ``.ckpt`` parser allocates; the input exists before tracing starts, so only the call counts.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        with time_limit(seconds):
            result = outcome(call, name)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    assert peak <= 4 * size + SLACK, f"peak allocation {peak} bytes for a {size}-byte input"
    return result


def parse_bounded(
    data: bytes, verify_crc: bool = True, seconds: float = TIME_LIMIT
) -> dict[str, np.ndarray] | CheckpointError:
    result = bounded(lambda: parse_ckpt(data, "fuzz.ckpt", verify_crc), len(data), "fuzz.ckpt", seconds)
    # which outcomes the inputs reach (pytest --hypothesis-show-statistics): the fuzz must get past byte 0
    with contextlib.suppress(InvalidArgument):  # raised outside a hypothesis test: the regression tests
        event(outcome_kind(result))
    return result


def outcome_kind(result: object) -> str:
    """A short label for an outcome: the error message without its file name, numbers and details."""
    if not isinstance(result, CheckpointError):
        return "parsed"
    message = re.split(r" at byte|;|\(", str(result).split(": ", 1)[-1])[0]
    return re.sub(r"'.*?'|\[.*?\]|[0-9]+", "_", message)[:60]


def test_tracemalloc_sees_numpy_buffers() -> None:
    """The memory bound means nothing unless numpy's array buffers are counted."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        array = np.ones(4 << 20, np.uint8)
        peak = tracemalloc.get_traced_memory()[1]
        del array
    finally:
        tracemalloc.stop()
    assert peak >= 4 << 20


def test_the_limits_catch_hangs_greed_and_foreign_errors() -> None:
    """The properties below can fail: a hang is interrupted, a greedy call is caught, another error escapes."""
    with pytest.raises(Overtime):
        bounded(lambda: time.sleep(30), 3, "x", seconds=0.2)
    # what a parser trusting a length field of 2**26 in a 3-byte file would do
    with pytest.raises(AssertionError, match="peak allocation"):
        bounded(lambda: bytearray(1 << 26), 3, "x")
    with pytest.raises(ValueError, match="boom") as info:
        bounded(lambda: int("boom"), 3, "x")
    assert info.type is ValueError  # not a CheckpointError (a ValueError subclass): it escaped
    with pytest.raises(AssertionError, match="nameless"):
        bounded(lambda: parse_ckpt(b"\x0a\x05ab", "nameless.ckpt"), 5, "other.ckpt")
    assert isinstance(bounded(lambda: parse_ckpt(b"\x0a\x05ab", "a.ckpt"), 5, "a.ckpt"), CheckpointError)


# --------------------------------------------------------------------------- protobuf, independently


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    return key(number, 2) + varint(len(payload)) + payload


def with_crc(body: bytes) -> bytes:
    return body + b"crc_num" + binascii.crc32(body).to_bytes(10, "big")


# (message depth, field number) -> the nested message kind, as in mindspore_ckpt's docstring:
# Checkpoint.value (1) -> Value; Value.tensor (2) -> TensorProto
NESTED = {(0, 1), (1, 2)}


def scan(body: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Where the writer put things: (offset, size) of every length varint, of every varint value (dims),
    and of every top-level ``Checkpoint`` message, at every depth of the writer's output."""
    lengths: list[tuple[int, int]] = []
    numbers: list[tuple[int, int]] = []
    messages: list[tuple[int, int]] = []

    def walk(pos: int, end: int, depth: int) -> None:
        while pos < end:
            start = pos
            field, pos = read_varint(body, pos)
            at = pos
            value, pos = read_varint(body, pos)
            if field & 7 == 0:
                numbers.append((at, pos - at))
                continue
            assert field & 7 == 2, "the writer only writes varints and length-delimited fields"
            lengths.append((at, pos - at))
            if (depth, field >> 3) in NESTED:
                walk(pos, pos + value, depth + 1)
            pos += value
            if depth == 0:
                messages.append((start, pos - start))

    walk(0, len(body), 0)
    return lengths, numbers, messages


# every dtype the writer can write, and every tensor_type string a file may carry
WRITABLE_DTYPES = sorted(mindspore_ckpt.TYPE_NAMES, key=str)
TYPE_STRINGS = [*mindspore_ckpt.DTYPES, mindspore_ckpt.BFLOAT16, "Complex64", "String", "float32", ""]
HUGE = st.one_of(
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Any array the writer accepts: every dtype, scalars, empty and multi-dimensional shapes."""
    dtype = draw(st.sampled_from(WRITABLE_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    count = int(np.prod(shape, dtype=np.int64))
    raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
    if dtype == np.bool_:
        raw = bytes(b & 1 for b in raw)
    return np.frombuffer(raw, dtype).reshape(shape).copy()


tensor_dicts = st.dictionaries(st.text(max_size=12), arrays(), min_size=1, max_size=4)


def assert_same_tensors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


@settings(max_examples=100, **FUZZ)
@given(tensors=tensor_dicts, crc=st.booleans())
def test_writer_output_parses_back(tensors: dict[str, np.ndarray], crc: bool) -> None:
    """The undamaged files the mutation fuzz starts from are valid and read back bit for bit."""
    data = serialize_ckpt(tensors, crc=crc)
    got = parse_bounded(data)
    assert not isinstance(got, CheckpointError), got
    assert_same_tensors(got, tensors)


def damage_structure(draw: st.DrawFn, body: bytes) -> bytes:
    """One structure-aware damage to the writer's output, or none: a length field made huge or a few
    bytes wrong, a dimension made huge, a whole ``Checkpoint`` message copied to a message boundary
    (the same tag twice in a row reads as slices, elsewhere as a repeated parameter)."""
    lengths, numbers, messages = scan(body)
    kind = draw(st.sampled_from(["none", "length-huge", "length-off-by-a-few", "number-huge", "copy-message"]))
    if kind in ("length-huge", "length-off-by-a-few"):
        at, size = draw(st.sampled_from(lengths))
        old, _ = read_varint(body, at)
        new = draw(HUGE) if kind == "length-huge" else max(0, old + draw(st.integers(-3, 3)))
        return body[:at] + varint(new) + body[at + size :]
    if kind == "number-huge" and numbers:
        at, size = draw(st.sampled_from(numbers))
        return body[:at] + varint(draw(HUGE)) + body[at + size :]
    if kind == "copy-message":
        start, size = draw(st.sampled_from(messages))
        at = draw(st.sampled_from([0, *(s + n for s, n in messages)]))
        return body[:at] + body[start : start + size] + body[at:]
    return body


def damage_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    """One blind damage: a flipped byte, a truncation, inserted or deleted bytes, a copied range."""
    if not data:
        return draw(st.binary(min_size=1, max_size=8))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "copy-range"]))
    pos = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    end = draw(st.integers(pos, min(len(data), pos + 64)))
    if kind == "delete":
        return data[:pos] + data[end:]
    at = draw(st.integers(0, len(data)))
    return data[:at] + data[pos:end] + data[at:]


@settings(max_examples=800, **FUZZ)
@given(
    tensors=tensor_dicts,
    crc=st.sampled_from(["none", "before-damage", "after-damage"]),
    verify_crc=st.booleans(),
    data=st.data(),
)
def test_damaged_checkpoints(tensors: dict[str, np.ndarray], crc: str, verify_crc: bool, data: st.DataObject) -> None:
    """Files from the package's writer, damaged in their structure and/or blindly (up to 3 damages).

    A CRC over the damaged body (a buggy writer) lets the damage reach the parser even when the CRC is
    verified; a CRC over the original body (bit rot) must be caught by it.
    """
    original = serialize_ckpt(tensors)
    body = damage_structure(data.draw, original)
    blind = data.draw(st.integers(0 if body != original else 1, 2), label="blind damages")
    covered = {"none": None, "before-damage": original, "after-damage": body}[crc]
    file = body if covered is None else body + with_crc(covered)[len(covered) :]
    for _ in range(blind):
        file = damage_bytes(data.draw, file)
    result = parse_bounded(file, verify_crc)
    if crc == "before-damage" and verify_crc and blind == 0 and body != original:
        assert isinstance(result, CheckpointError) and "CRC" in str(result)


# well-formed protobuf of the wrong structure: every field number the parser knows, in every wire type,
# nested to any depth, with tensor_type strings and packed varints among the payloads
field_numbers = st.one_of(st.integers(1, 4), st.integers(5, 2**29 - 1))
leaf_payloads = st.one_of(
    st.binary(max_size=48),
    st.sampled_from(TYPE_STRINGS).map(str.encode),
    st.lists(st.one_of(st.integers(0, 6), HUGE), max_size=8).map(lambda xs: b"".join(map(varint, xs))),
)


def fields(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda n, v: key(n, 0) + varint(v), field_numbers, st.one_of(st.integers(0, 6), HUGE)),
        st.builds(lambda n, b: key(n, 1) + b, field_numbers, st.binary(min_size=8, max_size=8)),
        st.builds(lambda n, b: key(n, 5) + b, field_numbers, st.binary(min_size=4, max_size=4)),
        st.builds(ld, field_numbers, payloads),
    )


messages = st.recursive(leaf_payloads, lambda inner: st.lists(fields(inner), max_size=6).map(b"".join), max_leaves=24)


@settings(max_examples=300, **FUZZ)
@given(body=st.lists(fields(messages), min_size=1, max_size=6).map(b"".join), crc=st.booleans())
def test_wellformed_protobuf_of_any_structure(body: bytes, crc: bool) -> None:
    """Every length is right, so the parser's structure checks (missing tag/type/content, wrong wire
    types, MapTensors, repeated tags, dims against content) are what stands between it and a crash."""
    parse_bounded(with_crc(body) if crc else body)


@settings(max_examples=300, **FUZZ)
@given(
    data=st.one_of(
        st.binary(max_size=4096),
        st.binary(max_size=1024).map(lambda b: b"\x0a" + b),  # starts like a checkpoint
        st.binary(max_size=1024).map(with_crc),  # a random body under a valid CRC
    )
)
def test_random_bytes(data: bytes) -> None:
    """Anything at all, e.g. a file of another format saved under a .ckpt name."""
    parse_bounded(data)


# --------------------------------------------------------------------------- regressions


def packed_dims_file(count: int) -> bytes:
    """One tensor whose packed dims field holds ``count`` dimensions of 300 (2 bytes each)."""
    tensor = ld(1, varint(300) * count) + ld(2, b"Int8") + ld(3, b"\0")
    return ld(1, ld(1, b"x") + ld(2, tensor))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_millions_of_dims_are_refused_before_they_are_collected(packed: bool) -> None:
    """Found checking the parser against the fuzz properties: a 2 MB file whose dims field held a million
    dimensions made it build a list of a million ints (25 bytes of memory per byte of file, and over
    2 s) and a 5 MB error message quoting them all.  Dimensions beyond numpy's limit are now refused
    as they are read."""
    count = 1_000_000
    if packed:
        data = packed_dims_file(count)
    else:
        tensor = (key(1, 0) + varint(300)) * count + ld(2, b"Int8") + ld(3, b"\0")
        data = ld(1, ld(1, b"x") + ld(2, tensor))
    result = parse_bounded(data)
    assert isinstance(result, CheckpointError)
    assert "'x'" in str(result) and f"more than {mindspore_ckpt.MAX_DIMS} dimensions" in str(result)
    assert len(str(result)) < 500


def test_dims_up_to_the_limit_still_read() -> None:
    """The limit refuses only what numpy cannot hold anyway: as many dimensions as numpy allows read
    (64 in numpy 2, 32 before), one more than MAX_DIMS is refused while parsing."""

    def file(ndim: int) -> bytes:
        return ld(1, ld(1, b"x") + ld(2, ld(1, varint(1) * ndim) + ld(2, b"Int8") + ld(3, b"\x07")))

    numpy_limit = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
    assert numpy_limit <= mindspore_ckpt.MAX_DIMS
    assert parse_ckpt(file(numpy_limit))["x"].shape == (1,) * numpy_limit
    with pytest.raises(CheckpointError, match="more than"):
        parse_ckpt(file(mindspore_ckpt.MAX_DIMS + 1))


def test_many_slices_of_one_tensor_cost_no_memory_per_slice() -> None:
    """Found checking the parser against the fuzz properties: a tensor split into many tiny slices
    (MindSpore's 512 MiB split, abused) kept a memoryview per slice until the end, 13 bytes of memory
    per byte of file (this 420 kB file took 5.5 MB).  Slices are now joined as they are read."""
    count = 20_000
    chunk = ld(1, ld(1, b"x") + ld(2, key(1, 0) + varint(count) + ld(2, b"UInt8") + ld(3, b"\x07")))
    result = parse_bounded(chunk * count, seconds=20)  # a valid file of 20000 fields: slow is not a hang
    assert not isinstance(result, CheckpointError), result
    assert result["x"].shape == (count,) and (result["x"] == 7).all()


# --------------------------------------------------------------------------- every format, through read_weights
# Tensor names are not ShuffleNetV2's, so a file that still reads ends in read_weights' own "no
# ShuffleNetV2 weights" error instead of the (slow) architecture inference: the fuzz is of the readers.
# Memory is not bounded here: safetensors and torch allocate tensors outside tracemalloc's view.

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
]


@st.composite
def torch_tensors(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(st.sampled_from(["w", "layer.0.weight", "bn.running_mean", "x.y.z"]), min_size=1, unique=True)
    )
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        values = torch.tensor(
            draw(st.lists(st.integers(-3, 3), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        )
        out[name] = values.reshape(shape).to(draw(st.sampled_from(TORCH_DTYPES)))
    return out


def read_promptly(path: Path, data: bytes) -> Any:
    """read_weights on ``data`` written to ``path``: prompt, and only a CheckpointError naming the file."""
    path.write_bytes(data)
    with time_limit(TIME_LIMIT):
        result = outcome(lambda: read_weights(path), path.name)
    event(outcome_kind(result))
    return result


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
big_ints = st.one_of(st.integers(-8, 64), HUGE, st.integers(-(2**64), 2**65))


def damage_header(draw: st.DrawFn, header: dict[str, Any]) -> dict[str, Any]:
    """One edit of a safetensors header: a tensor's dtype, shape or offsets made wrong, an entry or one
    of its keys removed, or metadata that is not a map of strings."""
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop-key", "drop-entry", "metadata", "any-value"]))
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = draw(st.one_of(st.sampled_from([*SAFETENSORS_DTYPES, "F8_E4M3", "C64", "X", ""]), json_values))
    elif kind == "shape":
        entry["shape"] = draw(st.one_of(st.lists(big_ints, max_size=5), json_values))
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            st.one_of(st.lists(big_ints, min_size=2, max_size=2), st.lists(big_ints), json_values)
        )
    elif kind == "drop-key":
        entry.pop(draw(st.sampled_from(sorted(entry))))
    elif kind == "drop-entry":
        del header[name]
    elif kind == "metadata":
        header["__metadata__"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=6), json_values, max_size=3), json_values)
        )
    else:
        header[name] = draw(json_values)
    return header


@settings(max_examples=250, **FILES)
@given(tensors=torch_tensors(), data=st.data())
def test_damaged_safetensors(tmp_path: Path, tensors: dict[str, torch.Tensor], data: st.DataObject) -> None:
    """safetensors files with a damaged JSON header (wrong dtypes, shapes, offsets, metadata; a header
    length that lies) and/or blind byte damage: safetensors' own errors must become CheckpointError."""
    from safetensors.torch import save

    original = save(tensors, metadata={"format": "fuzz"})
    size = int.from_bytes(original[:8], "little")
    header, payload = json.loads(original[8 : 8 + size]), original[8 + size :]
    file = original
    if data.draw(st.booleans(), label="damage the header"):
        text = json.dumps(damage_header(data.draw, header)).encode()
        claimed = len(text)
        if data.draw(st.integers(0, 3), label="lie about its length") == 0:
            claimed = data.draw(st.one_of(HUGE, st.integers(0, len(text) + 8)), label="header length")
        file = claimed.to_bytes(8, "little") + text + payload
    for _ in range(data.draw(st.integers(0 if file != original else 1, 2), label="blind damages")):
        file = damage_bytes(data.draw, file)
    read_promptly(tmp_path / "fuzz.safetensors", file)


@settings(max_examples=250, **FILES)
@given(tensors=torch_tensors(), legacy=st.booleans(), nested=st.booleans(), data=st.data())
def test_damaged_pth(
    tmp_path: Path, tensors: dict[str, torch.Tensor], legacy: bool, nested: bool, data: st.DataObject
) -> None:
    """torch.save files (zip container, and the pre-1.6 pickle stream), damaged 1-3 times:
    whatever torch.load(weights_only=True) raises must become CheckpointError."""
    path = tmp_path / "fuzz.pth"
    torch.save(
        {"state_dict": tensors, "epoch": 3} if nested else tensors, path, _use_new_zipfile_serialization=not legacy
    )
    file = path.read_bytes()
    for _ in range(data.draw(st.integers(1, 3), label="damages")):
        file = damage_bytes(data.draw, file)
    read_promptly(path, file)


@settings(max_examples=150, **FILES)
@given(tensors=tensor_dicts, crc=st.booleans(), data=st.data())
def test_damaged_ckpt_through_read_weights(
    tmp_path: Path, tensors: dict[str, np.ndarray], crc: bool, data: st.DataObject
) -> None:
    """The .ckpt path of read_weights: numpy arrays of every MindSpore dtype become torch tensors."""
    file = serialize_ckpt({f"fuzz.{name}": array for name, array in tensors.items()}, crc=crc)
    for _ in range(data.draw(st.integers(0, 2), label="damages")):
        file = damage_bytes(data.draw, file)
    read_promptly(tmp_path / "fuzz.ckpt", file)


@pytest.mark.parametrize(
    ("data", "raised"),
    [
        (b"\x80\x02J\x00", "struct.error"),  # a 4-byte int cut short
        (b"\x80\x02h\x05.", "KeyError"),  # a memo reference to nothing
        (b"\x80\x02]q\x00(K\x01e\x85R.", "IndexError"),  # REDUCE with an empty stack
    ],
)
def test_damaged_pickle_streams_are_checkpoint_errors(tmp_path: Path, data: bytes, raised: str) -> None:
    """Found by the .pth fuzz: truncated or bit-flipped pre-1.6 torch files made torch.load's weights-only
    unpickler raise ``raised``, which escaped read_weights; every failure of torch.load is now reported
    as an unreadable file."""
    path = tmp_path / "old.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable torch file") as info:
        read_weights(path)
    assert "old.pth" in str(info.value)


# --------------------------------------------------------------------------- pickles that carry code


class Payload:
    """Unpickling this calls ``func(*args)``: how a hostile .pth runs code on whoever loads it."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return self.func, self.args


def payload(kind: str, marker: Path) -> Payload:
    """A payload whose only effect is creating ``marker``."""
    if kind == "os.system":
        return Payload(os.system, f"touch {shlex.quote(str(marker))}")
    if kind == "open":
        return Payload(builtins.open, str(marker), "w")
    return Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")


PAYLOADS = ["os.system", "open", "exec"]
CONTAINERS = ["torch.save", "torch.save-legacy", "pickle-2", "pickle-5"]
posix_only = pytest.mark.skipif(os.name != "posix", reason="the os.system payload runs `touch`")


def write_hostile(path: Path, container: str, evil: Payload) -> None:
    state = {"classifier.weight": torch.zeros(10, 1024), "hook": evil}
    if container.startswith("torch.save"):
        torch.save({"state_dict": state}, path, _use_new_zipfile_serialization=container == "torch.save")
    else:
        path.write_bytes(pickle.dumps(state, protocol=int(container[-1])))


@posix_only
@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_payloads_are_live(tmp_path: Path, kind: str, container: str) -> None:
    """Control for the refusal test below: loaded unsafely, each hostile file does create its marker,
    so the marker's absence there means the code was refused, not that it was harmless."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_hostile(path, container, payload(kind, marker))
    assert not marker.exists()
    with open(path, "rb") as f:  # what read_weights must never do
        torch.load(f, weights_only=False) if container.startswith("torch.save") else pickle.load(f)
    assert marker.exists()


@posix_only
@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".safetensors"])
@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_pickles_that_run_code_are_refused_and_never_run(
    tmp_path: Path, kind: str, container: str, suffix: str
) -> None:
    """A .pth whose pickle would run os.system, open a file for writing or exec code, in torch's zip
    container, its pre-1.6 stream or a bare pickle, under any extension (the format comes from the
    content): read_weights and create_model refuse it as code, and the side effect does not happen.
    (test_weights.py checks a print payload; this one checks a real side effect.)"""
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    write_hostile(path, container, payload(kind, marker))
    with pytest.raises(CheckpointError, match="arbitrary code") as info:
        read_weights(path)
    assert path.name in str(info.value)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=path)
    assert not marker.exists()


def test_torch_file_named_safetensors_is_read_as_torch(tmp_path: Path) -> None:
    """Found with the test above: torch.load sends any path ending in .safetensors to safetensors, so a
    .pth saved under that name could not be read (and a hostile one was refused for the wrong reason),
    although the format is recognised from the content.  read_weights now gives torch.load the file."""
    model = create_model("shufflenet_v2_x0_5", num_classes=10)
    path = tmp_path / "really-a-pth.safetensors"
    torch.save(model.state_dict(), path)
    weights = read_weights(path)
    assert weights.format == "pth"
    assert torch.equal(weights.tensors["classifier.weight"], model.classifier.weight)


def test_protocol_0_pickle_is_refused_without_running(tmp_path: Path) -> None:
    """A text-protocol pickle does not look like a torch file at all: refused before any unpickling."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(payload("open", marker), protocol=0))
    with pytest.raises(CheckpointError, match="not a weight file"):
        read_weights(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the control: it is live
    assert marker.exists()


# --------------------------------------------------------------------------- wrong shapes


def first_mismatch(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> str:
    """How load_weights must report the first tensor (in the model's order) whose shapes differ."""
    key = next(k for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape)
    return f"{key}: file has {tuple(theirs[key].shape)}, model expects {tuple(ours[key].shape)}"


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ".pth"])
def test_x1_0_file_into_x0_5_model(tmp_path: Path, suffix: str) -> None:
    """The reverse of test_weights' x0.5-into-x1.0 check, in every format: the error names the tensor
    and both shapes, and the model is left as it was."""
    wide = create_model("shufflenet_v2_x1_0", num_classes=10)
    path = save_weights(tmp_path / f"x1_0{suffix}", wide)
    narrow = create_model("shufflenet_v2_x0_5", num_classes=10)
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(narrow, read_weights(path))
    message = str(info.value)
    assert first_mismatch(wide.state_dict(), narrow.state_dict()) in message
    assert path.name in message and "shufflenet_v2_x1_0" in message and "shufflenet_v2_x0_5" in message
    assert all(torch.equal(before[k], v) for k, v in narrow.state_dict().items())


@pytest.mark.parametrize(
    ("suffix", "layout"), [(".ckpt", "mindcv"), (".safetensors", "mindcv"), (".pth", "torchvision")]
)
def test_10_class_file_into_1000_class_model(tmp_path: Path, suffix: str, layout: str) -> None:
    """A fine-tuned 10-class head loaded into an ImageNet-sized model: named, with both shapes."""
    path = save_weights(tmp_path / f"c10{suffix}", create_model("shufflenet_v2_x0_5", num_classes=10, layout=layout))
    with pytest.raises(CheckpointError) as info:
        create_model("shufflenet_v2_x0_5", num_classes=1000, layout=layout, checkpoint_path=path)
    head = "classifier" if layout == "mindcv" else "fc"
    assert f"{head}.weight: file has (10, 1024), model expects (1000, 1024)" in str(info.value)
    if layout == "torchvision":
        assert "fc.bias: file has (10,), model expects (1000,)" in str(info.value)


def x0_5_file(tmp_path: Path, **changes: torch.Tensor) -> Path:
    """A MindCV-layout x0.5 safetensors file with some tensors replaced."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in create_model("shufflenet_v2_x0_5", num_classes=10).state_dict().items()}
    state.update(changes)
    path = tmp_path / "changed.safetensors"
    save_file(state, str(path), metadata={"format": "shufflenetv2", "stem_pool": "same"})
    return path


def test_0_dim_classifier_is_a_shape_error(tmp_path: Path) -> None:
    """Found while reviewing the shape paths: a 0-dim classifier weight made read_weights raise
    IndexError while inferring the class count.  It is now reported like any other wrong shape."""
    path = x0_5_file(tmp_path, **{"classifier.weight": torch.tensor(1.0)})
    assert read_weights(path).arch["num_classes"] is None
    with pytest.raises(CheckpointError, match=r"classifier\.weight: file has \(\), model expects \(10, 1024\)"):
        create_model("shufflenet_v2_x0_5", num_classes=10, checkpoint_path=path)


@pytest.mark.parametrize("columns", [100, 300], ids=["fewer-channels", "more-channels"])
def test_wrong_shape_is_reported_before_layout_conversion(tmp_path: Path, columns: int) -> None:
    """Found while reviewing the shape paths: converting a MindCV file to the torchvision layout indexed
    channels by position, so a wrong-shaped tensor raised IndexError (fewer channels) or was silently
    cut down to the expected shape and loaded scrambled (more channels).  Shapes are now checked first."""
    path = x0_5_file(tmp_path, **{"conv_last.0.weight": torch.zeros(1024, columns, 1, 1)})
    with pytest.raises(CheckpointError) as info:
        create_model("shufflenet_v2_x0_5", num_classes=10, layout="torchvision", checkpoint_path=path)
    message = str(info.value)
    assert (
        f"conv_last.0.weight: file has (1024, {columns}, 1, 1), shufflenet_v2_x0_5 expects (1024, 192, 1, 1)" in message
    )
    assert "changed.safetensors" in message and "torchvision layout" in message
