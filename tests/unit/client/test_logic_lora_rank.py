"""A device given a LoRA rank (flexlora): trains from the first `rank` components, sends only them; ffa sends no A."""

from __future__ import annotations

import time

import torch
from test_device_state import tiny_config

from fedpeft_edge.client.device import AgentIdentity, build_device_state
from fedpeft_edge.client.logic import DeviceLogic
from fedpeft_edge.client.runtime import SharedRuntime
from fedpeft_edge.config import replace_in
from fedpeft_edge.peft.lora.aggregation import lora_pairs
from fedpeft_edge.peft.lora.ranks import LoraLayout
from fedpeft_edge.protocol import RoundTask, Update
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors


def test_a_task_at_rank_2_trains_the_first_2_components_and_sends_only_them() -> None:
    cfg = replace_in(tiny_config(), **{"peft_args.method": "lora", "peft_args.lora.r": 4,
                                       "peft_args.lora.aggregation": "flexlora", "peft_args.lora.rank_min": 1,
                                       "device_args.emulate_memory_mb": (1024.0, 65536.0)})
    rt = SharedRuntime(cfg)
    logic = DeviceLogic(rt, build_device_state(rt, AgentIdentity("d0", 0)))
    assert logic.join().profile is not None and logic.join().profile["ram_total_mb"] == 1024.0  # emulated
    assert logic.join().profile["memory_emulated"] is True
    task = RoundTask(receiver="d0", round=1, manifest_hash=rt.manifest.hash, encoding="fp32",
                     blob=encode_tensors(rt.initial_state, rt.manifest, "fp32"), deadline=time.time() + 60, rank=2)
    (reply,) = logic.handle(task)
    assert isinstance(reply, Update), reply
    layout = LoraLayout(rt.manifest, 2)
    assert reply.manifest_hash == layout.manifest.hash != rt.manifest.hash
    sent = decode_tensors(reply.blob, layout.manifest, layout.manifest.hash, 10**9)
    pairs = lora_pairs(rt.manifest.names)
    assert all(sent[p.a].shape[0] == 2 and sent[p.b].shape[1] == 2 for p in pairs)
    assert any(float(sent[p.b].abs().sum()) > 0 for p in pairs)  # it trained
    # The components it does not hold stayed zero through training (they are not sent; the device keeps them).
    kept = logic.state.peft
    assert all(torch.all(kept[p.a][2:] == 0) and torch.all(kept[p.b][:, 2:] == 0) for p in pairs)
