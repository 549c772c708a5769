"""The method table: the paper's parameter counts on ViT-B/16 (100 classes) and the CNN's from our notes."""

from __future__ import annotations

import pytest

from fedpeft_edge.peft import METHODS, method_table

PAPER_VIT_B = {
    "full": 85_875_556,
    "head": 76_900,
    "bias": 179_812,
    "prompt (deep)": 169_060,
    "adapter (shared)": 225_220,
}


def test_vit_b16_counts_equal_the_papers() -> None:
    rows = {r.label: r for r in method_table("vit_base_patch16_224", 100)}
    assert {k: rows[k].num_params for k in PAPER_VIT_B} == PAPER_VIT_B
    assert rows["full"].fp32_bytes / 2**20 == pytest.approx(327.589, abs=1e-3)
    assert rows["bias"].fp32_bytes / 2**20 == pytest.approx(0.686, abs=1e-3)
    assert rows["lora"].num_params > rows["head"].num_params
    assert {r.method for r in rows.values()} == set(METHODS)


def test_cnn_table_leaves_out_transformer_methods() -> None:
    rows = {r.label: r.num_params for r in method_table("tf_efficientnet_lite0", 10)}
    assert rows == {"full": 3_383_818, "head": 12_810, "bias": 54_826, "lora": 195_082}


def test_profile_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fedpeft_edge.cli import profile

    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    assert profile.run(parser.parse_args(["--model", "vit_base_patch16_224", "--num-classes", "100"])) == 0
    out = capsys.readouterr().out
    for count in ("85,875,556", "76,900", "179,812", "169,060", "225,220"):
        assert count in out
    assert "327.589" in out and "lora" in out
