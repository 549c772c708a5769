"""A method's manifest: the ordered names, shapes and dtypes of the tensors it shares, and its hash."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math

import torch

from fedpeft_edge.errors import PeftMethodError

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
    torch.int8, torch.bool)}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One shared tensor: its stable name, shape and dtype name (e.g. "float32")."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return _DTYPES[self.dtype]
        except KeyError as exc:
            raise PeftMethodError(f"tensor {self.name}: unknown dtype {self.dtype!r}; use one of {sorted(_DTYPES)}") \
                from exc

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name=name, shape=tuple(int(s) for s in tensor.shape),
                   dtype=str(tensor.dtype).removeprefix("torch."))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The ordered tensors a method trains and shares; `hash` identifies it across processes."""

    method: str
    tensors: tuple[TensorSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors in their own dtypes (raw, before any wire encoding)."""
        return sum(t.nbytes for t in self.tensors)

    @functools.cached_property
    def hash(self) -> str:  # cached: the codec asks for it on every message (fields are frozen)
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        body = {"method": self.method,
                "tensors": [[t.name, list(t.shape), t.dtype] for t in self.tensors]}
        return json.dumps(body, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            body = json.loads(text)
            specs = tuple(TensorSpec(str(n), tuple(int(s) for s in shape), str(d)) for n, shape, d in body["tensors"])
            return cls(method=str(body["method"]), tensors=specs)
        except (ValueError, KeyError, TypeError) as exc:
            raise PeftMethodError(f"not a manifest JSON ({exc}); expected {{'method':..., 'tensors':[[name, "
                                  "shape, dtype], ...]}}") from exc
