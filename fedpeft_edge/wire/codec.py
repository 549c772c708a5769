"""Wire codec: framed FedML messages (JSON header + one binary blob) and manifest-checked tensor updates.

Two layers, both little-endian, no pickle, no base64:

* message frame  `FPM1 | ver u8 | flags u8 | 0 u16 | header_len u32 | blob_len u64 | JSON header | blob`
* tensor blob    `FPT1 | ver u8 | encoding u8 | 0 u16 | n_tensors u32 | manifest sha256 (32) | body_len u64 |
  tensors in manifest order | float32 scales (int8 encodings only)`

The manifest (names, shapes, dtypes) is agreed once at join, so a round's blob carries only a 52-byte header
before the raw tensor bytes; `to_safetensors` re-attaches names and shapes for any safetensors reader.
Every length is checked against the manifest before a tensor byte is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from fedpeft_edge.errors import CodecError

MESSAGE_MAGIC = b"FPM1"
TENSORS_MAGIC = b"FPT1"
VERSION = 1
BLOB_KEY_PARAM = "_blob_key"  # reserved header key: which message param held the blob
MAX_HEADER_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_BLOB_BYTES = 2_000_000_000  # CommArgs.max_update_bytes

_FRAME = struct.Struct("<4sBBHIQ")  # 20 bytes
_TENSORS = struct.Struct("<4sBBHI32sQ")  # 52 bytes
FRAME_HEADER_BYTES = _FRAME.size
TENSORS_HEADER_BYTES = _TENSORS.size

ENCODINGS = ("fp32", "fp16", "bf16", "int8", "int8_row")
_BLOCK_BYTES = 1 << 20  # copy-and-check block: stays in cache
_FLAG_BLOB = 1


class TensorSpecLike(Protocol):
    """What the codec needs of peft.base.TensorSpec."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...


class ManifestLike(Protocol):
    """What the codec needs of peft.base.Manifest."""

    @property
    def method(self) -> str: ...
    @property
    def tensors(self) -> tuple[Any, ...]: ...
    @property
    def hash(self) -> str: ...


# --- message frame -----------------------------------------------------------------------------------


def encode_message(params: Mapping[str, Any], blob: bytes | bytearray | memoryview | None = None) -> bytes:
    """Frame JSON-able params and an optional binary blob into one payload (one copy of the blob)."""
    return b"".join(message_parts(params, blob))


def message_parts(
    params: Mapping[str, Any], blob: bytes | bytearray | memoryview | None = None
) -> list[bytes | memoryview]:
    """encode_message without the join: frame header, JSON header and a view of the blob (no copy)."""
    try:
        header = json.dumps(dict(params), separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CodecError(
            f"message params are not JSON-able ({exc}); "
            "send tensors as the blob and metrics as finite numbers"
        ) from exc
    if len(header) > MAX_HEADER_BYTES:
        raise CodecError(
            f"message header is {len(header)} bytes, over {MAX_HEADER_BYTES}; move bulk data to the blob"
        )
    blob_len = 0 if blob is None else memoryview(blob).nbytes
    flags = 0 if blob is None else _FLAG_BLOB
    head = _FRAME.pack(MESSAGE_MAGIC, VERSION, flags, 0, len(header), blob_len)
    parts: list[bytes | memoryview] = [head, header]
    if blob is not None:
        parts.append(memoryview(blob).cast("B"))
    return parts


def decode_message(
    data: bytes | bytearray | memoryview, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
) -> tuple[dict[str, Any], memoryview | None]:
    """Parse a frame: (params, blob view or None). Lengths are checked before anything is parsed."""
    view = memoryview(data).cast("B")
    if view.nbytes < _FRAME.size:
        raise CodecError(f"message of {view.nbytes} bytes is shorter than its {_FRAME.size}-byte header")
    magic, version, flags, _res, header_len, blob_len = _FRAME.unpack_from(view, 0)
    if magic != MESSAGE_MAGIC:
        raise CodecError(f"not a fedpeft message (magic {bytes(magic)!r}, expected {MESSAGE_MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"message version {version} is not supported (this build speaks {VERSION}); upgrade")
    if header_len > MAX_HEADER_BYTES:
        raise CodecError(f"message header claims {header_len} bytes, over the {MAX_HEADER_BYTES} limit")
    if blob_len > max_blob_bytes:
        raise CodecError(
            f"message blob claims {blob_len} bytes, over the {max_blob_bytes}-byte limit "
            "(comm_args.max_update_bytes); refusing it"
        )
    expected = _FRAME.size + header_len + blob_len
    if view.nbytes != expected:
        state = "truncated" if view.nbytes < expected else "has trailing bytes"
        raise CodecError(f"message {state}: {view.nbytes} bytes, its header says {expected}")
    params = _parse_header(view[_FRAME.size:_FRAME.size + header_len])
    if not flags & _FLAG_BLOB:
        return params, None
    return params, view[_FRAME.size + header_len:]


MAX_HEADER_DEPTH = 32  # nesting of JSON objects/arrays in a header (profiles and metrics need about 4)


def _refuse_constant(name: str) -> Any:
    raise CodecError(f"message header holds {name}; JSON headers carry finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CodecError(f"message header number {text[:40]!r} overflows to {value}; send finite numbers")
    return value


def _parse_header(raw: memoryview) -> dict[str, Any]:
    try:
        params = json.loads(bytes(raw).decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"message header is not UTF-8 JSON: {exc}") from exc
    except RecursionError as exc:  # the C scanner recurses per nesting level
        raise CodecError(f"message header nests deeper than Python can parse (limit {MAX_HEADER_DEPTH})") from exc
    if not isinstance(params, dict):
        raise CodecError(f"message header must be a JSON object, got {type(params).__name__}")
    _check_depth(params)
    return params


def _check_depth(value: Any) -> None:
    """Refuse containers nested deeper than MAX_HEADER_DEPTH (iteratively: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_HEADER_DEPTH:
            raise CodecError(f"message header nests deeper than {MAX_HEADER_DEPTH} levels; refusing it")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


# --- dtypes ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Dtype:
    torch: torch.dtype
    numpy: Any  # numpy dtype used to read/write the raw bytes (uint16 stands in for bfloat16)
    safetensors: str

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.numpy).itemsize)


_DTYPES: dict[str, _Dtype] = {
    "float32": _Dtype(torch.float32, np.dtype("<f4"), "F32"),
    "float64": _Dtype(torch.float64, np.dtype("<f8"), "F64"),
    "float16": _Dtype(torch.float16, np.dtype("<f2"), "F16"),
    "bfloat16": _Dtype(torch.bfloat16, np.dtype("<u2"), "BF16"),
    "int64": _Dtype(torch.int64, np.dtype("<i8"), "I64"),
    "int32": _Dtype(torch.int32, np.dtype("<i4"), "I32"),
    "int16": _Dtype(torch.int16, np.dtype("<i2"), "I16"),
    "int8": _Dtype(torch.int8, np.dtype("i1"), "I8"),
    "uint8": _Dtype(torch.uint8, np.dtype("u1"), "U8"),
    "bool": _Dtype(torch.bool, np.dtype("?"), "BOOL"),
}
_FLOATS = ("float32", "float64", "float16", "bfloat16")
_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32"}


def dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical dtype name ("float32") from "torch.float32", "float32" or a torch.dtype."""
    name = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in _DTYPES:
        raise CodecError(f"dtype {dtype!r} cannot go on the wire; supported: {', '.join(_DTYPES)}")
    return name


# --- layout ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]
    dtype: str  # manifest dtype
    wire: str  # dtype of the bytes on the wire
    offset: int  # from the start of the body
    nbytes: int
    rows: int  # scales for int8 encodings, else 0
    scale_offset: int


def _rows(shape: tuple[int, ...], encoding: str) -> int:
    if encoding == "int8_row" and len(shape) >= 2:
        return max(1, int(shape[0]))  # an empty tensor still carries one scale
    return 1


def _layout(manifest: ManifestLike, encoding: str) -> tuple[list[_Slot], int]:
    """Where every tensor (and scale) sits in the body, and the body's length, from the manifest alone."""
    plan: list[tuple[str, tuple[int, ...], str, str, int, int]] = []
    for spec in manifest.tensors:
        shape = tuple(int(d) for d in spec.shape)
        if any(d < 0 for d in shape):
            raise CodecError(f"manifest tensor {spec.name!r} has a negative dimension in {shape}")
        dtype = dtype_name(spec.dtype)
        wire = _wire_dtype(dtype, encoding)
        rows = _rows(shape, encoding) if wire == "int8" and dtype in _FLOATS else 0
        plan.append((spec.name, shape, dtype, wire, math.prod(shape) * _DTYPES[wire].itemsize, rows))
    slots: list[_Slot] = []
    offset = 0
    scale_offset = sum(p[4] for p in plan)
    for name, shape, dtype, wire, nbytes, rows in plan:
        slots.append(_Slot(name, shape, dtype, wire, offset, nbytes, rows, scale_offset))
        offset += nbytes
        scale_offset += 4 * rows
    return slots, scale_offset


def _wire_dtype(dtype: str, encoding: str) -> str:
    if dtype not in _FLOATS or encoding == "fp32":
        return dtype
    return {"fp16": "float16", "bf16": "bfloat16", "int8": "int8", "int8_row": "int8"}[encoding]


def _encoding_code(encoding: str) -> int:
    if encoding not in ENCODINGS:
        raise CodecError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)} (comm_args.encoding)")
    return ENCODINGS.index(encoding)


# --- tensors -----------------------------------------------------------------------------------------

_FP16_MAX = 65504.0


def encode_tensors(
    state: Mapping[str, torch.Tensor], manifest: ManifestLike, encoding: str = "fp32"
) -> memoryview:
    """The tensors of `state`, in manifest order, as one blob (refuses NaN/inf).

    One pass for fp32: each tensor is copied into the blob block by block and checked for finiteness while
    the block is in cache. Returns a writable bytes-like memoryview (len, slicing, bytes(), ==, buffer
    protocol) over a fresh buffer; `bytes(blob)` if you need an immutable copy.
    """
    parts, checks = _encode_parts(state, manifest, encoding, defer_check=True)
    out = np.empty(sum(memoryview(p).nbytes for p in parts), dtype=np.uint8)  # no zero-fill, unlike bytearray
    pos = 0
    for part, check in zip(parts, checks, strict=True):
        n = memoryview(part).nbytes
        if check is None:
            out[pos:pos + n] = np.frombuffer(part, dtype=np.uint8)
        else:
            _copy_checked_into(out, pos, part, *check)
        pos += n
    return out.data


def tensor_parts(
    state: Mapping[str, torch.Tensor], manifest: ManifestLike, encoding: str = "fp32"
) -> list[bytes | memoryview]:
    """encode_tensors without the copy: header, then views of each tensor's wire bytes, then scales."""
    return _encode_parts(state, manifest, encoding, defer_check=False)[0]


_Check = tuple[str, Any]  # tensor name, numpy dtype: finiteness checked while copying


def _encode_parts(
    state: Mapping[str, torch.Tensor], manifest: ManifestLike, encoding: str, defer_check: bool
) -> tuple[list[bytes | memoryview], list[_Check | None]]:
    code = _encoding_code(encoding)
    _check_keys(state, manifest)
    slots, body_len = _layout(manifest, encoding)
    parts: list[bytes | memoryview] = [
        _TENSORS.pack(TENSORS_MAGIC, VERSION, code, 0, len(slots), bytes.fromhex(manifest.hash), body_len)
    ]
    checks: list[_Check | None] = [None]
    scales: list[bytes | memoryview] = []
    for slot in slots:
        deferred = defer_check and slot.wire == slot.dtype and slot.dtype in ("float32", "float64", "float16")
        data, scale = _encode_one(slot, state[slot.name], encoding, check=not deferred)
        parts.append(data)
        checks.append((slot.name, _DTYPES[slot.dtype].numpy) if deferred else None)
        if scale is not None:
            scales.append(scale)
    return parts + scales, checks + [None] * len(scales)


def _copy_checked_into(out: np.ndarray, pos: int, part: bytes | memoryview, name: str, dtype: Any) -> None:
    src = np.frombuffer(part, dtype=dtype)
    dst = np.frombuffer(out, dtype=dtype, count=src.size, offset=pos)
    acc = np.float64 if src.dtype == np.float64 else np.float32
    step = max(1, _BLOCK_BYTES // src.itemsize)
    total = acc(0)
    for i in range(0, src.size, step):
        np.copyto(dst[i:i + step], src[i:i + step])
        total += np.add.reduce(dst[i:i + step], dtype=acc)
    if not np.isfinite(total):
        _require_finite(name, torch.from_numpy(src.copy()))


def _check_keys(state: Mapping[str, torch.Tensor], manifest: ManifestLike) -> None:
    names = [spec.name for spec in manifest.tensors]
    missing = [n for n in names if n not in state]
    extra = sorted(set(state) - set(names))
    if missing or extra:
        raise CodecError(
            f"state does not match manifest {manifest.method!r}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; "
            "encode the state returned by the method's get_state()"
        )


def _encode_one(
    slot: _Slot, tensor: torch.Tensor, encoding: str, check: bool = True
) -> tuple[memoryview, memoryview | None]:
    t = tensor.detach()
    if tuple(t.shape) != slot.shape or dtype_name(t.dtype) != slot.dtype:
        raise CodecError(
            f"tensor {slot.name!r} is {tuple(t.shape)} {t.dtype}, the manifest says {slot.shape} {slot.dtype}"
        )
    t = t.to("cpu").contiguous().reshape(-1)
    if check and slot.dtype in _FLOATS:
        _require_finite(slot.name, t)
    if slot.wire == slot.dtype:
        return _bytes_view(t), None
    if slot.wire == "float16":
        _require_fp16_range(slot.name, t)
    if slot.wire in ("float16", "bfloat16"):
        return _bytes_view(t.to(_DTYPES[slot.wire].torch)), None
    q, scale = quantize_int8(t.reshape(slot.rows, -1) if t.numel() else t, per_row=slot.rows > 1)
    return _bytes_view(q.reshape(-1)), _bytes_view(scale.reshape(-1))


def _bytes_view(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


def _require_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0 or _sum_is_finite(t):
        return
    if not bool(torch.isfinite(t).all()):  # the sum can overflow; only this says for sure
        bad = int((~torch.isfinite(t)).sum())
        raise CodecError(f"tensor {name!r} has {bad} non-finite value(s) (NaN/inf); refusing to send it")


def _sum_is_finite(t: torch.Tensor) -> bool:
    """One read-only pass: NaN/inf anywhere make the sum non-finite (numpy: no thread-pool wake-ups)."""
    if t.dtype == torch.bfloat16:
        return bool(torch.isfinite(t.sum(dtype=torch.float32)))
    arr = t.numpy()
    acc = np.float64 if arr.dtype == np.float64 else np.float32
    return bool(np.isfinite(np.add.reduce(arr, axis=None, dtype=acc)))


def _require_fp16_range(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if float(lo) < -_FP16_MAX or float(hi) > _FP16_MAX:
        raise CodecError(
            f"tensor {name!r} holds values up to {max(-float(lo), float(hi)):.3g}, beyond float16's "
            f"{_FP16_MAX}; use comm_args.encoding bf16 or fp32"
        )


def quantize_int8(t: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: (q in [-127, 127], float32 scale per row or per tensor) with x ~= q * scale."""
    x = t.float()
    if x.numel() == 0:
        return x.to(torch.int8), torch.ones(1, dtype=torch.float32)
    rows = x.reshape(x.shape[0], -1) if per_row else x.reshape(1, -1)
    lo, hi = torch.aminmax(rows, dim=1)
    scale = torch.maximum(-lo, hi) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(t.shape), scale.contiguous()


@dataclasses.dataclass(frozen=True)
class _BlobHeader:
    encoding: str
    slots: list[_Slot]
    body: memoryview


def decode_tensors(
    blob: bytes | bytearray | memoryview,
    manifest: ManifestLike,
    expected_hash: str | None = None,
    max_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    copy: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of a blob, in manifest order and dtype; header, hash and sizes checked before any tensor byte.

    `copy=None` copies only from read-only buffers (bytes); a writable buffer (a reassembled transfer) is
    shared by the returned tensors instead of copied.
    """
    head = _read_header(blob, manifest, expected_hash, max_bytes)
    share = not head.body.readonly if copy is None else not copy
    into = None if share else np.empty(head.body.nbytes, dtype=np.uint8)  # one allocation for all tensors
    out: dict[str, torch.Tensor] = {}
    for slot in head.slots:
        out[slot.name] = _decode_one(slot, head.body, share, into)
    return out


def _read_header(
    blob: bytes | bytearray | memoryview, manifest: ManifestLike, expected_hash: str | None, max_bytes: int
) -> _BlobHeader:
    view = memoryview(blob).cast("B")
    if view.nbytes > max_bytes:
        raise CodecError(f"update of {view.nbytes} bytes is over the {max_bytes}-byte limit; refusing it")
    if view.nbytes < _TENSORS.size:
        raise CodecError(f"update of {view.nbytes} bytes is shorter than its {_TENSORS.size}-byte header")
    magic, version, code, _res, count, digest, body_len = _TENSORS.unpack_from(view, 0)
    if magic != TENSORS_MAGIC:
        raise CodecError(f"not a tensor update (magic {bytes(magic)!r}, expected {TENSORS_MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"update version {version} is not supported (this build reads {VERSION}); upgrade")
    if code >= len(ENCODINGS):
        raise CodecError(f"update encoding code {code} is unknown; known: {', '.join(ENCODINGS)}")
    _check_hash(digest.hex(), manifest, expected_hash)
    if count != len(manifest.tensors):
        raise CodecError(
            f"update holds {count} tensors, manifest {manifest.method!r} has {len(manifest.tensors)}"
        )
    slots, expected_len = _layout(manifest, ENCODINGS[code])
    if body_len != expected_len or view.nbytes != _TENSORS.size + body_len:
        raise CodecError(
            f"update length is wrong: header says {body_len} body bytes, the manifest needs {expected_len}, "
            f"{view.nbytes - _TENSORS.size} arrived (truncated or padded)"
        )
    return _BlobHeader(ENCODINGS[code], slots, view[_TENSORS.size:])


def _check_hash(got: str, manifest: ManifestLike, expected_hash: str | None) -> None:
    if expected_hash is not None and expected_hash != manifest.hash:
        raise CodecError(
            f"expected manifest hash {expected_hash[:12]}... is not this manifest's {manifest.hash[:12]}...; "
            "decode with the manifest agreed at join"
        )
    if got != manifest.hash:
        raise CodecError(
            f"update was encoded for manifest {got[:12]}..., this receiver expects {manifest.hash[:12]}... "
            f"({manifest.method!r}); both sides must run the same method and backbone"
        )


def _decode_one(slot: _Slot, body: memoryview, share: bool, into: np.ndarray | None) -> torch.Tensor:
    wire = _DTYPES[slot.wire]
    count = slot.nbytes // wire.itemsize
    if slot.wire == slot.dtype and slot.dtype in ("float32", "float64", "float16"):
        return _read_checked(slot, body, count, into).reshape(slot.shape)
    t = _read_array(body, wire, count, slot.offset, share)
    if slot.rows:
        scale = _read_array(body, _DTYPES["float32"], slot.rows, slot.scale_offset, share=True)
        _require_finite(slot.name + " scale", scale)
        x = t.reshape(slot.rows, -1).float() * scale[:, None] if count else t.float()
        t = x.to(_DTYPES[slot.dtype].torch)
    elif slot.wire != slot.dtype:
        t = t.to(_DTYPES[slot.dtype].torch)
    t = t.reshape(slot.shape)
    if slot.dtype in _FLOATS:
        _require_finite(slot.name, t)
    return t


def _read_checked(slot: _Slot, body: memoryview, count: int, into: np.ndarray | None) -> torch.Tensor:
    """Copy into `into` (None: share the body) and check finiteness block by block, reading from cache."""
    dtype = _DTYPES[slot.dtype].numpy
    src = np.frombuffer(body, dtype=dtype, count=count, offset=slot.offset)
    copy = into is not None
    dst = src if into is None else np.frombuffer(into, dtype=dtype, count=count, offset=slot.offset)
    acc = np.float64 if src.dtype == np.float64 else np.float32
    step = max(1, _BLOCK_BYTES // src.itemsize)
    total = acc(0)
    for i in range(0, count, step):
        if copy:
            np.copyto(dst[i:i + step], src[i:i + step])
        total += np.add.reduce(dst[i:i + step], dtype=acc)
    t = torch.from_numpy(dst)
    if not np.isfinite(total):
        _require_finite(slot.name, t)  # exact check (the sum may just have overflowed)
    return t


def _read_array(body: memoryview, dt: _Dtype, count: int, offset: int, share: bool) -> torch.Tensor:
    arr = np.frombuffer(body, dtype=dt.numpy, count=count, offset=offset)
    if not share or not arr.flags.writeable:
        arr = arr.copy()
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dt.torch == torch.bfloat16 else t


def to_safetensors(blob: bytes | bytearray | memoryview, manifest: ManifestLike) -> bytes:
    """The update as a safetensors file: manifest names/shapes, wire dtypes, int8 scales as `name#scale`.

    The tensor bytes are reused as they are (one copy); metadata carries method, manifest hash and encoding.
    """
    head = _read_header(blob, manifest, None, DEFAULT_MAX_BLOB_BYTES)
    entries: dict[str, Any] = {
        "__metadata__": {"format": "fedpeft", "method": manifest.method, "manifest_hash": manifest.hash,
                         "encoding": head.encoding}
    }
    for slot in head.slots:
        entries[slot.name] = {"dtype": _DTYPES[slot.wire].safetensors, "shape": list(slot.shape),
                              "data_offsets": [slot.offset, slot.offset + slot.nbytes]}
        if slot.rows:
            end = slot.scale_offset + 4 * slot.rows
            shape = [slot.rows] if slot.rows > 1 else []
            entries[slot.name + "#scale"] = {"dtype": "F32", "shape": shape,
                                             "data_offsets": [slot.scale_offset, end]}
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return b"".join([struct.pack("<Q", len(header)), header, head.body])
