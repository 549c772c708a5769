"""Updates sent as views of their tensors (encode_parts / encode_update): the same bytes as encode_tensors, no
copy of the tensors, NaN refused, and decode_tensors(copy=False) sharing a read-only payload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft_edge.errors import CodecError
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.transport.framing import pop_blob
from fedpeft_edge.wire.chunk import Reassembler, split_payload
from fedpeft_edge.wire.codec import (
    ZERO_COPY_MIN_BYTES,
    FlatTensors,
    TensorParts,
    decode_message,
    decode_tensors,
    encode_message,
    encode_parts,
    encode_tensors,
    encode_update,
    message_parts,
)


def _manifest(state: dict[str, torch.Tensor]) -> Manifest:
    return Manifest("full", tuple(TensorSpec.of(k, v) for k, v in state.items()))


def _uniform(sizes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.bias": torch.randn(n, generator=g) for i, n in enumerate(sizes)}


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(6, generator=g).half(),
            "step": torch.tensor(3, dtype=torch.int64), "empty": torch.zeros(0)}


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "bf16", "int8", "int8_row"])
@pytest.mark.parametrize("make", [lambda: _uniform([5, 0, 17, 1]), _mixed])
def test_parts_are_the_bytes_encode_tensors_writes(make, encoding: str) -> None:
    state = make()
    man = _manifest(state)
    parts = encode_parts(state, man, encoding)
    assert bytes(parts) == bytes(encode_tensors(state, man, encoding))
    assert len(parts) == parts.nbytes == len(bytes(parts))


def test_parts_view_the_tensors_instead_of_copying_them() -> None:
    state = _uniform([1000, 3000])
    parts = encode_parts(state, _manifest(state))
    addrs = {np.frombuffer(p, dtype=np.uint8).ctypes.data for p in parts.parts[1:]}
    assert addrs == {t.data_ptr() for t in state.values()}


def test_non_contiguous_and_grad_tensors_are_sent_by_value() -> None:
    base = torch.arange(20, dtype=torch.float32)
    state = {"strided": base[::2], "matrix": torch.randn(3, 4).t(), "p": torch.nn.Parameter(torch.ones(3))}
    man = _manifest(state)
    assert bytes(encode_parts(state, man)) == bytes(encode_tensors(state, man))
    back = decode_tensors(bytes(encode_parts(state, man)), man)
    for k, v in state.items():
        assert torch.equal(back[k], v.detach())


def test_parts_refuse_non_finite_values_naming_the_tensor() -> None:
    state = _uniform([4, 4])
    state["blocks.1.bias"][2] = float("nan")
    with pytest.raises(CodecError, match="blocks.1.bias"):
        encode_parts(state, _manifest(state))


def test_a_sum_that_overflows_is_not_taken_for_infinity() -> None:
    state = {"big": torch.full((4,), 3e38)}
    assert bytes(encode_parts(state, _manifest(state))) == bytes(encode_tensors(state, _manifest(state)))


def test_encode_update_sends_views_from_the_threshold_up() -> None:
    small = _uniform([ZERO_COPY_MIN_BYTES // 4 - 100])
    large = _uniform([ZERO_COPY_MIN_BYTES // 4])
    assert not isinstance(encode_update(small, _manifest(small)), TensorParts)
    assert isinstance(encode_update(large, _manifest(large)), TensorParts)
    mixed = _mixed()  # not one float dtype: always one blob
    assert not isinstance(encode_update(mixed, _manifest(mixed)), TensorParts)
    with pytest.raises(CodecError, match="encoding 'fp8'"):
        encode_update(large, _manifest(large), "fp8")


def test_a_message_frames_parts_like_the_joined_blob() -> None:
    state = _uniform([300, 7, 0, 64])
    man = _manifest(state)
    params = {"msg_type": 3, "sender": 1, "receiver": 0}
    parts = encode_parts(state, man)
    frame = b"".join(message_parts(params, parts))
    assert frame == encode_message(params, bytes(parts))
    got, blob = decode_message(frame)
    assert got == params and blob is not None
    assert all(torch.equal(decode_tensors(blob, man)[k], v) for k, v in state.items())


def test_pop_blob_takes_parts_and_chunks_reassemble_them() -> None:
    state = _uniform([5000, 3000])
    man = _manifest(state)
    params = {"msg_type": 3, "sender": 1, "receiver": 0, "model_params": encode_parts(state, man)}
    blob = pop_blob(params)
    assert isinstance(blob, TensorParts) and params["_blob_key"] == "model_params"
    frame_parts = message_parts(params, blob)
    reasm = Reassembler()
    out = None
    for chunk in split_payload(frame_parts, 4096):
        out = reasm.add(chunk, "d1") or out
    assert out is not None and bytes(out) == b"".join(frame_parts)


def test_copy_false_shares_a_read_only_payload() -> None:
    state = _uniform([100, 50])
    man = _manifest(state)
    blob = bytes(encode_tensors(state, man))
    shared = decode_tensors(blob, man, copy=False)
    base = np.frombuffer(blob, dtype=np.uint8).ctypes.data
    assert all(base <= t.data_ptr() < base + len(blob) for t in shared.values())
    copied = decode_tensors(blob, man)  # copy=None: bytes are copied
    assert all(not (base <= t.data_ptr() < base + len(blob)) for t in copied.values())
    for k, v in state.items():
        assert torch.equal(shared[k], v) and torch.equal(copied[k], v)


def test_decoding_parts_in_process_reads_their_bytes() -> None:
    state = _mixed()
    man = _manifest(state)
    back = decode_tensors(encode_parts(state, man), man)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_a_uniform_blob_decodes_to_one_flat_tensor_with_lazy_views() -> None:
    state = {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(5), "c.scale": torch.randn(2, 1, 2)}
    man = _manifest(state)
    got = decode_tensors(bytes(encode_tensors(state, man)), man, copy=False)
    assert isinstance(got, FlatTensors)
    assert list(got) == list(state) and len(got) == 3 and "b.bias" in got and "nope" not in got
    assert torch.equal(got.flat, torch.cat([v.reshape(-1) for v in state.values()]))
    for k, v in state.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v)
        assert got.flat.data_ptr() <= got[k].data_ptr() < got.flat.data_ptr() + got.flat.nbytes  # views of it
    assert all(torch.equal(a, b) for a, b in zip(dict(got).values(), state.values(), strict=True))
