"""The Open Inference Protocol (KServe v2) for the MNIST models, without HTTP: the binary tensor extension's
framing, the one input tensor checked and decoded (JSON numbers or raw little-endian bytes), the requested
outputs. The router parses the JSON header into these dataclasses and frames the answer."""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.classifiers import MNIST_SIZE, to_input
from service.errors import InferenceRequestError, LimitExceededError, Loc, UnsupportedMediaError

INPUT = "input"
OUTPUT = "probabilities"
CLASSES = 10
VERSION = "1"  # one version of each model is served
PLATFORM = "pytorch"
EXTENSIONS = ("binary_tensor_data",)
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class InputForm:
    """A datatype the input accepts: its shape after N, its element type as raw bytes, and how it reads."""

    tail: tuple[int, ...]
    dtype: np.dtype[Any]
    reads: str

    def shape(self) -> str:
        return "[N, " + ", ".join(map(str, self.tail)) + "]"


INPUT_FORMS: dict[str, InputForm] = {
    "FP32": InputForm((1, MNIST_SIZE, MNIST_SIZE), np.dtype("<f4"), "values in [0, 1], white digit on black"),
    "UINT8": InputForm((MNIST_SIZE, MNIST_SIZE), np.dtype("u1"), "pixels 0..255, white digit on black"),
}
ACCEPTED = "; or ".join(f"{dt} {form.shape()} ({form.reads})" for dt, form in INPUT_FORMS.items())


@dataclass(frozen=True)
class InputTensor:
    """One `$request_input`: JSON `data` (flat or nested, row-major), or `binary_data_size` bytes after the
    JSON header (the binary tensor data extension)."""

    name: str
    datatype: str
    shape: Sequence[int]
    parameters: Mapping[str, object]
    data: list[Any] | None


@dataclass(frozen=True)
class OutputRequest:
    """One `$request_output`: a name, and `binary_data` in its parameters to have it back as raw bytes."""

    name: str
    parameters: Mapping[str, object]


# --- the body ---------------------------------------------------------------------------------------------------

_BYTE_COUNT = re.compile(r"[0-9]{1,19}")


MAX_GZIP_MEMBERS = 16


def inflate(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """A body sent with `Content-Encoding: gzip` or `deflate` (tritonclient's request compression), inflated to
    at most `max_bytes`, so that a small body cannot grow into a large one."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ("gzip", "deflate"):
        raise UnsupportedMediaError(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    # HTTP's "deflate" is the zlib format (RFC 9110), which is what zlib.compress writes. A gzip body may hold
    # several members one after another (RFC 1952), as `gzip` writes for files joined with cat: their data joined.
    pieces: list[bytes] = []
    size, rest = 0, body
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if name == "gzip" else zlib.MAX_WBITS)
        try:
            pieces.append(inflater.decompress(rest, max_bytes + 1 - size))
        except zlib.error as e:
            raise InferenceRequestError(f"the {name} body cannot be inflated: {e}") from None
        size += len(pieces[-1])
        if size > max_bytes:
            raise LimitExceededError(f"the request body inflates to over the limit of {max_bytes:,} bytes")
        if not inflater.eof:
            raise InferenceRequestError(f"the {name} body is truncated")
        rest = inflater.unused_data
        if not rest:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # one member (the usual): no copy
        if name != "gzip":
            raise InferenceRequestError(f"the {name} body has bytes after its end")
        if len(pieces) == MAX_GZIP_MEMBERS:  # each member's rest is a copy: 500,000 empty ones took 200 s
            raise InferenceRequestError(f"the gzip body has more than {MAX_GZIP_MEMBERS} members")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes | None]:
    """The binary extension's framing: with `Inference-Header-Content-Length: L` the first L bytes are the JSON
    request and the rest are the inputs' raw bytes, in input order; without it the whole body is JSON."""
    if header_length is None:
        return body, None
    text = header_length.strip()
    if not _BYTE_COUNT.fullmatch(text):
        raise InferenceRequestError(f"{HEADER_LENGTH} must be the JSON header's length in bytes, got {text[:40]!r}")
    length = int(text)
    if length == 0:
        raise InferenceRequestError(f"{HEADER_LENGTH} is 0: the JSON header cannot be empty")
    if length > len(body):
        raise InferenceRequestError(f"{HEADER_LENGTH} is {length:,} but the body has only {len(body):,} bytes")
    return body[:length], body[length:]


# --- parameters and the input tensor ------------------------------------------------------------------------------


def check_parameters(parameters: Mapping[str, object], loc: Loc) -> None:
    """Parameter values are strings, numbers or booleans; shared memory is not served here."""
    for key, value in parameters.items():
        if not isinstance(value, str | int | float):  # bool is an int
            raise InferenceRequestError(f"parameter {key!r} must be a string, number or boolean", (*loc, key))
        if key.startswith("shared_memory"):
            raise InferenceRequestError(
                "shared memory is not supported here; send the data in the body (JSON `data` or the binary extension)",
                (*loc, key),
            )


def _flag(parameters: Mapping[str, object], key: str, loc: Loc) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InferenceRequestError(f"parameter {key!r} must be true or false", (*loc, key))
    return value


def read_input(inputs: Sequence[InputTensor], binary: bytes | None, max_batch: int) -> torch.Tensor:
    """The model's one input, checked and decoded: FP32 `(N, 1, 28, 28)` in [0, 1] as sent, or UINT8
    `(N, 28, 28)` scaled by 1/255 (as `/v1/predict` scales pixels) -> `(N, 1, 28, 28)` float32 in [0, 1]."""
    if not inputs:
        raise InferenceRequestError(f"no inputs: the model takes one tensor named {INPUT!r}: {ACCEPTED}", ("inputs",))
    for i, tensor in enumerate(inputs):
        check_parameters(tensor.parameters, ("inputs", i, "parameters"))
        if tensor.name != INPUT:
            raise InferenceRequestError(
                f"unknown input {tensor.name[:64]!r}; the model has one input, {INPUT!r}", ("inputs", i, "name")
            )
    if len(inputs) > 1:
        raise InferenceRequestError(f"input {INPUT!r} is given {len(inputs)} times; give it once", ("inputs", 1))
    [tensor] = inputs
    loc: Loc = ("inputs", 0)
    raw = _binary_part(tensor, binary, loc)
    form = INPUT_FORMS.get(tensor.datatype)
    if form is None:
        raise InferenceRequestError(
            f"datatype {tensor.datatype[:16]!r} is not accepted; send {ACCEPTED}", (*loc, "datatype")
        )
    n = _batch_size(tensor, form, max_batch, (*loc, "shape"))
    count = n * math.prod(form.tail)
    if raw is not None:
        expected = count * form.dtype.itemsize
        if len(raw) != expected:
            raise InferenceRequestError(
                f"binary_data_size is {len(raw):,} bytes; {tensor.datatype} {_shape(tensor.shape)} takes "
                f"{expected:,} ({count:,} x {form.dtype.itemsize})",
                (*loc, "parameters", "binary_data_size"),
            )
        values = np.frombuffer(raw, form.dtype).reshape(n, *form.tail)
    else:
        assert tensor.data is not None  # _binary_part saw to it
        values = _json_values(tensor.data, tensor.datatype, count, (*loc, "data")).reshape(n, *form.tail)
    if tensor.datatype == "UINT8":
        return to_input(values.astype(np.uint8))
    _check_unit_range(values, (*loc, "data"))
    return torch.from_numpy(values.astype(np.float32))  # a copy: frombuffer's array is read-only


def _binary_part(tensor: InputTensor, binary: bytes | None, loc: Loc) -> bytes | None:
    """This input's raw bytes when it uses the binary extension (then they are all the bytes after the header)."""
    size = tensor.parameters.get("binary_data_size")
    ploc = (*loc, "parameters", "binary_data_size")
    if size is None:
        if tensor.data is None:
            raise InferenceRequestError(
                f"input {INPUT!r} has no data: give `data` (JSON numbers) or `parameters.binary_data_size` with "
                f"the raw bytes after the JSON header ({HEADER_LENGTH})",
                loc,
            )
        if binary:
            raise InferenceRequestError(
                f"{len(binary):,} bytes follow the JSON header but no input has parameters.binary_data_size", loc
            )
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InferenceRequestError("binary_data_size must be a byte count (an integer, 0 or more)", ploc)
    if tensor.data is not None:
        raise InferenceRequestError("give either `data` or `parameters.binary_data_size`, not both", (*loc, "data"))
    if binary is None:
        raise InferenceRequestError(
            f"binary_data_size needs the {HEADER_LENGTH} header: the length of the JSON part of the body", ploc
        )
    if size != len(binary):
        raise InferenceRequestError(
            f"binary_data_size is {size:,} but {len(binary):,} bytes follow the JSON header", ploc
        )
    return binary


def _shape(shape: Sequence[int]) -> str:
    """A shape for a message, however many dimensions the client sent (each is at most 2**63 - 1)."""
    if len(shape) > 6:
        return f"[{', '.join(map(str, shape[:4]))}, ...] ({len(shape)} dimensions)"
    return "[" + ", ".join(map(str, shape)) + "]"


def _batch_size(tensor: InputTensor, form: InputForm, max_batch: int, loc: Loc) -> int:
    shape = tensor.shape
    if len(shape) != len(form.tail) + 1 or tuple(shape[1:]) != form.tail:
        raise InferenceRequestError(
            f"shape {_shape(shape)} does not fit: {tensor.datatype} takes {form.shape()} ({form.reads})", loc
        )
    n = shape[0]
    if n < 1:
        raise InferenceRequestError(f"shape {_shape(shape)}: N, the number of digits, must be 1 or more", (*loc, 0))
    if n > max_batch:
        raise LimitExceededError(f"the batch has {n:,} digits; the limit is {max_batch}", (*loc, 0))
    return n


def _json_values(data: list[Any], datatype: str, count: int, loc: Loc) -> np.ndarray:
    """`data`, flat or nested (any nesting: the protocol reads elements in row-major order), as a flat array of
    exactly `count` numbers: finite float64 for FP32, integers 0..255 for UINT8."""
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > count:
                raise InferenceRequestError(f"data has more than the {count:,} elements its shape takes", loc)
        else:
            stack.pop()
    if len(flat) != count:
        raise InferenceRequestError(f"data has {len(flat):,} elements; its shape takes {count:,}", loc)
    integers = datatype == "UINT8"
    for k, v in enumerate(flat):
        ok = type(v) is int if integers else type(v) in (int, float)
        if not ok or (integers and not 0 <= v <= 255):
            want = "integers 0..255" if integers else "numbers"
            raise InferenceRequestError(f"element {k:,} (row-major) is {_show(v)}; {datatype} data must be {want}", loc)
    if integers:
        return np.array(flat, np.uint8)
    try:
        return np.array(flat, np.float64)
    except OverflowError:  # an integer beyond float64
        raise InferenceRequestError("data holds an integer too large for a float; FP32 lies in [0, 1]", loc) from None


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, int | float | str) else type(value).__name__
    return text if len(text) <= 24 else text[:20] + "..."


def _check_unit_range(values: np.ndarray, loc: Loc) -> None:
    """FP32 input is MNIST pixels / 255: NaN, infinities and anything outside [0, 1] are refused, not clipped."""
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        k = int(np.argmax(bad.ravel()))
        where = [int(i) for i in np.unravel_index(k, values.shape)]
        raise InferenceRequestError(
            f"element {where} is {float(values.ravel()[k])!r}; FP32 values must be finite and in [0, 1] (pixels "
            "/ 255, white digit on black); send UINT8 for 0..255 pixels",
            loc,
        )


# --- outputs and the forward pass ---------------------------------------------------------------------------------


def wants_binary(outputs: Sequence[OutputRequest] | None, parameters: Mapping[str, object]) -> bool:
    """Whether `probabilities` goes back as raw bytes after the JSON header: its own `binary_data` when given,
    else the request's `binary_data_output`, else as JSON. Every requested output must exist, once."""
    check_parameters(parameters, ("parameters",))
    binary = _flag(parameters, "binary_data_output", ("parameters",))
    for i, output in enumerate(outputs or ()):
        loc: Loc = ("outputs", i)
        check_parameters(output.parameters, (*loc, "parameters"))
        if output.name != OUTPUT:
            raise InferenceRequestError(
                f"unknown output {output.name[:64]!r}; the model has one output, {OUTPUT!r}", (*loc, "name")
            )
        if i > 0:
            raise InferenceRequestError(f"output {OUTPUT!r} is requested {len(outputs or ())} times", (*loc, "name"))
        if output.parameters.get("classification") not in (None, 0):
            raise InferenceRequestError(
                f"the classification extension is not supported; read the classes from {OUTPUT!r}",
                (*loc, "parameters", "classification"),
            )
        own = _flag(output.parameters, "binary_data", (*loc, "parameters"))
        binary = own if own is not None else binary
    return bool(binary)
