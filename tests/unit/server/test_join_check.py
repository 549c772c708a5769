"""A refused join names what differs (PEFT method, class count, manifest, backbone, classes) and the setting that
fixes it; an accepted one carries the run's class list."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from engine_harness import FINGERPRINT, MANIFEST, Harness

from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import Join, JoinAck
from fedpeft_edge.server.join_check import join_refusal

RUN = Manifest("lora", (TensorSpec("blocks.0.attn.qkv.lora_A", (8, 32), "float32"),
                        TensorSpec("head.weight", (10, 32), "float32"), TensorSpec("head.bias", (10,), "float32")))


def _judge(theirs: Manifest, fingerprint: str = "a" * 64, classes: Any = None, run_classes: Any = None) -> str | None:
    return join_refusal(manifest=RUN, fingerprint="a" * 64, num_classes=10, model_desc="vit_tiny, weights none",
                        class_names=run_classes, device_manifest_hash=theirs.hash,
                        device_manifest=theirs.to_json(), device_fingerprint=fingerprint, device_classes=classes)


def test_a_method_mismatch_is_named_as_such_not_as_a_backbone_difference() -> None:
    bias = Manifest("bias", (TensorSpec("blocks.0.attn.qkv.bias", (96,), "float32"),) + RUN.tensors[1:])
    reason = str(_judge(bias, fingerprint="b" * 64))  # its frozen tensors differ too: the method is the cause
    assert reason.startswith("PEFT method differs: the device trains 'bias', the run 'lora'")
    assert "peft_args.method: lora" in reason and "fingerprint" not in reason


def test_class_count_manifest_and_backbone_differences_are_named() -> None:
    three = dataclasses.replace(RUN, tensors=(RUN.tensors[0], TensorSpec("head.weight", (3, 32), "float32"),
                                              TensorSpec("head.bias", (3,), "float32")))
    assert "class count differs: the device's model has 3 classes, the run's 10" in str(_judge(three))
    rank4 = dataclasses.replace(RUN, tensors=(TensorSpec("blocks.0.attn.qkv.lora_A", (4, 32), "float32"),)
                                + RUN.tensors[1:])
    assert str(_judge(rank4)).startswith("manifest differs (method lora): 1 of another shape")
    assert str(_judge(RUN, fingerprint="b" * 64)).startswith("backbone differs")
    other_model = Manifest("lora", (TensorSpec("layer1.lora_A", (8, 64), "float32"),) + RUN.tensors[1:])
    assert str(_judge(other_model, fingerprint="b" * 64)).startswith("backbone differs: the device builds another")


def test_a_device_with_classes_the_run_lacks_is_refused_with_the_fix() -> None:
    run = ("bird", "cat", "dog")
    assert _judge(RUN, classes=("cat", "dog"), run_classes=run) is None  # a subset maps by name
    reason = str(_judge(RUN, classes=("cat", "fox"), run_classes=run))
    assert "classes differ" in reason and "['fox']" in reason and "data_args.class_names" in reason
    assert _judge(RUN, classes=("fox",), run_classes=None) is None  # no run list: nothing to check against


def test_the_engine_sends_the_run_class_list_with_an_accepted_join(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.engine.spec = dataclasses.replace(h.engine.spec, class_names=("bird", "cat", "dog"))
    for device, classes in (("d1", ("cat", "dog")), ("d2", ("cat", "fox"))):
        h.send(Join(sender=device, backbone_fingerprint=FINGERPRINT, manifest_hash=MANIFEST.hash,
                    num_samples=10, manifest=MANIFEST.to_json(), class_names=classes))
    acks = {m.receiver: m for m in h.out if isinstance(m, JoinAck)}
    assert acks["d1"].accepted and acks["d1"].class_names == ("bird", "cat", "dog")
    assert not acks["d2"].accepted and "['fox']" in str(acks["d2"].reason)
