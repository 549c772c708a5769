"""LoRA aggregation modes: FFA's exact mean, FlexLoRA's product mean and SVD redistribution, per-device layouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_backbones import batch, build

from fedpeft_edge.backbone import fingerprint_backbone
from fedpeft_edge.config import LoraArgs
from fedpeft_edge.errors import PeftMethodError
from fedpeft_edge.peft.lora import LoraMethod
from fedpeft_edge.peft.lora.aggregation import LoraPair, ProductMean, factorize, lora_pairs, pad, product
from fedpeft_edge.peft.lora.ranks import LoraLayout
from fedpeft_edge.server.strategy import ClientUpdate, FedAvg
from fedpeft_edge.server.strategy.merge import MergeStrategy


def _lora(kind: str = "vit", seed: int = 0, **kw: object) -> tuple[LoraMethod, torch.nn.Module]:
    method = LoraMethod(dataclasses.replace(LoraArgs(r=4, alpha=8), **kw))  # type: ignore[arg-type]
    model = build(kind, seed)
    return method, method.apply(model)


def _devices(global_state: dict[str, torch.Tensor], n: int, seed: int = 3) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(f"d{i}", 10 * (i + 1), {k: v + torch.randn(v.shape, generator=g) * 0.1
                                                 for k, v in global_state.items()}) for i in range(n)]


def _mean_products(updates: list[ClientUpdate], frozen_a: dict[str, torch.Tensor], pairs: tuple[LoraPair, ...]
                   ) -> dict[LoraPair, torch.Tensor]:
    """Independent: sum_k n_k B_k A_k / sum_k n_k, in float64 (A from the update, or the frozen one)."""
    n = sum(u.num_samples for u in updates)
    return {p: sum(u.num_samples * product(u.tensors.get(p.a, frozen_a.get(p.a)), u.tensors[p.b])
                   for u in updates) / n for p in pairs}


def test_pairs_are_found_by_name_and_an_orphan_factor_is_refused() -> None:
    names = ["x.q_proj.lora_A.weight", "x.q_proj.lora_B.weight", "head.weight", "b.lora_A.weight",
             "b.lora_B.weight"]
    assert lora_pairs(names) == (LoraPair("x.q_proj.lora_A.weight", "x.q_proj.lora_B.weight"),
                                 LoraPair("b.lora_A.weight", "b.lora_B.weight"))
    with pytest.raises(PeftMethodError, match="without their other factor"):
        lora_pairs(["x.lora_A.weight", "head.weight"])


def test_ffa_shares_only_b_and_the_head_and_derives_a_from_the_seed() -> None:
    method, model = _lora(aggregation="ffa")
    manifest = method.manifest(model)
    assert manifest.names and not any(".lora_A." in n for n in manifest.names)
    assert sum(".lora_B." in n for n in manifest.names) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    full = LoraMethod(LoraArgs(r=4, alpha=8)).manifest(_lora()[1])
    assert manifest.nbytes < full.nbytes  # A never travels
    # Same seed, same A (the fingerprint covers the frozen A); another seed, another A and another fingerprint.
    _, again = _lora(aggregation="ffa")
    _, other = _lora(aggregation="ffa", seed=1)
    assert fingerprint_backbone(again, manifest) == fingerprint_backbone(model, manifest)
    a = dict(model.named_parameters())
    a_name = next(n for n in a if "lora_A" in n)
    assert not a[a_name].requires_grad
    assert torch.equal(a[a_name], dict(again.named_parameters())[a_name])
    assert not torch.equal(a[a_name], dict(other.named_parameters())[a_name])


def test_ffa_aggregate_is_the_exact_weighted_mean_of_the_devices_products() -> None:
    method, model = _lora(aggregation="ffa")
    from fedpeft_edge.backbone import named_tensors

    tensors = named_tensors(model)
    global_state = method.get_state(model)
    pairs = tuple(LoraPair(b.replace(".lora_B.", ".lora_A."), b) for b in global_state if ".lora_B." in b)
    frozen_a = {p.a: tensors[p.a].detach() for p in pairs}
    updates = _devices(global_state, 3)
    agg = FedAvg().aggregate(global_state, updates)
    want = _mean_products(updates, frozen_a, pairs)
    for p in pairs:
        got = product(frozen_a[p.a], agg[p.b])
        torch.testing.assert_close(got, want[p], rtol=1e-5, atol=1e-6)


def test_fedit_factor_mean_is_not_the_mean_of_the_products() -> None:
    """Why the other modes exist: FedIT's mean(B) @ mean(A) differs from mean(B @ A)."""
    method, model = _lora()
    global_state = method.get_state(model)
    pairs = lora_pairs(global_state)
    updates = _devices(global_state, 3)
    agg = FedAvg().aggregate(global_state, updates)
    want = _mean_products(updates, {}, pairs)
    gap = max(float((product(agg[p.a], agg[p.b]) - want[p]).abs().max()) for p in pairs)
    assert gap > 1e-3


def _flexlora_round(ranks: list[int]) -> tuple[dict[str, torch.Tensor], list[ClientUpdate], ProductMean,
                                               tuple[LoraPair, ...]]:
    method, model = _lora(aggregation="flexlora")
    global_state = method.get_state(model)
    manifest = method.manifest(model)
    pairs = lora_pairs(global_state)
    updates = []
    for u, k in zip(_devices(global_state, len(ranks)), ranks, strict=True):
        layout = LoraLayout(manifest, k)  # what the device sends at rank k, widened back as the server does
        updates.append(dataclasses.replace(u, tensors=layout.widen(layout.narrow(u.tensors))))
    merge = ProductMean(global_state)
    for u in updates:
        merge.add(u.tensors, u.num_samples)
    return global_state, updates, merge, pairs


def test_flexlora_server_product_is_the_weighted_mean_of_the_devices_products_at_their_ranks() -> None:
    global_state, updates, merge, pairs = _flexlora_round([1, 2, 4])
    want = _mean_products(updates, {}, pairs)
    got = merge.products()
    for p in pairs:
        torch.testing.assert_close(got[p], want[p], rtol=1e-10, atol=1e-12)
    # The device at rank 1 contributed exactly its rank-1 product (zero padding adds nothing).
    p = pairs[0]
    a, b = updates[0].tensors[p.a], updates[0].tensors[p.b]
    assert torch.linalg.matrix_rank(product(a, b)) <= 1


def test_flexlora_redistribution_at_full_rank_reproduces_the_mean_product() -> None:
    prod = torch.randn(6, 9, dtype=torch.float64) @ torch.randn(9, 5, dtype=torch.float64)
    a, b = factorize(prod, 5, (5, 5), (6, 5))
    torch.testing.assert_close(product(a, b), prod)
    # A prefix of the rank-5 factors is the rank-k truncated SVD (Eckart-Young): the error is the tail.
    s = torch.linalg.svdvals(prod)
    for k in (1, 2, 4):
        err = torch.linalg.matrix_norm(product(a[:k], b[:, :k]) - prod)
        torch.testing.assert_close(err, s[k:].square().sum().sqrt())


def test_flexlora_strategy_result_factorises_the_mean_product_at_the_run_rank() -> None:
    global_state, updates, merge, pairs = _flexlora_round([2, 4, 4])
    strategy = MergeStrategy(ProductMean, "FedAvg+flexlora")
    out = strategy.aggregate(global_state, updates)
    mean = merge.products()
    for p in pairs:
        approx = product(out[p.a], out[p.b])
        s = torch.linalg.svdvals(mean[p])
        err = torch.linalg.matrix_norm(approx - mean[p])
        assert float(err) <= float(s[4:].square().sum().sqrt()) * 1.001 + 1e-5  # the best rank-4 approximation
    head = [n for n in global_state if "lora" not in n]
    n = sum(u.num_samples for u in updates)
    for name in head:
        want = sum(u.num_samples * u.tensors[name].double() for u in updates) / n
        torch.testing.assert_close(out[name], want.float())


def test_a_rank_deficient_mean_keeps_every_component_trainable() -> None:
    prod = torch.outer(torch.randn(6, dtype=torch.float64), torch.randn(5, dtype=torch.float64))  # rank 1
    a, b = factorize(prod, 4, (4, 5), (6, 4))
    torch.testing.assert_close(product(a, b), prod)
    assert torch.all(a.abs().sum(dim=1) > 0)  # a zero A row with a zero B column would never train again
    assert torch.all(b[:, 1:] == 0)


def test_layout_narrows_widens_and_names_its_own_manifest() -> None:
    method, model = _lora(aggregation="flexlora")
    manifest = method.manifest(model)
    low = LoraLayout(manifest, 2)
    assert LoraLayout(manifest, 4).manifest is manifest
    assert low.manifest.hash != manifest.hash and low.manifest.nbytes < manifest.nbytes
    shapes = {t.name: t.shape for t in low.manifest.tensors}
    a_name = next(n for n in shapes if ".lora_A." in n)
    assert shapes[a_name][0] == 2 and shapes[a_name.replace("lora_A", "lora_B")][1] == 2
    state = method.get_state(model)
    narrow = low.narrow(state)
    assert all(tuple(narrow[t.name].shape) == t.shape for t in low.manifest.tensors)
    wide = low.widen(narrow)
    assert torch.equal(wide[a_name][:2], state[a_name][:2]) and torch.all(wide[a_name][2:] == 0)
    with pytest.raises(PeftMethodError, match="outside"):
        LoraLayout(manifest, 5)
    with pytest.raises(PeftMethodError, match="exceeds"):
        pad(state, lora_pairs(state), 2)


def test_zero_padded_components_stay_zero_when_training() -> None:
    """A rank-2 device on the rank-4 model: components 2..3 of A and B get no gradient, so they stay zero."""
    method, model = _lora(aggregation="flexlora")
    layout = LoraLayout(method.manifest(model), 2)
    method.set_state(model, layout.start(method.get_state(model)))
    x, y = batch()
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    pairs = lora_pairs(method.manifest(model).names)
    params = dict(model.named_parameters())
    by_name = {n.replace(".base_layer", "").replace(".default", ""): p for n, p in params.items()}
    touched = 0
    for p in pairs:
        ga, gb = by_name[p.a].grad, by_name[p.b].grad
        assert ga is not None and gb is not None
        assert torch.all(ga[2:] == 0) and torch.all(gb[:, 2:] == 0)
        touched += int(gb[:, :2].abs().sum() > 0)
    assert touched > 0
