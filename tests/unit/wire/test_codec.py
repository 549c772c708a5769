"""Codec: frames and updates round-trip exactly, compress within measured error, read as safetensors."""

from __future__ import annotations

import struct

import pytest
import safetensors.torch
import torch

from fedpeft_edge.errors import CodecError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.wire.codec import (
    FRAME_HEADER_BYTES,
    TENSORS_HEADER_BYTES,
    decode_message,
    decode_tensors,
    encode_message,
    encode_tensors,
    quantize_int8,
    to_safetensors,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.qkv.bias": torch.randn(48, generator=g),
        "blocks.0.mlp.fc1.weight": torch.randn(32, 16, generator=g) * 3,
        "head.weight": torch.randn(10, 16, generator=g).to(torch.bfloat16),
        "pos_embed": torch.randn(1, 5, 16, generator=g).to(torch.float16),
        "step": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


def _manifest(state: dict[str, torch.Tensor], method: str = "full") -> Manifest:
    return Manifest(method, tuple(TensorSpec.of(k, v) for k, v in state.items()))


def test_message_frame_round_trip_with_and_without_blob() -> None:
    params = {"msg_type": 3, "sender": 1, "receiver": 0, "round_idx": 2, "metrics": {"loss": 0.5}}
    blob = bytes(range(256)) * 3
    data = encode_message(params, blob)
    assert FRAME_HEADER_BYTES + len(blob) < len(data) < FRAME_HEADER_BYTES + len(blob) + 100
    got, view = decode_message(data)
    assert got == params and view is not None and bytes(view) == blob
    got2, none = decode_message(encode_message(params))
    assert got2 == params and none is None


def test_fp32_round_trip_is_bit_exact_and_in_manifest_order() -> None:
    state = _state()
    m = _manifest(state)
    blob = encode_tensors(state, m)
    out = decode_tensors(blob, m, m.hash)
    assert list(out) == list(m.names)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert torch.equal(out[k], v)


def test_fp32_payload_overhead_is_the_fixed_header_only() -> None:
    state = {"w": torch.randn(25_000)}  # 100 KB
    m = _manifest(state)
    blob = encode_tensors(state, m)
    assert len(blob) == 100_000 + TENSORS_HEADER_BYTES
    assert len(blob) / 100_000 <= 1.005


def test_decode_from_writable_buffer_shares_memory_and_bytes_copy() -> None:
    state = {"w": torch.randn(64)}
    m = _manifest(state)
    buf = bytearray(encode_tensors(state, m))
    shared = decode_tensors(buf, m)["w"]
    buf[TENSORS_HEADER_BYTES:TENSORS_HEADER_BYTES + 4] = b"\x00\x00\x00\x00"
    assert shared[0].item() == 0.0  # aliases the reassembled buffer
    copied = decode_tensors(bytes(encode_tensors(state, m)), m)["w"]
    assert torch.equal(copied, state["w"])


def test_lossy_encodings_shrink_and_stay_within_measured_error() -> None:
    g = torch.Generator().manual_seed(1)
    state = {"w": torch.randn(64, 256, generator=g), "b": torch.randn(64, generator=g) * 0.01}
    m = _manifest(state)
    raw = encode_tensors(state, m, "fp32")
    bounds = {"fp16": (0.5, 1e-3), "bf16": (0.5, 8e-3),
              "int8": (0.25, 0.5 / 127), "int8_row": (0.25, 0.5 / 127)}
    for enc, (ratio, rel_err) in bounds.items():
        blob = encode_tensors(state, m, enc)
        assert len(blob) <= len(raw) * ratio + 64 * 4 + 64, enc
        out = decode_tensors(blob, m, m.hash)
        for k, v in state.items():
            assert out[k].dtype == torch.float32
            err = float((out[k] - v).abs().max() / v.abs().max())
            assert err <= rel_err * 1.01, (enc, k, err)


def test_int8_row_beats_per_tensor_when_rows_differ_in_scale() -> None:
    w = torch.randn(8, 128) * torch.logspace(-3, 0, 8)[:, None]
    m = _manifest({"w": w})
    err = {}
    for enc in ("int8", "int8_row"):
        out = decode_tensors(encode_tensors({"w": w}, m, enc), m)["w"]
        err[enc] = float((out[0] - w[0]).abs().max())  # the smallest-scale row
    assert err["int8_row"] < err["int8"] / 10


def test_quantize_int8_zero_tensor_has_unit_scale() -> None:
    q, scale = quantize_int8(torch.zeros(3, 4), per_row=True)
    assert q.abs().sum() == 0 and torch.equal(scale, torch.ones(3))


def test_to_safetensors_is_readable_by_the_safetensors_library() -> None:
    state = _state()
    m = _manifest(state)
    loaded = safetensors.torch.load(to_safetensors(encode_tensors(state, m), m))
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    q = safetensors.torch.load(to_safetensors(encode_tensors(state, m, "int8_row"), m))
    w = state["blocks.0.mlp.fc1.weight"]
    deq = q["blocks.0.mlp.fc1.weight"].float() * q["blocks.0.mlp.fc1.weight#scale"][:, None]
    assert q["blocks.0.mlp.fc1.weight"].dtype == torch.int8
    assert float((deq - w).abs().max()) <= float(w.abs().max()) / 127


def test_encode_refuses_state_that_does_not_match_the_manifest() -> None:
    import pytest

    from fedpeft_edge.errors import CodecError

    state = _state()
    m = _manifest(state)
    with pytest.raises(CodecError, match="missing"):
        encode_tensors({k: v for k, v in state.items() if k != "step"}, m)
    bad = dict(state, **{"blocks.0.attn.qkv.bias": torch.randn(47)})
    with pytest.raises(CodecError, match="manifest says"):
        encode_tensors(bad, m)
    with pytest.raises(CodecError, match="float16"):
        encode_tensors({"w": torch.full((3,), 1e6)}, _manifest({"w": torch.zeros(3)}), "fp16")
    with pytest.raises(CodecError, match="encoding"):
        encode_tensors(state, m, "fp8")


def _uniform_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    state = {f"blocks.{i}.bias": torch.randn(1 + 7 * i, generator=g) for i in range(60)}
    state["scalar"] = torch.tensor(2.5)
    state["none"] = torch.zeros(0, 3)
    state["wide"] = torch.randn(8, 6, generator=g).t()  # not contiguous
    state["grad"] = torch.randn(4, 4, generator=g).requires_grad_()
    return state


def test_one_dtype_updates_round_trip_bit_exactly_through_the_one_call_path() -> None:
    state = _uniform_state()
    man = _manifest(state, "bias")
    blob = encode_tensors(state, man)
    for source in (bytes(blob), bytearray(blob)):  # copied from bytes, shared with a writable buffer
        out = decode_tensors(source, man, man.hash)
        assert list(out) == list(state)
        for name, t in state.items():
            assert out[name].shape == t.shape and out[name].dtype == t.dtype
            assert torch.equal(out[name], t.detach()), name
    assert decode_tensors(bytes(blob), man)["wide"].is_contiguous()


def test_one_dtype_path_names_the_non_finite_tensor_on_both_sides() -> None:
    state = _uniform_state()
    man = _manifest(state, "bias")
    bad = dict(state, **{"blocks.40.bias": state["blocks.40.bias"].clone()})
    bad["blocks.40.bias"][2] = float("inf")
    with pytest.raises(CodecError, match=r"'blocks\.40\.bias' has 1 non-finite"):
        encode_tensors(bad, man)
    huge = dict(state, **{"blocks.3.bias": torch.full((22,), 3e38)})  # the sum overflows, values are finite
    assert torch.equal(decode_tensors(encode_tensors(huge, man), man)["blocks.3.bias"], huge["blocks.3.bias"])
    blob = bytearray(encode_tensors(state, man))
    offset = TENSORS_HEADER_BYTES + 4 * sum(1 + 7 * i for i in range(7))  # element 0 of blocks.7.bias
    blob[offset:offset + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(CodecError, match=r"'blocks\.7\.bias' has 1 non-finite"):
        decode_tensors(bytes(blob), man, man.hash)
