"""Frames: the bytes of one message, and the hard limits a receiver enforces on them.

Frame layout (all integers big-endian)::

    offset 0   u32  body_len     bytes after this prefix; > Limits.max_frame_bytes: rejected
                                 before anything is allocated
    offset 4   u32  header_len   bytes of the msgpack header
    offset 8   header            msgpack list [version, TYPE_ID, rid, field, field, ...] in the
                                 dataclass field order; a tensor field is the descriptor
                                 [dtype name, [B, T, H], nbytes]
    then       zero padding      up to a multiple of 8 from the frame start (tensors only)
    then       tensor bytes      raw, C order, native little-endian; one block per tensor field,
                                 each starting 8-aligned; an int8 tensor (``wire.compress``) is
                                 ["int8b64", [B, T, H], nbytes]: its scales, outliers,
                                 positions and codes back to back in one block

``decode`` raises only ``ProtocolError`` subclasses, whatever the input:
``FrameError`` (malformed, truncated, inconsistent), ``VersionMismatch`` (another protocol
version), ``LimitExceeded`` (size, dtype or shape outside ``Limits``; a tensor of more than
``max_tensor_tokens`` tokens is refused from its header, before its bytes are looked at). When the header's rid
could be read, the error carries it as ``error.rid`` so the server can answer that request.

Tensors are decoded zero-copy (a numpy view over a writable frame buffer, then
``torch.from_numpy``; a read-only frame is copied once). Encoding never copies a tensor:
it returns ``[head, payload view]`` for ``writelines``-style output; the tensor must not
change until the buffers are written (TcpConnection joins them at once, so callers may).
The int8 form is the exception both ways: a ``compress.Blockwise8`` tensor is sent as the
parts it holds (views too), and decoding one builds a new float32 tensor from them (its
outlier positions checked: FrameError outside 0..H-1), never larger than ``max_frame_bytes``
(``LimitExceeded`` from the header otherwise, as for a float32 tensor that would not fit).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

import msgpack
import numpy as np
import torch

from layerchain.errors import FrameError, LimitExceeded, ProtocolError, VersionMismatch
from layerchain.wire import compress
from layerchain.wire.messages import MAX_STEP_TOKENS, MESSAGE_TYPES, PROTOCOL_VERSION, Message

MiB = 1 << 20
PREFIX_BYTES = 4  # the u32 body_len
_FIXED_BYTES = 8  # body_len + header_len
HIDDEN_NDIM = 3  # hidden states are [B, T, H]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """Hard limits a receiver enforces on every connection; senders check them too."""

    max_frame_bytes: int = 64 * MiB  # bytes of one frame after its 4-byte length prefix
    max_header_bytes: int = 1 * MiB  # bytes of one frame's msgpack header
    allowed_dtypes: tuple[str, ...] = (  # tensor dtypes (int8b64: compress.INT8_NAME)
        "float32", "float16", "bfloat16", compress.INT8_NAME
    )
    max_dim_size: int = 1 << 20  # elements along any one axis of a tensor (B, T or H)
    max_tensor_tokens: int = MAX_STEP_TOKENS  # B x T of one [B, T, H] tensor: a step's tokens
    max_sessions_per_connection: int = 64  # sessions one connection may hold open at once
    max_inflight_per_connection: int = 64  # requests of one connection handled concurrently
    max_connections: int = 1024  # live connections one listener holds; at the cap a newcomer
    # takes the place of the least recently active one (tcp.TcpListener)
    read_timeout_s: float = 30.0  # seconds from a frame's first byte to its last, whatever
    # length it declares: a slow sender cannot extend it (slowloris); also the longest a
    # reply may wait for the peer to read it


DEFAULT_LIMITS = Limits()


def largest_step_frame(hidden_size: int, limits: Limits = DEFAULT_LIMITS) -> int:
    """Bytes after the prefix of the largest frame a Step or StepResult of ``hidden_size``
    needs within ``limits`` (float32, ``max_tensor_tokens`` tokens, the largest header): a
    node sets ``max_frame_bytes`` to it, so it never buffers more than a step can use."""
    return _FIXED_BYTES + limits.max_header_bytes + 8 + limits.max_tensor_tokens * hidden_size * 4

# Field kinds, from the dataclass annotations: how each is checked on both sides.
_INT, _STR, _BYTES, _FLOAT, _RTTS, _TENSOR = range(6)
_KINDS: dict[Any, int] = {
    int: _INT,
    str: _STR,
    bytes: _BYTES,
    float: _FLOAT,
    dict[str, float]: _RTTS,
    torch.Tensor: _TENSOR,
}


_SPECS: dict[type, tuple[tuple[str, int], ...]] = {
    cls: tuple((f.name, _KINDS[get_type_hints(cls)[f.name]]) for f in fields(cls))
    for cls in MESSAGE_TYPES.values()
}


def _brief(value: Any) -> str:
    """A bounded repr of untrusted input, for error messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------- encode

# One reusable packer: pack() holds the GIL from start to end (no Python callbacks) and
# resets its buffer on error, so sharing it is safe; it is 2x faster than msgpack.packb.
_pack = msgpack.Packer(use_bin_type=True).pack
_HEAD = struct.Struct(">II")  # body_len, header_len
_PADS = [b"\0" * n for n in range(8)]


def _payload(value: Any, name: str, limits: Limits) -> tuple[list[Any], list[memoryview]]:
    """(descriptor, raw bytes views) of a tensor field, without copying a CPU contiguous
    tensor (an int8 one: its parts)."""
    if not isinstance(value, torch.Tensor):
        raise FrameError(f"field {name} must be a tensor, got {type(value).__name__}")
    if type(value) is compress.Blockwise8:
        return _int8_payload(value, name, limits)
    dtype_name = _DTYPE_NAMES.get(value.dtype)
    if dtype_name is None or dtype_name not in limits.allowed_dtypes:
        raise LimitExceeded(
            f"tensor {name} has dtype {value.dtype}; allowed: {limits.allowed_dtypes}"
        )
    shape = list(value.shape)
    _check_shape(shape, name, limits)
    if not (value.is_cpu and value.is_contiguous()) or value.requires_grad:
        value = value.detach().cpu().contiguous()
    if value.dtype is torch.bfloat16:  # numpy has no bfloat16: same bits as int16
        value = value.view(torch.int16)
    payload = memoryview(value.numpy()).cast("B")
    return [dtype_name, shape, payload.nbytes], [payload]


def _int8_payload(
    value: compress.Blockwise8, name: str, limits: Limits
) -> tuple[list[Any], list[memoryview]]:
    """(descriptor, [scales, outliers, positions, codes] views) of an int8 tensor field."""
    if compress.INT8_NAME not in limits.allowed_dtypes:
        raise LimitExceeded(
            f"tensor {name} is {compress.INT8_NAME}; allowed: {limits.allowed_dtypes}"
        )
    shape = list(value.shape)
    _check_decoded_size(_check_shape(shape, name, limits), name, limits)
    parts = value.parts
    lead = shape[:2]
    expected = (
        (parts.scales, torch.float32, compress.blocks_of(shape[2])),
        (parts.outliers, torch.float32, compress.outliers_of(shape[2])),
        (parts.positions, torch.int32, compress.outliers_of(shape[2])),
        (parts.codes, torch.int8, shape[2]),
    )
    views = []
    for part, dtype, last in expected:
        if part.dtype != dtype or list(part.shape) != [*lead, last] or not part.is_contiguous():
            raise FrameError(f"tensor {name}: its int8 parts do not fit {shape}")
        array: Any = part.numpy()  # (numpy's stubs do not say it is a buffer)
        views.append(memoryview(array).cast("B"))
    return [compress.INT8_NAME, shape, sum(v.nbytes for v in views)], views


def _check_scalar(kind: int, value: Any, name: str) -> Any:
    """``value`` if it has the field's kind (ints are accepted as floats), else FrameError."""
    tv = type(value)
    if kind == _INT:
        ok = tv is int
    elif kind == _STR:
        ok = tv is str
    elif kind == _BYTES:
        ok = tv is bytes
    elif kind == _FLOAT:
        if tv is int:
            value = float(value)
        ok = type(value) is float
    else:  # _RTTS
        ok = tv is dict and all(
            type(k) is str and type(v) in (float, int) for k, v in value.items()
        )
        if ok:
            value = {k: float(v) for k, v in value.items()}
    if not ok:
        raise FrameError(f"field {name} has the wrong type {tv.__name__}")
    return value


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes | memoryview]:
    """``[head, *tensor payloads]``; their concatenation is the frame. Raises ProtocolError.

    The payload views alias the message's tensors: write them before the tensors change.
    """
    spec = _SPECS.get(type(msg))
    if spec is None:
        raise FrameError(f"{type(msg).__name__} is not a wire message")
    header: list[Any] = [PROTOCOL_VERSION, msg.TYPE_ID]
    payloads: list[list[memoryview]] = []
    for name, kind in spec:
        value = getattr(msg, name)
        if kind == _TENSOR:
            descriptor, views = _payload(value, name, limits)
            header.append(descriptor)
            payloads.append(views)
        else:
            header.append(_check_scalar(kind, value, name))
    try:
        packed = _pack(header)
    except (OverflowError, ValueError, TypeError) as error:
        raise FrameError(f"cannot encode {type(msg).__name__}: {error}") from error
    if len(packed) > limits.max_header_bytes:
        raise LimitExceeded(f"header of {len(packed)} bytes exceeds {limits.max_header_bytes}")
    header_len = len(packed)
    end = _FIXED_BYTES + header_len
    head_pad = b""
    out: list[bytes | memoryview] = [b""]
    for i, views in enumerate(payloads):
        pad = -end & 7  # each tensor starts 8-aligned from the frame start
        if i == 0:
            head_pad = _PADS[pad]  # the first pad rides in the head buffer
        else:
            out.append(_PADS[pad])
        out.extend(views)
        end += pad + sum(view.nbytes for view in views)
    body_len = end - PREFIX_BYTES
    if body_len > limits.max_frame_bytes:
        raise LimitExceeded(f"frame of {body_len} bytes exceeds {limits.max_frame_bytes}")
    out[0] = _HEAD.pack(body_len, header_len) + packed + head_pad
    return out


def encode_bytes(msg: Message, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The whole frame as one bytes object (one copy of the tensor payload)."""
    return b"".join(encode(msg, limits))


# ---------------------------------------------------------------------------- decode

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}


def read_length(prefix: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> int:
    """body_len from a 4-byte prefix; LimitExceeded if over the limit (call before allocating)."""
    if len(prefix) != PREFIX_BYTES:
        raise FrameError(f"length prefix must be {PREFIX_BYTES} bytes, got {len(prefix)}")
    body_len = int.from_bytes(prefix, "big")
    if body_len > limits.max_frame_bytes:
        raise LimitExceeded(f"frame of {body_len} bytes exceeds the limit {limits.max_frame_bytes}")
    return body_len


def _check_shape(shape: list[Any], name: str, limits: Limits) -> int:
    """Element count of a valid [B, T, H] shape; LimitExceeded/FrameError otherwise."""
    if len(shape) != HIDDEN_NDIM:
        raise LimitExceeded(f"tensor {name} must be 3-D [B, T, H], got {len(shape)}-D")
    numel = 1
    for size in shape:
        if type(size) is not int:
            raise FrameError(f"tensor {name} has a non-integer dimension {_brief(size)}")
        if not 1 <= size <= limits.max_dim_size:
            raise LimitExceeded(
                f"tensor {name} shape {shape}: each dimension must be in 1..{limits.max_dim_size}"
            )
        numel *= size
    tokens = shape[0] * shape[1]
    if tokens > limits.max_tensor_tokens:
        raise LimitExceeded(
            f"tensor {name} carries {tokens} tokens (B x T), more than the"
            f" {limits.max_tensor_tokens} one step may carry",
            hint="split it into several steps",
        )
    return numel


def _decode_tensor(
    descriptor: Any, name: str, frame: Any, size: int, offset: int, limits: Limits
) -> tuple[torch.Tensor, int]:
    """(tensor, offset after it) for a descriptor whose bytes start 8-aligned after ``offset``."""
    if type(descriptor) is not list or len(descriptor) != 3:
        raise FrameError(f"tensor descriptor of {name} must be [dtype, shape, nbytes]")
    dtype_name, shape, nbytes = descriptor
    allowed = limits.allowed_dtypes
    if dtype_name == compress.INT8_NAME and dtype_name in allowed:
        return _decode_int8(shape, nbytes, name, frame, size, offset, limits)
    if type(dtype_name) is not str or dtype_name not in DTYPES or dtype_name not in allowed:
        raise LimitExceeded(f"tensor {name} has dtype {_brief(dtype_name)}; allowed: {allowed}")
    if type(shape) is not list:
        raise FrameError(f"tensor {name} shape must be a list")
    numel = _check_shape(shape, name, limits)
    dtype = DTYPES[dtype_name]
    if type(nbytes) is not int or nbytes != numel * dtype.itemsize:
        raise FrameError(
            f"tensor {name} {shape} {dtype_name} needs {numel * dtype.itemsize} bytes,"
            f" frame says {_brief(nbytes)}"
        )
    start = offset + (-offset & 7)
    if start + nbytes > size:
        raise FrameError(f"truncated frame: tensor {name} needs {nbytes} bytes past offset {start}")
    # A numpy view over the frame, then torch: zero-copy, and cheaper than frombuffer + view.
    array = np.ndarray(shape, _NP_DTYPES[dtype_name], frame, start)
    if not array.flags.writeable:  # torch tensors must be writable: copy a read-only frame
        array = array.copy()
    elif not array.flags.aligned:  # a misaligned buffer: some kernels want alignment
        array = array.copy()
    tensor = torch.from_numpy(array)
    if dtype is torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor, start + nbytes


def _check_decoded_size(numel: int, name: str, limits: Limits) -> None:
    """LimitExceeded unless an int8 tensor of ``numel`` values decodes (float32) to no more
    bytes than a frame may hold: decoding never allocates more than a float32 frame would."""
    if 4 * numel > limits.max_frame_bytes:
        raise LimitExceeded(
            f"tensor {name} decodes to {4 * numel} bytes, more than a frame's"
            f" {limits.max_frame_bytes}"
        )


def _decode_int8(
    shape: Any, nbytes: Any, name: str, frame: Any, size: int, offset: int, limits: Limits
) -> tuple[torch.Tensor, int]:
    """(float32 tensor, offset after it) of an int8 tensor (``wire.compress``)."""
    if type(shape) is not list:
        raise FrameError(f"tensor {name} shape must be a list")
    _check_decoded_size(_check_shape(shape, name, limits), name, limits)
    need = compress.int8_nbytes(shape)
    if type(nbytes) is not int or nbytes != need:
        raise FrameError(
            f"tensor {name} {shape} {compress.INT8_NAME} needs {need} bytes, frame says"
            f" {_brief(nbytes)}"
        )
    start = offset + (-offset & 7)
    if start + nbytes > size:
        raise FrameError(f"truncated frame: tensor {name} needs {nbytes} bytes past offset {start}")
    lead, hidden = shape[:2], shape[2]
    arrays = []
    at = start
    for dtype, last in (
        (np.float32, compress.blocks_of(hidden)),
        (np.float32, compress.outliers_of(hidden)),
        (np.int32, compress.outliers_of(hidden)),
        (np.int8, hidden),
    ):
        array = np.ndarray([*lead, last], dtype, frame, at)
        at += array.nbytes
        # writable and aligned for torch (a read-only frame: copy these, as for floats)
        if not array.flags.writeable or not array.flags.aligned:
            array = array.copy()
        arrays.append(torch.from_numpy(array))
    scales, outliers, positions, codes = arrays
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= hidden):
        raise FrameError(f"tensor {name}: an outlier position is outside 0..{hidden - 1}")
    parts = compress.Int8Parts(scales, outliers, positions, codes)
    return compress.dequantize(parts), start + nbytes


def _decode(frame: Any, limits: Limits, found: list[int]) -> Message:
    size = len(frame)
    if size < _FIXED_BYTES:
        raise FrameError(f"truncated frame: {size} bytes, at least {_FIXED_BYTES} needed")
    body_len, header_len = _HEAD.unpack_from(frame, 0)
    if body_len > limits.max_frame_bytes:
        raise LimitExceeded(f"frame of {body_len} bytes exceeds the limit {limits.max_frame_bytes}")
    if body_len != size - PREFIX_BYTES:
        raise FrameError(f"frame length prefix says {body_len} bytes, got {size - PREFIX_BYTES}")
    offset = _FIXED_BYTES + header_len
    if offset > size:
        raise FrameError(f"header of {header_len} bytes does not fit in a {size}-byte frame")
    if header_len > limits.max_header_bytes:
        raise LimitExceeded(f"header of {header_len} bytes exceeds {limits.max_header_bytes}")
    header = msgpack.unpackb(memoryview(frame)[_FIXED_BYTES:offset], raw=False, strict_map_key=True)
    if type(header) is not list or not header:
        raise FrameError("frame header must be a non-empty msgpack list")
    if header[0] != PROTOCOL_VERSION or type(header[0]) is not int:
        raise VersionMismatch(
            f"peer speaks wire protocol {_brief(header[0])}, this side speaks {PROTOCOL_VERSION}",
            hint="upgrade layerchain on both sides",
        )
    type_id = header[1] if len(header) > 1 else None
    cls = MESSAGE_TYPES.get(type_id) if type(type_id) is int else None
    if cls is None or len(header) < 3:
        raise FrameError(f"unknown message type {_brief(type_id)}")
    if type(header[2]) is int:
        found.append(header[2])  # the rid, for the error reply
    spec = _SPECS[cls]
    if len(header) - 2 != len(spec):
        raise FrameError(f"{cls.__name__} needs {len(spec)} fields, frame has {len(header) - 2}")
    values = header[2:]
    for i, (name, kind) in enumerate(spec):
        if kind == _TENSOR:
            values[i], offset = _decode_tensor(values[i], name, frame, size, offset, limits)
        elif kind == _STR or kind == _INT:  # the common kinds, checked inline
            if type(values[i]) is not (str if kind == _STR else int):
                raise FrameError(f"field {name} has the wrong type {type(values[i]).__name__}")
        else:
            values[i] = _check_scalar(kind, values[i], name)
    if offset != size:
        raise FrameError(f"frame has {size - offset} trailing bytes")
    return cls(*values)  # type: ignore[no-any-return]


def decode(frame: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """The message in one whole frame (prefix included). Raises only ProtocolError subclasses.

    A writable ``frame`` (bytearray) is shared with the returned tensor (zero-copy): do not
    reuse it. A read-only one (bytes) is copied once.
    """
    found: list[int] = []
    try:
        if type(frame) is memoryview and (frame.ndim != 1 or frame.itemsize != 1):
            frame = frame.cast("B")
        return _decode(frame, limits, found)
    except ProtocolError as error:  # raised before the rid was known: the same error, with it
        if not found or error.rid == found[0]:
            raise
        raise type(error)(error.message, hint=error.hint, rid=found[0]) from error.__cause__
    except Exception as error:  # msgpack, unicode, buffer errors: all malformed input
        why = f"malformed frame: {type(error).__name__}: {error}"[:200]
        raise FrameError(why, rid=found[0] if found else 0) from error


def error_rid(error: BaseException) -> int:
    """The rid a decode error belongs to (0 when unknown or not a ProtocolError)."""
    return error.rid if isinstance(error, ProtocolError) else 0
