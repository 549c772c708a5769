"""Every PEFT method on a tiny ViT and tiny CNNs: selection, training isolation, state exchange, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_backbones import batch, build
from torch import nn

from fedpeft_edge.backbone import fingerprint_backbone, named_tensors
from fedpeft_edge.config import AdapterArgs, LoraArgs, PeftArgs, PromptArgs, TrainArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft import build_method
from fedpeft_edge.peft.base import PeftMethod
from fedpeft_edge.training import LocalTrainer


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


VARIANTS = {
    "full": PeftArgs(method="full"),
    "head": PeftArgs(method="head"),
    "bias": PeftArgs(method="bias"),
    "adapter": PeftArgs(method="adapter", adapter=AdapterArgs(width=8)),
    "adapter_shared": PeftArgs(method="adapter", adapter=AdapterArgs(width=8, shared_across_blocks=True)),
    "prompt_deep": PeftArgs(method="prompt", prompt=PromptArgs(num_tokens=3, depth="deep")),
    "prompt_shallow": PeftArgs(method="prompt", prompt=PromptArgs(num_tokens=3, depth="shallow")),
    "lora": PeftArgs(method="lora", lora=LoraArgs(r=2, alpha=4)),
}
CASES = [("vit", v) for v in VARIANTS] + [("cnn", v) for v in ("full", "head", "bias", "lora")] + [
    ("resnet", "bias"), ("resnet", "lora")]


def applied(kind: str, variant: str, seed: int = 0) -> tuple[nn.Module, PeftMethod]:
    method = build_method(VARIANTS[variant])
    return method.apply(build(kind, seed)), method


def one_step(model: nn.Module, lr: float = 0.5) -> None:
    args = TrainArgs(learning_rate=lr, momentum=0.0, nesterov=False, weight_decay=0.0)
    LocalTrainer(model, args, "cpu", [batch()], seed=0).train(max_steps=1)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_only_manifest_tensors_require_grad(kind: str, variant: str) -> None:
    model, method = applied(kind, variant)
    manifest = method.manifest(model)
    trainable = {k for k, t in named_tensors(model).items() if isinstance(t, nn.Parameter) and t.requires_grad}
    assert trainable == set(manifest.names)
    assert manifest.num_params == sum(t.numel() for t in method.get_state(model).values())


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_a_step_changes_only_manifest_tensors_and_keeps_the_fingerprint(kind: str, variant: str) -> None:
    model, method = applied(kind, variant)
    manifest = method.manifest(model)
    fingerprint = fingerprint_backbone(model, manifest)
    before = {k: t.detach().clone() for k, t in named_tensors(model).items()}
    one_step(model)
    after = named_tensors(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert changed <= set(manifest.names)
    assert fingerprint_backbone(model, manifest) == fingerprint


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_state_round_trips_bit_exactly(kind: str, variant: str) -> None:
    model, method = applied(kind, variant)
    state = method.get_state(model)
    assert list(state) == list(method.manifest(model).names)
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in state.values())
    method.set_state(model, {k: torch.randn_like(v) for k, v in state.items()})
    method.set_state(model, state)
    again = method.get_state(model)
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_state_moves_a_model_onto_another_process_copy() -> None:
    src, method = applied("vit", "lora", seed=0)
    one_step(src)
    dst, method2 = applied("vit", "lora", seed=0)
    method2.set_state(dst, method.get_state(src))
    x = batch()[0]
    src.eval()
    dst.eval()
    assert torch.equal(src(x), dst(x))


def _bad_states(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    first = next(iter(state))
    return {
        "missing": {k: v for k, v in state.items() if k != first},
        "extra": {**state, "not.a.tensor.name": torch.zeros(1)},
        "shape": {**state, first: torch.zeros(*state[first].shape, 2)},
        "dtype": {**state, first: state[first].double()},
        "nan": {**state, first: torch.full_like(state[first], float("nan"))},
        "inf": {**state, first: torch.full_like(state[first], float("inf"))},
    }


@pytest.mark.parametrize(("kind", "variant"), [("vit", "bias"), ("vit", "lora"), ("vit", "prompt_deep"),
                                                 ("cnn", "head")])
@pytest.mark.parametrize("fault", ["missing", "extra", "shape", "dtype", "nan", "inf"])
def test_a_bad_state_is_refused_and_changes_nothing(kind: str, variant: str, fault: str) -> None:
    model, method = applied(kind, variant)
    state = method.get_state(model)
    good = {k: v + 1 for k, v in state.items()}
    bad = _bad_states(good)[fault]
    with pytest.raises(PeftMethodError, match=r"state"):
        method.set_state(model, bad)
    assert all(torch.equal(state[k], v) for k, v in method.get_state(model).items())


@pytest.mark.parametrize(("kind", "variant"), [("vit", "adapter"), ("vit", "adapter_shared"), ("vit", "lora"),
                                                 ("cnn", "lora"), ("resnet", "lora")])
def test_adapter_and_lora_start_as_identity_and_then_train(kind: str, variant: str) -> None:
    plain = build(kind, seed=3).eval()
    x = batch(seed=5)[0]
    expected = plain(x)
    model, method = applied(kind, variant, seed=3)
    model.eval()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    zero_init = [k for k in method.manifest(model).names if k.endswith(("up.weight", "lora_B.weight"))]
    assert zero_init and all(not named_tensors(model)[k].any() for k in zero_init)
    one_step(model)
    assert any(named_tensors(model)[k].abs().sum() > 0 for k in zero_init), "up / lora_B never moved"


@pytest.mark.parametrize("depth", ["deep", "shallow"])
def test_prompt_changes_the_output_and_keeps_the_sequence_layout(depth: str) -> None:
    model, method = applied("vit", f"prompt_{depth}")
    model.eval()
    x = batch()[0]
    features = model.forward_features(x)
    assert features.shape == (4, 1 + 16, 32)  # class token + 4x4 patches: prompts are removed after the last block
    plain = build("vit").eval()
    assert not torch.allclose(plain(x), model(x))
    assert method.manifest(model).names == ("head.weight", "head.bias", "prompt.tokens")  # state-dict order


def test_adapter_shared_is_one_module_and_per_block_are_many() -> None:
    model, method = applied("vit", "adapter_shared")
    names = method.manifest(model).names
    assert names == ("head.weight", "head.bias", "adapter.down.weight", "adapter.down.bias", "adapter.up.weight",
                     "adapter.up.bias")
    model2, method2 = applied("vit", "adapter")
    assert sum(n.startswith("blocks.") for n in method2.manifest(model2).names) == 2 * 4


@pytest.mark.parametrize("variant", ["adapter", "prompt_deep"])
@pytest.mark.parametrize("kind", ["cnn", "resnet"])
def test_transformer_only_methods_refuse_a_cnn(kind: str, variant: str) -> None:
    with pytest.raises(PeftMethodError, match=r"VisionTransformer.*(bias|lora)"):
        applied(kind, variant)


def test_a_method_is_applied_once() -> None:
    model, method = applied("vit", "bias")
    with pytest.raises(PeftMethodError, match="already"):
        build_method(VARIANTS["lora"]).apply(model)


def test_lora_keys_are_the_backbones_own_names() -> None:
    model, method = applied("vit", "lora")
    names = method.manifest(model).names
    assert "blocks.0.attn.qkv.lora_A.weight" in names and "head.weight" in names
    assert not any("default" in n or "base_layer" in n for n in names)
    assert "blocks.0.attn.qkv.weight" in named_tensors(model)


def test_frozen_backbone_fingerprint_is_the_same_under_every_added_module_method() -> None:
    prints = set()
    for variant in ("head", "adapter", "adapter_shared", "prompt_deep", "lora"):
        model, method = applied("vit", variant, seed=7)
        prints.add(fingerprint_backbone(model, method.manifest(model)))
    assert len(prints) == 1
    model, method = applied("vit", "bias", seed=7)
    assert fingerprint_backbone(model, method.manifest(model)) not in prints


def test_a_deepcopy_keeps_its_own_hooks() -> None:
    model, method = applied("vit", "adapter")
    clone = copy.deepcopy(model)
    method.set_state(clone, {k: v + 0.1 for k, v in method.get_state(clone).items()})
    x = batch()[0]
    model.eval()
    clone.eval()
    plain = build("vit").eval()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)  # the original is untouched
    assert not torch.allclose(clone(x), plain(x))


def test_unknown_method_is_refused() -> None:
    with pytest.raises(PeftMethodError, match="one of full, head"):
        build_method(PeftArgs(method="nope"))  # type: ignore[arg-type]
